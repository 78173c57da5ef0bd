"""Anthropic OAuth (contract §3): PKCE log-in with a pasted code, token refresh, API-key minting.

Plain synchronous `requests` calls: the CLI uses them directly, the proxy from a worker thread.
Error messages never include a token; they say what happened and what to do.
"""

import base64
import hashlib
import os
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import requests

from .credentials import Credential

# Claude Code's own production settings (contract §3). console.anthropic.com, the older host,
# answers refresh grants with 404.
CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"  # Claude Code's public client
AUTHORIZE_URLS = {
    "max": "https://claude.com/cai/oauth/authorize",
    "console": "https://platform.claude.com/oauth/authorize",
}
TOKEN_URL = "https://platform.claude.com/v1/oauth/token"
REDIRECT_URI = "https://platform.claude.com/oauth/code/callback"
API_KEY_URL = "https://api.anthropic.com/api/oauth/claude_cli/create_api_key"
_MAX_SCOPES = "user:profile user:inference user:sessions:claude_code user:mcp_servers user:file_upload"
SCOPES = {"max": _MAX_SCOPES, "console": f"org:create_api_key {_MAX_SCOPES}"}
FLOW_LIFETIME = 10 * 60  # an authorization code is only worth pasting for a few minutes
TIMEOUT = 30


class OAuthError(Exception):
    """`kind`: invalid_grant (log in again), network / server (try again later), config (the
    endpoint is not there: a wrong URL, worth retrying only slowly), bad_reply, expired, state."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    @property
    def retryable(self) -> bool:
        return self.kind in ("network", "server", "config")


@dataclass(frozen=True)
class OAuthSettings:
    client_id: str = CLIENT_ID
    token_url: str = TOKEN_URL
    authorize_url_max: str = AUTHORIZE_URLS["max"]
    authorize_url_console: str = AUTHORIZE_URLS["console"]
    redirect_uri: str = REDIRECT_URI
    api_key_url: str = API_KEY_URL

    @classmethod
    def from_env(cls, token_url: str | None = None) -> "OAuthSettings":
        env = os.environ.get
        return cls(
            client_id=env("CLAUDEFLARE_CLIENT_ID") or CLIENT_ID,
            token_url=token_url or env("CLAUDEFLARE_TOKEN_URL") or TOKEN_URL,
            authorize_url_max=env("CLAUDEFLARE_AUTHORIZE_URL") or AUTHORIZE_URLS["max"],
            authorize_url_console=env("CLAUDEFLARE_CONSOLE_AUTHORIZE_URL") or AUTHORIZE_URLS["console"],
            redirect_uri=env("CLAUDEFLARE_REDIRECT_URI") or REDIRECT_URI,
            api_key_url=env("CLAUDEFLARE_API_KEY_URL") or API_KEY_URL,
        )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class LoginFlow:
    """One PKCE authorization: the verifier stays here, the challenge goes in the URL."""

    mode: str
    verifier: str
    state: str
    started: float

    @classmethod
    def start(cls, mode: str) -> "LoginFlow":
        return cls(mode, b64url(secrets.token_bytes(32)), b64url(secrets.token_bytes(32)), time.time())

    @property
    def challenge(self) -> str:
        return b64url(hashlib.sha256(self.verifier.encode()).digest())

    def authorize_url(self, settings: OAuthSettings) -> str:
        base = settings.authorize_url_console if self.mode == "console" else settings.authorize_url_max
        query = {
            "code": "true",
            "client_id": settings.client_id,
            "response_type": "code",
            "redirect_uri": settings.redirect_uri,
            "scope": SCOPES["console" if self.mode == "console" else "max"],
            "code_challenge": self.challenge,
            "code_challenge_method": "S256",
            "state": self.state,
        }
        return f"{base}?{urlencode(query)}"

    def parse_pasted(self, pasted: str) -> str:
        """The code from the page's `CODE#STATE`, once the state is checked."""
        if time.time() - self.started > FLOW_LIFETIME:
            raise OAuthError("expired", "this log-in took too long; run the command again for a fresh link")
        code, sep, state = pasted.strip().partition("#")
        if not code or not sep:
            raise OAuthError("state", "paste the whole string the page shows, CODE#STATE")
        if not secrets.compare_digest(state, self.state):
            raise OAuthError("state", "the pasted code belongs to another log-in attempt; use the link printed above")
        return code


