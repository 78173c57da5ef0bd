"""One pool across workers and instances (issue #14): two real mitmdump processes, sharing one home
(state.db) or two homes on one real redis-server."""

import sqlite3
import time
from collections import Counter

import pytest
import requests

from claudeflare import state
from claudeflare.accounts import hash_client_key
from claudeflare.credentials import CredentialStore

from harness import USAGE_READS, RedisServer, add_account, api_key_accounts, db_rows, wait_until
from harness import claude_code_turn as ask

MODEL = "claude-sonnet-4-6"
SYNC = 1.0  # a few of the state thread's rounds (state.POLL): long enough for an event to cross


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def served_by(fake) -> list[tuple[str, int]]:
    return [(r["account"], r["status"]) for r in fake.requests if r["path"] == "/v1/messages"]


def enrol_oauth(fake, homes, name, expires_in):
    """The same OAuth account in every home (as `claudeflare import` on each machine would)."""
    access, refresh = f"sk-ant-oat01-{name}-{time.monotonic_ns()}", f"sk-ant-ort01-{name}-{time.monotonic_ns()}"
    fake.add_oauth(account=name, access_token=access, refresh_token=refresh, expires_in=expires_in)
    for home in dict.fromkeys(homes):
        add_account(
            home, name, "max", 5, access_token=access, refresh_token=refresh, expires_at=time.time() + expires_in
        )
    return access


def two_proxies(start_proxy, homes, *extra):
    return [start_proxy(home, *extra) for home in homes]


@pytest.fixture(params=["home", "redis"])
def fleet(request, tmp_path, start_proxy):
    """(homes, start): two workers on one home, or two instances with their own homes on one Redis."""
    if request.param == "home":
        homes, extra = [tmp_path / "home"] * 2, ()
    else:
        server = request.getfixturevalue("redis_server")
        homes, extra = [tmp_path / "home-1", tmp_path / "home-2"], ("--set", f"claudeflare_state={server.url}")
    return homes, lambda *more: two_proxies(start_proxy, homes, *extra, *more)


def api_keys_everywhere(fake, homes, *specs):
    for home in dict.fromkeys(homes):
        api_key_accounts(fake, home, *specs)


def test_a_conversation_stays_on_its_account_across_the_fleet(fake, fleet):
    homes, start = fleet
    api_keys_everywhere(fake, homes, ("a", 1), ("b", 1))
    one, two = start()
    assert ask(one, session="first").status_code == 200  # takes a (a tie, by name)
    assert ask(one, session="second").status_code == 200  # takes b, a holds a conversation already
    time.sleep(SYNC)
    # Alone, the other proxy would put "second" on a (no conversation there); shared, it stays on b.
    for proxy in (two, one, two, one, two):
        assert ask(proxy, session="second").status_code == 200
        time.sleep(SYNC / 2)
    assert [a for a, _ in served_by(fake)] == ["a", "b", "b", "b", "b", "b", "b"]
    # One row per request for the fleet: workers write their home's one claudeflare.db.
    assert wait_until(lambda: sum(len(db_rows(h)) for h in dict.fromkeys(homes)) == 7)


def test_an_account_limited_for_one_is_not_tried_by_the_other(fake, fleet):
    homes, start = fleet
    api_keys_everywhere(fake, homes, ("a", 1), ("b", 1))
    fake.set_limit("a", requests=1, window_s=3600)
    one, two = start("--set", "claudeflare_strategy=round-robin")
    for _ in range(4):
        assert ask(one).status_code == 200
    assert Counter(s for a, s in served_by(fake) if a == "a") == {200: 1, 429: 1}
    time.sleep(SYNC)
    for _ in range(4):  # round-robin would give a two of these, were it not benched here too
        assert ask(two).status_code == 200
    seen = served_by(fake)
    assert Counter(s for a, s in seen if a == "a") == {200: 1, 429: 1}  # one 429 for the fleet
    assert Counter(a for a, s in seen if s == 200) == {"a": 1, "b": 7}


def test_one_refresh_per_expiry_for_the_fleet(fake, fleet):
    homes, start = fleet
    old = enrol_oauth(fake, homes, "m", expires_in=60)  # inside the refresh margin: both refresh ahead at start
    one, two = start("--set", f"claudeflare_token_url={fake.url}/v1/oauth/token")
    assert wait_until(lambda: fake.token_calls("m") >= 1, timeout=10)
    for proxy in (one, two, one, two):
        assert ask(proxy).status_code == 200
    assert fake.token_calls("m") == 1
    rotated = fake.tokens("m")["access_token"]
    assert rotated != old
    sent = [r["headers"].get("authorization") for r in fake.requests if r["path"] == "/v1/messages"]
    assert sent == [f"Bearer {rotated}"] * 4  # both use the token one of them rotated
    for home in dict.fromkeys(homes):
        assert CredentialStore(home).credentials()["m"].access_token == rotated


def test_redis_gone_the_local_copy_serves_and_resyncs_when_it_is_back(fake, tmp_path, start_proxy, redis_server):
    """Redis gone for 10 s, as the issue asks: requests go on from the local copy, then it re-syncs."""
    homes = [tmp_path / "home-1", tmp_path / "home-2"]
    api_keys_everywhere(fake, homes, ("a", 1), ("b", 1))
    fake.set_limit("a", requests=1, window_s=3600)
    one, two = [
        start_proxy(h, "--set", f"claudeflare_state={redis_server.url}", "--set", "claudeflare_strategy=round-robin")
        for h in homes
    ]
    redis_server.stop()
    for _ in range(4):  # one meets a's limit while Redis is gone
        assert ask(one).status_code == 200
    assert ask(two).status_code == 200  # round-robin's first pick there is b: two has not met a's limit
    assert wait_until(lambda: "unreachable, serving from the local copy" in one.output(), timeout=5)
    gone = time.monotonic()
    while time.monotonic() - gone < 10:  # served all along, from the local copy
        assert ask(one).status_code == 200  # (two is not asked: it must learn a's limit from one)
        time.sleep(1)
    redis_server.start()
    for proxy in (one, two):
        assert wait_until(lambda proxy=proxy: "reachable again, re-synced" in proxy.output(), timeout=15)
        assert proxy.output().count("unreachable, serving from the local copy") == 1  # logged once, not per try
        assert proxy.proc.poll() is None
    time.sleep(SYNC)
    fake.reset_requests()
    for _ in range(4):  # one's bench reached two through the restarted Redis: a is not tried
        assert ask(two).status_code == 200
    assert [a for a, _ in served_by(fake)] == ["b"] * 4


