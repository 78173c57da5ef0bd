"""The Claudeflare addon: thin hooks that hand each pool flow to the Router (router.py: which
account, and failover), its options (parsed in options.py), and its background tasks (tokens
refreshed ahead, usage read, account status published).

`addon/claudeflare.py` loads it after the ClientGate (gate.py: which flows are the pool's and who
may send them) and before the Recorder. The decisions live in the modules it calls
(accounts, balancer, ratelimit, refresh, conversation); the hooks connect them to flows.
"""

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ReverseMode

from . import dispatch, policy, providers, resources, wire
from . import state as shared_state
from .accounts import Pool, PoolWatcher
from .alerts import Alerts
from .balancer import Balancer
from .client_limits import ClientLimits
from .clock import iso_utc, utc_now
from .config import (
    DEFAULT_MAX_BODY_MB,
    DEFAULT_REFRESH_MARGIN,
    DEFAULT_RETRY_ATTEMPTS,
    DEFAULT_RETRY_BACKOFF,
    DEFAULT_RETRY_DELAY_MS,
    DEFAULT_SESSION_HOURS,
    DEFAULT_SUBSCRIPTION_CLIENTS,
    DEFAULT_SWITCH_UTILIZATION,
    DEFAULT_USAGE_INTERVAL,
    STRATEGIES,
    default_strategy,
    default_upstream,
    parse_upstream,
)
from .conversation import conversation_key
from .flows import (
    FlowState,
    FlowStates,
    error_response,
    install_anthropic_error_pages,
)
from .gate import ClientGate
from .healthcheck import HealthCheck
from .limits import ConnectionLimits
from .metrics import Metrics
from .oauth import OAuthSettings
from .offloop import off_loop
from .options import (
    check_proxy_debug,
    env_number,
    parse_home,
    parse_max_body,
    parse_refresh,
    parse_retry,
    parse_session_seconds,
    parse_strategy,
    parse_subscription_clients,
    parse_switch_utilization,
    parse_upstream_option,
    parse_usage_interval,
)
from .ratelimit import OVERLOAD_BENCH, Health
from .recorder import Recorder
from .refresh import TokenRefresher
from .resend import Resender
from .router import Router, client_headers
from .states import AccountState, effective_state
from .usage_poll import UsagePoller, status_columns

logger = logging.getLogger(__name__)


