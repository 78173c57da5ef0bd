"""Rate-limit signals (contract §4) and what they mean for each account.

`read_signals` turns one reply's headers into plain data; `Health` keeps, per account, the state
the balancer routes by (ok / warning / limited / overloaded / needs-login), until when, and why.
Both are pure and synchronous: the proxy calls them from its event loop.
"""

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime

from .states import REFUSED, AccountState, Outcome

MAX_BENCH = 24 * 3600  # never trust a reset further away than this
COOLDOWN_MIN, COOLDOWN_MAX = 30.0, 300.0  # limited with no reset given: 30 s, 60 s, … 5 min
OVERLOAD_BENCH = 5.0  # 529 is Anthropic-wide: seconds, never hours
SAME_WINDOW = 60.0  # a reset jitters by a second or two between replies; a jump past this is a new window
ACCOUNT_WINDOWS = {"5h", "7d"}  # other windows (7d_oi, 7d_opus, …) bind some models only
FAMILY_CLAIMS = {"seven_day_opus": "opus", "seven_day_sonnet": "sonnet"}

UNIFIED = "anthropic-ratelimit-unified-"
WINDOW_RE = re.compile(r"^anthropic-ratelimit-unified-(?P<window>[a-z0-9_]+)-(?P<field>status|utilization|reset)$")
CONSOLE_RE = re.compile(
    r"^anthropic-ratelimit-(?P<kind>requests|tokens|input-tokens|output-tokens)-(?P<field>limit|remaining|reset)$"
)


@dataclass
class Window:
    status: str | None = None
    utilization: float | None = None
    reset: float | None = None  # epoch seconds


@dataclass
class Signals:
    status: str | None = None  # allowed | allowed_warning | rejected
    reset: float | None = None
    claim: str | None = None  # representative claim: five_hour, seven_day, …
    windows: dict[str, Window] = field(default_factory=dict)  # "5h", "7d", …
    overage_status: str | None = None
    overage_reason: str | None = None
    console_remaining: dict[str, int] = field(default_factory=dict)
    console_reset: dict[str, float] = field(default_factory=dict)
    retry_after: float | None = None  # seconds
    should_retry: bool | None = None

    @property
    def account_exhausted(self) -> bool:
        """Exhausted for every model: a model-scoped weekly window alone (contract §4) binds one family."""
        if any(w.status == "rejected" for n, w in self.windows.items() if n in ACCOUNT_WINDOWS):
            return True
        if self.claim in FAMILY_CLAIMS:
            return False
        scoped = any(w.status == "rejected" for n, w in self.windows.items() if n not in ACCOUNT_WINDOWS)
        return self.exhausted and not scoped

    @property
    def exhausted(self) -> bool:
        """Whether the reply says a limit is used up. A 429 without that (a windowless one, only
        `x-should-retry`) refuses one request, not the account."""
        return (
            self.status == "rejected"
            or any(w.status == "rejected" for w in self.windows.values())
            or any(left <= 0 for left in self.console_remaining.values())
        )


def _float(value: str | None) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _rfc3339(value: str | None) -> float | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        return None


