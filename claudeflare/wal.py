"""WAL mode for a database that several processes open at once (workers starting together)."""

import sqlite3
import time


def enable_wal(conn: sqlite3.Connection, timeout: float = 5.0) -> None:
    """Switching a new file to WAL takes an exclusive lock without the busy handler: a process that
    opens the file at that moment gets "database is locked" at once, not after `timeout`. So retry."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("pragma journal_mode=wal")
            return
        except sqlite3.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
