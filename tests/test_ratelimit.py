from claudeflare.ratelimit import COOLDOWN_MAX, MAX_BENCH, Health, read_signals
from claudeflare.states import effective_state

NOW = 1_800_000_000.0


class Clock:
    def __init__(self):
        self.now = NOW

    def __call__(self):
        return self.now


def unified(status="allowed", reset=NOW + 3600, util5=0.4, util7=0.2, **extra):
    return {
        "anthropic-ratelimit-unified-status": status,
        "anthropic-ratelimit-unified-reset": str(int(reset)),
        "anthropic-ratelimit-unified-representative-claim": "five_hour",
        "anthropic-ratelimit-unified-5h-status": status,
        "anthropic-ratelimit-unified-5h-utilization": str(util5),
        "anthropic-ratelimit-unified-5h-reset": str(int(reset)),
        "anthropic-ratelimit-unified-7d-status": "allowed",
        "anthropic-ratelimit-unified-7d-utilization": str(util7),
        "anthropic-ratelimit-unified-7d-reset": str(int(NOW + 5 * 86400)),
        **extra,
    }


def test_unified_signals_are_read():
    s = read_signals(
        unified(
            status="allowed_warning",
            util5=0.91,
            **{
                "anthropic-ratelimit-unified-overage-status": "rejected",
                "anthropic-ratelimit-unified-overage-disabled-reason": "out_of_credits",
            },
        ),
        NOW,
    )
    assert (s.status, s.reset, s.claim) == ("allowed_warning", NOW + 3600, "five_hour")
    assert s.windows["5h"].utilization == 0.91 and s.windows["7d"].reset == NOW + 5 * 86400
    assert (s.overage_status, s.overage_reason) == ("rejected", "out_of_credits")
    assert not s.exhausted


def test_console_signals_and_retry_after():
    s = read_signals(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": "2027-01-15T08:00:30Z",
            "retry-after": "17",
            "x-should-retry": "true",
        },
        NOW,
    )
    assert s.console_remaining == {"requests": 0} and s.retry_after == 17 and s.should_retry is True
    assert s.console_reset["requests"] > NOW


def test_garbage_headers_are_ignored():
    s = read_signals(
        {
            "anthropic-ratelimit-unified-reset": "soon",
            "anthropic-ratelimit-unified-5h-utilization": "nan",
            "anthropic-ratelimit-requests-reset": "yesterday",
            "retry-after": "whenever",
        },
        NOW,
    )
    assert s.reset is None and s.windows["5h"].utilization is None and s.retry_after is None and s.console_reset == {}


def test_success_clears_and_warning_is_kept():
    health = Health(Clock())
    assert health.observe("a", 200, read_signals(unified(util5=0.85, status="allowed_warning"), NOW)) == "ok"
    assert health.get("a").state == "warning" and health.get("a").utilization["5h"] == 0.85
    assert health.available("a")
    health.observe("a", 200, read_signals(unified(), NOW))
    assert health.get("a").state == "ok" and health.get("a").reason is None


def test_429_benches_until_the_reset_then_frees():
    clock = Clock()
    health = Health(clock)
    assert health.observe("a", 429, read_signals(unified(status="rejected", reset=NOW + 1800), NOW)) == "limited"
    assert health.get("a").until == NOW + 1800 and not health.available("a")
    assert "five_hour limit" in health.get("a").reason
    clock.now = NOW + 1799
    assert not health.available("a")
    clock.now = NOW + 1800
    assert health.available("a") and health.get("a").state == "limited"  # reading it changed nothing
    assert effective_state("ok", health.get("a"), clock.now) == ("ok", None)  # it shows as back
    assert health.soonest(["a"]) is None  # and no longer names a time to wait for


def test_reset_is_capped_at_a_day():
    health = Health(Clock())
    health.observe("a", 429, read_signals(unified(status="rejected", reset=NOW + 30 * 86400), NOW))
    assert health.get("a").until == NOW + MAX_BENCH


def test_no_reset_means_exponential_cooldown_capped():
    clock = Clock()
    health = Health(clock)
    limited_no_reset = {"anthropic-ratelimit-unified-status": "rejected"}
    delays = []
    for _ in range(6):
        health.observe("a", 429, read_signals(limited_no_reset, clock.now))
        delays.append(health.get("a").until - clock.now)
    assert delays == [30, 60, 120, 240, COOLDOWN_MAX, COOLDOWN_MAX]
    health.observe("a", 200, read_signals({}, clock.now))
    health.observe("a", 429, read_signals(limited_no_reset, clock.now))
    assert health.get("a").until - clock.now == 30  # a success starts the ladder again


def test_windowless_429_does_not_bench():
    health = Health(Clock())
    signals = read_signals({"x-should-retry": "true", "retry-after": "3"}, NOW)
    assert health.observe("a", 429, signals) == "windowless"
    assert health.available("a")
    # An API key's 429 while its request budget is not used up is the same: one request refused.
    console = read_signals({"anthropic-ratelimit-requests-remaining": "12", "x-should-retry": "true"}, NOW)
    assert health.observe("a", 429, console) == "windowless" and health.available("a")
    spent = read_signals({"anthropic-ratelimit-requests-remaining": "0", "retry-after": "20"}, NOW)
    assert health.observe("a", 429, spent) == "limited" and not health.available("a")


