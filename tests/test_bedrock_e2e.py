"""Bedrock accounts through a real mitmdump, against tests/fake_bedrock.py (which checks each SigV4
signature with botocore): the SDK and raw HTTP, streamed and not, the event stream turned into
Anthropic SSE, a ThrottlingException as a limit, and a conversation moving from a limited
subscription to Bedrock."""

import json
import os
import time

import anthropic
import httpx
from click.testing import CliRunner

from claudeflare.cli import cli
from claudeflare.config import ensure_home

from fake_bedrock import FakeBedrock
from harness import CLAUDE_CODE_SYSTEM, add_account, db_rows, raw_stream, sse_events


def add_bedrock(home, bedrock, priority=0):
    ensure_home(home)
    with open(home / "accounts.toml", "a") as f:
        f.write(
            f'\n[[accounts]]\nname = "aws"\nprovider = "bedrock"\nbase_url = "{bedrock.url}"\npriority = {priority}\n'
        )


def test_bedrock_serves_the_sdk_and_raw_streams_signed_with_sigv4(fake, home, start_proxy):
    with FakeBedrock() as bedrock:
        add_bedrock(home, bedrock)
        proxy = start_proxy(home, "--set", "flow_detail=3", env=bedrock.env)  # the log prints each flow's headers
        client = anthropic.Anthropic(base_url=proxy.url, api_key="client-key-ignored", max_retries=0)
        reply = client.messages.create(
            model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.content[0].text == "hello from bedrock" and reply.usage.output_tokens == 9
        with client.messages.stream(
            model="claude-haiku-4-5-20251001", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        ) as s:
            assert s.get_final_text() == "hello from bedrock"
        r = raw_stream(proxy.url, "claude-sonnet-4-5")
        assert r.headers["content-type"] == "text/event-stream"
        assert sse_events(r.text) == [
            "event: message_start",
            "event: content_block_start",
            "event: content_block_delta",
            "event: content_block_delta",
            "event: content_block_stop",
            "event: message_delta",
            "event: message_stop",
        ]
        assert "invocationMetrics" not in r.text

        assert [(c["status"], c["model"], c["method"]) for c in bedrock.requests] == [
            (200, "anthropic.claude-sonnet-4-5-20250929-v1:0", "invoke"),
            (200, "anthropic.claude-haiku-4-5-20251001-v1:0", "invoke-with-response-stream"),
            (200, "anthropic.claude-sonnet-4-5-20250929-v1:0", "invoke-with-response-stream"),
        ]
        sent = json.loads(bedrock.requests[1]["body"])
        assert sent["anthropic_version"] == "bedrock-2023-05-31" and "model" not in sent and "stream" not in sent

        wrong = httpx.post(
            f"{proxy.url}/v1/messages",
            timeout=30,
            json={
                "model": "claude-sonnet-4-5-20990101",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert wrong.status_code == 400
        assert wrong.json()["error"] == {
            "type": "invalid_request_error",
            "message": "Amazon Bedrock: The provided model identifier is invalid.",
        }

        rows = db_rows(home, expect=4)
        assert [(r["provider"], r["status"], r["stream"], r["output_tokens"]) for r in rows] == [
            ("bedrock", 200, 0, 9),
            ("bedrock", 200, 1, 9),
            ("bedrock", 200, 1, 9),
            ("bedrock", 400, 0, 0),
        ]
        assert {r["path"] for r in rows} == {"/v1/messages"}  # the client's path, not Bedrock's
        proxy.stop()
        for where in (home / "claudeflare.db", proxy.log):
            text = where.read_bytes().decode("latin-1")
            assert (
                bedrock.secret_key not in text and bedrock.access_key not in text and bedrock.session_token not in text
            )
        assert (
            "x-amz-security-token: [claudeflare: aws]" in proxy.output()
        )  # the flow holds a placeholder; the wire the token
        assert all(c["headers"]["x-amz-security-token"] == bedrock.session_token for c in bedrock.requests)


def test_a_conversation_moves_from_a_limited_subscription_to_bedrock_then_bedrock_throttles(fake, home, start_proxy):
    access, refresh = "sk-ant-oat01-sub-access", "sk-ant-ort01-sub-refresh"
    fake.add_oauth(account="sub", access_token=access, refresh_token=refresh, expires_in=7200)
    add_account(home, "sub", "max", 5, access_token=access, refresh_token=refresh, expires_at=time.time() + 7200)
    fake.set_limit("sub", requests=1, window_s=3600)
    with FakeBedrock() as bedrock:
        add_bedrock(home, bedrock, priority=1)  # takes traffic only while no subscription can
        bedrock.limit = 1
        proxy = start_proxy(home, env=bedrock.env)
        body = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 20,
            "system": CLAUDE_CODE_SYSTEM,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
        session = {"x-claude-code-session-id": "one-conversation"}
        first = httpx.post(f"{proxy.url}/v1/messages", json=body, headers=session, timeout=30)
        assert first.status_code == 200 and "hello from bedrock" not in first.text
        second = httpx.post(f"{proxy.url}/v1/messages", json=body, headers=session, timeout=30)
        # a retry's reply arrives whole (README): its event stream is translated in one piece
        assert second.status_code == 200 and second.headers["content-type"] == "text/event-stream"
        assert '"text":"from bedrock"' in second.text and "event: message_stop" in second.text
        third = httpx.post(f"{proxy.url}/v1/messages", json=body, headers=session, timeout=30)
        assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
        fourth = httpx.post(f"{proxy.url}/v1/messages", json=body, headers=session, timeout=30)
        assert fourth.status_code == 429

        # The subscription's one request of the window is spent: the second turn meets its 429 and fails
        # over, or — when the first reply already said the window is used up — moves before asking it.
        calls = [(s["account"], s["status"]) for s in fake.requests if s["path"] == "/v1/messages"]
        assert calls in ([("sub", 200), ("sub", 429)], [("sub", 200)])
        assert [c["status"] for c in bedrock.requests] == [200, 429]  # throttled once, then benched: not asked again
        rows = db_rows(home, expect=4)
        assert [(r["account"], r["provider"]) for r in rows[:2]] == [("sub", "anthropic"), ("aws", "bedrock")]
        # The move is logged: as the second turn's failover, or as a move before asking the subscription
        # (whose 429 then comes when the throttled Bedrock sends a later turn back to it).
        failed_over = rows[1]["failovers"] and json.loads(rows[1]["failovers"])[0]["account"] == "sub"
        assert failed_over or "conversation one-conversation moved from sub to aws" in proxy.output()
        assert rows[1]["output_tokens"] == 9


def test_a_bedrock_account_without_credentials_says_why_once(fake, home, start_proxy):
    from claudeflare.flowlog import account_status

    from harness import wait_until

    with FakeBedrock() as bedrock:
        add_bedrock(home, bedrock)
        env = {k: v for k, v in bedrock.env.items() if not k.startswith(("AWS_ACCESS", "AWS_SECRET", "AWS_SESSION"))}
        proxy = start_proxy(
            home, env={**env, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": ""}
        )
        for _ in range(2):
            refused = httpx.post(
                f"{proxy.url}/v1/messages",
                timeout=30,
                json={"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
            )
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "api_error"
        assert bedrock.requests == []
        assert wait_until(
            lambda: account_status(home / "claudeflare.db").get("aws", {}).get("reason") == "no AWS credentials found"
        )
        assert (
            proxy.output().count("bedrock account aws: no AWS credentials found") == 1
        )  # logged once, not per request


def test_a_bedrock_account_with_a_stored_key_pair_signs_with_it_and_never_shows_it(fake, home, start_proxy, tmp_path):
    def claudeflare(*args, input=None):
        result = CliRunner().invoke(cli, ["--home", str(home), *args], input=input)
        assert result.exit_code == 0, result.output
        return result.output

    with FakeBedrock(session=False) as bedrock:  # a long-term key pair: no session token
        claudeflare(
            *("add", "aws", "--provider", "bedrock", "--region", bedrock.region, "--base-url", bedrock.url),
            "--aws-key-pair",
            input=f"{bedrock.access_key}\n{bedrock.secret_key}\n",
        )
        empty = tmp_path / "empty-aws-file"
        empty.write_text("")
        no_chain = {k: "" for k in os.environ if k.startswith("AWS_")} | {  # nothing but the stored pair
            "AWS_CONFIG_FILE": str(empty),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        proxy = start_proxy(home, "--set", "flow_detail=3", env=no_chain)
        reply = httpx.post(
            f"{proxy.url}/v1/messages",
            timeout=30,
            json={"model": "claude-sonnet-4-5", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["content"][0]["text"] == "hello from bedrock"
        assert [(c["status"], c["method"]) for c in bedrock.requests] == [(200, "invoke")]  # the fake checked SigV4
        assert f"Credential={bedrock.access_key}/" in bedrock.requests[0]["headers"]["authorization"]
        assert [(r["account"], r["status"]) for r in db_rows(home, expect=1)] == [("aws", 200)]
        listed = claudeflare("list", "--json")
        proxy.stop()
        assert json.loads(listed)[0]["name"] == "aws"
        for text in (listed, (home / "claudeflare.db").read_bytes().decode("latin-1"), proxy.output()):
            assert bedrock.secret_key not in text and bedrock.access_key not in text
