"""`claudeflare tui` driven by Textual's headless pilot (`App.run_test`) against a real flow log and
accounts file in a temp home; OAuth against the fake's endpoints."""

import asyncio
import html
import json
import re
import sqlite3
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from textual.worker import WorkerCancelled

from claudeflare.accounts import edit_accounts, load_accounts
from claudeflare.clock import iso_utc
from claudeflare.credentials import CredentialStore
from claudeflare.flowlog import open_db
from claudeflare.tui import Details, OAuthLogin, PoolApp, load_snapshot, qr_text

from harness import add_account, key_for

ARTIFACTS = Path(__file__).parent / "artifacts"
SIZE = (200, 50)
NEW_KEY = "sk-ant-api03-typed-into-the-tui-0123456789"


def row(n, account, ago, status=200, session="s-1", model="claude-sonnet-4-5", **extra):
    return {
        "id": f"r{n}",
        "started_at": iso_utc(time.time() - ago),
        "account": account,
        "client": "laptop",
        "method": "POST",
        "path": "/v1/messages",
        "model": model,
        "stream": 1,
        "status": status,
        "ttfb_ms": 120.0 + n,
        "duration_ms": 900.0,
        "input_tokens": 100,
        "output_tokens": 50,
        "cache_read_input_tokens": 300,
        "cache_creation_input_tokens": 0,
        "cost_usd": 0.01,
        "priced": 1,
        "attempts": 1,
        "session": session,
        "request_id": f"req_{n}",
        **extra,
    }


def write_status(home, names, age=0.0, in_flight=0):
    db = open_db(home / "claudeflare.db")
    with db.conn:
        db["account_status"].delete_where()
        db["account_status"].insert_all(
            [
                {
                    "name": n,
                    "mode": "api-key",
                    "tier": 1,
                    "priority": 0,
                    "state": "ok",
                    "requests_in_flight": in_flight,
                    "utilization_5h": 0.42,
                    "reset_5h": iso_utc(time.time() + 7200),
                    "updated_at": iso_utc(time.time() - age),
                }
                for n in names
            ]
        )
    db.close()


@pytest.fixture
def pool(home):
    """Two API-key accounts, a fresh proxy status, and a flow log: a's two-request conversation, an error
    on b, a request 3 hours old, and a client's model name that looks like markup."""
    add_account(home, "alpha", api_key=key_for("alpha"))
    add_account(home, "beta", api_key=key_for("beta"))
    db = open_db(home / "claudeflare.db")
    with db.conn:
        db["requests"].insert_all(
            [
                row(1, "alpha", 30),
                row(2, "alpha", 20),
                row(
                    3,
                    "beta",
                    10,
                    status=529,
                    session="s-2",
                    error="upstream overloaded",
                    attempts=3,
                    failovers=json.dumps([{"account": "alpha", "status": 529, "reason": "overloaded"}]),
                ),
                row(4, "beta", 3 * 3600, session="s-3"),
                row(5, "beta", 5, session="s-4", model="[red]x[/red]"),
            ]
        )
    db.close()
    write_status(home, ["alpha", "beta"], in_flight=2)
    return home


def run(home, script, fake=None, size=SIZE):
    async def go():
        app = PoolApp(home, refresh=0)
        async with app.run_test(size=size) as pilot:
            await settle(app, pilot)
            await script(app, pilot)

    asyncio.run(go())


async def settle(app, pilot):
    """Until the workers started by a key press, and those they start, are done."""
    for _ in range(3):
        try:
            await app.workers.wait_for_complete()
        except WorkerCancelled:  # a dialog's worker, cancelled as the dialog it closed goes away
            pass
        await pilot.pause()


def screen_text(app) -> str:
    """What the terminal shows (dialogs and notifications included), as one string."""
    svg = app.export_screenshot()
    return html.unescape("".join(re.findall(r"<text[^>]*>(.*?)</text>", svg))).replace("\xa0", " ")


