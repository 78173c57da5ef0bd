"""Keeping OAuth access tokens fresh, from inside the proxy, without blocking its event loop.

Refresh tokens are single-use (contract §3), so every refresh must happen exactly once:
- in one process, concurrent requests for an account await the same refresh task;
- across processes sharing a home, the refresh runs under a per-account file lock and first
  re-reads the store: if another process has refreshed meanwhile, its tokens are used as they are;
- the rotated tokens are written to the store (atomically, fsynced) before anything uses them;
- `invalid_grant` for a refresh token that something else (Claude Code, an older proxy) has
  replaced in the store meanwhile is a harmless race: the stored tokens are used.
"""

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path

from .config import DEFAULT_REFRESH_MARGIN
from .credentials import Credential, CredentialStore
from .oauth import OAuthError, OAuthSettings, refresh_tokens
from .state import SharedState

logger = logging.getLogger(__name__)

MIN_BACKOFF, MAX_BACKOFF = 30.0, 300.0


class TokenRefresher:
    def __init__(self, home: Path, settings: OAuthSettings, margin: float = DEFAULT_REFRESH_MARGIN):
        self.store = CredentialStore(home)
        self.settings = settings
        self.margin = margin  # refresh this many seconds before the token expires
        self._tasks: dict[str, asyncio.Future] = {}
        self._latest: dict[str, Credential] = {}
        self._backoff: dict[str, tuple[float, float]] = {}  # name -> (retry at, current delay)
        self.failing: dict[str, str] = {}  # name -> why its refreshes fail for now (shown by `list`)
        self.failures: dict[str, int] = {}  # name -> refreshes failed in a row, retryably (alerts)
        self.shared = SharedState(home)  # with Redis: a fleet-wide lock, and the token every instance uses

    def needs_refresh(self, credential: Credential, rejected: str | None = None) -> bool:
        if credential.api_key or not credential.refresh_token:
            return False
        if rejected is not None:
            return credential.access_token == rejected
        return not credential.valid_token(margin=self.margin)

    async def fresh(self, name: str, credential: Credential, rejected: str | None = None) -> Credential | None:
        """A credential to send now, refreshing first when needed; None if the account can't serve now.

        `rejected`: an access token upstream just answered 401 to; it is refreshed even if unexpired,
        unless the stored token already differs (someone refreshed it since).
        """
        latest = self._latest.get(name)
        if latest and latest.access_token != rejected and (latest.expires_at or 0) > (credential.expires_at or 0):
            credential = latest  # refreshed here before the pool snapshot caught up
        if not self.needs_refresh(credential, rejected):
            return credential
        retry_at, _ = self._backoff.get(name, (0.0, 0.0))
        if time.time() < retry_at:
            return credential if rejected is None and credential.valid_token() else None
        task = self._tasks.get(name)
        if task is None:
            task = self._tasks[name] = asyncio.ensure_future(asyncio.to_thread(self.refresh_sync, name, rejected))
            task.add_done_callback(lambda t: self._settle(name, t))
        try:
            refreshed = await asyncio.shield(task)
        except Exception:  # _settle logs it; a failed refresh must not fail the request outright
            # The old access token works until it expires: keep using it meanwhile.
            return credential if rejected is None and credential.valid_token() else None
        self._latest[name] = refreshed
        return refreshed

    def _settle(self, name: str, task: asyncio.Future) -> None:
        """Once per refresh, however many requests waited for it."""
        self._tasks.pop(name, None)
        error = None if task.cancelled() else task.exception()
        if error is None:
            self._backoff.pop(name, None)
            self.failing.pop(name, None)
            self.failures.pop(name, None)
        elif isinstance(error, OAuthError) and error.retryable:
            self.failures[name] = self.failures.get(name, 0) + 1
            # Never hammer the token endpoint; a wrong URL is retried as slowly, in case it is fixed.
            delay = min(MAX_BACKOFF, self._backoff.get(name, (0.0, MIN_BACKOFF / 2))[1] * 2)
            self._backoff[name] = (time.time() + delay, delay)
            if error.kind == "config":
                self.failing[name] = "token refresh failing: token URL answers 404 (check CLAUDEFLARE_TOKEN_URL)"
                logger.error(
                    "claudeflare: cannot refresh %s, the token URL is wrong (the login itself is fine), "
                    "retrying in %.0fs: %s",
                    name,
                    delay,
                    error,
                )
            else:
                self.failing[name] = f"token refresh failing ({error.kind}), retrying"
                logger.warning("claudeflare: refreshing %s failed, retrying in %.0fs: %s", name, delay, error)
        else:
            self.failing.pop(name, None)
            self.failures.pop(name, None)
            logger.error("claudeflare: %s needs a new log-in (`claudeflare login %s`): %s", name, name, error)

    def refresh_sync(self, name: str, rejected: str | None = None) -> Credential:
        """Blocking (the proxy runs it in a worker thread). Returns the stored credential after the refresh."""
        with self.store.account_lock(name), self.shared.refresh_lock(name):
            self.shared.adopt_credential(name, self.store)  # another instance may have rotated it
            current = self.store.credentials().get(name)
            if current is None or not current.refresh_token:
                raise OAuthError("invalid_grant", f"no refresh token stored for {name}")
            if current.needs_login:
                raise OAuthError("invalid_grant", f"{name} is waiting for a new log-in")
            if not self.needs_refresh(current, rejected):
                return current  # another process (or an earlier task) refreshed it already
            try:
                new = refresh_tokens(self.settings, current.refresh_token)
            except OAuthError as e:
                if e.kind != "invalid_grant":
                    raise
                # Someone outside our lock (Claude Code itself, an older proxy) may have rotated it.
                stored = self.store.credentials().get(name)
                if (
                    stored
                    and stored.refresh_token
                    and stored.refresh_token != current.refresh_token
                    and not stored.needs_login
                ):
                    logger.info(
                        "claudeflare: the refresh token of %s was replaced meanwhile; using the stored one", name
                    )
                    return stored
                refused = replace(current, needs_login=True)
                self.shared.share_credential(name, refused)
                self.store.set_account(name, refused)
                raise
            # Durable before use: losing the rotated refresh token would lose the account.
            stored = replace(
                current, access_token=new.access_token, refresh_token=new.refresh_token, expires_at=new.expires_at
            )
            self.shared.share_credential(name, stored)
            self.store.set_account(name, stored)
            logger.info("claudeflare: refreshed the token of %s", name)
            return stored