def test_spend_limit_benches_until_reset_and_says_so():
    health = Health(Clock())
    outcome = health.observe(
        "a", 429, read_signals({"retry-after": "7200"}, NOW), "rate_limit_error", "enforced_spend_limit_reached"
    )
    assert outcome == "limited" and health.get("a").until == NOW + 7200
    assert health.get("a").reason.startswith("spend limit reached")
    health.observe(
        "b",
        429,
        read_signals(
            unified(
                status="rejected",
                **{
                    "anthropic-ratelimit-unified-overage-status": "rejected",
                    "anthropic-ratelimit-unified-overage-disabled-reason": "out_of_credits",
                },
            ),
            NOW,
        ),
    )
    assert health.get("b").reason.startswith("five_hour limit and out of credits")


def test_overload_benches_for_seconds_only():
    health = Health(Clock())
    assert health.observe("a", 529, read_signals({"retry-after": "600"}, NOW), "overloaded_error") == "overloaded"
    assert health.get("a").until - NOW <= 5


def test_soonest_return():
    health = Health(Clock())
    health.observe("a", 429, read_signals(unified(status="rejected", reset=NOW + 100), NOW))
    health.observe("b", 429, read_signals(unified(status="rejected", reset=NOW + 50), NOW))
    assert health.soonest(["a", "b", "c"]) == NOW + 50


def test_needs_login_is_not_available_until_cleared():
    health = Health(Clock())
    health.needs_login("a", "invalid_grant", "old login")
    assert not health.available("a")
    health.credential_seen("a", "old login")  # the pool changed, but not this account's credential
    assert not health.available("a")
    health.credential_seen("a", "new login")
    assert health.available("a")


def test_out_of_credits_with_windows_allowed_does_not_bench():
    # The paid overflow is spent, not the plan (contract §4): e.g. a long-context refusal.
    health = Health(Clock())
    signals = read_signals(
        unified(
            **{
                "anthropic-ratelimit-unified-overage-status": "rejected",
                "anthropic-ratelimit-unified-overage-disabled-reason": "out_of_credits",
            }
        ),
        NOW,
    )
    assert health.observe("a", 429, signals, "rate_limit_error") == "windowless"
    assert health.available("a") and health.get("a").state == "ok"


def test_a_jittered_reset_is_the_same_window_and_the_latest_reset_counts():
    clock = Clock()
    health = Health(clock)
    health.observe("a", 429, read_signals(unified(status="rejected", reset=NOW + 3600), NOW))
    assert health.get("a").until == NOW + 3600
    # A later reply on the same window says a second or thirty earlier: still the same window.
    health.observe("a", 429, read_signals(unified(status="rejected", reset=NOW + 3570), NOW))
    assert health.get("a").until == NOW + 3600
    # Several windows rejected: the latest reset counts, even when the unified reset names another.
    both = unified(
        status="rejected",
        reset=NOW + 600,
        **{
            "anthropic-ratelimit-unified-7d-status": "rejected",
            "anthropic-ratelimit-unified-7d-reset": str(int(NOW + 7200)),
        },
    )
    health.observe("b", 429, read_signals(both, NOW))
    assert health.get("b").until == NOW + 7200


def test_529_benches_no_longer_than_the_retry_delay():
    health = Health(Clock(), overload_bench=0.5)
    assert health.observe("a", 529, read_signals({"retry-after": "600"}, NOW), "overloaded_error") == "overloaded"
    assert health.get("a").until == NOW + 0.5


def test_a_family_weekly_window_benches_that_family_only():
    clock = Clock()
    health = Health(clock)
    opus_week = unified(
        **{
            "anthropic-ratelimit-unified-status": "rejected",
            "anthropic-ratelimit-unified-representative-claim": "seven_day_opus",
            "anthropic-ratelimit-unified-7d_oi-status": "rejected",
            "anthropic-ratelimit-unified-7d_oi-utilization": "1",
            "anthropic-ratelimit-unified-7d_oi-reset": str(int(NOW + 86400)),
        }
    )
    assert health.observe("a", 429, read_signals(opus_week, NOW), "rate_limit_error", family="opus") == "family-limited"
    assert not health.available("a", family="opus")
    assert health.available("a", family="sonnet") and health.available("a")
    assert health.utilization_now("a", NOW) == 0.4  # the 5h window, not the opus week
    # Only the 7d_oi window, no claim: the family of the refused request.
    oi_only = unified(
        **{
            "anthropic-ratelimit-unified-status": "rejected",
            "anthropic-ratelimit-unified-7d_oi-status": "rejected",
            "anthropic-ratelimit-unified-7d_oi-reset": str(int(NOW + 600)),
        }
    )
    assert health.observe("b", 429, read_signals(oi_only, NOW), family="sonnet") == "family-limited"
    assert not health.available("b", family="sonnet") and health.available("b", family="haiku")
    assert health.soonest(["a", "b"], "opus") == NOW + 86400 and health.soonest(["a", "b"], "sonnet") == NOW + 600
    assert health.soonest(["a", "b"]) is None  # no account is benched for every model
    clock.now = NOW + 601
    assert health.available("b", family="sonnet")


def test_disabled_is_not_available_until_cleared():
    health = Health(Clock())
    health.disable("a", "disabled by Anthropic (403)", "fingerprint")
    assert not health.available("a") and health.get("a").state == "disabled"
    health.clear("a")
    assert health.available("a")
