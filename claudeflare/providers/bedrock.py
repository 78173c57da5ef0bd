"""`bedrock`: Claude on Amazon Bedrock, signed with SigV4 by botocore.

    [[accounts]]
    name = "aws"
    provider = "bedrock"
    region = "us-east-1"       # default: the AWS chain's (AWS_REGION, ~/.aws/config)
    profile = "claude"         # default: the AWS chain's default credentials
    priority = 1

Credentials are the account's stored key pair (`claudeflare add … --aws-key-pair`, kept in
credentials.json) or else botocore's standard chain (environment, shared files, SSO, instance roles),
kept in memory and refreshed by botocore. The model goes in the URL (`/model/ID/invoke`, or
`/invoke-with-response-stream` for `"stream": true`), mapped to Bedrock's ids by a built-in table
that `models` overrides; the body gets `anthropic_version: bedrock-2023-05-31` instead of `model`
and `stream`. A streamed reply comes in AWS event-stream framing: each frame is turned into the
Anthropic SSE event it carries as it arrives (`EventStreamToSSE`, the flow's stream callback).
Bedrock's errors reach the client in Anthropic's shape; a ThrottlingException limits the account.
"""

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import urllib.parse
import weakref
from dataclasses import dataclass, field

import botocore.credentials
import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.eventstream import EventStreamBuffer

from ..credentials import Credential
from ..offloop import off_loop
from . import Destination, Problems, Provider, ProviderError, compatible

logger = logging.getLogger(__name__)
logging.getLogger("botocore").setLevel(logging.WARNING)  # its debug log prints canonical requests, tokens included

ANTHROPIC_VERSION = "bedrock-2023-05-31"
EVENT_STREAM = "application/vnd.amazon.eventstream"
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")
PROFILE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
DATED = re.compile(r"claude-[a-z0-9-]+-\d{8}")
VERSIONS = {  # an alias -> the version Bedrock serves it as
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-opus-4-5": "claude-opus-4-5-20251101",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-opus-4": "claude-opus-4-20250514",
    "claude-sonnet-4": "claude-sonnet-4-20250514",
    "claude-3-5-haiku": "claude-3-5-haiku-20241022",
}
# x-amzn-errortype (or an exception frame's :exception-type) -> Anthropic's error type
ERROR_TYPES = {
    "throttlingexception": "rate_limit_error",
    "servicequotaexceededexception": "rate_limit_error",
    "accessdeniedexception": "permission_error",
    "resourcenotfoundexception": "not_found_error",
    "validationexception": "invalid_request_error",
    "modelnotreadyexception": "overloaded_error",
    "serviceunavailableexception": "overloaded_error",
    "unrecognizedclientexception": "authentication_error",
    "modeltimeoutexception": "api_error",
    "internalserverexception": "api_error",
    "modelstreamerrorexception": "api_error",
}


@dataclass(frozen=True)
class Settings:
    region: str | None = None
    profile: str | None = None
    base_url: Destination | None = None
    models: tuple[tuple[str, str], ...] = ()  # (glob, Bedrock model id) before the built-in names


@dataclass
class Held:
    """One account's botocore credentials and region, found in a worker thread."""

    settings: Settings
    stored: Credential | None = None  # the account's stored key pair, if it has one
    # botocore Credentials (refreshable ones refresh themselves); out of repr, which would show the secret
    credentials: object = field(default=None, repr=False)
    region: str | None = None
    signing: object = field(default=None, repr=False)  # the frozen credentials of the latest attempt
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def find(self) -> None:
        session = botocore.session.Session(profile=self.settings.profile)
        self.region = self.settings.region or session.get_config_variable("region") or os.environ.get("AWS_REGION")
        if self.stored:
            self.credentials = botocore.credentials.Credentials(
                self.stored.aws_access_key_id, self.stored.aws_secret_access_key
            )
        else:
            self.credentials = session.get_credentials()

    def frozen(self):
        """Frozen credentials: a refreshable set may refresh, which blocks (so: off the loop)."""
        return self.credentials.get_frozen_credentials()


def error_type(name: str | None) -> str:
    return ERROR_TYPES.get((name or "").split(":")[0].lower(), "api_error")


