"""Making a row storable: the one place where values bound for SQLite are made safe to write.

Much of a flow-log row comes from the client (path, model, session, error text…) and may hold lone
surrogates (mitmproxy decodes undecodable bytes with surrogateescape; JSON allows "\\ud800"),
control characters, or megabytes. SQLite's driver refuses a surrogate and an integer past int64
by raising, so every value is repaired here before it is queued for the writer thread.
"""

import functools
import json
import math

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DEFAULT_CAP = 1000  # characters, for a text column not named below
# Longest text kept per column; client-supplied ones short enough to read in a table cell.
CAPS = {
    "model": 100,
    "method": 20,
    "path": 500,
    "session": 200,
    "client": 64,
    "account": 64,
    "strategy": 32,
    "stop_reason": 64,
    "request_id": 200,
    "error": 500,
    "reason": 500,
    "result": 500,
    "failovers": 20_000,  # JSON the proxy builds: a list per attempt
}
# Columns shown as plain one-line text: anything not printable becomes "?".
PLAIN = {"model", "method", "path", "session", "client", "account", "strategy", "stop_reason", "request_id"}


def text(value: str, cap: int = DEFAULT_CAP, plain: bool = False) -> str:
    """Valid UTF-8 (surrogates replaced), at most `cap` characters, and printable when `plain`."""
    if len(value) <= cap and value.isascii() and (value.isprintable() or not plain):
        return value  # the common case, checked cheaply: ASCII holds no surrogate
    value = value[: cap + 1].encode("utf-8", "replace").decode("utf-8")
    if plain and not value.isprintable():
        value = "".join(c if c.isprintable() else "?" for c in value)
    return value if len(value) <= cap else value[: cap - 1] + "…"


def value(column: str, v):
    if v is None or isinstance(v, str) and not v:
        return v
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return min(max(v, INT64_MIN), INT64_MAX)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    elif not isinstance(v, str):
        v = json.dumps(v, default=str, ensure_ascii=False)
    return text(v, CAPS.get(column, DEFAULT_CAP), column in PLAIN)


def storable(row: dict) -> dict:
    """A copy of `row` that SQLite accepts whatever the client sent."""
    return {_column(k): value(k, v) for k, v in row.items()}


@functools.lru_cache(maxsize=256)  # the writers' column names: a handful, repeated on every row
def _column(name) -> str:
    return text(str(name), 64, plain=True)
