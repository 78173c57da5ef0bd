"""The shared state's pieces, in process: events from a hostile store, the option, the home backend
between two proxies' copies, and merging into Balancer and Health."""

import json
import time
from dataclasses import replace

import pytest

from claudeflare import state
from claudeflare.accounts import Account
from claudeflare.balancer import Balancer
from claudeflare.ratelimit import Health, Signals, Window
from claudeflare.resources import Owners
from claudeflare.state import Event, HomeState, merge, parse_state
from claudeflare.states import AccountState
from claudeflare.usage_poll import UsagePoller


def owners():
    return Owners(lambda *change: None)


def bench(account="a", until=None, family=None):
    return Event("bench", f"{account}/{family or ''}", account, until or time.time() + 60, family, "5h limit")


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        "{}",
        '{"kind":"drop","key":"k","account":"a","until":1e12}',
        json.dumps({"kind": "bind", "key": "k" * 300, "account": "a", "until": 1e12}),
        json.dumps({"kind": "bind", "key": "k", "account": "a\nb", "until": 1e12}),
        json.dumps({"kind": "bind", "key": "k", "account": "a", "until": "soon"}),
        json.dumps({"kind": "bind", "key": "k", "account": "a", "until": True}),
        '{"kind":"bind","key":"k","account":"a","until":NaN}',
        json.dumps({"kind": "bench", "key": "k", "account": "a", "until": 1e12, "reason": "x" * 1000}),
        json.dumps({"kind": "bench", "key": "k", "account": "a", "until": 1e12, "extra": 1}),
        "[" * 100_000,
        json.dumps({"kind": "owner", "key": "file_1", "account": "", "until": 1e12}),
        json.dumps({"kind": "usage", "key": "a", "account": "a", "until": 1e12}),
        json.dumps({"kind": "usage", "key": "a", "account": "a", "until": 1e12, "data": {"windows": {"5h": [0.5]}}}),
        json.dumps(
            {"kind": "usage", "key": "a", "account": "a", "until": 1e12, "data": {"windows": {"5H!": [0.5, None]}}}
        ),
        json.dumps({"kind": "usage", "key": "a", "account": "a", "until": 1e12, "data": {"windows": {}, "extra": -1}}),
        json.dumps({"kind": "bind", "key": "k", "account": "a", "until": 1e12, "data": {"windows": {}}}),
    ],
)
def test_an_event_from_the_store_is_checked(raw):
    assert Event.parse(raw) is None


def test_an_event_round_trips():
    event = bench(family="opus")
    assert Event.parse(event.to_json()) == event


def test_the_option_takes_home_or_a_redis_url_and_never_echoes_it():
    assert parse_state("") == parse_state("home") == "home"
    assert parse_state("rediss://:pw@redis.example:6380/1") == "rediss://:pw@redis.example:6380/1"
    for bad in (
        "http://:secret-password@host/",
        "redis://:secret-password@host:port-secret/0",
        "redis://:secret-password@/0",
    ):
        with pytest.raises(ValueError) as e:
            parse_state(bad)
        assert "secret" not in str(e.value) and "claudeflare_state" in str(e.value)
    assert state.where("redis://:secret-password@host:7000/2") == "redis://host:7000/2"


def test_two_copies_share_through_state_db(tmp_path):
    one, two = HomeState(tmp_path), HomeState(tmp_path)
    seen = []
    two.apply = seen.extend
    one.publish(Event("bind", "conversation", "a", time.time() + 60))
    one.publish(bench("b", until=time.time() - 1))  # expired: nobody needs it
    one.sync_once()
    two.sync_once()
    assert [(e.kind, e.key, e.account) for e in seen] == [("bind", "conversation", "a")]
    two.sync_once()  # read once only
    assert len(seen) == 1


def test_after_an_outage_everything_live_is_republished(tmp_path):
    shared = HomeState(tmp_path)
    written, fail = [], [True]

    def write(events):
        if fail[0]:
            raise OSError("gone")
        written.extend(events)

    shared.write, shared.read_new = write, lambda: []
    shared.publish(bind := Event("bind", "c", "a", time.time() + 60))
    for _ in range(3):  # the thread's rounds while the store is gone (_run sets `down`)
        with pytest.raises(OSError):
            shared.sync_once()
        shared.down = "OSError"
    fail[0] = False
    shared.sync_once()
    assert written == [replace(bind, by=shared.origin)] and shared.down is None  # signed: it skips its own


def test_a_proxy_skips_its_own_events_when_reading_them_back(tmp_path):
    one, two = HomeState(tmp_path), HomeState(tmp_path)
    applied = {one: [], two: []}
    for shared in (one, two):
        shared.apply = applied[shared].extend
    one.publish(Event("bind", "c", "a", time.time() + 60))
    one.sync_once()
    two.sync_once()
    assert applied[one] == [] and [e.key for e in applied[two]] == ["c"]


def test_merge_binds_a_conversation_and_counts_it_once():
    balancer = Balancer()
    events = [Event("bind", "c1", "b", time.time() + 60)]
    merge(events, balancer, Health(), owners())
    merge(events, balancer, Health(), owners())  # an echo
    accounts = [Account("a", "api-key"), Account("b", "api-key")]
    assert balancer.pick(accounts, "c1").name == "b"
    assert balancer.session_counts == {"b": 1}
    merge([Event("bind", "c1", "a", time.time() + 60)], balancer, Health(), owners())
    assert balancer.session_counts == {"a": 1} and balancer.pick(accounts, "c1").name == "a"


