"""Alerts through a real mitmdump, to a webhook receiver on loopback; and `claudeflare alerts test`."""

import time
from datetime import datetime

import requests
from click.testing import CliRunner

from claudeflare.cli import cli

from alert_receiver import AlertReceiver, Silent
from harness import CLAUDE_CODE_SYSTEM, add_account, api_key_accounts, free_port

MODEL = "claude-sonnet-4-6"
SECRET_PATH = "/services/T0/B0/XXXXSECRETPATHXXXX"  # Slack-like: the path is the secret
QUIET = 2.5  # seconds of further requests and status ticks in which no alert may repeat


def write_alerts(home, url, *lines):
    """Set the [alerts] table of accounts.toml (the proxy reloads it within a second)."""
    path = home / "accounts.toml"
    text = path.read_text().split("\n[alerts]\n")[0]
    path.write_text(text + "\n[alerts]\n" + f'url = "{url}"\n' + "".join(line + "\n" for line in lines))


def ask(proxy):
    body = {
        "model": MODEL,
        "max_tokens": 100,
        "system": CLAUDE_CODE_SYSTEM,
        "messages": [{"role": "user", "content": "hi"}],
    }
    return requests.post(f"{proxy.url}/v1/messages", json=body, timeout=30)


def epoch(iso):
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_limited_alerts_once_with_its_reset_and_an_exhausted_pool_once(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    fake.set_limit("a", requests=1, window_s=3600)
    fake.set_limit("b", requests=4, window_s=3600)
    with AlertReceiver() as receiver:
        write_alerts(home, receiver.url(SECRET_PATH))
        proxy = start_proxy(home, "--set", "claudeflare_strategy=round-robin")
        statuses = [ask(proxy).status_code for _ in range(5)]
        assert statuses == [200] * 5  # a is spent after one request, b serves on
        (limited,) = receiver.wait(1, event="limited")
        assert limited["account"] == "a" and abs(epoch(limited["reset"]) - (time.time() + 3600)) < 60
        assert "a is rate limited until" in limited["message"]

        more = [ask(proxy).status_code for _ in range(4)]
        assert more[-1] == 429  # b is spent too: nobody left
        (exhausted,) = receiver.wait(1, event="exhausted")
        assert exhausted["account"] is None and exhausted["accounts"] == {"a": "limited", "b": "limited"}
        assert "no account can take a new request" in exhausted["message"]

        deadline = time.monotonic() + QUIET
        while time.monotonic() < deadline:  # however many requests follow, nothing repeats
            assert ask(proxy).status_code == 429
            time.sleep(0.1)
        events = [(b["event"], b["account"]) for b in receiver.bodies()]
    assert sorted(events, key=str) == sorted([("limited", "a"), ("limited", "b"), ("exhausted", None)], key=str)
    assert {path for path, _ in receiver.posts} == {SECRET_PATH}
    assert f"alerts go to 127.0.0.1:{receiver.port} (generic format): needs-login, disabled, limited," in proxy.output()
    assert "XXXXSECRETPATHXXXX" not in proxy.output()


def test_a_revoked_refresh_token_alerts_needs_login_in_slack_format(fake, home, start_proxy):
    tokens = fake.add_oauth(account="dead", expires_in=1)
    add_account(
        home,
        "dead",
        "max",
        5,
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
        expires_at=time.time() + 1,
    )
    api_key_accounts(fake, home, ("alive", 1))
    fake.revoke_refresh_token(tokens["refresh_token"])
    time.sleep(1.1)  # the access token has expired: the next use needs a refresh, which is refused
    with AlertReceiver() as receiver:
        write_alerts(home, receiver.url(SECRET_PATH), 'format = "slack"', 'events = ["needs-login", "exhausted"]')
        proxy = start_proxy(
            home, "--set", f"claudeflare_token_url={fake.url}/v1/oauth/token", "--set", "termlog_verbosity=debug"
        )
        assert [ask(proxy).status_code for _ in range(6)] == [200] * 6  # alive serves
        (alert,) = receiver.wait(1)
        time.sleep(QUIET)
        assert [ask(proxy).status_code for _ in range(3)] == [200] * 3
        assert receiver.bodies() == [alert]
    assert set(alert) == {"text"} and "account dead needs a new log-in" in alert["text"]
    assert tokens["refresh_token"] not in str(receiver.posts) and tokens["access_token"] not in str(receiver.posts)
    assert "XXXXSECRETPATHXXXX" not in proxy.output()  # not even at debug verbosity


def test_a_receiver_that_never_answers_does_not_slow_requests(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    fake.set_limit("a", requests=1, window_s=3600)
    with Silent() as silent:
        write_alerts(home, silent.url(SECRET_PATH))
        proxy = start_proxy(home, "--set", "claudeflare_strategy=round-robin")
        assert [ask(proxy).status_code for _ in range(4)] == [200] * 4  # a is limited on the way (its second turn)
        silent.accept()  # the alert is on its way to a receiver that holds it
        took = []
        for _ in range(10):
            start = time.monotonic()
            assert ask(proxy).status_code == 200
            took.append(time.monotonic() - start)
    assert max(took) < 1.0, took


def test_an_alerts_table_added_while_the_proxy_runs_applies(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home)
    assert ask(proxy).status_code == 200
    with AlertReceiver() as receiver:
        write_alerts(home, receiver.url(SECRET_PATH), 'events = ["exhausted"]')
        time.sleep(1.5)  # reloaded
        fake.disable("a")
        assert ask(proxy).status_code >= 400
        (alert,) = receiver.wait(1)
    assert alert["event"] == "exhausted" and alert["accounts"] == {
        "a": "disabled"
    }  # `disabled` itself was not asked for


def cli_run(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home), "alerts", "test", *args])


