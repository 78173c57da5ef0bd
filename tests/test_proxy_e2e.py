"""End to end: a real mitmdump with the addon, the fake Anthropic upstream, the official SDK and raw HTTP."""

import json
import time
from collections import Counter

import anthropic
import pytest
import requests
from click.testing import CliRunner

from claudeflare.cli import cli
from claudeflare.pricing import cost_usd
from claudeflare.usage import Usage

from harness import CLAUDE_CODE_SYSTEM, add_account, api_key_accounts, db_rows, key_for, wait_until

MODEL = "claude-sonnet-4-6"


def sdk(proxy, **kw):
    return anthropic.Anthropic(base_url=proxy.url, api_key="client-side-key-ignored", max_retries=0, **kw)


def ask(proxy, session=None, tokens=10, stream=False, extra_headers=None, text="Hello", system=None):
    headers = {
        "x-api-key": "client",
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
        "x-fake-tokens": str(tokens),
        **(extra_headers or {}),
    }
    if session:
        headers["X-Claude-Code-Session-Id"] = session
    body = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": text}], "stream": stream}
    if system:
        body["system"] = system
    return requests.post(f"{proxy.url}/v1/messages?beta=true", headers=headers, data=json.dumps(body), timeout=30)


def served_by(fake, path="/v1/messages"):
    return [r["account"] for r in fake.requests if r["path"] == path]


def test_sdk_non_streaming_and_row_matches_usage(fake, home, start_proxy):
    api_key_accounts(fake, home, ("work", 1))
    proxy = start_proxy(home)
    message = sdk(proxy).messages.create(
        model=MODEL,
        max_tokens=50,
        messages=[{"role": "user", "content": "Hi"}],
        extra_headers={"x-fake-tokens": "7", "x-fake-cache-read": "300", "x-fake-cache-write": "40"},
    )
    assert message.usage.output_tokens == 7 and message.usage.cache_read_input_tokens == 300
    (seen,) = fake.requests
    assert seen["account"] == "work" and seen["headers"]["x-api-key"] == key_for("work")
    assert "authorization" not in seen["headers"]
    (row,) = db_rows(home, expect=1)
    sent = seen["usage"]
    assert (row["account"], row["status"], row["stream"], row["model"], row["method"], row["path"]) == (
        "work",
        200,
        0,
        MODEL,
        "POST",
        "/v1/messages",
    )
    assert (
        row["input_tokens"],
        row["output_tokens"],
        row["cache_read_input_tokens"],
        row["cache_creation_input_tokens"],
    ) == (
        sent["input_tokens"],
        sent["output_tokens"],
        sent["cache_read_input_tokens"],
        sent["cache_creation_input_tokens"],
    )
    expected = cost_usd(
        Usage(
            model=MODEL,
            input_tokens=sent["input_tokens"],
            output_tokens=7,
            cache_read_input_tokens=300,
            cache_creation_input_tokens=40,
        )
    )
    assert row["cost_usd"] == pytest.approx(expected) and row["priced"] == 1 and row["attempts"] == 1
    assert row["ttfb_ms"] > 0 and row["duration_ms"] >= row["ttfb_ms"]
    assert row["request_id"] == seen.get("request_id", row["request_id"]) and row["request_id"].startswith("req_")


