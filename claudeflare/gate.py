"""The ClientGate addon: who may use the proxy, and for what — decided for every flow before anything
is relayed (in the manner of mitmproxy's proxyauth).

The pool is an API proxy, not a general forward proxy. A flow belongs to the pool when it arrives in
reverse mode, goes to the configured upstream (absolute-form, CONNECT, or inside such a tunnel), or
is addressed to this proxy itself (its target resolves to one of our own addresses and ports, in any
spelling). Pool flows need a client key once keys exist, else a loopback client. Everything else is
refused unless `claudeflare_relay` is on and the client is on loopback — and even then a flow is
never relayed to this proxy itself. Refusals write no flow-log row, and are logged as a summary.
"""

import asyncio
import logging
import socket
import time
from collections import Counter

from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import ReverseMode
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from .flows import FlowStates, error_response, is_loopback, parse_ip, presented_key, take_presented_key

logger = logging.getLogger(__name__)

SUMMARY_SECONDS = 10.0  # refusals are logged as one line of counts per this many seconds
LOOKUP_SECONDS = 5.0  # a name that takes longer to resolve is taken as not ours

# Why a flow is refused, as the summary line counts it.
NOT_LOOPBACK = "client beyond loopback without client keys"
BAD_KEY = "missing or invalid client key"
NO_RELAY = "not a request for the pool"
SELF = "relay to the proxy itself"

# What the client is told (status, Anthropic error type, message).
REFUSALS = {
    NOT_LOOPBACK: (
        403,
        "permission_error",
        "Claudeflare accepts clients beyond loopback only with a client key: run "
        "`claudeflare client-key create NAME` and send the key as x-api-key.",
    ),
    BAD_KEY: (
        401,
        "authentication_error",
        "Claudeflare: invalid client key. Use a key from `claudeflare client-key create NAME`.",
    ),
    NO_RELAY: (
        403,
        "permission_error",
        "Claudeflare serves only the Anthropic API: send requests to the proxy itself "
        "(ANTHROPIC_BASE_URL) or to its upstream. It relays to other hosts only for loopback clients, with claudeflare_relay on.",
    ),
    SELF: (403, "permission_error", "Claudeflare does not relay requests to itself."),
}


def refusal(reason: str) -> http.Response:
    return error_response(*REFUSALS[reason])


def is_local_address(text: str) -> bool:
    """Whether a connection to this IP address stays on this machine: loopback, unspecified (which
    connects to the local host) or one of its interfaces' addresses (which a socket can bind)."""
    ip = parse_ip(text)
    if ip is None:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    try:
        with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))  # a system call, not I/O: fine on the event loop
    except OSError:
        return False
    return True


async def resolves_to_local(host: str) -> bool:
    """Whether `host` (any spelling: `LOCALHOST`, `127.1`, `0x7f000001`, a name) resolves to an
    address of this machine. Name lookups run off the event loop; an IP address needs none."""
    if parse_ip(host):
        return is_local_address(host)
    try:
        lookup = asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        found = await asyncio.wait_for(lookup, LOOKUP_SECONDS)
    except (OSError, UnicodeError, ValueError):  # TimeoutError is an OSError
        return False  # unresolvable, or too slow to wait for: not ours
    return any(is_local_address(info[4][0]) for info in found)