def fail_closed(hook):
    """mitmproxy logs an addon's exception and lets the flow go on: from a request hook, that would
    send it upstream unchecked or unrouted. Answer it with a 500 in Anthropic's shape instead."""

    def refuse(self, flow: http.HTTPFlow) -> None:
        logger.exception("claudeflare: internal error in %s; the request was refused", hook.__name__)
        state = self.states.get(flow)
        if state:
            self.router.release(state)
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
        self.router = Router(
            lambda: self.pool,
            self.balancer,
            self.health,
            self.states,
            pool_error=lambda: self.watcher.error if self.watcher else None,
        )
        self.usage_poller = UsagePoller()
        self.upstream = parse_upstream(default_upstream())
        self.strategy_option = default_strategy()
        self.oauth = OAuthSettings.from_env()
        self.refresh_margin = float(DEFAULT_REFRESH_MARGIN)
        self.subscription_clients = DEFAULT_SUBSCRIPTION_CLIENTS
        self._tasks: list[asyncio.Task] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # mitmproxy's, once running
        self.pool_servers: set[tuple[str, int]] = set()  # where pool flows have been sent
        self.owners = resources.Owners(self.store_owner)  # which account holds each file and batch
        self.shared: shared_state.SharedState | None = None  # what makes several proxies one pool (state.py)
        self.client_limits: ClientLimits | None = None

    def load(self, loader) -> None:
        install_anthropic_error_pages()
        wire.install()
        dispatch.install()
        add = loader.add_option
        add(
            "claudeflare_home",
            str,
            "",
            "Folder with accounts.toml, credentials and the flow log (default: $CLAUDEFLARE_HOME or ~/.config/claudeflare).",
        )
        add("claudeflare_upstream", str, default_upstream(), "Anthropic API base URL that pool requests go to.")
        add("claudeflare_strategy", str, default_strategy(), "Load balancing across accounts.", choices=STRATEGIES)
        # mitmproxy parses only str/int/bool options from the command line: fractions are strings.
        add(
            "claudeflare_session_hours",
            str,
            str(DEFAULT_SESSION_HOURS),
            "How long a conversation stays on its account (session strategy).",
        )
        add("claudeflare_token_url", str, self.oauth.token_url, "OAuth token endpoint used to refresh tokens.")
        add(
            "claudeflare_refresh_margin",
            int,
            DEFAULT_REFRESH_MARGIN,
            "Refresh OAuth tokens this many seconds before they expire.",
        )
        add(
            "claudeflare_retry_attempts",
            int,
            int(env_number("RETRY_ATTEMPTS", DEFAULT_RETRY_ATTEMPTS)),
            "Tries per account for 529s and connection errors.",
        )
        add(
            "claudeflare_retry_delay_ms",
            int,
            int(env_number("RETRY_DELAY_MS", DEFAULT_RETRY_DELAY_MS)),
            "Wait before the first retry on the same account.",
        )
        add(
            "claudeflare_retry_backoff",
            str,
            os.environ.get("RETRY_BACKOFF", str(DEFAULT_RETRY_BACKOFF)),
            "Each further retry on the same account waits this many times longer.",
        )
        add(
            "claudeflare_switch_utilization",
            str,
            str(DEFAULT_SWITCH_UTILIZATION),
            "A conversation leaves its account past this utilization of its limit.",
        )
        add(
            "claudeflare_usage_interval",
            int,
            DEFAULT_USAGE_INTERVAL,
            "Read each subscription's usage endpoint at most this often, in seconds (0: never).",
        )
        add(
            "claudeflare_max_body_mb",
            int,
            DEFAULT_MAX_BODY_MB,
            "Largest body accepted, in MiB (Anthropic's own cap is 32 MB); sets body_size_limit.",
        )
        add(
            "claudeflare_state",
            str,
            os.environ.get("CLAUDEFLARE_STATE", "home"),
            "Where workers and instances share the pool's state: home (state.db, one machine) or redis://[:password@]host:port/db (rediss:// for TLS); $CLAUDEFLARE_STATE keeps a password out of `ps`.",
        )
        add(
            "claudeflare_subscription_clients",
            str,
            DEFAULT_SUBSCRIPTION_CLIENTS,
            "Which requests subscription (max) accounts serve: claude-code (Anthropic's terms) or any (at your own risk).",
        )

    def configure(self, updated: set[str]) -> None:
        try:
            self.apply_options(ctx.options, updated)
        except ValueError as e:  # the parsers name the option
            raise exceptions.OptionsError(str(e)) from None

    def apply_options(self, opts, updated: set[str]) -> None:
        """Each changed option group, parsed (options.py) and handed to what uses it."""
        if "proxy_debug" in updated:
            check_proxy_debug(opts.proxy_debug)
        if "claudeflare_upstream" in updated:
            self.upstream = parse_upstream_option(opts.claudeflare_upstream)
        if "claudeflare_strategy" in updated:
            self.strategy_option = parse_strategy(opts.claudeflare_strategy)
        if "claudeflare_max_body_mb" in updated:
            self.router.max_body = parse_max_body(
                opts.claudeflare_max_body_mb
            )  # the same cap for replies our client fetches
            # mitmproxy's own limit refuses a body as soon as it is known to be too large (from its
            # Content-Length, or as chunks arrive) and before buffering it; an addon could only
            # answer after the whole body was read.
            opts.update(body_size_limit=f"{opts.claudeflare_max_body_mb}m")
        if "claudeflare_session_hours" in updated:
            self.balancer.session_seconds = parse_session_seconds(opts.claudeflare_session_hours)
        if "claudeflare_switch_utilization" in updated:
            self.balancer.switch_utilization = parse_switch_utilization(opts.claudeflare_switch_utilization)
        if {"claudeflare_retry_attempts", "claudeflare_retry_delay_ms", "claudeflare_retry_backoff"} & updated:
            self.router.retry = parse_retry(
                opts.claudeflare_retry_attempts, opts.claudeflare_retry_delay_ms, opts.claudeflare_retry_backoff
            )
            self.health.overload_bench = min(
                OVERLOAD_BENCH, self.router.retry.delay
            )  # 529: no longer than a retry waits
        if "claudeflare_subscription_clients" in updated:
            self.subscription_clients = parse_subscription_clients(opts.claudeflare_subscription_clients)
        if {"claudeflare_token_url", "claudeflare_refresh_margin"} & updated:
            refresh = parse_refresh(opts.claudeflare_token_url, opts.claudeflare_refresh_margin)
            self.oauth, self.refresh_margin = replace(self.oauth, token_url=refresh.token_url), refresh.margin
            if self.refresher:
                self.refresher.settings, self.refresher.margin = self.oauth, self.refresh_margin
        if "claudeflare_usage_interval" in updated:
            self.usage_poller.schedule.interval = parse_usage_interval(opts.claudeflare_usage_interval)
        if "claudeflare_home" in updated:
            self.open_home(parse_home(opts.claudeflare_home))
        if {"claudeflare_state", "claudeflare_home"} & updated and self.home:
            self.open_shared(shared_state.parse_state(opts.claudeflare_state))

    def open_home(self, home: Path) -> None:
        if self.watcher:
            self.watcher.stop()
        self.home = home
        self.watcher = PoolWatcher(home, on_change=self.on_pool_change)
        self.watcher.start()
        self.router.refresher = TokenRefresher(home, self.oauth, self.refresh_margin)
        logger.info("claudeflare: home %s, upstream %s", home, self.upstream.url)

    def open_shared(self, option: str) -> None:
        if self.shared:
            self.shared.stop()
        self.shared = shared_state.open_state(option, self.home)
        shared_state.connect(self.shared, self.balancer, self.health, self.refresher, self.usage_poller)
        if self.loop:
            self.shared.start(self.on_shared)

    def on_shared(self, events: list) -> None:
        """Other proxies' bindings and benches (from the state thread) into the loop's copy."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: mitmdump is exiting
            self.loop.call_soon_threadsafe(
                shared_state.merge, events, self.balancer, self.health, self.owners, self.client_limits
            )

    def running(self) -> None:
        self.router.resender = Resender()
        if self.recorder and self.recorder.flowlog:
            self.owners.load(self.recorder.flowlog.path)  # before traffic, so this read may block
        self.loop = loop = asyncio.get_running_loop()
        if self.shared:
            self.shared.start(self.on_shared)
        self._tasks = [
            loop.create_task(shared_state.publish_load(lambda: self.shared, self.balancer, self.client_limits)),
            loop.create_task(self.refresh_ahead()),
            loop.create_task(self.publish_status()),
            loop.create_task(self.poll_usage()),
        ]

    def done(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.router.resender:
            asyncio.get_running_loop().create_task(self.router.resender.close())
        asyncio.get_running_loop().create_task(self.usage_poller.close())
        if self.watcher:
            self.watcher.stop()
        if self.shared:
            self.shared.stop()

    @property
    def refresher(self) -> TokenRefresher | None:
        return self.router.refresher

    @property
    def pool(self) -> Pool:
        return self.watcher.pool if self.watcher else Pool()

    def on_pool_change(self, pool: Pool) -> None:
        """The watcher published new accounts or credentials (on its own thread): Health belongs to
        the event loop, so the change is handled there. Before `running` no account has a state."""
        if self.loop:
            with contextlib.suppress(RuntimeError):  # the loop has closed: mitmdump is exiting
                self.loop.call_soon_threadsafe(self.pool_changed, pool)

    def pool_changed(self, pool: Pool) -> None:
        """A new login or key for an account Anthropic refused (needs-login, disabled): it may take it."""
        for account in pool.accounts:
            self.health.credential_seen(account.name, policy.credential_fingerprint(pool.stored_credential(account)))

    # --- background ------------------------------------------------------------------------------

    async def refresh_ahead(self, every: float = 30.0) -> None:
        """Refresh tokens before they expire, so requests rarely wait for a refresh."""
        while True:
            pool = self.pool
            for account in pool.usable():
                if self.health.view(account.name).state == AccountState.DISABLED:
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
                await self.usage_poller.poll(accounts, self.upstream.url, self.refresher.fresh, self.health)
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
            health = self.health.view(account.name)
            credential = pool.credential(account)
            pool_state = pool.state(account, now)
            refresh_problem = self.refresher.failing.get(account.name) if self.refresher else None
            if (
                refresh_problem
                and pool_state == AccountState.OK
                and credential
                and not credential.api_key
                and not credential.valid_token(now)
            ):
                pool_state = AccountState.TOKEN_EXPIRED  # the old token has run out before a refresh succeeded
            state, reason = effective_state(pool_state, health, now)
            rows.append(
                {
                    "name": account.name,
                    "mode": account.mode,
                    "tier": account.tier,
                    "priority": account.priority,
                    "provider": account.provider,
                    "state": state,
                    "reason": reason or refresh_problem or providers.of(account).problem(account),
                    "limited_until": iso_utc(health.until) if health.until and health.until > now else None,
                    "utilization_5h": health.utilization.get("5h"),
                    "utilization_7d": health.utilization.get("7d"),
                    "reset_5h": iso_utc(health.resets["5h"]) if "5h" in health.resets else None,
                    "reset_7d": iso_utc(health.resets["7d"]) if "7d" in health.resets else None,
                    **status_columns(health),
                    "token_expires_at": iso_utc(credential.expires_at)
                    if credential and credential.expires_at
                    else None,
                    "requests_in_flight": self.balancer.in_flight[account.name],
                    "updated_at": utc_now(),
                }
            )
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
        state.model, state.endpoint = policy.model_name(body), flow.request.path.split("?", 1)[0]
        state.keys_only = self.subscription_clients == "claude-code" and not state.claude_code
        pool = self.pool
        self.balancer.strategy = state.strategy = pool.strategy or self.strategy_option
        if resources.list_kind(flow.request):
            await self.answer_list(flow, state, pool)
            return
        state.owner, flow.response = self.owners.owner_for(
            flow.request, pool, functools.partial(self.router.describe, pool)
        )
        if flow.response:
            return
        chosen = await self.router.choose(pool, state, exclude=())
        if chosen is None:
            flow.response = self.router.no_account_response(pool, state)
            return
        self.route(flow)
        await providers.adapt(flow.request, state, chosen[0])
        self.pool_servers.add((flow.request.host, flow.request.port))
        headers = self.router.attempt(flow, flow.request.headers.copy(), state, *chosen)
        if self.router.circuit_open():
            await self.router.send_ourselves(flow, state, headers)

    async def answer_list(self, flow: http.HTTPFlow, state: FlowState, pool: Pool) -> None:
        """GET /v1/files or /v1/messages/batches has no one owner: every usable account's, merged."""
        accounts = []
        for account in self.router.allowed(pool, state):
            credential = await self.router.fresh(pool, account)
            if credential:
                accounts.append((account, credential))
        if not accounts:
            flow.response = self.router.no_account_response(pool, state)
            return
        self.route(flow)
        state.attempts = len(accounts)
        flow.response = await resources.list_pool(
            flow, accounts, self.router.resender.client, client_headers(flow.request, state), self.owners
        )

    def store_owner(self, resource_id: str, account: str | None, kind: str | None) -> None:
        if self.recorder and self.recorder.flowlog:
            self.recorder.flowlog.resource_owner(resource_id, account, kind)
        if self.shared:
            self.shared.publish(shared_state.owner_event(resource_id, account))

    def route(self, flow: http.HTTPFlow) -> None:
        if isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return  # the reverse target is the upstream
        request = flow.request
        # In this order each setter keeps the Host header (or :authority) in step, default port omitted.
        request.scheme, request.host, request.port = self.upstream

    # --- response path ---------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = self.states.get(flow)
        if state and state.account and flow.response:
            self.router.observe_signals(state.account, state, flow.response)
            if state.provider and (translate := providers.PROVIDERS[state.provider].stream(flow.response)):
                flow.response.stream = translate  # e.g. Bedrock's event stream as Anthropic SSE, chunk by chunk

    async def response(self, flow: http.HTTPFlow) -> None:
        state = self.states.get(flow)
        if state is None or not state.account:
            return
        try:
            await self.router.settle(flow, state)
            if state.provider and flow.response:
                providers.PROVIDERS[state.provider].reply(flow.response)  # e.g. Google's errors in Anthropic's shape
            self.owners.observe(flow.request, flow.response, state.account)
            resources.localize_batch_reply(flow.request, flow.response)
        finally:
            self.router.release(state)  # whatever went wrong above, the attempt is over

    def error(self, flow: http.HTTPFlow) -> None:
        state = self.states.get(flow)
        if state:
            self.router.release(state)

    def server_connect_error(self, data) -> None:
        if data.server.address and tuple(data.server.address[:2]) in self.pool_servers:
            self.router.upstream_failed()  # open the circuit (see request)


def addons() -> list:
    """Fresh instances, in hook order: the gate first, then /health (for whom the gate let in) and
    the client's limits, routing and failover before recording, and connection limits last of those
    that touch flows, so that they see any refusal made in `requestheaders`; alerts, which watch
    account states, after."""
    states = FlowStates()
    recorder = Recorder(states)
    claudeflare = Claudeflare(recorder, states)
    recorder.metrics = metrics = Metrics(claudeflare, recorder)
    client_limits, alerts = ClientLimits(claudeflare, states), Alerts(claudeflare)
    claudeflare.client_limits = client_limits  # its counters are shared too (state.py)
    alerts.budgets = client_limits.budget_views
    return [
        ClientGate(claudeflare, states),
        HealthCheck(claudeflare, recorder, states),
        client_limits,
        claudeflare,
        recorder,
        metrics,
        ConnectionLimits(),
        alerts,
    ]
