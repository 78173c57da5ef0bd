"""The Metrics addon's parts, without a proxy: options, bounded labels, rows and gauges as exposed."""

import json

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from claudeflare.metrics import OTHER, BoundedLabel, Metrics, parse_endpoint, status_class


class Stub:
    """What the addon reads of the Claudeflare addon and the Recorder."""

    def __init__(self, rows=(), backlog=0):
        self.rows, self.backlog = list(rows), backlog

    def status_rows(self):
        return self.rows


def exposed(metrics: Metrics) -> dict:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_options_are_checked():
    assert parse_endpoint(0, "127.0.0.1") is None
    assert parse_endpoint(9464, "::1") == ("::1", 9464)
    for port, host in ((70000, "127.0.0.1"), (-1, "127.0.0.1"), (9464, "localhost; rm")):
        with pytest.raises(ValueError):
            parse_endpoint(port, host)


def test_worker_n_of_serve_takes_the_port_plus_n_minus_1():
    assert parse_endpoint(9464, "127.0.0.1", "1") == ("127.0.0.1", 9464)
    assert parse_endpoint(9464, "127.0.0.1", "3") == ("127.0.0.1", 9466)
    assert parse_endpoint(0, "127.0.0.1", "3") is None  # off stays off
    assert parse_endpoint(9464, "127.0.0.1", "junk") == ("127.0.0.1", 9464)
    with pytest.raises(ValueError, match="worker 3 would serve on 65536"):
        parse_endpoint(65534, "127.0.0.1", "3")


def test_labels_from_clients_are_bounded():
    models = BoundedLabel(limit=3)
    assert [models(m) for m in ("m1", None, "m2", "m3", "m1", "m4")] == ["m1", "", "m2", OTHER, "m1", OTHER]
    assert [status_class(s) for s in (200, 429, 503, None)] == ["2xx", "4xx", "5xx", "none"]


def test_status_rows_become_gauges_and_rows_counters():
    row = {
        "name": "a",
        "state": "limited",
        "reason": "429",
        "requests_in_flight": 2,
        "limited_until": "2026-11-30T18:00:00.000Z",
        "utilization_5h": 0.5,
        "utilization_7d": None,
        "utilization_extra": 0.25,
    }
    status = Stub([row], backlog=7)
    metrics = Metrics(status, status)
    metrics.gauges.rows = tuple(status.status_rows())
    metrics.observe(
        {
            "account": "a",
            "status": 429,
            "model": "m",
            "client": None,
            "input_tokens": 3,
            "output_tokens": 0,
            "cost_usd": 0.5,
            "ttfb_ms": 100.0,
            "duration_ms": 2500.0,
            "failovers": json.dumps([{"account": "a", "status": 529, "reason": "overloaded"}] * 2),
        }
    )
    metrics.observe(
        {"account": None, "status": None, "failovers": "not json"}
    )  # counted as far as it reads; never raises
    samples = exposed(metrics)
    assert samples[("claudeflare_account_state", (("account", "a"), ("state", "limited")))] == 1
    assert samples[("claudeflare_requests_in_flight", (("account", "a"),))] == 2
    assert samples[("claudeflare_account_limited_until_seconds", (("account", "a"),))] == 1796061600.0
    windows = {dict(k[1])["window"]: v for k, v in samples.items() if k[0] == "claudeflare_account_utilization"}
    assert windows == {"5h": 0.5, "extra": 0.25}  # a window not seen is absent, not 0
    assert samples[("claudeflare_flowlog_backlog", ())] == 7
    assert (
        samples[
            ("claudeflare_requests_total", (("account", "a"), ("client", ""), ("model", "m"), ("status_class", "4xx")))
        ]
        == 1
    )
    assert (
        samples[
            ("claudeflare_requests_total", (("account", ""), ("client", ""), ("model", ""), ("status_class", "none")))
        ]
        == 1
    )
    assert samples[("claudeflare_tokens_total", (("kind", "input"),))] == 3
    assert samples[("claudeflare_failovers_total", (("reason", "overloaded"),))] == 2
    assert samples[("claudeflare_cost_usd_total", ())] == 0.5
    assert samples[("claudeflare_ttfb_seconds_bucket", (("le", "0.1"),))] == 1
    assert samples[("claudeflare_request_duration_seconds_bucket", (("le", "2.5"),))] == 1
    assert samples[("claudeflare_request_duration_seconds_bucket", (("le", "1.0"),))] == 0