def _retry_after(value: str | None, now: float) -> float | None:
    seconds = _float(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def read_signals(headers: Mapping[str, str] | Iterable[tuple[str, str]], now: float | None = None) -> Signals:
    """From a mapping or (name, value) pairs; called on every reply, so it touches only what it needs."""
    now = time.time() if now is None else now
    s = Signals()
    retry_after = should_retry = None
    for raw_name, value in headers.items() if isinstance(headers, Mapping) else headers:
        name = raw_name.lower()
        if name == "retry-after":
            retry_after = value
        elif name == "x-should-retry":
            should_retry = value
        if not name.startswith("anthropic-ratelimit-"):
            continue
        if name.startswith(UNIFIED):
            rest = name[len(UNIFIED) :]
            if rest == "status":
                s.status = value.strip()
            elif rest == "reset":
                s.reset = _float(value)
            elif rest == "representative-claim":
                s.claim = value.strip()
            elif rest == "overage-status":
                s.overage_status = value.strip()
            elif rest == "overage-disabled-reason":
                s.overage_reason = value.strip()
            elif m := WINDOW_RE.match(name):
                window = s.windows.setdefault(m["window"], Window())
                if m["field"] == "status":
                    window.status = value.strip()
                elif m["field"] == "utilization":
                    window.utilization = _float(value)
                else:
                    window.reset = _float(value)
        elif m := CONSOLE_RE.match(name):
            if m["field"] == "remaining" and (number := _float(value)) is not None:
                s.console_remaining[m["kind"]] = int(number)
            elif m["field"] == "reset" and (when := _rfc3339(value)) is not None:
                s.console_reset[m["kind"]] = when
    s.retry_after = _retry_after(retry_after, now)
    s.should_retry = None if should_retry is None else should_retry.strip().lower() == "true"
    return s


def error_details(body: bytes) -> tuple[str | None, str | None]:
    """(error.type, error.details.error_code) of an Anthropic error body; Nones when it is not one."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        return None, None
    if not isinstance(error, dict):
        return None, None
    details = error.get("details")
    code = details.get("error_code") if isinstance(details, dict) else None
    kind = error.get("type")
    return (kind if isinstance(kind, str) else None), (code if isinstance(code, str) else None)


def limit_reset(signals: Signals, now: float) -> float | None:
    """When the binding limit lifts, from the most specific signal present."""
    candidates = []
    if signals.reset:
        candidates.append(signals.reset)
    candidates += [w.reset for w in signals.windows.values() if w.reset and w.status == "rejected"]
    candidates += [
        signals.console_reset[k]
        for k, left in signals.console_remaining.items()
        if left <= 0 and k in signals.console_reset
    ]
    if signals.retry_after is not None:
        candidates.append(now + signals.retry_after)
    future = [c for c in candidates if c > now]
    return max(future) if future else None


@dataclass
class AccountHealth:
    state: AccountState = AccountState.OK  # ok | warning | limited | overloaded | needs-login | disabled
    until: float | None = None  # limited / overloaded until (epoch seconds)
    reason: str | None = None
    utilization: dict[str, float] = field(default_factory=dict)  # window -> latest fraction
    resets: dict[str, float] = field(default_factory=dict)
    cooldowns: int = 0  # consecutive limits without a reset: the exponent of the cooldown
    extra_usage: float | None = None  # share of the paid extra-usage pool spent (usage endpoint; not a window)
    usage_read_at: float | None = None  # when the usage endpoint was last read for the account
    family_until: dict[str, float] = field(default_factory=dict)  # model family -> out of its weekly window until
    refused_credential: str | None = None  # fingerprint of the credential Anthropic disabled or refused (needs-login)


class Health:
    """Per-account state from the replies seen; decides who may take traffic now."""

    def __init__(self, clock=time.time, overload_bench: float = OVERLOAD_BENCH):
        self.clock = clock
        self.overload_bench = overload_bench  # the proxy sets its retry delay: a 529 benches no longer
        self.accounts: dict[str, AccountHealth] = {}
        self.on_bench: Callable[[str, float, str | None, str], None] | None = None  # shared state (state.py)

    def get(self, name: str) -> AccountHealth:
        return self.accounts.setdefault(name, AccountHealth())

    def view(self, name: str) -> AccountHealth:
        """The account's health to read: for an account not seen yet, a blank one, not kept."""
        return self.accounts.get(name) or AccountHealth()

    def available(self, name: str, now: float | None = None, family: str | None = None) -> bool:
        """Whether the account may take a request (for a model of `family`) now. A read: a bench whose
        time has passed is available, and shows as ok through states.effective_state."""
        health = self.accounts.get(name)
        if health is None:
            return True
        if health.state in REFUSED:
            return False
        now = self.clock() if now is None else now
        if now < health.family_until.get(family, -math.inf):
            return False
        if health.state in (AccountState.OK, AccountState.WARNING):
            return True
        return health.until is not None and now >= health.until

    def utilization_now(self, name: str, now: float) -> float:
        """The highest utilization of the account's windows that have not reset since it was seen; a
        model-scoped window (7d_oi, …) binds some models only, so the account is not near its limit."""
        health = self.accounts.get(name)
        if health is None:
            return 0.0
        current = [
            u for w, u in health.utilization.items() if w in ACCOUNT_WINDOWS and health.resets.get(w, math.inf) > now
        ]
        return max(current, default=0.0)

    def soonest(self, names, family: str | None = None) -> float | None:
        """The earliest time one of these benched accounts comes back (for a model of `family`)."""
        now, times = self.clock(), []
        for health in (self.accounts[n] for n in names if n in self.accounts):
            back = max(health.until or 0.0, health.family_until.get(family, 0.0))
            if back > now:  # a bench that has passed is over
                times.append(back)
        return min(times) if times else None

    def observe(
        self,
        name: str,
        status: int,
        signals: Signals,
        error_type: str | None = None,
        error_code: str | None = None,
        family: str | None = None,
    ) -> Outcome:
        """Record a reply to a request for a model of `family`; returns what it means: ok, limited,
        family-limited (only that model family is out of its week), windowless, overloaded, auth, error."""
        now = self.clock()
        health = self.get(name)
        for window_name, window in signals.windows.items():
            if window.utilization is not None:
                health.utilization[window_name] = window.utilization
            if window.reset:
                health.resets[window_name] = window.reset
        if 200 <= status < 300 and error_type is None:
            health.cooldowns = 0
            warning = signals.status == "allowed_warning"
            health.state, health.until = (AccountState.WARNING if warning else AccountState.OK), None
            health.reason = f"near the {signals.claim or 'window'} limit" if warning else None
            return Outcome.OK
        if status == 429 or error_type == "rate_limit_error":
            return self._limited(name, health, signals, error_code, now, family)
        if status == 529 or error_type == "overloaded_error":
            delay = min(self.overload_bench, signals.retry_after or self.overload_bench)
            health.state, health.until, health.reason = AccountState.OVERLOADED, now + delay, "overloaded (529)"
            return Outcome.OVERLOADED
        if status == 401:
            return Outcome.AUTH
        return Outcome.ERROR

    def _limited(
        self, name: str, health: AccountHealth, signals: Signals, error_code: str | None, now: float, family: str | None
    ) -> Outcome:
        # An overflow out of credits while the windows are allowed is no limit of the plan (contract §4).
        spend = error_code == "enforced_spend_limit_reached"
        if not spend and not signals.exhausted:
            return Outcome.WINDOWLESS  # one request refused, not the account: fail over, don't bench
        family = FAMILY_CLAIMS.get(signals.claim or "", family)
        if not spend and not signals.account_exhausted:
            if family is None:
                return Outcome.WINDOWLESS  # a model-scoped window, for a model we could not tell
            scoped = [
                w.reset
                for n, w in signals.windows.items()
                if n not in ACCOUNT_WINDOWS and w.status == "rejected" and w.reset and w.reset > now
            ]
            reset = max(scoped, default=None) or limit_reset(signals, now) or now + COOLDOWN_MIN
            health.family_until[family] = min(reset, now + MAX_BENCH)
            self._benched(name, health.family_until[family], family, f"{family} weekly limit")
            return Outcome.FAMILY_LIMITED
        reset = limit_reset(signals, now)
        if reset is None:
            delay = min(COOLDOWN_MAX, COOLDOWN_MIN * 2**health.cooldowns)
            health.cooldowns += 1
            until, how = now + delay, f"no reset given, cooling down {delay:.0f}s"
        else:
            until, how = min(reset, now + MAX_BENCH), "until the reset"
            if health.until and abs(until - health.until) < SAME_WINDOW:
                until = max(until, health.until)  # the same window, its reset jittered: keep the later
        if spend:
            why = "spend limit reached"
        else:
            why = f"{signals.claim or 'rate'} limit"
            if signals.overage_reason == "out_of_credits":
                why += " and out of credits"
        health.state, health.until, health.reason = AccountState.LIMITED, until, f"{why}, {how}"
        self._benched(name, until, None, health.reason)
        return Outcome.LIMITED

    def _benched(self, name: str, until: float, family: str | None, reason: str) -> None:
        if self.on_bench:
            self.on_bench(name, until, family, reason)

    def adopt_bench(self, name: str, until: float, family: str | None, reason: str | None) -> None:
        """Another proxy saw the account limited (state.py): it is benched here too, never shorter."""
        until = min(until, self.clock() + MAX_BENCH)
        health = self.get(name)
        if family:
            health.family_until[family] = max(until, health.family_until.get(family, 0.0))
        elif health.state not in REFUSED and (health.state != AccountState.LIMITED or (health.until or 0) < until):
            health.state, health.until, health.reason = (
                AccountState.LIMITED,
                until,
                reason or "limited (seen by another proxy)",
            )

    def observe_usage(self, name: str, windows: Mapping[str, tuple[float, float | None]], extra: float | None) -> None:
        """What the usage endpoint says (fractions, resets): an idle account's windows, which the
        headroom of new conversations then counts. It benches nothing: past 100% an account with
        extra usage still serves, and a reply's headers say when it does not."""
        health = self.get(name)
        for window, (used, reset) in windows.items():
            health.utilization[window] = used
            if reset:
                health.resets[window] = reset
            else:
                health.resets.pop(window, None)  # a window not started yet
        health.extra_usage, health.usage_read_at = extra, self.clock()

    def disable(self, name: str, reason: str, credential: str | None) -> None:
        """Anthropic says the account is gone: no traffic until its credential differs from `credential`."""
        self._refuse(name, AccountState.DISABLED, reason, credential)

    def needs_login(self, name: str, reason: str, credential: str | None) -> None:
        """Anthropic refused the credential (fingerprint `credential`): no traffic until it changes."""
        self._refuse(name, AccountState.NEEDS_LOGIN, reason, credential)

    def _refuse(self, name: str, state: AccountState, reason: str, credential: str | None) -> None:
        health = self.get(name)
        health.state, health.until, health.reason, health.refused_credential = state, None, reason, credential

    def credential_seen(self, name: str, credential: str | None) -> None:
        """The account's credential now has fingerprint `credential`: a new login or key ends a refusal."""
        health = self.accounts.get(name)
        if health and health.state in REFUSED and credential != health.refused_credential:
            self.clear(name)

    def clear(self, name: str) -> None:
        self.accounts.pop(name, None)
