"""Which account each attempt of a pool flow goes to, and failover: choose, the next attempt, resend.

The Claudeflare addon (proxy.py) calls it from its hooks; it takes its collaborators (the pool, the
balancer, Health, the token refresher, the resender, a clock and a sleep), so it runs on synthetic
flows with a fake resender (tests/test_router.py). Each attempt holds a lease on its account's
in-flight count (balancer.Lease); `attempt` is the one place it changes hands, `release` ends it.
"""

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx
from mitmproxy import http

from . import policy, providers, wire
from .accounts import Account, Pool
from .balancer import Balancer
from .config import DEFAULT_MAX_BODY_MB
from .credentials import Credential
from .flows import FlowState, FlowStates, error_response
from .options import Retry
from .ratelimit import Health, Signals, error_details, read_signals
from .refresh import TokenRefresher
from .resend import ReplyTooLarge, Resender
from .states import RETRY_OUTCOMES, AccountState, Outcome, effective_state

logger = logging.getLogger(__name__)

RETRY_STATUSES = {400, 401, 403, 429, 529}  # 400 and 403 only for the refusals policy.refusal names
# Refusals after which, when no account is left, the client learns why and until when.
NOBODY_LEFT_OUTCOMES = (Outcome.LIMITED, Outcome.FAMILY_LIMITED, Outcome.UNREACHABLE, Outcome.AUTH, Outcome.DISABLED)
CIRCUIT_SECONDS = 30.0  # after a failed connection, requests go through the retrying client this long


