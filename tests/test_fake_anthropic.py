"""The fake Anthropic upstream itself: it must follow the contract, or every end-to-end test lies."""

import asyncio
import gzip
import json
import subprocess
import sys
import time
import zlib
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest
import requests

from fake_anthropic import CLAUDE_CODE_ONLY, CLIENT_ID, OAUTH_BETA, FakeAnthropic, expected_text, pkce_challenge
from harness import CLAUDE_CODE_SYSTEM

KEY = "sk-ant-api03-test-key"
BODY = {"model": "claude-sonnet-4-5-20250929", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
CC_BODY = {**BODY, "system": CLAUDE_CODE_SYSTEM}  # subscriptions serve only Claude Code


@pytest.fixture(scope="module")
def server():
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def fake(server):
    server.reset()
    server.add_api_key(KEY, account="key")
    server.add_oauth(account="max", access_token="at-1", refresh_token="rt-1", expires_in=3600)
    return server


def post(fake, body=None, path="/v1/messages", headers=None, auth="key", **kw):
    body = body or (CC_BODY if auth == "oauth" else BODY)
    auth_headers = {
        "key": {"x-api-key": KEY},
        "oauth": {"authorization": "Bearer at-1", "anthropic-beta": f"claude-code-20250219,{OAUTH_BETA}"},
        None: {},
    }[auth]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    kw.setdefault("timeout", 10)
    return requests.post(
        fake.url + path,
        data=data,
        **kw,
        headers={
            "content-type": "application/json",
            "anthropic-version": "2023-06-01",
            **auth_headers,
            **(headers or {}),
        },
    )


def parse_sse(raw: bytes) -> list[tuple[str, dict]]:
    events = []
    for frame in raw.decode().split("\n\n"):
        if not frame.strip():
            continue
        lines = dict(line.split(": ", 1) for line in frame.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_streamed_reply_has_the_contract_events_and_usage(fake):
    body = json.dumps({**BODY, "stream": True}).encode()
    reply = post(
        fake,
        body,
        headers={
            "x-fake-tokens": "12",
            "x-fake-cache-read": "300",
            "x-fake-cache-write": "40",
            "x-fake-cache-write-1h": "7",
        },
        params={"beta": "true"},
    )
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["request-id"].startswith("req_")
    events = parse_sse(reply.content)
    names = [e for e, _ in events]
    assert names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 12 + [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["usage"] == {
        "input_tokens": len(body) // 4,
        "cache_creation_input_tokens": 47,
        "cache_read_input_tokens": 300,
        "output_tokens": 1,
        "service_tier": "standard",
        "cache_creation": {"ephemeral_5m_input_tokens": 40, "ephemeral_1h_input_tokens": 7},
    }
    text = "".join(d["delta"]["text"] for e, d in events if e == "content_block_delta")
    assert text == expected_text(12) and "é" in text and "✓" in text
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] == 12
    assert delta["usage"]["input_tokens"] == len(body) // 4 and delta["usage"]["cache_read_input_tokens"] == 300
    (seen,) = fake.wait_for_requests(1, finished=True)
    assert (seen["account"], seen["auth_kind"], seen["query"], seen["body"], seen["status"]) == (
        "key",
        "api_key",
        "beta=true",
        body,
        200,
    )
    assert seen["usage"]["output_tokens"] == 12 and seen["usage"]["input_tokens"] == len(body) // 4
    assert seen["headers"]["x-api-key"] == KEY and seen["request_id"] == reply.headers["request-id"]
    assert "anthropic-ratelimit-requests-remaining" in reply.headers  # Console family for an API key


def test_non_streamed_reply_and_invalid_json(fake):
    reply = post(fake, headers={"x-fake-tokens": "3", "x-fake-input-tokens": "1234"})
    message = reply.json()
    assert (message["type"], message["role"], message["model"], message["stop_reason"]) == (
        "message",
        "assistant",
        BODY["model"],
        "end_turn",
    )
    assert message["content"] == [{"type": "text", "text": expected_text(3)}]
    assert message["usage"]["input_tokens"] == 1234 and message["usage"]["output_tokens"] == 3
    bad = post(fake, b'{"model": "x", "messages": [')
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert bad.json()["type"] == "error" and bad.json()["request_id"] == bad.headers["request-id"]


def test_gzip_and_split_streams_decode_incrementally(fake):
    body = {**BODY, "stream": True}
    with post(fake, body, headers={"x-fake-gzip": "1", "x-fake-tokens": "20"}, stream=True) as reply:
        assert reply.headers["content-encoding"] == "gzip"
        decoder, pieces = zlib.decompressobj(wbits=31), []
        for chunk in reply.raw.stream(1 << 16, decode_content=False):
            pieces.append(decoder.decompress(chunk))
    assert pieces[0].startswith(b"event: message_start") and pieces[0].endswith(b"\n\n")  # flushed per event
    assert len([p for p in pieces if p]) > 10
    whole = parse_sse(b"".join(pieces))
    assert whole[-1][0] == "message_stop" and whole[-2][1]["usage"]["output_tokens"] == 20
    split = post(fake, body, headers={"x-fake-split": "1", "x-fake-tokens": "9"})
    assert "".join(
        d["delta"]["text"] for e, d in parse_sse(split.content) if e == "content_block_delta"
    ) == expected_text(9)


def test_credentials_oauth_beta_rule_and_rate_limit_families(fake):
    ok = post(fake, auth="oauth")
    assert ok.status_code == 200
    assert ok.headers["anthropic-ratelimit-unified-status"] == "allowed"
    assert ok.headers["anthropic-ratelimit-unified-representative-claim"] == "five_hour"
    assert {
        "anthropic-ratelimit-unified-5h-utilization",
        "anthropic-ratelimit-unified-7d-reset",
        "anthropic-ratelimit-unified-overage-status",
    } <= set(k.lower() for k in ok.headers)
    assert fake.requests[-1]["account"] == "max" and fake.requests[-1]["auth_kind"] == "oauth"
    refusals = [
        post(fake, auth=None, headers={"authorization": "Bearer at-1"}),  # no oauth beta
        post(fake, auth="key", headers={"authorization": "Bearer at-1", "anthropic-beta": OAUTH_BETA}),  # both
        post(fake, auth=None),  # none
        post(fake, auth=None, headers={"x-api-key": "sk-ant-api03-unknown"}),
        post(fake, auth=None, headers={"authorization": f"Bearer {KEY}", "anthropic-beta": OAUTH_BETA}),
    ]
    assert [r.status_code for r in refusals] == [401] * 5
    assert all(r.json()["error"]["type"] == "authentication_error" and r.headers["request-id"] for r in refusals)
    assert refusals[0].json()["error"]["message"] == "OAuth authentication is currently not supported."
    assert [r["account"] for r in fake.requests[-5:]] == [None] * 5
    fake.add_oauth(account="old", access_token="at-expired", refresh_token="rt-x", expires_in=-1)
    expired = post(fake, auth=None, headers={"authorization": "Bearer at-expired", "anthropic-beta": OAUTH_BETA})
    assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]


def token(fake, **body):
    return requests.post(fake.url + "/v1/oauth/token", json={"client_id": CLIENT_ID, **body}, timeout=5)


def test_refresh_rotates_and_the_old_refresh_token_is_rejected(fake):
    first = token(fake, grant_type="refresh_token", refresh_token="rt-1")
    assert first.status_code == 200
    new = first.json()
    assert new["token_type"] == "Bearer" and new["refresh_token"] != "rt-1" and new["expires_in"] == 3600
    again = token(fake, grant_type="refresh_token", refresh_token="rt-1")
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert fake.token_calls("max") == 2  # the reuse is counted: a proxy that refreshes twice shows
    assert post(fake, auth="oauth").status_code == 200  # the old access token lives until its expiry
    assert (
        post(
            fake,
            CC_BODY,
            auth=None,
            headers={"authorization": f"Bearer {new['access_token']}", "anthropic-beta": OAUTH_BETA},
        ).status_code
        == 200
    )
    assert token(fake, grant_type="refresh_token", refresh_token=new["refresh_token"]).status_code == 200
    assert token(fake, grant_type="refresh_token", refresh_token="rt-1", client_id="other").status_code == 401
    fake.token_fault = "500"
    assert token(fake, grant_type="refresh_token", refresh_token=fake.tokens("max")["refresh_token"]).status_code == 500


def test_authorization_code_with_pkce_and_console_key(fake):
    verifier = "v" * 43
    fake.add_auth_code("code-1", account="new", state="st", code_challenge=pkce_challenge(verifier))
    fake.add_auth_code("code-2", account="new", state="st", code_challenge=pkce_challenge(verifier))
    assert (
        token(fake, grant_type="authorization_code", code="code-2", state="st", code_verifier="wrong").json()["error"]
        == "invalid_grant"
    )
    good = token(
        fake,
        grant_type="authorization_code",
        code="code-1",
        state="st",
        code_verifier=verifier,
        redirect_uri="https://platform.claude.com/oauth/code/callback",
    )
    assert good.status_code == 200 and good.json()["scope"] == "user:inference user:profile"
    reused = token(fake, grant_type="authorization_code", code="code-1", state="st", code_verifier=verifier)
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    bearer = {"authorization": f"Bearer {good.json()['access_token']}"}
    key = requests.post(fake.url + "/api/oauth/claude_cli/create_api_key", headers=bearer, timeout=5).json()["raw_key"]
    assert key.startswith("sk-ant-api03-")
    assert post(fake, auth=None, headers={"x-api-key": key}).status_code == 200
    assert fake.requests[-1]["account"] == "new"
    usage = requests.get(fake.url + "/api/oauth/usage", headers={**bearer, "anthropic-beta": OAUTH_BETA}, timeout=5)
    assert set(usage.json()) >= {"five_hour", "seven_day"} and "resets_at" in usage.json()["five_hour"]


def test_usage_endpoint_follows_the_contract_and_its_hourly_budget(fake):
    tokens = fake.add_oauth(account="m")
    fake.usage_budget = 3
    fake.set_usage(
        "m",
        {
            "seven_day_opus": {"utilization": 81.5, "resets_at": "2026-12-01T10:00:00+00:00"},
            "extra_usage": {"is_enabled": True, "utilization": 12.0},
        },
    )
    headers = {"authorization": f"Bearer {tokens['access_token']}", "anthropic-beta": OAUTH_BETA}
    replies = [requests.get(fake.url + "/api/oauth/usage", headers=headers, timeout=5) for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    body = replies[0].json()
    assert set(body) == {
        "five_hour",
        "seven_day",
        "seven_day_oauth_apps",
        "seven_day_opus",
        "seven_day_sonnet",
        "extra_usage",
    }
    assert body["five_hour"]["utilization"] == 10.0  # a percentage, unlike the headers' fraction
    assert datetime.fromisoformat(body["seven_day"]["resets_at"]).timestamp() > time.time()
    assert body["seven_day_opus"]["utilization"] == 81.5 and body["seven_day_sonnet"] is None
    assert body["extra_usage"] == {"is_enabled": True, "utilization": 12.0}
    assert 3500 < int(replies[3].headers["retry-after"]) <= 3600
    assert replies[3].json()["error"]["type"] == "rate_limit_error" and fake.usage_reads("m") == 3
    refused = requests.get(fake.url + "/api/oauth/usage", headers={"authorization": "Bearer nope"}, timeout=5)
    assert refused.status_code == 401


def test_token_endpoint_can_answer_like_the_old_host(fake):
    fake.add_oauth(account="m", refresh_token="rt-old-host")
    fake.token_fault = "404"
    reply = token(fake, grant_type="refresh_token", refresh_token="rt-old-host")
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"
    fake.token_fault = None
    assert token(fake, grant_type="refresh_token", refresh_token="rt-old-host").status_code == 200  # not spent


def test_limits_give_429_until_the_reset_then_serve_again(fake):
    fake.set_limit("max", requests=2, window_s=1.0)
    fake.set_limit("key", requests=1, window_s=1.0)
    assert [post(fake, auth="oauth").status_code for _ in range(2)] == [200, 200]
    limited = post(fake, auth="oauth")
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"
    assert limited.headers["anthropic-ratelimit-unified-status"] == "rejected"
    assert limited.headers["anthropic-ratelimit-unified-5h-status"] == "rejected"
    assert float(limited.headers["anthropic-ratelimit-unified-5h-utilization"]) == 1.0
    assert 0 <= int(limited.headers["anthropic-ratelimit-unified-reset"]) - time.time() <= 2
    assert post(fake, auth="key").status_code == 200
    key_limited = post(fake, auth="key")
    assert key_limited.status_code == 429 and key_limited.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert int(key_limited.headers["retry-after"]) >= 1
    time.sleep(1.1)
    assert post(fake, auth="oauth").status_code == 200 and post(fake, auth="key").status_code == 200
    fake.set_limit("max", requests=10, window_s=60, used=8)
    assert post(fake, auth="oauth").headers["anthropic-ratelimit-unified-status"] == "allowed_warning"


def test_faults_windowless_429_and_529(fake):
    fake.set_fault("key", "status:429-windowless", count=1)
    windowless = post(fake)
    assert windowless.status_code == 429 and windowless.json()["error"]["type"] == "rate_limit_error"
    assert windowless.headers["x-should-retry"] == "true" and windowless.headers["retry-after"]
    assert not [h for h in windowless.headers if h.lower().startswith("anthropic-ratelimit")]
    assert post(fake).status_code == 200  # count=1: the next one is served
    fake.set_fault("max", "status:529", count=2)
    overloaded = [post(fake, auth="oauth") for _ in range(3)]
    assert [r.status_code for r in overloaded] == [529, 529, 200]
    assert overloaded[0].json()["error"]["type"] == "overloaded_error"
    assert "anthropic-ratelimit-unified-status" in overloaded[0].headers  # signals on errors too
    spend = post(fake, headers={"x-fake-fault": "spend-limit"})
    assert spend.json()["error"]["details"]["error_code"] == "enforced_spend_limit_reached"
    credits = post(fake, auth="oauth", headers={"x-fake-fault": "out-of-credits"})
    assert credits.headers["anthropic-ratelimit-unified-overage-disabled-reason"] == "out_of_credits"


def test_stream_faults(fake):
    body = {**BODY, "stream": True}
    in_stream = post(fake, body, headers={"x-fake-fault": "in-stream-error"})
    events = parse_sse(in_stream.content)
    assert in_stream.status_code == 200 and events[-1] == (
        "error",
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _ = post(fake, body, headers={"x-fake-fault": "reset-mid-stream"}).content
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _ = post(fake, headers={"x-fake-fault": "bad-content-length"}).content
    assert b"this line is garbage" in post(fake, body, headers={"x-fake-fault": "malformed-sse"}).content
    with pytest.raises(requests.exceptions.ConnectionError):
        post(fake, body, headers={"x-fake-fault": "stall"}, stream=False, timeout=0.5)
    records = fake.wait_for_requests(5, finished=True)
    assert [r["outcome"] for r in records] == ["error_event", "reset", "short_body", "ok", "stalled"]


def test_count_tokens_models_head_and_not_found(fake):
    body = json.dumps({"model": BODY["model"], "messages": BODY["messages"]}).encode()
    counted = post(fake, body, path="/v1/messages/count_tokens")
    assert counted.json() == {"input_tokens": len(body) // 4}
    models = requests.get(fake.url + "/v1/models", headers={"x-api-key": KEY}, timeout=5).json()
    assert models["has_more"] is False and models["data"][0]["type"] == "model"
    head = requests.head(fake.url + "/", timeout=5)
    assert head.status_code == 200 and head.content == b""
    missing = post(fake, path="/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert [r["path"] for r in fake.requests] == ["/v1/messages/count_tokens", "/v1/models", "/", "/v1/nothing"]


def test_many_concurrent_slow_streams(fake):
    async def run():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one():
                async with session.post(
                    fake.url + "/v1/messages",
                    json={**BODY, "stream": True},
                    headers={"x-api-key": KEY, "x-fake-tokens": "10", "x-fake-delay-ms": "30"},
                ) as reply:
                    return (await reply.read()).count(b"event: content_block_delta")

            return await asyncio.gather(*(one() for _ in range(500)))

    start = time.monotonic()
    assert asyncio.run(run()) == [10] * 500
    assert time.monotonic() - start < 5
    stats = fake.stats()
    assert stats["by_status"] == {200: 500} and stats["max_in_flight"] > 100 and stats["output_tokens"] == 5000


@pytest.mark.e2e
def test_standalone_process_and_http_control(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"api_keys": {"sk-from-config": "cfg"}}))
    port_file = tmp_path / "port"
    script = Path(__file__).with_name("fake_anthropic.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--port-file", str(port_file), "--config", str(config)],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        assert (
            requests.post(
                url + "/v1/messages", json=BODY, headers={"x-api-key": "sk-from-config"}, timeout=5
            ).status_code
            == 200
        )
        assert requests.post(url + "/_fake/api_keys", json={"key": "sk-2", "account": "two"}, timeout=5).ok
        assert requests.post(
            url + "/_fake/limits", json={"account": "two", "requests": 1, "window_s": 60}, timeout=5
        ).ok
        statuses = [
            requests.post(url + "/v1/messages", json=BODY, headers={"x-api-key": "sk-2"}, timeout=5).status_code
            for _ in range(2)
        ]
        assert statuses == [200, 429]
        seen = requests.get(url + "/_fake/requests", params={"body": "1"}, timeout=5).json()
        assert [r["account"] for r in seen] == ["cfg", "two", "two"] and json.loads(
            __import__("base64").b64decode(seen[0]["body_b64"])
        ) == BODY
        assert requests.get(url + "/_fake/stats", timeout=5).json()["by_status"] == {"200": 2, "429": 1}
        assert requests.post(url + "/_fake/reset", timeout=5).ok
        assert requests.get(url + "/_fake/requests", timeout=5).json() == []
    finally:
        proc.terminate()
        proc.wait(5)


def test_gzip_module_agrees(fake):
    """The whole gzip stream is one valid gzip member (what a client that buffers will see)."""
    reply = post(fake, {**BODY, "stream": True}, headers={"x-fake-gzip": "1"}, stream=True)
    raw = reply.raw.read(decode_content=False)
    assert parse_sse(gzip.decompress(raw))[-1][0] == "message_stop"


def test_subscriptions_serve_only_claude_code_except_haiku(fake):
    plain = post(fake, BODY, auth="oauth")
    assert plain.status_code == 400
    assert plain.json()["error"] == {"type": "invalid_request_error", "message": CLAUDE_CODE_ONLY}
    # The identity alone, in the first block, is not where Claude Code puts it.
    assert post(fake, {**BODY, "system": CLAUDE_CODE_SYSTEM[1:]}, auth="oauth").status_code == 400
    assert post(fake, {**BODY, "model": "claude-haiku-4-5"}, auth="oauth").status_code == 200
    assert post(fake, CC_BODY, auth="oauth").status_code == 200
    assert post(fake, BODY, auth="key").status_code == 200  # API keys serve anything


@pytest.mark.parametrize(
    "how, status, kind", [("organization", 400, "invalid_request_error"), ("oauth", 403, "permission_error")]
)
def test_disabled_accounts_are_refused(fake, how, status, kind):
    fake.disable("max", how)
    reply = post(fake, auth="oauth")
    assert reply.status_code == status and reply.json()["error"]["type"] == kind
    assert "organization" in reply.json()["error"]["message"]
    assert post(fake, auth="key").status_code == 200


def test_long_context_is_refused_with_windows_allowed(fake):
    reply = post(fake, auth="oauth", headers={"x-fake-input-tokens": "250000"})
    assert reply.status_code == 429
    assert reply.json()["error"]["message"].startswith("Extra usage is required for long context")
    assert reply.headers["anthropic-ratelimit-unified-status"] == "allowed"
    assert reply.headers["anthropic-ratelimit-unified-5h-status"] == "allowed"
    assert reply.headers["anthropic-ratelimit-unified-overage-disabled-reason"] == "out_of_credits"
    assert post(fake, auth="oauth").status_code == 200  # shorter requests still serve
    assert post(fake, auth="key", headers={"x-fake-input-tokens": "250000"}).status_code == 200


def test_family_weekly_limit_refuses_that_family_only(fake):
    fake.set_family_limit("max", "opus", reset_in_s=3600)
    opus = post(fake, {**CC_BODY, "model": "claude-opus-4-8"}, auth="oauth")
    assert opus.status_code == 429
    assert opus.headers["anthropic-ratelimit-unified-representative-claim"] == "seven_day_opus"
    assert opus.headers["anthropic-ratelimit-unified-7d_oi-status"] == "rejected"
    assert opus.headers["anthropic-ratelimit-unified-5h-status"] == "allowed"
    assert post(fake, auth="oauth").status_code == 200  # sonnet
