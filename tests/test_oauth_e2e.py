"""OAuth from the user's side: log-in through the CLI, refresh inside real proxies, with the fake OAuth server."""

import contextlib
import io
import json
import signal
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from click.testing import CliRunner

from claudeflare import oauth
from claudeflare.cli import cli
from claudeflare.credentials import CredentialStore

from harness import CLAUDE_CODE_SYSTEM, add_account, claudeflare_proxy, db_rows, free_port, wait_until

MODEL = "claude-sonnet-4-6"


@pytest.fixture
def oauth_env(fake, monkeypatch):
    monkeypatch.setenv("CLAUDEFLARE_TOKEN_URL", f"{fake.url}/v1/oauth/token")
    monkeypatch.setenv("CLAUDEFLARE_API_KEY_URL", f"{fake.url}/api/oauth/claude_cli/create_api_key")
    monkeypatch.setenv("DISPLAY", ":0")  # so the CLI "opens a browser": the Browser below


class Browser:
    """Stands in for the person: opens the link, logs in (the fake issues a code) and pastes CODE#STATE."""

    def __init__(self, fake, account, monkeypatch, paste=None):
        self.fake, self.account, self.paste = fake, account, paste
        self.url = None
        self.pasted = b""
        monkeypatch.setattr("claudeflare.cli.webbrowser.open", self.open)

    def open(self, url):
        self.url = url
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        code = f"code-{self.account}-{time.monotonic_ns()}"
        self.fake.add_auth_code(
            code, account=self.account, state=query["state"], code_challenge=query["code_challenge"]
        )
        self.pasted = ((self.paste or "{code}#{state}").format(code=code, state=query["state"]) + "\n").encode()

    def stdin(self):
        """Standard input whose content exists only once the browser has been opened."""
        browser = self

        class Paste(io.RawIOBase):
            sent = 0

            def readable(self):
                return True

            def readinto(self, buffer):
                data = browser.pasted[self.sent : self.sent + len(buffer)]
                buffer[: len(data)] = data
                self.sent += len(data)
                return len(data)

        return Paste()


def run(home, *args, stdin=None):
    return CliRunner().invoke(cli, ["--home", str(home), *args], input=stdin)


def test_add_max_runs_the_pkce_flow(fake, home, oauth_env, monkeypatch):
    browser = Browser(fake, "my-max", monkeypatch)
    result = run(home, "add", "my-max", "--mode", "max", "--tier", "5", stdin=browser.stdin())
    assert result.exit_code == 0, result.output
    query = parse_qs(urlsplit(browser.url).query)
    assert browser.url.startswith(oauth.AUTHORIZE_URLS["max"])
    assert query["client_id"] == [oauth.CLIENT_ID] and query["code_challenge_method"] == ["S256"]
    assert query["code"] == ["true"] and query["response_type"] == ["code"] and "user:inference" in query["scope"][0]
    assert query["state"][0] != query["code_challenge"][0]
    cred = CredentialStore(home).credentials()["my-max"]
    assert cred.access_token and cred.refresh_token and cred.expires_at > time.time()
    assert cred.access_token not in result.output and cred.refresh_token not in result.output
    assert fake.token_calls("my-max") == 1
    listed = json.loads(run(home, "list", "--json").output)
    assert listed[0]["name"] == "my-max" and listed[0]["tier"] == 5 and listed[0]["state"] == "ok"


def test_add_console_mints_an_api_key(fake, home, oauth_env, monkeypatch, start_proxy):
    browser = Browser(fake, "console", monkeypatch)
    result = run(home, "add", "console", "--mode", "console", stdin=browser.stdin())
    assert result.exit_code == 0, result.output
    assert browser.url.startswith(oauth.AUTHORIZE_URLS["console"])
    cred = CredentialStore(home).credentials()["console"]
    assert cred.api_key.startswith("sk-ant-api03-") and cred.access_token is None
    proxy = start_proxy(home)
    reply = requests.post(
        f"{proxy.url}/v1/messages",
        json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        timeout=10,
    )
    assert reply.status_code == 200 and fake.requests[-1]["headers"]["x-api-key"] == cred.api_key