class Router:
    def __init__(
        self,
        pool: Callable[[], Pool],
        balancer: Balancer,
        health: Health,
        states: FlowStates,
        pool_error: Callable[[], str | None] = lambda: None,
        refresher: TokenRefresher | None = None,
        resender: Resender | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable] = asyncio.sleep,
    ) -> None:
        self.pool, self.pool_error = pool, pool_error  # the latest snapshot, and why a newer one failed to load
        self.balancer, self.health, self.states = balancer, health, states
        self.clock, self.sleep = clock, sleep
        self.refresher = refresher  # the addon's, once the home is known
        self.resender = resender  # the addon's, once mitmproxy runs
        self.retry = Retry()
        self.max_body = DEFAULT_MAX_BODY_MB * 2**20
        self.upstream_down_at: float | None = None  # last failed connection to the upstream

    # --- choosing ---------------------------------------------------------------------------------

    async def choose(self, pool: Pool, state: FlowState, exclude) -> tuple[Account, Credential] | None:
        """The strategy's pick among usable accounts, with a credential good to send now."""
        now = self.clock()
        warning = {n for n, h in self.health.accounts.items() if h.state == AccountState.WARNING}
        utilization = {n: self.health.utilization_now(n, now) for n in self.health.accounts}
        candidates = [
            a
            for a in self.allowed(pool, state)
            if a.name not in exclude and self.health.available(a.name, family=state.family)
        ]
        if state.owner:  # the request names a file or batch: only its account has it, limited or not
            candidates = [a for a in self.allowed(pool, state) if a.name == state.owner and a.name not in exclude]
        while candidates:
            account = self.balancer.pick(candidates, state.session, warning=warning, utilization=utilization)
            credential = await self.fresh(pool, account)
            if credential:
                return account, credential
            candidates.remove(account)
        return None

    async def fresh(self, pool: Pool, account: Account) -> Credential | None:
        """The account's credential, refreshed first if its token is about to expire."""
        if providers.of(account).own_credentials:
            return await providers.of(account).credential(account, pool.stored_credential(account))
        credential = pool.credential(account)
        if credential and self.refresher:
            credential = await self.refresher.fresh(account.name, credential)
        return credential

    def allowed(self, pool: Pool, state: FlowState) -> list[Account]:
        """Usable accounts that may serve this request: those whose provider serves its model, and
        subscriptions only Claude Code (policy)."""
        usable = [a for a in pool.usable() if providers.serving(a, state)]
        return [a for a in usable if not policy.is_subscription(a.mode)] if state.keys_only else usable

    def attempt(
        self, flow: http.HTTPFlow, headers: http.Headers, state: FlowState, account: Account, credential: Credential
    ) -> http.Headers:
        """`headers` with the account's credential, for our own client; the flow shows them with a placeholder."""
        provider = providers.of(account)
        provider.authenticate(headers, account, credential, flow.request)
        wire.conceal(flow.request, headers, account.name)
        state.account, state.provider = account.name, provider.name
        state.account_kind = "subscription" if policy.is_subscription(account.mode) else provider.kind
        state.sent_token = credential.access_token
        state.attempts += 1
        self.release(state)  # the one place a flow's lease changes hands
        state.lease = self.balancer.lease(account.name)
        self.states.show(flow, state)
        return headers

    @staticmethod
    def release(state: FlowState) -> None:
        if state.lease:
            state.lease.release()

    def no_account_response(self, pool: Pool, state: FlowState) -> http.Response:
        if pool.usable() and not any(providers.serving(a, state) for a in pool.usable()):
            return self.unserved_response(pool, state)
        usable = [a.name for a in self.allowed(pool, state)]
        if state.keys_only and not usable and pool.usable():
            return error_response(
                403,
                "permission_error",
                "Claudeflare: subscription accounts serve only Claude Code (Anthropic's terms allow nothing else), "
                "and no API-key account can take this request. Add one with `claudeflare add NAME --mode api-key`.",
            )
        soonest = self.health.soonest(usable, state.family)
        if usable and soonest:
            wait = max(1, math.ceil(soonest - self.clock()))
            return error_response(
                429,
                "rate_limit_error",
                f"Claudeflare: all {len(usable)} usable account(s) are rate limited; the first is back in {wait}s.",
                {"retry-after": str(wait)},
            )
        if error := self.pool_error():
            why = f"Claudeflare: {error}. Fix the file: it is reloaded within a second."
        elif not pool.accounts:
            why = "Claudeflare has no accounts. Add one with `claudeflare add NAME --mode api-key` or `claudeflare import NAME --mode max --tier 5`."
        else:
            states = ", ".join(f"{a.name}: {self.describe(pool, a)}" for a in pool.accounts)
            why = (
                f"Claudeflare has no usable account ({states}). Resume one with `claudeflare resume NAME`, "
                "log one in again with `claudeflare login NAME`, or add one with `claudeflare add NAME --mode api-key`."
            )
        return error_response(503, "api_error", why)

    def unserved_response(self, pool: Pool, state: FlowState) -> http.Response:
        """No usable account's provider serves the model (or path): name it, and the accounts that
        could, with their state."""
        what = f"model {state.model!r}" if state.model else f"{state.endpoint}"
        could = [f"{a.name} ({self.describe(pool, a)})" for a in pool.accounts if providers.serving(a, state)]
        who = f"accounts that could: {', '.join(could)}" if could else "no account lists it (accounts.toml: `models`)"
        return error_response(404, "not_found_error", f"Claudeflare: no usable account serves {what}; {who}.")

    def describe(self, pool: Pool, account: Account) -> str:
        return effective_state(pool.state(account), self.health.accounts.get(account.name), self.clock())[0]

    # --- replies ----------------------------------------------------------------------------------

    def observe_signals(self, name: str, state: FlowState, response: http.Response) -> None:
        signals = read_signals((k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.fields)
        state.signals = signals = providers.PROVIDERS[state.provider or providers.DEFAULT].signals(response, signals)
        if response.status_code < 400:
            self.health.observe(name, response.status_code, signals)

    async def settle(self, flow: http.HTTPFlow, state: FlowState) -> None:
        """The reply mitmproxy fetched: fail over from a refusal, note an error inside a stream."""
        if state.settled or flow.response is None:
            return
        if flow.response.status_code in RETRY_STATUSES:
            outcome = self.observe_refusal(state.account, state, flow.response)
            if outcome in RETRY_OUTCOMES:
                await self.failover(flow, state, outcome)
        elif state.parser and state.parser.usage.error_type:
            # An error inside a stream that began with 200: too late to retry, but it tells on the account.
            self.health.observe(state.account, 200, Signals(), state.parser.usage.error_type)

    def observe_refusal(self, name: str, state: FlowState, response: http.Response) -> Outcome:
        body = response.get_content(strict=False) or b""
        # Not Claude Code, on a subscription, and no window says a limit is spent: a bare refusal is
        # the Claude-Code-only one (contract §8), not a limit to bench the account for.
        third_party = state.account_kind == "subscription" and not state.claude_code
        match policy.refusal(
            response.status_code, body, third_party and not (state.signals and state.signals.exhausted)
        ):
            case Outcome.DISABLED:
                self.health.disable(name, f"disabled by Anthropic ({response.status_code})", self.fingerprint(name))
                return Outcome.DISABLED
            case Outcome.CLAUDE_CODE_ONLY | Outcome.LONG_CONTEXT as refused:
                state.keys_only = True  # this request only: the subscription stays in service
                return refused
        if response.status_code in (400, 403):
            return Outcome.ERROR
        error_type, error_code = error_details(body)
        return self.health.observe(
            name, response.status_code, state.signals or Signals(), error_type, error_code, state.family
        )

    def fingerprint(self, name: str) -> str | None:
        """Of the account's stored credential now (policy.credential_fingerprint)."""
        pool = self.pool()
        return policy.credential_fingerprint(
            next((pool.stored_credential(a) for a in pool.accounts if a.name == name), None)
        )

    # --- failover ---------------------------------------------------------------------------------

    async def failover(self, flow: http.HTTPFlow, state: FlowState, outcome: Outcome) -> None:
        """Send the request again — same account after a refresh or a pause, else the next one —
        until one answers with something other than a refusal, or no account is left."""
        pool = self.pool()
        tries = Counter({state.account: 1})
        refreshed: set[str] = set()
        while outcome in RETRY_OUTCOMES:
            status = flow.response.status_code if flow.response and outcome != Outcome.UNREACHABLE else None
            state.failovers.append({"account": state.account, "status": status, "reason": outcome})
            nxt = await self.next_attempt(pool, state, outcome, tries, refreshed)
            if nxt is None:
                break
            account, credential, delay = nxt
            logger.info("claudeflare: %s on %s, retrying on %s", outcome, state.account, account.name)
            if delay:
                await self.sleep(delay)
            await providers.adapt(flow.request, state, account)
            headers = self.attempt(flow, client_headers(flow.request, state), state, account, credential)
            tries[account.name] += 1
            outcome = await self.resend(flow, state, headers)
        # A request pinned to its resource's owner keeps the owner's own refusal: nobody else could serve it.
        if (
            outcome in NOBODY_LEFT_OUTCOMES
            and not state.owner
            and not any(self.health.available(a.name, family=state.family) for a in self.allowed(pool, state))
        ):
            flow.response = self.no_account_response(pool, state)  # nobody left: say why, and until when
        elif outcome == Outcome.UNREACHABLE:
            flow.response = error_response(502, "api_error", "Claudeflare: the Anthropic API could not be reached.")

    async def send_ourselves(self, flow: http.HTTPFlow, state: FlowState, headers: http.Headers) -> None:
        """The attempt through our own client, which can retry a failed connection (mitmproxy can't
        retry its own), failing over from a refusal; the reply then arrives whole."""
        state.settled = True  # nothing is left for `settle` to do
        outcome = await self.resend(flow, state, headers)
        if outcome in RETRY_OUTCOMES:
            await self.failover(flow, state, outcome)

    async def next_attempt(self, pool, state, outcome, tries, refreshed) -> tuple[Account, Credential, float] | None:
        current = next((a for a in pool.accounts if a.name == state.account), None)
        if current and outcome == Outcome.AUTH:
            if current.oauth and current.name not in refreshed and self.refresher:
                refreshed.add(current.name)
                credential = await self.refresher.fresh(
                    current.name, pool.credential(current), rejected=state.sent_token
                )
                if credential and credential.access_token != state.sent_token:
                    return current, credential, 0.0
            self.health.needs_login(current.name, "credentials refused (401)", self.fingerprint(current.name))
        if (
            current
            and outcome in (Outcome.OVERLOADED, Outcome.UNREACHABLE)
            and tries[current.name] < self.retry.attempts
        ):
            # Overload is Anthropic-wide: waiting helps more than moving.
            credential = pool.credential(current)
            if credential:
                return current, credential, self.retry.delay * self.retry.backoff ** (tries[current.name] - 1)
        chosen = await self.choose(pool, state, exclude=set(tries))
        return (*chosen, 0.0) if chosen else None

    async def resend(self, flow: http.HTTPFlow, state: FlowState, headers: http.Headers) -> Outcome:
        """One attempt through our own client; the reply, if any, becomes the flow's. Returns the outcome."""
        try:
            response = await self.resender.send(flow.request, headers, self.max_body)
        except httpx.TransportError as e:
            self.upstream_failed()
            logger.warning("claudeflare: upstream unreachable for %s: %s", state.account, type(e).__name__)
            return Outcome.UNREACHABLE
        except ReplyTooLarge:
            self.upstream_down_at = None
            # What mitmproxy answers for a reply over body_size_limit that it fetched itself.
            flow.response = error_response(
                502, "api_error", "Claudeflare: the reply is over the proxy's limit (claudeflare_max_body_mb)."
            )
            return Outcome.OK
        self.upstream_down_at = None
        flow.response = response
        state.parser = state.first_byte_at = None
        self.observe_signals(state.account, state, response)
        if response.status_code in RETRY_STATUSES:
            return self.observe_refusal(state.account, state, response)
        return Outcome.OK

    # --- the circuit ------------------------------------------------------------------------------

    def upstream_failed(self) -> None:
        self.upstream_down_at = self.clock()

    def circuit_open(self) -> bool:
        """Connections to the upstream failed lately, and mitmproxy can't retry its own attempt:
        requests go through our client, which can (the reply then arrives whole)."""
        return self.upstream_down_at is not None and self.clock() - self.upstream_down_at < CIRCUIT_SECONDS


def client_headers(request: http.Request, state: FlowState) -> http.Headers:
    """The headers as the client sent them, for another attempt: credentials are replaced anyway."""
    headers = request.headers.copy()
    if state.client_beta is None:
        headers.pop("anthropic-beta", None)
    else:
        headers["anthropic-beta"] = state.client_beta  # without the OAuth flag a previous attempt added
    return headers
