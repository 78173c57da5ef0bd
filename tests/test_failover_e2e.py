"""Rate limits and failover through a real proxy, against per-account limits in the fake upstream."""

import json
import time
from collections import Counter

import anthropic

from claudeflare.clock import utc_now
from claudeflare.flowlog import query_readonly

from harness import CLAUDE_CODE_SYSTEM, add_account, db_rows, wait_until
from harness import claude_code_turn as ask

MODEL = "claude-sonnet-4-6"
FAST_RETRY = ("--set", "claudeflare_retry_delay_ms=50", "--set", "claudeflare_retry_backoff=2")


def oauth_accounts(fake, home, *names, tier=5):
    for name in names:
        access, refresh = f"sk-ant-oat01-{name}-access", f"sk-ant-ort01-{name}-refresh"
        fake.add_oauth(account=name, access_token=access, refresh_token=refresh, expires_in=7200)
        add_account(home, name, "max", tier, access_token=access, refresh_token=refresh, expires_at=time.time() + 7200)


def upstream_seen(fake):
    return [(r["account"], r["status"]) for r in fake.requests if r["path"] == "/v1/messages"]


def test_pool_serves_until_every_limit_is_spent_then_fast_429s(fake, home, start_proxy):
    oauth_accounts(fake, home, "a", "b", "c")
    for name in ("a", "b", "c"):
        fake.set_limit(name, requests=4, window_s=3600, reset_in_s=3600)
    proxy = start_proxy(home, *FAST_RETRY)
    statuses = [ask(proxy, session="one conversation").status_code for _ in range(12)]
    assert statuses == [200] * 12  # 3 × 4 requests: no 429 reached the client while any account had room

    last_try = ask(proxy)  # c is spent too, which only this request finds out
    assert last_try.status_code == 429 and last_try.json()["error"]["type"] == "rate_limit_error"
    upstream_before = len(fake.requests)
    start = time.monotonic()
    refused = ask(proxy)
    assert refused.status_code == 429 and time.monotonic() - start < 1.0
    assert len(fake.requests) == upstream_before  # answered without asking upstream
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 3500 <= int(refused.headers["retry-after"]) <= 3600 and int(last_try.headers["retry-after"]) >= 3500

    seen = upstream_seen(fake)
    assert Counter(a for a, s in seen if s == 200) == {"a": 4, "b": 4, "c": 4}
    assert Counter(a for a, s in seen if s == 429) == {"a": 1, "b": 1, "c": 1}  # each found spent once, then benched
    rows = db_rows(home, expect=14)
    assert sum(r["attempts"] for r in rows) == len(seen)  # every upstream request is accounted for, none twice
    # Each account was found spent once, by whichever request met it (one request may meet two).
    reasons = [f["reason"] for r in rows if r["failovers"] for f in json.loads(r["failovers"])]
    assert reasons == ["limited"] * 3
    assert_nothing_in_flight(home)


def assert_round_robin_again(fake, proxy):
    """Four fresh requests share out evenly: both accounts take traffic again."""
    fake.reset_requests()
    for _ in range(4):
        assert ask(proxy).status_code == 200
    assert Counter(a for a, _ in upstream_seen(fake)) == {"a": 2, "b": 2}


def test_benched_account_gets_nothing_until_its_reset_then_traffic_again(fake, home, start_proxy):
    oauth_accounts(fake, home, "a", "b")
    fake.set_limit("a", requests=1, window_s=3, reset_in_s=3)
    proxy = start_proxy(home, "--set", "claudeflare_strategy=round-robin")
    for _ in range(6):
        assert ask(proxy).status_code == 200
    seen = upstream_seen(fake)
    a_429 = [i for i, (acct, status) in enumerate(seen) if acct == "a" and status == 429]
    # The spent window is met once at most — or not at all, when a's own 200 already said it is spent.
    assert len(a_429) <= 1
    after = (a_429 or [next(i for i, (acct, _) in enumerate(seen) if acct == "a")])[0] + 1
    assert [acct for acct, _ in seen[after:]] == ["b"] * (len(seen) - after)
    time.sleep(3.2)
    fake.set_limit("a", requests=100, window_s=3600)  # a has room again after its reset
    assert_round_robin_again(fake, proxy)


def test_streamed_reply_that_was_retried_arrives_complete(fake, home, start_proxy):
    oauth_accounts(fake, home, "a", "b")
    fake.set_fault("a", "status:429", count=1)
    fake.set_fault("b", "status:429", count=0)
    proxy = start_proxy(home, "--set", "claudeflare_strategy=round-robin", *FAST_RETRY)
    client = anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0)
    outcomes = []
    for _ in range(2):
        with client.messages.stream(
            model=MODEL,
            max_tokens=100,
            system=CLAUDE_CODE_SYSTEM,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-tokens": "30"},
        ) as stream:
            text = "".join(stream.text_stream)
            outcomes.append((len(text) > 0, stream.get_final_message().usage.output_tokens))
    assert outcomes == [(True, 30), (True, 30)]
    rows = db_rows(home, expect=2)
    assert [r["output_tokens"] for r in rows] == [30, 30] and sorted(r["attempts"] for r in rows) == [1, 2]
    assert_nothing_in_flight(home)


