"""Idle subscriptions' usage from the usage endpoint (contract §9): parsing, the read budget, and a
real proxy reading the fake's endpoint, showing it in `claudeflare list` and routing by it."""

import json
import time
from datetime import UTC, datetime

import pytest
import requests
from click.testing import CliRunner
from mitmproxy import exceptions
from mitmproxy.test import taddons

from claudeflare.cli import cli
from claudeflare.clock import iso_utc
from claudeflare.flowlog import open_db
from claudeflare.proxy import Claudeflare
from claudeflare.ratelimit import Health
from claudeflare.usage_poll import MAX_BACKOFF, Schedule, parse_usage

from harness import CLAUDE_CODE_SYSTEM, USAGE_READS, add_account, api_key_accounts, wait_until

RESET = "2026-12-01T10:00:00+00:00"
RESET_EPOCH = datetime(2026, 12, 1, 10, tzinfo=UTC).timestamp()


def test_parse_usage_turns_percentages_into_fractions():
    body = json.dumps(
        {
            "five_hour": {"utilization": 42.0, "resets_at": RESET},
            "seven_day": {"utilization": 105, "resets_at": "2026-12-01T10:00:00Z"},  # past 100% (extra usage)
            "seven_day_opus": {"utilization": 81.5, "resets_at": None},
            "seven_day_sonnet": None,
            "seven_day_oauth_apps": None,
            "extra_usage": {"is_enabled": True, "monthly_limit": 5000, "used_credits": 620, "utilization": 12.4},
        }
    ).encode()
    usage = parse_usage(body)
    assert usage.windows == {"5h": (0.42, RESET_EPOCH), "7d": (1.05, RESET_EPOCH), "7d_opus": (0.815, None)}
    assert usage.extra == pytest.approx(0.124)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b"null",
        b'"text"',
        b"[" * 100_000,
        b'{"five_hour": "full", "seven_day": [], "extra_usage": 3}',
        b'{"five_hour": {"utilization": "42"}, "seven_day": {"utilization": true}, "seven_day_opus": {"utilization": NaN}}',
        b'{"five_hour": {"utilization": -5}, "seven_day": {"utilization": Infinity}, "extra_usage": {"utilization": null}}',
    ],
)
def test_parse_usage_leaves_out_what_does_not_parse(body):
    usage = parse_usage(body)
    assert usage.windows == {} and usage.extra is None


def test_parse_usage_keeps_a_window_whose_reset_does_not_parse():
    usage = parse_usage(
        b'{"five_hour": {"utilization": 7, "resets_at": "soon"}, "seven_day": {"utilization": 1, "resets_at": 5}}'
    )
    assert usage.windows == {"5h": (0.07, None), "7d": (0.01, None)}


def test_schedule_reads_once_per_interval_and_backs_off_on_errors():
    schedule = Schedule(300)
    assert schedule.due("m", 1000)  # at start
    schedule.read("m", 1000)
    assert not schedule.due("m", 1299) and schedule.due("m", 1300)
    assert [schedule.failed("m", 0) for _ in range(5)] == [600, 1200, 2400, MAX_BACKOFF, MAX_BACKOFF]
    assert schedule.failed("m", 0, retry_after=5000) == 5000  # retry-after beyond the backoff is honoured
    assert schedule.failed("m", 0, retry_after=10**9) == 6 * 3600  # within reason
    schedule.read("m", 0)
    assert schedule.failed("m", 0, retry_after=1) == 600  # never sooner than the backoff
    assert Schedule(300).due("other", 0)


def test_the_interval_option_is_checked():
    addon = Claudeflare()
    with taddons.context(addon) as tctx:
        assert addon.usage_poller.schedule.interval == 300
        tctx.configure(addon, claudeflare_usage_interval=0)  # off
        assert addon.usage_poller.schedule.interval == 0
        with pytest.raises(exceptions.OptionsError, match="claudeflare_usage_interval must not be negative"):
            tctx.configure(addon, claudeflare_usage_interval=-1)


def test_health_counts_an_idle_accounts_usage():
    now = time.time()
    health = Health(clock=lambda: now)
    health.observe_usage("idle", {"5h": (0.97, now + 600), "7d": (0.2, None)}, 0.5)
    assert health.utilization_now("idle", now) == 0.97 and health.utilization_now("idle", now + 601) == 0.2
    assert (
        health.available("idle") and health.get("idle").extra_usage == 0.5 and health.get("idle").usage_read_at == now
    )