def anthropic_error(kind: str, message: str) -> dict:
    return {
        "type": "error",
        "error": {"type": kind, "message": f"Amazon Bedrock: {message}"},
        "request_id": f"req_bedrock_{secrets.token_hex(8)}",
    }


class EventStreamToSSE:
    """The stream callback: AWS event-stream frames in, Anthropic SSE out, frame by frame as they
    arrive (a frame cut between chunks waits for its rest). botocore's decoder checks each CRC."""

    def __init__(self) -> None:
        self.buffer = EventStreamBuffer()
        self.failed = False

    def __call__(self, chunk: bytes) -> bytes | list:
        """SSE for the frames completed by `chunk`; [] while none is (mitmproxy would send b"" as an
        empty chunk, which ends a chunked reply)."""
        if self.failed or not chunk:
            return []
        self.buffer.add_data(chunk)
        out = bytearray()
        try:
            for message in self.buffer:
                out += self.frame(message.headers, message.payload)
        except Exception:  # a torn or forged frame: say so in the stream, then stop reading
            self.failed = True
            logger.warning("claudeflare: unreadable event stream from Bedrock")
            out += sse("error", anthropic_error("api_error", "unreadable event stream"))
        return bytes(out) or []

    @staticmethod
    def frame(headers: dict, payload: bytes) -> bytes:
        if headers.get(":message-type") == "exception" or headers.get(":message-type") == "error":
            name = headers.get(":exception-type") or headers.get(":error-code")
            try:
                message = json.loads(payload).get("message") or name
            except (ValueError, AttributeError):
                message = name
            return sse("error", anthropic_error(error_type(name), str(message)))
        if headers.get(":event-type") != "chunk":
            return b""
        event = json.loads(base64.b64decode(json.loads(payload)["bytes"]))
        event.pop("amazon-bedrock-invocationMetrics", None)
        return sse(event.get("type", "unknown"), event)


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def sha256_hex(body: bytes, yielding: bool = False) -> str:
    return hashlib.sha256(body).hexdigest()  # hashlib lets go of the GIL on a big body


class Signer(SigV4Auth):
    """botocore's SigV4, with the payload's digest given (hashed off the loop) when it is known."""

    def __init__(self, credentials, service: str, region: str, digest: str | None) -> None:
        super().__init__(credentials, service, region)
        self.digest = digest

    def payload(self, request) -> str:
        return self.digest or super().payload(request)


