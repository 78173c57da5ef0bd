"""The rules of client keys' limits (issue #13, part 1): budget per day/week/month, requests per minute,
concurrent requests, a model allow-list and an expiry, for each client key.

The limits are stored beside the key's hash in credentials.json (`"limits": {...}`): they belong to
the key, `client-key create/set` already edits that entry under the store's lock, and the proxy's
PoolWatcher reloads the file within a second. Limits are not secret, and nothing here reads a key.

Spend is counted from the flow log, so it survives restarts: the flow log's writer thread sums
`cost_usd` per budgeted client for its current period (`SpendCounter`) and publishes a plain
dict, to which the cost of each row queued since is added, so a burst can't overshoot a budget by
more than the requests in flight. Periods are calendar periods in UTC: a day
from 00:00, a week from Monday 00:00, a month from the 1st 00:00.
"""

import collections
import fnmatch
import functools
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from .clock import iso_utc

PERIODS = ("day", "week", "month")
MAX_BUDGET_USD = 1_000_000.0
MAX_RPM = 1_000_000
MAX_CONCURRENCY = 100_000
MAX_PATTERNS = 32
PATTERN_RE = re.compile(r"[A-Za-z0-9._:@/*?\[\]-]{1,128}")  # model names, with glob characters
LIMIT_KEYS = {"budget_usd", "per", "rpm", "concurrency", "models", "expires_at"}


class LimitsError(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    budget_usd: float | None = None
    per: str | None = None  # day | week | month, with budget_usd
    rpm: int | None = None
    concurrency: int | None = None
    models: tuple[str, ...] = ()  # glob patterns; empty: any model
    expires_at: str | None = None  # ISO 8601 UTC, "…Z"

    def to_json(self) -> dict:
        return {k: (list(v) if k == "models" else v) for k, v in asdict(self).items() if v not in (None, ())}

    @functools.cached_property  # limits are immutable: read once, not on every request
    def expires_epoch(self) -> float | None:
        return parse_when(self.expires_at).timestamp() if self.expires_at else None


# --- checking values (CLI and credentials.json alike) ----------------------------------------------


def check_budget(value) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= MAX_BUDGET_USD
    ):
        raise LimitsError(f"budget must be a number of dollars above 0 and at most {MAX_BUDGET_USD:g}")
    return float(value)