@pytest.mark.parametrize(
    "paste, message",
    [
        ("wrong-code#{state}", "not accepted"),
        ("{code}#another-state", "belongs to another log-in attempt"),
        ("{code}", "CODE#STATE"),
    ],
)
def test_add_refuses_bad_pastes(fake, home, oauth_env, monkeypatch, paste, message):
    browser = Browser(fake, "m", monkeypatch, paste=paste)
    result = run(home, "add", "m", "--mode", "max", stdin=browser.stdin())
    assert result.exit_code != 0 and message in result.output
    assert "m" not in CredentialStore(home).credentials()


def test_add_refuses_an_expired_flow(fake, home, oauth_env, monkeypatch):
    monkeypatch.setattr(oauth, "FLOW_LIFETIME", -1)
    result = run(home, "add", "m", "--mode", "max", stdin=Browser(fake, "m", monkeypatch).stdin())
    assert result.exit_code != 0 and "took too long" in result.output


def test_add_reports_network_failure(fake, home, oauth_env, monkeypatch):
    monkeypatch.setenv("CLAUDEFLARE_TOKEN_URL", f"http://127.0.0.1:{free_port()}/v1/oauth/token")
    result = run(home, "add", "m", "--mode", "max", stdin=Browser(fake, "m", monkeypatch).stdin())
    assert result.exit_code != 0 and "cannot reach" in result.output


def test_add_refuses_a_duplicate_before_the_log_in(fake, home, oauth_env, monkeypatch):
    add_account(home, "m", "api-key", api_key="sk-ant-api03-already-there")
    browser = Browser(fake, "m", monkeypatch)
    result = run(home, "add", "m", "--mode", "max", stdin=browser.stdin())
    assert result.exit_code != 0 and "already exists" in result.output and browser.url is None


def enrol_oauth(fake, home, name, expires_in, tier=5):
    access, refresh = f"sk-ant-oat01-{name}-{time.monotonic_ns()}", f"sk-ant-ort01-{name}-{time.monotonic_ns()}"
    fake.add_oauth(account=name, access_token=access, refresh_token=refresh, expires_in=expires_in)
    add_account(
        home, name, "max", tier, access_token=access, refresh_token=refresh, expires_at=time.time() + expires_in
    )
    return access, refresh


def test_refresh_command_rotates_and_the_old_refresh_token_dies(fake, home, oauth_env):
    _, old_refresh = enrol_oauth(fake, home, "m", 3600)
    result = run(home, "refresh", "m")
    assert result.exit_code == 0 and "refreshed m" in result.output
    cred = CredentialStore(home).credentials()["m"]
    assert cred.refresh_token != old_refresh and fake.token_calls("m") == 1
    reuse = requests.post(
        f"{fake.url}/v1/oauth/token",
        timeout=5,
        json={"grant_type": "refresh_token", "refresh_token": old_refresh, "client_id": oauth.CLIENT_ID},
    )
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    assert "no account named" in run(home, "refresh", "nobody").output


def ask(proxy, **headers):
    body = {
        "model": MODEL,
        "max_tokens": 5,
        "system": CLAUDE_CODE_SYSTEM,
        "messages": [{"role": "user", "content": "x"}],
    }
    return requests.post(f"{proxy.url}/v1/messages", json=body, headers=headers, timeout=30)


def concurrently(calls) -> list:
    """Run the calls at once, each in its own thread; their results in order."""
    results = [None] * len(calls)

    def run(i):
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_fifty_concurrent_requests_on_an_expired_token_make_one_refresh(fake, home, start_proxy):
    enrol_oauth(fake, home, "m", expires_in=1)
    time.sleep(1.1)
    fake.token_delay_s = 0.5  # keep the refresh in flight while the others arrive
    proxy = start_proxy(home, "--set", f"claudeflare_token_url={fake.url}/v1/oauth/token")
    assert concurrently([lambda: ask(proxy).status_code] * 50) == [200] * 50
    assert fake.token_calls("m") == 1
    stored = CredentialStore(home).credentials()["m"]
    assert {r["headers"]["authorization"] for r in fake.requests if r["path"] == "/v1/messages"} == {
        f"Bearer {stored.access_token}"
    }


