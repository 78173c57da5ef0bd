"""Accounts from the browser (`/-/claudeflare/accounts`): the dashboard's plugin route in Datasette's test
client, with the metadata, plugins and environment `claudeflare dashboard` uses, against the fake OAuth server."""

import asyncio
import re
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from click.testing import CliRunner
from datasette.app import Datasette
from test_dashboard import PASSWORD, metadata

from claudeflare import oauth
from claudeflare.accounts import load_accounts
from claudeflare.cli import DASHBOARD_PLUGINS, METADATA, cli, dashboard_command, dashboard_settings
from claudeflare.credentials import CredentialStore
from claudeflare.flowlog import open_db

from harness import add_account

PAGE = "/-/claudeflare/accounts"
KEY = "sk-ant-api03-from-the-browser-0123456789abcdef"


@pytest.fixture
def dashboard(home, monkeypatch, fake):
    """A Datasette started as `claudeflare dashboard` starts it (its environment included)."""
    result = CliRunner().invoke(cli, ["--home", str(home), "dashboard-password"], input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    open_db(home / "claudeflare.db").close()
    _, env = dashboard_command(home, "127.0.0.1", 8001, METADATA)
    for name in ("CLAUDEFLARE_DASHBOARD_PASSWORD_HASH", "CLAUDEFLARE_DASHBOARD_PUBLIC", "CLAUDEFLARE_HOME"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("CLAUDEFLARE_TOKEN_URL", f"{fake.url}/v1/oauth/token")
    monkeypatch.setenv("CLAUDEFLARE_API_KEY_URL", f"{fake.url}/api/oauth/claude_cli/create_api_key")
    return Datasette(
        [str(home / "claudeflare.db")],
        metadata=metadata(),
        plugins_dir=str(DASHBOARD_PLUGINS),
        settings=dashboard_settings(),
    )


class Browser:
    """A logged-in session: cookies kept, each form posted with the page's CSRF token; every reply kept."""

    def __init__(self, ds):
        self.ds, self.cookies, self.replies = ds, {}, []

    async def get(self, path):
        reply = await self.ds.client.get(path, cookies=self.cookies)
        self.keep(reply)
        return reply

    async def post(self, path, data, csrf=True):
        if csrf:
            page = await self.get(PAGE)
            data = {"csrftoken": re.search(r'name="csrftoken" value="([^"]+)"', page.text)[1], **data}
        reply = await self.ds.client.post(path, data=data, cookies=self.cookies)
        self.keep(reply)
        return reply

    def keep(self, reply):
        self.replies.append(reply)
        self.cookies.update({k: v for k, v in reply.cookies.items()})

    async def login(self):
        page = await self.get("/-/login")
        token = re.search(r'name="csrftoken" value="([^"]+)"', page.text)[1]
        reply = await self.ds.client.post(
            "/-/login", data={"username": "admin", "password": PASSWORD, "csrftoken": token}, cookies=self.cookies
        )
        assert reply.status_code == 302
        self.keep(reply)
        return self

    def seen(self) -> str:
        return "\n".join(f"{r.status_code} {r.headers} {r.text}" for r in self.replies)


def run(coro):
    return asyncio.run(coro)


def test_add_an_api_key_then_remove_it(dashboard, home):
    async def go():
        browser = await Browser(dashboard).login()
        reply = await browser.post(f"{PAGE}/add-key", {"name": "web-key", "tier": "5", "priority": "2", "key": KEY})
        assert reply.status_code == 302 and reply.headers["location"] == PAGE
        listed = await browser.get(PAGE)
        assert "added web-key (api-key, tier 5)" in listed.text and 'data-account="web-key"' in listed.text
        confirm = await browser.post(f"{PAGE}/remove", {"name": "web-key"})
        assert confirm.status_code == 200 and "Remove the account <strong>web-key</strong>" in confirm.text
        assert [a.name for a in load_accounts(home).accounts] == ["web-key"]  # not before the confirmation
        account = load_accounts(home).accounts[0]
        assert (account.mode, account.tier, account.priority) == ("api-key", 5, 2)
        assert CredentialStore(home).credentials()["web-key"].api_key == KEY
        removed = await browser.post(f"{PAGE}/remove", {"name": "web-key", "confirm": "yes"})
        assert removed.status_code == 302
        assert "removed web-key" in (await browser.get(PAGE)).text
        assert KEY not in browser.seen()
        return browser

    run(go())
    assert load_accounts(home).accounts == ()
    assert "web-key" not in CredentialStore(home).credentials()


@pytest.mark.parametrize(
    "form, message",
    [
        ({"name": "bad name", "key": KEY}, "invalid name"),
        ({"name": "k", "key": KEY + " \r\nX-Injected: 1"}, "does not look like an API key"),
        ({"name": "k", "tier": "3", "key": KEY}, "tier must be 1, 5, 20"),
        ({"name": "k", "priority": "high", "key": KEY}, "whole numbers"),
    ],
)
def test_a_refused_form_says_why_and_never_shows_the_key_again(dashboard, home, form, message):
    async def go():
        browser = await Browser(dashboard).login()
        reply = await browser.post(f"{PAGE}/add-key", form)
        assert reply.status_code == 400 and message in reply.text
        assert KEY not in reply.text and 'name="key" type="password"' in reply.text
        assert re.search(r'name="key" type="password" autocomplete="off" required>', reply.text)  # empty again

    run(go())
    assert not (home / "accounts.toml").exists()


def test_a_duplicate_keeps_the_first_key(dashboard, home):
    async def go():
        browser = await Browser(dashboard).login()
        assert (await browser.post(f"{PAGE}/add-key", {"name": "k", "key": KEY})).status_code == 302
        reply = await browser.post(f"{PAGE}/add-key", {"name": "k", "key": KEY + "-other"})
        assert reply.status_code == 400 and "already exists" in reply.text

    run(go())
    assert CredentialStore(home).credentials()["k"].api_key == KEY


def issue_code(fake, authorize_url, account):
    """What the person's log-in does: the fake OAuth server issues a code for this link's PKCE challenge."""
    query = {k: v[0] for k, v in parse_qs(urlsplit(authorize_url).query).items()}
    code = f"code-{account}-{time.monotonic_ns()}"
    fake.add_auth_code(code, account=account, state=query["state"], code_challenge=query["code_challenge"])
    return f"{code}#{query['state']}"


def link_and_login(page) -> tuple[str, str]:
    url = re.search(r'<a id="authorize" href="([^"]+)"', page.text)[1].replace("&amp;", "&")
    return url, re.search(r'name="login" value="([^"]+)"', page.text)[1]


@pytest.mark.parametrize("mode", ["max", "console"])
def test_oauth_log_in_from_the_page(dashboard, home, fake, mode):
    async def go():
        browser = await Browser(dashboard).login()
        started = await browser.post(f"{PAGE}/oauth/start", {"name": "sub", "mode": mode, "tier": "20"})
        assert started.status_code == 200
        url, login = link_and_login(started)
        assert url.startswith(oauth.AUTHORIZE_URLS[mode]) and "code_challenge=" in url
        pasted = issue_code(fake, url, "sub")
        # A typo in the paste keeps the log-in open; the right paste then finishes it.
        typo = await browser.post(f"{PAGE}/oauth/finish", {"login": login, "code": pasted.replace("#", "#x")})
        assert typo.status_code == 400 and "another log-in attempt" in typo.text and login in typo.text
        done = await browser.post(f"{PAGE}/oauth/finish", {"login": login, "code": pasted})
        assert done.status_code == 302, done.text
        assert f"added sub ({mode}, tier 20)" in (await browser.get(PAGE)).text
        again = await browser.post(f"{PAGE}/oauth/finish", {"login": login, "code": pasted})  # single use
        assert again.status_code == 400 and "expired or was finished" in again.text
        return browser

    browser = run(go())
    credential = CredentialStore(home).credentials()["sub"]
    secrets = [credential.api_key] if mode == "console" else [credential.access_token, credential.refresh_token]
    assert all(secrets) and (credential.access_token is None) == (mode == "console")
    page_text = browser.seen()
    assert not [s for s in secrets if s in page_text]
    assert load_accounts(home).accounts[0].tier == 20


def test_a_log_in_is_the_starters_alone_and_expires(dashboard, home, fake, monkeypatch):
    async def go():
        browser = await Browser(dashboard).login()
        url, login = link_and_login(await browser.post(f"{PAGE}/oauth/start", {"name": "sub", "mode": "max"}))
        guessed = await browser.post(
            f"{PAGE}/oauth/finish", {"login": login[:-2] + "xx", "code": issue_code(fake, url, "sub")}
        )
        assert guessed.status_code == 400 and "expired or was finished" in guessed.text
        monkeypatch.setattr(oauth, "FLOW_LIFETIME", -1)
        late = await browser.post(f"{PAGE}/oauth/finish", {"login": login, "code": issue_code(fake, url, "sub")})
        assert late.status_code == 400 and "expired or was finished" in late.text

    run(go())
    assert not (home / "accounts.toml").exists()


def test_anonymous_visitors_and_forged_forms_are_refused(dashboard, home, monkeypatch):
    monkeypatch.setenv("CLAUDEFLARE_DASHBOARD_PUBLIC", "1")  # even when anyone may read

    async def go():
        anonymous = Browser(dashboard)
        page = await anonymous.get(PAGE)
        assert page.status_code == 302 and page.headers["location"] == "/-/login"
        for path in ("add-key", "oauth/start", "remove"):
            reply = await anonymous.post(
                f"{PAGE}/{path}", {"name": "k", "key": KEY, "mode": "max", "confirm": "yes"}, csrf=False
            )
            assert reply.status_code == 403, path
        browser = await Browser(dashboard).login()
        forged = await browser.post(f"{PAGE}/add-key", {"name": "k", "key": KEY}, csrf=False)  # no CSRF token
        assert forged.status_code == 403 and "did not match cookie" in forged.text
        assert (await browser.get(f"{PAGE}/add-key")).status_code == 405  # GET changes nothing

    run(go())
    assert not (home / "accounts.toml").exists()


def test_a_body_over_the_cap_is_refused_unread(dashboard, home):
    async def go():
        browser = await Browser(dashboard).login()
        reply = await browser.post(f"{PAGE}/add-key", {"name": "k", "key": "x" * 70_000})
        assert reply.status_code == 413

    run(go())
    assert not (home / "accounts.toml").exists()


def test_the_page_is_linked_from_the_dashboard():
    manage = metadata()["plugins"]["datasette-dashboards"]["pool"]["charts"]["manage"]["display"]
    assert f"]({PAGE})" in manage


def test_log_an_account_in_again(dashboard, home, fake):
    add_account(
        home,
        "sub",
        "max",
        5,
        access_token="sk-ant-oat01-old-token",
        refresh_token="sk-ant-ort01-old-token",
        needs_login=True,
    )
    add_account(home, "key", "api-key", 1, api_key=KEY)

    async def go():
        browser = await Browser(dashboard).login()
        listed = await browser.get(PAGE)
        assert "needs-login" in listed.text and listed.text.count('name="relogin"') == 1  # OAuth accounts only
        started = await browser.post(f"{PAGE}/oauth/start", {"relogin": "sub"})
        assert started.status_code == 200 and "log in again as the account <strong>sub</strong>" in started.text
        url, login = link_and_login(started)
        done = await browser.post(f"{PAGE}/oauth/finish", {"login": login, "code": issue_code(fake, url, "sub")})
        assert done.status_code == 302
        assert "logged in sub" in (await browser.get(PAGE)).text
        refused = await browser.post(f"{PAGE}/oauth/start", {"relogin": "key"})
        assert refused.status_code == 400 and "api-key account" in refused.text

    run(go())
    credential = CredentialStore(home).credentials()["sub"]
    assert not credential.needs_login and credential.access_token == fake.tokens("sub")["access_token"]
    assert [(a.name, a.tier) for a in load_accounts(home).accounts] == [("sub", 5), ("key", 1)]


def test_names_from_the_form_are_shown_as_text(dashboard, home):
    markup = '<script>window.x=1</script>"><img src=x>'

    async def go():
        browser = await Browser(dashboard).login()
        confirm = await browser.post(f"{PAGE}/remove", {"name": markup})
        refused = await browser.post(f"{PAGE}/add-key", {"name": markup, "key": KEY})
        gone = await browser.post(f"{PAGE}/remove", {"name": markup, "confirm": "yes"})
        for reply in (confirm, refused, gone):
            assert "<script>window.x" not in reply.text and "<img src=x>" not in reply.text
            assert "&lt;script&gt;window.x=1&lt;/script&gt;" in reply.text
        assert refused.status_code == gone.status_code == 400 and "no account named" in gone.text

    run(go())
