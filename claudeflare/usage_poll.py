"""Idle subscription accounts' usage, from the usage endpoint (contract §9).

Reply headers tell an account's windows only once it serves; `GET /api/oauth/usage` tells them
before. That endpoint allows about 30 reads an hour per account, a budget shared with the user's own
Claude Code, and reading it too often has logged users out. So each account is read at start, then
at most once per interval; a refusal waits out its `retry-after`, and errors back off exponentially.

`parse_usage` is pure and tolerant of any reply; `UsagePoller.poll` does the reads, with async
httpx on the proxy's loop (nothing blocks it), and hands the results to `ratelimit.Health`.
"""

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import httpx

from .clock import iso_utc
from .config import DEFAULT_USAGE_INTERVAL
from .credentials import Credential
from .flows import OAUTH_BETA
from .ratelimit import AccountHealth, Health, _retry_after, _rfc3339

logger = logging.getLogger(__name__)

USAGE_PATH = "/api/oauth/usage"
# The reply's objects → Health's window names (the same as the reply headers' where they overlap).
WINDOWS = {"five_hour": "5h", "seven_day": "7d", "seven_day_opus": "7d_opus", "seven_day_sonnet": "7d_sonnet"}
MAX_REPLY = 64 * 1024  # a usage reply is a few hundred bytes
TIMEOUT = 10.0
MAX_BACKOFF = 3600.0  # errors: twice the interval, doubling up to an hour
MAX_RETRY_AFTER = 6 * 3600.0  # a longer retry-after is not believed


@dataclass
class Usage:
    windows: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # window -> (fraction, reset)
    extra: float | None = None  # fraction of the extra-usage pool spent


def _fraction(percent) -> float | None:
    """The endpoint's 0–100 percentage as the headers' 0–1 fraction (it may exceed 1)."""
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not math.isfinite(percent) or percent < 0:
        return None
    return percent / 100


def parse_usage(body: bytes) -> Usage:
    """Whatever parses; anything else (not JSON, nulls, wrong types) is left out."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return Usage()
    if not isinstance(data, dict):
        return Usage()
    usage = Usage()
    for key, window in WINDOWS.items():
        item = data.get(key)
        if isinstance(item, dict) and (used := _fraction(item.get("utilization"))) is not None:
            resets_at = item.get("resets_at")
            usage.windows[window] = (used, _rfc3339(resets_at) if isinstance(resets_at, str) else None)
    extra = data.get("extra_usage")
    if isinstance(extra, dict):
        usage.extra = _fraction(extra.get("utilization"))
    return usage


def status_columns(health: AccountHealth) -> dict:
    """Table account_status's columns for what the usage endpoint adds (migration m007_usage_columns)."""
    return {
        "utilization_7d_opus": health.utilization.get("7d_opus"),
        "reset_7d_opus": iso_utc(health.resets["7d_opus"]) if "7d_opus" in health.resets else None,
        "utilization_7d_sonnet": health.utilization.get("7d_sonnet"),
        "reset_7d_sonnet": iso_utc(health.resets["7d_sonnet"]) if "7d_sonnet" in health.resets else None,
        "utilization_extra": health.extra_usage,
        "usage_read_at": iso_utc(health.usage_read_at) if health.usage_read_at else None,
    }


class Schedule:
    """When each account's usage may be read next: once per `interval`; after a failure not before
    `retry-after`, nor before an exponential backoff from the interval."""

    def __init__(self, interval: float):
        self.interval = interval
        self.next: dict[str, float] = {}
        self.failures: dict[str, int] = {}

    def due(self, name: str, now: float) -> bool:
        return now >= self.next.get(name, 0.0)

    def read(self, name: str, now: float) -> None:
        self.failures.pop(name, None)
        self.next[name] = now + self.interval

    def failed(self, name: str, now: float, retry_after: float | None = None) -> float:
        """Returns the wait before the next try."""
        failures = self.failures[name] = self.failures.get(name, 0) + 1
        wait = max(min(MAX_BACKOFF, self.interval * 2**failures), min(retry_after or 0.0, MAX_RETRY_AFTER))
        self.next[name] = now + wait
        return wait


async def _always(name: str, seconds: float) -> bool:
    return True


class UsagePoller:
    def __init__(self, interval: float = DEFAULT_USAGE_INTERVAL):
        self.schedule = Schedule(interval)
        self.client: httpx.AsyncClient | None = None
        # The fleet's budget (state.py): whether this proxy makes the read, and who learns its result.
        self.claim: Callable[[str, float], Awaitable[bool]] = _always
        self.on_read: Callable[[str, Usage, float], None] = lambda name, usage, seconds: None

    async def poll(
        self,
        accounts: Iterable[tuple[str, Credential]],
        base_url: str,
        fresh: Callable[[str, Credential], Awaitable[Credential | None]],
        health: Health,
    ) -> None:
        """Read the usage of the subscription accounts that are due. `fresh` gives a token to send."""
        for name, credential in accounts:
            now = time.time()
            if credential.api_key or not self.schedule.due(name, now):
                continue
            if not await self.claim(name, self.schedule.interval):
                self.schedule.read(name, now)  # another proxy reads it; its result comes as an event
                continue
            current = await fresh(name, credential)
            if current is None or not current.access_token:
                self.schedule.failed(name, now)  # no token to read with now; the refresher says why
                continue
            try:
                usage = await self.read(name, base_url, current.access_token, now)
            except Exception:  # one account's bad reply must not stop the others' reads
                logger.exception("claudeflare: reading the usage of %s failed", name)
                self.schedule.failed(name, now)
                continue
            if usage is not None:
                health.observe_usage(name, usage.windows, usage.extra)
                self.on_read(name, usage, self.schedule.interval)

    async def read(self, name: str, base_url: str, token: str, now: float) -> Usage | None:
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=TIMEOUT, follow_redirects=False, trust_env=False)
        headers = {"authorization": f"Bearer {token}", "anthropic-beta": OAUTH_BETA}
        try:
            async with self.client.stream("GET", base_url + USAGE_PATH, headers=headers) as reply:
                body = b""
                async for chunk in reply.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_REPLY:
                        break
        except httpx.HTTPError as e:
            wait = self.schedule.failed(name, now)
            logger.warning(
                "claudeflare: reading the usage of %s failed (%s), next try in %.0fs", name, type(e).__name__, wait
            )
            return None
        if reply.status_code != 200:
            wait = self.schedule.failed(name, now, _retry_after(reply.headers.get("retry-after"), now))
            logger.warning(
                "claudeflare: the usage endpoint answered %d for %s, next read in %.0fs", reply.status_code, name, wait
            )
            return None
        self.schedule.read(name, now)
        return parse_usage(body)

    async def close(self) -> None:
        if self.client:
            await self.client.aclose()
