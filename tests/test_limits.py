"""Unit tests of the limits: yielding parses give the same results, options are checked, repeated
warnings are throttled, and HTTP/2 header lists are bounded by the h2 that mitmproxy uses."""

import asyncio
import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy.proxy.layers.http._http2 import Http2Server
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection
from mitmproxy.test import taddons, tflow

from claudeflare.conversation import conversation_key
from claudeflare.flows import request_summary
from claudeflare.limits import GRACE, TOO_MANY, ConnectionLimits, Throttled

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    system=json_values,
    first=json_values,
    extra=st.dictionaries(st.sampled_from(["model", "stream", "metadata"]), json_values),
)
def test_a_yielding_parse_gives_the_same_key_and_summary(system, first, extra):
    body = json.dumps({"system": system, "messages": [{"role": "user", "content": first}], **extra}).encode()
    assert conversation_key({}, body, yielding=True) == conversation_key({}, body)
    assert request_summary(body, yielding=True) == request_summary(body)


def test_same_key_for_a_claude_code_metadata_session_and_odd_bodies():
    user_id = json.dumps({"device_id": "ab" * 32, "session_id": "3f2a9c1e-7b4d-4e8a-9c2b-1d5e6f7a8b9c"})
    for body in (json.dumps({"metadata": {"user_id": user_id}}).encode(), b"[1]", b"{", b"\xff", b'{"a":' * 100_000):
        assert conversation_key({}, body, yielding=True) == conversation_key({}, body)


@pytest.mark.parametrize(
    "option, value",
    [
        ("claudeflare_max_head_kb", 0),
        ("claudeflare_max_head_kb", 4096),
        ("claudeflare_head_timeout", 0),
        ("claudeflare_max_idle_conns", 0),
        ("claudeflare_max_idle_conns_per_peer", -1),
    ],
)
def test_bad_limits_are_refused(option, value):
    limits = ConnectionLimits()
    with taddons.context(limits) as tctx:
        with pytest.raises(Exception, match=option):
            tctx.configure(limits, **{option: value})


def test_a_recurring_warning_is_logged_once_per_period(caplog):
    warn = Throttled("out of something", every=60)
    with caplog.at_level(logging.WARNING):
        for _ in range(1000):
            warn("detail")
    assert len(caplog.records) == 1 and "1 time(s)" in caplog.text
    warn.next_at = 0  # the period is over: the next one reports what it held back
    warn("detail")
    assert len(caplog.records) == 2 and "1000 time(s)" in caplog.records[1].getMessage()


def test_http2_header_lists_are_bounded():
    conn = BufferedH2Connection(Http2Server.h2_conf)
    assert conn.local_settings.max_header_list_size == 64 * 1024
    assert conn.decoder.max_header_list_size == 64 * 1024
    assert conn.local_settings.max_concurrent_streams == 100


def test_connections_past_the_caps_get_a_short_deadline_and_past_the_ceiling_none():
    async def scenario():
        limits = ConnectionLimits()
        with taddons.context(limits) as tctx:
            tctx.configure(limits, claudeflare_max_idle_conns=5, claudeflare_max_idle_conns_per_peer=3)
            limits.ceiling = 7  # as if a quarter of the descriptors were 7
            loop = asyncio.get_running_loop()

            def arrive(peer: str):
                client = tflow.tclient_conn()
                client.peername, client.timestamp_end = (peer, 40000), None  # connected, not ended
                limits.client_connected(client)
                return client

            def deadline(client) -> float | None:
                timer = limits.timers.get(client.id)
                return round(timer.when() - loop.time()) if timer else None

            same = [arrive("192.0.2.1") for _ in range(4)]
            assert [deadline(c) for c in same] == [30, 30, 30, GRACE]  # past the per-peer cap: a second
            others = [arrive(f"192.0.2.{n}") for n in (2, 3, 4, 5)]
            assert [deadline(c) for c in others] == [30, GRACE, GRACE, None]  # past the total; then the ceiling
            assert others[-1].error == TOO_MANY and all(c.error is None for c in [*same, *others[:-1]])
            flow = tflow.tflow()
            flow.client_conn = same[3]
            limits.requestheaders(flow)  # its head arrived in time: it no longer counts
            assert deadline(same[3]) is None
            limits.response(flow)  # kept alive: waiting again, with the full head timeout
            assert deadline(same[3]) == 30
            for client in [*same, *others]:
                limits.client_disconnected(client)
            assert not limits.timers and not limits.per_peer

    asyncio.run(scenario())
