"""TokenRefresher against the fake's token endpoint, in this process: no proxy."""

import asyncio
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from claudeflare import oauth, refresh
from claudeflare.credentials import CredentialStore
from claudeflare.oauth import OAuthError, OAuthSettings
from claudeflare.refresh import TokenRefresher

from harness import add_account, free_port

NAME = "max"
EXPIRING = 60  # seconds left: inside the refresh margin (300), yet the old token still works
CONFIG_ERROR = "token refresh failing: token URL answers 404 (check CLAUDEFLARE_TOKEN_URL)"


@pytest.fixture
def clock(monkeypatch):
    """The refresher's clock (its backoff), moved by hand; the credentials keep real time."""
    now = [time.time()]
    monkeypatch.setattr(refresh, "time", SimpleNamespace(time=lambda: now[0]))
    return now


def enrol(fake, home, expires_in=EXPIRING):
    tokens = fake.add_oauth(account=NAME, expires_in=expires_in)
    add_account(
        home,
        NAME,
        "max",
        5,
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
        expires_at=time.time() + expires_in,
    )
    return stored(home)


def stored(home):
    return CredentialStore(home).credentials()[NAME]


def refresher(home, token_url):
    return TokenRefresher(home, OAuthSettings(token_url=token_url))


def fresh(tokens, credential, rejected=None):
    return asyncio.run(tokens.fresh(NAME, credential, rejected))


def test_many_waiters_share_one_refresh_and_the_rotated_tokens_are_stored_first(fake, home):
    old = enrol(fake, home)
    fake.token_delay_s = 0.3  # every waiter arrives while the one refresh is in flight
    tokens = refresher(home, fake.url + "/v1/oauth/token")
    runs = []
    refresh_sync = tokens.refresh_sync
    tokens.refresh_sync = lambda *args: runs.append(args) or refresh_sync(*args)

    async def many():
        return await asyncio.gather(*(tokens.fresh(NAME, old) for _ in range(10)))

    got = asyncio.run(many())
    assert len(runs) == 1  # one worker thread, not ten queueing on the file lock
    assert fake.token_calls(NAME) == 1
    new = stored(home)
    assert got == [new] * 10
    assert new.refresh_token == fake.tokens(NAME)["refresh_token"] != old.refresh_token
    assert new.access_token != old.access_token and new.expires_at > time.time() + 3000
    assert fresh(tokens, old) == new  # the pool's older snapshot is not refreshed again
    assert fake.token_calls(NAME) == 1


def test_a_rejected_token_is_refreshed_unless_the_store_already_has_another(fake, home):
    old = enrol(fake, home, expires_in=3600)
    tokens = refresher(home, fake.url + "/v1/oauth/token")
    assert fresh(tokens, old) == old and fake.token_calls(NAME) == 0  # far from expiry: nothing to do
    new = fresh(tokens, old, rejected=old.access_token)
    assert new.access_token != old.access_token and fake.token_calls(NAME) == 1
    other = refresher(home, fake.url + "/v1/oauth/token")  # another process, a 401 for the same old token
    assert other.refresh_sync(NAME, rejected=old.access_token) == new and fake.token_calls(NAME) == 1


def test_network_errors_back_off_doubling_while_the_old_token_serves(fake, home, clock):
    old = enrol(fake, home)
    tokens = refresher(home, f"http://127.0.0.1:{free_port()}/v1/oauth/token")  # nothing listens there
    assert fresh(tokens, old) == old
    assert tokens.failing[NAME] == "token refresh failing (network), retrying"
    tokens.settings = OAuthSettings(token_url=fake.url + "/v1/oauth/token")
    fake.token_fault = "500"
    for wait, calls in ((29, 0), (2, 1), (59, 1), (2, 2), (119, 2), (2, 3)):  # 30 s, then 60 s, then 120 s
        clock[0] += wait
        assert fresh(tokens, old) == old
        assert fake.token_calls(NAME) == calls, f"after {wait}s more"
    assert tokens.failing[NAME] == "token refresh failing (server), retrying"
    assert fresh(tokens, replace(old, expires_at=time.time() - 1)) is None  # expired, backing off: nothing to send
    fake.token_fault = None
    clock[0] += 241
    new = fresh(tokens, old)
    assert new.access_token != old.access_token and NAME not in tokens.failing
    assert stored(home) == new and not new.needs_login


def test_a_token_url_answering_404_is_a_configuration_error_not_a_lost_login(fake, home, clock):
    old = enrol(fake, home)
    fake.token_fault = "404"
    tokens = refresher(home, fake.url + "/v1/oauth/token")
    assert fresh(tokens, old) == old
    assert tokens.failing[NAME] == CONFIG_ERROR
    assert stored(home) == old and not stored(home).needs_login
    assert fake.tokens(NAME)["refresh_token"] == old.refresh_token  # not spent
    clock[0] += 29
    assert fresh(tokens, old) == old and fake.token_calls(NAME) == 1  # backing off as for network errors
    fake.token_fault = None
    clock[0] += 2
    assert fresh(tokens, old).refresh_token == fake.tokens(NAME)["refresh_token"] != old.refresh_token
    assert NAME not in tokens.failing


def test_invalid_grant_marks_the_account_needs_login_and_keeps_its_refresh_token(fake, home):
    old = enrol(fake, home)
    fake.revoke_refresh_token(old.refresh_token)
    tokens = refresher(home, fake.url + "/v1/oauth/token")
    assert fresh(tokens, old, rejected=old.access_token) is None
    after = stored(home)
    assert after.needs_login and after.refresh_token == old.refresh_token and after.access_token == old.access_token
    assert NAME not in tokens.failing  # no retrying: only a new log-in helps
    with pytest.raises(OAuthError, match="waiting for a new log-in"):
        tokens.refresh_sync(NAME)
    assert fake.token_calls(NAME) == 1  # the refused token is not sent again


def test_invalid_grant_after_another_tool_rotated_the_token_uses_the_stored_one(fake, home, monkeypatch):
    """Claude Code refreshes outside our lock: our refresh token is spent before ours reaches the server."""
    old = enrol(fake, home)
    settings = OAuthSettings(token_url=fake.url + "/v1/oauth/token")

    def after_claude_code_rotated(settings, refresh_token):
        CredentialStore(home).set_account(NAME, oauth.refresh_tokens(settings, refresh_token))
        return oauth.refresh_tokens(settings, refresh_token)  # spent now: invalid_grant

    monkeypatch.setattr(refresh, "refresh_tokens", after_claude_code_rotated)
    got = fresh(TokenRefresher(home, settings), old)
    assert fake.token_calls(NAME) == 2
    assert got == stored(home) and not got.needs_login
    assert got.refresh_token == fake.tokens(NAME)["refresh_token"] != old.refresh_token
