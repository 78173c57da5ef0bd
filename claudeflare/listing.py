"""The rows of `claudeflare list`, as plain data: each account from accounts.toml and the credential
store, with its requests today and what the running proxy last saw of it (table account_status).
The CLI formats them; `list --json` prints them as they are."""

import time
from datetime import UTC, datetime
from pathlib import Path

from .accounts import load_pool
from .config import DB_FILE
from .flowlog import account_status, requests_per_account
from .states import Seen, effective_state

STATUS_FRESH = 10  # seconds: the proxy rewrites account_status every second while it runs
# From the usage endpoint too (idle subscriptions), beside the reply headers' 5h and 7d utilization.
USAGE_COLUMNS = (
    "reset_5h",
    "reset_7d",
    "utilization_7d_opus",
    "reset_7d_opus",
    "utilization_7d_sonnet",
    "reset_7d_sonnet",
    "utilization_extra",
    "usage_read_at",
)


def account_rows(home: Path) -> list[dict]:
    """One dict per account, in accounts.toml's order. Raises AccountsError / CredentialStoreError
    for a broken file."""
    pool = load_pool(home)
    db = home / DB_FILE
    midnight = datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
    today = requests_per_account(db, midnight.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    # A stale row is from a proxy that no longer runs: its rate-limit state no longer holds.
    live_after = datetime.fromtimestamp(time.time() - STATUS_FRESH, UTC).isoformat()
    status = {n: r for n, r in account_status(db).items() if (r["updated_at"] or "") >= live_after}
    rows = []
    for account in pool.accounts:
        credential = pool.credential(account)
        seen = status.get(account.name, {})
        state, _ = effective_state(
            pool.state(account), Seen(seen["state"], seen["reason"]) if seen.get("state") else None
        )
        rows.append(
            {
                "name": account.name,
                "provider": account.provider,
                "mode": account.mode,
                "tier": account.tier,
                "priority": account.priority,
                "state": state,
                "token_expires_at": credential.expires_at if credential and not credential.api_key else None,
                "requests_today": today.get(account.name, 0),
                "limited_until": seen.get("limited_until"),
                "utilization_5h": seen.get("utilization_5h"),
                "utilization_7d": seen.get("utilization_7d"),
                "reason": seen.get("reason"),
                **{column: seen.get(column) for column in USAGE_COLUMNS},
            }
        )
    return rows
