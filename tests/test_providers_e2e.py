"""Accounts of other providers through a real mitmdump: an Anthropic-compatible endpoint (a second
fake with its own key), with model mapping, streamed and not, failover into it, and the 404 for a
model no usable account serves."""

import json
import time

import anthropic
import httpx

from claudeflare.config import ensure_home
from claudeflare.credentials import Credential, CredentialStore
from claudeflare.flowlog import account_status

from fake_anthropic import FakeAnthropic
from harness import CLAUDE_CODE_SYSTEM, add_account, db_rows, raw_stream, sse_events, wait_until

GLM_KEY = "glm-secret-key-0123456789"


def add_compatible(home, url, name="glm", priority=0, auth="x-api-key"):
    """As the README shows it: the table in accounts.toml, the key in the credential store."""
    ensure_home(home)
    CredentialStore(home).set_account(name, Credential(api_key=GLM_KEY))
    with open(home / "accounts.toml", "a") as f:
        f.write(
            f'\n[[accounts]]\nname = "{name}"\nprovider = "anthropic-compatible"\nbase_url = "{url}"\n'
            f'auth = "{auth}"\npriority = {priority}\nmodels = {{ "claude-sonnet-*" = "glm-4.6", "claude-haiku-*" = "glm-4.5-air" }}\n'
        )


def messages(fake):
    return [r for r in fake.requests if r["path"] == "/v1/messages"]


def test_a_compatible_account_serves_mapped_models_with_its_own_key(fake, home, start_proxy):
    with FakeAnthropic() as other:
        other.add_api_key(GLM_KEY, account="glm")
        add_compatible(home, other.url)
        proxy = start_proxy(home)
        client = anthropic.Anthropic(base_url=proxy.url, api_key="client-key-ignored", max_retries=0)

        reply = client.messages.create(
            model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.model == "glm-4.6" and reply.usage.output_tokens > 0
        r = raw_stream(proxy.url, "claude-haiku-4-5")
        events = sse_events(r.text)
        assert r.status_code == 200 and events[0] == "event: message_start" and events[-1] == "event: message_stop"

        seen = messages(other)
        assert [(json.loads(s["body"])["model"], s["account"], s["auth_kind"]) for s in seen] == [
            ("glm-4.6", "glm", "api_key"),
            ("glm-4.5-air", "glm", "api_key"),
        ]
        assert messages(fake) == []  # nothing went to Anthropic

        refused = httpx.post(
            f"{proxy.url}/v1/messages",
            timeout=30,
            json={"model": "gpt-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        )
        error = refused.json()["error"]
        assert refused.status_code == 404 and error["type"] == "not_found_error" and "'gpt-5'" in error["message"]
        assert len(messages(other)) == 2

        rows = db_rows(home, expect=3)
        assert [(r["provider"], r["model"], r["status"]) for r in rows] == [
            ("anthropic-compatible", "glm-4.6", 200),
            ("anthropic-compatible", "glm-4.5-air", 200),
            (None, "gpt-5", 404),
        ]
        assert rows[1]["stream"] == 1 and rows[1]["output_tokens"] > 0  # usage read from the stream as it passed
        assert wait_until(
            lambda: account_status(home / "claudeflare.db").get("glm", {}).get("provider") == "anthropic-compatible"
        )
        assert GLM_KEY not in (home / "claudeflare.db").read_bytes().decode("latin-1")


def test_a_conversation_moves_from_a_limited_subscription_to_a_compatible_account(fake, home, start_proxy):
    access, refresh = "sk-ant-oat01-sub-access", "sk-ant-ort01-sub-refresh"
    fake.add_oauth(account="sub", access_token=access, refresh_token=refresh, expires_in=7200)
    add_account(home, "sub", "max", 5, access_token=access, refresh_token=refresh, expires_at=time.time() + 7200)
    fake.set_limit("sub", requests=1, window_s=3600)
    with FakeAnthropic() as other:
        other.add_api_key(GLM_KEY, account="glm")
        add_compatible(home, other.url, priority=1, auth="x-api-key")
        proxy = start_proxy(home, "--set", "claudeflare_retry_delay_ms=50")
        body = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 20,
            "system": CLAUDE_CODE_SYSTEM,
            "messages": [{"role": "user", "content": "hi"}],
        }
        session = {"x-claude-code-session-id": "one-conversation"}
        first = httpx.post(f"{proxy.url}/v1/messages", json=body, headers=session, timeout=30)
        assert first.status_code == 200 and first.json()["model"] == "claude-sonnet-4-5"
        second = httpx.post(f"{proxy.url}/v1/messages", json={**body, "stream": True}, headers=session, timeout=30)
        assert second.status_code == 200 and "glm-4.6" in second.text and "message_stop" in second.text

        # The subscription's one request of the window is spent: the second turn meets its 429 and fails
        # over, or — when the first reply already said the window is used up — moves before asking it.
        calls = [(s["account"], s["status"]) for s in messages(fake)]
        assert calls in ([("sub", 200), ("sub", 429)], [("sub", 200)])
        (moved,) = messages(other)
        assert json.loads(moved["body"])["model"] == "glm-4.6" and moved["headers"]["x-api-key"] == GLM_KEY
        assert "authorization" not in moved["headers"] and "oauth" not in moved["headers"].get("anthropic-beta", "")

        rows = db_rows(home, expect=2)
        assert [(r["account"], r["provider"], r["account_kind"]) for r in rows] == [
            ("sub", "anthropic", "subscription"),
            ("glm", "anthropic-compatible", "api-key"),
        ]
        if len(calls) == 2:
            assert json.loads(rows[1]["failovers"])[0]["account"] == "sub"
        else:
            assert "conversation one-conversation moved from sub to glm" in proxy.output()