def test_sdk_streaming_reaches_the_client_whole_and_is_logged(fake, home, start_proxy):
    api_key_accounts(fake, home, ("work", 1))
    proxy = start_proxy(home)
    with sdk(proxy).messages.stream(
        model=MODEL,
        max_tokens=500,
        messages=[{"role": "user", "content": "Hi"}],
        extra_headers={"x-fake-tokens": "40", "x-fake-cache-write": "12"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens == 40 and len(text) > 0
    (row,) = db_rows(home, expect=1)
    sent = fake.requests[0]["usage"]
    assert (
        row["stream"],
        row["status"],
        row["output_tokens"],
        row["input_tokens"],
        row["cache_creation_input_tokens"],
    ) == (1, 200, 40, sent["input_tokens"], 12)
    assert row["stop_reason"] == "end_turn"


def test_oauth_account_gets_bearer_and_beta_merged(fake, home, start_proxy):
    fake.add_oauth(
        account="max", access_token="sk-ant-oat01-e2e-access", refresh_token="sk-ant-ort01-e2e-refresh", expires_in=3600
    )
    add_account(
        home,
        "max",
        "max",
        20,
        access_token="sk-ant-oat01-e2e-access",
        refresh_token="sk-ant-ort01-e2e-refresh",
        expires_at=time.time() + 3600,
    )
    proxy = start_proxy(home)
    reply = ask(
        proxy,
        extra_headers={
            "anthropic-beta": "claude-code-20250219,fine-grained-tool-streaming-2025-05-14",
            "authorization": "Bearer client-own-token",
        },
        system=CLAUDE_CODE_SYSTEM,
    )
    assert reply.status_code == 200, reply.text
    (seen,) = [r for r in fake.requests if r["path"] == "/v1/messages"]  # the proxy reads /api/oauth/usage too
    assert seen["headers"]["authorization"] == "Bearer sk-ant-oat01-e2e-access" and "x-api-key" not in seen["headers"]
    assert (
        seen["headers"]["anthropic-beta"]
        == "claude-code-20250219,fine-grained-tool-streaming-2025-05-14,oauth-2025-04-20"
    )


def test_raw_http_keeps_query_body_and_headers(fake, home, start_proxy):
    api_key_accounts(fake, home, ("work", 1))
    proxy = start_proxy(home)
    body = b'{"model": "claude-haiku-4-5",  "max_tokens": 5,\n "messages": [{"role": "user", "content": "caf\\u00e9"}]}'
    reply = requests.post(
        f"{proxy.url}/v1/messages?beta=true",
        data=body,
        timeout=10,
        headers={
            "content-type": "application/json",
            "anthropic-version": "2023-06-01",
            "x-app": "cli",
            "x-stainless-retry-count": "0",
        },
    )
    assert reply.status_code == 200
    (seen,) = fake.requests
    assert seen["query"] in ("beta=true", {"beta": "true"}) and seen["body"] == body
    assert seen["headers"]["x-app"] == "cli" and seen["headers"]["anthropic-version"] == "2023-06-01"
    assert seen["headers"]["x-stainless-retry-count"] == "0"


def test_count_tokens_and_models_are_forwarded(fake, home, start_proxy):
    api_key_accounts(fake, home, ("work", 1))
    proxy = start_proxy(home)
    client = sdk(proxy)
    assert client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "Hi"}]).input_tokens > 0
    assert requests.get(f"{proxy.url}/v1/models", timeout=10).json()["data"]
    assert [r["path"] for r in fake.requests] == ["/v1/messages/count_tokens", "/v1/models"]
    assert len(db_rows(home, expect=2)) == 2


def test_claude_code_warm_up_is_answered_by_the_proxy(fake, home, start_proxy):
    proxy = start_proxy(home)
    reply = requests.head(proxy.url + "/", timeout=5)
    assert reply.status_code == 200
    assert fake.requests == []
    assert ask(proxy).status_code == 503  # a request that is logged, after the warm-up
    (row,) = db_rows(home, expect=1)
    assert (row["method"], row["path"], row["status"]) == ("POST", "/v1/messages", 503)  # the warm-up is no request


def test_no_usable_account_is_a_503_that_says_what_to_do(fake, home, start_proxy):
    proxy = start_proxy(home)
    reply = ask(proxy)
    assert reply.status_code == 503
    error = reply.json()
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "claudeflare add" in error["error"]["message"]
    with pytest.raises(anthropic.APIStatusError) as e:
        sdk(proxy).messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert "claudeflare add" in str(e.value)
    assert fake.requests == []


def test_streaming_is_passed_through_as_it_arrives(fake, home, start_proxy):
    api_key_accounts(fake, home, ("work", 1))
    proxy = start_proxy(home)

    def first_byte_and_total(tokens):
        start = time.monotonic()
        with ask_stream(proxy, tokens, delay_ms=5) as reply:
            chunks = reply.iter_content(chunk_size=None)
            next(chunks)
            first = time.monotonic() - start
            for _ in chunks:
                pass
        return first, time.monotonic() - start

    short_first, _ = first_byte_and_total(5)
    long_first, long_total = first_byte_and_total(300)  # ≥ 1.5 s of deltas
    assert long_total > 1.4
    assert long_first < 0.3 * long_total  # the first event did not wait for the last
    assert long_first < short_first + 0.25


