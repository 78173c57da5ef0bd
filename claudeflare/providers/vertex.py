"""`vertex`: Claude on Google Vertex AI, authenticated through google-auth.

    [[accounts]]
    name = "vertex"
    provider = "vertex"
    region = "us-east5"                        # default "global"
    project = "my-project"                     # default: the credentials' own project
    credentials_file = "/etc/claudeflare/sa.json"  # a service-account key; default: Application Default Credentials
    priority = 1

The request goes to `…/projects/P/locations/R/publishers/anthropic/models/MODEL:rawPredict` (or
`:streamRawPredict` for `"stream": true`) with the model taken out of the body and
`anthropic_version: vertex-2023-10-16` put in. The reply is Anthropic's (its stream is Anthropic SSE);
Google's errors (`{"error": {"code", "message", "status"}}`) are turned into Anthropic's shape, so a
429 RESOURCE_EXHAUSTED is a rate limit for the account like Anthropic's own. The access token lives
in memory only and goes on the wire only (wire.py), like every credential.
"""

import asyncio
import dataclasses
import json
import re
import secrets
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC

import google.auth
import requests
from google.auth.transport.requests import Request
from google.oauth2 import service_account

from ..credentials import Credential
from . import Destination, Problems, Provider, ProviderError, compatible

ANTHROPIC_VERSION = "vertex-2023-10-16"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
REGION_RE = re.compile(r"[a-z0-9-]{1,40}")
PROJECT_RE = re.compile(r"[a-z][a-z0-9-]{4,61}[a-z0-9]")
DATED = re.compile(r"(claude-[a-z0-9-]+?)-(\d{8})")
# Vertex names a version NAME@DATE; an undated alias is sent as its current version.
VERSIONS = {
    "claude-sonnet-4-5": "claude-sonnet-4-5@20250929",
    "claude-haiku-4-5": "claude-haiku-4-5@20251001",
    "claude-opus-4-5": "claude-opus-4-5@20251101",
    "claude-opus-4-1": "claude-opus-4-1@20250805",
    "claude-opus-4": "claude-opus-4@20250514",
    "claude-sonnet-4": "claude-sonnet-4@20250514",
    "claude-3-5-haiku": "claude-3-5-haiku@20241022",
}
# Google's error status -> Anthropic's error type (contract §4)
ERROR_TYPES = {
    "RESOURCE_EXHAUSTED": "rate_limit_error",
    "PERMISSION_DENIED": "permission_error",
    "NOT_FOUND": "not_found_error",
    "UNAUTHENTICATED": "authentication_error",
    "INVALID_ARGUMENT": "invalid_request_error",
    "UNAVAILABLE": "overloaded_error",
}


@dataclass(frozen=True)
class Settings:
    region: str = "global"
    project: str | None = None
    credentials_file: str | None = None
    base_url: Destination | None = None
    models: tuple[tuple[str, str], ...] = ()  # (glob, Vertex model id) before the built-in names


@dataclass
class Held:
    """One account's google-auth credentials and project, loaded and refreshed in a worker thread."""

    settings: Settings
    credentials: object = None
    project: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def refresh(self) -> None:
        if self.credentials is None:
            if self.settings.credentials_file:
                self.credentials = service_account.Credentials.from_service_account_file(
                    self.settings.credentials_file, scopes=SCOPES
                )
                found = self.credentials.project_id
            else:
                self.credentials, found = google.auth.default(scopes=SCOPES)
            self.project = self.settings.project or found
        session = requests.Session()
        session.trust_env = False  # never through some proxy from the environment
        with session:
            self.credentials.refresh(Request(session))

    def fresh(self) -> bool:
        return self.credentials is not None and self.credentials.valid


