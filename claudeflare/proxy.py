"""The Claudeflare addon: which account each pool flow goes to, and failover.

`addon/claudeflare.py` loads it after the ClientGate (gate.py: which flows are the pool's and who
may send them) and before the Recorder. The decisions live in the modules it calls
(accounts, balancer, ratelimit, refresh, conversation); the hooks connect them to flows.
"""

import asyncio
import functools
import inspect
import logging
import math
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ReverseMode

from . import resources
from .accounts import Account, Pool, PoolWatcher
from .balancer import Balancer
from .config import (
    HomeError,
    check_strategy,
    default_strategy,
    default_upstream,
    ensure_home,
    parse_upstream,
    resolve_home,
)
from .conversation import conversation_key
from .credentials import Credential
from .clock import iso_utc, utc_now
from .flows import (
    FlowState,
    FlowStates,
    error_response,
    inject_credential,
    install_anthropic_error_pages,
)
from .gate import ClientGate
from .limits import ConnectionLimits
from .oauth import OAuthSettings
from . import policy
from .offloop import off_loop
from .ratelimit import OVERLOAD_BENCH, Health, Signals, error_details, read_signals
from .recorder import Recorder
from .refresh import TokenRefresher
from .resend import ReplyTooLarge, Resender
from .usage_poll import UsagePoller, status_columns
from . import wire

logger = logging.getLogger(__name__)

RETRY_STATUSES = {400, 401, 403, 429, 529}  # 400 and 403 only for the refusals policy.refusal names
# What a refused attempt means (Health.observe, policy.refusal) → whether another attempt may help.
RETRY_OUTCOMES = {"limited", "family-limited", "windowless", "overloaded", "auth", "unreachable",
                  "disabled", "claude-code-only", "long-context"}
CIRCUIT_SECONDS = 30.0  # after a failed connection, requests go through the retrying client this long


