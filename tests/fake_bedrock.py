"""A stand-in for Claude on Amazon Bedrock, for the tests: `/model/ID/invoke` and
`/model/ID/invoke-with-response-stream`, each request's SigV4 signature checked with botocore's own
signer (the canonical request and string to sign recomputed from what arrived), streams in AWS
event-stream framing (each frame a base64 Anthropic event, CRCs included), Bedrock's JSON errors
with `x-amzn-ErrorType`, a ThrottlingException past a limit."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import secrets
import struct

from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from app_thread import AppThread

AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/bedrock/aws4_request, SignedHeaders=([^,]+), Signature=([0-9a-f]{64})"
)
INVOKE = re.compile(r"/model/([^/]+)/(invoke|invoke-with-response-stream)")
MODELS = {"anthropic.claude-sonnet-4-5-20250929-v1:0", "anthropic.claude-haiku-4-5-20251001-v1:0"}


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (lengths, CRC), string headers, payload, CRC."""
    encoded = b"".join(
        struct.pack("B", len(k)) + k.encode() + b"\x07" + struct.pack(">H", len(v)) + v.encode()
        for k, v in headers.items()
    )
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    message = prelude + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message))


def chunk(event: dict) -> bytes:
    payload = json.dumps({"bytes": base64.b64encode(json.dumps(event).encode()).decode()}).encode()
    return frame({":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}, payload)


def aws_error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response(
        {"message": message},
        status=status,
        headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"},
    )


class FakeBedrock:
    def __init__(self, region: str = "us-east-1", session: bool = True) -> None:
        self.region = region
        self.access_key = "AKIAFAKE" + secrets.token_hex(6).upper()
        self.secret_key = secrets.token_urlsafe(30)
        # signed, not checked: as STS would mint; None: a long-term key pair, which has none
        self.session_token = "FwoGZXIvYXdzEfake" + secrets.token_hex(16) if session else None
        self.requests: list[dict] = []  # path, model, method, body, headers, status
        self.limit: int | None = None  # invocations served before ThrottlingException
        self.port = 0
        self._server: AppThread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        """The standard AWS chain's environment for these credentials."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_SESSION_TOKEN": self.session_token or "",
            "AWS_REGION": self.region,
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def signature_problem(self, request: web.Request, body: bytes) -> str | None:
        found = AUTH.fullmatch(request.headers.get("authorization", ""))
        if not found:
            return "Authorization header requires a SigV4 signature."
        key, day, region, signed, signature = found.groups()
        if key != self.access_key:
            return "The security token included in the request is invalid."
        if region != self.region or not request.headers.get("x-amz-date", "").startswith(day):
            return "Credential should be scoped to a valid region and date."
        names = signed.split(";")
        if "host" not in names or (self.session_token and "x-amz-security-token" not in names):
            return "'Host' and 'X-Amz-Security-Token' must be signed headers."
        recomputed = AWSRequest(
            "POST",
            f"http://{request.headers['host']}{request.raw_path}",
            data=body,
            headers={n: request.headers.get(n, "") for n in names},
        )
        recomputed.context["timestamp"] = request.headers["x-amz-date"]
        signer = SigV4Auth(Credentials(self.access_key, self.secret_key), "bedrock", self.region)
        expected = signer.signature(signer.string_to_sign(recomputed, signer.canonical_request(recomputed)), recomputed)
        if not secrets.compare_digest(expected, signature):
            return "The request signature we calculated does not match the signature you provided."
        return None

    async def invoke(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        found = INVOKE.fullmatch(request.path)  # aiohttp's path is decoded: ':' as sent %3A
        record = {
            "path": request.raw_path,
            "model": found and found.group(1),
            "method": found and found.group(2),
            "body": body,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "status": None,
        }
        self.requests.append(record)
        record["status"], reply = await self.answer(request, record, body)
        return reply

    async def answer(self, request, record, body):
        if problem := self.signature_problem(request, body):
            return 403, aws_error(
                403, "UnrecognizedClientException" if "token" in problem else "InvalidSignatureException", problem
            )
        if not record["model"]:
            return 404, aws_error(404, "UnknownOperationException", "Unknown operation")
        payload = json.loads(body)
        if payload.get("anthropic_version") != "bedrock-2023-05-31" or "model" in payload or "stream" in payload:
            return 400, aws_error(
                400, "ValidationException", "Malformed input request: extraneous key [model] is not permitted"
            )
        if record["model"] not in MODELS:
            return 400, aws_error(400, "ValidationException", "The provided model identifier is invalid.")
        if self.limit is not None and sum(1 for r in self.requests if r["status"] == 200) >= self.limit:
            return 429, aws_error(429, "ThrottlingException", "Too many requests, please wait before trying again.")
        usage = {
            "input_tokens": max(1, len(body) // 4),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 9,
        }
        model = record["model"].removeprefix("anthropic.").removesuffix("-v1:0")
        message = {
            "id": "msg_bdrk_" + secrets.token_hex(8),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "hello from bedrock"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if record["method"] == "invoke":
            return 200, web.json_response(message)
        reply = web.StreamResponse(
            headers={
                "content-type": "application/vnd.amazon.eventstream",
                "x-amzn-bedrock-content-type": "application/json",
            }
        )
        await reply.prepare(request)
        events = [
            {
                "type": "message_start",
                "message": {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}},
            },
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hello "}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "from bedrock"}},
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 9},
            },
            {
                "type": "message_stop",
                "amazon-bedrock-invocationMetrics": {"inputTokenCount": usage["input_tokens"], "outputTokenCount": 9},
            },
        ]
        data = b"".join(chunk(e) for e in events)
        for i in range(0, len(data), 37):  # frames cut anywhere, as TCP may
            await reply.write(data[i : i + 37])
            await asyncio.sleep(0)
        await reply.write_eof()
        return 200, reply

    def __enter__(self) -> FakeBedrock:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.invoke)
        self._server = AppThread(app, "fake-bedrock")
        self.port = self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()
