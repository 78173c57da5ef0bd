"""The credential reaches the upstream's bytes only: mitmproxy's own serialisation of a request head,
HTTP/1 and HTTP/2 upstreams, HTTP/1 and HTTP/2 clients, run on a request the addon concealed, then
the same through real proxies."""

import json
import socket
import ssl

import h2.connection
import h2.events
import pytest
from mitmproxy import http, io
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import RequestHeaders, _http1, _http2, _http3
from mitmproxy.test import taddons, tflow

from claudeflare import wire

from harness import Mitmdump, add_account, key_for

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
    sent = [
        c.data
        for c in _http1.Http1Client(context).send(RequestHeaders(1, request, False))
        if isinstance(c, commands.SendData)
    ]
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


def saved_flows(path) -> list[http.HTTPFlow]:
    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


def h2_post(port: int, path: str, body: dict) -> tuple[int, bytes]:
    """One request as an HTTP/2 client over TLS that offers only h2 (httpx offers http/1.1 first,
    which mitmproxy, honouring the client's order, picks)."""
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE  # the proxy's certificate, from this test's CA
    tls.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, tls.wrap_socket(raw) as sock:
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        data = json.dumps(body).encode()
        conn.send_headers(
            1,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", f"127.0.0.1:{port}"),
                (":path", path),
                ("content-type", "application/json"),
                ("content-length", str(len(data))),
                ("anthropic-version", "2023-06-01"),
            ],
        )
        conn.send_data(1, data, end_stream=True)
        status, reply = None, b""
        while True:
            sock.sendall(conn.data_to_send())
            chunk = sock.recv(65536)
            assert chunk, "the proxy closed the connection"
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    reply += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, reply


def test_an_http2_client_through_http1_and_http2_upstreams(fake, home, start_proxy, tmp_path):
    """End to end: the upstream gets the key, over HTTP/1 (straight to the fake) and over HTTP/2 (a
    plain mitmdump relay in front of it, which speaks HTTP/2 over TLS); the flow shows a placeholder."""
    key = key_for("h2")
    fake.add_api_key(key, account="h2")
    add_account(home, "h2", "api-key", 1, api_key=key)
    confdir = f"confdir={tmp_path / 'mitmproxy'}"  # this test's own CA, for the TLS it speaks
    relay = Mitmdump(
        "--mode",
        f"reverse:{fake.url}",
        "--set",
        confdir,
        "-w",
        str(tmp_path / "relay.mitm"),
        log=tmp_path / "relay.log",
        addon=False,
    ).start()
    body = {"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "h2"}]}
    try:
        for n, upstream in enumerate([fake.url, f"https://127.0.0.1:{relay.port}"]):
            saved = tmp_path / f"proxy-{n}.mitm"
            # lazy: with no upstream connection yet, the client's TLS may choose h2 whatever the upstream speaks
            proxy = start_proxy(
                home,
                "--mode",
                f"reverse:{upstream}",
                "--set",
                "ssl_insecure=true",
                "--set",
                confdir,
                "--set",
                "connection_strategy=lazy",
                "-w",
                str(saved),
            )
            status, reply = h2_post(proxy.port, "/v1/messages", body)
            assert status == 200, reply
            proxy.stop()
            [flow] = saved_flows(saved)
            assert flow.request.http_version == "HTTP/2.0" and flow.request.headers["x-api-key"] == "[claudeflare: h2]"
            assert key.encode() not in saved.read_bytes()
    finally:
        relay.stop()
    [relayed] = saved_flows(tmp_path / "relay.mitm")  # the second proxy's upstream: what went on the wire
    assert relayed.request.http_version == "HTTP/2.0" and relayed.request.headers["x-api-key"] == key
