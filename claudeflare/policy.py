"""Which requests a subscription may serve (contract §8), read cheaply from the raw request body.

Anthropic allows Pro/Max OAuth credentials only for Claude Code. Claude Code says who it is in its
system prompt: a list whose first block is a billing header and whose second block is its identity.
Its bodies are 75–120 KB, and the proxy decides on mitmproxy's event loop, so nothing here parses a
whole body: `is_claude_code` finds the `"system"` key with a byte search and decodes only its first
two blocks; `model_family` reads the `"model"` string the same way. Both are pure and never raise.
"""

import hashlib
import json
import re

from .states import Outcome

BILLING_PREFIX = "x-anthropic-billing-header:"
CLAUDE_CODE_IDENTITIES = (
    "You are Claude Code, Anthropic's official CLI for Claude.",
    "You are Claude Code, Anthropic's official CLI for Claude, running within the Claude Agent SDK.",
    "You are a Claude agent, built on Anthropic's Claude Agent SDK.",  # `claude -p`
)
SUBSCRIPTION_CLIENTS = ("claude-code", "any")
SUBSCRIPTION_MODES = ("max",)  # OAuth subscriptions; Console accounts send a minted API key
FAMILIES = ("opus", "sonnet", "haiku")

MAX_SYSTEM_KEYS = 8  # "system" keys looked at: the top-level one, and a few nested ones before it
MAX_BLOCK_BYTES = 8 * 1024  # a block bigger than this is not a billing header or an identity
_SYSTEM_KEY = re.compile(rb'"system"\s*:\s*\[\s*')
_MODEL_VALUE = re.compile(rb'"model"\s*:\s*"([A-Za-z0-9._:@/-]{1,128})"')
_SEPARATOR = re.compile(r"\s*,\s*")
_decoder = json.JSONDecoder()


def check_subscription_clients(value: str) -> str:
    if value not in SUBSCRIPTION_CLIENTS:
        raise ValueError(f"must be one of {', '.join(SUBSCRIPTION_CLIENTS)}, got {value!r}")
    return value


def is_subscription(mode: str) -> bool:
    return mode in SUBSCRIPTION_MODES


def is_claude_code(body: bytes | None) -> bool:
    """Whether the body's system prompt is Claude Code's: a billing-header block, then its identity."""
    if not body:
        return False
    for n, match in enumerate(_SYSTEM_KEY.finditer(body)):
        if n >= MAX_SYSTEM_KEYS:
            return False
        if _first_blocks_are_claude_code(body, match.end()):
            return True
    return False


def _first_blocks_are_claude_code(body: bytes, start: int) -> bool:
    # Decode only a window after the key: the two blocks are short; the rest of the prompt is not read.
    try:
        text = body[start : start + 2 * MAX_BLOCK_BYTES].decode("utf-8", "replace")
        first, end = _decoder.raw_decode(text)
        comma = _SEPARATOR.match(text, end)
        if comma is None:
            return False
        second, _ = _decoder.raw_decode(text, comma.end())
    except (ValueError, RecursionError):
        return False
    return _block_text(first).startswith(BILLING_PREFIX) and _block_text(second).startswith(CLAUDE_CODE_IDENTITIES)


def _block_text(block) -> str:
    if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
        return block["text"]
    return ""


def model_name(body: bytes | None) -> str | None:
    """The body's first `"model"` string, or None."""
    match = _MODEL_VALUE.search(body or b"")
    return match.group(1).decode("ascii") if match else None


def model_family(body: bytes | None) -> str | None:
    """opus / sonnet / haiku from the body's first `"model"` string, or None."""
    model = (model_name(body) or "").lower()
    return next((f for f in FAMILIES if f in model), None) if model else None


# --- replies that say something about the account or the request (contract §4, §8) -------------

DISABLED_MESSAGES = (
    "This organization has been disabled",
    "OAuth authentication is currently not allowed for this organization",
)
CLAUDE_CODE_ONLY_MESSAGE = "only authorized for use with Claude Code"
THIRD_PARTY_MESSAGE = "Third-party apps now draw from your extra usage"
BARE_REFUSAL = "Error"  # what the refusal said before it had words (400), and sometimes still (429)
LONG_CONTEXT_MESSAGES = ("Extra usage is required for long context", "Usage credits are required for long context")
REFUSAL_STATUSES = (400, 403, 429)  # the statuses whose message `refusal` reads


def refusal(status: int, body: bytes, third_party: bool = False) -> Outcome | None:
    """What an error reply means beyond its status: `disabled` (the account is gone until its
    credentials change), `claude-code-only` (a subscription refused a request: another kind of
    account may serve it), `long-context` (a subscription without extra usage refused this request
    only: an API-key account serves it). None for anything else.

    `third_party`: a request not recognised as Claude Code, sent on a subscription. Then a bare
    `Error` (400, or 429 with no window spent) is the Claude-Code-only refusal in its older forms."""
    if status not in REFUSAL_STATUSES or len(body) > 64 * 1024:
        return None
    try:
        error = json.loads(body).get("error")
        message = error.get("message")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(message, str):
        return None
    if status in (400, 403) and message.startswith(DISABLED_MESSAGES):
        return Outcome.DISABLED
    if status == 400 and (CLAUDE_CODE_ONLY_MESSAGE in message or message.startswith(THIRD_PARTY_MESSAGE)):
        return Outcome.CLAUDE_CODE_ONLY
    if status in (400, 429) and third_party and message.strip() == BARE_REFUSAL:
        return Outcome.CLAUDE_CODE_ONLY
    if status == 429 and message.startswith(LONG_CONTEXT_MESSAGES):
        return Outcome.LONG_CONTEXT
    return None


def credential_fingerprint(credential) -> str | None:
    """Tells a changed credential (a new login, a new key) from the one an account was disabled with;
    a digest, so no secret is kept beside the account's state."""
    if credential is None:
        return None
    held = "\0".join(v or "" for v in (credential.api_key, credential.refresh_token or credential.access_token))
    return hashlib.sha256(held.encode("utf-8", "surrogateescape")).hexdigest()
