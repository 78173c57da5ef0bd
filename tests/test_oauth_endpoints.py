"""Today's OAuth endpoints (contract §3): the defaults, a token URL that answers 404, and the
invalid_grant race with a refresh token replaced outside the proxy's lock."""

import json
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from click.testing import CliRunner
from mitmproxy.test import taddons
from test_oauth_e2e import enrol_oauth

from claudeflare.cli import cli
from claudeflare.credentials import Credential, CredentialStore
from claudeflare.oauth import LoginFlow, OAuthSettings
from claudeflare.proxy import Claudeflare

from harness import CLAUDE_CODE_SYSTEM, add_account, wait_until

ENV = (
    "CLAUDEFLARE_TOKEN_URL",
    "CLAUDEFLARE_AUTHORIZE_URL",
    "CLAUDEFLARE_CONSOLE_AUTHORIZE_URL",
    "CLAUDEFLARE_REDIRECT_URI",
    "CLAUDEFLARE_CLIENT_ID",
    "CLAUDEFLARE_API_KEY_URL",
)
MAX_SCOPES = "user:profile user:inference user:sessions:claude_code user:mcp_servers user:file_upload"


def test_defaults_are_claude_codes_production_settings(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    settings = OAuthSettings.from_env()
    assert settings.token_url == "https://platform.claude.com/v1/oauth/token"
    assert settings.redirect_uri == "https://platform.claude.com/oauth/code/callback"
    assert settings.client_id == "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    for mode, base, scope in [
        ("max", "https://claude.com/cai/oauth/authorize", MAX_SCOPES),
        ("console", "https://platform.claude.com/oauth/authorize", f"org:create_api_key {MAX_SCOPES}"),
    ]:
        url = LoginFlow.start(mode).authorize_url(settings)
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        assert url.split("?")[0] == base and query["scope"] == scope
        assert query["redirect_uri"] == settings.redirect_uri and query["client_id"] == settings.client_id


def test_the_environment_still_moves_every_endpoint(monkeypatch):
    for name in ENV:
        monkeypatch.setenv(name, f"http://127.0.0.1:9/{name}")
    settings = OAuthSettings.from_env()
    assert (
        settings.token_url,
        settings.authorize_url_max,
        settings.authorize_url_console,
        settings.redirect_uri,
        settings.client_id,
        settings.api_key_url,
    ) == tuple(f"http://127.0.0.1:9/{name}" for name in ENV)


def ask(proxy):
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 5,
        "system": CLAUDE_CODE_SYSTEM,
        "messages": [{"role": "user", "content": "x"}],
    }
    return requests.post(f"{proxy.url}/v1/messages", json=body, timeout=30)


def listed(home) -> dict:
    return json.loads(CliRunner().invoke(cli, ["--home", str(home), "list", "--json"]).output)[0]


@pytest.fixture
def token_url(fake):
    return ("--set", f"claudeflare_token_url={fake.url}/v1/oauth/token")


def test_a_404_from_the_token_url_is_a_configuration_error_not_a_lost_login(fake, home, start_proxy, token_url):
    enrol_oauth(fake, home, "m", expires_in=120)  # inside the 300 s margin: refresh due, token still valid
    fake.token_fault = "404"  # what console.anthropic.com answers refresh grants now
    proxy = start_proxy(home, *token_url)
    assert [ask(proxy).status_code for _ in range(4)] == [200] * 4  # the old token serves meanwhile
    assert fake.token_calls("m") == 1  # backed off, not retried on every request
    assert not CredentialStore(home).credentials()["m"].needs_login
    assert wait_until(lambda: "404" in (listed(home)["reason"] or ""))
    row = listed(home)
    assert row["state"] == "ok" and "CLAUDEFLARE_TOKEN_URL" in row["reason"]
    assert "token URL is wrong" in proxy.output() and "needs a new log-in" not in proxy.output()


def test_refresh_command_reports_a_404_without_losing_the_login(fake, home, monkeypatch):
    monkeypatch.setenv("CLAUDEFLARE_TOKEN_URL", f"{fake.url}/v1/oauth/token")
    _, refresh = enrol_oauth(fake, home, "m", expires_in=3600)
    fake.token_fault = "404"
    result = CliRunner().invoke(cli, ["--home", str(home), "refresh", "m"])
    assert result.exit_code != 0 and "answers 404, so the URL is wrong; check CLAUDEFLARE_TOKEN_URL" in result.output
    stored = CredentialStore(home).credentials()["m"]
    assert not stored.needs_login and stored.refresh_token == refresh


def test_invalid_grant_for_a_token_replaced_meanwhile_is_a_harmless_race(fake, home, start_proxy, token_url):
    _, old_refresh = enrol_oauth(fake, home, "m", expires_in=1)
    time.sleep(1.1)
    fake.token_delay_s = 1.0  # the proxy's refresh waits at the token endpoint while ...
    proxy = start_proxy(home, *token_url)
    replies = []
    client = threading.Thread(target=lambda: replies.append(ask(proxy)))
    client.start()
    assert wait_until(lambda: fake.token_calls_started("m") == 1, timeout=10)
    # ... Claude Code, outside the proxy's lock, rotates the same refresh token and stores the result.
    fresh = fake.add_oauth(account="m")
    fake.revoke_refresh_token(old_refresh)
    CredentialStore(home).set_account(
        "m",
        Credential(
            access_token=fresh["access_token"], refresh_token=fresh["refresh_token"], expires_at=time.time() + 3600
        ),
    )
    client.join(30)
    assert replies and replies[0].status_code == 200
    sent = [r for r in fake.requests if r["path"] == "/v1/messages"]
    assert sent[-1]["headers"]["authorization"] == f"Bearer {fresh['access_token']}"
    stored = CredentialStore(home).credentials()["m"]
    assert not stored.needs_login and stored.refresh_token == fresh["refresh_token"]
    assert ask(proxy).status_code == 200 and listed(home)["state"] == "ok"


def test_list_says_token_expired_once_the_old_token_runs_out_while_refreshes_fail(home):
    add_account(
        home,
        "m",
        "max",
        5,
        access_token="sk-ant-oat01-old",
        refresh_token="sk-ant-ort01-old",
        expires_at=time.time() - 1,
    )
    addon = Claudeflare()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, claudeflare_home=str(home))
        try:
            addon.refresher.failing["m"] = "token refresh failing: token URL answers 404 (check CLAUDEFLARE_TOKEN_URL)"
            (row,) = addon.status_rows()
            assert row["state"] == "token-expired" and "404" in row["reason"]
            addon.refresher.failing.clear()  # refreshes work: an expired token is refreshed on the way
            (row,) = addon.status_rows()
            assert row["state"] == "ok" and row["reason"] is None
        finally:
            addon.watcher.stop()
