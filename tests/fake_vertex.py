"""A stand-in for Claude on Google Vertex AI, for the tests: a token endpoint for google-auth's
service-account flow (it checks the RS256 assertion against the key it issued) and
`rawPredict` / `streamRawPredict`, which answer as Vertex does (Anthropic's message and SSE;
Google's error shape, 429 RESOURCE_EXHAUSTED past a limit)."""

from __future__ import annotations

import base64
import json
import re
import secrets
import time

from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from app_thread import AppThread

PREDICT = re.compile(
    r"/v1/projects/([^/]+)/locations/([^/]+)/publishers/anthropic/models/([^/:]+):(rawPredict|streamRawPredict)"
)
MODELS = {"claude-sonnet-4-5@20250929", "claude-haiku-4-5@20251001", "claude-opus-4-1@20250805"}
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # what google-auth signs for, whatever token_uri says
CLIENT_EMAIL = "claudeflare-test@test-project.iam.gserviceaccount.com"


def b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def google_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message, "status": code}}, status=status)


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class FakeVertex:
    def __init__(self, project: str = "test-project") -> None:
        self.project = project
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.tokens: dict[str, float] = {}  # access token -> expiry
        self.token_calls = 0
        self.requests: list[dict] = []  # each predict call: path, model, region, body, headers, status
        self.limit: int | None = None  # predict calls served before 429 RESOURCE_EXHAUSTED
        self.port = 0
        self._server: AppThread | None = None

    # --- what the tests use ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def service_account(self) -> dict:
        """A service-account key file's content whose token_uri is this stand-in."""
        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": "k1",
            "private_key": pem.decode(),
            "client_email": CLIENT_EMAIL,
            "client_id": "1",
            "token_uri": f"{self.url}/token",
        }

    # --- endpoints -------------------------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            head, claims, signature = str(form["assertion"]).split(".")
            self.key.public_key().verify(
                b64decode(signature), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
            claims = json.loads(b64decode(claims))
        except Exception:  # noqa: BLE001 - any bad assertion is the same refusal
            return web.json_response(
                {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, status=400
            )
        if (
            claims.get("iss") != CLIENT_EMAIL
            or claims.get("aud") != GOOGLE_TOKEN_AUDIENCE
            or claims.get("exp", 0) < time.time()
        ):
            return web.json_response({"error": "invalid_grant", "error_description": "Invalid JWT claims."}, status=400)
        self.token_calls += 1
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self.tokens[token] = time.time() + 3600
        return web.json_response({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    async def predict(self, request: web.Request) -> web.StreamResponse:
        found = PREDICT.fullmatch(request.path)
        if not found:
            return google_error(404, "NOT_FOUND", f"The requested URL {request.path} was not found on this server.")
        project, region, model, method = found.groups()
        body = await request.read()
        record = {
            "path": request.path,
            "model": model,
            "region": region,
            "method": method,
            "body": body,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "status": None,
        }
        self.requests.append(record)
        record["status"], reply = await self.answer(request, record, project, model, method, body)
        return reply

    async def answer(self, request, record, project, model, method, body):
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.tokens.get(token, 0) < time.time():
            return 401, google_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.")
        if project != self.project:
            return 403, google_error(403, "PERMISSION_DENIED", f"Permission denied on project {project}.")
        payload = json.loads(body)
        if payload.get("anthropic_version") != "vertex-2023-10-16" or "model" in payload:
            return 400, google_error(
                400, "INVALID_ARGUMENT", "anthropic_version vertex-2023-10-16 is required; the model goes in the URL."
            )
        if model not in MODELS:
            return 404, google_error(404, "NOT_FOUND", f"Publisher Model {model} was not found.")
        served = sum(1 for r in self.requests if r["status"] == 200)
        if self.limit is not None and served >= self.limit:
            return 429, google_error(
                429,
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model.",
            )
        usage = {
            "input_tokens": max(1, len(body) // 4),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 7,
        }
        message = {
            "id": "msg_vrtx_" + secrets.token_hex(8),
            "type": "message",
            "role": "assistant",
            "model": model.split("@")[0],
            "content": [{"type": "text", "text": "hello from vertex"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if method == "rawPredict":
            return 200, web.json_response(message)
        reply = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await reply.prepare(request)
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        for chunk in (
            sse("message_start", {"type": "message_start", "message": start}),
            sse(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "hello from vertex"},
                },
            ),
            sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 7},
                },
            ),
            sse("message_stop", {"type": "message_stop"}),
        ):
            await reply.write(chunk)
        await reply.write_eof()
        return 200, reply

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> FakeVertex:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_post("/{tail:.*}", self.predict)
        self._server = AppThread(app, "fake-vertex")
        self.port = self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()
