"""Prometheus metrics and /health through a real mitmdump (issue #13, parts 3 and 4)."""

import time

import pytest
import requests
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from claudeflare.cli import cli

from harness import api_key_accounts, db_rows, free_port, key_for, wait_until

MODEL = "claude-sonnet-4-6"


def ask(proxy, stream=False):
    body = {"model": MODEL, "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    return requests.post(f"{proxy.url}/v1/messages", json=body, headers={"x-fake-tokens": "12"}, timeout=30)


def scrape(port) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, parsed by prometheus_client: (name, labels) -> value."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def run(home, *args):
    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_metrics_count_requests_tokens_failovers_and_show_account_gauges(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    fake.set_fault("a", "status:429", count=1)  # a's first reply: limited, with windows (back in 60 s)
    port = free_port()
    proxy = start_proxy(home, "--set", "claudeflare_strategy=round-robin", "--set", f"claudeflare_metrics_port={port}")
    replies = [ask(proxy), ask(proxy, stream=True), ask(proxy), ask(proxy, stream=True)]
    assert [r.status_code for r in replies] == [200] * 4
    rows = db_rows(home, expect=4)
    assert sum(bool(r["failovers"]) for r in rows) == 1 and {r["account"] for r in rows} == {"b"}

    def scraped():
        samples = scrape(port)
        return samples if sample(samples, "claudeflare_account_state", account="a", state="limited") == 1 else None

    assert wait_until(scraped, timeout=5)  # the gauges follow the status rows within a second
    samples = scraped()
    assert sample(samples, "claudeflare_requests_total", account="b", status_class="2xx", model=MODEL, client="") == 4
    assert sample(samples, "claudeflare_failovers_total", reason="limited") == 1
    for kind, column in (("input", "input_tokens"), ("output", "output_tokens")):
        assert sample(samples, "claudeflare_tokens_total", kind=kind) == sum(r[column] for r in rows) > 0
    cost = sum(r["cost_usd"] for r in rows)
    assert cost > 0 and sample(samples, "claudeflare_cost_usd_total") == pytest.approx(cost)
    assert sample(samples, "claudeflare_ttfb_seconds_count") == 4
    assert sample(samples, "claudeflare_request_duration_seconds_count") == 4
    assert sample(samples, "claudeflare_request_duration_seconds_sum") == pytest.approx(
        sum(r["duration_ms"] for r in rows) / 1000
    )
    assert sample(samples, "claudeflare_account_state", account="b", state="ok") == 1
    assert sample(samples, "claudeflare_account_state", account="a", state="ok") is None  # one state per account
    assert 50 < sample(samples, "claudeflare_account_limited_until_seconds", account="a") - time.time() <= 61
    assert sample(samples, "claudeflare_account_limited_until_seconds", account="b") == 0
    assert sample(samples, "claudeflare_requests_in_flight", account="b") == 0
    assert sample(samples, "claudeflare_flowlog_backlog") == 0
    assert key_for("a") not in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text

    health = requests.get(f"{proxy.url}/health", timeout=10)  # a is benched, b serves
    assert health.status_code == 200 and health.json()["usable_accounts"] == 1


def test_health_is_200_while_an_account_serves_then_503_and_is_never_logged(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home)
    assert ask(proxy).status_code == 200

    def health():
        return requests.get(f"{proxy.url}/health?probe=1", timeout=10)

    assert wait_until(lambda: health().json()["flowlog_backlog"] == 0, timeout=5)  # rows are written every half second
    health = health()
    assert health.status_code == 200 and health.headers["content-type"] == "application/json"
    assert health.json() == {
        "status": "ok",
        "usable_accounts": 1,
        "accounts": [{"name": "a", "state": "ok", "reason": None}],
        "strategy": "session",
        "flowlog_backlog": 0,
    }
    head = requests.head(f"{proxy.url}/health", timeout=10)
    assert head.status_code == 200 and head.content == b""

    run(home, "pause", "a")

    def unavailable():
        return requests.get(f"{proxy.url}/health", timeout=10)

    assert wait_until(lambda: unavailable().status_code == 503, timeout=5)  # accounts.toml is reloaded within a second
    body = unavailable().json()
    assert body["status"] == "unavailable" and body["usable_accounts"] == 0
    assert body["accounts"] == [{"name": "a", "state": "paused", "reason": None}]
    assert requests.head(f"{proxy.url}/health", timeout=10).status_code == 503
    assert key_for("a") not in unavailable().text
    assert len(fake.requests) == 1  # /health never reached the upstream
    time.sleep(1)  # the flow log writes within half a second
    assert [r["path"] for r in db_rows(home)] == ["/v1/messages"]


def test_health_is_503_while_every_account_is_rate_limited(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    fake.set_fault("a", "status:429", count=1)  # limited, back in 60 s
    proxy = start_proxy(home)
    assert ask(proxy).status_code == 429
    health = requests.get(f"{proxy.url}/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert health.json()["accounts"][0]["state"] == "limited"


def test_health_follows_the_client_key_rule(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    key = run(home, "client-key", "create", "lb")
    proxy = start_proxy(home)
    refused = requests.get(f"{proxy.url}/health", timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert requests.get(f"{proxy.url}/health", headers={"x-api-key": "wrong"}, timeout=10).status_code == 401
    health = requests.get(f"{proxy.url}/health", headers={"x-api-key": key}, timeout=10)
    assert health.status_code == 200 and health.json()["usable_accounts"] == 1
    assert key not in health.text


def test_a_taken_metrics_port_stops_the_proxy_with_a_clear_error_and_the_port_closes_with_it(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    port = free_port()
    proxy = start_proxy(home, "--set", f"claudeflare_metrics_port={port}")
    second = start_proxy(home, "--set", f"claudeflare_metrics_port={port}")  # the first proxy holds the port
    assert second.proc.wait(20) != 0
    assert f"claudeflare_metrics_port: cannot listen on 127.0.0.1:{port}: Address already in use" in second.output()
    assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
    proxy.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