def notes(app) -> str:
    return "\n".join(n.message for n in app._notifications)


async def paste(login, pilot, text, then=None):
    """Paste into the code field (typed key by key it takes seconds), look at the screen, press enter."""
    code = login.query_one("#code")
    code.focus()
    code.insert_text_at_cursor(text)
    await pilot.pause()
    login.seen = then() if then else ""
    await pilot.press("enter")


def cells(app, table_id="#requests", column=1):
    table = app.screen.query_one(table_id)
    return [str(table.get_row_at(i)[column]) for i in range(table.row_count)]


def test_it_shows_accounts_requests_totals_and_no_banner_while_the_proxy_runs(pool):
    async def script(app, pilot):
        assert cells(app, "#accounts", 0) == ["alpha", "beta"]
        alpha = [str(c) for c in app.query_one("#accounts").get_row_at(0)]
        assert alpha[4] == "ok" and "42%" in alpha[5] and alpha[9] == "2" and alpha[10] == "2" and alpha[11] == "$0.02"
        assert cells(app) == ["beta", "beta", "alpha", "alpha"]  # newest first, the 3-hour-old one outside 1 h
        assert "[red]x[/red]" in cells(app, column=3)  # a client's text is shown as text, not markup
        assert cells(app, column=8) == ["-", "1", "-", "-"]  # r3 failed over once
        totals = str(app.query_one("#totals").render())
        assert "4 requests" in totals and "errors 25.0%" in totals and "cache hit 75.0%" in totals
        assert not app.query_one("#banner").display
        assert sum(app.query_one("#spark").data) == 4

    run(pool, script)


def test_a_stale_status_says_no_proxy_is_running(pool):
    write_status(pool, ["alpha", "beta"], age=30, in_flight=2)

    async def script(app, pilot):
        assert app.query_one("#banner").display
        assert "No proxy running" in str(app.query_one("#banner").render())
        assert str(app.query_one("#accounts").get_row_at(0)[9]) == "-"  # in flight: unknown, not a stale 2

    run(pool, script)


def test_odd_values_in_the_log_show_as_unreadable_rows_and_the_screen_goes_on(pool):
    """The flow log is SQLite: any column may hold any type. One bad row must not stop the refresh."""
    db = open_db(pool / "claudeflare.db")
    with db.conn:
        db.execute(
            "insert into requests (id, started_at, account, status, ttfb_ms, cost_usd, attempts, input_tokens) "
            "values ('odd', ?, 'alpha', 'two hundred', 'fast', 'free', 'x', 'many')",
            [iso_utc(time.time())],
        )
    db.close()

    async def script(app, pilot):
        assert cells(app, column=0)[0] == "(unreadable row)"
        assert cells(app) == ["-", "beta", "beta", "alpha", "alpha"]  # the others as before
        await pilot.press("r")
        await settle(app, pilot)
        assert len(cells(app)) == 6 and app.is_running

    run(pool, script)


def test_a_broken_accounts_file_is_named_with_its_line(pool):
    (pool / "accounts.toml").write_text("[[accounts]]\nname = 'alpha'\nmode = 'api-key'\ntier = 3\n")

    async def script(app, pilot):
        problem = app.query_one("#problem")
        assert problem.display and "line 1" in str(problem.render()) and "tier" in str(problem.render())
        assert len(cells(app)) == 4  # the requests still show
        await pilot.press("p")
        await settle(app, pilot)
        assert "no account selected" in notes(app)

    run(pool, script)


def test_pause_resume_and_remove_with_confirmation(pool):
    async def script(app, pilot):
        await pilot.press("p")
        await settle(app, pilot)
        assert load_accounts(pool).accounts[0].paused
        assert str(app.query_one("#accounts").get_row_at(0)[4]) == "paused"
        await pilot.press("u")
        await settle(app, pilot)
        assert not load_accounts(pool).accounts[0].paused
        await pilot.press("down", "x")
        await pilot.pause()
        await pilot.press("n")
        await settle(app, pilot)
        assert [a.name for a in load_accounts(pool).accounts] == ["alpha", "beta"]
        await pilot.press("x")
        await pilot.pause()
        assert "Remove account beta" in screen_text(app)
        await pilot.press("y")
        await settle(app, pilot)
        assert [a.name for a in load_accounts(pool).accounts] == ["alpha"]
        assert "beta" not in CredentialStore(pool).credentials()
        assert cells(app, "#accounts", 0) == ["alpha"]

    run(pool, script)


