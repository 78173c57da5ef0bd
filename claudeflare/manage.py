"""Changing accounts.toml as `claudeflare pause/resume/set/strategy` do: the one code path of the CLI
and the terminal UI. Blocking (a file lock); AccountsError says what is wrong, without a secret."""

from pathlib import Path

from .accounts import PRIORITY_MAX, PRIORITY_MIN, TIERS, AccountsError, account_table, edit_accounts
from .config import check_strategy, ensure_home


def set_paused(home: Path, name: str, paused: bool) -> None:
    edit_accounts(ensure_home(home), lambda doc: account_table(doc, name).__setitem__("paused", paused))


def set_tier_priority(home: Path, name: str, tier: int | None = None, priority: int | None = None) -> None:
    if tier is not None and (tier not in TIERS or isinstance(tier, bool)):
        raise AccountsError(f"tier must be {', '.join(map(str, TIERS))}")
    if priority is not None and (isinstance(priority, bool) or not PRIORITY_MIN <= priority <= PRIORITY_MAX):
        raise AccountsError(f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}")

    def change(doc):
        table = account_table(doc, name)
        if tier is not None:
            table["tier"] = tier
        if priority is not None:
            table["priority"] = priority

    edit_accounts(ensure_home(home), change)


def set_strategy(home: Path, strategy: str) -> None:
    try:
        check_strategy(strategy)
    except ValueError as e:
        raise AccountsError(str(e)) from None
    edit_accounts(ensure_home(home), lambda doc: doc.__setitem__("strategy", strategy))
