"""The Datasette dashboard: canned queries, chart SQL, permissions and management, through Datasette's
own test client with the same metadata, plugins and settings that `claudeflare dashboard` serves."""

import asyncio
import copy
import functools
import json
import os
import re
import stat
import time
from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest
import sqlite_utils
import yaml
from click.testing import CliRunner
from datasette.app import Datasette
from datasette_auth_passwords.utils import verify_password
from datasette_dashboards import replace_opts_in_query

from claudeflare import retention
from claudeflare.cli import (
    DASHBOARD_PASSWORD_FILE,
    DASHBOARD_PLUGINS,
    METADATA,
    PASSWORD_HASH_ENV,
    PUBLIC_ENV,
    cli,
    dashboard_command,
    dashboard_settings,
)
from claudeflare.clock import iso_utc
from claudeflare.flowlog import open_db

PASSWORD = "correct horse battery"
NOW = time.time()
SONNET, HAIKU = "claude-sonnet-4-5-20250929", "claude-haiku-4-5-20251001"


def row(id, minutes_ago, **kw):
    base = {
        "id": id,
        "started_at": iso_utc(NOW - minutes_ago * 60),
        "account": "a",
        "strategy": "session",
        "session": None,
        "client": None,
        "method": "POST",
        "path": "/v1/messages",
        "model": SONNET,
        "stream": 1,
        "status": 200,
        "error": None,
        "ttfb_ms": 100.0,
        "duration_ms": 1000.0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cost_usd": 0.0,
        "priced": 1,
        "attempts": 1,
        "failovers": None,
        "stop_reason": "end_turn",
        "request_id": f"req_{id}",
    }
    return {**base, **kw}


FAILOVERS = [
    {"account": "a", "status": 429, "reason": "rate limited"},
    {"account": "c", "status": 529, "reason": "overloaded"},
]
ROWS = [
    row(
        "r1",
        10,
        session="s1",
        client="laptop",
        input_tokens=100,
        output_tokens=50,
        cache_read_input_tokens=900,
        cost_usd=0.01,
        ttfb_ms=100.0,
        duration_ms=1000.0,
    ),
    row(
        "r2",
        5,
        session="s1",
        client="laptop",
        input_tokens=10,
        output_tokens=20,
        cache_read_input_tokens=1000,
        cost_usd=0.02,
        ttfb_ms=200.0,
        duration_ms=5000.0,
    ),
    row(
        "r3",
        3,
        account="b",
        model=HAIKU,
        session="s2",
        status=429,
        error="rate_limit_error",
        ttfb_ms=50.0,
        duration_ms=60.0,
    ),
    row(
        "r4",
        2,
        account="b",
        model=HAIKU,
        session="s2",
        client="ci",
        input_tokens=300,
        output_tokens=30,
        cache_creation_input_tokens=700,
        cost_usd=0.03,
        ttfb_ms=300.0,
        duration_ms=2000.0,
        attempts=3,
        failovers=json.dumps(FAILOVERS),
    ),
    row("r5", 40 * 24 * 60, session="s0", client="laptop", input_tokens=1000, cost_usd=1.0),  # 40 days old
    row("r6", 1, account=None, model=None, status=503, error="no usable account", ttfb_ms=None, duration_ms=1.0),
]
RECENT = [r for r in ROWS if r["id"] != "r5"]


@pytest.fixture
def db_path(home):
    db = open_db(home / "claudeflare.db")
    db["requests"].insert_all(ROWS)
    db["account_status"].insert_all(
        [
            {
                "name": "a",
                "mode": "max",
                "tier": 5,
                "priority": 0,
                "state": "ok",
                "utilization_5h": 0.42,
                "utilization_7d": 0.1,
                "token_expires_at": iso_utc(NOW + 3600),
                "requests_in_flight": 0,
                "updated_at": iso_utc(NOW),
            },
            {
                "name": "b",
                "mode": "api-key",
                "tier": 1,
                "priority": 0,
                "state": "limited",
                "reason": "<script>x</script>",
                "limited_until": iso_utc(NOW + 600),
                "requests_in_flight": 1,
                "updated_at": iso_utc(NOW),
            },
        ],
        pk="name",
    )
    db.close()
    return home / "claudeflare.db"


