"""The credential reaches the upstream's bytes only: mitmproxy's own serialisation of a request head,
HTTP/1 and HTTP/2 upstreams, HTTP/1 and HTTP/2 clients, run on a request the addon concealed."""

import pytest
from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import RequestHeaders, _http1, _http2, _http3
from mitmproxy.test import taddons, tflow

from claudeflare import wire

SECRET = "sk-ant-api03-wire-0123456789abcdef"
TOKEN = "sk-ant-oat01-wire-0123456789abcdef"


@pytest.fixture
def context():
    wire.install()
    with taddons.context(Proxyserver()) as tctx:  # its options: normalize_outbound_headers etc.
        ctx = Context(tflow.tclient_conn(), tctx.options)
        ctx.server = tflow.tserver_conn()
        yield ctx


def concealed(http_version: str = "HTTP/1.1", **credentials) -> http.Request:
    request = tflow.treq(http_version=http_version)
    headers = request.headers.copy()
    headers.update(credentials)
    wire.conceal(request, headers, "console")
    return request


def http1_head(context, request: http.Request) -> bytes:
    sent = [c.data for c in _http1.Http1Client(context).send(RequestHeaders(1, request, False)) if isinstance(c, commands.SendData)]
    return b"".join(sent)


def http2_head(context, request: http.Request) -> list[tuple[bytes, bytes]]:
    generator = _http2.format_h2_request_headers(context, RequestHeaders(1, request, False))
    try:
        while True:
            next(generator)
    except StopIteration as done:
        return done.value


def test_the_flow_shows_a_placeholder_and_http1_upstreams_get_the_key(context):
    request = concealed(**{"x-api-key": SECRET})
    assert request.headers["x-api-key"] == "[claudeflare: console]"
    assert SECRET.encode() not in repr(request.get_state()).encode()
    assert b"\r\nx-api-key: " + SECRET.encode() + b"\r\n" in http1_head(context, request)
    assert request.headers["x-api-key"] == "[claudeflare: console]"  # the copy got it, not the flow


def test_http2_clients_to_http1_upstreams_get_the_token(context):
    request = concealed("HTTP/2.0", authorization=f"Bearer {TOKEN}")
    assert request.headers["authorization"] == "Bearer [claudeflare: console]"
    assert b"\r\nauthorization: Bearer " + TOKEN.encode() + b"\r\n" in http1_head(context, request)


@pytest.mark.parametrize("http_version", ["HTTP/1.1", "HTTP/2.0"])
def test_http2_and_http3_upstreams_get_the_key(context, http_version):
    request = concealed(http_version, **{"x-api-key": SECRET})
    assert (b"x-api-key", SECRET.encode()) in http2_head(context, request)
    assert _http3.format_h2_request_headers is _http2.format_h2_request_headers  # HTTP/3 upstreams share it


def test_nothing_else_gets_a_secret(context):
    client_typed = tflow.treq(headers=http.Headers(host="example.com", **{"x-api-key": "[claudeflare: console]"}))
    assert b"[claudeflare: console]" in http1_head(context, client_typed)  # never registered: as it came

    replayed = concealed(**{"x-api-key": SECRET}).copy()  # mitmweb's replay and duplicate copy the flow
    assert SECRET.encode() not in http1_head(context, replayed)

    changed = concealed(**{"x-api-key": SECRET})
    changed.headers["x-api-key"] = "edited"
    changed.headers["x-other"] = "[claudeflare: console]"
    head = http1_head(context, changed)
    assert SECRET.encode() not in head and b"x-api-key: edited" in head
