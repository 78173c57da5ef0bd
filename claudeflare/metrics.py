"""The Metrics addon: Prometheus metrics on `claudeflare_metrics_port` (0: off), on loopback unless
`claudeflare_metrics_host` says otherwise.

Counters and histograms grow from each finished flow-log row (the Recorder hands it over, already
made storable); the account gauges come from the proxy's status rows, taken each second on the
event loop and read by the exporter's thread as one immutable snapshot. The addon has its own
registry: a reloaded script brings a fresh one, never a duplicate name in the global registry.
"""

import asyncio
import ipaddress
import json
import logging
import os
from collections.abc import Callable
from datetime import datetime

from mitmproxy import ctx, exceptions
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from .config import WORKER_ENV

logger = logging.getLogger(__name__)

MAX_LABEL_VALUES = 50  # distinct models (or clients) per label; further ones count as "other"
OTHER = "other"
# LLM replies take from well under a second to many minutes.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)  # and +Inf
TOKEN_KINDS = {
    "input_tokens": "input",
    "output_tokens": "output",
    "cache_read_input_tokens": "cache_read",
    "cache_creation_input_tokens": "cache_creation",
}
UTILIZATION = "utilization_"  # status-row columns utilization_<window>


def parse_endpoint(port: int, host: str, worker: str | None = None) -> tuple[str, int] | None:
    """Where to serve /metrics, or None when off. Worker n of `claudeflare serve` (`worker`, from
    the environment) serves on `port` + n - 1: each worker's figures are its own, scraped apart."""
    if not 0 <= port <= 65535:
        raise ValueError("claudeflare_metrics_port must be from 0 (off) to 65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"claudeflare_metrics_host must be an IP address, not {host!r}") from None
    if port and worker and worker.isdigit() and int(worker) > 1:
        port += int(worker) - 1
        if port > 65535:
            raise ValueError(f"claudeflare_metrics_port: worker {worker} would serve on {port}, past 65535")
    return (host, port) if port else None


def status_class(status: int | None) -> str:
    return f"{status // 100}xx" if status else "none"  # none: the client got no reply


class BoundedLabel:
    """A label whose values come from clients: the first `limit` distinct values, then "other"."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value) -> str:
        value = "" if value is None else str(value)
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value


def epoch(iso: str | None) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else 0.0


class AccountGauges:
    """A collector for the gauges of the latest snapshot: the exporter thread never sees one half-set."""

    def __init__(self, backlog: Callable[[], int]) -> None:
        self.rows: tuple[dict, ...] = ()
        self.backlog = backlog

    def describe(self):
        return []  # nothing to check for duplicates: the names are this module's own

    def collect(self):
        rows = self.rows
        state = GaugeMetricFamily(
            "claudeflare_account_state", "1 for the account's current state.", labels=["account", "state"]
        )
        in_flight = GaugeMetricFamily(
            "claudeflare_requests_in_flight", "Requests in flight per account.", labels=["account"]
        )
        utilization = GaugeMetricFamily(
            "claudeflare_account_utilization",
            "Share of the account's limit used, per window.",
            labels=["account", "window"],
        )
        limited = GaugeMetricFamily(
            "claudeflare_account_limited_until_seconds",
            "When the account's rate limit ends, as a Unix time (0: not limited).",
            labels=["account"],
        )
        for row in rows:
            name = row["name"]
            state.add_metric([name, row["state"]], 1)
            in_flight.add_metric([name], row["requests_in_flight"])
            limited.add_metric([name], epoch(row["limited_until"]))
            for column, value in row.items():
                if column.startswith(UTILIZATION) and value is not None:
                    utilization.add_metric([name, column.removeprefix(UTILIZATION)], value)
        backlog = GaugeMetricFamily(
            "claudeflare_flowlog_backlog", "Flow-log rows waiting to be written.", value=self.backlog()
        )
        return [state, in_flight, utilization, limited, backlog]


class Metrics:
    def __init__(self, claudeflare, recorder) -> None:
        self.claudeflare = claudeflare  # its status rows
        self.registry = CollectorRegistry()
        self.models, self.clients = BoundedLabel(), BoundedLabel()
        self.requests = Counter(
            "claudeflare_requests",
            "Requests answered, by account, status class, model and client.",
            ["account", "status_class", "model", "client"],
            registry=self.registry,
        )
        self.tokens = Counter("claudeflare_tokens", "Tokens, by kind.", ["kind"], registry=self.registry)
        self.cost = Counter("claudeflare_cost_usd", "Cost in US dollars at list prices.", registry=self.registry)
        self.ttfb = Histogram(
            "claudeflare_ttfb_seconds", "Time to the reply's first byte.", buckets=BUCKETS, registry=self.registry
        )
        self.duration = Histogram(
            "claudeflare_request_duration_seconds",
            "Time to the reply's last byte.",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.failovers = Counter(
            "claudeflare_failovers",
            "Refused attempts (retried, or the last), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.gauges = AccountGauges(lambda: recorder.backlog)
        self.registry.register(self.gauges)
        self.endpoint: tuple[str, int] | None = None
        self.server = None
        self.task: asyncio.Task | None = None
        self.failed: type | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "claudeflare_metrics_port", int, 0, "Serve Prometheus metrics at /metrics on this port (0: off)."
        )
        loader.add_option("claudeflare_metrics_host", str, "127.0.0.1", "Address the metrics port listens on.")

    def configure(self, updated: set[str]) -> None:
        if not {"claudeflare_metrics_port", "claudeflare_metrics_host"} & updated:
            return
        try:
            endpoint = parse_endpoint(
                ctx.options.claudeflare_metrics_port, ctx.options.claudeflare_metrics_host, os.environ.get(WORKER_ENV)
            )
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        if endpoint == self.endpoint:
            return
        self.stop()
        if endpoint:
            try:
                self.server, _ = start_http_server(endpoint[1], endpoint[0], self.registry)
            except OSError as e:
                raise exceptions.OptionsError(
                    f"claudeflare_metrics_port: cannot listen on {endpoint[0]}:{endpoint[1]}: {e.strerror}"
                ) from None
            logger.info("claudeflare: metrics at http://%s:%d/metrics", *endpoint)
        self.endpoint = endpoint

    def running(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.sample())

    def done(self) -> None:
        if self.task:
            self.task.cancel()
        self.stop()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()  # waits for its loop to notice: at most half a second
            self.server.server_close()
            self.server = None
        self.endpoint = None

    async def sample(self, every: float = 1.0) -> None:
        """The proxy's status rows, as the gauges show them."""
        while True:
            if self.server:
                try:
                    self.gauges.rows = tuple(self.claudeflare.status_rows())
                    self.failed = None
                except Exception as e:  # one bad value must not end the gauges for good
                    if type(e) is not self.failed:
                        logger.exception("claudeflare: reading account status for the metrics failed")
                    self.failed = type(e)
            await asyncio.sleep(every)

    def observe(self, row: dict) -> None:
        """Count one finished request (its flow-log row, made storable). Never raises: the row is
        logged whatever happens here."""
        try:
            self.requests.labels(
                row.get("account") or "",
                status_class(row.get("status")),
                self.models(row.get("model")),
                self.clients(row.get("client")),
            ).inc()
            for column, kind in TOKEN_KINDS.items():
                if row.get(column):
                    self.tokens.labels(kind).inc(row[column])
            if row.get("cost_usd"):
                self.cost.inc(row["cost_usd"])
            if row.get("ttfb_ms") is not None:
                self.ttfb.observe(row["ttfb_ms"] / 1000)
            if row.get("duration_ms") is not None:
                self.duration.observe(row["duration_ms"] / 1000)
            for failover in json.loads(row["failovers"]) if row.get("failovers") else ():
                self.failovers.labels(str(failover.get("reason"))).inc()
        except Exception:
            logger.exception("claudeflare: counting a request for the metrics failed")