class Vertex(Provider):
    name = "vertex"
    keys = frozenset({"region", "project", "credentials_file", "base_url", "models"})
    paths = frozenset({"/v1/messages"})
    own_credentials = True

    def __init__(self) -> None:
        self.held: dict[str, Held] = {}  # account name -> its credentials (on the event loop only)
        self.problems = Problems(self.name)

    def problem(self, account) -> str | None:
        return self.problems.now.get(account.name)

    def parse(self, name: str, table: dict) -> Settings:
        region = table.get("region", "global")
        if not isinstance(region, str) or not REGION_RE.fullmatch(region):
            raise ProviderError(f"'region' must be a Vertex AI region such as us-east5 or global, got {region!r}")
        project = table.get("project")
        if project is not None and (not isinstance(project, str) or not PROJECT_RE.fullmatch(project)):
            raise ProviderError(f"'project' must be a Google Cloud project id, got {project!r}")
        path = table.get("credentials_file")
        if path is not None and (not isinstance(path, str) or not path):
            raise ProviderError("'credentials_file' is the path of a service-account key file")
        base_url = compatible.parse_base_url(table["base_url"]) if "base_url" in table else None
        return Settings(region, project, path, base_url, compatible.parse_models(table.get("models")))

    def table(self, settings: Settings) -> dict:
        given = {
            "region": settings.region,
            "project": settings.project,
            "credentials_file": settings.credentials_file,
            "base_url": settings.base_url and compatible.base_url(settings.base_url),
            "models": dict(settings.models),
        }
        return {k: v for k, v in given.items() if v}

    def vertex_model(self, account, model: str | None) -> str | None:
        if not model:
            return None
        if target := compatible.mapped(account.settings.models, model):
            return target
        if dated := DATED.fullmatch(model):
            return f"{dated.group(1)}@{dated.group(2)}"
        return VERSIONS.get(model, model if model.startswith("claude-") else None)

    def serves(self, account, model: str | None) -> bool:
        return self.vertex_model(account, model) is not None

    def destination(self, account) -> Destination:
        region = account.settings.region
        return account.settings.base_url or Destination(
            "https", "aiplatform.googleapis.com" if region == "global" else f"{region}-aiplatform.googleapis.com", 443
        )

    def rewrites(self, account, state) -> bool:
        return True

    def rewrite(self, account, state, data: dict) -> str:
        model = data.pop("model", None)
        data["anthropic_version"] = ANTHROPIC_VERSION
        method = "streamRawPredict" if data.get("stream") is True else "rawPredict"
        held, region = self.held[account.name], account.settings.region
        # The client's model may reach the URL: quoted, it stays one path segment of this model's.
        vertex_model = urllib.parse.quote(
            self.vertex_model(account, model if isinstance(model, str) else None) or "unknown", safe="@"
        )
        return f"/v1/projects/{held.project}/locations/{region}/publishers/anthropic/models/{vertex_model}:{method}"

    async def credential(self, account, stored: Credential | None = None) -> Credential | None:
        held = self.held.get(account.name)
        if held is None or held.settings != account.settings:
            held = self.held[account.name] = Held(account.settings)
        async with held.lock:  # one refresh at a time; the others wait for its token
            if not held.fresh():
                try:
                    await asyncio.to_thread(held.refresh)
                except Exception as e:  # the file, ADC or the token endpoint: say which kind, never the secret
                    self.problems.note(account.name, f"no token ({type(e).__name__})")
                    held.credentials = None
                    return None
        if not held.project:
            self.problems.note(account.name, "no project: set `project` in accounts.toml")
            return None
        self.problems.note(account.name, None)
        expiry = held.credentials.expiry  # naive UTC, as google-auth keeps it
        return Credential(
            access_token=held.credentials.token, expires_at=expiry.replace(tzinfo=UTC).timestamp() if expiry else None
        )

    def authenticate(self, headers, account, credential, request) -> None:
        for name in ("authorization", "x-api-key"):
            headers.pop(name, None)
        headers["authorization"] = f"Bearer {credential.access_token}"

    def signals(self, response, signals):
        # Vertex says no more than 429 RESOURCE_EXHAUSTED: the account's quota is used up, for now.
        return dataclasses.replace(signals, status="rejected") if response.status_code == 429 else signals

    def reply(self, response) -> None:
        if response.status_code < 400 or response.headers.get("content-type", "").startswith("text/event-stream"):
            return
        try:
            error = json.loads(response.get_content(strict=False) or b"")
            error = (error[0] if isinstance(error, list) else error)["error"]
            status, message = error.get("status"), error.get("message")
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return  # not Google's shape: passed on as it is
        if not isinstance(message, str) or error.get("type"):
            return
        kind = ERROR_TYPES.get(status, "api_error" if response.status_code >= 500 else "invalid_request_error")
        response.headers["content-type"] = "application/json"
        response.content = json.dumps(
            {
                "type": "error",
                "error": {"type": kind, "message": f"Vertex AI: {message}"},
                "request_id": f"req_vertex_{secrets.token_hex(8)}",
            }
        ).encode()