class RefusalLog:
    """Counts refusals and logs one summary line per SUMMARY_SECONDS: a stranger sending at line
    rate fills neither the log nor the flow log, and none of the client's bytes are ever logged."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def note(self, reason: str) -> None:
        if not self.counts:
            asyncio.get_running_loop().call_later(SUMMARY_SECONDS, self.flush)
        self.counts[reason] += 1

    def flush(self) -> None:
        counts, self.counts = self.counts, Counter()
        if counts:
            detail = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
            logger.warning(
                "claudeflare: refused %d request(s) in the last %gs (%s)", counts.total(), SUMMARY_SECONDS, detail
            )


class ClientGate:
    def __init__(self, claudeflare, states: FlowStates) -> None:
        self.claudeflare = claudeflare  # its pool (client keys) and upstream
        self.states = states
        self.relay = False
        self.ports: set[int] = set()
        self.ports_read_at = -1.0
        self.refused = RefusalLog()

    def load(self, loader) -> None:
        loader.add_option(
            "claudeflare_relay",
            bool,
            False,
            "Relay flows that are not for the pool (other hosts) for loopback clients, as a plain forward proxy.",
        )

    def configure(self, updated: set[str]) -> None:
        if "claudeflare_relay" in updated:
            self.relay = ctx.options.claudeflare_relay

    def done(self) -> None:
        self.refused.flush()

    # --- hooks -----------------------------------------------------------------------------------

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        """A tunnel is decided before mitmproxy opens it: to the upstream (whose requests are each
        checked inside), or a relay."""
        await self.guard(flow, self.check_connect)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        await self.guard(flow, self.check_request)

    async def server_connect(self, data: ServerConnectionHookData) -> None:
        """The last word on every connection mitmproxy makes, whatever mode or layer asked for it."""
        address = data.server.address
        if address is None or isinstance(data.client.proxy_mode, ReverseMode) or self.is_upstream(*address[:2]):
            return
        if tuple(address[:2]) in self.claudeflare.pool_servers:
            return  # where the Claudeflare addon sent a pool flow: another provider's endpoint (providers.adapt)
        try:
            reason = await self.relay_refusal(
                data.client.peername[0], *address[:2], self.our_ports(data.client.sockname)
            )
        except Exception:
            logger.exception("claudeflare: internal error in the gate; the connection was refused")
            reason = "internal error"
        if reason:
            data.server.error = f"Claudeflare refused the connection: {reason}"

    # --- decisions -------------------------------------------------------------------------------

    async def guard(self, flow: http.HTTPFlow, check) -> None:
        try:
            reason = await check(flow)
        except Exception:
            logger.exception("claudeflare: internal error in the gate; the request was refused")
            flow.response = error_response(500, "api_error", "Claudeflare: internal error; the proxy's log says more.")
        else:
            if reason:
                self.refused.note(reason)
                flow.response = refusal(reason)
        if flow.response:
            take_presented_key(flow.request)  # answered here: keep the client's key out of flow dumps

    async def check_connect(self, flow: http.HTTPFlow) -> str | None:
        peer, request = flow.client_conn.peername[0], flow.request
        if not is_loopback(peer) and not self.claudeflare.pool.client_keys:
            return NOT_LOOPBACK
        if self.is_upstream(request.host, request.port):
            return None
        return await self.relay_refusal(peer, request.host, request.port, self.our_ports(flow.client_conn.sockname))

    async def check_request(self, flow: http.HTTPFlow) -> str | None:
        peer, request = flow.client_conn.peername[0], flow.request
        keys = self.claudeflare.pool.client_keys
        local = is_loopback(peer)
        client = self.claudeflare.pool.client_for(presented_key(request)) if keys else None
        # Claude Code's credential-less connection warm-up: answered here, and not a request to log.
        warm_up = request.method == "HEAD" and request.path == "/"
        if not local and client is None:
            # Strangers get no further than this: no name lookups, no rows.
            if not keys:
                return NOT_LOOPBACK
            if not warm_up:
                return BAD_KEY
        elif not await self.is_pool_flow(flow, ports := self.our_ports(flow.client_conn.sockname)):
            return await self.relay_refusal(peer, request.host, request.port, ports)
        if warm_up:
            flow.response = http.Response.make(200)
            return None
        if keys and client is None:
            return BAD_KEY
        take_presented_key(request)  # the client's key stays out of the flow, and off to the upstream
        self.states.start(flow).client = client
        return None

    async def is_pool_flow(self, flow: http.HTTPFlow, ports: set[int]) -> bool:
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return True
        request = flow.request
        if self.is_upstream(request.host, request.port):
            return True  # to Anthropic through us as an HTTP(S) proxy
        # Addressed to us (ANTHROPIC_BASE_URL=http://127.0.0.1:8080), in whatever spelling: such a
        # request is served here, never relayed back to ourselves.
        return request.port in ports and await resolves_to_local(request.host)

    async def relay_refusal(self, peer: str, host: str, port: int, ports: set[int]) -> str | None:
        if not (self.relay and is_loopback(peer)):
            return NO_RELAY
        if port in ports and await resolves_to_local(host):
            return SELF
        return None

    def is_upstream(self, host: str, port: int) -> bool:
        upstream = self.claudeflare.upstream
        return (host.lower(), port) == (upstream.host, upstream.port)

    def our_ports(self, sockname) -> set[int]:
        """Every port this proxy listens on (a loop may go through another of its listeners); read
        at most once a second, not on every request."""
        now = time.monotonic()
        if now >= self.ports_read_at + 1.0:
            server = ctx.master.addons.get("proxyserver")
            self.ports = {addr[1] for addr in server.listen_addrs()} if server else set()
            self.ports_read_at = now
        return self.ports | {sockname[1]}