def test_two_proxies_sharing_a_home_refresh_once(fake, home, tmp_path):
    enrol_oauth(fake, home, "m", expires_in=1)
    time.sleep(1.1)
    fake.token_delay_s = 0.5
    token_url = ("--set", f"claudeflare_token_url={fake.url}/v1/oauth/token")
    proxies = [claudeflare_proxy(home, fake.url, tmp_path / f"p{i}.log", *token_url).start() for i in range(2)]
    try:
        assert concurrently([lambda p=p: ask(p).status_code for p in proxies * 5]) == [200] * 10
        assert fake.token_calls("m") == 1
    finally:
        for p in proxies:
            p.stop()


def test_invalid_grant_marks_needs_login_while_others_serve(fake, home, start_proxy):
    enrol_oauth(fake, home, "dead", expires_in=1)
    fake.add_api_key("sk-ant-api03-alive-xxxxxxxxxxxx", account="alive")
    add_account(home, "alive", "api-key", 1, api_key="sk-ant-api03-alive-xxxxxxxxxxxx")
    time.sleep(1.1)
    fake.token_fault = "invalid_grant"
    proxy = start_proxy(home, "--set", f"claudeflare_token_url={fake.url}/v1/oauth/token")
    assert [ask(proxy).status_code for _ in range(6)] == [200] * 6
    assert {r["account"] for r in fake.requests if r["path"] == "/v1/messages"} == {"alive"}
    assert CredentialStore(home).credentials()["dead"].needs_login
    assert wait_until(lambda: json.loads(run(home, "list", "--json").output)[0]["state"] == "needs-login")
    assert "log in again" in proxy.output() or "needs a new log-in" in proxy.output()


def test_refresh_failures_back_off_and_the_old_token_keeps_serving(fake, home, start_proxy):
    enrol_oauth(fake, home, "m", expires_in=120)  # inside the 300 s margin: refresh due, token still valid
    fake.token_fault = "500"
    proxy = start_proxy(home, "--set", f"claudeflare_token_url={fake.url}/v1/oauth/token")
    assert [ask(proxy).status_code for _ in range(5)] == [200] * 5
    assert fake.token_calls("m") <= 2  # backed off, not hammered
    assert not CredentialStore(home).credentials()["m"].needs_login


def test_a_401_triggers_one_refresh_and_a_retry(fake, home, start_proxy):
    access, _ = enrol_oauth(fake, home, "m", expires_in=3600)
    fake.revoke_access_token(access)  # upstream stops accepting it before its expiry
    proxy = start_proxy(home, "--set", f"claudeflare_token_url={fake.url}/v1/oauth/token")
    assert ask(proxy).status_code == 200
    assert fake.token_calls("m") == 1
    (row,) = db_rows(home, expect=1)
    assert row["attempts"] == 2 and json.loads(row["failovers"])[0]["reason"] == "auth"


def test_kill_9_during_refresh_leaves_a_working_account(fake, home, tmp_path):
    enrol_oauth(fake, home, "m", expires_in=1)
    time.sleep(1.1)
    fake.token_delay_s = 3
    token_url = ("--set", f"claudeflare_token_url={fake.url}/v1/oauth/token")
    proxy = claudeflare_proxy(home, fake.url, tmp_path / "p1.log", *token_url).start()

    def doomed():
        with contextlib.suppress(requests.ConnectionError):  # its proxy is about to be killed
            ask(proxy)

    threading.Thread(target=doomed, daemon=True).start()
    assert wait_until(lambda: fake.token_calls_started("m") == 1, timeout=10)
    proxy.stop(signal.SIGKILL)
    fake.token_delay_s = 0
    again = claudeflare_proxy(home, fake.url, tmp_path / "p2.log", *token_url).start()
    try:
        assert ask(again).status_code == 200
    finally:
        again.stop()
    json.loads((home / "credentials.json").read_text())  # never torn


def test_login_replaces_a_needs_login_accounts_tokens(fake, home, oauth_env, monkeypatch):
    add_account(
        home,
        "m",
        "max",
        5,
        access_token="sk-ant-oat01-old-token",
        refresh_token="sk-ant-ort01-old-token",
        needs_login=True,
    )
    result = run(home, "login", "m", stdin=Browser(fake, "m", monkeypatch).stdin())
    assert result.exit_code == 0 and "logged in m" in result.output, result.output
    credential = CredentialStore(home).credentials()["m"]
    assert not credential.needs_login and credential.access_token == fake.tokens("m")["access_token"]
