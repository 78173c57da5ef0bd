"""The mitmproxy glue: route pool flows to an account, stream replies, log every request.

`addon/claudeflare.py` loads `addons` from here. The logic lives in the modules these classes call
(accounts, balancer, conversation, usage, pricing, flowlog); the hooks only connect them to flows.
"""

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ReverseMode

from .accounts import Account, Pool, PoolWatcher
from .balancer import Balancer
from .config import (
    DB_FILE,
    check_strategy,
    default_strategy,
    default_upstream,
    ensure_home,
    parse_upstream,
    resolve_home,
)
from .conversation import conversation_key
from .credentials import Credential
from .flowlog import FlowLog
from .oauth import OAuthSettings
from .refresh import TokenRefresher
from .pricing import cost_usd
from .usage import SSEUsageParser, Usage, usage_from_json

logger = logging.getLogger(__name__)

STATE = "claudeflare"  # key of FlowState in flow.metadata
OAUTH_BETA = "oauth-2025-04-20"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class FlowState:
    """What Claudeflare knows about one client request, kept in `flow.metadata`."""

    id: str
    started_at: str
    client: str | None = None
    session: str | None = None
    strategy: str | None = None
    account: str | None = None
    model: str | None = None
    stream: bool = False
    attempts: int = 0
    parser: SSEUsageParser | None = None
    first_byte_at: float | None = None
    released: bool = False
    logged: bool = False


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> http.Response:
    """A reply in Anthropic's error shape, so SDKs and Claude Code show the message as is."""
    body = {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": f"req_claudeflare_{secrets.token_hex(8)}",
    }
    return http.Response.make(status, json.dumps(body), {"content-type": "application/json", **(headers or {})})


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