def test_a_refresh_lock_waits_for_its_holder_and_is_released_only_by_it(tmp_path, redis_server, monkeypatch):
    monkeypatch.setattr(state, "LOCK_TTL_MS", 300)
    monkeypatch.setattr(state, "LOCK_WAIT", 0.1)
    one, two = (state.RedisState(redis_server.url, tmp_path / name) for name in ("h1", "h2"))
    first = one.refresh_lock("m")
    first.__enter__()
    with pytest.raises(TimeoutError):
        with two.refresh_lock("m"):
            pass
    time.sleep(0.4)  # the holder outlived its lock's expiry: another may take it
    second = two.refresh_lock("m")
    second.__enter__()
    first.__exit__(None, None, None)  # too late: the lock is two's now, and stays
    assert one.redis.get("claudeflare:refresh:m") is not None
    second.__exit__(None, None, None)
    assert one.redis.get("claudeflare:refresh:m") is None


def account_status(home, name):
    conn = sqlite3.connect(home / "claudeflare.db")
    try:
        row = conn.execute("select utilization_5h from account_status where name = ?", (name,)).fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        conn.close()
    return row[0] if row else None


def test_one_usage_read_per_interval_for_the_fleet_and_everyone_learns_it(fake, fleet):
    homes, start = fleet
    enrol_oauth(fake, homes, "m", expires_in=7200)
    fake.set_usage("m", {"five_hour": {"utilization": 42, "resets_at": "2099-01-01T00:00:00Z"}})
    proxies = start("--set", USAGE_READS)
    for home in dict.fromkeys(homes):  # the reader's result reached the other's status too
        assert wait_until(lambda home=home: account_status(home, "m") == 0.42, timeout=10)
    time.sleep(SYNC)
    assert fake.usage_reads("m") == 1, [p.output() for p in proxies]  # both start due to read it: one did


def test_a_file_made_through_one_is_reached_through_the_other(fake, fleet):
    homes, start = fleet
    api_keys_everywhere(fake, homes, ("a", 1), ("b", 1))
    one, two = start("--set", "claudeflare_strategy=round-robin")
    headers = {"x-api-key": "client", "anthropic-version": "2023-06-01", "anthropic-beta": "files-api-2025-04-14"}
    made = [
        requests.post(
            f"{one.url}/v1/files", headers=headers, files={"file": (f"{i}.txt", b"text", "text/plain")}, timeout=30
        ).json()["id"]
        for i in range(2)
    ]
    owner = {i: fake.resources.owner(i) for i in made}
    assert sorted(owner.values()) == ["a", "b"]
    time.sleep(SYNC)
    for file_id in made[::-1] * 2:  # round-robin (b, a, …) would send each to the account without it
        assert requests.get(f"{two.url}/v1/files/{file_id}", headers=headers, timeout=30).status_code == 200
    assert {r["path"].rsplit("/", 1)[1]: r["account"] for r in fake.requests if r["method"] == "GET"} == owner


def test_least_requests_counts_the_other_proxys_streams(fake, fleet):
    homes, start = fleet
    api_keys_everywhere(fake, homes, ("a", 1), ("b", 1))
    one, two = start("--set", "claudeflare_strategy=least-requests")
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    slow = requests.post(
        f"{one.url}/v1/messages",
        json=body,
        stream=True,
        timeout=30,
        headers={"x-fake-tokens": "40", "x-fake-delay-ms": "100"},
    )  # 4 s on one account
    assert slow.status_code == 200
    busy = served_by(fake)[0][0]
    time.sleep(SYNC + 0.5)
    for _ in range(2):  # alone, two would rotate onto the busy account for one of these
        assert ask(two).status_code == 200
    assert [a for a, _ in served_by(fake)[1:]] == [({"a", "b"} - {busy}).pop()] * 2
    slow.close()


def test_a_client_keys_concurrency_holds_across_the_fleet(fake, fleet):
    homes, start = fleet
    api_keys_everywhere(fake, homes, ("a", 1))
    key = "cf-fleet-client-key-" + "k" * 24
    for home in dict.fromkeys(homes):
        CredentialStore(home).update(
            lambda d: d["client_keys"].__setitem__("ci", {"sha256": hash_client_key(key), "limits": {"concurrency": 1}})
        )
    one, two = start()
    body = {"model": MODEL, "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "hi"}]}

    def send(proxy, **headers):
        return requests.post(
            f"{proxy.url}/v1/messages", json=body, stream=True, timeout=30, headers={"x-api-key": key, **headers}
        )

    slow = send(one, **{"x-fake-tokens": "30", "x-fake-delay-ms": "100"})  # 3 s
    assert slow.status_code == 200
    time.sleep(SYNC + 0.5)
    refused = send(two)
    assert refused.status_code == 429 and "1 concurrent request" in refused.json()["error"]["message"]
    _ = slow.content  # the stream ends: its slot is free for the fleet
    time.sleep(SYNC + 0.5)
    assert send(two).status_code == 200