class Bedrock(Provider):
    name = "bedrock"
    keys = frozenset({"region", "profile", "base_url", "models"})
    paths = frozenset({"/v1/messages"})
    own_credentials = True

    def __init__(self) -> None:
        self.held: dict[str, Held] = {}  # account name -> its credentials (on the event loop only)
        self.problems = Problems(self.name)
        # request -> (the body, its SHA-256): hashed by `prepare`, off the loop when big
        self.digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def problem(self, account) -> str | None:
        return self.problems.now.get(account.name)

    def parse(self, name: str, table: dict) -> Settings:
        region = table.get("region")
        if region is not None and (not isinstance(region, str) or not REGION_RE.fullmatch(region)):
            raise ProviderError(f"'region' must be an AWS region such as us-east-1, got {region!r}")
        profile = table.get("profile")
        if profile is not None and (not isinstance(profile, str) or not PROFILE_RE.fullmatch(profile)):
            raise ProviderError(f"'profile' must be an AWS profile name, got {profile!r}")
        base_url = compatible.parse_base_url(table["base_url"]) if "base_url" in table else None
        return Settings(region, profile, base_url, compatible.parse_models(table.get("models")))

    def table(self, settings: Settings) -> dict:
        given = {
            "region": settings.region,
            "profile": settings.profile,
            "base_url": settings.base_url and compatible.base_url(settings.base_url),
            "models": dict(settings.models),
        }
        return {k: v for k, v in given.items() if v}

    def bedrock_model(self, account, model: str | None) -> str | None:
        if not model:
            return None
        if target := compatible.mapped(account.settings.models, model):
            return target
        dated = model if DATED.fullmatch(model) else VERSIONS.get(model)
        return f"anthropic.{dated}-v1:0" if dated else None

    def serves(self, account, model: str | None) -> bool:
        return self.bedrock_model(account, model) is not None

    def destination(self, account) -> Destination:
        held = self.held.get(account.name)
        region = account.settings.region or (held.region if held else None) or "us-east-1"
        return account.settings.base_url or Destination("https", f"bedrock-runtime.{region}.amazonaws.com", 443)

    def rewrites(self, account, state) -> bool:
        return True

    def rewrite(self, account, state, data: dict) -> str:
        model = data.pop("model", None)
        stream = data.pop("stream", None) is True
        data["anthropic_version"] = ANTHROPIC_VERSION
        target = self.bedrock_model(account, model if isinstance(model, str) else None) or "unknown"
        return f"/model/{urllib.parse.quote(target, safe='')}/{'invoke-with-response-stream' if stream else 'invoke'}"

    async def credential(self, account, stored: Credential | None = None) -> Credential | None:
        if stored and not (stored.aws_access_key_id or stored.aws_secret_access_key):
            stored = None  # holds no key pair: the chain's
        if stored and not (stored.aws_access_key_id and stored.aws_secret_access_key and stored.well_formed):
            self.problems.note(account.name, "malformed stored AWS key pair")
            return None
        held = self.held.get(account.name)
        if held is None or held.settings != account.settings or held.stored != stored:
            held = self.held[account.name] = Held(account.settings, stored)
        async with held.lock:
            try:
                if held.credentials is None:
                    await asyncio.to_thread(held.find)
                frozen = await asyncio.to_thread(held.frozen) if held.credentials else None
            except Exception as e:  # the chain or a refresh: say which kind, never the secret
                self.problems.note(account.name, f"no AWS credentials ({type(e).__name__})")
                held.credentials = None
                return None
        if frozen is None or not held.region:
            self.problems.note(account.name, "no region: set `region`" if frozen else "no AWS credentials found")
            return None
        self.problems.note(account.name, None)
        held.signing = frozen
        return Credential()  # the secret stays with botocore's credentials: `authenticate` signs with them

    async def prepare(self, request) -> None:
        body = request.raw_content or b""
        self.digests[request] = (body, await off_loop(sha256_hex, body=body))

    def authenticate(self, headers, account, credential, request) -> None:
        held = self.held[account.name]
        for name in ("authorization", "x-api-key", "x-amz-date", "x-amz-security-token"):
            headers.pop(name, None)
        signed = AWSRequest(
            "POST",
            f"{request.scheme}://{request.host_header or request.host}{request.path}",
            data=request.raw_content or b"",
            headers={
                "content-type": headers.get("content-type", "application/json"),
                "accept": headers.get("accept", "*/*"),
            },
        )
        body, digest = self.digests.get(request, (None, None))
        Signer(held.signing, "bedrock", held.region, digest if body is request.raw_content else None).add_auth(signed)
        for name in ("authorization", "x-amz-date", "x-amz-security-token", "accept", "content-type"):
            if name in signed.headers:
                headers[name] = signed.headers[name]

    def signals(self, response, signals):
        throttled = response.status_code == 429 or "throttling" in response.headers.get("x-amzn-errortype", "").lower()
        return dataclasses.replace(signals, status="rejected") if throttled else signals

    def stream(self, response):
        if response.status_code == 200 and response.headers.get("content-type", "").startswith(EVENT_STREAM):
            response.headers["content-type"] = "text/event-stream"
            response.headers.pop("content-length", None)
            return EventStreamToSSE()
        return None

    def reply(self, response) -> None:
        if response.headers.get("content-type", "").startswith(EVENT_STREAM) and response.raw_content is not None:
            response.headers["content-type"] = "text/event-stream"  # a retry's stream, fetched whole
            response.content = bytes(EventStreamToSSE()(response.raw_content))
            return
        if response.status_code < 400 or response.headers.get("content-type", "").startswith("text/event-stream"):
            return
        try:
            data = json.loads(response.get_content(strict=False) or b"")
            message = data.get("message") or data.get("Message")
        except (ValueError, AttributeError):
            return
        if not isinstance(message, str) or data.get("type") == "error":
            return
        response.headers["content-type"] = "application/json"
        response.content = json.dumps(
            anthropic_error(error_type(response.headers.get("x-amzn-errortype")), message)
        ).encode()
