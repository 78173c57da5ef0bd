"""The figures of `claudeflare stats`, from the flow log's view request_facts: the same rules
(what an error is, all tokens) as the dashboard's charts and reports (datasette-metadata.yml)."""

import sqlite3
from pathlib import Path

from .flowlog import account_status, open_db, query_readonly


def migrated(path: Path) -> Path:
    """The log, with the views of this version (a log written by an older proxy lacks request_facts)."""
    if path.exists():
        try:
            open_db(path).close()
        except (sqlite3.Error, OSError):  # a log we may only read: report from the views it has
            pass
    return path


def per_account(path: Path, since: str) -> list[dict]:
    """Per account since an ISO UTC timestamp: requests, tokens, cost, errors, 429s returned, and the
    proxy's last word on its state (account_status)."""
    rows = query_readonly(
        migrated(path),
        """select account, count(*) as requests, sum(input_tokens) as input_tokens, sum(output_tokens) as output_tokens,
                  sum(cache_read_input_tokens) as cache_read, sum(cache_creation_input_tokens) as cache_write,
                  round(sum(cost_usd), 6) as cost_usd, sum(is_error) as errors, sum(rate_limited) as rate_limited
           from request_facts where started_at >= ? and account is not null group by +account order by account""",
        [since],
    )
    status = account_status(path)
    for row in rows:
        seen = status.get(row["account"], {})
        row["state"] = seen.get("state") or "-"
        row["limited_until"] = seen.get("limited_until")
    return rows


def per_client(path: Path, since: str) -> list[dict]:
    """Per client key and kind of account (subscription / api-key): requests, tokens and cost, to see
    how much went to subscriptions (policy: only Claude Code is served by them)."""
    return query_readonly(
        migrated(path),
        """select coalesce(client, '-') as client, coalesce(account_kind, '-') as account_kind, count(*) as requests,
                  sum(tokens_total) as tokens, round(sum(cost_usd), 6) as cost_usd
           from request_facts where started_at >= ? and account is not null group by 1, 2 order by 1, 2""",
        [since],
    )


# --- the terminal UI's figures (claudeflare/tui.py), each an indexed range query on started_at ---------
# The same rules as the dashboard's headline numbers (datasette-metadata.yml): error = is_error, cache
# hit = cache read ÷ input_all, p95 time to first byte over successful messages.


def totals(path: Path, since: str) -> dict:
    """Requests, tokens by kind, cost, error rate, cache hit ratio and p95 time to first byte since `since`."""
    rows = query_readonly(
        path,
        """with r as (select input_tokens, output_tokens, cache_read_input_tokens, cache_creation_input_tokens, cost_usd,
                           is_error, input_all, ttfb_ms, message_ok from request_facts where started_at >= ?),
           q as (select ttfb_ms as v, row_number() over (order by ttfb_ms) as n, count(*) over () as total
                 from r where ttfb_ms is not null and message_ok)
           select count(*) as requests, coalesce(sum(input_tokens), 0) as input_tokens,
                  coalesce(sum(output_tokens), 0) as output_tokens, coalesce(sum(cache_read_input_tokens), 0) as cache_read,
                  coalesce(sum(cache_creation_input_tokens), 0) as cache_write, coalesce(sum(cost_usd), 0) as cost_usd,
                  1.0 * sum(is_error) / nullif(count(*), 0) as error_rate,
                  1.0 * sum(cache_read_input_tokens) / nullif(sum(input_all), 0) as cache_hit_ratio,
                  (select min(case when n >= 0.95 * total then v end) from q) as ttfb_p95_ms
           from r""",
        [since],
    )
    return rows[0] if rows else {}


def requests_per_minute(path: Path, since: str) -> dict[str, int]:
    """Requests per UTC minute ('YYYY-MM-DDTHH:MM') since `since`; minutes without any are absent."""
    rows = query_readonly(
        path,
        "select substr(started_at, 1, 16) as minute, count(*) as n from requests where started_at >= ? group by 1",
        [since],
    )
    return {r["minute"]: r["n"] for r in rows}


LATEST_COLUMNS = """id, started_at, account, client, model, status, error, ttfb_ms, duration_ms, input_tokens,
    output_tokens, cache_read_input_tokens, cache_creation_input_tokens, tokens_total, cost_usd, attempts, failovers,
    session, is_error"""


def latest_requests(
    path: Path, since: str, limit: int = 100, account: str | None = None, errors_only: bool = False
) -> list[dict]:
    """The newest requests since `since` first, optionally of one account or errors only: a scan of
    the started_at index, newest first, that stops after `limit` matches or at `since`."""
    where, params = ["started_at >= ?"], [since]
    if account is not None:
        where.append("+account = ?")  # +: stay on the started_at index
        params.append(account)
    if errors_only:
        where.append("is_error")
    return query_readonly(
        path,
        f"select {LATEST_COLUMNS} from request_facts where {' and '.join(where)} order by started_at desc limit ?",
        [*params, limit],
    )


def request_detail(path: Path, request_id: str) -> dict | None:
    rows = query_readonly(path, "select * from request_facts where id = ?", [request_id])
    if not rows:
        return None
    rows[0].pop("upstream_429", None)  # the failovers are shown themselves
    return rows[0]


def conversation(path: Path, session: str, limit: int = 500) -> list[dict]:
    """One conversation's requests in order (the session index), at most `limit`, the latest ones."""
    rows = query_readonly(
        path,
        f"select {LATEST_COLUMNS} from request_facts where session = ? order by started_at desc limit ?",
        [session, limit],
    )
    return rows[::-1]


def cost_per_account(path: Path, since: str) -> dict[str, float]:
    rows = query_readonly(
        path,
        "select account, coalesce(sum(cost_usd), 0) as cost from requests where started_at >= ? and account is not null "
        "group by +account",
        [since],  # +: the started_at index, as in requests_per_account
    )
    return {r["account"]: r["cost"] for r in rows}
