"""`resend.Resender` against a tiny raw HTTP upstream on loopback, which records the bytes it got
and answers with bytes given verbatim."""

import asyncio
import gzip
import re

import httpx
import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from claudeflare.resend import ReplyTooLarge, Resender

from harness import free_port

BODY = b'{"model":"claude-sonnet-4-6","stream":true}\xff'  # sent as is, even bytes that are no UTF-8


class Upstream:
    """Answers every connection with `reply` (bytes, or a coroutine function of the writer)."""

    def __init__(self, reply):
        self.reply = reply
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.done = asyncio.Event()

    async def __aenter__(self) -> "Upstream":
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)\r$", head)
            self.heads.append(head)
            self.bodies.append(await reader.readexactly(int(length.group(1)) if length else 0))
            if callable(self.reply):
                await self.reply(writer)
            else:
                writer.write(self.reply)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.done.set()


def request(port: int) -> http.Request:
    return tutils.treq(host="127.0.0.1", port=port, method=b"POST", path=b"/v1/messages?beta=true", content=BODY)


def reply(*headers: str, body: bytes = b"{}", status: str = "200 OK") -> bytes:
    return "\r\n".join([f"HTTP/1.1 {status}", *headers, "", ""]).encode() + body


async def resend(upstream_reply, headers=None, max_body=1 << 20, timeout=10.0, port=None):
    async with Upstream(upstream_reply) as upstream:
        resender = Resender(timeout=timeout)
        try:
            response = await resender.send(request(port or upstream.port), headers or http.Headers(), max_body)
        finally:
            await resender.close()
        return response, upstream


def test_hop_by_hop_headers_are_skipped_and_the_rest_and_the_body_go_as_received():
    headers = http.Headers(
        [
            (b"Host", b"evil.example"),
            (b"Connection", b"x-evil"),
            (b"Keep-Alive", b"timeout=999"),
            (b"TE", b"trailers"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"999"),
            (b"x-api-key", b"sk-ant-api03-resend"),
            (b"anthropic-beta", b"a-1"),
            (b"anthropic-beta", b"b-2"),
            (b"Accept-Encoding", b"gzip"),
        ]
    )
    response, upstream = asyncio.run(resend(reply("content-length: 2"), headers))
    head = upstream.heads[0].decode().lower()
    assert head.startswith("post /v1/messages?beta=true http/1.1\r\n")
    assert f"host: 127.0.0.1:{upstream.port}\r\n" in head and "evil" not in head
    for skipped in ("keep-alive:", "timeout=999", "\nte:", "upgrade", "h2c", "proxy-connection", "transfer-encoding"):
        assert skipped not in head, skipped
    assert f"content-length: {len(BODY)}\r\n" in head and upstream.bodies == [BODY]
    assert "x-api-key: sk-ant-api03-resend\r\n" in head and "accept-encoding: gzip\r\n" in head
    assert "anthropic-beta: a-1\r\n" in head and "anthropic-beta: b-2\r\n" in head
    assert response.status_code == 200 and response.raw_content == b"{}"


def test_the_reply_stays_encoded_as_received_and_gets_its_own_length():
    sse = b"event: message_start\ndata: {}\n\n" * 50
    encoded = gzip.compress(sse)
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(encoded[i : i + 100]), encoded[i : i + 100]) for i in range(0, len(encoded), 100)
    )
    upstream_reply = reply(
        "content-type: text/event-stream",
        "content-encoding: gzip",
        "transfer-encoding: chunked",
        "connection: keep-alive",
        "keep-alive: timeout=5",
        "request-id: req_1",
        "anthropic-ratelimit-unified-status: allowed",
        status="529 Overloaded",
        body=chunked + b"0\r\n\r\n",
    )
    response, _ = asyncio.run(resend(upstream_reply))
    assert response.status_code == 529
    assert response.raw_content == encoded and response.content == sse
    assert response.headers["content-encoding"] == "gzip" and response.headers["content-length"] == str(len(encoded))
    assert (
        response.headers["request-id"] == "req_1"
        and response.headers["anthropic-ratelimit-unified-status"] == "allowed"
    )
    for skipped in ("transfer-encoding", "connection", "keep-alive"):
        assert skipped not in response.headers, skipped


def test_a_reply_at_the_cap_is_kept_and_one_byte_over_it_is_refused():
    upstream_reply = reply("content-length: 1000", body=b"x" * 1000)
    response, _ = asyncio.run(resend(upstream_reply, max_body=1000))
    assert len(response.raw_content) == 1000
    with pytest.raises(ReplyTooLarge, match="reply over 999 bytes"):
        asyncio.run(resend(upstream_reply, max_body=999))


def test_reading_stops_at_the_cap_however_much_the_upstream_would_send():
    sent = []
    chunk = b"y" * 65536

    async def endless(writer):
        writer.write(reply("transfer-encoding: chunked", body=b""))
        for _ in range(1024):  # 64 MiB, unless the proxy hangs up first
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            sent.append(len(chunk))

    async def main():
        async with Upstream(endless) as upstream:
            resender = Resender()
            with pytest.raises(ReplyTooLarge):
                await resender.send(request(upstream.port), http.Headers(), 4 * len(chunk))
            await resender.close()
            await asyncio.wait_for(upstream.done.wait(), 10)  # the upstream sees the hang-up

    asyncio.run(main())
    assert sum(sent) < 32 << 20  # what socket buffers hold at most, not the 64 MiB on offer


@pytest.mark.parametrize(
    "upstream_reply, error",
    [
        (reply("content-length: 100", body=b"short"), httpx.RemoteProtocolError),  # cut off mid-body
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", httpx.RemoteProtocolError),  # no HTTP at all
        (b"", httpx.RemoteProtocolError),  # closed without a word
    ],
)
def test_a_broken_reply_is_a_transport_error(upstream_reply, error):
    with pytest.raises(error) as raised:
        asyncio.run(resend(upstream_reply))
    assert isinstance(raised.value, httpx.TransportError)  # what the proxy's failover catches


def test_an_unreachable_or_silent_upstream_is_a_transport_error():
    with pytest.raises(httpx.ConnectError):
        asyncio.run(resend(b"", port=free_port()))  # nothing listens there

    async def silent(writer):
        await asyncio.sleep(10)

    with pytest.raises(httpx.ReadTimeout):
        asyncio.run(resend(silent, timeout=0.3))
