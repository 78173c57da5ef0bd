"""Alerts without a proxy: the [alerts] table, event detection over snapshots, payloads, the sender."""

import logging
import time
from types import SimpleNamespace

import pytest

from claudeflare import alerts
from claudeflare.accounts import AccountsError, parse_accounts
from claudeflare.alerts import REFRESH_FAILURES, AccountView, AlertsConfig, Sender, detect

from alert_receiver import AlertReceiver

SECRET_URL = "https://hooks.slack.com/services/T000/B000/XXXXSECRETXXXX"
ACCOUNT = '[[accounts]]\nname = "a"\nmode = "api-key"\n'


def parse(alerts_table: str):
    return parse_accounts(ACCOUNT + "\n" + alerts_table, "accounts.toml").alerts


# --- configuration -------------------------------------------------------------------------------


def test_alerts_table_defaults_to_generic_format_and_every_event():
    config = parse(f'[alerts]\nurl = "{SECRET_URL}"\n')
    assert config.format == "generic" and config.events == set(alerts.EVENTS)
    assert config.host == "hooks.slack.com"
    assert "SECRET" not in repr(config)
    assert parse_accounts(ACCOUNT).alerts is None


def test_alerts_table_takes_slack_format_and_a_subset_of_events():
    config = parse(f'[alerts]\nurl = "{SECRET_URL}"\nformat = "slack"\nevents = ["limited", "exhausted"]\n')
    assert config.format == "slack" and config.events == {"limited", "exhausted"}


@pytest.mark.parametrize(
    "table, complaint",
    [
        ('url = "ftp://example.com/XXXXSECRETXXXX"', "'url' must be an http:// or https:// URL"),
        ('url = "https:///XXXXSECRETXXXX"', "'url' must be an http:// or https:// URL"),
        ('url = "http://example.com:99999/XXXXSECRETXXXX"', "'url' must be an http:// or https:// URL"),
        ('url = "http://example.com/a\\nXXXXSECRETXXXX"', "'url' must be an http:// or https:// URL"),
        ('url = "http://example.com/é/XXXXSECRETXXXX"', "'url' must be an http:// or https:// URL"),
        ('format = "slack"', "'url' is required"),
        ('url = "https://example.com/XXXXSECRETXXXX"\nformat = "teams"', "'format' must be one of generic, slack"),
        ('url = "https://example.com/XXXXSECRETXXXX"\nevents = ["limited", "on-fire"]', "unknown event(s) 'on-fire'"),
        ('url = "https://example.com/XXXXSECRETXXXX"\nevents = "limited"', "'events' must be a list"),
        ('url = "https://example.com/XXXXSECRETXXXX"\nchannel = "#ops"', "unknown key(s) channel"),
    ],
)
def test_a_bad_alerts_table_names_file_and_line_and_never_quotes_the_url(table, complaint):
    with pytest.raises(AccountsError) as e:
        parse(f"[alerts]\n{table}\n")
    assert str(e.value).startswith("accounts.toml line 5: [alerts]")  # ACCOUNT is 3 lines, then a blank one
    assert complaint in str(e.value)
    assert "XXXXSECRETXXXX" not in str(e.value)


def test_alerts_must_be_a_table():
    with pytest.raises(AccountsError, match=r"accounts.toml: 'alerts' must be a table"):
        parse_accounts('alerts = "https://example.com"\n' + ACCOUNT, "accounts.toml")


# --- detection -----------------------------------------------------------------------------------


def views(**states):
    return {name: v if isinstance(v, AccountView) else AccountView(v) for name, v in states.items()}


def run(*snapshots):
    """Events over successive snapshots, as the addon sees them each second."""
    seen, events = {}, []
    for snap in snapshots:
        events += detect(seen, snap)
        seen = snap
    return events


def test_limited_fires_once_per_occurrence_with_its_reset():
    limited = AccountView("limited", "2030-01-01T00:00:00.000Z")
    jittered = AccountView("limited", "2030-01-01T00:00:01.000Z")
    events = run(views(a="ok", b="ok"), views(a=limited, b="ok"), views(a=limited, b="ok"), views(a=jittered, b="ok"))
    assert [(e.event, e.account, e.fields) for e in events] == [("limited", "a", {"reset": "2030-01-01T00:00:00.000Z"})]
    assert "until 2030-01-01T00:00:00.000Z" in events[0].message
    # The reset came, then a new limit: a new occurrence.
    again = run(views(a=limited, b="ok"), views(a="ok", b="ok"), views(a=limited, b="ok"), views(a=limited, b="ok"))
    assert [e.event for e in again] == ["limited", "limited"]