def test_tier_priority_and_strategy(pool):
    async def script(app, pilot):
        await pilot.press("t")
        await pilot.pause()
        app.screen.query_one("#tier").value = 20
        priority = app.screen.query_one("#priority")
        priority.value = "x"
        priority.focus()
        await pilot.press("enter")
        await pilot.pause()
        assert "whole number" in notes(app) and app.screen.query_one("#priority")  # refused, the dialog stays
        priority.value = "3"
        await pilot.press("enter")
        await settle(app, pilot)
        alpha = load_accounts(pool).accounts[0]
        assert (alpha.tier, alpha.priority) == (20, 3)
        await pilot.press("s")
        await pilot.pause()
        await pilot.press("down", "down", "enter")
        await settle(app, pilot)
        assert load_accounts(pool).strategy == "weighted"
        assert "strategy weighted" in app.sub_title

    run(pool, script)


def test_add_an_api_key_account_with_a_hidden_key(pool):
    async def script(app, pilot):
        await pilot.press("a")
        await pilot.pause()
        await pilot.click("#name")
        await pilot.press(*"gamma")
        app.screen.query_one("#key").focus()
        await pilot.press(*NEW_KEY)
        await pilot.pause()
        assert NEW_KEY not in screen_text(app)  # a password field
        await pilot.press("enter")
        await settle(app, pilot)
        assert cells(app, "#accounts", 0) == ["alpha", "beta", "gamma"]
        assert NEW_KEY not in screen_text(app)

    run(pool, script)
    assert CredentialStore(pool).credentials()["gamma"].api_key == NEW_KEY


def test_a_refused_key_says_why_and_adds_nothing(pool):
    async def script(app, pilot):
        await pilot.press("a")
        await pilot.pause()
        app.screen.query_one("#name").value = "delta"
        key = app.screen.query_one("#key")
        key.value = "short"
        key.focus()
        await pilot.press("enter")
        await settle(app, pilot)
        assert "does not look like an API key" in notes(app)

    run(pool, script)
    assert [a.name for a in load_accounts(pool).accounts] == ["alpha", "beta"]


def test_oauth_log_in_shows_the_link_and_a_qr_code_then_takes_the_pasted_code(pool, fake, monkeypatch):
    monkeypatch.setenv("CLAUDEFLARE_TOKEN_URL", f"{fake.url}/v1/oauth/token")

    async def script(app, pilot):
        await pilot.press("o")
        await pilot.pause()
        login = app.screen
        assert isinstance(login, OAuthLogin)
        login.query_one("#name").value = "max-one"
        await pilot.click("#start")
        await pilot.pause()
        assert login.url in str(login.query_one("#link").render()).replace("\n", "")
        query = {k: v[0] for k, v in parse_qs(urlsplit(login.url).query).items()}
        await pilot.press("f3")
        await pilot.pause()
        assert "▀" in str(login.query_one("#qr").render())
        fake.add_auth_code("code-tui", account="max-one", state=query["state"], code_challenge=query["code_challenge"])
        await paste(login, pilot, "wrong#" + query["state"])
        await settle(app, pilot)
        assert "not accepted" in notes(app) and app.screen is login
        await paste(login, pilot, f"code-tui#{query['state']}", then=lambda: screen_text(app))
        assert "code-tui" not in login.seen  # a hidden field
        await settle(app, pilot)
        assert app.screen is not login
        assert cells(app, "#accounts", 0) == ["alpha", "beta", "max-one"]

    run(pool, script)
    account = load_accounts(pool).accounts[2]
    assert (account.mode, account.tier) == ("max", 5)
    assert CredentialStore(pool).credentials()["max-one"].refresh_token


