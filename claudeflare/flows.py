"""Per-flow state and the small operations on mitmproxy requests and responses the addons share."""

import functools
import ipaddress
import json
import secrets
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy.commands import SendData
from mitmproxy.proxy.layers.http import ResponseProtocolError, _http1, _http2

from .accounts import Account
from .balancer import Lease
from .clock import utc_now
from .credentials import Credential
from .offloop import loads
from .ratelimit import Signals

if TYPE_CHECKING:  # annotations only: both import this module
    from . import providers
    from .recorder import SideParser

METADATA = "claudeflare"  # flow.metadata key: plain values for mitmweb and `-w` files, never a secret
OAUTH_BETA = "oauth-2025-04-20"
CREDENTIAL_HEADERS = ("authorization", "x-api-key")


@dataclass
class FlowState:
    """What Claudeflare knows about one client request, live: kept in `FlowStates`, not in
    `flow.metadata`, which `-w` and mitmweb serialize (this holds parsers and an access token)."""

    id: str
    started_at: str
    client: str | None = None
    session: str | None = None
    strategy: str | None = None
    account: str | None = None  # the account of the current attempt
    owner: str | None = None  # the account holding a file or batch the request names: no other may serve it
    attempts: int = 0
    failovers: list[dict] = field(default_factory=list)  # {"account", "status", "reason"} per failed attempt
    client_beta: str | None = None  # the client's own anthropic-beta, for a retry on another kind of account
    sent_token: str | None = None  # OAuth access token of the current attempt (to refresh after a 401)
    signals: Signals | None = None
    parser: "SideParser | None" = None  # recorder.SideParser, reading usage beside a stream
    first_byte_at: float | None = None
    settled: bool = False  # the reply was fetched by our own client: no further failover in `response`
    claude_code: bool = False  # its system prompt is Claude Code's (policy.is_claude_code)
    keys_only: bool = False  # subscriptions may not serve it (not Claude Code, or one refused it)
    family: str | None = None  # model family asked for (policy.model_family)
    model: str | None = None  # the model asked for (policy.model_name): providers map or refuse it
    endpoint: str | None = None  # the path asked for, without its query: providers serve some only
    provider: str | None = None  # of the current attempt's account (claudeflare/providers)
    origin: "providers.Origin | None" = None  # the request as routed, before any provider adapted it
    account_kind: str | None = None  # subscription | api-key, of the current attempt
    request_summary: tuple[str | None, bool] | None = None  # of a big body, read off the loop (Recorder)
    lease: "Lease | None" = None  # the current attempt's place in its account's in-flight count
    logged: bool = False


