"""The rules of client keys' limits (claudeflare/client_rules.py): values, periods, models, spend."""

import json
import math
import time
from datetime import UTC, datetime

import pytest

from claudeflare.accounts import load_pool
from claudeflare.client_rules import (
    Limits,
    LimitsError,
    SpendCounter,
    model_refused,
    named_models,
    parse_limits,
    period_end,
    period_start,
)
from claudeflare.credentials import CredentialStore, CredentialStoreError
from claudeflare.flowlog import FlowLog, open_db

from harness import wait_until


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_limits_are_checked_and_normalized():
    limits = parse_limits(
        {
            "budget_usd": 50,
            "per": "week",
            "rpm": 60,
            "concurrency": 2,
            "models": "claude-sonnet-*, claude-haiku-4-5",
            "expires_at": "2027-01-31T02:00:00+02:00",
        }
    )
    assert limits == Limits(50.0, "week", 60, 2, ("claude-sonnet-*", "claude-haiku-4-5"), "2027-01-31T00:00:00Z")
    assert parse_limits(limits.to_json()) == limits  # what is stored reads back the same
    assert parse_limits({"expires_at": "2027-01-31"}).expires_at == "2027-01-31T00:00:00Z"  # a date: its 00:00 UTC
    assert parse_limits(None) == parse_limits({}) == Limits()


@pytest.mark.parametrize(
    "raw",
    [
        {"budget_usd": 0, "per": "day"},
        {"budget_usd": -1, "per": "day"},
        {"budget_usd": math.nan, "per": "day"},
        {"budget_usd": math.inf, "per": "day"},
        {"budget_usd": True, "per": "day"},
        {"budget_usd": "5", "per": "day"},
        {"budget_usd": 1e7, "per": "day"},
        {"budget_usd": 5},
        {"per": "day"},
        {"budget_usd": 5, "per": "year"},
        {"rpm": 0},
        {"rpm": 1.5},
        {"rpm": True},
        {"rpm": 10**9},
        {"concurrency": -1},
        {"models": ""},
        {"models": "claude sonnet"},
        {"models": ["x"] * 33},
        {"models": "a" * 129},
        {"models": 5},
        {"expires_at": "soon"},
        {"expires_at": 1700000000},
        {"expires_at": "0001-01-01T00:00:00+01:00"},
        {"budget": 5},
        "limits",
    ],
)
def test_bad_limits_are_refused(raw):
    with pytest.raises(LimitsError):
        parse_limits(raw)


def test_a_bad_limit_in_credentials_json_names_the_key_but_never_the_value(tmp_path):
    secret = "sk-ant-api03 pasted+by=mistake"
    (tmp_path / "credentials.json").write_text(
        json.dumps({"client_keys": {"laptop": {"sha256": "ab", "limits": {"models": secret}}, "ok": {"sha256": "cd"}}})
    )
    with pytest.raises(CredentialStoreError) as e:
        CredentialStore(tmp_path).read()
    assert "'laptop'" in str(e.value) and "model pattern" in str(e.value) and secret not in str(e.value)
    (tmp_path / "credentials.json").write_text(
        json.dumps({"client_keys": {"laptop": {"sha256": "ab", "limits": {"rpm": 5}}, "ok": {"sha256": "cd"}}})
    )
    assert load_pool(tmp_path).client_limits == {"laptop": Limits(rpm=5)}  # keys without limits are not listed


