"""Timestamps as the flow log stores them: ISO 8601 UTC with milliseconds, e.g. 2026-11-26T21:58:54.147Z."""

import time
from datetime import UTC, datetime


def iso_utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return iso_utc(time.time())
