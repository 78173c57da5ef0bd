"""The addon's options: one parser per option group, each returning plain values or raising a
ValueError that names the option, so `Claudeflare.configure` only turns ValueError into
OptionsError (as mitmproxy's mapremote parses its specs). The defaults are config.py's."""

import math
import os
from pathlib import Path
from typing import NamedTuple

from . import policy
from .config import (
    DEFAULT_RETRY_ATTEMPTS,
    DEFAULT_RETRY_BACKOFF,
    DEFAULT_RETRY_DELAY_MS,
    check_strategy,
    ensure_home,
    parse_upstream,
    resolve_home,
)

SESSION_HOURS_MAX = 24 * 365
SWITCH_UTILIZATION_MAX = 10.0
RETRY_BACKOFF_MAX = 100.0


class Retry(NamedTuple):
    """Another try on the same account after a 529 or a failed connection."""

    attempts: int = DEFAULT_RETRY_ATTEMPTS  # tries per account
    delay: float = DEFAULT_RETRY_DELAY_MS / 1000  # seconds before the first retry
    backoff: float = DEFAULT_RETRY_BACKOFF  # each further retry waits this many times longer


class Refresh(NamedTuple):
    token_url: str
    margin: float  # seconds before expiry


def named(option: str, parse, *args):
    """`parse(*args)`, its ValueError prefixed with the option's name."""
    try:
        return parse(*args)
    except ValueError as e:
        raise ValueError(f"{option}: {e}") from None


def parse_fraction(name: str, text: str, low: float, high: float, low_inclusive: bool = False) -> float:
    """A number from a string option (mitmproxy's command line parses only str, int and bool)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (low <= value if low_inclusive else low < value) or not value <= high:
        raise ValueError(f"{name} must be a number {'≥' if low_inclusive else '>'} {low:g} and ≤ {high:g}")
    return value


def parse_session_seconds(hours: str) -> float:
    return parse_fraction("claudeflare_session_hours", hours, 0, SESSION_HOURS_MAX) * 3600


def parse_switch_utilization(text: str) -> float:
    return parse_fraction("claudeflare_switch_utilization", text, 0, SWITCH_UTILIZATION_MAX)


def parse_retry(attempts: int, delay_ms: int, backoff: str) -> Retry:
    if attempts < 1 or delay_ms < 0:
        raise ValueError("claudeflare_retry_attempts must be ≥ 1 and claudeflare_retry_delay_ms ≥ 0")
    return Retry(
        attempts,
        delay_ms / 1000,
        parse_fraction("claudeflare_retry_backoff", backoff, 1, RETRY_BACKOFF_MAX, low_inclusive=True),
    )


def parse_refresh(token_url: str, margin: int) -> Refresh:
    if not token_url.startswith(("https://", "http://")):
        raise ValueError("claudeflare_token_url must be an http(s) URL")
    if margin < 0:
        raise ValueError("claudeflare_refresh_margin must not be negative")
    return Refresh(token_url, float(margin))


def parse_max_body(mb: int) -> int:
    """In bytes."""
    if mb < 1:
        raise ValueError("claudeflare_max_body_mb must be at least 1")
    return mb * 2**20


def parse_usage_interval(seconds: int) -> float:
    if seconds < 0:
        raise ValueError("claudeflare_usage_interval must not be negative (0 turns usage reads off)")
    return float(seconds)


def parse_home(value: str) -> Path:
    """The home folder, made if missing: one of our own (config.check_home)."""
    home = resolve_home(value)
    try:
        return named("claudeflare_home", ensure_home, home)  # HomeError is a ValueError
    except OSError as e:
        raise ValueError(f"claudeflare_home: cannot use {home}: {e.strerror}") from None


def check_proxy_debug(on: bool) -> None:
    if on:  # mitmproxy's core then logs every byte on the wire: account credentials and client keys too.
        raise ValueError("proxy_debug logs credentials as they are sent: Claudeflare refuses it")


def parse_strategy(name: str) -> str:
    return named("claudeflare_strategy", check_strategy, name)


def parse_upstream_option(url: str):
    return named("claudeflare_upstream", parse_upstream, url)


def parse_subscription_clients(value: str) -> str:
    return named("claudeflare_subscription_clients", policy.check_subscription_clients, value)


def env_number(name: str, default: float) -> float:
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default
