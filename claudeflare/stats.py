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
           from request_facts where started_at >= ? and account is not null group by account order by account""",
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