@pytest.mark.parametrize(
    "per, now, start, end",
    [
        ("day", "2026-11-30T23:59:59", "2026-11-30T00:00:00", "2026-12-01T00:00:00"),
        ("week", "2026-12-02T12:00:00", "2026-11-30T00:00:00", "2026-12-07T00:00:00"),  # a Wednesday: from Monday
        ("week", "2026-11-30T00:00:00", "2026-11-30T00:00:00", "2026-12-07T00:00:00"),
        ("month", "2026-12-31T23:00:00", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ("month", "2027-02-15T08:00:00", "2027-02-01T00:00:00", "2027-03-01T00:00:00"),
    ],
)
def test_periods_are_calendar_periods_in_utc(per, now, start, end):
    assert period_start(per, at(now)) == datetime.fromisoformat(start).replace(tzinfo=UTC)
    assert period_end(per, at(now)) == datetime.fromisoformat(end).replace(tzinfo=UTC)


def test_every_model_a_body_names_is_found_as_a_parser_reads_it():
    assert named_models(b'{"model": "claude-haiku-4-5", "messages": []}') == ["claude-haiku-4-5"]
    assert named_models(b'{"model": "a", "model": "b"}') == ["a", "b"]  # duplicates: both
    assert named_models(b'{"model": "claude-\\u006fpus-4"}') == ["claude-opus-4"]  # escapes decoded
    assert named_models(b'{"mod\\u0065l": "claude-opus-4"}') == ["claude-opus-4"]
    batch = b'{"requests": [{"custom_id": "1", "params": {"model": "claude-haiku-4-5"}}, {"params": {"model": "claude-opus-4"}}]}'
    assert named_models(batch) == ["claude-haiku-4-5", "claude-opus-4"]
    assert named_models(b'{"model": ["x"]}') == ["<list>"]  # not a string: still a model, never allowed by a pattern
    # What Python's parser would refuse but another may take: no way around the list.
    assert named_models(b'{"model": "claude-opus-4", "n": ' + b"1" * 5000 + b"}") == ["claude-opus-4"]
    assert named_models(b'{"model": "claude-opus-4", "x": "\xff\x01"}') == ["claude-opus-4"]
    assert named_models(b"--boundary\r\nfile bytes") is None  # not JSON (a file upload): no model
    assert named_models(b"[" * 100_000 + b"]" * 100_000) is None  # too deep: no crash


def test_models_match_the_allow_list_as_globs():
    patterns = ("claude-sonnet-*", "claude-haiku-4-5")
    assert model_refused(["claude-sonnet-4-6", "claude-haiku-4-5"], patterns) is None
    assert model_refused(["claude-sonnet-4-6", "claude-opus-4-8"], patterns) == "claude-opus-4-8"
    assert model_refused(["CLAUDE-SONNET-4-6"], patterns) == "CLAUDE-SONNET-4-6"  # case counts, as upstream
    assert model_refused([], patterns) is None


def test_spend_is_the_logged_sum_plus_rows_queued_since(tmp_path):
    """A burst between two sums counts at once: the rows queued after a sum are added to it."""
    db = open_db(tmp_path / "log.db")
    now = at("2026-11-30T12:00:00")
    db["requests"].insert_all(
        [
            {"id": "1", "started_at": "2026-11-30T00:00:00.000Z", "client": "ci", "cost_usd": 1.0},
            {"id": "2", "started_at": "2026-11-29T23:59:59.999Z", "client": "ci", "cost_usd": 5.0},  # yesterday
            {"id": "3", "started_at": "2026-11-30T10:00:00.000Z", "client": "other", "cost_usd": 7.0},
        ]
    )
    spend = SpendCounter()
    spend.budgets = {"ci": Limits(budget_usd=2.0, per="day"), "other": Limits(rpm=1)}
    assert spend.spent("ci", "day", now) is None  # not summed yet
    spend.log({"client": "ci", "cost_usd": 0.25})  # row 1, queued before the sum, written by then
    spend.chore(db, finished=1, now=now)
    spend.log({"client": "ci", "cost_usd": 0.5})  # row 2: after the sum
    spend.log({"client": "other", "cost_usd": 9.0})  # no budget: not tracked
    # The sum reads the table: row 1's 0.25 was not inserted above, so only the 1.0 is summed.
    assert spend.spent("ci", "day", now) == pytest.approx(1.5)
    assert spend.spent("other", "day", now) is None
    assert spend.spent("ci", "day", at("2026-12-01T00:00:01")) == pytest.approx(0.5)  # a new day: the old sum lapses
    assert [r["name"] for r in db.query("select name from client_limits order by name")] == ["ci", "other"]


def test_the_flow_log_publishes_spend_from_its_writer_thread(tmp_path):
    log = FlowLog(tmp_path / "log.db", interval=0.05).start()
    try:
        log.spend.budgets = {"ci": Limits(budget_usd=1.0, per="month")}
        log.log(
            {
                "id": "a",
                "started_at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "client": "ci",
                "cost_usd": 0.75,
            }
        )
        assert wait_until(lambda: log.spend.published and log.spend.published[1].get("ci", ("", 0))[1] == 0.75)
        assert log.spend.spent("ci", "month", time.time()) == pytest.approx(0.75)  # counted once
    finally:
        log.close()


def test_client_key_set_changes_and_clears_limits_and_refuses_bad_ones(tmp_path):
    from click.testing import CliRunner

    from claudeflare.cli import cli

    def run(*args, ok=True):
        result = CliRunner().invoke(cli, ["--home", str(tmp_path), "client-key", *args])
        assert (result.exit_code == 0) == ok, result.output
        return result.output

    def stored():
        return CredentialStore(tmp_path).read()["client_keys"]["ci"].get("limits")

    run("create", "ci", "--budget-usd", "5", "--per", "day", "--rpm", "10")
    run("set", "ci", "--budget-usd", "7.5")  # the period stays
    assert stored() == {"budget_usd": 7.5, "per": "day", "rpm": 10}
    run("set", "ci", "--clear", "budget", "--models", "claude-haiku-*")
    assert stored() == {"rpm": 10, "models": ["claude-haiku-*"]}
    assert "budget needs both" in run("set", "ci", "--budget-usd", "3", ok=False)  # no period to keep
    assert "rpm must be a whole number" in run("set", "ci", "--rpm", "0", ok=False)
    assert "expiry must be an ISO date" in run("create", "x", "--expires", "tomorrow", ok=False)
    assert stored() == {"rpm": 10, "models": ["claude-haiku-*"]}  # a refused change changes nothing
    run("set", "ci", "--clear", "rpm", "--clear", "models")
    assert stored() is None
    assert "no client key named 'nope'" in run("set", "nope", "--rpm", "1", ok=False)
