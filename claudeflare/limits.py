"""The ConnectionLimits addon: bounds on what a client can hold before it has sent a request head —
the head's size, the time to send it, and how many connections may wait without one.

A connection "waits" from its connect, and again from the end of each reply when it is kept alive,
until its next request head is complete (through a CONNECT tunnel: the first request inside it). It is closed once it has waited `claudeflare_head_timeout`
seconds, however slowly it trickles bytes (slowloris). While `claudeflare_max_idle_conns` wait in
total or `claudeflare_max_idle_conns_per_peer` from its address, a new connection gets GRACE seconds
for its head instead: a burst of real clients (500 Claude Code streams opened at once) sends heads
at once, which only wait to be read, while idle ones over the caps are closed within GRACE. Once
the waiting ones hold a quarter of the file descriptors, one over the caps is refused at once, so
waiting connections can't use up the descriptors the served ones need.
"""

import asyncio
import errno
import logging
import resource
import time
import weakref
from collections import Counter
from dataclasses import dataclass

from mitmproxy import connection, ctx, exceptions, http

from . import hardening

logger = logging.getLogger(__name__)

OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
GRACE = 1.0  # seconds to send a head, for a connection that arrives past the caps
TOO_MANY = "too many connections without a request"


@dataclass(frozen=True)
class Limits:
    head_kb: int = hardening.DEFAULT_HEAD_KB
    head_timeout: float = 30.0
    max_idle: int = 512
    max_idle_per_peer: int = 64


def parse_limits(opts) -> Limits:
    limits = Limits(
        opts.claudeflare_max_head_kb,
        float(opts.claudeflare_head_timeout),
        opts.claudeflare_max_idle_conns,
        opts.claudeflare_max_idle_conns_per_peer,
    )
    if not 1 <= limits.head_kb <= 1024:
        raise ValueError("claudeflare_max_head_kb must be between 1 and 1024")
    if limits.head_timeout <= 0 or limits.max_idle < 1 or limits.max_idle_per_peer < 1:
        raise ValueError(
            "claudeflare_head_timeout, claudeflare_max_idle_conns and claudeflare_max_idle_conns_per_peer must be positive"
        )
    return limits


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one (often 1,024 against 500,000+)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class Throttled:
    """A warning that may recur many times a second: logged at most once per `every` seconds,
    with how often it happened meanwhile."""

    def __init__(self, message: str, every: float = 60.0):
        self.message, self.every = message, every
        self.count, self.next_at = 0, 0.0

    def __call__(self, detail: str) -> None:
        self.count += 1
        now = time.monotonic()
        if now >= self.next_at:
            logger.warning("claudeflare: %s (%s; %d time(s) since the last report)", self.message, detail, self.count)
            self.count, self.next_at = 0, now + self.every


class ResourceExceptionHandler:
    """The event loop's exception handler, for the one error a full descriptor table causes again
    and again: asyncio logs a failed accept() with a traceback each time it retries (every second).
    One throttled line instead; every other error goes to the handler there was before."""

    def __init__(self, fallback):
        self.fallback = fallback
        self.warn = Throttled("out of file descriptors or memory: new connections wait in the listen queue")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES:
            self.warn(exc.strerror or type(exc).__name__)
        elif self.fallback:
            self.fallback(loop, context)
        else:
            loop.default_exception_handler(context)