@pytest.fixture
def password_set(home):
    result = CliRunner().invoke(cli, ["--home", str(home), "dashboard-password"], input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    return home / DASHBOARD_PASSWORD_FILE


@pytest.fixture
def serve(home, db_path, password_set, monkeypatch):
    """A Datasette like the one `claudeflare dashboard [--public] [--allow-sql]` execs."""

    def serve(public=False, allow_sql=False):
        args, env = dashboard_command(home, "127.0.0.1", 8001, METADATA, public=public, allow_sql=allow_sql)
        for name in (PASSWORD_HASH_ENV, PUBLIC_ENV):
            if name in env:
                monkeypatch.setenv(name, env[name])
            else:
                monkeypatch.delenv(name, raising=False)
        plugins_dir = args[args.index("--plugins-dir") + 1]
        return Datasette(
            [str(db_path)],
            metadata=copy.deepcopy(metadata()),
            plugins_dir=plugins_dir,
            settings=dashboard_settings(allow_sql),
        )

    return serve


def run(coro):
    return asyncio.run(coro)


async def login(ds, password=PASSWORD) -> dict:
    page = await ds.client.get("/-/login")
    csrf = page.cookies["ds_csrftoken"]
    token = re.search(r'name="csrftoken" value="([^"]+)"', page.text).group(1)
    reply = await ds.client.post(
        "/-/login", data={"username": "admin", "password": password, "csrftoken": token}, cookies={"ds_csrftoken": csrf}
    )
    if reply.status_code != 302:
        return {}
    return {"ds_actor": reply.cookies["ds_actor"]}


async def canned(ds, cookies, name, **params) -> list[dict]:
    reply = await ds.client.get(
        f"/claudeflare/{name}.json?" + urlencode({**params, "_shape": "objects"}), cookies=cookies
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["rows"]


@functools.cache
def metadata() -> dict:
    return yaml.safe_load(METADATA.read_text())


def charts() -> dict:
    return copy.deepcopy(metadata()["plugins"]["datasette-dashboards"]["pool"]["charts"])


def chart_url(chart: dict, **filters) -> str:
    """What the dashboard's JavaScript fetches for a chart (dashboards.js getDataUrl)."""
    sql = replace_opts_in_query(chart["query"], filters)
    return f"/{chart['db']}.json?" + urlencode({"sql": sql, **filters, "_shape": "objects"})


async def chart_rows(ds, cookies, name, **filters) -> list[dict]:
    filters = {"range": "24 hours", "account": "", "provider": "", **filters}
    reply = await ds.client.get(chart_url(charts()[name], **filters), cookies=cookies)
    assert reply.status_code == 200, f"{name}: {reply.status_code} {reply.text[:500]}"
    return reply.json()["rows"]


# --- permissions ----------------------------------------------------------------------------------


def test_anonymous_visitors_read_nothing_and_are_sent_to_the_login(serve):
    ds = serve()

    async def check():
        for path in (
            "/claudeflare/requests.json",
            "/claudeflare/usage_by_account.json",
            "/claudeflare.json",
            chart_url(charts()["requests"], range="24 hours", account=""),
        ):
            reply = await ds.client.get(path)
            assert reply.status_code == 403, path
        for path in (
            "/claudeflare/requests",
            "/-/dashboards/pool?range=24+hours&account=",
            "/claudeflare/usage_by_account",
        ):
            page = await ds.client.get(path)
            assert page.status_code == 302 and page.headers["location"] == "/-/login", path
        home = await ds.client.get("/")
        assert home.status_code == 302 and home.headers["location"] == "/-/dashboards/pool"
        assert await login(ds, "wrong password") == {}

    run(check())


def test_logged_in_user_reads_and_the_sql_editor_is_off_by_default(serve):
    ds = serve()

    async def check():
        cookies = await login(ds)
        assert cookies
        assert (await ds.client.get("/claudeflare/requests.json", cookies=cookies)).status_code == 200
        page = await ds.client.get("/-/dashboards/pool?range=24+hours&account=", cookies=cookies)
        assert page.status_code == 200 and "Requests per minute, by account" in page.text
        # The SQL editor, and any SQL but the charts' own, are refused.
        for sql in ("select 1", "select * from requests", charts()["requests"]["query"] + " "):
            assert (
                await ds.client.get("/claudeflare.json?" + urlencode({"sql": sql}), cookies=cookies)
            ).status_code == 403
        assert (await ds.client.get("/claudeflare?sql=select+1", cookies=cookies)).status_code == 403
        assert (await ds.client.get("/_internal/databases.json", cookies=cookies)).status_code == 403

    run(check())


def test_allow_sql_turns_the_sql_editor_on(serve):
    ds = serve(allow_sql=True)

    async def check():
        cookies = await login(ds)
        reply = await ds.client.get(
            "/claudeflare.json?sql=select+count(*)+as+n+from+requests&_shape=objects", cookies=cookies
        )
        assert reply.status_code == 200 and reply.json()["rows"] == [{"n": len(ROWS)}]
        assert (await ds.client.get("/claudeflare.json?sql=select+1")).status_code == 403  # still not anonymously

    run(check())


def test_public_opens_reading_but_not_management(serve):
    ds = serve(public=True)

    async def check():
        assert (await ds.client.get("/claudeflare/requests.json")).status_code == 200
        assert (await ds.client.get("/claudeflare/usage_by_account.json")).status_code == 200
        assert (await chart_rows(ds, {}, "requests")) == [{"value": str(len(RECENT))}]
        assert (await ds.client.get("/claudeflare/pause_account")).status_code in (302, 403)
        assert (await ds.client.get("/claudeflare.json?sql=select+1")).status_code == 403
        assert (await ds.client.get("/_internal/databases.json")).status_code == 403

    run(check())


# --- management -----------------------------------------------------------------------------------


async def post_canned(ds, cookies, name, **params):
    form = await ds.client.get(f"/claudeflare/{name}", cookies=cookies)
    assert form.status_code == 200, form.text
    assert metadata()["databases"]["claudeflare"]["queries"][name]["title"] in form.text
    token = re.search(r'name="csrftoken" value="([^"]+)"', form.text).group(1)
    cookies = {**cookies, "ds_csrftoken": form.cookies.get("ds_csrftoken") or cookies.get("ds_csrftoken")}
    return await ds.client.post(f"/claudeflare/{name}", data={**params, "csrftoken": token}, cookies=cookies)


def control_rows(db_path):
    return list(
        sqlite_utils.Database(db_path).query(
            "select action, account, value, applied_at, result, created_at from control order by id"
        )
    )


def test_logged_in_user_pauses_resumes_and_switches_strategy(serve, db_path):
    ds = serve()

    async def act():
        cookies = await login(ds)
        for name, params in (
            ("pause_account", {"account": "a"}),
            ("resume_account", {"account": "a"}),
            ("set_strategy", {"strategy": "round-robin"}),
        ):
            reply = await post_canned(ds, cookies, name, **params)
            assert reply.status_code == 302 and reply.headers["location"] == "/claudeflare/control", reply.text

    run(act())
    rows = control_rows(db_path)
    assert [(r["action"], r["account"], r["value"], r["applied_at"], r["result"]) for r in rows] == [
        ("pause", "a", None, None, None),
        ("resume", "a", None, None, None),
        ("strategy", None, "round-robin", None, None),
    ]
    created = datetime.fromisoformat(rows[0]["created_at"].replace("Z", "+00:00"))
    assert abs(created.timestamp() - time.time()) < 60 and rows[0]["created_at"].endswith("Z")


def test_anonymous_visitors_cannot_manage_even_when_public(serve, db_path):
    for public in (False, True):
        ds = serve(public=public)

        async def attempt(ds=ds):
            page = await ds.client.get("/claudeflare/pause_account")
            csrf = page.cookies.get("ds_csrftoken")
            reply = await ds.client.post(
                "/claudeflare/pause_account", data={"account": "a"}, cookies={"ds_csrftoken": csrf} if csrf else {}
            )
            assert reply.status_code in (302, 403)
            assert reply.headers.get("location") in (None, "/-/login")

        run(attempt())
    assert control_rows(db_path) == []


# --- canned queries -------------------------------------------------------------------------------


def test_usage_queries_match_the_rows(serve):
    ds = serve()

    async def check():
        cookies = await login(ds)
        by_account = {r["account"]: r for r in await canned(ds, cookies, "usage_by_account", days="")}
        assert {k: v["requests"] for k, v in by_account.items()} == {"a": 3, "b": 2, "(none)": 1}
        assert by_account["a"]["input_tokens"] == 1110 and by_account["a"]["cache_read"] == 1900
        assert by_account["a"]["cost_usd"] == pytest.approx(1.03) and by_account["b"]["errors"] == 1
        assert by_account["a"]["cache_hit_ratio"] == pytest.approx(round(1900 / 3010, 4))
        recent = {r["account"]: r["requests"] for r in await canned(ds, cookies, "usage_by_account", days="30")}
        assert recent == {"a": 2, "b": 2, "(none)": 1}

        by_model = {r["model"]: r for r in await canned(ds, cookies, "usage_by_model", days="")}
        assert {k: v["requests"] for k, v in by_model.items()} == {SONNET: 3, HAIKU: 2, "(unknown)": 1}
        assert by_model[HAIKU]["cache_write"] == 700 and by_model[SONNET]["cost_usd"] == pytest.approx(1.03)

        by_client = {r["client"]: r["requests"] for r in await canned(ds, cookies, "usage_by_client", days="")}
        assert by_client == {"laptop": 3, "ci": 1, "(loopback, no key)": 2}

        by_session = {r["session"]: r for r in await canned(ds, cookies, "usage_by_session", days="")}
        assert set(by_session) == {"s0", "s1", "s2"}
        assert by_session["s1"]["requests"] == 2 and by_session["s1"]["accounts"] == "a"
        assert by_session["s1"]["cache_hit_ratio"] == pytest.approx(round(1900 / 2010, 4))
        assert [r["session"] for r in await canned(ds, cookies, "usage_by_session", days="30")] == ["s2", "s1"]

        in_order = await canned(ds, cookies, "session_requests", session="s1")
        assert [r["id"] for r in in_order] == ["r1", "r2"]

    run(check())


def test_slowest_failovers_errors_and_cost_this_month(serve):
    ds = serve()

    async def check():
        cookies = await login(ds)
        slowest = await canned(ds, cookies, "slowest_requests", days="")
        assert [r["id"] for r in slowest][:2] == ["r2", "r4"]

        failovers = await canned(ds, cookies, "failovers", days="")
        assert [(f["id"], f["failed_account"], f["failed_status"], f["reason"], f["served_by"]) for f in failovers] == [
            ("r4", "a", 429, "rate limited", "b"),
            ("r4", "c", 529, "overloaded", "b"),
        ]
        reasons = await canned(ds, cookies, "failover_reasons", days="")
        assert {(r["failed_account"], r["failed_status"], r["failovers"]) for r in reasons} == {
            ("a", 429, 1),
            ("c", 529, 1),
        }

        errors = await canned(ds, cookies, "recent_errors", days="")
        assert [r["id"] for r in errors] == ["r6", "r3"]

        month_start = datetime.now(UTC).strftime("%Y-%m-01T00:00:00")
        this_month = [r for r in ROWS if r["started_at"] >= month_start]
        cost = await canned(ds, cookies, "cost_this_month")
        total = cost[-1]
        assert total["account"] == "total" and total["requests"] == len(this_month)
        assert total["cost_usd"] == pytest.approx(round(sum(r["cost_usd"] for r in this_month), 4))
        assert sum(r["requests"] for r in cost[:-1]) == len(this_month)

    run(check())


def test_views_sessions_and_failover_events(db_path):
    db = sqlite_utils.Database(db_path)
    sessions = {r["session"]: r for r in db.query("select * from sessions")}
    assert sessions["s2"]["requests"] == 2 and sessions["s2"]["cache_creation_input_tokens"] == 700
    events = list(db.query("select request_id, failed_account, failed_status, reason, served_by from failover_events"))
    assert events == [
        {"request_id": "r4", "failed_account": "a", "failed_status": 429, "reason": "rate limited", "served_by": "b"},
        {"request_id": "r4", "failed_account": "c", "failed_status": 529, "reason": "overloaded", "served_by": "b"},
    ]


# --- the dashboard's charts -----------------------------------------------------------------------


def test_chart_numbers_match_the_rows(serve):
    ds = serve()

    async def check():
        cookies = await login(ds)
        assert await chart_rows(ds, cookies, "requests") == [{"value": "5"}]
        assert await chart_rows(ds, cookies, "requests", account="a") == [{"value": "2"}]
        assert await chart_rows(ds, cookies, "requests", range="") == [{"value": "6"}]  # all time
        assert await chart_rows(ds, cookies, "cost") == [{"value": "0.06"}]
        assert await chart_rows(ds, cookies, "errors") == [{"value": "40.0%"}]
        assert await chart_rows(ds, cookies, "cache-hit") == [{"value": f"{100 * 1900 / 3010:.0f}%"}]
        assert await chart_rows(ds, cookies, "tokens") == [{"value": "3,110"}]
        assert await chart_rows(ds, cookies, "ttfb-p95") == [{"value": "300 ms"}]  # of r1, r2, r4 (r3 is a 429)

        per_minute = await chart_rows(ds, cookies, "requests-per-minute")
        assert sum(r["requests"] for r in per_minute) == 5
        assert {r["account"] for r in per_minute} == {"a", "b", "(none)"}
        assert all(r["per_minute"] == pytest.approx(r["requests"] * 60 / 900, abs=1e-3) for r in per_minute)
        assert len({r["time"] for r in per_minute}) >= 96  # every 15-minute bucket of the day, empty ones as 0

        tokens = await chart_rows(ds, cookies, "tokens-over-time", account="a")
        by_kind = {
            k: sum(r["tokens"] for r in tokens if r["kind"] == k)
            for k in ("input", "output", "cache read", "cache write")
        }
        assert by_kind == {"input": 110, "output": 70, "cache read": 1900, "cache write": 0}

        cost = await chart_rows(ds, cookies, "cost-per-day")
        assert sum(r["cost_usd"] for r in cost) == pytest.approx(0.06)
        assert {r["account_model"] for r in cost} == {"a · sonnet-4-5", "b · haiku-4-5"}

        errors = [r for r in await chart_rows(ds, cookies, "error-rate") if r["requests"]]
        assert sum(r["count"] for r in errors if r["kind"] == "any error returned") == 2
        assert sum(r["count"] for r in errors if r["kind"] == "429 returned") == 1
        assert sum(r["count"] for r in errors if r["kind"] == "upstream 429, failed over") == 1

        ttfb = [r for r in await chart_rows(ds, cookies, "ttfb") if r["seconds"] is not None]
        assert sum(r["requests"] for r in ttfb if r["percentile"] == "p50") == 3  # r1, r2, r4
        assert {r["seconds"] for r in ttfb} <= {0.1, 0.2, 0.3} and max(r["seconds"] for r in ttfb) == 0.3
        duration = [r for r in await chart_rows(ds, cookies, "duration") if r["seconds"] is not None]
        assert {r["seconds"] for r in duration} <= {1.0, 5.0, 2.0} and max(r["seconds"] for r in duration) == 5.0

        by_account = {r["account"]: r["hit_ratio"] for r in await chart_rows(ds, cookies, "cache-by-account")}
        assert by_account == {"a": pytest.approx(round(1900 / 2010, 4)), "b": 0.0}
        by_session = await chart_rows(ds, cookies, "cache-by-session")
        assert [r["session"] for r in by_session] == ["s1 · a", "s2 · b"]

        health = {r["account"]: r for r in await chart_rows(ds, cookies, "health")}
        assert set(health) == {"a", "b"} and "42%" in health["a"]["5 h used"] and "limited" in health["b"]["state"]
        assert health["b"]["limited"].startswith("for ") and health["a"]["token expires"].startswith("in ")
        assert health["b"]["reason"] == "&lt;script&gt;x&lt;/script&gt;"  # the table chart renders cells as HTML
        utilization = await chart_rows(ds, cookies, "utilization")
        assert {(r["account"], r["window"], r["used"]) for r in utilization} == {("a", "5 h", 0.42), ("a", "7 d", 0.1)}

        failures = await chart_rows(ds, cookies, "failures")
        assert [r["status"] for r in failures] == [503, 429]
        assert (await chart_rows(ds, cookies, "failures", account="a"))[0]["time"] == "no failures in this period"

    run(check())


def test_every_chart_runs_on_an_empty_log_and_tables_never_come_back_empty(tmp_path, monkeypatch):
    # The dashboard's table and metric renderers read rows[0]: an empty answer would be a script error.
    db_path = tmp_path / "claudeflare.db"
    open_db(db_path).close()
    monkeypatch.setenv(PUBLIC_ENV, "1")
    ds = Datasette(
        [str(db_path)],
        metadata=copy.deepcopy(metadata()),
        plugins_dir=str(DASHBOARD_PLUGINS),
        settings=dashboard_settings(),
    )

    async def check():
        for name, chart in charts().items():
            if not chart.get("query"):
                continue
            for range_ in ("1 hour", "24 hours", "90 days", ""):
                for account in ("", "nobody"):
                    rows = await chart_rows(ds, {}, name, range=range_, account=account)
                    if chart["library"] in ("table", "metric"):
                        assert rows, (name, range_, account)

    run(check())


# --- the command ----------------------------------------------------------------------------------


def test_dashboard_command_keeps_the_password_hash_off_the_command_line(home, password_set):
    assert stat.S_IMODE(os.stat(password_set).st_mode) == 0o600
    stored = password_set.read_text().strip()
    assert verify_password(PASSWORD, stored) and PASSWORD not in stored

    args, env = dashboard_command(home, "127.0.0.1", 8001, METADATA)
    assert env[PASSWORD_HASH_ENV] == stored and env[PUBLIC_ENV] == "0"
    assert not any(stored in a or PASSWORD in a for a in args)
    assert "-i" not in args and "--immutable" not in args and str(home / "claudeflare.db") in args
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "8001"
    settings = [tuple(args[i + 1 : i + 3]) for i, a in enumerate(args) if a == "--setting"]
    assert ("default_allow_sql", "off") in settings

    args, env = dashboard_command(home, "127.0.0.1", 8001, METADATA, public=True, allow_sql=True)
    assert env[PUBLIC_ENV] == "1" and ("default_allow_sql", "on") in [
        tuple(args[i + 1 : i + 3]) for i, a in enumerate(args) if a == "--setting"
    ]


def test_dashboard_password_refuses_short_passwords(home):
    result = CliRunner().invoke(cli, ["--home", str(home), "dashboard-password"], input="short\n")
    assert result.exit_code != 0 and "8 characters" in result.output
    assert not (home / DASHBOARD_PASSWORD_FILE).exists()


# --- retention ------------------------------------------------------------------------------------


def test_prune_deletes_old_request_rows_in_batches(tmp_path):
    db = open_db(tmp_path / "claudeflare.db")
    now = 1_800_000_000.0
    ages_days = [0, 1, 89.9, 90.1, 100, 365] + [200] * 1200
    db["requests"].insert_all(
        [{"id": f"r{i}", "started_at": iso_utc(now - age * 86400)} for i, age in enumerate(ages_days)]
    )
    statements = []
    db.conn.set_trace_callback(
        lambda sql: statements.append(sql) if sql.lstrip().lower().startswith("delete") else None
    )
    deleted = retention.prune(db, 90, now=now, batch=500)
    db.conn.set_trace_callback(None)
    assert deleted == 3 + 1200
    assert len(statements) == 3  # 500 + 500 + 203: short transactions
    assert sorted(r["id"] for r in db.query("select id from requests")) == ["r0", "r1", "r2"]
    assert retention.prune(db, 90, now=now) == 0
    assert retention.prune(db, 0.5, now=now) == 2  # r1 and r2 go; r0 (just now) stays
    assert retention.prune(db, 0, now=now) == 0  # 0 keeps everything
    assert retention.REQUEST_KEEP_DAYS == 90 and retention.BODY_KEEP_DAYS == 1


XSS = '<img src=x onerror="alert(1)">'


def test_every_chart_drawn_as_html_escapes_every_text_cell(tmp_path, monkeypatch):
    # Walks the charts of datasette-metadata.yml, so a chart added later is covered too.
    db_path = tmp_path / "claudeflare.db"
    db = open_db(db_path)
    text_columns = [c.name for c in db["requests"].columns if c.type == "TEXT" and c.name not in ("id", "started_at")]
    db["requests"].insert_all([row("x1", 1, status=400, **{c: XSS for c in text_columns}), row("x2", 2, model=XSS)])
    db["account_status"].insert(
        {"name": XSS, "mode": XSS, "tier": 1, "priority": 0, "state": XSS, "reason": XSS, "updated_at": iso_utc(NOW)},
        pk="name",
    )
    db.close()
    monkeypatch.setenv(PUBLIC_ENV, "1")
    ds = Datasette(
        [str(db_path)],
        metadata=copy.deepcopy(metadata()),
        plugins_dir=str(DASHBOARD_PLUGINS),
        settings=dashboard_settings(),
    )

    def strings(data):
        if isinstance(data, str):
            yield data
        elif isinstance(data, dict):
            for k, v in data.items():
                yield k
                yield from strings(v)
        elif isinstance(data, list):
            for v in data:
                yield from strings(v)

    async def check():
        drawn = {}
        for name, chart in charts().items():
            if not chart.get("query"):
                continue
            reply = await ds.client.get(chart_url(chart, range="24 hours", account=""))
            assert reply.status_code == 200, (name, reply.text[:300])
            if chart["library"] in ("vega", "vega-lite"):
                continue  # drawn as SVG text, which no markup survives
            drawn[name] = list(strings(reply.json()))
            assert not any("<img" in s for s in drawn[name]), name
        assert {"health", "failures", "requests", "errors"} <= set(drawn)
        assert any(s.startswith("&lt;img src=x onerror=&#34;alert(1)&#34;&gt;") for s in drawn["failures"])
        assert any('<span style="color:#cf222e">●</span> &lt;img' in s for s in drawn["health"])  # html() kept
        assert any(s.startswith('<a href="/claudeflare/requests/x1">') for s in drawn["failures"])
        # The same SQL in another shape, or as lines of JSON, is escaped or refused, never sent raw.
        failures = charts()["failures"]
        for extra in ({"_shape": "arrays"}, {"_shape": "array", "_nl": "on"}):
            url = chart_url(failures, range="24 hours", account="") + "&" + urlencode(extra)
            reply = await ds.client.get(url.replace("_shape=objects&", ""))
            assert "<img" not in reply.text, extra

    run(check())


def plugin_module(name):
    from datasette.plugins import pm

    return next(p for p in pm.get_plugins() if getattr(p, "__name__", "") == name)


def test_login_checks_passwords_off_the_loop_a_few_times_a_minute_and_the_password_tool_is_off(serve, monkeypatch):
    import threading

    ds = serve()
    login_plugin = plugin_module("claudeflare_login.py")
    threads = []
    real_verify = login_plugin.verify_password

    def verify(password, password_hash):
        threads.append(threading.current_thread())
        return real_verify(password, password_hash)

    monkeypatch.setattr(login_plugin, "verify_password", verify)

    async def check():
        assert await login(ds)  # the right password works
        assert threads and threading.main_thread() not in threads  # hashed in a worker thread, not on the loop
        for _ in range(login_plugin.LOGIN_ATTEMPTS - 1):
            assert await login(ds, "wrong password") == {}
        hashed = len(threads)
        page = await ds.client.get("/-/login")
        token = re.search(r'name="csrftoken" value="([^"]+)"', page.text).group(1)
        refused = await ds.client.post(
            "/-/login",
            data={"username": "admin", "password": PASSWORD, "csrftoken": token},
            cookies={"ds_csrftoken": page.cookies["ds_csrftoken"]},
        )
        assert refused.status_code == 429 and "Too many attempts" in refused.text and "ds_actor" not in refused.cookies
        assert len(threads) == hashed  # refused before hashing anything
        for method in ("get", "post"):
            tool = await getattr(ds.client, method)(
                "/-/password-tool", **({"data": {"password": "x"}} if method == "post" else {})
            )
            assert tool.status_code in (403, 404) and "pbkdf2" not in tool.text
        assert len(threads) == hashed
        # Basic auth is not the dashboard's: junk or a guess is neither hashed nor a 500.
        for value in ("Basic %%%", "Basic YWRtaW46d3Jvbmc="):
            reply = await ds.client.get("/claudeflare/requests.json", headers={"authorization": value})
            assert reply.status_code == 403
        assert len(threads) == hashed

    run(check())


def test_request_bodies_are_capped_before_anything_reads_them(serve):
    ds = serve()

    async def check():
        for path in ("/-/login", "/claudeflare/pause_account"):
            reply = await ds.client.post(
                path,
                content=b"username=admin&password=" + b"x" * 100_000,
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
            assert reply.status_code == 413, path
        assert await login(ds)  # a normal form still works


def test_account_health_shows_the_usage_endpoints_windows(serve, db_path):
    db = sqlite_utils.Database(db_path)
    db["account_status"].insert(
        {
            "name": "idle",
            "mode": "max",
            "tier": 20,
            "priority": 0,
            "state": "ok",
            "utilization_5h": 0.25,
            "reset_5h": iso_utc(NOW + 2 * 3600 + 1800),
            "utilization_7d_opus": 0.815,
            "reset_7d_opus": iso_utc(NOW + 3 * 86400 + 7200),
            "utilization_7d_sonnet": 0.05,
            "reset_7d_sonnet": iso_utc(NOW + 3600 * 5 + 60),
            "utilization_extra": 0.124,
            "usage_read_at": iso_utc(NOW),
            "requests_in_flight": 0,
            "updated_at": iso_utc(NOW),
        }
    )
    db.close()
    ds = serve()

    async def check():
        cookies = await login(ds)
        idle = {r["account"]: r for r in await chart_rows(ds, cookies, "health")}["idle"]
        assert re.match(r"25% <small>resets in 2 h (29|30) min</small>$", idle["5 h used"])
        opus, sonnet, extra = idle["model weeks, extra"].split("<br>")
        assert re.match(r"Opus 82% <small>resets in 3 d [12] h</small>$", opus)
        assert sonnet.startswith("Sonnet 5% <small>resets in 5 h ") and extra == "extra usage 12%"
        assert {r["account"]: r for r in await chart_rows(ds, cookies, "health")}["a"]["model weeks, extra"] == "–"
        used = {(r["window"], r["used"]) for r in await chart_rows(ds, cookies, "utilization", account="idle")}
        assert used == {("5 h", 0.25), ("7 d Opus", 0.815), ("7 d Sonnet", 0.05), ("extra usage", 0.124)}


def test_client_split_between_subscriptions_and_keys(serve, db_path):
    db = open_db(db_path)
    with db.conn:
        db.execute(
            "update requests set account_kind = case account when 'a' then 'subscription' when 'b' then 'api-key' end"
        )
    db.close()
    ds = serve()
    expected = {("laptop", "subscription"): 3, ("(loopback, no key)", "api-key"): 1, ("ci", "api-key"): 1}

    async def check():
        cookies = await login(ds)
        report = await canned(ds, cookies, "client_account_kinds", days="")
        assert {(r["client"], r["account_kind"]): r["requests"] for r in report} == expected
        laptop = next(r for r in report if r["client"] == "laptop")
        assert laptop["cost_usd"] == pytest.approx(1.03) and laptop["cache_read"] == 1900
        chart = await chart_rows(ds, cookies, "client-split", range="")
        assert {(r["client"], r["account_kind"]): r["requests"] for r in chart} == expected
        assert {(r["client"], r["account_kind"]) for r in await chart_rows(ds, cookies, "client-split")} == {
            ("laptop", "subscription"),
            ("(loopback, no key)", "api-key"),
            ("ci", "api-key"),
        }  # r5 is 40 days old
        assert sum(r["requests"] for r in await chart_rows(ds, cookies, "client-split")) == 4

    run(check())


def test_client_budgets_show_spend_against_each_budget(serve, db_path):
    db = sqlite_utils.Database(db_path)
    db["client_limits"].insert_all(
        [
            {
                "name": "ci",
                "budget_usd": 50.0,
                "per": "month",
                "spend_usd": 45.5,
                "resets_at": "2026-12-01T00:00:00Z",
                "rpm": 60,
            },
            {"name": "laptop", "models": "claude-sonnet-*", "concurrency": 2},
        ]
    )
    db.close()
    ds = serve()

    async def check():
        cookies = await login(ds)
        rows = {r["client"]: r for r in await chart_rows(ds, cookies, "client-budgets")}
        assert (
            rows["ci"]["spend"] == "$45.50 of $50.00 per month" and rows["ci"]["renews (UTC)"] == "2026-12-01T00:00:00Z"
        )
        assert rows["ci"]["used"] == '<span style="color:#bf8700">91%</span>' and rows["ci"]["per minute"] == 60
        assert (rows["laptop"]["spend"], rows["laptop"]["models"], rows["laptop"]["at once"]) == (
            "–",
            "claude-sonnet-*",
            2,
        )

    run(check())


def test_the_provider_filter_narrows_every_chart(serve, db_path):
    db = sqlite_utils.Database(db_path)
    with db.conn:
        db.execute("update requests set provider = case account when 'a' then 'anthropic' else 'bedrock' end")
        db.execute("update account_status set provider = case name when 'a' then 'anthropic' else 'bedrock' end")
    db.close()
    ds = serve()

    async def check():
        cookies = await login(ds)
        every = await chart_rows(ds, cookies, "requests", range="")  # accounts a (anthropic) and b (bedrock)
        only_a = await chart_rows(ds, cookies, "requests", range="", account="a")
        assert await chart_rows(ds, cookies, "requests", range="", provider="anthropic") == only_a != every
        assert {r["account"] for r in await chart_rows(ds, cookies, "health", provider="bedrock")} == {"b"}
        for name, chart in charts().items():  # every chart's SQL takes the filter, and the plugin allows it
            if chart.get("query"):
                await chart_rows(ds, cookies, name, provider="bedrock")

    run(check())