class FlowStates:
    """The live `FlowState` of each pool flow, owned by the addons (as proxyauth keeps per-connection
    state): weakly keyed, so a finished flow takes its state with it."""

    def __init__(self) -> None:
        self._states: weakref.WeakKeyDictionary[http.HTTPFlow, FlowState] = weakref.WeakKeyDictionary()

    def start(self, flow: http.HTTPFlow) -> FlowState:
        state = self._states[flow] = FlowState(id=secrets.token_hex(12), started_at=utc_now())
        flow.metadata[METADATA] = {"id": state.id}
        return state

    def get(self, flow: http.HTTPFlow) -> FlowState | None:
        return self._states.get(flow)

    def discard(self, flow: http.HTTPFlow) -> None:
        """Forget a flow the proxy answers itself: without a state it is neither routed nor logged."""
        self._states.pop(flow, None)
        flow.metadata.pop(METADATA, None)

    def show(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """Copy what a person inspecting the flow may see (no secrets) into `flow.metadata`."""
        flow.metadata[METADATA] = {
            "id": state.id,
            "account": state.account,
            "client": state.client,
            "attempts": state.attempts,
        }


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> http.Response:
    """A reply in Anthropic's error shape, so SDKs and Claude Code show the message as is."""
    body = {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": f"req_claudeflare_{secrets.token_hex(8)}",
    }
    return http.Response.make(status, json.dumps(body), {"content-type": "application/json", **(headers or {})})


# Anthropic's error types by status, for replies mitmproxy makes itself (contract: error shapes).
ERROR_TYPES = {400: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}


def anthropic_error(status_code: int, message: str = "") -> http.Response:
    """mitmproxy's own reply to a failure it handles itself (upstream refused or reset before the
    reply began, unreadable request), which it sends after the error hook, so no addon can replace
    the flow's response. Its HTML page would reach SDKs that expect Anthropic's JSON error shape."""
    kind = ERROR_TYPES.get(status_code, "api_error" if status_code >= 500 else "invalid_request_error")
    if status_code == 413:
        message = "request body over the proxy's limit (claudeflare_max_body_mb)"
    return error_response(status_code, kind, f"Claudeflare: {message}")


def anthropic_error_page(status_code: int, message: str = "") -> bytes:
    response = anthropic_error(status_code, message)
    response.headers["connection"] = "close"
    return http1.assemble_response(response)


def h2_anthropic_errors(handle_event):
    """Wraps `Http2Server._handle_event`, which writes the HTML page into the stream itself."""

    def handle(self, event):
        if (
            isinstance(event, ResponseProtocolError)
            and self.is_open_for_us(event.stream_id)
            and not self.h2_conn.streams[event.stream_id].state_machine.headers_sent
            and (status := event.code.http_status_code()) is not None
        ):
            response = anthropic_error(status, event.message)
            self.h2_conn.send_headers(event.stream_id, [(b":status", b"%d" % status), *response.headers.fields])
            self.h2_conn.send_data(event.stream_id, response.content, end_stream=True)
            yield SendData(self.conn, self.h2_conn.data_to_send())
        else:
            yield from handle_event(self, event)

    handle.claudeflare = True
    return handle


def install_anthropic_error_pages() -> None:
    """Plain-HTTP clients (ANTHROPIC_BASE_URL=http://…) speak HTTP/1 to the proxy, TLS clients
    often HTTP/2: both get Anthropic's shape."""
    _http1.make_error_response = anthropic_error_page
    if not getattr(_http2.Http2Server._handle_event, "claudeflare", False):  # once, however often loaded
        _http2.Http2Server._handle_event = h2_anthropic_errors(_http2.Http2Server._handle_event)


@functools.lru_cache(maxsize=4096)  # peers and hosts repeat: parsing one costs more than the gate's other checks
def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, IPv4-mapped ones as IPv4 (a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d)."""
    try:
        ip = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def is_loopback(host: str) -> bool:
    ip = parse_ip(host)
    return ip.is_loopback if ip else host == "localhost"


def presented_key(request: http.Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() != "bearer ":
        return None
    return auth[7:].strip() or None


def take_presented_key(request: http.Request) -> str | None:
    """The key the client presented, taken out of the flow, which mitmweb, `-w` and `flow_detail`
    show: a client key is a secret too, and no credential of the client's goes upstream."""
    key = presented_key(request)
    for name in CREDENTIAL_HEADERS:
        request.headers.pop(name, None)
    return key


def request_summary(body: bytes, yielding: bool = False) -> tuple[str | None, bool]:
    """(model, stream) from a /v1/messages body; the body itself is forwarded untouched."""
    try:
        data = loads(body, yielding)
    except (ValueError, RecursionError):
        return None, False
    if not isinstance(data, dict):
        return None, False
    model = data.get("model")
    return (model if isinstance(model, str) else None), data.get("stream") is True


def merge_beta(existing: str | None, beta: str) -> str:
    flags = [f.strip() for f in (existing or "").split(",") if f.strip()]
    return ",".join(flags if beta in flags else [*flags, beta])


def inject_credential(headers: http.Headers, account: Account, credential: Credential) -> None:
    """Replace the client's credentials with the account's (contract §2): never both kinds."""
    for name in CREDENTIAL_HEADERS:
        headers.pop(name, None)
    if credential.api_key:
        headers["x-api-key"] = credential.api_key
    else:
        headers["authorization"] = f"Bearer {credential.access_token}"
        headers["anthropic-beta"] = merge_beta(headers.get("anthropic-beta"), OAUTH_BETA)


def is_event_stream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")