def ask_stream(proxy, tokens, delay_ms=0):
    body = {"model": MODEL, "max_tokens": 1000, "stream": True, "messages": [{"role": "user", "content": "stream"}]}
    return requests.post(
        f"{proxy.url}/v1/messages",
        json=body,
        stream=True,
        timeout=30,
        headers={"x-fake-tokens": str(tokens), "x-fake-delay-ms": str(delay_ms)},
    )


def test_gzip_stream_usage_is_read(fake, home, start_proxy):
    api_key_accounts(fake, home, ("work", 1))
    proxy = start_proxy(home)
    reply = ask(proxy, stream=True, tokens=25, extra_headers={"x-fake-gzip": "1", "accept-encoding": "gzip"})
    assert reply.status_code == 200 and "message_stop" in reply.text
    (row,) = db_rows(home, expect=1)
    assert row["output_tokens"] == 25


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("round-robin", {"a": 10, "b": 10, "c": 10}),
        ("weighted", {"a": 2, "b": 10, "c": 40}),  # tiers 1 : 5 : 20
    ],
)
def test_strategy_distribution(fake, home, start_proxy, strategy, expected):
    api_key_accounts(fake, home, ("a", 1), ("b", 5), ("c", 20))
    proxy = start_proxy(home, "--set", f"claudeflare_strategy={strategy}")
    for i in range(sum(expected.values())):
        assert ask(proxy, session=f"s{i}").status_code == 200
    assert Counter(served_by(fake)) == expected
    rows = db_rows(home, expect=sum(expected.values()))
    assert Counter(r["account"] for r in rows) == expected and {r["strategy"] for r in rows} == {strategy}


def test_least_requests_sends_to_the_idle_account(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    proxy = start_proxy(home, "--set", "claudeflare_strategy=least-requests")
    with ask_stream(proxy, 40, delay_ms=50) as slow:  # holds one account for ~2 s
        chunks = slow.iter_content(chunk_size=None)  # keep it: a dropped iterator closes the stream
        next(chunks)
        busy = fake.requests[0]["account"]
        for _ in range(4):
            assert ask(proxy).status_code == 200
        assert served_by(fake)[1:] == [{"a": "b", "b": "a"}[busy]] * 4


def test_session_affinity_and_spread(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 5), ("b", 5), ("c", 5))
    proxy = start_proxy(home)
    for turn in range(8):
        for conv in ("conv-1", "conv-2", "conv-3"):
            assert ask(proxy, session=conv, text=f"turn {turn}").status_code == 200
    by_conv = {}
    for r in fake.requests:
        by_conv.setdefault(r["headers"]["x-claude-code-session-id"], set()).add(r["account"])
    assert all(len(accounts) == 1 for accounts in by_conv.values())  # each conversation stayed put
    assert len(set().union(*by_conv.values())) == 3  # and new conversations went where there was room
    rows = db_rows(home, expect=24)
    assert {r["session"] for r in rows} == {"conv-1", "conv-2", "conv-3"}


def test_session_key_from_metadata_and_from_prompt_hash(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1), ("b", 1), ("c", 1), ("d", 1))
    proxy = start_proxy(home)
    user_id = json.dumps(
        {"device_id": "d" * 64, "account_uuid": "", "session_id": "5f0c7e1e-1111-4222-8333-444455556666"}
    )
    for turn in range(4):
        body = {
            "model": MODEL,
            "max_tokens": 10,
            "metadata": {"user_id": user_id},
            "messages": [{"role": "user", "content": f"turn {turn}"}],
        }
        assert requests.post(f"{proxy.url}/v1/messages", json=body, timeout=10).status_code == 200
    for turn in range(4):
        messages = [{"role": "user", "content": "same opening"}]
        for i in range(turn):
            messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": f"more {i}"}]
        body = {"model": MODEL, "max_tokens": 10, "system": "You are terse.", "messages": messages}
        assert requests.post(f"{proxy.url}/v1/messages", json=body, timeout=10).status_code == 200
    accounts = served_by(fake)
    assert len(set(accounts[:4])) == 1 and len(set(accounts[4:])) == 1
    rows = db_rows(home, expect=8)
    assert rows[0]["session"] == "5f0c7e1e-1111-4222-8333-444455556666" and rows[-1]["session"].startswith("h:")