def test_log_in_again_replaces_the_tokens_and_a_taken_name_is_refused_before_the_log_in(pool, fake, monkeypatch):
    monkeypatch.setenv("CLAUDEFLARE_TOKEN_URL", f"{fake.url}/v1/oauth/token")
    add_account(
        pool,
        "max-old",
        "max",
        5,
        access_token="old-access-token",
        refresh_token="old-refresh-token",
        expires_at=time.time() - 60,
    )

    async def script(app, pilot):
        await pilot.press("l")  # alpha: an API key has no log-in
        await pilot.pause()
        assert "api-key account" in notes(app) and not isinstance(app.screen, OAuthLogin)
        await pilot.press("o")
        await pilot.pause()
        app.screen.query_one("#name").value = "alpha"
        await pilot.click("#start")
        await pilot.pause()
        assert "already exists" in notes(app) and not app.screen.url
        await pilot.press("escape", "down", "down", "l")
        await pilot.pause()
        login = app.screen
        assert "Log max-old in again" in screen_text(app)
        await pilot.click("#start")
        await pilot.pause()
        query = {k: v[0] for k, v in parse_qs(urlsplit(login.url).query).items()}
        fake.add_auth_code(
            "code-again", account="max-old", state=query["state"], code_challenge=query["code_challenge"]
        )
        await paste(login, pilot, f"code-again#{query['state']}")
        await settle(app, pilot)
        assert app.screen is not login and "logged in max-old" in notes(app)

    run(pool, script)
    credential = CredentialStore(pool).credentials()["max-old"]
    assert credential.refresh_token != "old-refresh-token" and credential.expires_at > time.time()
    assert [a.name for a in load_accounts(pool).accounts] == ["alpha", "beta", "max-old"]


def test_filters_by_account_and_errors_only_and_range(pool):
    async def script(app, pilot):
        await pilot.press("f")
        await settle(app, pilot)
        assert cells(app) == ["alpha", "alpha"]
        await pilot.press("f")
        await settle(app, pilot)
        assert cells(app) == ["beta", "beta"]
        await pilot.press("f", "e")
        await settle(app, pilot)
        assert cells(app) == ["beta"] and cells(app, column=4) == ["529"]
        await pilot.press("e", "r")
        await settle(app, pilot)
        assert cells(app) == ["beta", "beta", "alpha", "alpha", "beta"]  # 24 h: the 3-hour-old one too
        assert "5 requests" in str(app.query_one("#totals").render())

    run(pool, script)


def test_request_details_and_conversation_in_order(pool):
    async def script(app, pilot):
        app.query_one("#requests").focus()
        await pilot.press("down", "d")  # r3: the failed-over one
        await settle(app, pilot)
        assert isinstance(app.screen, Details)
        text = str(app.screen.query_one("#detail").render())
        assert "req_3" in text and "overloaded" in text and "upstream overloaded" in text
        await pilot.press("escape", "down", "c")  # r2, in conversation s-1 with r1
        await settle(app, pilot)
        assert [str(c) for c in app.screen.query_one("#conversation").get_row_at(0)][1] == "alpha"
        assert list(app.screen.query_one("#conversation").rows) and [
            k.value for k in app.screen.query_one("#conversation").rows
        ] == ["r1", "r2"]

    run(pool, script)


def test_the_qr_code_holds_the_link():
    """Two modules a character: reading the half blocks back gives segno's own matrix."""
    import segno

    url = "https://claude.com/cai/oauth/authorize?code=true&state=abc"
    matrix = [list(r) for r in segno.make(url, error="l").matrix_iter(border=2)]
    lines = qr_text(url).plain.split("\n")
    back = []
    for line in lines:
        back.append([int(c in "█▀") for c in line])
        back.append([int(c in "█▄") for c in line])
    assert back[: len(matrix)] == matrix