def env_number(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


def fraction_option(opts, name: str, low: float, high: float, low_inclusive: bool = False) -> float:
    try:
        value = float(getattr(opts, name))
    except ValueError:
        value = math.nan
    if not (low <= value if low_inclusive else low < value) or not value <= high:
        raise exceptions.OptionsError(f"{name} must be a number {'≥' if low_inclusive else '>'} {low:g} and ≤ {high:g}")
    return value


def fail_closed(hook):
    """mitmproxy logs an addon's exception and lets the flow go on: from a request hook, that would
    send it upstream unchecked or unrouted. Answer it with a 500 in Anthropic's shape instead."""

    def refuse(self, flow: http.HTTPFlow) -> None:
        logger.exception("claudeflare: internal error in %s; the request was refused", hook.__name__)
        state = self.states.get(flow)
        if state:
            self.release(state)
        flow.response = error_response(500, "api_error", "Claudeflare: internal error; the proxy's log says more.")

    if inspect.iscoroutinefunction(hook):
        @functools.wraps(hook)
        async def guarded(self, flow):
            try:
                await hook(self, flow)
            except Exception:
                refuse(self, flow)
    else:
        @functools.wraps(hook)
        def guarded(self, flow):
            try:
                hook(self, flow)
            except Exception:
                refuse(self, flow)
    return guarded


class Claudeflare:
    def __init__(self, recorder: Recorder | None = None, states: FlowStates | None = None) -> None:
        self.recorder = recorder
        self.states = states or FlowStates()
        self.home: Path | None = None
        self.watcher: PoolWatcher | None = None
        self.balancer = Balancer()
        self.health = Health()
        self.refresher: TokenRefresher | None = None
        self.resender: Resender | None = None
        self.usage_poller = UsagePoller()
        self.upstream = parse_upstream(default_upstream())
        self.strategy_option = default_strategy()
        self.oauth = OAuthSettings.from_env()
        self.refresh_margin = 300.0
        self.retry_attempts, self.retry_delay, self.retry_backoff = 3, 1.0, 2.0
        self.max_body = 32 * 2**20
        self.subscription_clients = "claude-code"
        self._tasks: list[asyncio.Task] = []
        self._seen_pool: Pool | None = None
        self.upstream_down_at: float | None = None  # last failed connection to the upstream
        self.pool_servers: set[tuple[str, int]] = set()  # where pool flows have been sent
        self.owners = resources.Owners(self.store_owner)  # which account holds each file and batch

    def load(self, loader) -> None:
        install_anthropic_error_pages()
        wire.install()
        add = loader.add_option
        add("claudeflare_home", str, "", "Folder with accounts.toml, credentials and the flow log (default: $CLAUDEFLARE_HOME or ~/.config/claudeflare).")
        add("claudeflare_upstream", str, default_upstream(), "Anthropic API base URL that pool requests go to.")
        add("claudeflare_strategy", str, default_strategy(), "Load balancing: session, round-robin, weighted or least-requests.")
        # mitmproxy parses only str/int/bool options from the command line: fractions are strings.
        add("claudeflare_session_hours", str, "5", "How long a conversation stays on its account (session strategy).")
        add("claudeflare_token_url", str, self.oauth.token_url, "OAuth token endpoint used to refresh tokens.")
        add("claudeflare_refresh_margin", int, 300, "Refresh OAuth tokens this many seconds before they expire.")
        add("claudeflare_retry_attempts", int, int(env_number("RETRY_ATTEMPTS", 3)), "Tries per account for 529s and connection errors.")
        add("claudeflare_retry_delay_ms", int, int(env_number("RETRY_DELAY_MS", 1000)), "Wait before the first retry on the same account.")
        add("claudeflare_retry_backoff", str, os.environ.get("RETRY_BACKOFF", "2"), "Each further retry on the same account waits this many times longer.")
        add("claudeflare_switch_utilization", str, "0.95", "A conversation leaves its account past this utilization of its limit.")
        add("claudeflare_usage_interval", int, 300, "Read each subscription's usage endpoint at most this often, in seconds (0: never).")
        add("claudeflare_max_body_mb", int, 32, "Largest body accepted, in MiB (Anthropic's own cap is 32 MB); sets body_size_limit.")
        add("claudeflare_subscription_clients", str, "claude-code", "Which requests subscription (max) accounts serve: claude-code (Anthropic's terms) or any (at your own risk).")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "claudeflare_upstream" in updated:
            try:
                self.upstream = parse_upstream(opts.claudeflare_upstream)
            except ValueError as e:
                raise exceptions.OptionsError(f"claudeflare_upstream: {e}") from None
        if "claudeflare_strategy" in updated:
            try:
                self.strategy_option = check_strategy(opts.claudeflare_strategy)
            except ValueError as e:
                raise exceptions.OptionsError(f"claudeflare_strategy: {e}") from None
        if "claudeflare_max_body_mb" in updated:
            if opts.claudeflare_max_body_mb < 1:
                raise exceptions.OptionsError("claudeflare_max_body_mb must be at least 1")
            # mitmproxy's own limit refuses a body as soon as it is known to be too large (from its
            # Content-Length, or as chunks arrive) and before buffering it; an addon could only
            # answer after the whole body was read.
            opts.update(body_size_limit=f"{opts.claudeflare_max_body_mb}m")
            self.max_body = opts.claudeflare_max_body_mb * 2**20  # the same cap for replies our client fetches
        if "proxy_debug" in updated and opts.proxy_debug:
            # mitmproxy's core then logs every byte on the wire: account credentials and client keys too.
            raise exceptions.OptionsError("proxy_debug logs credentials as they are sent: Claudeflare refuses it")
        if "claudeflare_session_hours" in updated:
            self.balancer.session_seconds = fraction_option(opts, "claudeflare_session_hours", 0, 24 * 365) * 3600
        if {"claudeflare_retry_attempts", "claudeflare_retry_delay_ms", "claudeflare_retry_backoff"} & updated:
            if opts.claudeflare_retry_attempts < 1 or opts.claudeflare_retry_delay_ms < 0:
                raise exceptions.OptionsError("claudeflare_retry_attempts must be ≥ 1 and claudeflare_retry_delay_ms ≥ 0")
            self.retry_attempts = opts.claudeflare_retry_attempts
            self.retry_delay = opts.claudeflare_retry_delay_ms / 1000
            self.retry_backoff = fraction_option(opts, "claudeflare_retry_backoff", 1, 100, low_inclusive=True)
            self.health.overload_bench = min(OVERLOAD_BENCH, self.retry_delay)  # 529: no longer than a retry waits
        if "claudeflare_subscription_clients" in updated:
            try:
                self.subscription_clients = policy.check_subscription_clients(opts.claudeflare_subscription_clients)
            except ValueError as e:
                raise exceptions.OptionsError(f"claudeflare_subscription_clients: {e}") from None
        if "claudeflare_switch_utilization" in updated:
            self.balancer.switch_utilization = fraction_option(opts, "claudeflare_switch_utilization", 0, 10)
        if {"claudeflare_token_url", "claudeflare_refresh_margin"} & updated:
            if not opts.claudeflare_token_url.startswith(("https://", "http://")):
                raise exceptions.OptionsError("claudeflare_token_url must be an http(s) URL")
            if opts.claudeflare_refresh_margin < 0:
                raise exceptions.OptionsError("claudeflare_refresh_margin must not be negative")
            self.oauth = replace(self.oauth, token_url=opts.claudeflare_token_url)
            self.refresh_margin = float(opts.claudeflare_refresh_margin)
            if self.refresher:
                self.refresher.settings, self.refresher.margin = self.oauth, self.refresh_margin
        if "claudeflare_usage_interval" in updated:
            if opts.claudeflare_usage_interval < 0:
                raise exceptions.OptionsError("claudeflare_usage_interval must not be negative (0 turns usage reads off)")
            self.usage_poller.schedule.interval = float(opts.claudeflare_usage_interval)
        if "claudeflare_home" in updated:
            home = resolve_home(opts.claudeflare_home)
            try:
                ensure_home(home)
            except HomeError as e:
                raise exceptions.OptionsError(f"claudeflare_home: {e}") from None
            except OSError as e:
                raise exceptions.OptionsError(f"claudeflare_home: cannot use {home}: {e.strerror}") from None
            if self.watcher:
                self.watcher.stop()
            self.home = home
            self.watcher = PoolWatcher(home)
            self.watcher.start()
            self.refresher = TokenRefresher(home, self.oauth, self.refresh_margin)
            logger.info("claudeflare: home %s, upstream %s://%s:%d", home, *self.upstream)

    def running(self) -> None:
        self.resender = Resender()
        if self.recorder and self.recorder.flowlog:
            self.owners.load(self.recorder.flowlog.path)  # before traffic, so this read may block
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.refresh_ahead()), loop.create_task(self.publish_status()), loop.create_task(self.poll_usage())]

    def done(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.resender:
            asyncio.get_running_loop().create_task(self.resender.close())
        asyncio.get_running_loop().create_task(self.usage_poller.close())
        if self.watcher:
            self.watcher.stop()

    @property
    def pool(self) -> Pool:
        pool = self.watcher.pool if self.watcher else Pool()
        if pool is not self._seen_pool:
            # New accounts or credentials: a refused key or login may have been replaced.
            self._seen_pool = pool
            credentials = {a.name: pool.stored_credential(a) for a in pool.accounts}
            for name, health in list(self.health.accounts.items()):
                if health.state == "needs-login":
                    self.health.clear(name)
                elif health.state == "disabled" and policy.credential_fingerprint(credentials.get(name)) != health.disabled_credential:
                    self.health.clear(name)  # a new login or key: Anthropic may take it
        return pool

    # --- background ------------------------------------------------------------------------------

    async def refresh_ahead(self, every: float = 30.0) -> None:
        """Refresh tokens before they expire, so requests rarely wait for a refresh."""
        while True:
            pool = self.pool
            for account in pool.usable():
                if self.health.get(account.name).state == "disabled":
                    continue  # a refresh would change the credential it was disabled with
                credential = pool.credential(account)
                if self.refresher and credential and self.refresher.needs_refresh(credential):
                    await self.refresher.fresh(account.name, credential)
            await asyncio.sleep(every)

    async def poll_usage(self, every: float = 1.0) -> None:
        """Idle subscriptions' windows from the usage endpoint (claudeflare/usage_poll.py)."""
        while True:
            if self.usage_poller.schedule.interval and self.refresher:
                pool = self.pool
                accounts = [(a.name, c) for a in pool.usable() if a.oauth and (c := pool.credential(a))]
                scheme, host, port = self.upstream
                await self.usage_poller.poll(accounts, f"{scheme}://{host}:{port}", self.refresher.fresh, self.health)
            await asyncio.sleep(every)

    async def publish_status(self, every: float = 1.0) -> None:
        """Each account's state, for `claudeflare list` and the dashboard (table account_status)."""
        failed = None
        while True:
            if self.recorder and self.recorder.flowlog:
                try:
                    self.recorder.flowlog.publish_status(self.status_rows())
                    failed = None
                except Exception as e:  # one bad value must not end the status for good
                    if type(e) is not failed:
                        logger.exception("claudeflare: publishing account status failed")
                    failed = type(e)
            await asyncio.sleep(every)

    def status_rows(self) -> list[dict]:
        pool, now = self.pool, time.time()
        rows = []
        for account in pool.accounts:
            self.health.available(account.name, now)  # lets an expired bench lapse
            health = self.health.get(account.name)
            credential = pool.credential(account)
            state = pool.state(account, now)
            refresh_problem = self.refresher.failing.get(account.name) if self.refresher else None
            if refresh_problem and state == "ok" and credential and not credential.api_key and not credential.valid_token(now):
                state = "token-expired"  # the old token has run out before a refresh succeeded
            rows.append({
                "name": account.name,
                "mode": account.mode,
                "tier": account.tier,
                "priority": account.priority,
                "state": health.state if state == "ok" else state,
                "reason": (health.reason or refresh_problem) if state == "ok" else refresh_problem,
                "limited_until": iso_utc(health.until) if health.until else None,
                "utilization_5h": health.utilization.get("5h"),
                "utilization_7d": health.utilization.get("7d"),
                "reset_5h": iso_utc(health.resets["5h"]) if "5h" in health.resets else None,
                "reset_7d": iso_utc(health.resets["7d"]) if "7d" in health.resets else None,
                **status_columns(health),
                "token_expires_at": iso_utc(credential.expires_at) if credential and credential.expires_at else None,
                "requests_in_flight": self.balancer.in_flight[account.name],
                "updated_at": utc_now(),
            })
        return rows

    # --- request path ----------------------------------------------------------------------------

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        state = self.states.get(flow)
        if state is None or flow.response:
            return
        # Claude Code's session header spares parsing the body; the model is read from the reply.
        state.session = await off_loop(conversation_key, flow.request.headers, body=flow.request.raw_content)
        state.client_beta = flow.request.headers.get("anthropic-beta")
        body = flow.request.raw_content
        state.claude_code, state.family = policy.is_claude_code(body), policy.model_family(body)
        state.keys_only = self.subscription_clients == "claude-code" and not state.claude_code
        pool = self.pool
        self.balancer.strategy = state.strategy = pool.strategy or self.strategy_option
        if resources.list_kind(flow.request):
            await self.answer_list(flow, state, pool)
            return
        state.owner, flow.response = self.owners.owner_for(flow.request, pool, functools.partial(self.describe, pool))
        if flow.response:
            return
        chosen = await self.choose(pool, state, exclude=())
        if chosen is None:
            flow.response = self.no_account_response(pool, state)
            return
        self.route(flow)
        self.pool_servers.add((flow.request.host, flow.request.port))
        headers = self.attempt(flow, flow.request.headers.copy(), state, *chosen)
        if self.upstream_down_at and time.time() - self.upstream_down_at < CIRCUIT_SECONDS:
            # Connections to the upstream failed lately, and mitmproxy can't retry its own attempt:
            # send this one through our client, which can (the reply then arrives whole).
            state.settled = True
            outcome = await self.resend(flow, state, headers)
            if outcome in RETRY_OUTCOMES:
                await self.failover(flow, state, outcome)

    async def choose(self, pool: Pool, state: FlowState, exclude) -> tuple[Account, Credential] | None:
        """The strategy's pick among usable accounts, with a credential good to send now."""
        now = time.time()
        self.balancer.warning = {n for n, h in self.health.accounts.items() if h.state == "warning"}
        self.balancer.utilization = {n: self.health.utilization_now(n, now) for n in self.health.accounts}
        candidates = [a for a in self.allowed(pool, state) if a.name not in exclude and self.health.available(a.name, family=state.family)]
        if state.owner:  # the request names a file or batch: only its account has it, limited or not
            candidates = [a for a in self.allowed(pool, state) if a.name == state.owner and a.name not in exclude]
        while candidates:
            account = self.balancer.pick(candidates, state.session)
            credential = pool.credential(account)
            if credential and self.refresher:
                credential = await self.refresher.fresh(account.name, credential)
            if credential:
                return account, credential
            candidates.remove(account)
        return None

    def allowed(self, pool: Pool, state: FlowState) -> list[Account]:
        """Usable accounts that may serve this request: subscriptions only Claude Code (policy)."""
        usable = pool.usable()
        return [a for a in usable if not policy.is_subscription(a.mode)] if state.keys_only else usable

    async def answer_list(self, flow: http.HTTPFlow, state: FlowState, pool: Pool) -> None:
        """GET /v1/files or /v1/messages/batches has no one owner: every usable account's, merged."""
        accounts = []
        for account in self.allowed(pool, state):
            credential = pool.credential(account)
            if credential and self.refresher:
                credential = await self.refresher.fresh(account.name, credential)
            if credential:
                accounts.append((account, credential))
        if not accounts:
            flow.response = self.no_account_response(pool, state)
            return
        self.route(flow)
        state.attempts = len(accounts)
        flow.response = await resources.list_pool(flow, accounts, self.resender.client, client_headers(flow.request, state), self.owners)

    def store_owner(self, resource_id: str, account: str | None, kind: str | None) -> None:
        if self.recorder and self.recorder.flowlog:
            self.recorder.flowlog.resource_owner(resource_id, account, kind)

    def route(self, flow: http.HTTPFlow) -> None:
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return  # the reverse target is the upstream
        request = flow.request
        # In this order each setter keeps the Host header (or :authority) in step, default port omitted.
        request.scheme, request.host, request.port = self.upstream

    def attempt(self, flow: http.HTTPFlow, headers: http.Headers, state: FlowState, account: Account,
                credential: Credential) -> http.Headers:
        """`headers` with the account's credential, for our own client; the flow shows them with a placeholder."""
        inject_credential(headers, account, credential)
        wire.conceal(flow.request, headers, account.name)
        state.account = account.name
        state.account_kind = "subscription" if policy.is_subscription(account.mode) else "api-key"
        state.sent_token = credential.access_token
        state.attempts += 1
        self.release(state)  # the one place a flow's lease changes hands
        state.lease = self.balancer.lease(account.name)
        self.states.show(flow, state)
        return headers

    def no_account_response(self, pool: Pool, state: FlowState) -> http.Response:
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
            wait = max(1, math.ceil(soonest - time.time()))
            return error_response(
                429,
                "rate_limit_error",
                f"Claudeflare: all {len(usable)} usable account(s) are rate limited; the first is back in {wait}s.",
                {"retry-after": str(wait)},
            )
        if self.watcher and self.watcher.error:
            why = f"Claudeflare: {self.watcher.error}. Fix the file: it is reloaded within a second."
        elif not pool.accounts:
            why = "Claudeflare has no accounts. Add one with `claudeflare add NAME --mode api-key` or `claudeflare import NAME --mode max --tier 5`."
        else:
            states = ", ".join(f"{a.name}: {self.describe(pool, a)}" for a in pool.accounts)
            why = (
                f"Claudeflare has no usable account ({states}). Resume one with `claudeflare resume NAME`, "
                "log one in again with `claudeflare login NAME`, or add one with `claudeflare add NAME --mode api-key`."
            )
        return error_response(503, "api_error", why)

    def describe(self, pool: Pool, account: Account) -> str:
        state = pool.state(account)
        return self.health.get(account.name).state if state == "ok" else state

    # --- response path ---------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = self.states.get(flow)
        if state is None:
            return
        if state.account and flow.response:
            self.observe_signals(state.account, state, flow.response)

    def observe_signals(self, name: str, state: FlowState, response: http.Response) -> None:
        state.signals = signals = read_signals((k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.fields)
        if response.status_code < 400:
            self.health.observe(name, response.status_code, signals)

    async def response(self, flow: http.HTTPFlow) -> None:
        state = self.states.get(flow)
        if state is None or not state.account:
            return
        try:
            if state.settled or flow.response is None:
                pass
            elif flow.response.status_code in RETRY_STATUSES:
                outcome = self.observe_refusal(state.account, state, flow.response)
                if outcome in RETRY_OUTCOMES:
                    await self.failover(flow, state, outcome)
            elif state.parser and state.parser.usage.error_type:
                # An error inside a stream that began with 200: too late to retry, but it tells on the account.
                self.health.observe(state.account, 200, Signals(), state.parser.usage.error_type)
            self.owners.observe(flow.request, flow.response, state.account)
            resources.localize_batch_reply(flow.request, flow.response)
        finally:
            self.release(state)  # whatever went wrong above, the attempt is over

    def observe_refusal(self, name: str, state: FlowState, response: http.Response) -> str:
        body = response.get_content(strict=False) or b""
        match policy.refusal(response.status_code, body):
            case "disabled":
                pool = self.pool
                credential = next((pool.stored_credential(a) for a in pool.accounts if a.name == name), None)
                self.health.disable(name, f"disabled by Anthropic ({response.status_code})", policy.credential_fingerprint(credential))
                return "disabled"
            case "claude-code-only" | "long-context" as refused:
                state.keys_only = True  # this request only: the subscription stays in service
                return refused
        if response.status_code in (400, 403):
            return "error"
        error_type, error_code = error_details(body)
        return self.health.observe(name, response.status_code, state.signals or Signals(), error_type, error_code, state.family)

    async def failover(self, flow: http.HTTPFlow, state: FlowState, outcome: str) -> None:
        """Send the request again — same account after a refresh or a pause, else the next one —
        until one answers with something other than a refusal, or no account is left."""
        pool = self.pool
        tries = Counter({state.account: 1})
        refreshed: set[str] = set()
        while outcome in RETRY_OUTCOMES:
            status = flow.response.status_code if flow.response and outcome != "unreachable" else None
            state.failovers.append({"account": state.account, "status": status, "reason": outcome})
            nxt = await self.next_attempt(pool, state, outcome, tries, refreshed)
            if nxt is None:
                break
            account, credential, delay = nxt
            logger.info("claudeflare: %s on %s, retrying on %s", outcome, state.account, account.name)
            if delay:
                await asyncio.sleep(delay)
            headers = self.attempt(flow, client_headers(flow.request, state), state, account, credential)
            tries[account.name] += 1
            outcome = await self.resend(flow, state, headers)
        # A request pinned to its resource's owner keeps the owner's own refusal: nobody else could serve it.
        if outcome in ("limited", "family-limited", "unreachable", "auth", "disabled") and not state.owner and not any(
            self.health.available(a.name, family=state.family) for a in self.allowed(pool, state)
        ):
            flow.response = self.no_account_response(pool, state)  # nobody left: say why, and until when
        elif outcome == "unreachable":
            flow.response = error_response(502, "api_error", "Claudeflare: the Anthropic API could not be reached.")

    async def resend(self, flow: http.HTTPFlow, state: FlowState, headers: http.Headers) -> str:
        """One attempt through our own client; the reply, if any, becomes the flow's. Returns the outcome."""
        try:
            response = await self.resender.send(flow.request, headers, self.max_body)
        except httpx.TransportError as e:
            self.upstream_down_at = time.time()
            logger.warning("claudeflare: upstream unreachable for %s: %s", state.account, type(e).__name__)
            return "unreachable"
        except ReplyTooLarge:
            self.upstream_down_at = None
            # What mitmproxy answers for a reply over body_size_limit that it fetched itself.
            flow.response = error_response(502, "api_error", "Claudeflare: the reply is over the proxy's limit (claudeflare_max_body_mb).")
            return "ok"
        self.upstream_down_at = None
        flow.response = response
        state.parser = state.first_byte_at = None
        self.observe_signals(state.account, state, response)
        if response.status_code in RETRY_STATUSES:
            return self.observe_refusal(state.account, state, response)
        return "ok"

    async def next_attempt(self, pool, state, outcome, tries, refreshed) -> tuple[Account, Credential, float] | None:
        current = next((a for a in pool.accounts if a.name == state.account), None)
        if current and outcome == "auth":
            if current.oauth and current.name not in refreshed and self.refresher:
                refreshed.add(current.name)
                credential = await self.refresher.fresh(current.name, pool.credential(current), rejected=state.sent_token)
                if credential and credential.access_token != state.sent_token:
                    return current, credential, 0.0
            self.health.needs_login(current.name, "credentials refused (401)")
        if current and outcome in ("overloaded", "unreachable") and tries[current.name] < self.retry_attempts:
            # Overload is Anthropic-wide: waiting helps more than moving.
            credential = pool.credential(current)
            if credential:
                return current, credential, self.retry_delay * self.retry_backoff ** (tries[current.name] - 1)
        chosen = await self.choose(pool, state, exclude=set(tries))
        return (*chosen, 0.0) if chosen else None

    def error(self, flow: http.HTTPFlow) -> None:
        state = self.states.get(flow)
        if state is None:
            return
        self.release(state)

    def server_connect_error(self, data) -> None:
        if data.server.address and tuple(data.server.address[:2]) in self.pool_servers:
            self.upstream_down_at = time.time()  # open the circuit (see request)

    def release(self, state: FlowState) -> None:
        if state.lease:
            state.lease.release()


def client_headers(request: http.Request, state: FlowState) -> http.Headers:
    """The headers as the client sent them, for another attempt: credentials are replaced anyway."""
    headers = request.headers.copy()
    if state.client_beta is None:
        headers.pop("anthropic-beta", None)
    else:
        headers["anthropic-beta"] = state.client_beta  # without the OAuth flag a previous attempt added
    return headers


def addons() -> list:
    """Fresh instances, in hook order: the gate first, routing and failover before recording, and
    connection limits last, so that they see any refusal made in `requestheaders`."""
    states = FlowStates()
    recorder = Recorder(states)
    claudeflare = Claudeflare(recorder, states)
    return [ClientGate(claudeflare, states), claudeflare, recorder, ConnectionLimits()]
