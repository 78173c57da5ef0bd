"""Workers opening one new database at once (claudeflare/wal.py)."""

import sqlite3
import threading

from claudeflare import state
from claudeflare.wal import enable_wal

ROUNDS, AT_ONCE = 40, 4  # plain `pragma journal_mode=wal` failed in about one round in three here


def at_once(work) -> list:
    """`work()` on AT_ONCE threads released together (SQLite's file locks are the same across
    threads and processes); what each returned or raised."""
    gate, results = threading.Barrier(AT_ONCE), []

    def run():
        gate.wait()
        try:
            results.append(work())
        except Exception as e:
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(AT_ONCE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_connections_switching_a_new_file_to_wal_together_all_succeed(tmp_path):
    for n in range(ROUNDS):
        path = tmp_path / f"{n}.db"

        def open_one(path=path):
            conn = sqlite3.connect(path, timeout=5)
            try:
                enable_wal(conn)
                return conn.execute("pragma journal_mode").fetchone()[0]
            finally:
                conn.close()

        assert at_once(open_one) == ["wal"] * AT_ONCE


def test_workers_starting_together_claim_the_usage_read_once(tmp_path):
    """A lost switch used to fail the claim open: every worker read the usage endpoint."""
    for n in range(ROUNDS):
        home = tmp_path / str(n)
        home.mkdir()
        claims = at_once(lambda home=home: state.HomeState(home).claim_usage_read("m", 60))
        assert sorted(claims) == [False] * (AT_ONCE - 1) + [True]


def test_a_switch_that_stays_locked_still_fails_within_its_timeout(tmp_path):
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("begin exclusive")
    conn = sqlite3.connect(path, timeout=0)
    try:
        enable_wal(conn, timeout=0.2)
    except sqlite3.OperationalError as e:
        assert "locked" in str(e)
    else:
        raise AssertionError("the switch succeeded under an exclusive lock")