def request_summary(body: bytes) -> tuple[str | None, bool]:
    """(model, stream) from a /v1/messages body; the body itself is forwarded untouched."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None, False
    if not isinstance(data, dict):
        return None, False
    model = data.get("model")
    return (model if isinstance(model, str) else None), data.get("stream") is True


def merge_beta(existing: str | None, beta: str) -> str:
    flags = [f.strip() for f in (existing or "").split(",") if f.strip()]
    return ",".join(flags if beta in flags else [*flags, beta])


def inject_credential(request: http.Request, account: Account, credential: Credential) -> None:
    """Replace the client's credentials with the account's (contract §2): never both kinds."""
    request.headers.pop("authorization", None)
    request.headers.pop("x-api-key", None)
    if credential.api_key:
        request.headers["x-api-key"] = credential.api_key
    else:
        request.headers["authorization"] = f"Bearer {credential.access_token}"
        request.headers["anthropic-beta"] = merge_beta(request.headers.get("anthropic-beta"), OAUTH_BETA)


def redact_credential(request: http.Request) -> None:
    for name in ("authorization", "x-api-key"):
        if name in request.headers:
            request.headers[name] = "[redacted by claudeflare]"


class Claudeflare:
    """Decides which flows belong to the pool, authenticates clients and routes to an account."""

    def __init__(self) -> None:
        self.home: Path | None = None
        self.watcher: PoolWatcher | None = None
        self.balancer = Balancer()
        self.refresher: TokenRefresher | None = None
        self.upstream = parse_upstream(default_upstream())
        self.strategy_option = default_strategy()
        self.oauth = OAuthSettings.from_env()
        self.refresh_margin = 300.0
        self._background: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "claudeflare_home", str, "", "Folder with accounts.toml, credentials and the flow log (default: $CLAUDEFLARE_HOME or ~/.config/claudeflare)."
        )
        loader.add_option("claudeflare_upstream", str, default_upstream(), "Anthropic API base URL that pool requests go to.")
        loader.add_option(
            "claudeflare_strategy", str, default_strategy(), "Load balancing: session, round-robin, weighted or least-requests."
        )
        loader.add_option("claudeflare_session_hours", float, 5.0, "How long a conversation stays on its account (session strategy).")
        loader.add_option("claudeflare_token_url", str, self.oauth.token_url, "OAuth token endpoint used to refresh tokens.")
        loader.add_option("claudeflare_refresh_margin", int, 300, "Refresh OAuth tokens this many seconds before they expire.")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "claudeflare_upstream" in updated:
            try:
                self.upstream = parse_upstream(opts.claudeflare_upstream)
            except ValueError as e:
                raise exceptions.OptionsError(f"claudeflare_upstream: {e}") from None
        if "claudeflare_strategy" in updated:
            try:
                self.strategy_option = check_strategy(opts.claudeflare_strategy)
            except ValueError as e:
                raise exceptions.OptionsError(f"claudeflare_strategy: {e}") from None
        if "claudeflare_session_hours" in updated:
            if opts.claudeflare_session_hours <= 0:
                raise exceptions.OptionsError("claudeflare_session_hours must be positive")
            self.balancer.session_seconds = opts.claudeflare_session_hours * 3600
        if "claudeflare_token_url" in updated or "claudeflare_refresh_margin" in updated:
            if not opts.claudeflare_token_url.startswith(("https://", "http://")):
                raise exceptions.OptionsError("claudeflare_token_url must be an http(s) URL")
            if opts.claudeflare_refresh_margin < 0:
                raise exceptions.OptionsError("claudeflare_refresh_margin must not be negative")
            self.oauth = replace(self.oauth, token_url=opts.claudeflare_token_url)
            self.refresh_margin = float(opts.claudeflare_refresh_margin)
            if self.refresher:
                self.refresher.settings, self.refresher.margin = self.oauth, self.refresh_margin
        if "claudeflare_home" in updated:
            home = resolve_home(opts.claudeflare_home)
            try:
                ensure_home(home)
            except OSError as e:
                raise exceptions.OptionsError(f"claudeflare_home: cannot use {home}: {e.strerror}") from None
            if self.watcher:
                self.watcher.stop()
            self.home = home
            self.watcher = PoolWatcher(home)
            self.watcher.start()
            self.refresher = TokenRefresher(home, self.oauth, self.refresh_margin)
            logger.info("claudeflare: home %s, upstream %s://%s:%d", home, *self.upstream)

    def running(self) -> None:
        self._background = asyncio.get_running_loop().create_task(self.refresh_ahead())

    async def refresh_ahead(self, every: float = 30.0) -> None:
        """Refresh tokens before they expire, so requests rarely wait for a refresh."""
        while True:
            pool = self.pool
            for account in pool.usable():
                credential = pool.credential(account)
                if self.refresher and credential and self.refresher.needs_refresh(credential):
                    await self.refresher.fresh(account.name, credential)
            await asyncio.sleep(every)

    def done(self) -> None:
        if self._background:
            self._background.cancel()
        if self.watcher:
            self.watcher.stop()

    @property
    def pool(self) -> Pool:
        return self.watcher.pool if self.watcher else Pool()

    def is_pool_flow(self, flow: http.HTTPFlow) -> bool:
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return True
        request = flow.request
        if (request.host, request.port) == self.upstream[1:]:
            return True  # sent to Anthropic through us as an HTTP(S) proxy
        # An origin-form request (ANTHROPIC_BASE_URL=http://127.0.0.1:8080) is addressed to us.
        sockname = flow.client_conn.sockname
        return request.port == sockname[1] and request.host in (*LOOPBACK_NAMES, sockname[0])

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self.is_pool_flow(flow):
            return
        state = FlowState(
            id=secrets.token_hex(12),
            started_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        )
        flow.metadata[STATE] = state
        request = flow.request
        if request.method == "HEAD" and request.path == "/":
            # Claude Code's credential-less connection warm-up: answer it here, cheaply.
            flow.response = http.Response.make(200)
            return
        pool = self.pool
        presented = presented_key(request)
        if pool.client_keys:
            state.client = pool.client_for(presented)
            if state.client is None:
                flow.response = error_response(
                    401, "authentication_error", "Claudeflare: invalid client key. Use a key from `claudeflare client-key create NAME`."
                )
        elif not is_loopback(flow.client_conn.peername[0]):
            flow.response = error_response(
                403,
                "permission_error",
                "Claudeflare accepts clients beyond loopback only with a client key: run "
                "`claudeflare client-key create NAME` and send the key as x-api-key.",
            )

    async def request(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or flow.response:
            return
        body = flow.request.raw_content or b""
        state.model, state.stream = request_summary(body)
        state.session = conversation_key(flow.request.headers, body)
        pool = self.pool
        self.balancer.strategy = state.strategy = pool.strategy or self.strategy_option
        candidates = pool.usable()
        while True:
            account = self.balancer.pick(candidates, state.session)
            if account is None:
                flow.response = no_account_response(pool)
                return
            credential = await self.credential(pool, account)
            if credential:
                break
            candidates = [a for a in candidates if a is not account]
        self.send(flow, state, account, credential)

    async def credential(self, pool: Pool, account: Account) -> Credential | None:
        credential = pool.credential(account)
        if credential is None or self.refresher is None:
            return credential
        return await self.refresher.fresh(account.name, credential)

    def send(self, flow: http.HTTPFlow, state: FlowState, account: Account, credential: Credential) -> None:
        request = flow.request
        if not isinstance(flow.client_conn.proxy_mode, ReverseMode):
            scheme, host, port = self.upstream
            request.scheme, request.host, request.port = scheme, host, port
            request.host_header = host if port == (443 if scheme == "https" else 80) else f"{host}:{port}"
        inject_credential(request, account, credential)
        state.account = account.name
        state.attempts += 1
        self.balancer.acquire(account.name)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # The request is on the wire by now: keep secrets out of flow dumps
        # (`mitmdump -v`, `-w` files, mitmweb) from here on.
        if flow.metadata.get(STATE):
            redact_credential(flow.request)

    def response(self, flow: http.HTTPFlow) -> None:
        self.release(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.release(flow)
        if flow.metadata.get(STATE):
            redact_credential(flow.request)

    def release(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state and state.account and not state.released:
            state.released = True
            self.balancer.release(state.account)


def no_account_response(pool: Pool) -> http.Response:
    if not pool.accounts:
        why = "Claudeflare has no accounts. Add one with `claudeflare add NAME --mode api-key` or `claudeflare import NAME --mode max --tier 5`."
    else:
        states = ", ".join(f"{a.name}: {pool.state(a)}" for a in pool.accounts)
        why = (
            f"Claudeflare has no usable account ({states}). Resume one with `claudeflare resume NAME`, "
            "or add one with `claudeflare add NAME --mode api-key`."
        )
    return error_response(503, "api_error", why)


class Recorder:
    """Streams SSE replies through a usage parser and writes one flow-log row per pool request."""

    def __init__(self) -> None:
        self.flowlog: FlowLog | None = None
        self.live: dict[str, http.HTTPFlow] = {}  # logged at shutdown if still open

    def load(self, loader) -> None:
        loader.add_option("claudeflare_db", str, "", f"SQLite flow log (default: {DB_FILE} in claudeflare_home).")

    def configure(self, updated: set[str]) -> None:
        if not {"claudeflare_db", "claudeflare_home"} & updated:
            return
        path = Path(ctx.options.claudeflare_db) if ctx.options.claudeflare_db else resolve_home(ctx.options.claudeflare_home) / DB_FILE
        if self.flowlog and self.flowlog.path == path:
            return
        if self.flowlog:
            self.flowlog.close()
        self.flowlog = FlowLog(path.expanduser().resolve()).start()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = flow.metadata.get(STATE)
        if state:
            self.live[state.id] = flow

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or flow.response is None:
            return
        if not flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            return
        parser = state.parser = SSEUsageParser(flow.response.headers.get("content-encoding"))

        def watch(chunk: bytes) -> bytes:
            # Forward every chunk as received; usage is read on the side.
            if chunk and state.first_byte_at is None:
                state.first_byte_at = time.time()
            parser.feed(chunk)
            return chunk

        flow.response.stream = watch

    def response(self, flow: http.HTTPFlow) -> None:
        self.record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.record(flow, flow.error.msg if flow.error else "error")

    def done(self) -> None:
        for flow in list(self.live.values()):
            self.record(flow, "proxy shut down")
        if self.flowlog:
            self.flowlog.close()
            self.flowlog = None

    def record(self, flow: http.HTTPFlow, error: str | None = None) -> None:
        state: FlowState | None = flow.metadata.get(STATE)
        if state is None or state.logged or self.flowlog is None:
            return
        state.logged = True
        self.live.pop(state.id, None)
        self.flowlog.log(flow_row(flow, state, error))


def reply_usage(flow: http.HTTPFlow, state: FlowState) -> Usage | None:
    if state.parser:
        return state.parser.usage
    response = flow.response
    if response is None or not response.raw_content:
        return None
    return usage_from_json(response.raw_content, response.headers.get("content-encoding"))


def flow_row(flow: http.HTTPFlow, state: FlowState, error: str | None) -> dict:
    request, response = flow.request, flow.response
    usage = reply_usage(flow, state) or Usage()
    usage.model = usage.model or state.model
    cost = cost_usd(usage)
    tokens = usage.input_tokens + usage.output_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    first_byte = state.first_byte_at or (response.timestamp_start if response else None)
    end = (response.timestamp_end if response else None) or time.time()
    return {
        "id": state.id,
        "started_at": state.started_at,
        "account": state.account,
        "strategy": state.strategy,
        "session": state.session,
        "client": state.client,
        "method": request.method,
        "path": request.path.split("?", 1)[0],
        "model": usage.model,
        "stream": int(state.stream or state.parser is not None),
        "status": response.status_code if response else None,
        "error": usage.error_type or error,
        "ttfb_ms": round((first_byte - request.timestamp_start) * 1000, 2) if first_byte else None,
        "duration_ms": round((end - request.timestamp_start) * 1000, 2),
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cache_read_input_tokens,
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cost_usd": cost or 0.0,
        "priced": int(cost is not None or not tokens),  # 0 flags tokens of a model without a price
        "attempts": state.attempts,
        "stop_reason": usage.stop_reason,
        "request_id": response.headers.get("request-id") if response else None,
    }

