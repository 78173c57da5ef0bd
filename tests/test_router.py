"""Routing and failover on synthetic flows (mitmproxy's test helpers) with a fake resender: each
refusal the contract names, and the in-flight count, which must come back to 0 whatever happens."""

import asyncio
import json
import time

import httpx
import pytest
from mitmproxy import http
from mitmproxy.io import tnetstring
from mitmproxy.test import taddons, tflow

from claudeflare.accounts import Account, Pool
from claudeflare.balancer import Balancer
from claudeflare.credentials import Credential, CredentialStore
from claudeflare.flows import FlowState, FlowStates
from claudeflare.options import Retry
from claudeflare.policy import credential_fingerprint
from claudeflare.proxy import Claudeflare
from claudeflare.ratelimit import Health
from claudeflare.router import Router

from harness import add_account, key_for, wait_until


def limited() -> dict:
    """A rejected window that resets an hour from now (now: when the reply is made, not imported)."""
    return {
        "anthropic-ratelimit-unified-status": "rejected",
        "anthropic-ratelimit-unified-reset": str(int(time.time()) + 3600),
    }


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
        tctx.configure(
            claudeflare,
            claudeflare_home=str(home),
            claudeflare_upstream="http://127.0.0.1:9",
            claudeflare_strategy="round-robin",
            claudeflare_retry_delay_ms=1,
        )
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
    proxy.router.resender = FakeResender(RuntimeError("a bug in the resend"))
    flow = pool_flow(proxy)
    with pytest.raises(RuntimeError):
        asyncio.run(upstream_answers(proxy, flow, reply(429, limited(), "rate_limit_error")))
    assert len(proxy.router.resender.sent) == 1  # the failover did try the other account
    assert dict(proxy.balancer.in_flight) == {}


# --- the Router alone, with its collaborators in memory -------------------------------------------


class FakeRefresher:
    """A token server that hands out a new access token when told the old one was refused."""

    def __init__(self):
        self.refused: list[str] = []

    async def fresh(self, name, credential, rejected=None):
        if rejected is None:
            return credential
        self.refused.append(rejected)
        return Credential(
            access_token=f"{rejected}-fresh", refresh_token=credential.refresh_token, expires_at=time.time() + 3600
        )


def make_router(*accounts: Account, credentials: dict, resender: FakeResender, refresher=None) -> Router:
    pool = Pool(accounts, credentials)
    sleeps = []

    async def sleep(seconds):
        sleeps.append(seconds)

    router = Router(
        lambda: pool,
        Balancer("round-robin"),
        Health(),
        FlowStates(),
        refresher=refresher,
        resender=resender,
        sleep=sleep,
    )
    router.sleeps = sleeps
    return router


def keyed(*names, resender) -> Router:
    return make_router(
        *(Account(n, "api-key") for n in names),
        credentials={n: Credential(api_key=key_for(n)) for n in names},
        resender=resender,
    )


async def serve(router: Router, upstream: http.Response, owner: str | None = None) -> tuple[http.HTTPFlow, FlowState]:
    """What the addon's hooks do for one pool flow: choose and attempt, then the upstream's reply."""
    flow = tflow.tflow()
    flow.request.path = "/v1/messages"
    state = router.states.start(flow)
    state.owner = owner
    chosen = await router.choose(router.pool(), state, exclude=())
    router.attempt(flow, flow.request.headers.copy(), state, *chosen)
    flow.response = upstream
    router.observe_signals(state.account, state, upstream)  # responseheaders
    try:
        await router.settle(flow, state)
    finally:
        router.release(state)
    return flow, state


def test_a_429_fails_over_to_the_next_account():
    router = keyed("a", "b", resender=FakeResender(reply(200)))
    flow, state = asyncio.run(serve(router, reply(429, limited(), "rate_limit_error")))
    first = state.failovers[0]["account"]
    assert flow.response.status_code == 200 and state.account != first and state.attempts == 2
    assert router.resender.sent == [key_for(state.account)]
    assert state.failovers == [{"account": first, "status": 429, "reason": "limited"}]
    assert not router.health.available(first) and router.balancer.in_flight == {}


