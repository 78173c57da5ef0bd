"""Per-flow state and the small operations on mitmproxy requests and responses the addons share."""

import ipaddress
import json
import secrets
import weakref
from dataclasses import dataclass, field

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1

from .accounts import Account
from .clock import utc_now
from .credentials import Credential
from .offloop import loads
from .ratelimit import Signals

METADATA = "claudeflare"  # flow.metadata key: plain values for mitmweb and `-w` files, never a secret
OAUTH_BETA = "oauth-2025-04-20"


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
    attempts: int = 0
    failovers: list[dict] = field(default_factory=list)  # {"account", "status", "reason"} per failed attempt
    client_beta: str | None = None  # the client's own anthropic-beta, for a retry on another kind of account
    sent_token: str | None = None  # OAuth access token of the current attempt (to refresh after a 401)
    signals: Signals | None = None
    parser: "SideParser | None" = None  # recorder.SideParser, reading usage beside a stream
    first_byte_at: float | None = None
    settled: bool = False  # the reply was fetched by our own client: no further failover in `response`
    request_summary: tuple[str | None, bool] | None = None  # of a big body, read off the loop (Recorder)
    released: bool = False
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

    def show(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """Copy what a person inspecting the flow may see (no secrets) into `flow.metadata`."""
        flow.metadata[METADATA] = {"id": state.id, "account": state.account, "client": state.client, "attempts": state.attempts}


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


def anthropic_error_page(status_code: int, message: str = "") -> bytes:
    """mitmproxy's own reply to a failure it handles itself (upstream refused or reset before the
    reply began, unreadable request), which it sends after the error hook, so no addon can replace
    the flow's response. Its HTML page would reach SDKs that expect Anthropic's JSON error shape."""
    kind = ERROR_TYPES.get(status_code, "api_error" if status_code >= 500 else "invalid_request_error")
    if status_code == 413:
        message = "request body over the proxy's limit (claudeflare_max_body_mb)"
    response = error_response(status_code, kind, f"Claudeflare: {message}", {"connection": "close"})
    return http1.assemble_response(response)


def install_anthropic_error_pages() -> None:
    """Plain-HTTP clients (ANTHROPIC_BASE_URL=http://…) speak HTTP/1 to the proxy: its error page."""
    _http1.make_error_response = anthropic_error_page


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


def presented_key(request: http.Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() != "bearer ":
        return None
    return auth[7:].strip() or None


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
    headers.pop("authorization", None)
    headers.pop("x-api-key", None)
    if credential.api_key:
        headers["x-api-key"] = credential.api_key
    else:
        headers["authorization"] = f"Bearer {credential.access_token}"
        headers["anthropic-beta"] = merge_beta(headers.get("anthropic-beta"), OAUTH_BETA)


def redact_credential(request: http.Request) -> None:
    for name in ("authorization", "x-api-key"):
        if name in request.headers:
            request.headers[name] = "[redacted by claudeflare]"


def is_event_stream(response: http.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")
