"""Cost in USD of a reply's token usage, from the price table in `prices.toml`."""

import functools
import tomllib
from dataclasses import dataclass
from importlib import resources

from .usage import Usage


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cache_read: float
    cache_write_5m: float

    @property
    def cache_write_1h(self) -> float:
        return 2 * self.input


@functools.cache
def _families() -> tuple[tuple[str, Price], ...]:
    """(prefix, price) pairs, longest prefix first so the first match is the most specific."""
    table = tomllib.loads(resources.files(__package__).joinpath("prices.toml").read_text("utf-8"))
    families = [
        (prefix.lower(), Price(**{k: float(v) for k, v in row.items()})) for prefix, row in table["families"].items()
    ]
    return tuple(sorted(families, key=lambda family: len(family[0]), reverse=True))


def price_for(model: str | None) -> Price | None:
    """The price of `model`'s family; None when no family matches at a `-` boundary."""
    if not isinstance(model, str):
        return None
    model = model.strip().lower()
    for prefix, price in _families():
        if model == prefix or model.startswith(prefix + "-"):
            return price
    return None


def cost_usd(usage: Usage) -> float | None:
    """Cost of `usage` in USD; None for an unknown model (never a guess)."""
    price = price_for(usage.model)
    if price is None:
        return None
    one_hour = min(usage.cache_creation_1h_input_tokens, usage.cache_creation_input_tokens)
    five_minute = usage.cache_creation_input_tokens - one_hour
    return (
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + usage.cache_read_input_tokens * price.cache_read
        + five_minute * price.cache_write_5m
        + one_hour * price.cache_write_1h
    ) / 1_000_000
