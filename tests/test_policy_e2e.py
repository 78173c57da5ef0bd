"""Subscriptions serve Claude Code only, and limits as Anthropic means them, through a real mitmdump."""

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from claudeflare.cli import cli
from claudeflare.credentials import Credential, CredentialStore
from claudeflare.flowlog import account_status

from fake_anthropic import THIRD_PARTY_REFUSALS, expected_text
from harness import CLAUDE_CODE_SYSTEM, ROOT, add_account, api_key_accounts, db_rows, wait_until

CLAUDE = ROOT / "node_modules" / ".bin" / "claude"
SONNET, OPUS = "claude-sonnet-4-6", "claude-opus-4-8"


def max_accounts(fake, home, *names, priority=0):
    for name in names:
        access, refresh = f"sk-ant-oat01-{name}-access", f"sk-ant-ort01-{name}-refresh"
        fake.add_oauth(account=name, access_token=access, refresh_token=refresh, expires_in=7200)
        add_account(
            home, name, "max", 5, priority, access_token=access, refresh_token=refresh, expires_at=time.time() + 7200
        )


def ask(proxy, claude_code=True, model=SONNET, **headers):
    """A request of a new conversation each time, unless headers name one."""
    headers = {"x-claude-code-session-id": str(uuid.uuid4()), **headers}
    body = {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    if claude_code:
        body["system"] = CLAUDE_CODE_SYSTEM
    return requests.post(f"{proxy.url}/v1/messages", json=body, headers={"x-api-key": "client", **headers}, timeout=30)


def served(fake):
    return [(r["account"], r["status"]) for r in fake.requests if r["path"] == "/v1/messages"]


def test_real_claude_code_runs_on_a_subscription(fake, home, start_proxy, tmp_path):
    assert CLAUDE.exists(), "scripts/setup installs the Claude Code CLI into node_modules/"
    max_accounts(fake, home, "sub")
    proxy = start_proxy(home)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path / "cc-home"),
        "ANTHROPIC_BASE_URL": proxy.url,
        "ANTHROPIC_API_KEY": "sk-ant-api03-client-side-ignored",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    Path(env["HOME"]).mkdir()
    done = subprocess.run(
        [str(CLAUDE), "-p", "say hi"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert expected_text(10) in done.stdout
    messages = [r for r in fake.requests if r["path"] == "/v1/messages"]
    assert messages and all(
        r["account"] == "sub" and r["auth_kind"] == "oauth" and r["status"] == 200 for r in messages
    )
    # HEAD / is answered by the proxy; the one other call is the proxy's own usage read at start.
    assert [r["path"] for r in fake.requests if r["path"] != "/v1/messages"] in ([], ["/api/oauth/usage"])
    rows = db_rows(home, "path = '/v1/messages'", expect=len(messages))
    assert {r["account_kind"] for r in rows} == {"subscription"}


def test_other_clients_get_a_clear_403_and_nothing_goes_upstream(fake, home, start_proxy):
    max_accounts(fake, home, "sub")
    proxy = start_proxy(home)
    refused = ask(proxy, claude_code=False)
    assert refused.status_code == 403
    error = refused.json()
    assert error["type"] == "error" and error["error"]["type"] == "permission_error"
    assert (
        "only Claude Code" in error["error"]["message"]
        and "claudeflare add NAME --mode api-key" in error["error"]["message"]
    )
    assert (
        ask(proxy, claude_code=False, model="claude-haiku-4-5").status_code == 403
    )  # Haiku too: the terms, not the API
    assert served(fake) == []
    assert ask(proxy).status_code == 200 and served(fake) == [("sub", 200)]


def test_claude_code_goes_to_subscriptions_and_the_rest_to_keys(fake, home, start_proxy):
    max_accounts(fake, home, "sub", priority=0)
    api_key_accounts(fake, home, ("key", 1, 1))  # a worse priority: only what subscriptions may not serve
    keys = {
        name: CliRunner().invoke(cli, ["--home", str(home), "client-key", "create", name]).stdout.strip()
        for name in ("laptop", "ci")
    }
    proxy = start_proxy(home)
    sent = [("laptop", True), ("laptop", False), ("ci", False), ("laptop", True)]
    assert [ask(proxy, claude_code=cc, **{"x-api-key": keys[client]}).status_code for client, cc in sent] == [200] * 4
    assert served(fake) == [("sub", 200), ("key", 200), ("key", 200), ("sub", 200)]
    rows = db_rows(home, expect=4)
    assert [r["account_kind"] for r in rows] == ["subscription", "api-key", "api-key", "subscription"]
    # Per client: how much went to subscriptions and how much to keys.
    stats = json.loads(CliRunner().invoke(cli, ["--home", str(home), "stats", "--json"]).stdout)["clients"]
    split = {(r["client"], r["account_kind"]): r["requests"] for r in stats}
    assert split == {("ci", "api-key"): 1, ("laptop", "api-key"): 1, ("laptop", "subscription"): 2}
    assert all(r["tokens"] > 0 for r in stats)


@pytest.mark.parametrize("form", list(THIRD_PARTY_REFUSALS))
def test_option_any_lets_other_clients_try_subscriptions(fake, home, start_proxy, form):
    max_accounts(fake, home, "sub", priority=0)
    api_key_accounts(fake, home, ("key", 1, 1))
    fake.third_party_refusal = form
    proxy = start_proxy(home, "--set", "claudeflare_subscription_clients=any")
    # The subscription refuses it (Claude Code only, in any of its forms): the request fails over to
    # the key, the account stays in service.
    assert ask(proxy, claude_code=False).status_code == 200
    assert served(fake) == [("sub", THIRD_PARTY_REFUSALS[form][0]), ("key", 200)]
    assert ask(proxy).status_code == 200 and served(fake)[-1] == ("sub", 200)


@pytest.mark.parametrize("how", ["organization", "oauth"])
def test_disabled_account_fails_over_and_stays_out_until_its_credential_changes(fake, home, start_proxy, how):
    max_accounts(fake, home, "gone", priority=0)
    max_accounts(fake, home, "spare", priority=1)
    fake.disable("gone", how)
    proxy = start_proxy(home)
    assert ask(proxy).status_code == 200
    assert served(fake) == [("gone", 400 if how == "organization" else 403), ("spare", 200)]
    assert wait_until(lambda: account_status(home / "claudeflare.db").get("gone", {}).get("state") == "disabled")
    assert "disabled" in account_status(home / "claudeflare.db")["gone"]["reason"]
    listed = {r["name"]: r for r in json.loads(CliRunner().invoke(cli, ["--home", str(home), "list", "--json"]).stdout)}
    assert listed["gone"]["state"] == "disabled" and listed["spare"]["state"] == "ok"
    for _ in range(3):
        assert ask(proxy).status_code == 200
    assert [a for a, _ in served(fake)[2:]] == ["spare"] * 3  # never retried
    # A new login: new tokens in the store (the proxy reloads it within a second); Anthropic takes them again.
    fake.enable("gone")
    fake.add_oauth(account="gone", access_token="sk-ant-oat01-gone-new", refresh_token="sk-ant-ort01-gone-new")
    CredentialStore(home).set_account(
        "gone",
        Credential(
            access_token="sk-ant-oat01-gone-new", refresh_token="sk-ant-ort01-gone-new", expires_at=time.time() + 3600
        ),
    )
    assert wait_until(lambda: ask(proxy).status_code == 200 and served(fake)[-1] == ("gone", 200), timeout=10)


def test_long_context_refusal_goes_to_a_key_and_leaves_the_subscription_in_service(fake, home, start_proxy):
    max_accounts(fake, home, "sub", priority=0)
    api_key_accounts(fake, home, ("key", 1, 1))
    proxy = start_proxy(home)
    long = ask(proxy, **{"x-fake-input-tokens": "250000", "anthropic-beta": "context-1m-2025-08-07"})
    assert long.status_code == 200
    assert served(fake) == [("sub", 429), ("key", 200)]
    # Claude Code sends the 1M beta on every request: the next one still goes to the subscription.
    assert ask(proxy, **{"anthropic-beta": "context-1m-2025-08-07"}).status_code == 200
    assert served(fake)[-1] == ("sub", 200)
    rows = db_rows(home, expect=2)
    assert rows[0]["account"] == "key" and '"reason": "long-context"' in rows[0]["failovers"]


def test_out_of_credits_with_windows_allowed_does_not_bench(fake, home, start_proxy):
    max_accounts(fake, home, "sub", priority=0)
    max_accounts(fake, home, "other", priority=1)
    fake.set_overage("sub", "rejected", "out_of_credits")
    proxy = start_proxy(home)
    assert ask(proxy, **{"x-fake-fault": "long-context"}).status_code == 429  # no key: the refusal reaches the client
    assert served(fake) == [("sub", 429)]
    assert ask(proxy).status_code == 200 and served(fake)[-1] == ("sub", 200)
    assert wait_until(lambda: account_status(home / "claudeflare.db").get("sub", {}).get("state") == "ok")


def test_a_family_weekly_limit_skips_that_family_only(fake, home, start_proxy):
    max_accounts(fake, home, "a", priority=0)
    max_accounts(fake, home, "b", priority=1)
    fake.set_family_limit("a", "opus", reset_in_s=3600)
    proxy = start_proxy(home)
    assert ask(proxy, model=OPUS).status_code == 200
    assert served(fake) == [("a", 429), ("b", 200)]
    assert ask(proxy, model=OPUS).status_code == 200 and served(fake)[-1] == ("b", 200)  # a is skipped for opus
    assert ask(proxy, model=SONNET).status_code == 200 and served(fake)[-1] == ("a", 200)  # and serves sonnet
    # Both out of their opus week: a 429 that says when the first is back; sonnet still serves.
    fake.set_family_limit("b", "opus", reset_in_s=1800)
    refused = ask(proxy, model=OPUS)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert 1700 <= int(refused.headers["retry-after"]) <= 1800
    assert ask(proxy, model=OPUS).status_code == 429 and served(fake)[-1] == ("b", 429)  # answered by the proxy itself
    assert ask(proxy, model=SONNET).status_code == 200
