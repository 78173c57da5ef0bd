"""The ClientLimits addon: each pool flow's client held to its key's limits (client_rules.py),
right after the ClientGate has named the client.

Expiry, budget, concurrency and requests per minute are decided on the request head, the model
allow-list once the body is in (every "model" the JSON names, parsed as upstream could). Each head
check is a dict lookup or two: spend comes from the flow log's SpendCounter, summed on its writer
thread. A refusal is a row in the flow log under the client's name, like any answered request.
"""

import asyncio
import logging
import math
import time
from collections import Counter

from mitmproxy import http

from .alerts import BudgetView
from .client_rules import Limits, SpendCounter, iso_z, model_refused, named_models, period_end, period_key
from .flows import FlowStates, error_response
from .offloop import off_loop

logger = logging.getLogger(__name__)

SPEND_WAIT = 3.0  # seconds a request waits for its client's spend to be summed at first


def refuse(status: int, kind: str, message: str, retry_after: float | None = None) -> http.Response:
    headers = {"retry-after": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
    return error_response(status, kind, f"Claudeflare: {message}", headers)


class ClientLimits:
    """Checks each pool flow's client against its key's limits, after the ClientGate named the client.

    Expiry, budget, concurrency and requests per minute are decided on the request head; the model
    allow-list once the body is in. A concurrency slot is released when the flow
    ends, by response or error, in `finish`."""

    def __init__(self, claudeflare, states: FlowStates) -> None:
        self.claudeflare = claudeflare  # its pool (the limits per client) and recorder (the flow log)
        self.states = states
        self.minute: tuple[int, Counter] = (0, Counter())  # (UTC minute, requests admitted in it per client)
        self.in_flight: Counter[str] = Counter()
        self.holding: dict[str, str] = {}  # flow state id -> client holding a concurrency slot
        # Other proxies' counts (state.py): key -> (client, in flight, UTC minute, admitted in it, valid until)
        self.elsewhere: dict[str, tuple[str, int, int, int, float]] = {}

    def spend(self) -> SpendCounter | None:
        recorder = self.claudeflare.recorder
        return recorder.flowlog.spend if recorder and recorder.flowlog else None

    def budget_views(self) -> dict[str, BudgetView]:
        """Each budgeted client's spend this period, for the budget alerts (`Alerts.budgets`)."""
        spend, now = self.spend(), time.time()
        views = {}
        for client, limits in self.claudeflare.pool.client_limits.items():
            if spend is None or not (limits.budget_usd and limits.per):
                continue
            if (spent := spend.spent(client, limits.per, now)) is not None:
                views[client] = BudgetView(period_key(limits.per, int(now // 86400)), spent, limits.budget_usd)
        return views

    def limits(self, client: str | None) -> Limits | None:
        pool = self.claudeflare.pool
        spend = self.spend()
        if spend is not None and spend.budgets is not pool.client_limits:
            spend.budgets = pool.client_limits  # the pool changed: what the flow log sums
        return pool.client_limits.get(client) if client else None

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        await self.guarded(flow, self.check_head)

    async def request(self, flow: http.HTTPFlow) -> None:
        await self.guarded(flow, self.check_model)

    async def guarded(self, flow: http.HTTPFlow, check) -> None:
        """mitmproxy would log a hook's exception and relay the flow unchecked: refuse it instead."""
        state = self.states.get(flow)
        limits = self.limits(state.client) if state and not flow.response else None
        if limits is None:
            return
        try:
            await check(flow, state.client, limits)
        except Exception:
            logger.exception("claudeflare: internal error checking a client's limits; the request was refused")
            flow.response = error_response(500, "api_error", "Claudeflare: internal error; the proxy's log says more.")
        if flow.response:
            self.finish(flow)

    async def check_head(self, flow: http.HTTPFlow, client: str, limits: Limits) -> None:
        if limits.budget_usd is not None:
            await self.await_spend(client, limits.per)
        flow.response = self.head_refusal(client, limits, time.time())
        if flow.response is None and limits.concurrency:
            self.in_flight[client] += 1
            self.holding[self.states.get(flow).id] = client

    async def check_model(self, flow: http.HTTPFlow, client: str, limits: Limits) -> None:
        if not limits.models:
            return
        if flow.request.headers.get("content-encoding", "identity").lower() != "identity":
            flow.response = refuse(
                400, "invalid_request_error", f"client key {client!r} has a model allow-list: send bodies uncompressed."
            )
        elif refused := model_refused(
            await off_loop(named_models, body=flow.request.raw_content or b"") or [], limits.models
        ):
            flow.response = refuse(
                403,
                "permission_error",
                f"client key {client!r} may not use model {refused[:128]!r}; allowed: {', '.join(limits.models)}.",
            )

    def head_refusal(self, client: str, limits: Limits, now: float) -> http.Response | None:
        expires = limits.expires_epoch
        if expires is not None and now >= expires:
            return refuse(401, "authentication_error", f"client key {client!r} expired at {limits.expires_at}.")
        if limits.budget_usd is not None:
            spent = self.spent(client, limits.per, now)
            if spent is None:
                return refuse(
                    429,
                    "rate_limit_error",
                    f"client key {client!r}: reading its spend from the flow log; try again in a second.",
                    1,
                )
            if spent >= limits.budget_usd:
                end = period_end(limits.per, now)
                return refuse(
                    429,
                    "rate_limit_error",
                    f"client key {client!r} has spent ${spent:.2f} of its ${limits.budget_usd:.2f} budget per {limits.per}; "
                    f"it renews at {iso_z(end)} (UTC).",
                    end.timestamp() - now,
                )
        busy, admitted = self.others(client, int(now // 60), now)
        if limits.concurrency and self.in_flight[client] + busy >= limits.concurrency:
            return refuse(
                429,
                "rate_limit_error",
                f"client key {client!r} is limited to {limits.concurrency} concurrent request(s).",
                1,
            )
        if limits.rpm:
            minute = int(now // 60)
            if self.minute[0] != minute:
                self.minute = (minute, Counter())
            counts = self.minute[1]
            if counts[client] + admitted >= limits.rpm:
                return refuse(
                    429,
                    "rate_limit_error",
                    f"client key {client!r} is limited to {limits.rpm} request(s) per minute.",
                    (minute + 1) * 60 - now,
                )
            counts[client] += 1
        return None

    def others(self, client: str, minute: int, now: float) -> tuple[int, int]:
        """(requests in flight, admitted in `minute`) for the client in the other proxies, as last reported."""
        live = [v for v in self.elsewhere.values() if v[0] == client and v[4] > now]
        return sum(v[1] for v in live), sum(v[3] for v in live if v[2] == minute)

    def adopt_counts(self, key: str, client: str, in_flight: int, minute: int, admitted: int, until: float) -> None:
        now = time.time()
        for stale in [k for k, v in self.elsewhere.items() if v[4] <= now]:
            del self.elsewhere[stale]
        self.elsewhere[key] = (client, in_flight, minute, admitted, until)

    async def await_spend(self, client: str, per: str) -> None:
        """A key's budget just came into force (the proxy started, or it was set): the flow log
        sums its spend within a second; wait for that rather than refuse at once."""
        for _ in range(int(SPEND_WAIT / 0.05)):
            if self.spent(client, per, time.time()) is not None:
                return
            await asyncio.sleep(0.05)

    def spent(self, client: str, per: str, now: float) -> float | None:
        spend = self.spend()
        return spend.spent(client, per, now) if spend else None

    def response(self, flow: http.HTTPFlow) -> None:
        self.finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.finish(flow)

    def finish(self, flow: http.HTTPFlow) -> None:
        state = self.states.get(flow)
        client = self.holding.pop(state.id, None) if state else None
        if client is not None:
            self.in_flight[client] -= 1
            if self.in_flight[client] <= 0:
                del self.in_flight[client]
