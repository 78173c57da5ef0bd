"""Providers: where an account's requests go and how they are adapted (issue #16).

An account names its provider in accounts.toml (`provider = "…"`, default `anthropic`). A provider
is one small class behind `Provider`: it parses its own keys of the account's table, says which
models it serves, where a request goes, how it is authenticated and how the body is adapted. The
balancer, failover, flow log and dashboard treat every account alike; they ask `of(account)`.
Adding a provider means adding one module and registering its class in PROVIDERS.
"""

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..offloop import loads, off_loop
from ..usage import DECODE_ERRORS, decode_body

logger = logging.getLogger(__name__)


class Destination(NamedTuple):
    """Where an attempt goes: the client's path is appended to `prefix`."""

    scheme: str
    host: str
    port: int
    prefix: str = ""


@dataclass(frozen=True)
class Origin:
    """Where a pool request goes by default and the body the client sent: each attempt's provider
    adapts these, so a failover to another provider starts from the client's request again."""

    scheme: str
    host: str
    port: int
    path: str
    body: bytes | None
    encoding: str | None = None  # the body's content-encoding, if the client compressed it


class ProviderError(ValueError):
    """An account's provider settings are wrong: the message names the key, never a secret."""


class Provider:
    name = ""
    keys: frozenset[str] = frozenset()  # the account-table keys this provider reads besides the common ones
    kind = "api-key"  # account_kind in the flow log for its accounts
    paths: frozenset[str] | None = None  # the API paths its accounts serve (None: all of Anthropic's)

    def parse(self, name: str, table: dict) -> Any:
        """The provider's settings from the account's table (an immutable value), or ProviderError."""
        return None

    def table(self, settings) -> dict:
        """The keys `parse` reads, from its settings: what `claudeflare add` writes to accounts.toml."""
        return {}

    def serves(self, account, model: str | None) -> bool:
        return True

    own_credentials = False  # True: `credential` gets it (e.g. from google-auth), not the credential store

    def rewrites(self, account, state) -> bool:
        """Whether `rewrite` must adapt this request's body (parsed only then, off the loop if big)."""
        return False

    def rewrite(self, account, state, data: dict) -> str | None:
        """Adapt the parsed body in place; returns the path to send it to, or None for the client's."""
        return None

    async def credential(self, account, stored=None):
        """For `own_credentials` providers: a Credential good to send now, or None (see `problem`).
        `stored`: the account's entry in the credential store, if any (e.g. a stored key pair)."""
        return None

    def problem(self, account) -> str | None:
        """Why `credential` found none for the account lately (never a secret), for its status."""
        return None

    def signals(self, response, signals):
        """The rate-limit signals of a reply (ratelimit.Signals, read from Anthropic's headers), as
        this provider means them."""
        return signals

    def stream(self, response):
        """A stream callback that turns the reply's body into Anthropic's as it arrives (its head
        changed to match), or None to pass it on as it is."""
        return None

    def reply(self, response) -> None:
        """Turn a reply (its head; the whole of an error) into Anthropic's shape, in place."""

    def destination(self, account) -> Destination | None:
        """Where the account's requests go; None: the proxy's upstream (claudeflare_upstream)."""
        return None

    async def prepare(self, request) -> None:
        """After `request` is adapted, before `authenticate`: work on its body that must not block
        the loop (off_loop), e.g. the digest a signature covers."""

    def authenticate(self, headers, account, credential, request) -> None:
        """Put the credential in `headers`, which `request` (adapted already) goes upstream with."""
        raise NotImplementedError


class Problems:
    """Why each account of an own-credentials provider has no credential now: logged once a change."""

    def __init__(self, provider: str) -> None:
        self.provider, self.now = provider, {}

    def note(self, account: str, problem: str | None) -> None:
        if problem and problem != self.now.get(account):
            logger.warning("claudeflare: %s account %s: %s", self.provider, account, problem)
        self.now[account] = problem


def rewritten(
    rewrite, body: bytes, yielding: bool = False, encoding: str | None = None
) -> tuple[bytes, str | None] | None:
    """(`body` after `rewrite(data)`, what it returned), or None when the body is not a JSON object.
    Encoded by the pure-Python encoder (`iterencode`), which lets the loop run when this runs off it.
    `encoding`: the body's content-encoding, decoded first (at most MAX_JSON_BODY); the result is plain."""
    try:
        if encoding:
            body = decode_body(body, encoding)
            if body is None:
                return None
        data = loads(body, yielding)
    except (ValueError, RecursionError, *DECODE_ERRORS):
        return None
    if not isinstance(data, dict):
        return None
    path = rewrite(data)
    return "".join(json.JSONEncoder(ensure_ascii=False).iterencode(data)).encode(), path


from .anthropic import Anthropic  # noqa: E402  (the providers import the base above)
from .bedrock import Bedrock  # noqa: E402
from .compatible import AnthropicCompatible  # noqa: E402
from .vertex import Vertex  # noqa: E402

PROVIDERS: dict[str, Provider] = {p.name: p for p in (Anthropic(), AnthropicCompatible(), Vertex(), Bedrock())}
DEFAULT = Anthropic.name


def of(account) -> Provider:
    return PROVIDERS[account.provider]


def serving(account, state) -> bool:
    """Whether `account` may serve the request: its provider offers the path and the model."""
    provider = of(account)
    return (provider.paths is None or state.endpoint in provider.paths) and provider.serves(account, state.model)


def check_provider(name: Any) -> str:
    if not isinstance(name, str) or name not in PROVIDERS:
        raise ProviderError(f"'provider' must be one of {', '.join(PROVIDERS)}, got {name!r}")
    return name


def all_keys() -> frozenset[str]:
    return frozenset().union(*(p.keys for p in PROVIDERS.values()))


async def adapt(request, state, account) -> None:
    """Give the flow's `request` the destination and body `account`'s provider needs, starting from
    the request as first routed (kept in `state.origin`). Headers and credentials are `attempt`'s."""
    if state.origin is None:
        encoding = request.headers.get("content-encoding", "").strip().lower()
        state.origin = Origin(
            request.scheme,
            request.host,
            request.port,
            request.path,
            request.raw_content,
            encoding if encoding not in ("", "identity") else None,
        )
    origin, provider = state.origin, of(account)
    where = provider.destination(account) or Destination(origin.scheme, origin.host, origin.port)
    if (request.scheme, request.host, request.port) != where[:3]:
        request.scheme, request.host, request.port = where[:3]  # in this order, the Host header follows
    body, path, encoding = origin.body, origin.path, origin.encoding
    if body and provider.rewrites(account, state):
        rewrite = functools.partial(rewritten, functools.partial(provider.rewrite, account, state), encoding=encoding)
        done = await off_loop(rewrite, body=body, always=encoding is not None)
        if done:  # a compressed body is sent rewritten and plain
            body, path, encoding = done[0], done[1] or path, None
    request.path = where.prefix + path
    if body is not request.raw_content:
        request.raw_content = body
        if "content-length" in request.headers:
            request.headers["content-length"] = str(len(body or b""))
    compressed = "content-encoding" in request.headers
    if origin.encoding and not encoding and compressed:
        del request.headers["content-encoding"]  # rewritten, plain
    elif encoding and not compressed:
        request.headers["content-encoding"] = encoding  # the client's own body again (a failover)
    await provider.prepare(request)
