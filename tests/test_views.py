"""The flow log's views (m009): request_facts, time_buckets, and `claudeflare stats` agreeing with the
dashboard because both read them."""

import json
import sqlite3
import time

import sqlite_utils
import yaml
from click.testing import CliRunner
from datasette_dashboards import replace_opts_in_query

from claudeflare import stats
from claudeflare.cli import METADATA, cli
from claudeflare.clock import iso_utc
from claudeflare.config import DB_FILE
from claudeflare.flowlog import migrations, open_db

NOW = time.time()


def request(id, minutes_ago=1, **kw):
    return {
        "id": id,
        "started_at": iso_utc(NOW - minutes_ago * 60),
        "account": "a",
        "path": "/v1/messages",
        "status": 200,
        "error": None,
        "input_tokens": 1,
        "output_tokens": 2,
        "cache_read_input_tokens": 3,
        "cache_creation_input_tokens": 4,
        "cost_usd": 0.5,
        "failovers": None,
        **kw,
    }


ROWS = [
    request("ok"),
    request("no-reply", status=None),  # no reply reached the client, and no error was named
    request("cut-short", error="client disconnected"),
    request("limited", status=429, error="rate_limit_error"),
    request("failed-over", failovers=json.dumps([{"account": "b", "status": 529}, {"account": "c", "status": 429}])),
    request("bad-json", failovers="[{"),
    request("no-counts", cache_read_input_tokens=None, path="/v1/messages/count_tokens"),
]


def facts(path) -> dict[str, dict]:
    return {r["id"]: r for r in sqlite_utils.Database(path).query("select * from request_facts")}


def test_request_facts_defines_each_figure_once(tmp_path):
    db = open_db(tmp_path / "log.db")
    db["requests"].insert_all(ROWS)
    db.close()
    f = facts(tmp_path / "log.db")
    assert {id for id, r in f.items() if r["is_error"]} == {"no-reply", "cut-short", "limited"}
    assert {id for id, r in f.items() if r["rate_limited"]} == {"limited"}
    assert {id for id, r in f.items() if r["upstream_429"]} == {"failed-over"}  # junk JSON is no failover
    assert {id for id, r in f.items() if r["message_ok"]} == {"ok", "cut-short", "failed-over", "bad-json"}
    assert (f["ok"]["input_all"], f["ok"]["tokens_total"]) == (8, 10)
    assert (f["no-counts"]["input_all"], f["no-counts"]["tokens_total"]) == (None, None)  # adds nothing to a ratio
    assert f["ok"]["day"] == f["ok"]["started_at"][:10] and abs(f["ok"]["epoch"] - (NOW - 60)) < 1
    assert set(f["ok"]) >= set(
        sqlite_utils.Database(tmp_path / "log.db")["requests"].columns_dict
    )  # every column of requests


def test_time_buckets_cover_each_range_up_to_now(tmp_path):
    db = open_db(tmp_path / "log.db")
    db["requests"].insert(request("old", minutes_ago=3 * 24 * 60 + 5))
    before = time.time()
    buckets = {}
    for r in db.query("select * from time_buckets order by range, t"):
        buckets.setdefault(r["range"], []).append(r)
    assert {k: v[0]["seconds"] for k, v in buckets.items()} == {
        "1 hour": 60,
        "6 hours": 300,
        "24 hours": 900,
        "7 days": 3600,
        "30 days": 14400,
        "90 days": 86400,
        "": 86400,
    }
    day = buckets["24 hours"]
    assert len(day) in (96, 97) and all(b["t"] % 900 == 0 and b["seconds"] == 900 for b in day)
    assert [b["t"] for b in day] == list(range(day[0]["t"], day[-1]["t"] + 1, 900))  # no gaps
    after = time.time()  # the view's 'now' is between the two
    assert (
        day[0]["t"] <= after - 86400
        and before - 86400 < day[0]["t"] + 900
        and day[-1]["t"] <= after
        and before < day[-1]["t"] + 900
    )
    assert day[0]["time"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(day[0]["t"]))
    assert len(buckets[""]) == 4  # all time: daily from the oldest request's day
    db.close()


def dashboard_sql(name: str) -> str:
    meta = yaml.safe_load(METADATA.read_text())
    queries = meta["databases"]["claudeflare"]["queries"]
    if name in queries:
        return queries[name]["sql"]
    return replace_opts_in_query(
        meta["plugins"]["datasette-dashboards"]["pool"]["charts"][name]["query"], {"range": "", "account": ""}
    )


def cli_stats(home, since: str) -> dict:
    result = CliRunner().invoke(cli, ["--home", str(home), "stats", "--since", since, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_stats_and_the_dashboard_count_errors_and_tokens_alike(tmp_path):
    home = tmp_path / "home"
    db = open_db(home / DB_FILE)
    db["requests"].insert_all(ROWS + [request("old", minutes_ago=600, status=None)])
    db.close()
    conn = sqlite3.connect(home / DB_FILE)
    conn.row_factory = sqlite3.Row
    report = {r["account"]: dict(r) for r in conn.execute(dashboard_sql("usage_by_account"), {"days": ""})}
    split = {r["client"]: dict(r) for r in conn.execute(dashboard_sql("client-split"), {"range": ""})}
    conn.close()
    ever = cli_stats(home, "2000-01-01")
    assert [(r["account"], r["errors"]) for r in ever["accounts"]] == [("a", report["a"]["errors"])]
    assert report["a"]["errors"] == 4  # no-reply, cut-short, limited, old
    assert [r["errors"] for r in cli_stats(home, "1h")["accounts"]] == [3]
    assert [r["tokens"] for r in ever["clients"]] == [split["(loopback, no key)"]["tokens"]]


def test_stats_read_a_log_written_before_the_views(tmp_path):
    path = tmp_path / "log.db"
    db = sqlite_utils.Database(path)
    migrations.apply(db, stop_before="m009_request_facts")  # as an older proxy left it
    db["requests"].insert(request("ok", status=500))
    db.close()
    assert [(r["account"], r["requests"], r["errors"]) for r in stats.per_account(path, "2000-01-01T00:00:00")] == [
        ("a", 1, 1)
    ]