def test_merge_benches_never_shorter_and_never_over_a_refusal():
    health = Health()
    later = time.time() + 600
    merge([bench("a", until=later), bench("a", until=time.time() + 60)], Balancer(), health, owners())
    assert health.view("a").state == AccountState.LIMITED and health.view("a").until == later
    assert not health.available("a")
    health.needs_login("n", "refused", None)
    merge([bench("n")], Balancer(), health, owners())
    assert health.view("n").state == AccountState.NEEDS_LOGIN
    merge([bench("f", family="opus")], Balancer(), health, owners())
    assert not health.available("f", family="opus") and health.available("f", family="sonnet")


def test_a_limit_seen_here_is_published():
    published = []
    health, balancer = Health(), Balancer()
    state.connect(
        type("Shared", (), {"publish": lambda self, e: published.append(e)})(), balancer, health, None, UsagePoller()
    )
    signals = Signals(
        status="rejected", reset=time.time() + 300, windows={"5h": Window("rejected", 1.0, time.time() + 300)}
    )
    health.observe("a", 429, signals)
    balancer.pick([Account("a", "api-key")], "c1")
    assert [(e.kind, e.account) for e in published] == [("bench", "a"), ("bind", "a")]


def test_usage_and_owners_merge():
    health, known = Health(), owners()
    usage = Event(
        "usage",
        "m",
        "m",
        time.time() + 300,
        data={"windows": {"5h": [0.4, time.time() + 900], "7d": [0.1, None]}, "extra": None},
    )
    assert Event.parse(usage.to_json()) == usage
    created, gone = state.owner_event("file_1", "a"), state.owner_event("batch_1", None)
    merge(
        [Event.parse(e.to_json()) for e in (usage, created, state.owner_event("batch_1", "b"), gone)],
        Balancer(),
        health,
        known,
    )
    assert health.view("m").utilization == {"5h": 0.4, "7d": 0.1}
    assert known.owners == {"file_1": "a"}


def test_one_usage_read_per_interval_for_the_fleet(tmp_path):
    one, two = HomeState(tmp_path), HomeState(tmp_path)
    assert one.claim_usage_read("m", 0.3) and not two.claim_usage_read("m", 0.3) and not one.claim_usage_read("m", 0.3)
    assert two.claim_usage_read("other", 0.3)
    time.sleep(0.35)
    assert two.claim_usage_read("m", 0.3)


def test_other_proxies_in_flight_counts_steer_least_requests_until_they_lapse():
    now = [100.0]
    balancer = Balancer("least-requests", clock=lambda: now[0])
    accounts = [Account("a", "api-key"), Account("b", "api-key")]
    merge([Event("load", "proxy-x/a", "a", time.time() + 3, data={"n": 2})], balancer, Health(), owners())
    assert balancer.load("a") == 2
    assert [balancer.pick(accounts).name for _ in range(3)] == ["b", "b", "b"]
    now[0] += 3.1  # that proxy died: its count lapses
    assert balancer.load("a") == 0


def test_in_flight_counts_are_published_when_they_change():
    import asyncio

    published, balancer = [], Balancer()
    shared = HomeState.__new__(HomeState)
    shared.origin, shared.publish = "proxy-me/", published.append

    async def rounds(n):
        task = asyncio.create_task(state.publish_load(lambda: shared, balancer, every=0.01))
        for step in range(n):
            if step == 1:
                lease = balancer.lease("a")
            if step == 5:  # held across several of the publisher's rounds
                lease.release()
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(rounds(8))
    assert [(e.key, e.data["n"]) for e in published] == [("proxy-me/load:a", 1), ("proxy-me/load:a", 0)]


def test_other_proxies_client_counts_hold_a_key_to_its_limits():
    from collections import Counter

    from claudeflare.client_limits import ClientLimits
    from claudeflare.client_rules import Limits

    clients = ClientLimits(None, None)
    now = time.time()
    minute = int(now // 60)
    merge(
        [
            Event("client", "proxy-x/client:ci", "ci", now + 3, data={"n": 1, "minute": minute, "admitted": 2}),
            Event("client", "proxy-x/client:old", "old", now + 3, data={"n": 0, "minute": minute - 1, "admitted": 5}),
        ],
        Balancer(),
        Health(),
        owners(),
        clients,
    )
    assert clients.head_refusal("ci", Limits(concurrency=1), now).status_code == 429
    assert clients.head_refusal("ci", Limits(concurrency=2), now) is None
    assert clients.head_refusal("ci", Limits(rpm=2), now).status_code == 429
    assert clients.head_refusal("old", Limits(rpm=2), now) is None  # admitted in another minute
    assert clients.head_refusal("ci", Limits(rpm=2), now + 3.1) is None  # that proxy's counts lapsed
    clients.minute = (minute, Counter({"ci": 1}))
    assert state.counts(Balancer(), clients) == {("client", "ci"): {"n": 0, "minute": minute, "admitted": 1}}


def test_live_events_kept_are_bounded_the_expired_swept_first(tmp_path, monkeypatch):
    monkeypatch.setattr(state, "MAX_KNOWN", 3)
    shared = HomeState(tmp_path)
    now = time.time()
    shared._remember(Event("bind", "old", "a", now - 1))  # expired
    for key in ("k1", "k2", "k3"):
        shared._remember(Event("bind", key, "a", now + 60))
    assert [slot[1] for slot in shared._known] == ["k1", "k2", "k3"]  # the expired one went, not k1
    for key in ("k4", "k5"):  # no sweep due again: the oldest live ones give way
        shared._remember(Event("bind", key, "a", now + 60))
    assert [slot[1] for slot in shared._known] == ["k3", "k4", "k5"]