def test_cli_alerts_test_posts_a_sample_and_names_only_the_host(home):
    add_account(home, "a", "api-key", 1, api_key="sk-ant-api03-" + "x" * 30)
    with AlertReceiver() as receiver:
        write_alerts(home, receiver.url(SECRET_PATH))
        result = cli_run(home)
        assert result.exit_code == 0, result.output
        assert result.output.strip() == f"sent a sample 'limited' alert to 127.0.0.1:{receiver.port} (generic format)"
        (body,) = receiver.bodies()
        assert body["event"] == "limited" and body["account"] == "sample-account" and body["reset"]

        write_alerts(home, receiver.url(SECRET_PATH), 'format = "slack"')
        result = cli_run(home, "--event", "budget-80")
        assert result.exit_code == 0, result.output
        assert set(receiver.bodies()[-1]) == {"text"} and "80%" in receiver.bodies()[-1]["text"]

        receiver.status = 500
        result = cli_run(home)
        assert result.exit_code == 1 and "was not delivered: HTTP 500" in result.output

    write_alerts(home, f"http://127.0.0.1:{free_port()}{SECRET_PATH}")  # nothing listens there
    result = cli_run(home, "--event", "needs-login")
    assert result.exit_code == 1 and "'needs-login' sample to 127.0.0.1:" in result.output
    assert "Connection refused" in result.output and "Traceback" not in result.output
    assert "XXXXSECRETPATHXXXX" not in result.output


def test_cli_alerts_test_without_an_alerts_table_says_what_to_add(home):
    add_account(home, "a", "api-key", 1, api_key="sk-ant-api03-" + "x" * 30)
    result = cli_run(home)
    assert result.exit_code == 1 and "no [alerts] table in" in result.output and 'url = "https://…"' in result.output


def test_a_client_key_past_its_budget_alerts_budget_80_then_100_once(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    created = CliRunner().invoke(
        cli, ["--home", str(home), "client-key", "create", "ci", "--budget-usd", "1", "--per", "day"]
    )
    key = created.stdout.strip()
    with AlertReceiver() as receiver:
        write_alerts(home, receiver.url(SECRET_PATH), 'events = ["budget-80", "budget-100"]')
        proxy = start_proxy(home)

        def spend(input_tokens):  # Sonnet input at $3 per million tokens
            body = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
            headers = {"x-api-key": key, "x-fake-input-tokens": str(input_tokens)}
            return requests.post(f"{proxy.url}/v1/messages", json=body, headers=headers, timeout=30).status_code

        assert spend(100_000) == 200  # $0.30
        assert spend(200_000) == 200  # $0.90: past 80 %
        (eighty,) = receiver.wait(1, event="budget-80")
        assert eighty["client"] == "ci" and eighty["budget_usd"] == 1 and round(eighty["spent_usd"], 2) == 0.9
        assert spend(100_000) == 200  # $1.20: past 100 %
        (hundred,) = receiver.wait(1, event="budget-100")
        assert hundred["client"] == "ci"
        deadline = time.monotonic() + QUIET
        while time.monotonic() < deadline:  # refused from now on, and no alert repeats
            assert spend(10) == 429
            time.sleep(0.2)
        assert sorted(b["event"] for b in receiver.bodies()) == ["budget-100", "budget-80"]
    assert key not in str(receiver.posts)
