"""The conversation key: which requests belong to one conversation, so it can stay on one account.

Claude Code names its session in a header and again in `metadata.user_id`; both give the same key.
Other clients get a hash of how the conversation starts (system prompt and first user message),
which later turns repeat unchanged.
"""

import hashlib
import json
import re
from collections.abc import Mapping

from .offloop import loads

SESSION_HEADER = "x-claude-code-session-id"
MAX_KEY_LEN = 200
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# What Claude Code sent in metadata.user_id before it switched to a JSON string.
_LEGACY_USER_ID = re.compile(rf"user_[0-9a-fA-F]+_account_(?:{_UUID})?_session_({_UUID})")


def conversation_key(headers: Mapping[str, str], body: bytes | None, yielding: bool = False) -> str | None:
    """The session id Claude Code sends, else "h:" + a hash of the conversation's start; None if neither.
    `yielding`: parse and hash a big body so that other threads run meanwhile (offloop.py)."""
    if key := _clean(_header(headers, SESSION_HEADER)):
        return key
    if not body:
        return None
    try:
        parsed = loads(body, yielding)
        if not isinstance(parsed, dict):
            return None
        return _metadata_session(parsed, yielding) or _start_hash(parsed, yielding)
    except (ValueError, TypeError, RecursionError):  # not JSON, not UTF-8, or nested too deep
        return None


def _header(headers: Mapping[str, str], name: str) -> object:
    """`headers[name]`, case-insensitively even when `headers` is a plain dict."""
    value = headers.get(name)
    if value is None and isinstance(headers, dict):  # header maps (mitmproxy's) are case-insensitive already
        value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == name), None)
    return value


def _clean(value: object) -> str | None:
    """`value` stripped, if it is a plausible id: a short, printable, non-empty string."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if 0 < len(value) <= MAX_KEY_LEN and value.isprintable() else None


def _metadata_session(body: dict, yielding: bool = False) -> str | None:
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str):
        return None
    if user_id.lstrip().startswith("{"):  # Claude Code 2.1+: a JSON object serialised into the string
        try:
            inner = loads(user_id, yielding)
        except ValueError:
            return None  # a malformed user_id still leaves the hash to fall back on
        return _clean(inner.get("session_id")) if isinstance(inner, dict) else None
    match = _LEGACY_USER_ID.fullmatch(user_id.strip())
    return match[1] if match else None


def _start_hash(body: dict, yielding: bool = False) -> str | None:
    system = body.get("system")
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    first_user = next((m for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
    if not system and first_user is None:
        return None
    start = [_without_cache_control(system), _without_cache_control(first_user)]
    digest = hashlib.sha256()
    # iterencode (not one-shot) is the pure-Python encoder: same text, in pieces, GIL released between them.
    for piece in _CANONICAL.iterencode(start) if yielding else [_CANONICAL.encode(start)]:
        digest.update(piece.encode())
    return "h:" + digest.hexdigest()[:32]


def _without_cache_control(value: object) -> object:
    """A copy of `value` without `cache_control` keys: clients move cache breakpoints between turns."""
    if isinstance(value, dict):
        return {k: _without_cache_control(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_without_cache_control(v) for v in value]
    return value
