"""The addon's hooks on synthetic flows (mitmproxy's own test helpers), for cases no loopback test can reach."""

import asyncio

import pytest
from mitmproxy.test import taddons, tflow

from claudeflare.config import STRATEGIES
from claudeflare.proxy import addons

from harness import add_account


@pytest.fixture
def addon(home):
    add_account(home, "a", "api-key", api_key="sk-ant-api03-aaaaaaaaaaaa")
    by_type = {type(a).__name__: a for a in addons()}  # whatever other addons the list holds
    gate, claudeflare, recorder = by_type["ClientGate"], by_type["Claudeflare"], by_type["Recorder"]
    with taddons.context(gate, claudeflare, recorder) as tctx:
        tctx.configure(claudeflare, claudeflare_home=str(home), claudeflare_upstream="http://127.0.0.1:9")
        tctx.configure(recorder, claudeflare_home=str(home))
        yield gate, claudeflare
    recorder.done()
    claudeflare.watcher.stop()


def pool_flow(peer="127.0.0.1"):
    flow = tflow.tflow()
    flow.client_conn.sockname = ("127.0.0.1", 8080)
    flow.client_conn.peername = (peer, 50000)
    flow.request.host, flow.request.port, flow.request.path = "127.0.0.1", 8080, "/v1/messages"
    return flow


def test_remote_client_without_client_keys_is_refused(addon):
    gate, _ = addon
    flow = pool_flow(peer="192.0.2.10")
    asyncio.run(gate.requestheaders(flow))
    assert flow.response.status_code == 403
    assert b"client-key create" in flow.response.content


def test_loopback_client_is_served_without_keys(addon):
    gate, _ = addon
    flow = pool_flow()
    asyncio.run(gate.requestheaders(flow))
    assert flow.response is None and "claudeflare" in flow.metadata


def test_bad_options_are_refused(addon):
    _, claudeflare = addon
    with taddons.context(claudeflare) as tctx:
        for option, value in [
            ("claudeflare_strategy", "fastest"),
            ("claudeflare_upstream", "ftp://x"),
            ("claudeflare_session_hours", "0"),
            ("claudeflare_retry_backoff", "0.5"),
            ("claudeflare_switch_utilization", "lots"),
            ("claudeflare_retry_attempts", 0),
        ]:
            with pytest.raises(Exception, match=option):
                tctx.configure(claudeflare, **{option: value})


def test_other_hosts_are_refused_and_not_pool_flows(addon):
    gate, _ = addon
    flow = tflow.tflow()
    flow.request.host, flow.request.port = "example.com", 443
    asyncio.run(gate.requestheaders(flow))
    assert "claudeflare" not in flow.metadata and flow.response.status_code == 403


def test_a_bug_in_a_request_hook_refuses_the_flow_rather_than_letting_it_through(addon, monkeypatch, caplog):
    gate, claudeflare = addon

    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(gate, "is_pool_flow", broken)
    flow = pool_flow()
    asyncio.run(gate.requestheaders(flow))
    assert flow.response.status_code == 500 and b'"api_error"' in flow.response.content
    assert "internal error in the gate" in caplog.text
    monkeypatch.undo()
    monkeypatch.setattr(claudeflare.router, "choose", broken)
    flow = pool_flow()
    asyncio.run(gate.requestheaders(flow))
    asyncio.run(claudeflare.request(flow))
    assert flow.response.status_code == 500 and "internal error in request" in caplog.text


def test_ipv4_mapped_peers_are_judged_by_their_ipv4_address(addon):
    gate, _ = addon  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
    served, stranger = pool_flow(peer="::ffff:127.0.0.1"), pool_flow(peer="::ffff:192.0.2.10")
    for flow in (served, stranger):
        asyncio.run(gate.requestheaders(flow))
    assert served.response is None and stranger.response.status_code == 403


def test_options_are_parsed_into_their_groups(addon):
    _, claudeflare = addon
    with taddons.context(claudeflare) as tctx:
        tctx.configure(
            claudeflare,
            claudeflare_retry_attempts=4,
            claudeflare_retry_delay_ms=250,
            claudeflare_retry_backoff="1.5",
            claudeflare_upstream="https://api.example.test",
        )
        assert (
            claudeflare.router.retry.attempts,
            claudeflare.router.retry.delay,
            claudeflare.router.retry.backoff,
        ) == (4, 0.25, 1.5)
        assert claudeflare.upstream.url == "https://api.example.test:443"
        assert tctx.options._options["claudeflare_strategy"].choices == STRATEGIES