def test_529_is_retried_on_the_same_account_first(fake, home, start_proxy):
    oauth_accounts(fake, home, "a", "b")
    fake.set_fault("a", "status:529", count=2)
    proxy = start_proxy(
        home, "--set", "claudeflare_strategy=round-robin", "--set", "claudeflare_retry_attempts=3", *FAST_RETRY
    )
    assert ask(proxy).status_code == 200
    first = upstream_seen(fake)
    assert first[0][1] in (200, 529)
    if first[0][0] == "a":
        assert first == [("a", 529), ("a", 529), ("a", 200)]
    (row,) = db_rows(home, expect=1)
    assert row["status"] == 200


def test_529_burst_beyond_the_retries_moves_on_and_benches_only_briefly(fake, home, start_proxy):
    oauth_accounts(fake, home, "a", "b")
    fake.set_fault("a", "status:529", count=10)
    proxy = start_proxy(
        home, "--set", "claudeflare_strategy=round-robin", "--set", "claudeflare_retry_attempts=2", *FAST_RETRY
    )
    for _ in range(3):
        assert ask(proxy).status_code == 200
    a_tries = [s for acct, s in upstream_seen(fake) if acct == "a"]
    assert a_tries == [529, 529]  # two tries, then elsewhere, then benched for seconds
    assert_nothing_in_flight(home)
    time.sleep(5.5)
    fake.clear_faults()
    assert_round_robin_again(fake, proxy)


def test_windowless_429_fails_over_without_benching(fake, home, start_proxy):
    oauth_accounts(fake, home, "a", "b")
    fake.set_fault("a", "status:429-windowless", count=1)
    proxy = start_proxy(home, "--set", "claudeflare_strategy=round-robin")
    for _ in range(6):
        assert ask(proxy).status_code == 200
    seen = upstream_seen(fake)
    refused = seen.index(("a", 429))
    assert seen[refused + 1] == ("b", 200) and seen.count(("a", 429)) == 1
    assert ("a", 200) in seen[refused + 2 :]  # not benched: a serves again right away
    assert account_state(home, "a")[0] == "ok"
    rows = db_rows(home, expect=6)
    assert [json.loads(r["failovers"])[0]["reason"] for r in rows if r["failovers"]] == ["windowless"]
    assert_nothing_in_flight(home)


def test_in_stream_error_is_passed_through_and_recorded(fake, home, start_proxy):
    oauth_accounts(fake, home, "a")
    fake.set_fault("a", "in-stream-error", count=1)
    proxy = start_proxy(home)
    reply = ask(proxy, stream=True, tokens=20)
    assert reply.status_code == 200 and "overloaded_error" in reply.text
    (row,) = db_rows(home, expect=1)
    assert row["error"] == "overloaded_error" and row["status"] == 200
    assert wait_until(lambda: account_state(home, "a")[0] == "overloaded", timeout=3)


def test_spend_limit_benches_and_says_so(fake, home, start_proxy):
    oauth_accounts(fake, home, "a", "b")
    fake.set_fault("a", "spend-limit", count=1)
    proxy = start_proxy(home, "--set", "claudeflare_strategy=round-robin")
    for _ in range(3):
        assert ask(proxy).status_code == 200
    assert [s for a, s in upstream_seen(fake) if a == "a"] == [429]
    assert wait_until(
        lambda: account_state(home, "a")[0] == "limited" and "spend limit" in account_state(home, "a")[1], timeout=3
    )


def account_state(home, name):
    """(state, reason) the proxy published for an account, after its next status tick."""
    time.sleep(1.1)
    rows = query_readonly(home / "claudeflare.db", "select state, reason from account_status where name = ?", [name])
    return (rows[0]["state"], rows[0]["reason"] or "") if rows else (None, "")


def assert_nothing_in_flight(home):
    """Every account's in-flight count, as the proxy publishes it after the traffic, is back to 0."""

    def published():
        return query_readonly(
            home / "claudeflare.db", "select name, requests_in_flight, updated_at from account_status"
        )

    after = utc_now()
    assert wait_until(lambda: (rows := published()) and all(r["updated_at"] > after for r in rows), timeout=5)
    rows = published()
    assert {r["name"]: r["requests_in_flight"] for r in rows} == {r["name"]: 0 for r in rows}
