from collections import Counter

import pytest

from claudeflare import balancer as balancer_module
from claudeflare.accounts import Account
from claudeflare.balancer import Balancer

A = Account("a", "api-key", tier=1)
B = Account("b", "max", tier=5)
C = Account("c", "max", tier=20)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def spread(balancer, accounts, n, key=lambda i: None):
    return Counter(balancer.pick(accounts, key(i)).name for i in range(n))


def test_no_usable_account_gives_none():
    assert Balancer().pick([], "conv") is None


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown strategy"):
        Balancer("random")


def test_round_robin_cycles_evenly():
    assert spread(Balancer("round-robin"), [A, B, C], 30) == {"a": 10, "b": 10, "c": 10}


def test_weighted_shares_follow_tiers_exactly():
    assert spread(Balancer("weighted"), [A, B, C], 26 * 4) == {"a": 4, "b": 20, "c": 80}


def test_weighted_interleaves_instead_of_bursting():
    balancer = Balancer("weighted")
    picks = [balancer.pick([A, B], None).name for _ in range(6)]
    assert picks.count("a") == 1 and picks[:5].count("b") >= 4 and picks != ["a"] * 6


def test_least_requests_prefers_fewest_in_flight():
    balancer = Balancer("least-requests")
    a_leases = [balancer.lease("a"), balancer.lease("a")]
    balancer.lease("b")
    assert balancer.pick([A, B, C], None).name == "c"
    balancer.lease("c")
    balancer.lease("c")
    assert balancer.pick([A, B, C], None).name == "b"
    for lease in a_leases:
        lease.release()
    assert balancer.pick([A, B, C], None).name == "a"


def test_a_lease_is_given_back_once_however_often_it_is_released():
    balancer = Balancer()
    first, second = balancer.lease("a"), balancer.lease("a")
    for _ in range(3):
        first.release()
    assert balancer.in_flight == {"a": 1}
    second.release()
    assert balancer.in_flight == {}


def test_least_requests_rotates_ties():
    assert spread(Balancer("least-requests"), [A, B, C], 9) == {"a": 3, "b": 3, "c": 3}


def test_session_keeps_a_conversation_on_its_account():
    balancer = Balancer("session")
    first = balancer.pick([A, B, C], "conv-1")
    assert all(balancer.pick([A, B, C], "conv-1") == first for _ in range(20))


def test_session_spreads_new_conversations_by_tier():
    counts = spread(Balancer("session"), [A, B, C], 260, key=lambda i: f"conv-{i}")
    # Greedy headroom = tier / (1 + conversations): converges to tier proportions (10 : 50 : 200).
    assert abs(counts["a"] - 10) <= 2 and abs(counts["b"] - 50) <= 2 and abs(counts["c"] - 200) <= 2


def test_session_moves_when_its_account_is_gone():
    balancer = Balancer("session")
    first = balancer.pick([A, B], "conv")
    others = [a for a in (A, B) if a != first]
    assert balancer.pick(others, "conv") == others[0]
    assert balancer.pick([A, B], "conv") == others[0]  # and stays on the new one


def test_session_expires_after_the_window():
    clock = Clock()
    balancer = Balancer("session", session_seconds=3600, clock=clock)
    assert balancer.pick([A], "conv") == A
    clock.now += 3599
    assert balancer.pick([A, C], "conv") == A
    clock.now += 2
    assert balancer.pick([A, C], "conv") == C  # a new window starts where there is most headroom


def test_expired_bindings_are_pruned():
    clock = Clock()
    balancer = Balancer("session", session_seconds=10, clock=clock)
    for i in range(100):
        balancer.pick([A, B], f"conv-{i}")
    clock.now += 3600
    balancer.pick([A, B], "late")
    assert list(balancer.sessions) == ["late"]
    assert sum(balancer.session_counts.values()) == 1


def test_bindings_are_capped_and_the_least_recently_bound_goes_first(monkeypatch):
    monkeypatch.setattr(balancer_module, "MAX_SESSIONS", 3)
    balancer = Balancer("session", session_seconds=3600, clock=Clock())
    for key in ("one", "two", "three"):
        balancer.pick([A, B], key)
    balancer.adopt("one", balancer.sessions["one"][0], 3600)  # bound again (another proxy's turn)
    for key in ("four", "five"):
        balancer.pick([A, B], key)
    assert list(balancer.sessions) == ["one", "four", "five"]
    assert sum(balancer.session_counts.values()) == 3  # the evicted ones are no longer counted


def test_priority_is_a_preference_not_a_weight():
    primary = Account("primary", "api-key", priority=0)
    backup = Account("backup", "max", tier=20, priority=1)
    for strategy in ("session", "round-robin", "weighted", "least-requests"):
        assert spread(Balancer(strategy), [backup, primary], 10, key=lambda i: f"k{i}") == {"primary": 10}
        assert spread(Balancer(strategy), [backup], 3, key=lambda i: f"k{i}") == {"backup": 3}


def test_known_utilization_lowers_headroom():
    balancer = Balancer("session")
    assert balancer.pick([B, C], "conv", utilization={"c": 0.99}) == B


def test_requests_without_conversation_key_are_not_bound():
    balancer = Balancer("session")
    balancer.pick([A, B], None)
    assert balancer.sessions == {}


def test_switching_strategy_keeps_in_flight_counts():
    balancer = Balancer("session")
    balancer.lease("a")
    balancer.strategy = "least-requests"
    assert balancer.pick([A, B], None) == B


def test_a_conversation_leaves_an_account_past_the_threshold_and_says_so(caplog):
    caplog.set_level("INFO")
    balancer = Balancer("session")
    assert balancer.pick([A, C], "conv") == C
    assert balancer.pick([A, C], "conv", utilization={"c": 0.90}) == C  # under the threshold: stays for the warm cache
    assert balancer.pick([A, C], "conv", utilization={"c": 0.96}) == A
    assert "conversation conv moved from c to a: c is past 95% of its limit" in caplog.text


def test_new_conversations_avoid_accounts_in_warning_while_others_have_room():
    balancer = Balancer("session")
    assert {balancer.pick([A, C], f"k{i}", warning={"c"}).name for i in range(5)} == {"a"}
    assert balancer.pick([C], "only", warning={"c"}) == C  # but a warning account still serves when it is the last