def check_count(what: str, value, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise LimitsError(f"{what} must be a whole number from 1 to {high}")
    return value


def check_patterns(value) -> tuple[str, ...]:
    patterns = value.split(",") if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not patterns or len(patterns) > MAX_PATTERNS:
        raise LimitsError(f"models must be 1 to {MAX_PATTERNS} patterns separated by commas")
    out = []
    for p in patterns:
        p = p.strip() if isinstance(p, str) else p
        if not isinstance(p, str) or not PATTERN_RE.fullmatch(p):
            raise LimitsError(
                "each model pattern must be 1-128 letters, digits, '.', '-', '_', ':', '@', '/' or globs * ? [ ]"
            )
        out.append(p)
    return tuple(out)


def parse_when(text) -> datetime:
    """An ISO date (the key expires at its 00:00 UTC) or date and time (UTC unless it names a zone)."""
    if not isinstance(text, str) or len(text) > 40:
        raise LimitsError("expiry must be an ISO date or date and time, e.g. 2027-01-31")
    try:
        when = datetime.fromisoformat(text)
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    except (ValueError, OverflowError):
        raise LimitsError("expiry must be an ISO date or date and time, e.g. 2027-01-31") from None


def iso_z(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_limits(raw) -> Limits:
    """The limits of one credentials.json entry (`"limits"`), checked; LimitsError says what is wrong."""
    if raw is None:
        return Limits()
    if not isinstance(raw, dict):
        raise LimitsError('"limits" must be an object')
    if set(raw) - LIMIT_KEYS:
        raise LimitsError(f"unknown key(s) in limits; allowed: {', '.join(sorted(LIMIT_KEYS))}")
    budget, per = raw.get("budget_usd"), raw.get("per")
    if (budget is None) != (per is None):
        raise LimitsError("a budget needs both budget_usd and per (day, week or month)")
    if per is not None and per not in PERIODS:
        raise LimitsError("per must be day, week or month")
    return Limits(
        budget_usd=None if budget is None else check_budget(budget),
        per=per,
        rpm=None if raw.get("rpm") is None else check_count("rpm", raw["rpm"], MAX_RPM),
        concurrency=None
        if raw.get("concurrency") is None
        else check_count("concurrency", raw["concurrency"], MAX_CONCURRENCY),
        models=() if raw.get("models") is None else check_patterns(raw["models"]),
        expires_at=None if raw.get("expires_at") is None else iso_z(parse_when(raw["expires_at"])),
    )


# --- periods ---------------------------------------------------------------------------------------


def period_start(per: str, now: float) -> datetime:
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if per == "day":
        return day
    if per == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def period_end(per: str, now: float) -> datetime:
    start = period_start(per, now)
    if per == "day":
        return start + timedelta(days=1)
    if per == "week":
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)


class SpendCounter:
    """Each budgeted client's spend this period, kept by the flow log (FlowLog.spend).

    The writer thread sums the log (`chore`) and publishes `(rows finished, {client: (period
    start, sum)})` in one assignment; on the loop, `log` notes the cost of each row queued since, so
    `spent` is the sum plus those — a dict lookup and a short list."""

    SUM_EVERY = 2.0  # seconds between sums while some key has a budget

    def __init__(self) -> None:
        self.budgets: dict[str, Limits] = {}  # every client key with limits (set on the loop)
        self.published: tuple[int, dict[str, tuple[str, float]]] | None = None  # set by the writer
        self.queued = 0  # rows queued so far (loop)
        # client -> (row number, cost) of rows queued since the last sum, and their total (loop)
        self.recent: dict[str, collections.deque[tuple[int, float]]] = {}
        self.recent_total: dict[str, float] = {}
        self._next_sum = 0.0  # writer
        self._budgets_summed: dict | None = None  # writer
        self._table: list[dict] | None = None  # what table client_limits holds (writer)

    # on the loop

    def log(self, row: dict) -> None:
        self.queued += 1
        cost = row.get("cost_usd")
        if cost and row.get("client") in self.budgets:
            self.recent.setdefault(row["client"], collections.deque()).append((self.queued, cost))
            self.recent_total[row["client"]] = self.recent_total.get(row["client"], 0.0) + cost

    def spent(self, client: str, per: str, now: float) -> float | None:
        """None until the flow log has summed this client's period."""
        published = self.published
        summed = published[1].get(client) if published else None
        if summed is None:
            return None
        recent = self.recent.get(client)
        while recent and recent[0][0] <= published[0]:  # in the sum already
            self.recent_total[client] -= recent.popleft()[1]
        base = summed[1] if summed[0] == period_key(per, int(now // 86400)) else 0.0  # a new period began
        return base + (self.recent_total.get(client, 0.0) if recent else 0.0)

    # on the writer thread

    def due(self) -> bool:
        budgets = self.budgets
        return budgets is not self._budgets_summed or (
            any(b.per for b in budgets.values()) and time.monotonic() >= self._next_sum
        )

    def chore(self, db, finished: int, now: float | None = None) -> None:
        """Sum each budgeted client's rows (all `finished` rows are written) and publish; keep table
        client_limits (the dashboard's) in step."""
        if not self.due():
            return
        budgets, now = self.budgets, time.time() if now is None else now
        self._budgets_summed, self._next_sum = budgets, time.monotonic() + self.SUM_EVERY
        starts = period_starts(budgets, now)
        sums = spend_since(db.conn, starts)
        self.published = (finished, {name: (starts[name], sums[name]) for name in starts})
        rows = budget_rows(budgets, sums, now)
        if rows != self._table:
            with db.conn:
                db["client_limits"].delete_where()
                if rows:
                    db["client_limits"].insert_all([{**row, "updated_at": iso_utc(now)} for row in rows], pk="name")
            self._table = rows


SPEND_SQL = "select coalesce(sum(cost_usd), 0) as spend from requests where client = ? and started_at >= ?"


def spend_since(conn, starts: dict[str, str]) -> dict[str, float]:
    """Each client's logged cost since its period's start (as `started_at` is written)."""
    return {client: float(conn.execute(SPEND_SQL, [client, start]).fetchone()[0]) for client, start in starts.items()}


@functools.lru_cache(maxsize=16)
def period_key(per: str, day: int) -> str:
    """The start of the period holding UTC day number `day`, as the flow log writes `started_at`:
    computed once a day, not on every request."""
    return iso_utc(period_start(per, day * 86400).timestamp())


def period_starts(budgets: dict[str, Limits], now: float) -> dict[str, str]:
    """The start of each budgeted client's current period, as the flow log writes `started_at`."""
    return {name: period_key(b.per, int(now // 86400)) for name, b in budgets.items() if b.per}


def budget_rows(budgets: dict[str, Limits], spend: dict[str, float], now: float) -> list[dict]:
    """One row per client key with limits, for the dashboard (table client_limits) and `client-key list`."""
    rows = []
    for name, limits in sorted(budgets.items()):
        rows.append(
            {
                "name": name,
                "budget_usd": limits.budget_usd,
                "per": limits.per,
                "period_start": iso_z(period_start(limits.per, now)) if limits.per else None,
                "resets_at": iso_z(period_end(limits.per, now)) if limits.per else None,
                "spend_usd": round(spend.get(name, 0.0), 6) if limits.per else None,
                "rpm": limits.rpm,
                "concurrency": limits.concurrency,
                "models": ",".join(limits.models) or None,
                "expires_at": limits.expires_at,
            }
        )
    return rows


# --- the models a body names -----------------------------------------------------------------------


def named_models(body: bytes, yielding: bool = False) -> list[str] | None:
    """Every string under a "model" key anywhere in a JSON body, as a lenient parser upstream could
    read it: escapes decoded, duplicate keys all counted, bad UTF-8 replaced, control characters and
    numbers of any length taken (a batch names one model per request). None: not JSON (a file
    upload). The hook makes the parse yielding (offloop.py) whatever `yielding` says."""
    found: list[str] = []

    def pairs(items):
        for k, v in items:
            if k == "model":
                found.append(v if isinstance(v, str) else f"<{type(v).__name__}>")
        return None  # nothing of the document is kept

    try:
        json.loads(
            body.decode("utf-8", "replace"),
            object_pairs_hook=pairs,
            strict=False,
            parse_int=len,
            parse_float=len,
            parse_constant=len,
        )
    except (ValueError, RecursionError):
        return None
    return found


def model_refused(models: list[str], patterns: tuple[str, ...]) -> str | None:
    return next((m for m in models if not any(fnmatch.fnmatchcase(m, p) for p in patterns)), None)