def test_a_refresh_reads_only_the_range_whatever_the_log_holds(pool, monkeypatch):
    """Cheap on a big log: 20,000 rows a month old cost a refresh nothing. Counted in SQLite VM steps
    (the timing on 1,000,000 rows is benchmarks/tui_refresh.py): a query that groups on the account
    index instead of ranging over started_at steps through every row."""
    db = open_db(pool / "claudeflare.db")
    with db.conn:
        db["requests"].insert_all(
            (row(n, "alpha" if n % 2 else "beta", 30 * 86400 + n) for n in range(100, 20_100)), batch_size=5000
        )
    db.close()
    steps = []
    connect = sqlite3.connect

    def counting(*args, **kwargs):
        conn = connect(*args, **kwargs)
        steps.append(0)
        conn.set_progress_handler(lambda: steps.__setitem__(-1, steps[-1] + 100) or 0, 100)
        return conn

    monkeypatch.setattr(sqlite3, "connect", counting)
    for range_key, account, errors_only in [("1h", None, False), ("24h", "alpha", False), ("7d", "beta", True)]:
        steps.clear()
        snap = load_snapshot(pool, range_key, account, errors_only)
        assert snap.latest and sum(steps) < 20_000, (range_key, steps)


def showcase(home):
    """Made-up accounts and an hour of traffic for the README's screenshot (no real names or secrets)."""
    now = time.time()
    add_account(
        home,
        "team-max",
        "max",
        20,
        access_token="made-up-access-1",
        refresh_token="made-up-refresh-1",
        expires_at=now + 5 * 3600,
    )
    add_account(
        home,
        "own-pro",
        "max",
        5,
        1,
        access_token="made-up-access-2",
        refresh_token="made-up-refresh-2",
        expires_at=now + 40 * 60,
    )
    add_account(home, "ci-key", api_key=key_for("ci-key"))
    edit_accounts(home, lambda doc: doc["accounts"][2].__setitem__("paused", True))
    db = open_db(home / "claudeflare.db")
    status = [
        ("team-max", "ok", None, None, 0.31, 0.12, 1),
        ("own-pro", "limited", "5-hour limit reached", 3000, 1.0, 0.64, 0),
        ("ci-key", "paused", None, None, None, None, 0),
    ]
    models = ("claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5")
    with db.conn:
        db["account_status"].insert_all(
            [
                {
                    "name": n,
                    "state": state,
                    "reason": reason,
                    "limited_until": until and iso_utc(now + until),
                    "utilization_5h": u5,
                    "reset_5h": u5 is not None and iso_utc(now + 3000) or None,
                    "utilization_7d": u7,
                    "reset_7d": u7 is not None and iso_utc(now + 4 * 86400) or None,
                    "requests_in_flight": flight,
                    "updated_at": iso_utc(now),
                }
                for n, state, reason, until, u5, u7, flight in status
            ]
        )
        db["requests"].insert_all(
            [
                row(
                    n,
                    "team-max" if n % 3 else "own-pro",
                    3590 * (n / 240) ** 1.6,
                    session=f"s-{n // 9}",
                    model=models[n % 3],
                    status=429 if n % 41 == 0 else 200,
                    attempts=2 if n % 41 == 0 else 1,
                    failovers=json.dumps([{"account": "own-pro", "status": 429, "reason": "limited"}])
                    if n % 41 == 0
                    else None,
                )
                for n in range(240)
            ]
        )
    db.close()


def test_screenshot_for_the_readme(home):
    """docs/tui.svg is this file (tests/artifacts/tui.svg), copied."""
    showcase(home)

    async def script(app, pilot):
        ARTIFACTS.mkdir(exist_ok=True)
        path = app.save_screenshot("tui.svg", str(ARTIFACTS))
        text = Path(path).read_text()
        assert "team-max" in text and "made-up" not in text

    run(home, script, size=(170, 40))
