"""The names of account states and attempt outcomes, and the one rule that says what state an
account is in for a person: its pool state (accounts.toml and its credential) over what the proxy
has seen of it (ratelimit.Health). Plain data, no mitmproxy: the proxy and the CLI both use it."""

import time
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .ratelimit import AccountHealth


class AccountState(StrEnum):
    # What the proxy has seen (ratelimit.AccountHealth)
    OK = "ok"
    WARNING = "warning"  # Anthropic says it is close to a limit
    LIMITED = "limited"
    OVERLOADED = "overloaded"
    NEEDS_LOGIN = "needs-login"
    DISABLED = "disabled"  # by Anthropic, until its credential changes
    # What accounts.toml and the credential store say (accounts.Pool.state)
    PAUSED = "paused"
    NO_CREDENTIALS = "no-credentials"
    MALFORMED_CREDENTIALS = "malformed-credentials"
    TOKEN_EXPIRED = "token-expired"


BENCHED = (AccountState.LIMITED, AccountState.OVERLOADED)  # out until a time, then back by itself
REFUSED = (AccountState.NEEDS_LOGIN, AccountState.DISABLED)  # out until its credential changes


class Outcome(StrEnum):
    """What one attempt's reply means (ratelimit.Health.observe, policy.refusal)."""

    OK = "ok"
    LIMITED = "limited"
    FAMILY_LIMITED = "family-limited"  # only the model family asked for is out of its weekly window
    WINDOWLESS = "windowless"  # one request refused, not the account
    OVERLOADED = "overloaded"
    AUTH = "auth"
    UNREACHABLE = "unreachable"
    DISABLED = "disabled"
    CLAUDE_CODE_ONLY = "claude-code-only"
    LONG_CONTEXT = "long-context"
    ERROR = "error"


# Refusals another attempt (another account, a fresh token, a pause) may get past.
RETRY_OUTCOMES = frozenset(Outcome) - {Outcome.OK, Outcome.ERROR}


class Seen(NamedTuple):
    """What the proxy saw of an account, as it published it (table account_status)."""

    state: str
    reason: str | None = None
    until: float | None = None


def effective_state(
    pool_state: str, health: "Seen | AccountHealth | None", now: float | None = None
) -> tuple[str, str | None]:
    """(state, reason) as a person should see it: the pool's state unless it is ok, else what the
    proxy has seen (ratelimit.AccountHealth, or Seen) — where a bench whose time has passed reads
    as ok, though nothing has cleared it: reading changes no state."""
    if pool_state != AccountState.OK or health is None:
        return pool_state, None
    if health.state in BENCHED and health.until is not None and (time.time() if now is None else now) >= health.until:
        return AccountState.OK, None
    return health.state, health.reason