def test_a_529_waits_and_retries_the_same_account_with_backoff():
    router = keyed("a", "b", resender=FakeResender(reply(529, kind="overloaded_error"), reply(200)))
    router.retry = Retry(attempts=3, delay=0.5, backoff=3.0)
    flow, state = asyncio.run(serve(router, reply(529, kind="overloaded_error")))
    assert flow.response.status_code == 200 and state.attempts == 3
    assert router.resender.sent == [key_for(state.account)] * 2 and router.sleeps == [0.5, 1.5]
    assert [f["reason"] for f in state.failovers] == ["overloaded", "overloaded"]
    assert router.balancer.in_flight == {}


def test_a_401_refreshes_the_token_once_then_the_account_needs_a_login():
    account = Account("m", "max")
    router = make_router(
        account,
        credentials={
            "m": Credential(
                access_token="sk-ant-oat01-old", refresh_token="sk-ant-ort01-r", expires_at=time.time() + 3600
            )
        },
        resender=FakeResender(reply(401, kind="authentication_error")),
        refresher=FakeRefresher(),
    )
    flow, state = asyncio.run(serve(router, reply(401, kind="authentication_error")))
    assert router.refresher.refused == ["sk-ant-oat01-old"]  # one refresh, for the token refused
    assert router.resender.sent == ["Bearer sk-ant-oat01-old-fresh"]
    assert router.health.get("m").state == "needs-login" and not router.health.available("m")
    assert flow.response.status_code == 503 and b"m: needs-login" in flow.response.content
    assert router.balancer.in_flight == {}


def test_a_request_pinned_to_its_owner_never_moves():
    router = keyed("a", "b", resender=FakeResender())
    flow, state = asyncio.run(serve(router, reply(429, limited(), "rate_limit_error"), owner="a"))
    assert state.account == "a" and router.resender.sent == []
    assert flow.response.status_code == 429  # the owner's own refusal: nobody else has the file
    assert router.balancer.in_flight == {}


def test_nobody_left_is_a_429_that_says_until_when():
    router = keyed("a", "b", resender=FakeResender(reply(429, limited(), "rate_limit_error")))
    flow, state = asyncio.run(serve(router, reply(429, limited(), "rate_limit_error")))
    assert [f["reason"] for f in state.failovers] == ["limited", "limited"]
    body = json.loads(flow.response.content)
    assert flow.response.status_code == 429 and body["error"]["type"] == "rate_limit_error"
    assert "all 2 usable account(s) are rate limited" in body["error"]["message"]
    assert 3590 <= int(flow.response.headers["retry-after"]) <= 3600
    assert router.balancer.in_flight == {}


def test_the_lease_is_given_back_when_the_resender_raises():
    router = keyed("a", "b", resender=FakeResender(httpx.ConnectError("refused"), RuntimeError("a bug")))
    with pytest.raises(RuntimeError):
        asyncio.run(serve(router, reply(529, kind="overloaded_error")))
    assert len(router.resender.sent) == 2 and router.balancer.in_flight == {}


def test_a_pool_change_ends_a_refusal_only_where_the_credential_changed(proxy, tmp_path):
    pool = proxy.pool
    for name in ("a", "b"):
        credential = pool.stored_credential(next(a for a in pool.accounts if a.name == name))
        proxy.health.disable(name, "disabled by Anthropic (403)", credential_fingerprint(credential))
    CredentialStore(proxy.home).set_account("b", Credential(api_key=key_for("b-new")))
    assert wait_until(lambda: proxy.pool is not pool)  # the watcher's thread reloads it
    assert proxy.health.view("b").state == "disabled"  # reading the pool changes nothing
    proxy.pool_changed(proxy.pool)  # what the watcher's on_change hands to the event loop
    assert proxy.health.view("a").state == "disabled" and not proxy.health.available("a")
    assert proxy.health.available("b") and proxy.health.view("b").state == "ok"


def test_flow_metadata_holds_plain_values_and_no_secret(proxy):
    flow = pool_flow(proxy)
    asyncio.run(proxy.request(flow))
    state = proxy.states.get(flow)
    assert state.lease and flow.metadata == {
        "claudeflare": {"id": state.id, "account": state.account, "client": None, "attempts": 1}
    }
    saved = tnetstring.dumps(flow.get_state())  # what `-w` writes: the live state stays out of it
    assert key_for("a").encode() not in saved and key_for("b").encode() not in saved
    asyncio.run(proxy.response(flow))
    assert dict(proxy.balancer.in_flight) == {}
