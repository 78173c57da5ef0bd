"""Retention of the flow log: request rows are kept `REQUEST_KEEP_DAYS` days by default.

Request and reply bodies are not captured yet, so there is nothing to prune for them; when they are,
they are to be kept `BODY_KEEP_DAYS` days.

`prune` deletes in small batches, each its own short transaction, so a concurrent writer (the flow
log's thread, another proxy) or a reader (Datasette) never waits long for the database.
"""

import time

import sqlite_utils

from .clock import iso_utc

REQUEST_KEEP_DAYS = 90.0
BODY_KEEP_DAYS = 1.0  # bodies are not captured yet
BATCH = 500


def cutoff(keep_days: float, now: float | None = None) -> str:
    """The ISO timestamp before which rows go."""
    return iso_utc((time.time() if now is None else now) - keep_days * 86400)


def prune(db: sqlite_utils.Database, keep_days: float, now: float | None = None, batch: int = BATCH) -> int:
    """Delete request rows that started more than `keep_days` days before `now`; returns how many.

    Uses the index on started_at; at most `batch` rows per transaction. `keep_days <= 0` keeps all.
    """
    if keep_days <= 0 or not db["requests"].exists():
        return 0
    before = cutoff(keep_days, now)
    deleted = 0
    while True:
        with db.conn:
            cursor = db.conn.execute(
                "delete from requests where rowid in (select rowid from requests where started_at < ? limit ?)",
                [before, batch],
            )
        deleted += cursor.rowcount
        if cursor.rowcount < batch:
            return deleted