TOKEN_URL_SETTING = "CLAUDEFLARE_TOKEN_URL / claudeflare_token_url"


def _post(url: str, payload: dict, what: str, setting: str = TOKEN_URL_SETTING, headers: dict | None = None) -> dict:
    """`setting`: what moves `url`, named when the URL turns out wrong."""
    try:
        reply = requests.post(url, json=payload, headers=headers, timeout=TIMEOUT)
    except requests.RequestException as e:
        raise OAuthError("network", f"{what}: cannot reach {url} ({type(e).__name__})") from None
    try:
        body = reply.json()
    except ValueError:
        body = {}
    if reply.status_code >= 500 or reply.status_code == 429:
        raise OAuthError("server", f"{what}: {url} answered {reply.status_code}; try again later")
    if reply.status_code == 404:
        # What the old console.anthropic.com host answers: the URL is wrong, the grant may be fine.
        raise OAuthError("config", f"{what}: {url} answers 404, so the URL is wrong; check {setting}")
    if reply.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        if error == "invalid_grant":
            raise OAuthError("invalid_grant", f"{what}: the grant was refused (invalid_grant); log in again")
        kind = (
            error
            if isinstance(error, str)
            else (error or {}).get("type", "error")
            if isinstance(error, dict)
            else "error"
        )
        raise OAuthError("bad_reply", f"{what}: {url} answered {reply.status_code} ({kind})")
    if not isinstance(body, dict):
        raise OAuthError("bad_reply", f"{what}: {url} did not answer with JSON")
    return body


def _credential(body: dict, what: str) -> Credential:
    access, refresh, expires_in = body.get("access_token"), body.get("refresh_token"), body.get("expires_in")
    if not isinstance(access, str) or not access or not isinstance(refresh, str) or not refresh:
        raise OAuthError("bad_reply", f"{what}: the reply has no access and refresh token")
    lifetime = expires_in if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) else 3600
    credential = Credential(access_token=access, refresh_token=refresh, expires_at=time.time() + lifetime)
    if not credential.well_formed:
        raise OAuthError("bad_reply", f"{what}: the reply's tokens are not printable ASCII")
    return credential


def exchange_code(settings: OAuthSettings, flow: LoginFlow, code: str) -> Credential:
    payload = {
        "grant_type": "authorization_code",
        "code": code,
        "state": flow.state,
        "client_id": settings.client_id,
        "redirect_uri": settings.redirect_uri,
        "code_verifier": flow.verifier,
    }
    try:
        return _credential(_post(settings.token_url, payload, "code exchange"), "code exchange")
    except OAuthError as e:
        if e.kind == "invalid_grant":
            raise OAuthError(
                "invalid_grant", "that code was not accepted (wrong, already used or expired); run the command again"
            ) from None
        raise


def refresh_tokens(settings: OAuthSettings, refresh_token: str) -> Credential:
    payload = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": settings.client_id}
    return _credential(_post(settings.token_url, payload, "token refresh"), "token refresh")


def create_api_key(settings: OAuthSettings, access_token: str) -> str:
    body = _post(
        settings.api_key_url,
        {},
        "API key creation",
        "CLAUDEFLARE_API_KEY_URL",
        headers={"authorization": f"Bearer {access_token}"},
    )
    key = body.get("raw_key")
    if not isinstance(key, str) or not key:
        raise OAuthError("bad_reply", "API key creation: the reply has no raw_key")
    return key
