import sqlite3
import threading
import time

from claudeflare.clock import utc_now
from claudeflare.flowlog import FlowLog, migrations, open_db, requests_per_account

NOW = utc_now()  # rows older than the retention period would be pruned


def rows(path):
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("select * from requests order by id")]
    finally:
        conn.close()


def test_schema_by_migrations_in_wal_mode(tmp_path):
    db = open_db(tmp_path / "log.db")
    assert db.journal_mode == "wal"
    assert [m.name for m in migrations.applied(db)] == [
        "m001_requests",
        "m002_account_status",
        "m003_control",
        "m004_failovers",
        "m005_views",
        "m006_account_kind",
        "m007_usage_columns",
        "m008_resources",
        "m009_request_facts",
        "m010_client_limits",
        "m011_provider",
    ]
    assert "provider" in db["account_status"].columns_dict
    assert {
        "utilization_7d_opus",
        "reset_7d_opus",
        "utilization_7d_sonnet",
        "reset_7d_sonnet",
        "utilization_extra",
        "usage_read_at",
    } <= set(db["account_status"].columns_dict)
    columns = set(db["requests"].columns_dict)
    assert {
        "id",
        "started_at",
        "account",
        "strategy",
        "session",
        "method",
        "path",
        "model",
        "stream",
        "status",
        "error",
        "ttfb_ms",
        "duration_ms",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cost_usd",
        "attempts",
        "client",
        "account_kind",
        "provider",
    } <= columns
    db.close()
    assert migrations.pending(open_db(tmp_path / "log.db")) == []  # reopening applies nothing twice


def test_rows_are_written_in_batches_and_flushed_on_close(tmp_path):
    log = FlowLog(tmp_path / "log.db", interval=60).start()  # a long interval: only close() can flush
    for i in range(1234):
        log.log({"id": f"{i:05d}", "started_at": NOW, "account": "a"})
    log.close()
    assert len(rows(tmp_path / "log.db")) == 1234 and log.written == 1234


def test_rows_appear_while_running(tmp_path):
    log = FlowLog(tmp_path / "log.db", interval=0.05).start()
    log.log({"id": "x", "started_at": NOW})
    deadline = time.monotonic() + 5
    while log.written < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [r["id"] for r in rows(tmp_path / "log.db")] == ["x"]
    log.close()


def test_a_locked_database_delays_rows_but_loses_none(tmp_path):
    path = tmp_path / "log.db"
    open_db(path).close()
    blocker = sqlite3.connect(path, timeout=0, check_same_thread=False)
    blocker.execute("begin exclusive")
    log = FlowLog(path, interval=0.05)
    log.start()
    for i in range(10):
        log.log({"id": str(i), "started_at": NOW})
    time.sleep(1)
    assert log.written == 0
    threading.Timer(6, blocker.rollback).start()  # longer than sqlite's busy timeout: the writer must retry
    log.close(timeout=30)
    assert len(rows(path)) == 10


def test_a_duplicated_row_id_is_written_once(tmp_path):
    log = FlowLog(tmp_path / "log.db").start()
    log.log({"id": "same", "started_at": NOW, "status": 200})
    log.log({"id": "same", "started_at": NOW, "status": 200})
    log.close()
    assert len(rows(tmp_path / "log.db")) == 1


def test_requests_per_account(tmp_path):
    path = tmp_path / "log.db"
    assert requests_per_account(path, "2026-01-01") == {}
    db = open_db(path)
    db["requests"].insert_all(
        [
            {"id": "1", "started_at": "2026-01-02T10:00:00.000Z", "account": "a"},
            {"id": "2", "started_at": "2026-01-02T11:00:00.000Z", "account": "a"},
            {"id": "3", "started_at": "2026-01-01T23:00:00.000Z", "account": "a"},
            {"id": "4", "started_at": "2026-01-02T11:00:00.000Z", "account": None},
        ]
    )
    db.close()
    assert requests_per_account(path, "2026-01-02T00:00:00") == {"a": 2}


def test_old_rows_are_pruned_in_the_background(tmp_path):
    log = FlowLog(tmp_path / "log.db", interval=0.05, keep_days=30).start()
    log.log({"id": "old", "started_at": "2001-01-01T00:00:00.000Z"})
    log.log({"id": "new", "started_at": NOW})
    log.close()
    log = FlowLog(tmp_path / "log.db", interval=0.05, keep_days=30).start()  # a sweep runs at start
    log.close()
    assert [r["id"] for r in rows(tmp_path / "log.db")] == ["new"]


def test_a_row_sqlite_refuses_is_dropped_and_the_log_writes_on(tmp_path, caplog):
    # Rows straight to the writer, unsanitised: the writer itself must survive them.
    log = FlowLog(tmp_path / "log.db", interval=0.05).start()
    log.log({"id": "before", "started_at": NOW})
    log.log({"id": "surrogate", "started_at": NOW, "model": "\ud800"})
    log.log({"id": "huge", "started_at": NOW, "input_tokens": 10**20})
    log.log({"id": "after", "started_at": NOW})
    deadline = time.monotonic() + 5
    while log.written < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    log.log({"id": "later", "started_at": NOW})  # the thread is still alive
    log.close()
    assert [r["id"] for r in rows(tmp_path / "log.db")] == ["after", "before", "later"]
    assert "\ud800" not in caplog.text and "100000000000000000000" not in caplog.text


def test_chores_survive_a_bad_status_row(tmp_path):
    log = FlowLog(tmp_path / "log.db", interval=0.05).start()
    log.publish_status([{"name": "a\ud800", "priority": 10**20, "updated_at": NOW}])
    log.log({"id": "x", "started_at": NOW})
    log.close()
    conn = sqlite3.connect(tmp_path / "log.db")
    assert conn.execute("select name, priority from account_status").fetchall() == [("a?", 2**63 - 1)]
    assert conn.execute("select count(*) from requests").fetchone() == (1,)
    conn.close()


def test_storable_repairs_what_clients_send():
    from claudeflare.storable import storable

    row = storable(
        {
            "model": "<img src=x onerror=alert(1)>\x00\n" + "m" * 500,
            "path": "/v1/\udcff\udcfe",
            "session": "\ud800",
            "input_tokens": -(10**30),
            "ttfb_ms": float("nan"),
            "stream": True,
            "error": "e" * 10_000,
            "failovers": [{"account": "a", "status": 429}],
        }
    )
    assert row["model"].startswith("<img src=x onerror=alert(1)>??") and len(row["model"]) == 100
    assert row["path"] == "/v1/??" and row["session"] == "?"
    assert row["input_tokens"] == -(2**63) and row["ttfb_ms"] is None and row["stream"] == 1
    assert len(row["error"]) == 500 and row["failovers"] == '[{"account": "a", "status": 429}]'
    for v in row.values():
        if isinstance(v, str):
            v.encode("utf-8")  # no surrogate left