class ConnectionLimits:
    def __init__(self) -> None:
        self.limits = Limits()
        self.timers: dict[str, asyncio.TimerHandle] = {}  # client id → its head deadline
        self.peers: dict[str, str] = {}  # client id → peer address, of the waiting ones
        self.per_peer: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()  # requests per client connection (HTTP/2 has several)
        self.open_flows: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self.refused = Throttled("connections refused: too many are open without a request")
        self.ceiling = 256  # waiting connections past which one over the caps is refused at once: a quarter of the fds

    def load(self, loader) -> None:
        hardening.install()
        add = loader.add_option
        add(
            "claudeflare_max_head_kb",
            int,
            Limits.head_kb,
            "Largest request head (request line and headers), in KiB; a larger one gets a 431.",
        )
        add(
            "claudeflare_head_timeout",
            int,
            int(Limits.head_timeout),
            "Seconds a connection may take to send a complete request head, from connect or the end of the previous reply.",
        )
        add(
            "claudeflare_max_idle_conns",
            int,
            Limits.max_idle,
            "Most connections open without a request in progress; more are refused.",
        )
        add("claudeflare_max_idle_conns_per_peer", int, Limits.max_idle_per_peer, "The same, per client address.")
        self.ceiling = raise_fd_limit() // 4

    def configure(self, updated: set[str]) -> None:
        try:
            self.limits = parse_limits(ctx.options)
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        existing = loop.get_exception_handler()
        if isinstance(existing, ResourceExceptionHandler):  # the script was reloaded
            existing = existing.fallback
        loop.set_exception_handler(ResourceExceptionHandler(existing))

    # --- waiting connections ---------------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        peer = client.peername[0]
        crowded = len(self.timers) >= self.limits.max_idle or self.per_peer[peer] >= self.limits.max_idle_per_peer
        if crowded and len(self.timers) >= self.ceiling:
            client.error = TOO_MANY  # mitmproxy closes it at once
            self.refused(f"from {peer}")
            return
        self.wait(client, GRACE if crowded else None)

    def client_disconnected(self, client: connection.Client) -> None:
        self.stop_waiting(client)
        self.in_flight.pop(client.id, None)

    # CONNECT is no request of its own: the deadline runs on through the TLS handshake to the first
    # request inside the tunnel, unless the tunnel turns out to be a TCP passthrough.
    def tcp_start(self, flow) -> None:
        self.stop_waiting(flow.client_conn)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn
        self.stop_waiting(client)
        self.open_flows.add(flow)
        self.in_flight[client.id] += 1
        if flow.response:
            # Refused already (see hardening, patch 3): no "100 Continue" asking for the body.
            flow.request.headers.pop("expect", None)

    def response(self, flow: http.HTTPFlow) -> None:
        if not flow.websocket:  # an upgraded connection carries no further request heads
            self.flow_done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.flow_done(flow)

    def flow_done(self, flow: http.HTTPFlow) -> None:
        if flow not in self.open_flows:
            return
        self.open_flows.discard(flow)
        client = flow.client_conn
        if self.in_flight[client.id] > 1:
            self.in_flight[client.id] -= 1
            return
        self.in_flight.pop(client.id, None)
        if client.timestamp_end is None:
            self.wait(client)  # kept alive: the next head has its deadline too

    def wait(self, client: connection.Client, grace: float | None = None) -> None:
        """Until its head is complete; `grace`: a deadline shorter than the head timeout, past the caps."""
        self.stop_waiting(client)
        peer = client.peername[0]
        self.peers[client.id] = peer
        self.per_peer[peer] += 1
        self.timers[client.id] = asyncio.get_running_loop().call_later(
            grace or self.limits.head_timeout, self.expire, client, grace is not None
        )

    def stop_waiting(self, client: connection.Client) -> None:
        timer = self.timers.pop(client.id, None)
        if timer is None:
            return
        timer.cancel()
        peer = self.peers.pop(client.id)
        self.per_peer[peer] -= 1
        if self.per_peer[peer] <= 0:
            del self.per_peer[peer]

    def expire(self, client: connection.Client, crowded: bool = False) -> None:
        self.stop_waiting(client)
        if crowded:
            why = TOO_MANY
            self.refused(f"from {client.peername[0]}")
        else:
            why = f"no complete request head within {self.limits.head_timeout:g}s (claudeflare_head_timeout)"
        if not hardening.close_client(ctx.master.addons.get("proxyserver"), client, why):
            self.wait(client)  # a reply is still being written to it: not idle yet
