"""Patches to mitmproxy's HTTP/1 server and proxy server so that nothing a client sends is kept or
logged unbounded before the client is known. Written against mitmproxy 12.3 (`proxy/layers/http`,
`proxy/server.py`); each patch says what it changes and why. `install` applies them once, from
`ConnectionLimits.load` (claudeflare/limits.py).

HTTP/2 needs no patch: h2 4.x (which mitmproxy 12.3 uses with its defaults) advertises and enforces
SETTINGS_MAX_HEADER_LIST_SIZE of 64 KiB (decoded), refuses more than 64 CONTINUATION frames, and
allows 100 concurrent streams (tests/test_limits.py checks these stay so).
"""

import asyncio
import contextlib
import functools
import logging
import re
import time

from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, events, layer, mode_servers, server
from mitmproxy.proxy.layers.http import HttpStream, _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import ErrorCode, RequestProtocolError, ResponseProtocolError
from mitmproxy.proxy.layers.http._hooks import HttpRequestHook, HttpResponseHeadersHook

logger = logging.getLogger(__name__)

DEFAULT_HEAD_KB = 64
LOG_LINE_LIMIT = 500  # characters of one mitmproxy proxy-server log line
_HEAD_END = re.compile(rb"\n\r?\n")  # h11's own test for the end of a head (ReceiveBuffer)


def head_limit(context) -> int:
    return getattr(context.options, "claudeflare_max_head_kb", DEFAULT_HEAD_KB) * 1024


def head_too_large(self: _http1.Http1Server) -> bool:
    """More buffered than a request head may be, and no complete head within the limit."""
    limit = head_limit(self.context)
    return len(self.buf) > limit and not _HEAD_END.search(bytes(self.buf), 0, limit + 2)


def refuse(self: _http1.Http1Server, status: int | None, why: str) -> layer.CommandGenerator[None]:
    """Log one bounded line, reply `status` and stop reading into the buffer. None: a reply is
    still to come from the upstream, which a half-closed connection could not take: close it."""
    yield commands.Log(f"{self.conn.peername[0]}: {why}; connection closed", logging.INFO)
    if status is None:
        yield commands.CloseConnection(self.conn)
        self.state = self.done
        return
    if self.conn.state & ConnectionState.CAN_WRITE:
        yield commands.SendData(self.conn, _http1.make_error_response(status, why))  # flows.anthropic_error_page
    # Half-close, then drop what still arrives: closing a socket with unread data resets the
    # connection, which may destroy the reply before the client reads it. The client closes on
    # reading the reply; one that keeps sending is closed at its head deadline (limits.py).
    yield commands.CloseTcpConnection(self.conn, half_close=True)
    self.buf = type(self.buf)()
    self.state = functools.partial(discard, self)


def discard(self: _http1.Http1Server, event: events.Event) -> layer.CommandGenerator[None]:
    if isinstance(event, events.ConnectionClosed):
        yield commands.CloseConnection(self.conn)
    self.buf = type(self.buf)()  # `_handle_event` appended the data already


# Patch 1 — Http1Server.read_headers buffers a head without limit ("FIXME: protect against header
# size DoS" in 12.3): a 200 MB header took the proxy to 1 GB. Refuse a head over the limit with a
# 431 in Anthropic's shape as soon as that much has arrived.
_read_headers = _http1.Http1Server.read_headers


def read_headers(self, event):
    if isinstance(event, events.DataReceived) and head_too_large(self):
        yield from refuse(
            self, 431, f"request head over {head_limit(self.context) // 1024} KiB (claudeflare_max_head_kb)"
        )
        return
    yield from _read_headers(self, event)


# Patch 2 — while a reply is pending, Http1Server.wait appends whatever the client sends to its
# buffer and ignores it (no pipelining): the same unbounded buffer. Hold at most one head's worth;
# beyond it, close without a reply, which could otherwise land inside the pending one.
_wait = _http1.Http1Server.wait


def wait(self, event):
    if isinstance(event, events.DataReceived) and len(self.buf) > head_limit(self.context):
        yield from refuse(self, None, "data sent ahead of the reply over the head limit")
        return
    yield from _wait(self, event)


# Patch 2b — the chunked body reader (h11's ChunkedReader, driven by Http1Connection.read_body)
# waits for a whole chunk-size or trailer line, buffering without limit: a chunk-size line that
# never ends is the header attack again. What it leaves unread is one such line; cap it too.
_read_body = _http1.Http1Server.read_body


def read_body(self, event):
    yield from _read_body(self, event)
    stuck = self.state == self.read_body and self.conn.state & ConnectionState.CAN_READ
    if stuck and len(self.buf) > head_limit(self.context):
        why = f"chunk-size or trailer line over {head_limit(self.context) // 1024} KiB (claudeflare_max_head_kb)"
        yield from refuse(self, 400, why)
        yield ReceiveHttp(RequestProtocolError(self.stream_id, why, ErrorCode.GENERIC_CLIENT_ERROR))


# Patch 2c — mitmproxy answers a request it refuses while reading its body (over body_size_limit,
# a broken chunk) with its error page and a close: with the rest of the body unread, the close
# resets the connection, and a client still sending (as SDKs do) sees "connection reset" instead of
# the 413. Half-close after the page and drop the rest of the body instead.
_send = _http1.Http1Server.send


