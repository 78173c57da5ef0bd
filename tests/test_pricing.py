import pytest

from claudeflare.pricing import Price, cost_usd, price_for
from claudeflare.usage import Usage

HAIKU_4_5 = Price(1, 5, 0.10, 1.25)
SONNET = Price(3, 15, 0.30, 3.75)
OPUS_4 = Price(15, 75, 1.50, 18.75)
OPUS_4_5 = Price(5, 25, 0.50, 6.25)
HAIKU_3_5 = Price(0.8, 4, 0.08, 1)


@pytest.mark.parametrize(
    "model, price",
    [
        ("claude-haiku-4-5", HAIKU_4_5),
        ("claude-haiku-4-5-20251001", HAIKU_4_5),
        ("claude-sonnet-4", SONNET),
        ("claude-sonnet-4-20250514", SONNET),
        ("claude-sonnet-4-5-20250929", SONNET),
        ("claude-sonnet-4-6", SONNET),
        ("claude-sonnet-5", SONNET),
        ("claude-opus-4", OPUS_4),
        ("claude-opus-4-20250514", OPUS_4),
        ("claude-opus-4-1-20250805", OPUS_4),
        ("claude-opus-4-5-20251101", OPUS_4_5),
        ("claude-opus-4-6", OPUS_4_5),
        ("claude-opus-4-7", OPUS_4_5),
        ("claude-opus-4-8-20260101", OPUS_4_5),
        ("claude-3-5-haiku-20241022", HAIKU_3_5),
        ("Claude-Opus-4-5", OPUS_4_5),  # ids are matched lower-cased
    ],
)
def test_families(model, price):
    assert price_for(model) == price


def test_longest_prefix_wins():
    # "claude-opus-4" is also a prefix of these at a "-" boundary; the longer family must win.
    assert price_for("claude-opus-4-5-20251101").input == 5
    assert price_for("claude-opus-4-20250514").input == 15


@pytest.mark.parametrize(
    "model", ["claude-opus-41", "claude-sonnet-45", "claude-opus", "claude-haiku-4", "gpt-4o", "", None]
)
def test_no_match_without_a_dash_boundary_or_unknown(model):
    assert price_for(model) is None


def test_boundary_rule_sends_a_future_opus_4_10_to_opus_4():
    assert price_for("claude-opus-4-10") == OPUS_4


def test_unknown_model_has_no_cost():
    assert cost_usd(Usage(model="gpt-4o", input_tokens=1000)) is None
    assert cost_usd(Usage(input_tokens=1000)) is None


def test_worked_example():
    # claude-sonnet-4-5 at 3 / 15 / 0.30 / 3.75 per million, 1h write = 2 x 3 = 6:
    #   1000 input * 3         =  3000
    #   500 output * 15        =  7500
    #   20000 cache read * 0.3 =  6000
    #   2000 5m writes * 3.75  =  7500   (3000 written, 1000 of them with the 1h TTL)
    #   1000 1h writes * 6     =  6000
    #                      sum = 30000 / 1e6 = $0.03
    usage = Usage(
        model="claude-sonnet-4-5-20250929",
        input_tokens=1000,
        output_tokens=500,
        cache_read_input_tokens=20000,
        cache_creation_input_tokens=3000,
        cache_creation_1h_input_tokens=1000,
    )
    assert cost_usd(usage) == pytest.approx(0.03)


def test_one_hour_cache_writes_cost_twice_the_input_price():
    one_hour = Usage(
        model="claude-opus-4-5", cache_creation_input_tokens=1_000_000, cache_creation_1h_input_tokens=1_000_000
    )
    five_minute = Usage(model="claude-opus-4-5", cache_creation_input_tokens=1_000_000)
    assert cost_usd(one_hour) == pytest.approx(10.0)
    assert cost_usd(five_minute) == pytest.approx(6.25)


def test_one_hour_count_above_the_total_is_capped():
    usage = Usage(model="claude-haiku-4-5", cache_creation_input_tokens=100, cache_creation_1h_input_tokens=500)
    assert cost_usd(usage) == pytest.approx(100 * 2 / 1e6)


def test_known_model_with_no_tokens_costs_zero():
    assert cost_usd(Usage(model="claude-sonnet-4")) == 0.0