def test_needs_login_and_disabled_fire_once_each():
    events = run(
        views(a="ok", b="ok", c="ok"),
        views(a="needs-login", b="disabled", c="ok"),
        views(a="needs-login", b="disabled", c="ok"),
    )
    assert [(e.event, e.account) for e in events] == [("needs-login", "a"), ("disabled", "b")]
    assert "claudeflare login a" in events[0].message


def test_an_account_already_broken_when_first_seen_fires():
    assert [e.event for e in run(views(a="needs-login", b="ok"))] == ["needs-login"]


def test_exhausted_fires_once_when_no_account_can_serve():
    limited = AccountView("limited", "2030-01-01T00:00:00.000Z")
    events = run(views(a=limited, b="ok"), views(a=limited, b="needs-login"), views(a=limited, b="needs-login"))
    assert [e.event for e in events] == ["limited", "needs-login", "exhausted"]
    assert events[-1].account is None and events[-1].fields["reset"] == "2030-01-01T00:00:00.000Z"
    assert events[-1].fields["accounts"] == {"a": "limited", "b": "needs-login"}


def test_not_exhausted_while_one_account_serves_or_is_only_overloaded_or_the_pool_is_empty():
    for serving in ("ok", "warning", "overloaded"):
        assert not [e for e in run(views(a="disabled", b=serving)) if e.event == "exhausted"]
    assert run({}) == []
    assert [e.event for e in run(views(a="paused"))] == ["exhausted"]


def test_refresh_failing_fires_at_the_threshold_once_and_again_after_a_success():
    failing = [views(a=AccountView("ok", refresh_failures=n)) for n in range(1, REFRESH_FAILURES + 3)]
    events = run(*failing)
    assert [(e.event, e.account, e.fields) for e in events] == [
        ("refresh-failing", "a", {"failures": REFRESH_FAILURES})
    ]
    assert [e.event for e in run(*failing, views(a="ok"), *failing)] == ["refresh-failing", "refresh-failing"]


def test_budget_events_fire_once_per_period_at_80_and_100_percent():
    def spend(*amounts, period="2030-01-01T00:00:00.000Z"):
        return [{"ci": alerts.BudgetView(period, amount, 10.0)} for amount in amounts]

    events = [
        (e.event, e.fields["client"], e.fields["spent_usd"]) for e in run_budgets(*spend(1, 7.9, 8, 8.5, 9.9, 10, 12))
    ]
    assert events == [("budget-80", "ci", 8), ("budget-100", "ci", 10)]
    assert [e.event for e in run_budgets(*spend(0, 11))] == ["budget-80", "budget-100"]  # both passed in one step
    next_period = spend(1, 9, period="2030-02-01T00:00:00.000Z")
    assert [e.event for e in run_budgets(*spend(9, 9), *next_period)] == ["budget-80", "budget-80"]  # a new period
    assert run_budgets({"free": alerts.BudgetView("2030-01-01T00:00:00.000Z", 5.0, 0.0)}) == []
    (event,) = run_budgets(*spend(0, 10))[1:]
    assert "client key ci has spent $10.00 of its $10.00 budget (100%)" in event.message


def run_budgets(*snapshots):
    seen, events = {}, []
    for snap in snapshots:
        events += alerts.budget_events(seen, snap)
        seen = snap
    return events


def test_the_addon_sends_account_and_budget_events_each_once():
    rows = [
        {"name": "a", "state": "limited", "limited_until": "2030-01-01T00:00:00.000Z"},
        {"name": "b", "state": "ok"},
    ]
    config = AlertsConfig(SECRET_URL)
    claudeflare = SimpleNamespace(
        watcher=SimpleNamespace(pool=SimpleNamespace(alerts=config)), refresher=None, status_rows=lambda: rows
    )
    sent = []
    addon = alerts.Alerts(claudeflare, SimpleNamespace(submit=lambda config, body: sent.append(body) or True))
    addon.budgets = lambda: {"ci": alerts.BudgetView("2030-01-01T00:00:00.000Z", 8.5, 10.0)}
    for _ in range(3):
        addon.check()
    assert [(b["event"], b["account"], b.get("client")) for b in sent] == [
        ("limited", "a", None),
        ("budget-80", None, "ci"),
    ]
    assert sent[1]["spent_usd"] == 8.5 and sent[1]["budget_usd"] == 10.0


def test_every_event_has_a_sample():
    assert [alerts.sample(e).event for e in alerts.EVENTS] == list(alerts.EVENTS)


# --- payloads ------------------------------------------------------------------------------------