def test_accounts_reload_while_running(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home)
    assert ask(proxy).status_code == 200
    api_key_accounts(fake, home, ("b", 1))
    runner = CliRunner()
    assert runner.invoke(cli, ["--home", str(home), "pause", "a"]).exit_code == 0
    start = time.monotonic()
    assert wait_until(lambda: ask(proxy).status_code == 200 and served_by(fake)[-1] == "b", timeout=2.0)
    assert time.monotonic() - start < 2.0

    # A broken file is reported with its line; the proxy keeps the last good accounts.
    (home / "accounts.toml").write_text(
        (home / "accounts.toml").read_text() + "\n[[accounts]]\nname = 'x'\nmode = 'nope'\n"
    )
    assert wait_until(
        lambda: "line" in proxy.output() and "keeping the last good accounts" in proxy.output(), timeout=3
    )
    assert ask(proxy).status_code == 200 and served_by(fake)[-1] == "b"


def test_strategy_switch_while_running(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    proxy = start_proxy(home)
    for _ in range(4):
        ask(proxy, session="one-conversation")
    assert len(set(served_by(fake))) == 1
    assert CliRunner().invoke(cli, ["--home", str(home), "strategy", "round-robin"]).exit_code == 0
    time.sleep(1.2)
    fake.reset_requests()
    for _ in range(4):
        ask(proxy, session="one-conversation")
    assert Counter(served_by(fake)) == {"a": 2, "b": 2}


def test_client_keys_are_required_once_created(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    result = CliRunner().invoke(cli, ["--home", str(home), "client-key", "create", "laptop"])
    key = result.stdout.strip()
    proxy = start_proxy(home)
    refused = ask(proxy)
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert ask(proxy, extra_headers={"x-api-key": key}).status_code == 200
    assert (
        requests.post(
            f"{proxy.url}/v1/messages",
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
            json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        ).status_code
        == 200
    )
    assert [r["headers"]["x-api-key"] for r in fake.requests] == [
        key_for("a")
    ] * 2  # the client key never goes upstream
    rows = db_rows(home, expect=2)
    assert [r["client"] for r in rows] == ["laptop", "laptop"]  # a refused client writes no row


def test_reverse_mode(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home, "--mode", f"reverse:{fake.url}", upstream="https://unused.invalid")
    assert ask(proxy).status_code == 200
    assert served_by(fake) == ["a"]


def test_flows_to_other_hosts_pass_untouched_only_with_the_relay_on(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    other = fake.url.replace("127.0.0.1", "localhost")  # same server, but not the pool's upstream
    refused = requests.get(f"{other}/v1/models", timeout=10, proxies={"http": start_proxy(home).url})
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    assert fake.requests == []
    proxy = start_proxy(home, "--set", "claudeflare_relay=true")
    reply = requests.get(
        f"{other}/v1/models", headers={"x-api-key": "the-clients-own"}, timeout=10, proxies={"http": proxy.url}
    )
    assert reply.status_code == 401  # the fake does not know the client's key: it was not replaced
    assert fake.requests[-1]["headers"]["x-api-key"] == "the-clients-own"
    time.sleep(0.5)
    assert db_rows(home, timeout=0) == []


def test_secrets_stay_out_of_the_log_output(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home, "--set", "flow_detail=3")
    assert ask(proxy, extra_headers={"x-api-key": "client-secret-zzz"}).status_code == 200
    time.sleep(0.5)
    assert key_for("a") not in proxy.output() and "client-secret-zzz" not in proxy.output()
    for name in ("claudeflare.db", "claudeflare.db-wal"):
        if (home / name).exists():
            assert key_for("a").encode() not in (home / name).read_bytes()


def test_oversized_body_is_refused_in_anthropic_shape(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home, "--set", "claudeflare_max_body_mb=1")
    big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (2 * 1024 * 1024) + b'"}]}'
    reply = requests.post(
        f"{proxy.url}/v1/messages", data=big, headers={"content-type": "application/json"}, timeout=30
    )
    assert reply.status_code == 413 and reply.json()["error"]["type"] == "request_too_large"
    assert served_by(fake) == []
    assert ask(proxy).status_code == 200  # and the proxy serves on


def test_garbage_bodies_are_forwarded_untouched_and_logged(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home)
    for body in (b"not json at all", b"\xff\xfe\x00 invalid utf-8", b"[" * 100_000 + b"]" * 100_000):
        reply = requests.post(f"{proxy.url}/v1/messages", data=body, timeout=10)
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
        assert fake.requests[-1]["body"] == body
    assert ask(proxy).status_code == 200
    assert [r["status"] for r in db_rows(home, expect=4)] == [400, 400, 400, 200]
