"""The HealthCheck addon: the proxy answers `GET /health` (and HEAD) itself, for a load balancer or
an orchestrator — 200 while an account can serve now, else 503 — and never logs it.

It runs after the ClientGate, so the same client rules hold (a client key once keys exist), and
before routing: Claude Code and the SDKs never ask for /health, so no Anthropic path is shadowed.
"""

import json
import logging

from mitmproxy import http

from .flows import FlowStates, error_response

logger = logging.getLogger(__name__)

PATH = "/health"


def is_health_check(request: http.Request) -> bool:
    return request.method in ("GET", "HEAD") and request.path.split("?", 1)[0] == PATH


def serving_now(claudeflare) -> list[str]:
    """Accounts that can take a request now: usable (not paused, a working credential) and not benched."""
    return [a.name for a in claudeflare.pool.usable() if claudeflare.health.available(a.name)]


def health_report(claudeflare, backlog: int) -> dict:
    """Plain, secret-free facts: names, states and why, the strategy, the flow log's backlog."""
    serving = serving_now(claudeflare)
    return {
        "status": "ok" if serving else "unavailable",
        "usable_accounts": len(serving),
        "accounts": [
            {"name": r["name"], "state": r["state"], "reason": r["reason"]} for r in claudeflare.status_rows()
        ],
        "strategy": claudeflare.pool.strategy or claudeflare.strategy_option,
        "flowlog_backlog": backlog,
    }


class HealthCheck:
    def __init__(self, claudeflare, recorder, states: FlowStates) -> None:
        self.claudeflare = claudeflare
        self.recorder = recorder  # its flow log's backlog
        self.states = states

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or self.states.get(flow) is None or not is_health_check(flow.request):
            return  # refused by the gate, not a pool flow, or not for us
        self.states.discard(flow)  # not a request to route or log
        try:
            report = health_report(self.claudeflare, self.recorder.backlog)
        except Exception:  # answered here whatever happens: never relayed unrouted
            logger.exception("claudeflare: building the health report failed")
            flow.response = error_response(500, "api_error", "Claudeflare: internal error; the proxy's log says more.")
            return
        flow.response = http.Response.make(
            200 if report["usable_accounts"] else 503,
            json.dumps(report),
            {"content-type": "application/json", "cache-control": "no-store"},
        )
        if flow.request.method == "HEAD":
            flow.response.content = b""