def test_generic_payload_carries_event_account_message_time_and_fields():
    config = AlertsConfig(SECRET_URL)
    body = alerts.payload(config, "limited", "account a is limited", "a", at=0, reset="2030-01-01T00:00:00.000Z")
    assert body == {
        "event": "limited",
        "account": "a",
        "message": "account a is limited",
        "at": "1970-01-01T00:00:00.000Z",
        "reset": "2030-01-01T00:00:00.000Z",
    }
    budget = alerts.payload(config, "budget-80", "ci spent 80%", client="ci", spent_usd=8.0)
    assert budget["client"] == "ci" and budget["account"] is None and budget["spent_usd"] == 8.0


def test_slack_payload_is_only_text():
    body = alerts.payload(AlertsConfig(SECRET_URL, "slack"), "limited", "account a is limited", "a", reset="x")
    assert body == {"text": "account a is limited"}


def test_a_key_passed_by_a_caller_never_reaches_a_payload():
    for key in ("sk-ant-api03-" + "k" * 40, "sk-ant-ort01-" + "k" * 40, "cfk-" + "k" * 40):
        for fmt in alerts.FORMATS:
            body = alerts.payload(
                AlertsConfig(SECRET_URL, fmt), "budget-100", f"client ci ({key}) is over", client="ci", note=key
            )
            assert "k" * 40 not in str(body) and "[redacted]" in str(body)


# --- sending -------------------------------------------------------------------------------------


class Posts:
    """A stand-in for `alerts.post`: answers from a script of statuses and exceptions."""

    def __init__(self, *script):
        self.script, self.calls = list(script), 0

    def __call__(self, config, body):
        self.calls += 1
        result = self.script.pop(0) if self.script else 200
        if isinstance(result, Exception):
            raise result
        return result


def send(post, tries=3):
    sender = Sender(tries=tries, delay=0.01, post=post)
    sender._send(AlertsConfig(SECRET_URL), {"event": "limited"})
    return post.calls


def test_sender_retries_connection_errors_and_5xx_then_delivers(caplog):
    assert send(Posts(ConnectionRefusedError(111, "Connection refused"), 503, 200)) == 3
    assert "not delivered" not in caplog.text


def test_sender_gives_up_after_its_tries_and_says_so_by_host_only(caplog):
    with caplog.at_level(logging.WARNING):
        assert send(Posts(500, 500, 500, 500)) == 3
    assert "not delivered (3 tries): HTTP 500" in caplog.text and "hooks.slack.com" in caplog.text
    assert "SECRET" not in caplog.text


def test_sender_does_not_retry_a_refusal_or_a_redirect():
    assert send(Posts(404)) == 1
    assert send(Posts(302)) == 1
    assert send(Posts(429, 200)) == 2


def test_a_full_queue_drops_with_one_log_line_and_never_blocks(caplog):
    sender = Sender(size=2)  # not started: nothing drains it
    config = AlertsConfig(SECRET_URL)
    with caplog.at_level(logging.WARNING):
        accepted = [sender.submit(config, {"event": "limited"}) for _ in range(5)]
    assert accepted == [True, True, False, False, False]
    assert caplog.text.count("backing up") == 1 and "SECRET" not in caplog.text


def test_sender_posts_json_to_a_real_receiver():
    with AlertReceiver() as receiver:
        sender = Sender()
        sender.start()
        try:
            config = AlertsConfig(receiver.url("/hooks/abc?token=q"))
            assert sender.submit(config, alerts.payload(config, "disabled", "account a is disabled", "a"))
            (body,) = receiver.wait(1)
        finally:
            sender.stop()
    assert receiver.posts[0][0] == "/hooks/abc?token=q"
    assert body["event"] == "disabled" and body["account"] == "a"


def test_notify_follows_the_configured_events():
    watcher = SimpleNamespace(pool=SimpleNamespace(alerts=AlertsConfig(SECRET_URL, events=frozenset({"budget-100"}))))
    addon = alerts.Alerts(SimpleNamespace(watcher=watcher), Sender())
    assert addon.notify("budget-100", client="ci", message="ci is over its budget")
    assert not addon.notify("budget-80", client="ci", message="ci passed 80%")
    with pytest.raises(ValueError):
        addon.notify("budget-90", client="ci", message="?")
    watcher.pool = SimpleNamespace(alerts=None)
    assert not addon.notify("budget-100", client="ci", message="ci is over its budget")


def test_stopping_gives_queued_alerts_one_try_and_returns_at_once():
    post = Posts(500, 500)
    sender = Sender(delay=10, post=post)
    config = AlertsConfig(SECRET_URL)
    sender.submit(config, {"event": "limited"})
    sender.submit(config, {"event": "exhausted"})
    sender.start()
    start = time.monotonic()
    sender.stop()
    assert time.monotonic() - start < 1 and post.calls == 2  # no 10 s wait for a retry