def test_list_shows_usage_with_resets(home):
    add_account(
        home,
        "sub",
        "max",
        20,
        access_token="sk-ant-oat01-list",
        refresh_token="sk-ant-ort01-list",
        expires_at=time.time() + 3600,
    )
    db = open_db(home / "claudeflare.db")
    db["account_status"].insert(
        {
            "name": "sub",
            "state": "ok",
            "utilization_5h": 0.25,
            "reset_5h": iso_utc(time.time() + 2 * 3600 + 630),
            "utilization_7d_opus": 0.815,
            "reset_7d_opus": iso_utc(time.time() + 3 * 86400 + 3 * 3600 + 60),
            "utilization_7d_sonnet": 0.05,
            "utilization_extra": 0.124,
            "usage_read_at": iso_utc(time.time()),
            "updated_at": iso_utc(time.time()),
        }
    )
    db.close()
    table = CliRunner().invoke(cli, ["--home", str(home), "list"]).output
    assert "25% (resets in 2h10m)" in table and "82% (resets in 3d03h)" in table and "12%" in table
    (row,) = json.loads(CliRunner().invoke(cli, ["--home", str(home), "list", "--json"]).output)
    assert (row["utilization_7d_opus"], row["utilization_7d_sonnet"], row["utilization_extra"]) == (0.815, 0.05, 0.124)
    assert (
        row["reset_7d_opus"].endswith("Z")
        and row["reset_5h"]
        and row["usage_read_at"]
        and row["reset_7d_sonnet"] is None
    )


# --- through a real proxy -------------------------------------------------------------------------


def enrol(fake, home, name, tier=5):
    tokens = fake.add_oauth(account=name, expires_in=3600)
    add_account(
        home,
        name,
        "max",
        tier,
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
        expires_at=time.time() + 3600,
    )
    return tokens


def listed(home) -> dict:
    return {r["name"]: r for r in json.loads(CliRunner().invoke(cli, ["--home", str(home), "list", "--json"]).output)}


def usage_requests(fake, account=None):
    return [r for r in fake.requests if r["path"] == "/api/oauth/usage" and account in (None, r["claimed_account"])]


def test_an_idle_subscriptions_usage_is_read_once_at_start_and_listed(fake, home, start_proxy):
    tokens = enrol(fake, home, "idle")
    api_key_accounts(fake, home, ("key", 1))
    fake.set_usage(
        "idle",
        {
            "seven_day_opus": {"utilization": 81.5, "resets_at": RESET},
            "seven_day_sonnet": {"utilization": 5, "resets_at": RESET},
            "extra_usage": {"is_enabled": True, "utilization": 12.4},
        },
    )
    proxy = start_proxy(home, "--set", USAGE_READS)
    assert wait_until(lambda: listed(home)["idle"]["utilization_7d_opus"] == 0.815, timeout=10)
    idle = listed(home)["idle"]
    assert idle["utilization_5h"] == 0.1 and idle["utilization_7d"] == 0.05  # the fake's 10% and 5%
    assert idle["reset_7d_opus"] == "2026-12-01T10:00:00.000Z" and idle["utilization_7d_sonnet"] == 0.05
    assert idle["utilization_extra"] == pytest.approx(0.124) and idle["reset_5h"] and idle["usage_read_at"]
    assert listed(home)["key"]["utilization_7d_opus"] is None
    time.sleep(2)  # the default interval is 5 minutes: nothing more is read meanwhile
    (read,) = usage_requests(fake)
    assert read["claimed_account"] == "idle" and read["status"] == 200
    assert read["headers"]["authorization"] == f"Bearer {tokens['access_token']}"
    assert read["headers"]["anthropic-beta"] == "oauth-2025-04-20"
    assert tokens["access_token"] not in proxy.output()


def test_new_conversations_avoid_an_idle_account_whose_window_is_nearly_spent(fake, home, start_proxy):
    for name in ("spent", "roomy"):
        enrol(fake, home, name)
    fake.set_usage("spent", {"five_hour": {"utilization": 97, "resets_at": iso_utc(time.time() + 3600)}})
    proxy = start_proxy(home, "--set", USAGE_READS)
    assert wait_until(lambda: fake.usage_reads("spent") == fake.usage_reads("roomy") == 1, timeout=10)
    assert wait_until(lambda: listed(home)["spent"]["utilization_5h"] == 0.97, timeout=5)
    for i in range(4):
        body = {
            "model": "claude-sonnet-4-6",
            "max_tokens": 5,
            "system": CLAUDE_CODE_SYSTEM,
            "messages": [{"role": "user", "content": f"conversation {i}"}],
        }
        reply = requests.post(
            f"{proxy.url}/v1/messages",
            json=body,
            timeout=10,
            headers={"x-claude-code-session-id": f"00000000-0000-4000-8000-00000000000{i}"},
        )
        assert reply.status_code == 200, reply.text
    assert {r["account"] for r in fake.requests if r["path"] == "/v1/messages"} == {"roomy"}


def test_a_spent_read_budget_is_waited_out_not_retried(fake, home, start_proxy):
    enrol(fake, home, "m")
    fake.usage_budget = 2
    proxy = start_proxy(home, "--set", "claudeflare_usage_interval=1")
    assert wait_until(lambda: len(usage_requests(fake, "m")) == 3, timeout=10)  # two reads, then a 429
    time.sleep(4)  # backoff alone would have tried again twice by now
    assert [r["status"] for r in usage_requests(fake, "m")] == [200, 200, 429]
    assert "the usage endpoint answered 429 for m, next read in 3" in proxy.output()  # ~3600 s, from retry-after
