"""A stand-in for the Anthropic API and OAuth server, following /work/shared/reference/anthropic-contract.md.

The real API is out of reach, so the tests talk to this. It follows the contract, ugly parts included:
Messages (JSON and SSE, optionally gzip, chunks cut inside UTF-8 characters), count_tokens, models,
per-account rate limits with the real header families (unified for OAuth, Console for API keys),
faults (429 with and without windows, spend limit, out of credits, 5xx/529, `event: error` inside a 200
stream, connection reset, stall, malformed SSE, short body), OAuth with PKCE and single-use
(rotating) refresh tokens (or the old host's 404), and the subscription usage endpoint with its
hourly read budget.

In-process (pytest)::

    with FakeAnthropic() as fake:                       # 127.0.0.1, free port, own thread + event loop
        fake.add_api_key("sk-ant-api03-x", account="a")
        fake.add_oauth(account="m", access_token="at", refresh_token="rt", expires_in=3600)
        ... requests to fake.url ...
        fake.requests                                   # one dict per request received

Standalone (benchmarks, soak)::

    python tests/fake_anthropic.py --port 0 --port-file F [--config cfg.json] [--no-record]

writes the bound port to F once listening; configure and inspect it over HTTP under /_fake/.

Per-request control headers (the fake strips nothing; they reach it through the proxy):
    x-fake-tokens N          output tokens = text deltas (default 10, 1..100000)
    x-fake-input-tokens N    input_tokens (default max(1, len(raw body) // 4))
    x-fake-cache-read N      cache_read_input_tokens (default 0)
    x-fake-cache-write N     5-minute cache writes (default 0)
    x-fake-cache-write-1h N  1-hour cache writes (default 0); cache_creation_input_tokens = 5m + 1h
    x-fake-first-byte-ms N   delay before the reply's headers (default 0)
    x-fake-delay-ms N        delay between text deltas (default 0: yield to the loop, no sleep)
    x-fake-gzip: 1           gzip the SSE stream incrementally (Z_SYNC_FLUSH after every event)
    x-fake-split: 1          write each SSE event in pieces, cut inside a UTF-8 character when there is one
    x-fake-stop-reason S     stop_reason (default end_turn)
    x-fake-fault F           one of FAULTS below, for this request only
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import os
import secrets
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from fake_resources import FakeResources

CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
OAUTH_BETA = "oauth-2025-04-20"
STATUS_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
# What the "tokens" of a reply are: cycled, one per text_delta; multi-byte UTF-8 on purpose.
TEXT = ["Hel", "lo", " wo", "rld", " —", " café", " ✓", " ok", " 🙂", "."]
MAX_TOKENS = 100_000
FAULTS = (
    "status:NNN",  # that HTTP status, Anthropic error body of the matching type (§4)
    "status:429",  # rate limited WITH window headers (unified rejected / Console remaining 0), reset in 60 s
    "status:429-windowless",  # retry-after + x-should-retry: true, no anthropic-ratelimit-* header at all
    "spend-limit",  # 429, error.details.error_code = enforced_spend_limit_reached
    "out-of-credits",  # 429, unified rejected + overage-status rejected / overage-disabled-reason out_of_credits
    "reset-mid-stream",  # 200 stream, connection closed after a few deltas (no message_stop)
    "stall",  # headers sent, then nothing until the client leaves (at most 60 s)
    "stall-mid-stream",  # a few events, then nothing until the client leaves (at most 60 s)
    "malformed-sse",  # garbage lines, a truncated JSON data line and an unknown event between valid events
    "bad-content-length",  # non-streamed JSON reply whose Content-Length claims more than is sent, then close
    "in-stream-error",  # 200 stream, `event: error` overloaded_error after a few deltas, then the end
    "long-context",  # 429 `Extra usage is required for long context requests.`, windows allowed, overage out_of_credits
)
# Subscriptions serve only Claude Code (contract §8): its system prompt is a billing-header block, then one of these.
BILLING_PREFIX = "x-anthropic-billing-header:"
CLAUDE_CODE_IDENTITIES = (
    "You are Claude Code, Anthropic's official CLI for Claude.",
    "You are Claude Code, Anthropic's official CLI for Claude, running within the Claude Agent SDK.",
    "You are a Claude agent, built on Anthropic's Claude Agent SDK.",
)
CLAUDE_CODE_ONLY = (
    "This credential is only authorized for use with Claude Code and cannot be used for other API requests."
)
# Every form of that refusal seen (contract §8), by name: the proxy must know each.
THIRD_PARTY_REFUSALS = {
    "credential": (400, CLAUDE_CODE_ONLY),
    "error": (400, "Error"),
    "error-429": (429, "Error"),
    "extra-usage": (
        400,
        "Third-party apps now draw from your extra usage, not your plan limits. "
        "Add more extra usage at claude.ai/settings/usage to continue.",
    ),
}
LONG_CONTEXT = "Extra usage is required for long context requests."
LONG_CONTEXT_TOKENS = 200_000  # past this, a subscription without extra usage refuses the request
DISABLED = {
    "organization": (400, "This organization has been disabled."),
    "oauth": (403, "OAuth authentication is currently not allowed for this organization."),
}
STALL_S = 60.0
# The text_delta events of content block 0, precomputed: streaming costs no JSON encoding per token.
DELTAS = [
    f'event: content_block_delta\ndata: {{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{json.dumps(t, ensure_ascii=False)}}}}}\n\n'.encode()
    for t in TEXT
]
REC = web.RequestKey("fake_record", dict)


def is_claude_code(payload: dict) -> bool:
    system = payload.get("system")
    if not isinstance(system, list) or len(system) < 2 or not all(isinstance(b, dict) for b in system[:2]):
        return False
    first, second = (b.get("text") if b.get("type") == "text" else None for b in system[:2])
    return (
        isinstance(first, str)
        and first.startswith(BILLING_PREFIX)
        and isinstance(second, str)
        and second.startswith(CLAUDE_CODE_IDENTITIES)
    )


def expected_text(n: int) -> str:
    """The text of a reply with `n` output tokens (streamed: one TEXT token per delta)."""
    return "".join(TEXT[i % len(TEXT)] for i in range(n))


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pkce_challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def error_body(
    status: int, message: str, kind: str | None = None, details: dict | None = None, request_id: str | None = None
) -> dict:
    if kind is None:
        kind = STATUS_ERRORS.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    error = {"type": kind, "message": message}
    if details:
        error["details"] = details
    return {"type": "error", "error": error, "request_id": request_id or new_request_id()}


def new_request_id() -> str:
    return "req_011C" + secrets.token_hex(10)


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def _int_header(request: web.Request, name: str, default: int, lo: int = 0, hi: int = 10**9) -> int:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        return max(lo, min(hi, int(raw.strip())))
    except ValueError:
        return default


def _split_points(chunk: bytes) -> list[bytes]:
    """Cut an event in two or three, inside a multi-byte UTF-8 character when there is one."""
    for i, byte in enumerate(chunk):
        if byte >= 0xC0:  # lead byte of a multi-byte character: cut right after it
            return [chunk[: i + 1], chunk[i + 1 :]]
    third = max(1, len(chunk) // 3)
    return [chunk[:third], chunk[third : 2 * third], chunk[2 * third :]]


@dataclass
class Limit:
    requests: int
    window_s: float
    first_window_s: float
    kind: str = "5h"  # "5h" | "7d"
    served: int = 0
    reset_at: float | None = None  # None: the window opens with the account's next request

    def roll(self, now: float) -> None:
        if self.reset_at is None:
            self.reset_at = now + self.first_window_s
        elif now >= self.reset_at:
            self.reset_at, self.served = now + self.window_s, 0

    @property
    def utilization(self) -> float:
        return self.served / self.requests if self.requests > 0 else 1.0


class _State:
    """Everything the fake has been told or has issued. Guarded by FakeAnthropic._lock."""

    def __init__(self):
        self.api_keys: dict[str, str] = {}  # key -> account
        self.access_tokens: dict[str, tuple[str, float]] = {}  # token -> (account, expires_at)
        self.refresh_tokens: dict[str, str] = {}  # live refresh token -> account (single use)
        self.used_refresh_tokens: dict[str, str] = {}  # spent refresh token -> account
        self.revoked: set[str] = set()
        self.latest: dict[str, dict] = {}  # account -> last tokens issued/registered
        self.auth_codes: dict[str, dict] = {}  # code -> {account, state, code_challenge, redirect_uri}
        self.limits: dict[str, Limit] = {}
        self.faults: dict[str, list] = {}  # account ("*" = any) -> [fault, remaining]
        self.overage: dict[str, tuple[str, str | None]] = {}  # account -> (status, disabled reason)
        self.token_calls: dict[str, int] = {}
        self.token_calls_started: dict[str, int] = {}
        self.usage: dict[str, dict] = {}  # account -> usage endpoint objects that replace the defaults
        self.usage_reads: dict[str, list[float]] = {}  # account -> when its usage reads were answered
        self.disabled: dict[str, str] = {}  # account -> "organization" | "oauth" (see DISABLED)
        self.family_limits: dict[tuple[str, str], float] = {}  # (account, model family) -> weekly reset


USAGE_BUDGET = 30  # usage reads an hour per account (contract §9)


class FakeAnthropic:
    """The fake upstream. Configuration and inspection methods are safe to call from any thread."""

    def __init__(self, port: int = 0, record: bool = True, client_id: str = CLIENT_ID, token_lifetime: int = 3600):
        self.port = port
        self.record = record  # False: keep counters only (soak runs); switchable at any time
        self.client_id = client_id
        self.token_lifetime = token_lifetime  # expires_in of tokens the OAuth endpoint mints
        self.token_delay_s = 0.0  # delay inside /v1/oauth/token (a client that leaves meanwhile changes nothing)
        self.token_fault: str | None = None  # "500" | "invalid_grant" | "429" | "404" (the old host) | None
        self.usage_budget = USAGE_BUDGET  # usage reads per account per hour, then 429 with retry-after
        self.third_party_refusal = "credential"  # how subscriptions refuse what is not Claude Code
        self._lock = threading.RLock()
        self._state = _State()
        self._records: list[dict] = []
        self._counters = self._new_counters()
        self._started_at = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.resources = FakeResources(self)  # files and message batches, per account

    # --- configuration ---------------------------------------------------------------------------

    def add_api_key(self, key: str, account: str = "api-key") -> None:
        with self._lock:
            self._state.api_keys[key] = account

    def add_oauth(
        self,
        account: str = "oauth",
        access_token: str | None = None,
        refresh_token: str | None = None,
        expires_in: float = 3600,
    ) -> dict:
        """Register tokens for an account (generated when not given); returns them."""
        access_token = access_token or "sk-ant-oat01-fake-" + secrets.token_urlsafe(24)
        refresh_token = refresh_token or "sk-ant-ort01-fake-" + secrets.token_urlsafe(24)
        with self._lock:
            self._state.access_tokens[access_token] = (account, time.time() + expires_in)
            self._state.refresh_tokens[refresh_token] = account
            tokens = {"access_token": access_token, "refresh_token": refresh_token, "expires_in": expires_in}
            self._state.latest[account] = tokens
        return dict(tokens)

    def add_auth_code(
        self, code: str, account: str, state: str, code_challenge: str, redirect_uri: str | None = None
    ) -> None:
        """A code the OAuth endpoint will exchange once, for the verifier whose S256 challenge this is."""
        with self._lock:
            self._state.auth_codes[code] = {
                "account": account,
                "state": state,
                "code_challenge": code_challenge,
                "redirect_uri": redirect_uri,
            }

    def revoke_access_token(self, token: str) -> None:
        """Upstream stops accepting this access token before its expiry (401)."""
        with self._lock:
            self._state.revoked.add(token)

    def revoke_refresh_token(self, token: str) -> None:
        with self._lock:
            account = self._state.refresh_tokens.pop(token, None)
            if account:
                self._state.used_refresh_tokens[token] = account

    def set_limit(
        self,
        account: str,
        requests: int,
        window_s: float,
        reset_in_s: float | None = None,
        kind: str = "5h",
        used: int = 0,
    ) -> None:
        """`requests` generations per window. The window opens with the account's next request and
        resets `reset_in_s` (default `window_s`) later; later windows last `window_s`. Once `requests`
        were served in the window, /v1/messages answers 429 until the reset. `used`: already spent."""
        if kind not in ("5h", "7d"):
            raise ValueError("kind must be '5h' or '7d'")
        with self._lock:
            self._state.limits[account] = Limit(
                int(requests), float(window_s), float(window_s if reset_in_s is None else reset_in_s), kind, int(used)
            )

    def clear_limit(self, account: str) -> None:
        with self._lock:
            self._state.limits.pop(account, None)

    def set_fault(self, account: str, fault: str, count: int = 1) -> None:
        """The next `count` /v1/messages requests of `account` ("*": of any account) meet `fault`."""
        with self._lock:
            if count <= 0:
                self._state.faults.pop(account, None)
            else:
                self._state.faults[account] = [fault, int(count)]

    def clear_faults(self, account: str | None = None) -> None:
        with self._lock:
            if account is None:
                self._state.faults.clear()
            else:
                self._state.faults.pop(account, None)

    def set_overage(
        self, account: str, status: str = "rejected", disabled_reason: str | None = "out_of_credits"
    ) -> None:
        """The account's overage headers on every reply (OAuth), e.g. rejected / out_of_credits."""
        with self._lock:
            self._state.overage[account] = (status, disabled_reason)

    def set_usage(self, account: str, windows: dict) -> None:
        """What /api/oauth/usage answers for the account: these objects (`{"utilization": <percent>,
        "resets_at": <ISO 8601>}`, null, or anything at all) replace the defaults, by key."""
        with self._lock:
            self._state.usage[account] = dict(windows)

    def usage_reads(self, account: str) -> int:
        """Usage reads of this account answered in the last hour (429s not counted)."""
        with self._lock:
            return len([t for t in self._state.usage_reads.get(account, []) if t > time.time() - 3600])

    def disable(self, account: str, how: str = "organization") -> None:
        """Anthropic disabled the account: every request on it gets DISABLED[how]."""
        if how not in DISABLED:
            raise ValueError(f"how must be one of {', '.join(DISABLED)}")
        with self._lock:
            self._state.disabled[account] = how

    def enable(self, account: str) -> None:
        with self._lock:
            self._state.disabled.pop(account, None)

    def set_family_limit(self, account: str, family: str, reset_in_s: float = 86400) -> None:
        """The account's weekly window for one model family (opus, sonnet) is used up: its requests for
        that family get 429 (claim seven_day_<family>, the 7d_oi window rejected); other families serve."""
        with self._lock:
            self._state.family_limits[(account, family)] = time.time() + reset_in_s

    def configure(self, config: dict) -> None:
        """Apply a whole configuration (the --config file and POST /_fake/config use this):
        {"api_keys": {key: account} | [{"key","account"}], "oauth": [{"account","access_token","refresh_token",
        "expires_in"}], "auth_codes": [{...add_auth_code args}], "limits": [{...set_limit args}],
        "faults": [{"account","fault","count"}], "overage": [{"account","status","disabled_reason"}],
        "usage": [{"account","windows"}], "token_delay_s", "token_fault", "token_lifetime", "client_id", "record",
        "usage_budget"}"""
        api_keys = config.get("api_keys") or {}
        if isinstance(api_keys, dict):
            api_keys = [{"key": k, "account": v} for k, v in api_keys.items()]
        for item in api_keys:
            self.add_api_key(item["key"], item.get("account", "api-key"))
        for item in config.get("oauth") or []:
            self.add_oauth(**item)
        for item in config.get("auth_codes") or []:
            self.add_auth_code(**item)
        for item in config.get("limits") or []:
            self.set_limit(**item)
        for item in config.get("faults") or []:
            self.set_fault(**item)
        for item in config.get("overage") or []:
            self.set_overage(**item)
        for item in config.get("usage") or []:
            self.set_usage(**item)
        for name in ("token_delay_s", "token_fault", "token_lifetime", "client_id", "record", "usage_budget"):
            if name in config:
                setattr(self, name, config[name])

    def reset(self) -> None:
        """Forget everything: credentials, codes, limits, faults, token settings, records and counters."""
        with self._lock:
            self._state = _State()
            self.resources.reset()
            self.token_delay_s, self.token_fault, self.token_lifetime = 0.0, None, 3600
            self.usage_budget = USAGE_BUDGET
            self.third_party_refusal = "credential"
        self.reset_requests()

    def reset_requests(self) -> None:
        """Forget the records and counters only (credentials, limits and faults stay)."""
        with self._lock:
            self._records = []
            self._counters = self._new_counters()
            self._state.token_calls.clear()
            self._state.token_calls_started.clear()

    # --- inspection ------------------------------------------------------------------------------

    @property
    def requests(self) -> list[dict]:
        """One dict per request received (not /_fake/*), in arrival order (a snapshot of the list; the
        dicts of requests still in flight fill in as they end): method, path, query, account, auth_kind,
        headers (lower-case names), body (bytes), status, usage (what the reply said, or None), started,
        ended, request_id, fault, outcome ("ok" | "client_gone" | "reset" | "stalled" | "error_event" |
        "short_body"), claimed_account (whose credential it was, even when refused)."""
        with self._lock:
            return list(self._records)

    def wait_for_requests(
        self, n: int, timeout: float = 5.0, path: str | None = None, finished: bool = False
    ) -> list[dict]:
        """Wait until `n` requests (to `path`, ended if `finished`) were received; returns them.
        Raises TimeoutError when they do not come."""
        deadline = time.monotonic() + timeout
        while True:
            found = [
                r
                for r in self.requests
                if (path is None or r["path"] == path) and (not finished or r["ended"] is not None)
            ]
            if len(found) >= n:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(found)} of {n} requests after {timeout}s")
            time.sleep(0.01)

    def stats(self) -> dict:
        with self._lock:
            c = self._counters
            return {
                **{k: (dict(v) if isinstance(v, dict) else v) for k, v in c.items()},
                "token_calls": dict(self._state.token_calls),
                "token_calls_started": dict(self._state.token_calls_started),
            }

    def token_calls(self, account: str) -> int:
        """Calls of /v1/oauth/token for this account that were answered (any outcome, reuses of a
        spent refresh token included)."""
        with self._lock:
            return self._state.token_calls.get(account, 0)

    def token_calls_started(self, account: str) -> int:
        """Calls of /v1/oauth/token for this account that arrived (answered or not yet/never)."""
        with self._lock:
            return self._state.token_calls_started.get(account, 0)

    def tokens(self, account: str) -> dict | None:
        """The account's latest tokens: {"access_token","refresh_token","expires_in"}."""
        with self._lock:
            latest = self._state.latest.get(account)
            return dict(latest) if latest else None

    def served(self, account: str) -> int:
        """Generations counted against the account's limit in its current window."""
        with self._lock:
            limit = self._state.limits.get(account)
            return limit.served if limit else 0

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._middleware])
        app.on_response_prepare.append(self._on_prepare)
        r = app.router
        r.add_post("/v1/messages", self.messages)
        r.add_post("/v1/messages/count_tokens", self.count_tokens)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/oauth/token", self.oauth_token)
        r.add_post("/api/oauth/claude_cli/create_api_key", self.create_api_key)
        r.add_get("/api/oauth/usage", self.oauth_usage)
        r.add_route("HEAD", "/", self.head)
        self.resources.routes(r)
        r.add_post("/_fake/api_keys", self._control(lambda d: self.add_api_key(d["key"], d.get("account", "api-key"))))
        r.add_post("/_fake/oauth", self._control(lambda d: self.add_oauth(**d)))
        r.add_post("/_fake/auth_codes", self._control(lambda d: self.add_auth_code(**d)))
        r.add_post("/_fake/limits", self._control(lambda d: self.set_limit(**d)))
        r.add_post("/_fake/faults", self._control(lambda d: self.set_fault(**d)))
        r.add_post("/_fake/clear_faults", self._control(lambda d: self.clear_faults(d.get("account"))))
        r.add_post("/_fake/overage", self._control(lambda d: self.set_overage(**d)))
        r.add_post("/_fake/revoke", self._control(self._control_revoke))
        r.add_post("/_fake/token", self._control(self._control_token))
        r.add_post("/_fake/config", self._control(self.configure))
        r.add_post("/_fake/reset", self._control(lambda d: self.reset()))
        r.add_post("/_fake/reset_requests", self._control(lambda d: self.reset_requests()))
        r.add_get("/_fake/requests", self._control_requests)
        r.add_get("/_fake/stats", self._control_stats)
        r.add_get("/_fake/token_calls", self._control_token_calls)
        return app

    async def start_async(self) -> None:
        # handler_cancellation: a client that goes away cancels its handler (stalls and slow streams end).
        self._runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=1.0,
            max_line_size=65536,
            max_field_size=65536,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=2048)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()

    async def stop_async(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> FakeAnthropic:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as e:  # noqa: BLE001 - reported to the starting thread
                failure.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fake-anthropic", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake Anthropic did not start")
        if failure:
            raise RuntimeError(f"fake Anthropic did not start: {failure[0]!r}")
        return self

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.stop_async(), loop).result(15)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            self._loop = self._thread = None

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------------

    @staticmethod
    def _new_counters() -> dict:
        return {
            "requests": 0,
            "served": 0,
            "in_flight": 0,
            "max_in_flight": 0,
            "client_gone": 0,
            "output_tokens": 0,
            "by_status": {},
            "by_account": {},
            "by_path": {},
            "by_fault": {},
        }

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if request.path.startswith("/_fake/"):
            return await handler(request)
        body = await request.read()
        rec = {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "account": None,
            "auth_kind": None,
            "headers": None,
            "body": body,
            "status": None,
            "usage": None,
            "started": time.time(),
            "ended": None,
            "request_id": new_request_id(),
            "fault": None,
            "outcome": None,
            "claimed_account": None,
        }
        request[REC] = rec
        with self._lock:
            c = self._counters
            c["requests"] += 1
            c["in_flight"] += 1
            c["max_in_flight"] = max(c["max_in_flight"], c["in_flight"])
            if self.record:
                rec["headers"] = {k.lower(): v for k, v in request.headers.items()}
                self._records.append(rec)
            else:
                rec["body"] = None
        response = None
        try:
            try:
                response = await handler(request)
            except web.HTTPException as e:  # router's 404 / 405: answer the way the API does
                if e.status not in (404, 405):
                    raise
                message = "Not Found" if e.status == 404 else f"Method {request.method} not allowed"
                response = self._error(request, e.status, message, kind="not_found_error" if e.status == 404 else None)
            return response
        except asyncio.CancelledError:
            rec["outcome"] = rec["outcome"] or "client_gone"
            raise
        except (ConnectionError, OSError):
            rec["outcome"] = rec["outcome"] or "client_gone"
            raise
        finally:
            if rec["status"] is None and response is not None:
                rec["status"] = response.status
            rec["outcome"] = rec["outcome"] or "ok"
            rec["ended"] = time.time()
            with self._lock:
                c = self._counters
                c["in_flight"] -= 1
                c["served"] += 1
                if rec["outcome"] == "client_gone":
                    c["client_gone"] += 1
                status = rec["status"] or 0
                c["by_status"][status] = c["by_status"].get(status, 0) + 1
                c["by_path"][rec["path"]] = c["by_path"].get(rec["path"], 0) + 1
                if rec["account"]:
                    c["by_account"][rec["account"]] = c["by_account"].get(rec["account"], 0) + 1
                if rec["fault"]:
                    c["by_fault"][rec["fault"]] = c["by_fault"].get(rec["fault"], 0) + 1
                if rec["usage"]:
                    c["output_tokens"] += rec["usage"].get("output_tokens", 0)

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        rec = request.get(REC)
        if rec is not None:
            if "request-id" not in response.headers:
                response.headers["request-id"] = rec["request_id"]
            if rec["status"] is None:
                rec["status"] = response.status

    def _error(
        self,
        request: web.Request,
        status: int,
        message: str,
        headers: dict | None = None,
        kind: str | None = None,
        details: dict | None = None,
    ) -> web.Response:
        rec = request.get(REC)
        request_id = rec["request_id"] if rec else new_request_id()
        return web.json_response(error_body(status, message, kind, details, request_id), status=status, headers=headers)

    def _authenticate(self, request: web.Request) -> tuple[str | None, str | None, str | None]:
        """(account, kind "api_key"|"oauth", None) or (claimed account or None, kind, error message)."""
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization")
        if key is not None and auth is not None:
            return None, None, "Provide either x-api-key or an Authorization header, not both."
        with self._lock:
            if key is not None:
                account = self._state.api_keys.get(key.strip())
                return (account, "api_key", None) if account else (None, "api_key", "invalid x-api-key")
            if auth is None:
                return None, None, "x-api-key header is required"
            scheme, _, token = auth.strip().partition(" ")
            token = token.strip()
            found = self._state.access_tokens.get(token) if scheme.lower() == "bearer" else None
            if not found:
                return None, "oauth", "Invalid bearer token"
            account, expires_at = found
            if token in self._state.revoked:
                return account, "oauth", "OAuth token has been revoked. Please obtain a new token."
        if time.time() >= expires_at:
            return (
                account,
                "oauth",
                "OAuth token has expired. Please obtain a new token or refresh your existing token.",
            )
        betas = [b.strip() for b in request.headers.get("anthropic-beta", "").split(",")]
        if OAUTH_BETA not in betas:
            return account, "oauth", "OAuth authentication is currently not supported."
        return account, "oauth", None

    def _auth_or_error(self, request: web.Request) -> tuple[str | None, str | None, web.Response | None]:
        rec = request[REC]
        account, kind, problem = self._authenticate(request)
        if problem:
            rec["claimed_account"], rec["auth_kind"] = account, kind
            return None, None, self._error(request, 401, problem)
        rec["account"] = rec["claimed_account"] = account
        rec["auth_kind"] = kind
        with self._lock:
            disabled = self._state.disabled.get(account)
        if disabled:
            status, message = DISABLED[disabled]
            return None, None, self._error(request, status, message)
        return account, kind, None

    def _limit_headers(
        self, account: str, kind: str, now: float, limit: Limit | None, rejected: bool, input_tokens: int = 0
    ) -> dict:
        """Rate-limit headers describing the account's state when this request arrived. Caller holds the lock."""
        if limit:
            utilization, reset, cap = limit.utilization, limit.reset_at or now + limit.window_s, limit.requests
        else:
            utilization, reset, cap = 0.1, None, 4000
        if kind == "api_key":
            if reset is None:
                reset = now + 60
            remaining = 0 if rejected else max(0, cap - (limit.served if limit else int(cap * utilization)))
            headers = {
                "anthropic-ratelimit-requests-limit": str(cap),
                "anthropic-ratelimit-requests-remaining": str(remaining),
                "anthropic-ratelimit-requests-reset": rfc3339(reset),
                "anthropic-ratelimit-tokens-limit": "2000000",
                "anthropic-ratelimit-tokens-remaining": str(2000000 - min(2000000, input_tokens)),
                "anthropic-ratelimit-tokens-reset": rfc3339(now + 1),
                "anthropic-ratelimit-input-tokens-limit": "2000000",
                "anthropic-ratelimit-input-tokens-remaining": str(2000000 - min(2000000, input_tokens)),
                "anthropic-ratelimit-input-tokens-reset": rfc3339(now + 1),
                "anthropic-ratelimit-output-tokens-limit": "400000",
                "anthropic-ratelimit-output-tokens-remaining": "400000",
                "anthropic-ratelimit-output-tokens-reset": rfc3339(now + 1),
            }
            if rejected:
                headers["retry-after"] = str(max(1, math.ceil(reset - now)))
            return headers
        five_reset = self._started_at + 5 * 3600
        seven_reset = self._started_at + 7 * 86400

        def status_of(u: float) -> str:
            return "rejected" if rejected else ("allowed_warning" if u >= 0.8 else "allowed")

        windows = {"5h": ["allowed", 0.1, five_reset], "7d": ["allowed", 0.05, seven_reset]}
        claim = "five_hour"
        if limit:
            windows[limit.kind] = [status_of(utilization), utilization, reset]
            claim = "five_hour" if limit.kind == "5h" else "seven_day"
        binding = windows["5h" if claim == "five_hour" else "7d"]
        overage_status, overage_reason = self._state.overage.get(account, ("rejected", "org_level_disabled"))
        headers = {
            "anthropic-ratelimit-unified-status": binding[0],
            "anthropic-ratelimit-unified-reset": str(int(binding[2])),
            "anthropic-ratelimit-unified-representative-claim": claim,
            "anthropic-ratelimit-unified-fallback-percentage": "0.5",
            "anthropic-ratelimit-unified-overage-status": overage_status,
        }
        if overage_reason:
            headers["anthropic-ratelimit-unified-overage-disabled-reason"] = overage_reason
        for name, (status, u, when) in windows.items():
            headers[f"anthropic-ratelimit-unified-{name}-status"] = status
            headers[f"anthropic-ratelimit-unified-{name}-utilization"] = f"{u:.4g}"
            headers[f"anthropic-ratelimit-unified-{name}-reset"] = str(int(when))
        if rejected:
            headers["retry-after"] = str(max(1, math.ceil(binding[2] - now)))
        return headers

    def _take_fault(self, request: web.Request, account: str) -> str | None:
        """Caller holds the lock."""
        fault = request.headers.get("x-fake-fault")
        if fault:
            return fault.strip()
        for who in (account, "*"):
            queued = self._state.faults.get(who)
            if queued and queued[1] > 0:
                queued[1] -= 1
                if queued[1] <= 0:
                    del self._state.faults[who]
                return queued[0]
        return None

    def _status_fault(
        self, request: web.Request, fault: str, account: str, kind: str, now: float, headers: dict
    ) -> web.Response | None:
        """The error reply of a status-like fault, or None when `fault` is not one. Caller holds the lock."""
        if fault == "spend-limit":
            return self._error(
                request,
                429,
                "You have reached your specified workspace API usage limits. "
                "You will regain access on the first day of next month.",
                {**headers, "x-should-retry": "false"},
                kind="rate_limit_error",
                details={"error_code": "enforced_spend_limit_reached"},
            )
        if fault == "out-of-credits":
            limit_headers = self._limit_headers(account, kind, now, None, False)
            if kind == "oauth":
                reset = str(int(self._started_at + 5 * 3600))
                limit_headers.update(
                    {
                        "anthropic-ratelimit-unified-status": "rejected",
                        "anthropic-ratelimit-unified-reset": reset,
                        "anthropic-ratelimit-unified-5h-status": "rejected",
                        "anthropic-ratelimit-unified-5h-utilization": "1",
                        "anthropic-ratelimit-unified-5h-reset": reset,
                        "anthropic-ratelimit-unified-overage-status": "rejected",
                        "anthropic-ratelimit-unified-overage-disabled-reason": "out_of_credits",
                    }
                )
            return self._error(
                request,
                429,
                "You are out of extra usage credits.",
                {"request-id": request[REC]["request_id"], **limit_headers, "x-should-retry": "false"},
            )
        if fault == "long-context":
            return self._long_context(request, account, kind, now)
        if not fault.startswith("status:"):
            return None
        spec = fault.split(":", 1)[1].strip()
        if spec == "429-windowless":
            return self._error(
                request, 429, "Rate limited. Please try again later.", {"retry-after": "1", "x-should-retry": "true"}
            )
        try:
            status = int(spec)
        except ValueError:
            return self._error(request, 500, f"fake: unknown fault {fault!r}")
        if status == 429:
            limit = Limit(1, 60.0, 60.0, "5h", served=1, reset_at=now + 60)
            return self._error(
                request,
                429,
                "Number of request tokens has exceeded your rate limit.",
                {**self._limit_headers(account, kind, now, limit, True), "x-should-retry": "true"},
            )
        messages = {
            500: "Internal server error",
            529: "Overloaded",
            401: "invalid x-api-key",
            403: "Your credit balance is too low to access the Anthropic API.",
            404: "Not Found",
            413: "Request exceeds the maximum allowed number of bytes.",
            400: "Invalid request",
        }
        extra = {"x-should-retry": "true" if status >= 500 or status == 408 else "false"}
        return self._error(request, status, messages.get(status, f"Error {status}"), {**headers, **extra})

    def _long_context(self, request: web.Request, account: str, kind: str, now: float) -> web.Response:
        """A subscription without extra usage refuses a long-context request only: its windows stay allowed."""
        headers = self._limit_headers(account, kind, now, self._state.limits.get(account), False)
        if kind == "oauth":
            headers.update(
                {
                    "anthropic-ratelimit-unified-overage-status": "rejected",
                    "anthropic-ratelimit-unified-overage-disabled-reason": "out_of_credits",
                }
            )
        return self._error(request, 429, LONG_CONTEXT, {**headers, "x-should-retry": "false"}, kind="rate_limit_error")

    def _family_limited(
        self, request: web.Request, account: str, kind: str, now: float, model: str
    ) -> web.Response | None:
        """429 when the account's weekly window for this model's family is used up. Caller holds the lock."""
        family = next((f for f in ("opus", "sonnet") if f in model.lower()), None)
        reset = self._state.family_limits.get((account, family)) if kind == "oauth" else None
        if reset is None or now >= reset:
            return None
        headers = self._limit_headers(account, kind, now, self._state.limits.get(account), False)
        headers.update(
            {
                "anthropic-ratelimit-unified-status": "rejected",
                "anthropic-ratelimit-unified-reset": str(int(reset)),
                "anthropic-ratelimit-unified-representative-claim": f"seven_day_{family}",
                "anthropic-ratelimit-unified-7d_oi-status": "rejected",
                "anthropic-ratelimit-unified-7d_oi-utilization": "1",
                "anthropic-ratelimit-unified-7d_oi-reset": str(int(reset)),
                "retry-after": str(max(1, math.ceil(reset - now))),
            }
        )
        return self._error(
            request,
            429,
            "This request would exceed your account's rate limit. Please try again later.",
            headers,
            kind="rate_limit_error",
        )

    # --- API -------------------------------------------------------------------------------------

    async def head(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        rec = request[REC]
        account, kind, refused = self._auth_or_error(request)
        if refused:
            return refused
        body: bytes = await request.read()
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return self._error(request, 400, "There was an error parsing the body of your request as JSON.")
        if not isinstance(payload, dict):
            return self._error(request, 400, "body: Input should be an object")
        for name, typ in (("model", str), ("max_tokens", int), ("messages", list)):
            if not isinstance(payload.get(name), typ) or isinstance(payload.get(name), bool):
                return self._error(
                    request,
                    400,
                    f"{name}: Field required"
                    if name not in payload
                    else f"{name}: Input should be a valid {typ.__name__}",
                )
        if missing := self.resources.missing_file(payload, account):
            return self._error(request, 404, f"File not found: {missing}")
        usage = {
            "input_tokens": _int_header(request, "x-fake-input-tokens", max(1, len(body) // 4)),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": _int_header(request, "x-fake-cache-read", 0),
            "output_tokens": _int_header(request, "x-fake-tokens", 10, 1, MAX_TOKENS),
        }
        model = payload["model"]
        if kind == "oauth" and "haiku" not in model.lower() and not is_claude_code(payload):
            return self._error(request, *THIRD_PARTY_REFUSALS[self.third_party_refusal])
        five, hour = _int_header(request, "x-fake-cache-write", 0), _int_header(request, "x-fake-cache-write-1h", 0)
        usage["cache_creation_input_tokens"] = five + hour
        cache_creation = {"ephemeral_5m_input_tokens": five, "ephemeral_1h_input_tokens": hour}
        now = time.time()
        with self._lock:
            limit = self._state.limits.get(account)
            if limit:
                limit.roll(now)
            over = bool(limit and limit.served >= limit.requests)
            headers = {
                "request-id": rec["request_id"],
                **self._limit_headers(account, kind, now, limit, over, usage["input_tokens"]),
            }
            fault = None if over else self._take_fault(request, account)
            if (
                fault is None
                and kind == "oauth"
                and usage["input_tokens"] > LONG_CONTEXT_TOKENS
                and self._state.overage.get(account, ("rejected",))[0] != "allowed"
            ):
                fault = "long-context"
            rec["fault"] = fault
            refusal = None if over else self._family_limited(request, account, kind, now, model)
            if over:
                refusal = self._error(
                    request,
                    429,
                    "This request would exceed your account's rate limit. Please try again later.",
                    {**headers, "x-should-retry": "true"},
                )
            elif fault and refusal is None:
                refusal = self._status_fault(request, fault, account, kind, now, headers)
                if refusal is None and fault not in FAULTS:
                    refusal = self._error(request, 500, f"fake: unknown fault {fault!r}; known: {', '.join(FAULTS)}")
            if refusal is None and limit:
                limit.served += 1
        first_byte = _int_header(request, "x-fake-first-byte-ms", 0, 0, 600_000) / 1000
        if first_byte:
            await asyncio.sleep(first_byte)
        if refusal is not None:
            return refusal
        stop_reason = request.headers.get("x-fake-stop-reason", "end_turn")
        if fault == "bad-content-length":
            return await self._short_body(request, rec, model, usage, cache_creation, headers, stop_reason)
        if payload.get("stream") is True or fault == "stall":
            return await self._stream(
                request, rec, model, usage, cache_creation, headers, fault, stop_reason, bool(payload.get("stream"))
            )
        n = usage["output_tokens"]
        message = {
            "id": "msg_01" + secrets.token_hex(11),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": expected_text(n)}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {**usage, "cache_creation": cache_creation, "service_tier": "standard"},
        }
        rec["usage"] = {**usage, "cache_creation": cache_creation}
        return web.json_response(message, headers=headers, dumps=lambda o: json.dumps(o, ensure_ascii=False))

    async def _short_body(self, request, rec, model, usage, cache_creation, headers, stop_reason):
        message = {
            "id": "msg_01" + secrets.token_hex(11),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": expected_text(usage["output_tokens"])}],
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {**usage, "cache_creation": cache_creation},
        }
        raw = json.dumps(message, ensure_ascii=False).encode()
        response = web.StreamResponse(status=200, headers={**headers, "content-type": "application/json"})
        response.content_length = len(raw) + 100
        await response.prepare(request)
        await response.write(raw)
        rec["usage"] = {**usage, "cache_creation": cache_creation}
        rec["outcome"] = "short_body"
        request.transport.close()
        raise asyncio.CancelledError  # nothing more may be written; the middleware records the outcome

    async def _stream(self, request, rec, model, usage, cache_creation, headers, fault, stop_reason, is_stream):
        gzip = request.headers.get("x-fake-gzip", "").strip() in ("1", "true")
        split = request.headers.get("x-fake-split", "").strip() in ("1", "true")
        delay = _int_header(request, "x-fake-delay-ms", 0, 0, 600_000) / 1000
        n = usage["output_tokens"]
        response = web.StreamResponse(
            status=200,
            headers={
                **headers,
                "content-type": "text/event-stream; charset=utf-8" if is_stream else "application/json",
                "cache-control": "no-cache",
                **({"content-encoding": "gzip"} if gzip else {}),
            },
        )
        await response.prepare(request)  # a StreamResponse sends its headers right away
        if fault == "stall":
            await self._stall(request, rec)
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None

        async def send(chunk: bytes) -> None:
            if compressor:
                chunk = compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)
            if split:
                for piece in _split_points(chunk):
                    await response.write(piece)
                    await asyncio.sleep(0)
            else:
                await response.write(chunk)

        start_usage = {**usage, "cache_creation": cache_creation, "output_tokens": 1, "service_tier": "standard"}
        rec["usage"] = {**usage, "cache_creation": cache_creation, "output_tokens": 1}
        trigger = min(2, n - 1)
        try:
            await send(
                sse(
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {
                            "id": "msg_01" + secrets.token_hex(11),
                            "type": "message",
                            "role": "assistant",
                            "model": model,
                            "content": [],
                            "stop_reason": None,
                            "stop_sequence": None,
                            "usage": start_usage,
                        },
                    },
                )
            )
            await send(
                sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                )
            )
            await send(sse("ping", {"type": "ping"}))
            for i in range(n):
                if delay:
                    await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(0)
                await send(DELTAS[i % len(DELTAS)])
                if i != trigger:
                    continue
                if fault == "reset-mid-stream":
                    rec["outcome"] = "reset"
                    request.transport.close()
                    raise asyncio.CancelledError
                if fault == "stall-mid-stream":
                    await self._stall(request, rec)
                if fault == "malformed-sse":
                    await send(
                        b"this line is garbage\n: an SSE comment\n\n"
                        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                        b'"delta":{"type":"text_del\n\n'
                        b'event: fake_unknown_event\ndata: {"type":"fake_unknown_event"}\n\n'
                    )
                if fault == "in-stream-error":
                    await send(
                        sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
                    )
                    rec["outcome"] = "error_event"
                    if compressor:
                        await response.write(compressor.flush())
                    await response.write_eof()
                    return response
            await send(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
            final = {
                "input_tokens": usage["input_tokens"],
                "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
                "cache_read_input_tokens": usage["cache_read_input_tokens"],
                "output_tokens": n,
            }
            await send(
                sse(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                        "usage": final,
                    },
                )
            )
            rec["usage"] = {**usage, "cache_creation": cache_creation}
            await send(sse("message_stop", {"type": "message_stop"}))
            if compressor:
                await response.write(compressor.flush())
            await response.write_eof()
        except (ConnectionError, OSError):
            rec["outcome"] = rec["outcome"] or "client_gone"
            raise asyncio.CancelledError from None
        return response

    async def _stall(self, request: web.Request, rec: dict) -> None:
        """Hang until the client goes away (the handler is then cancelled), at most STALL_S; then hang up."""
        rec["outcome"] = "stalled"
        await asyncio.sleep(STALL_S)
        if request.transport:
            request.transport.close()
        raise asyncio.CancelledError

    async def count_tokens(self, request: web.Request) -> web.Response:
        rec = request[REC]
        account, kind, refused = self._auth_or_error(request)
        if refused:
            return refused
        body = await request.read()
        try:
            payload = json.loads(body)
            assert isinstance(payload, dict)
        except (ValueError, UnicodeDecodeError, RecursionError, AssertionError):
            return self._error(request, 400, "There was an error parsing the body of your request as JSON.")
        for name, typ in (("model", str), ("messages", list)):
            if not isinstance(payload.get(name), typ):
                return self._error(request, 400, f"{name}: Field required")
        with self._lock:
            headers = self._limit_headers(account, kind, time.time(), self._state.limits.get(account), False)
            fault = request.headers.get("x-fake-fault", "").strip()
            if fault:
                rec["fault"] = fault
                refusal = self._status_fault(request, fault, account, kind, time.time(), headers)
                if refusal is not None:
                    return refusal
        n = _int_header(request, "x-fake-input-tokens", max(1, len(body) // 4))
        rec["usage"] = {"input_tokens": n}
        return web.json_response({"input_tokens": n}, headers=headers)

    async def models(self, request: web.Request) -> web.Response:
        account, kind, refused = self._auth_or_error(request)
        if refused:
            return refused
        with self._lock:
            headers = self._limit_headers(account, kind, time.time(), self._state.limits.get(account), False)
        data = [
            {"type": "model", "id": m, "display_name": d, "created_at": c}
            for m, d, c in (
                ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", "2025-09-29T00:00:00Z"),
                ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-01T00:00:00Z"),
                ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
            )
        ]
        return web.json_response(
            {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}, headers=headers
        )

    # --- OAuth -----------------------------------------------------------------------------------

    def _mint(self, account: str) -> dict:
        """Caller holds the lock."""
        access = "sk-ant-oat01-fake-" + secrets.token_urlsafe(32)
        refresh = "sk-ant-ort01-fake-" + secrets.token_urlsafe(32)
        self._state.access_tokens[access] = (account, time.time() + self.token_lifetime)
        self._state.refresh_tokens[refresh] = account
        self._state.latest[account] = {
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": self.token_lifetime,
        }
        return {
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": self.token_lifetime,
            "token_type": "Bearer",
            "scope": "user:inference user:profile",
            "account": {
                "uuid": f"00000000-0000-4000-8000-{hashlib.sha256(account.encode()).hexdigest()[:12]}",
                "email_address": f"{account}@example.com",
            },
            "organization": {"uuid": "00000000-0000-4000-8000-000000000001", "name": "Fake org"},
        }

    @staticmethod
    def _oauth_error(status: int, error: str, description: str) -> web.Response:
        return web.json_response({"error": error, "error_description": description}, status=status)

    async def oauth_token(self, request: web.Request) -> web.Response:
        rec = request[REC]
        try:
            payload = json.loads(await request.read())
            assert isinstance(payload, dict)
        except (ValueError, UnicodeDecodeError, RecursionError, AssertionError):
            return self._oauth_error(400, "invalid_request", "Request body must be JSON")
        grant = payload.get("grant_type")
        if payload.get("client_id") != self.client_id:
            return self._oauth_error(401, "invalid_client", "Client authentication failed")
        if grant not in ("authorization_code", "refresh_token"):
            return self._oauth_error(400, "unsupported_grant_type", f"grant_type {grant!r} is not supported")
        with self._lock:
            if grant == "authorization_code":
                code = self._state.auth_codes.pop(payload.get("code") or "", None)  # single use, even if it fails
                account = code["account"] if code else None
            else:
                old = payload.get("refresh_token") or ""
                account = self._state.refresh_tokens.get(old) or self._state.used_refresh_tokens.get(old)
            if account:
                self._state.token_calls_started[account] = self._state.token_calls_started.get(account, 0) + 1
        rec["claimed_account"] = rec["account"] = account
        if self.token_delay_s:
            await asyncio.sleep(self.token_delay_s)  # cancelled (and nothing done) if the client leaves meanwhile
        with self._lock:
            if account:
                self._state.token_calls[account] = self._state.token_calls.get(account, 0) + 1
            if self.token_fault == "500":
                return web.json_response(
                    {"error": "server_error", "error_description": "Internal server error"}, status=500
                )
            if self.token_fault == "429":
                return web.json_response(
                    {"error": "rate_limited", "error_description": "Too many requests"},
                    status=429,
                    headers={"retry-after": "5"},
                )
            if self.token_fault == "404":  # what console.anthropic.com answers refresh grants now
                return web.json_response(
                    error_body(404, "Not Found", request_id=request[REC]["request_id"]), status=404
                )
            if self.token_fault == "invalid_grant":
                return self._oauth_error(400, "invalid_grant", "Refresh token not found or invalid")
            if grant == "authorization_code":
                if not code:
                    return self._oauth_error(400, "invalid_grant", "Invalid 'code' in request.")
                if payload.get("state") != code["state"]:
                    return self._oauth_error(400, "invalid_grant", "Invalid 'state' in request.")
                if pkce_challenge(str(payload.get("code_verifier") or "")) != code["code_challenge"]:
                    return self._oauth_error(400, "invalid_grant", "Invalid code_verifier (PKCE check failed)")
                if code["redirect_uri"] and payload.get("redirect_uri") != code["redirect_uri"]:
                    return self._oauth_error(400, "invalid_grant", "redirect_uri does not match")
                return web.json_response(self._mint(account))
            if self._state.refresh_tokens.get(old) != account or not account:
                return self._oauth_error(400, "invalid_grant", "Refresh token not found or invalid")
            del self._state.refresh_tokens[old]  # single use: rotated
            self._state.used_refresh_tokens[old] = account
            return web.json_response(self._mint(account))

    def _bearer_account(self, request: web.Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        with self._lock:
            found = self._state.access_tokens.get(token.strip())
            if not found or token.strip() in self._state.revoked or time.time() >= found[1]:
                return None
            return found[0]

    async def create_api_key(self, request: web.Request) -> web.Response:
        account = self._bearer_account(request)
        if not account:
            return self._error(request, 401, "Invalid bearer token")
        request[REC]["account"], request[REC]["auth_kind"] = account, "oauth"
        key = "sk-ant-api03-" + secrets.token_urlsafe(64)[:86] + "AA"
        self.add_api_key(key, account)
        return web.json_response({"raw_key": key})

    async def oauth_usage(self, request: web.Request) -> web.Response:
        account, kind, refused = self._auth_or_error(request)
        if refused:
            return refused
        if kind != "oauth":
            return self._error(request, 401, "OAuth authentication required")
        now = time.time()
        with self._lock:
            reads = [t for t in self._state.usage_reads.get(account, []) if t > now - 3600]
            if len(reads) >= self.usage_budget:  # the hourly budget, shared with the user's Claude Code
                wait = max(1, math.ceil(reads[0] + 3600 - now)) if reads else 3600
                return self._error(request, 429, "Rate limited. Please try again later.", {"retry-after": str(wait)})
            self._state.usage_reads[account] = [*reads, now]
            limit = self._state.limits.get(account)
            windows = {"5h": (10.0, self._started_at + 5 * 3600), "7d": (5.0, self._started_at + 7 * 86400)}
            if limit:
                windows[limit.kind] = (round(100 * limit.utilization, 1), limit.reset_at or now + limit.window_s)
            body = {
                "five_hour": {
                    "utilization": windows["5h"][0],
                    "resets_at": datetime.fromtimestamp(windows["5h"][1], UTC).isoformat(),
                },
                "seven_day": {
                    "utilization": windows["7d"][0],
                    "resets_at": datetime.fromtimestamp(windows["7d"][1], UTC).isoformat(),
                },
                # null when the plan has no such window or pool (parse defensively)
                "seven_day_oauth_apps": None,
                "seven_day_opus": None,
                "seven_day_sonnet": None,
                "extra_usage": None,
                **self._state.usage.get(account, {}),
            }
        return web.json_response(body)

    # --- control over HTTP (for a fake in another process) ---------------------------------------

    def _control(self, action):
        async def handler(request: web.Request) -> web.Response:
            raw = await request.read()
            try:
                data = json.loads(raw) if raw.strip() else {}
                result = action(data)
            except (ValueError, TypeError, KeyError) as e:
                return web.json_response({"ok": False, "error": f"{type(e).__name__}: {e}"}, status=400)
            return web.json_response({"ok": True, **({"result": result} if isinstance(result, dict) else {})})

        return handler

    def _control_revoke(self, data: dict) -> None:
        if data.get("access_token"):
            self.revoke_access_token(data["access_token"])
        if data.get("refresh_token"):
            self.revoke_refresh_token(data["refresh_token"])

    def _control_token(self, data: dict) -> None:
        if "delay_s" in data:
            self.token_delay_s = float(data["delay_s"] or 0)
        if "fault" in data:
            self.token_fault = data["fault"]
        if "lifetime" in data:
            self.token_lifetime = int(data["lifetime"])

    async def _control_requests(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", 0))
        path = request.query.get("path")
        with_body = request.query.get("body") in ("1", "true")
        out = []
        for rec in self.requests[since:]:
            if path and rec["path"] != path:
                continue
            item = {k: v for k, v in rec.items() if k != "body"}
            body = rec["body"] or b""
            item["body_len"] = len(body)
            if with_body:
                item["body_b64"] = base64.b64encode(body).decode()
            out.append(item)
        return web.json_response(out)

    async def _control_stats(self, request: web.Request) -> web.Response:
        stats = self.stats()
        for name in ("by_status",):
            stats[name] = {str(k): v for k, v in stats[name].items()}
        return web.json_response(stats)

    async def _control_token_calls(self, request: web.Request) -> web.Response:
        account = request.query.get("account", "")
        return web.json_response(
            {
                "account": account,
                "calls": self.token_calls(account),
                "started": self.token_calls_started(account),
                "tokens": self.tokens(account),
            }
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Anthropic API + OAuth server on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--config", help="JSON file of credentials, limits, faults (see FakeAnthropic.configure)")
    parser.add_argument("--client-id", default=CLIENT_ID)
    parser.add_argument("--no-record", action="store_true", help="keep counters only (long benchmark / soak runs)")
    args = parser.parse_args(argv)
    fake = FakeAnthropic(port=args.port, record=not args.no_record, client_id=args.client_id)
    if args.config:
        with open(args.config) as f:
            fake.configure(json.load(f))

    async def serve() -> None:
        await fake.start_async()
        if args.port_file:
            tmp = args.port_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(fake.port))
            os.replace(tmp, args.port_file)
        print(f"fake Anthropic listening on {fake.url}", file=sys.stderr, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await fake.stop_async()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
