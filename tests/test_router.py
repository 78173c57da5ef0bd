"""Routing and failover on synthetic flows (mitmproxy's test helpers) with a fake resender: each
refusal the contract names, and the in-flight count, which must come back to 0 whatever happens."""

import asyncio
import json
import time

import httpx
import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from claudeflare.proxy import Claudeflare
from conftest import key_for
from harness import add_account

LIMITED = {"anthropic-ratelimit-unified-status": "rejected", "anthropic-ratelimit-unified-reset": str(int(time.time()) + 3600)}


def reply(status: int, headers: dict | None = None, kind: str = "api_error") -> http.Response:
    body = {"type": "error", "error": {"type": kind, "message": "x"}} if status >= 400 else {"type": "message"}
    return http.Response.make(status, json.dumps(body), {"content-type": "application/json", **(headers or {})})


class FakeResender:
    """Answers each resend with the next of `replies` (an exception is raised), recording which key it carried."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.sent: list[str] = []

    async def send(self, request, headers, max_body):
        self.sent.append(headers.get("x-api-key") or headers.get("authorization"))
        answer = self.replies.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def proxy(tmp_path):
    home = tmp_path / "home"
    for name in ("a", "b"):
        add_account(home, name, "api-key", api_key=key_for(name))
    claudeflare = Claudeflare()
    with taddons.context(claudeflare) as tctx:
        tctx.configure(claudeflare, claudeflare_home=str(home), claudeflare_upstream="http://127.0.0.1:9",
                       claudeflare_strategy="round-robin", claudeflare_retry_delay_ms=1)
        yield claudeflare
    claudeflare.watcher.stop()


def pool_flow(claudeflare) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.path = "/v1/messages"
    flow.request.content = json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": []}).encode()
    claudeflare.states.start(flow)
    return flow


def upstream_answers(claudeflare, flow, response: http.Response):
    """The request hook routes the flow, mitmproxy sends it, the upstream answers `response`."""
    asyncio.run(claudeflare.request(flow))
    assert flow.response is None and sum(claudeflare.balancer.in_flight.values()) == 1
    flow.response = response
    return claudeflare.response(flow)


def test_a_failover_that_raises_still_gives_its_in_flight_count_back(proxy):
    proxy.resender = FakeResender(RuntimeError("a bug in the resend"))
    flow = pool_flow(proxy)
    with pytest.raises(RuntimeError):
        asyncio.run(upstream_answers(proxy, flow, reply(429, LIMITED, "rate_limit_error")))
    assert len(proxy.resender.sent) == 1  # the failover did try the other account
    assert dict(proxy.balancer.in_flight) == {}
