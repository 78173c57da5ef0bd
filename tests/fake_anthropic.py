"""A stand-in for the Anthropic API and OAuth server, following ../shared/reference/anthropic-contract.md.

The real API is out of reach here, so the tests talk to this: Messages (JSON and SSE), count_tokens,
models, per-account rate limits with the real headers, faults (429/529/windowless/spend limit,
in-stream errors, resets, stalls, malformed SSE), and OAuth with rotating single-use refresh tokens.

In-process:   with FakeAnthropic() as fake: fake.add_api_key(...); fake.url; fake.requests
Standalone:   python tests/fake_anthropic.py --port 0 --port-file F [--no-record]   (configure over /_fake/*)
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import secrets
import threading
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
OAUTH_BETA = "oauth-2025-04-20"
STATUS_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
                 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                 529: "overloaded_error"}
TEXT = ["Hel", "lo", " wo", "rld", " — ", "café", " ✓", " ok", "."]


@dataclass
class Limit:
    requests: int
    window_s: float
    reset_at: float | None = None
    served: int = 0


@dataclass
class State:
    api_keys: dict = field(default_factory=dict)  # key -> account
    access_tokens: dict = field(default_factory=dict)  # token -> (account, expires_at)
    refresh_tokens: dict = field(default_factory=dict)  # token -> account (single use)
    revoked: set = field(default_factory=set)
    auth_codes: dict = field(default_factory=dict)  # code -> (account, state, challenge)
    limits: dict = field(default_factory=dict)  # account -> Limit
    faults: dict = field(default_factory=dict)  # account -> [fault, count]
    token_calls: dict = field(default_factory=dict)  # account -> completed refresh/exchange calls
    token_calls_started: dict = field(default_factory=dict)


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def error_body(status: int, message: str, kind: str | None = None, details: dict | None = None) -> dict:
    error = {"type": kind or STATUS_ERRORS.get(status, "api_error"), "message": message}
    if details:
        error["details"] = details
    return {"type": "error", "error": error, "request_id": "req_fake_" + secrets.token_hex(8)}


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class FakeAnthropic:
    def __init__(self, port: int = 0, record: bool = True, client_id: str = CLIENT_ID):
        self.port = port
        self.record = record
        self.client_id = client_id
        self.state = State()
        self.requests: list[dict] = []
        self.served = 0
        self.token_delay_s = 0.0
        self.token_fault: str | None = None  # "500" | "invalid_grant"
        self.token_lifetime = 3600
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # --- configuration (from the test's thread) --------------------------------------------------

    def add_api_key(self, key: str, account: str) -> None:
        self.state.api_keys[key] = account

    def add_oauth(self, account: str, access_token: str, refresh_token: str, expires_in: float = 3600) -> None:
        self.state.access_tokens[access_token] = (account, time.time() + expires_in)
        self.state.refresh_tokens[refresh_token] = account

    def add_auth_code(self, code: str, account: str, state: str, code_challenge: str) -> None:
        self.state.auth_codes[code] = (account, state, code_challenge)

    def revoke_access_token(self, token: str) -> None:
        self.state.revoked.add(token)

    def set_limit(self, account: str, requests: int, window_s: float, reset_in_s: float | None = None) -> None:
        """`requests` per window; the window (and its reset) starts with the account's first request."""
        self.state.limits[account] = Limit(requests, reset_in_s or window_s)

    def set_fault(self, account: str, fault: str, count: int = 1) -> None:
        self.state.faults[account] = [fault, count]

    def clear_faults(self) -> None:
        self.state.faults.clear()

    def token_calls(self, account: str) -> int:
        return self.state.token_calls.get(account, 0)

    def token_calls_started(self, account: str) -> int:
        return self.state.token_calls_started.get(account, 0)

    def reset(self) -> None:
        """Forget everything: credentials, limits, faults, records."""
        self.state = State()
        self.reset_requests()
        self.token_delay_s, self.token_fault = 0.0, None

    def reset_requests(self) -> None:
        self.requests = []
        self.served = 0

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.requests

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/oauth/token", self.token)
        app.router.add_post("/api/oauth/claude_cli/create_api_key", self.create_api_key)
        app.router.add_get("/api/oauth/usage", self.usage)
        app.router.add_route("HEAD", "/", self.head)
        app.router.add_post("/_fake/api_keys", self.control_api_key)
        app.router.add_post("/_fake/oauth", self.control_oauth)
        app.router.add_post("/_fake/limits", self.control_limits)
        app.router.add_post("/_fake/reset", self.control_reset)
        app.router.add_get("/_fake/stats", self.control_stats)
        return app

    async def start_async(self) -> None:
        # handler_cancellation: a request whose client vanished before it was handled is not carried out.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def start(self) -> "FakeAnthropic":
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self.start_async())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-anthropic", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake Anthropic did not start")
        return self

    def close(self) -> None:
        if self._loop:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "FakeAnthropic":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- helpers ---------------------------------------------------------------------------------

    def authenticate(self, request: web.Request) -> tuple[str | None, str | None, str | None]:
        """(account, kind, error message)"""
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if key and auth:
            return None, None, "send either x-api-key or Authorization, not both"
        if key:
            account = self.state.api_keys.get(key)
            return (account, "api_key", None) if account else (None, None, "invalid x-api-key")
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
            found = self.state.access_tokens.get(token)
            if not found or token in self.state.revoked:
                return None, None, "Invalid bearer token"
            account, expires_at = found
            if time.time() >= expires_at:
                return None, None, "OAuth token has expired"
            if OAUTH_BETA not in [b.strip() for b in request.headers.get("anthropic-beta", "").split(",")]:
                return None, None, "OAuth authentication is currently not supported."
            return account, "oauth", None
        return None, None, "x-api-key header is required"

    def limit_headers(self, account: str, kind: str, now: float) -> tuple[dict, bool]:
        """Rate-limit headers for this reply, and whether the account is over its limit."""
        limit = self.state.limits.get(account)
        if limit:
            if limit.reset_at is None or now >= limit.reset_at:
                limit.reset_at, limit.served = now + limit.window_s, 0
            over = limit.served >= limit.requests
            utilization, reset, left = limit.served / limit.requests, limit.reset_at, max(0, limit.requests - limit.served)
            cap = limit.requests
        else:
            over, utilization, reset, left, cap = False, 0.1, now + 5 * 3600, 3999, 4000
        if kind == "api_key":
            return {
                "anthropic-ratelimit-requests-limit": str(cap),
                "anthropic-ratelimit-requests-remaining": str(0 if over else left),
                "anthropic-ratelimit-requests-reset": iso(reset),
                "anthropic-ratelimit-tokens-limit": "400000",
                "anthropic-ratelimit-tokens-remaining": "399000",
                "anthropic-ratelimit-tokens-reset": iso(now + 60),
                **({"retry-after": str(max(1, int(reset - now)))} if over else {}),
            }, over
        status = "rejected" if over else ("allowed_warning" if utilization >= 0.8 else "allowed")
        return {
            "anthropic-ratelimit-unified-status": status,
            "anthropic-ratelimit-unified-reset": str(int(reset)),
            "anthropic-ratelimit-unified-representative-claim": "five_hour",
            "anthropic-ratelimit-unified-5h-status": status,
            "anthropic-ratelimit-unified-5h-utilization": f"{min(utilization, 1.0) if not over else 1.0:.3f}",
            "anthropic-ratelimit-unified-5h-reset": str(int(reset)),
            "anthropic-ratelimit-unified-7d-status": "allowed",
            "anthropic-ratelimit-unified-7d-utilization": "0.050",
            "anthropic-ratelimit-unified-7d-reset": str(int(now + 7 * 86400)),
            "anthropic-ratelimit-unified-overage-status": "rejected",
            "anthropic-ratelimit-unified-overage-disabled-reason": "org_level_disabled",
            **({"retry-after": str(max(1, int(reset - now)))} if over else {}),
        }, over

    def take_fault(self, account: str | None, request: web.Request) -> str | None:
        fault = request.headers.get("x-fake-fault")
        if fault:
            return fault
        queued = self.state.faults.get(account) if account else None
        if queued and queued[1] > 0:
            queued[1] -= 1
            return queued[0]
        return None

    def reply_error(self, status: int, message: str, headers: dict | None = None, **kw) -> web.Response:
        return web.json_response(error_body(status, message, **kw), status=status, headers=headers)

    def new_record(self, request: web.Request, body: bytes) -> dict:
        """Recorded on arrival (a stream in progress is visible); `finish` fills in the outcome."""
        record = {"method": request.method, "path": request.path, "query": request.query_string, "account": None,
                  "auth_kind": None, "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body,
                  "status": None, "usage": None, "started": time.time(), "ended": None, "request_id": None}
        if self.record:
            self.requests.append(record)
        return record

    def finish(self, record: dict, status: int, request_id: str | None = None) -> None:
        record["status"], record["ended"], record["request_id"] = status, time.time(), request_id
        self.served += 1

    # --- API -------------------------------------------------------------------------------------

    async def head(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        record = self.new_record(request, body)
        request_id = "req_fake_" + secrets.token_hex(10)
        base = {"request-id": request_id}
        account, kind, problem = self.authenticate(request)
        record["account"], record["auth_kind"] = account, kind
        if problem:
            self.finish(record, 401, request_id)
            return self.reply_error(401, problem, base)
        try:
            payload = json.loads(body)
            assert isinstance(payload, dict) and isinstance(payload.get("messages"), list)
        except (ValueError, AssertionError):
            self.finish(record, 400, request_id)
            return self.reply_error(400, "messages: invalid JSON body", base)
        now = time.time()
        limits, over = self.limit_headers(account, kind, now)
        headers = {**base, **limits}
        fault = self.take_fault(account, request)
        first_byte = int(request.headers.get("x-fake-first-byte-ms", "0")) / 1000
        if first_byte:
            await asyncio.sleep(first_byte)
        if over:
            self.finish(record, 429, request_id)
            return self.reply_error(429, "Number of requests has exceeded your rate limit", headers)
        if fault and fault.startswith("status:"):
            code = fault.split(":", 1)[1]
            self.finish(record, int(code.split("-")[0]), request_id)
            if code == "429-windowless":
                return self.reply_error(429, "Rate limited", {**base, "retry-after": "1", "x-should-retry": "true"})
            if code == "429":
                reset = int(now + 60)
                return self.reply_error(429, "Rate limited", {**headers, "anthropic-ratelimit-unified-status": "rejected",
                                                              "anthropic-ratelimit-unified-reset": str(reset), "retry-after": "60"})
            status = int(code)
            return self.reply_error(status, STATUS_ERRORS.get(status, "error"), {**headers, "x-should-retry": "true"})
        if fault == "spend-limit":
            self.finish(record, 429, request_id)
            return self.reply_error(429, "Spend limit reached", {**headers, "retry-after": "7200"},
                                    details={"error_code": "enforced_spend_limit_reached"})
        limit = self.state.limits.get(account)
        if limit:
            limit.served += 1
        usage = {
            "input_tokens": max(1, len(body) // 4),
            "cache_creation_input_tokens": int(request.headers.get("x-fake-cache-write", "0")),
            "cache_read_input_tokens": int(request.headers.get("x-fake-cache-read", "0")),
            "output_tokens": min(100_000, int(request.headers.get("x-fake-tokens", "10"))),
        }
        one_hour = int(request.headers.get("x-fake-cache-write-1h", "0"))
        cache_creation = {"ephemeral_5m_input_tokens": usage["cache_creation_input_tokens"] - one_hour,
                          "ephemeral_1h_input_tokens": one_hour}
        record["usage"] = usage
        model = payload.get("model") or "claude-sonnet-4-5-20250929"
        if payload.get("stream") is True:
            return await self.stream(request, record, model, usage, cache_creation, headers, fault)
        text = "".join(TEXT[i % len(TEXT)] for i in range(usage["output_tokens"]))
        message = {"id": "msg_fake_" + secrets.token_hex(8), "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                   "usage": {**usage, "cache_creation": cache_creation}}
        self.finish(record, 200, request_id)
        if fault == "bad-content-length":
            raw = json.dumps(message).encode()
            response = web.StreamResponse(status=200, headers={**headers, "content-type": "application/json",
                                                              "content-length": str(len(raw) + 100)})
            await response.prepare(request)
            await response.write(raw)
            request.transport.close()
            return response
        return web.json_response(message, headers=headers)

    async def stream(self, request, record, model, usage, cache_creation, headers, fault) -> web.StreamResponse:
        gzip = request.headers.get("x-fake-gzip") == "1"
        delay = int(request.headers.get("x-fake-delay-ms", "0")) / 1000
        response = web.StreamResponse(status=200, headers={**headers, "content-type": "text/event-stream",
                                                          "cache-control": "no-cache",
                                                          **({"content-encoding": "gzip"} if gzip else {})})
        await response.prepare(request)
        compressor = zlib.compressobj(wbits=31) if gzip else None

        async def send(chunk: bytes):
            if compressor:
                chunk = compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)
            await response.write(chunk)

        msg_id = "msg_fake_" + secrets.token_hex(8)
        start_usage = {**usage, "output_tokens": 1, "cache_creation": cache_creation}
        await send(sse("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}}))
        await send(sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}}))
        await send(sse("ping", {"type": "ping"}))
        if fault == "stall":
            await asyncio.sleep(60)
        for i in range(usage["output_tokens"]):
            if delay:
                await asyncio.sleep(delay)
            elif i % 50 == 49:
                await asyncio.sleep(0)
            await send(sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": TEXT[i % len(TEXT)]}}))
            if i == 2 and fault == "reset-mid-stream":
                request.transport.close()
                self.finish(record, 200)
                return response
            if i == 2 and fault == "malformed-sse":
                await send(b"garbage without a colon\ndata: {\"type\": \"message_delta\", \"usage\": {\"output_tok\n\nevent: \xff\xfe\n\n")
            if i == 2 and fault == "in-stream-error":
                await send(sse("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
                self.finish(record, 200)
                if compressor:
                    await response.write(compressor.flush())
                await response.write_eof()
                return response
        await send(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        await send(sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                         "usage": {**usage}}))
        await send(sse("message_stop", {"type": "message_stop"}))
        if compressor:
            await response.write(compressor.flush())
        await response.write_eof()
        self.finish(record, 200, headers.get("request-id"))
        return response

    async def count_tokens(self, request: web.Request) -> web.Response:
        body = await request.read()
        record = self.new_record(request, body)
        account, kind, problem = self.authenticate(request)
        record["account"], record["auth_kind"] = account, kind
        if problem:
            self.finish(record, 401)
            return self.reply_error(401, problem)
        self.finish(record, 200)
        return web.json_response({"input_tokens": max(1, len(body) // 4)})

    async def models(self, request: web.Request) -> web.Response:
        record = self.new_record(request, b"")
        account, kind, problem = self.authenticate(request)
        record["account"], record["auth_kind"] = account, kind
        if problem:
            self.finish(record, 401)
            return self.reply_error(401, problem)
        self.finish(record, 200)
        data = [{"type": "model", "id": m, "display_name": m, "created_at": "2025-09-29T00:00:00Z"}
                for m in ("claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001", "claude-opus-4-1-20250805")]
        return web.json_response({"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]})

    # --- OAuth -----------------------------------------------------------------------------------

    def mint(self, account: str) -> dict:
        access, refresh = "sk-ant-oat01-fake-" + secrets.token_hex(16), "sk-ant-ort01-fake-" + secrets.token_hex(16)
        self.add_oauth(account, access, refresh, self.token_lifetime)
        return {"access_token": access, "refresh_token": refresh, "expires_in": self.token_lifetime,
                "token_type": "Bearer", "scope": "user:inference user:profile"}

    async def token(self, request: web.Request) -> web.Response:
        try:
            payload = await request.json()
        except ValueError:
            return web.json_response({"error": "invalid_request"}, status=400)
        grant = payload.get("grant_type")
        if payload.get("client_id") != self.client_id:
            return web.json_response({"error": "invalid_client"}, status=401)
        if grant == "authorization_code":
            found = self.state.auth_codes.pop(payload.get("code"), None)
            if not found:
                return web.json_response({"error": "invalid_grant", "error_description": "unknown or used code"}, status=400)
            account, state, challenge = found
            verifier = payload.get("code_verifier") or ""
            computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if payload.get("state") != state or computed != challenge:
                return web.json_response({"error": "invalid_grant", "error_description": "PKCE or state mismatch"}, status=400)
            self.state.token_calls[account] = self.state.token_calls.get(account, 0) + 1
            return web.json_response(self.mint(account))
        if grant == "refresh_token":
            old = payload.get("refresh_token")
            account = self.state.refresh_tokens.get(old)
            if account:
                self.state.token_calls_started[account] = self.state.token_calls_started.get(account, 0) + 1
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)  # cancelled if the client goes away meanwhile
            if self.token_fault == "500":
                if account:
                    self.state.token_calls[account] = self.state.token_calls.get(account, 0) + 1
                return web.json_response({"error": "server_error"}, status=500)
            if not account or self.token_fault == "invalid_grant" or self.state.refresh_tokens.get(old) != account:
                return web.json_response({"error": "invalid_grant", "error_description": "Refresh token not found or invalid"}, status=400)
            del self.state.refresh_tokens[old]  # single use: rotated
            self.state.token_calls[account] = self.state.token_calls.get(account, 0) + 1
            return web.json_response(self.mint(account))
        return web.json_response({"error": "unsupported_grant_type"}, status=400)

    async def create_api_key(self, request: web.Request) -> web.Response:
        auth = request.headers.get("authorization", "")
        found = self.state.access_tokens.get(auth[7:].strip()) if auth.lower().startswith("bearer ") else None
        if not found or time.time() >= found[1]:
            return self.reply_error(401, "Invalid bearer token")
        key = "sk-ant-api03-fake-" + secrets.token_hex(20)
        self.add_api_key(key, found[0])
        return web.json_response({"raw_key": key})

    async def usage(self, request: web.Request) -> web.Response:
        account, kind, problem = self.authenticate(request)
        if problem or kind != "oauth":
            return self.reply_error(401, problem or "OAuth token required")
        limit = self.state.limits.get(account)
        utilization = 100 * (limit.served / limit.requests) if limit else 10.0
        return web.json_response({"five_hour": {"utilization": utilization, "resets_at": iso(time.time() + 3600)},
                                  "seven_day": {"utilization": 5.0, "resets_at": iso(time.time() + 86400)}})

    # --- control over HTTP (for a fake in another process) ---------------------------------------

    async def control_api_key(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.add_api_key(data["key"], data["account"])
        return web.json_response({"ok": True})

    async def control_oauth(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.add_oauth(data["account"], data["access_token"], data["refresh_token"], data.get("expires_in", 3600))
        return web.json_response({"ok": True})

    async def control_limits(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.set_limit(data["account"], data["requests"], data["window_s"], data.get("reset_in_s"))
        return web.json_response({"ok": True})

    async def control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def control_stats(self, request: web.Request) -> web.Response:
        return web.json_response({"served": self.served})


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake Anthropic API on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--no-record", action="store_true", help="keep counters only (for long benchmark runs)")
    args = parser.parse_args()
    fake = FakeAnthropic(port=args.port, record=not args.no_record)

    async def serve():
        await fake.start_async()
        if args.port_file:
            with open(args.port_file + ".tmp", "w") as f:
                f.write(str(fake.port))
            os.replace(args.port_file + ".tmp", args.port_file)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