def send(self, event):
    status = event.code.http_status_code() if isinstance(event, ResponseProtocolError) else None
    if status and not self.response and self.state == self.read_body and self.conn.state & ConnectionState.CAN_WRITE:
        yield from refuse(self, status, event.message)
        return
    yield from _send(self, event)


# Patch 3 — a reply set in `requestheaders` (a refusal) is sent by 12.3 only after the whole body
# has been read and buffered (up to body_size_limit: 20 refused 30 MiB bodies were +580 MB). Send it
# at once instead; what arrives of the body is dropped unbuffered, and an HTTP/1 connection is
# half-closed after the reply (`connection: close`), so the client stops sending.
_wait_for_request_headers = HttpStream.state_wait_for_request_headers


def state_wait_for_request_headers(self, event):
    yield from _wait_for_request_headers(self, event)
    if self.flow.response and not event.end_stream and self.client_state == self.state_consume_request_body:
        yield from answer_before_body(self)


def answer_before_body(self: HttpStream) -> layer.CommandGenerator[None]:
    http1 = not (self.flow.request.is_http2 or self.flow.request.is_http3)
    self.client_state = self.state_done  # later body events are ignored, not buffered
    self.flow.request.timestamp_end = time.time()
    if http1:
        self.flow.response.headers["connection"] = "close"
    yield HttpRequestHook(self.flow)  # as mitmproxy's own path does after a requestheaders reply
    if (yield from self.check_killed(True)) or not self.flow.response:
        return
    self.flow.response.timestamp_start = time.time()
    yield HttpResponseHeadersHook(self.flow)
    if (yield from self.check_killed(True)):
        return
    yield from self.send_response()
    if http1:
        # A half-close, not a close: closing a socket with unread data resets the connection,
        # which may destroy the reply before the client reads it.
        yield commands.CloseTcpConnection(self.context.client, half_close=True)


class BoundedLines(logging.Filter):
    """Patch 4 — the proxy server logs client bytes verbatim: an unfinished head (`{buf!r}` when a
    client closes mid-head), or a bad request line. Cut any such line to LOG_LINE_LIMIT characters."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > LOG_LINE_LIMIT:
            record.msg, record.args = f"{message[:LOG_LINE_LIMIT]}… ({len(message)} characters)", ()
        return True


# Patch 5 — ConnectionHandler.handle_connection closes its socket only on the paths it expects: a
# connection cancelled (closed by a refusal above, a deadline in limits.py) while its read loop waits
# for the server-event lock — held while a hook awaits — leaves with the CancelledError and never
# closes the socket, which then lingers, unread, until the process ends: one descriptor a refusal.
_handle_connection = server.ConnectionHandler.handle_connection


async def handle_connection(self, connection) -> None:
    try:
        await _handle_connection(self, connection)
    finally:
        io = self.transports.pop(connection, None)  # still there only when mitmproxy skipped its close
        if io is not None and io.writer is not None:
            with contextlib.suppress(OSError):
                io.writer.close()


# Patch 6 — `claudeflare serve --workers N` (supervisor.py) runs N mitmdumps on one port, which
# the kernel spreads connections over (SO_REUSEPORT). AsyncioServerInstance.listen (12.3) calls
# `asyncio.start_server(handler, host, port)` with no way to pass `reuse_port`, mitmproxy cannot
# inherit a listening socket, and an addon loads only after the servers listen. So the worker's
# entry point (worker.py) applies this before mitmdump starts: a TCP-only mode (regular, reverse,
# upstream) on a fixed port listens the same way with `reuse_port=True`; anything else is
# mitmproxy's own code. Plain `mitmdump -s addon/claudeflare.py` never applies it.
_listen = mode_servers.AsyncioServerInstance.listen


async def listen_sharing_port(self, host: str, port: int):
    if port == 0 or self.mode.transport_protocol != "tcp":
        return await _listen(self, host, port)
    return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]


def share_listening_port() -> None:
    mode_servers.AsyncioServerInstance.listen = listen_sharing_port


def install() -> None:
    """Apply the patches (idempotent: the addon script may be reloaded)."""
    server.ConnectionHandler.handle_connection = handle_connection
    _http1.Http1Server.read_headers = read_headers
    _http1.Http1Server.wait = wait
    _http1.Http1Server.read_body = read_body
    _http1.Http1Server.send = send
    HttpStream.state_wait_for_request_headers = state_wait_for_request_headers
    server_log = logging.getLogger("mitmproxy.proxy.server")
    if not any(isinstance(f, BoundedLines) for f in server_log.filters):
        server_log.addFilter(BoundedLines())


def close_client(proxyserver, client, why: str) -> bool:
    """Close a client connection the way mitmproxy's own inactivity timeout does
    (`ConnectionHandler.on_timeout`, 12.3). False while a reply is still being written to it."""
    handler = proxyserver.connections.get(client.id)
    io = handler.transports.get(client) if handler else None
    if io is None or io.handler is None:
        return True  # gone already
    if io.writer is not None and io.writer.transport.get_write_buffer_size():
        return False
    logger.debug("claudeflare: %s: %s; connection closed", client.peername[0], why)
    io.handler.cancel(why)
    return True
