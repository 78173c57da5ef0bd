"""Choosing the account for each request.

Pure and synchronous: the proxy calls it from mitmproxy's event loop only, so it needs no locks.
The caller passes the accounts usable right now; the balancer keeps the routing state (in-flight
counts, conversation bindings, rotation cursors) keyed by account name, so a reloaded pool keeps it.
"""

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence

from .accounts import Account
from .config import DEFAULT_SESSION_HOURS, DEFAULT_STRATEGY, DEFAULT_SWITCH_UTILIZATION, check_strategy

logger = logging.getLogger(__name__)

PRUNE_EVERY = 60.0  # seconds between sweeps of expired conversation bindings
# Bindings kept at most: each new conversation adds one for session_seconds, so a client inventing
# session ids would otherwise grow memory without end. Past it, the least recently bound goes.
MAX_SESSIONS = 50_000


class Balancer:
    def __init__(
        self,
        strategy: str = DEFAULT_STRATEGY,
        session_seconds: float = DEFAULT_SESSION_HOURS * 3600,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.strategy = check_strategy(strategy)
        self.session_seconds = session_seconds
        self.clock = clock
        self.in_flight: Counter[str] = Counter()
        self.switch_utilization = DEFAULT_SWITCH_UTILIZATION  # a conversation leaves its account past this utilization
        self.sessions: dict[str, tuple[str, float]] = {}  # conversation key -> (account, expiry)
        self.session_counts: Counter[str] = Counter()  # live conversations per account
        self._cursor = 0
        self._smooth_weights: dict[str, float] = {}
        self._next_prune = clock() + PRUNE_EVERY
        self.on_bind: Callable[[str, str, float], None] | None = None  # (key, account, seconds): shared state
        self.elsewhere: dict[
            str, tuple[str, int, float]
        ] = {}  # other proxies' in-flight: key -> (account, count, expiry)

    def pick(
        self,
        accounts: Sequence[Account],
        key: str | None = None,
        *,
        warning: Collection[str] = (),
        utilization: Mapping[str, float] | None = None,
    ) -> Account | None:
        """The account for a request, or None when no account is usable.

        `utilization` is the latest known fraction (0..1) of each account's binding window (0 when
        unknown); `warning` names the accounts Anthropic says are close to their limit.
        Only the best (lowest) priority present takes new work, and accounts near their limit
        (`warning`, or utilization past `switch_utilization`) only when nothing else is left.
        `session` keeps an existing conversation on its account while that account is usable and
        under the threshold, even if a better-priority account has come back since.
        """
        if not accounts:
            return None
        utilization = utilization or {}
        moved = None
        if self.strategy == "session" and key:
            bound, moved = self._bound(accounts, key, utilization)
            if bound:
                return bound
        roomy = [
            a for a in accounts if a.name not in warning and not self._past_switch(a.name, utilization)
        ] or accounts
        best = min(a.priority for a in roomy)
        group = sorted((a for a in roomy if a.priority == best), key=lambda a: a.name)
        match self.strategy:
            case "session":
                choice = max(group, key=lambda a: self._headroom(a, utilization))
                if key:
                    self._bind(key, choice.name, moved)
                return choice
            case "round-robin":
                self._cursor += 1
                return group[self._cursor % len(group)]
            case "weighted":
                return self._smooth_weighted(group)
            case "least-requests":
                self._cursor += 1
                start = self._cursor % len(group)
                rotated = group[start:] + group[:start]  # ties rotate instead of piling on one account
                return min(rotated, key=lambda a: self.load(a.name))
        raise AssertionError(self.strategy)

    def lease(self, name: str) -> "Lease":
        """One attempt's place in the account's in-flight count, until the lease is released."""
        self.in_flight[name] += 1
        return Lease(self, name)

    def _give_back(self, name: str) -> None:
        self.in_flight[name] -= 1
        if self.in_flight[name] <= 0:
            del self.in_flight[name]

    def _headroom(self, account: Account, utilization: Mapping[str, float]) -> float:
        free = max(0.0, 1.0 - utilization.get(account.name, 0.0))
        load = 1 + self.session_counts[account.name] + self.load(account.name)
        return account.tier * free / load

    def _past_switch(self, name: str, utilization: Mapping[str, float]) -> bool:
        return utilization.get(name, 0.0) > self.switch_utilization

    def _bound(
        self, accounts: Sequence[Account], key: str, utilization: Mapping[str, float]
    ) -> tuple[Account | None, str | None]:
        """The conversation's live account if it may keep it, else (None, why it must move)."""
        now = self.clock()
        if now >= self._next_prune:
            self._prune(now)
        bound = self.sessions.get(key)
        if not bound or bound[1] <= now:
            return None, None
        account = next((a for a in accounts if a.name == bound[0]), None)
        if account is None:
            return None, f"{bound[0]} is not usable"
        if self._past_switch(account.name, utilization):
            return None, f"{bound[0]} is past {self.switch_utilization:.0%} of its limit"
        return account, None

    def _bind(self, key: str, name: str, moved: str | None = None) -> None:
        old = self.sessions.get(key)
        if old:
            self._forget(old[0])
            if moved:
                logger.info("claudeflare: conversation %s moved from %s to %s: %s", key, old[0], name, moved)
        self._keep(key, name, self.clock() + self.session_seconds)
        self.session_counts[name] += 1
        if self.on_bind:
            self.on_bind(key, name, self.session_seconds)

    def load(self, name: str) -> int:
        """Requests in flight on the account here and, as last reported, in other proxies (state.py)."""
        now = self.clock()
        return self.in_flight[name] + sum(
            n for account, n, expiry in self.elsewhere.values() if account == name and expiry > now
        )

    def adopt_load(self, key: str, name: str, count: int, seconds: float) -> None:
        """Another proxy's in-flight count on `name`, valid `seconds`: a dead proxy's counts expire."""
        now = self.clock()
        for stale in [k for k, (_, _, expiry) in self.elsewhere.items() if expiry <= now]:
            del self.elsewhere[stale]
        self.elsewhere[key] = (name, count, now + seconds)

    def adopt(self, key: str, name: str, seconds: float) -> None:
        """Another proxy bound the conversation (state.py): its turns here go to the same account."""
        old = self.sessions.get(key)
        if old and old[0] != name:
            self._forget(old[0])
        if not old or old[0] != name:
            self.session_counts[name] += 1
        self._keep(key, name, self.clock() + seconds)

    def _keep(self, key: str, name: str, expiry: float) -> None:
        self.sessions.pop(key, None)  # re-inserted last: the dict stays least recently bound first
        self.sessions[key] = (name, expiry)
        while len(self.sessions) > MAX_SESSIONS:
            oldest = next(iter(self.sessions))
            self._forget(self.sessions.pop(oldest)[0])

    def _forget(self, name: str) -> None:
        self.session_counts[name] -= 1
        if self.session_counts[name] <= 0:
            del self.session_counts[name]

    def _prune(self, now: float) -> None:
        for key, (name, expiry) in list(self.sessions.items()):
            if expiry <= now:
                del self.sessions[key]
                self._forget(name)
        self._next_prune = now + PRUNE_EVERY

    def _smooth_weighted(self, group: list[Account]) -> Account:
        # nginx's smooth weighted round-robin: exact tier proportions, evenly interleaved.
        total = 0
        for a in group:
            self._smooth_weights[a.name] = self._smooth_weights.get(a.name, 0.0) + a.tier
            total += a.tier
        choice = max(group, key=lambda a: self._smooth_weights[a.name])
        self._smooth_weights[choice.name] -= total
        return choice


class Lease:
    """An attempt's share of an account's in-flight count: `release()` gives it back once, however
    often it is called, so every path that ends an attempt may call it."""

    __slots__ = ("account", "_balancer")

    def __init__(self, balancer: Balancer, account: str) -> None:
        self.account = account
        self._balancer: Balancer | None = balancer

    def release(self) -> None:
        if self._balancer is not None:
            self._balancer, balancer = None, self._balancer
            balancer._give_back(self.account)
