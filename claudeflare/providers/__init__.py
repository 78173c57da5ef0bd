"""Providers: where an account's requests go and how they are adapted (issue #16).

An account names its provider in accounts.toml (`provider = "…"`, default `anthropic`). A provider
is one small class behind `Provider`: it parses its own keys of the account's table, says which
models it serves, where a request goes, how it is authenticated and how the body is adapted. The
balancer, failover, flow log and dashboard treat every account alike; they ask `of(account)`.
Adding a provider means adding one module and registering its class in PROVIDERS.
"""

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..offloop import loads, off_loop


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

    def upstream_model(self, account, model: str | None) -> str | None:
        """The model name the upstream must get instead of `model`, or None to send the body as is."""
        return None

    def destination(self, account) -> Destination | None:
        """Where the account's requests go; None: the proxy's upstream (claudeflare_upstream)."""
        return None

    def authenticate(self, headers, account, credential) -> None:
        raise NotImplementedError


def with_model(model: str, body: bytes, yielding: bool = False) -> bytes | None:
    """`body` with its top-level "model" replaced, or None when it is not a JSON object. Encoded
    by the pure-Python encoder (`iterencode`), which lets the loop run when this runs off it."""
    try:
        data = loads(body, yielding)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    data["model"] = model
    return "".join(json.JSONEncoder(ensure_ascii=False).iterencode(data)).encode()


from .anthropic import Anthropic  # noqa: E402  (the providers import the base above)
from .compatible import AnthropicCompatible  # noqa: E402

PROVIDERS: dict[str, Provider] = {p.name: p for p in (Anthropic(), AnthropicCompatible())}
DEFAULT = Anthropic.name


def of(account) -> Provider:
    return PROVIDERS[account.provider]


def serving(account, state) -> bool:
    """Whether `account` may serve the request: its provider offers the path and the model."""
    provider = of(account)
    return (provider.paths is None or state.endpoint in provider.paths) and provider.serves(account, state.model)


def check_provider(name: Any) -> str:
    if name not in PROVIDERS:
        raise ProviderError(f"'provider' must be one of {', '.join(PROVIDERS)}, got {name!r}")
    return name


def all_keys() -> frozenset[str]:
    return frozenset().union(*(p.keys for p in PROVIDERS.values()))


async def adapt(request, state, account) -> None:
    """Give the flow's `request` the destination and body `account`'s provider needs, starting from
    the request as first routed (kept in `state.origin`). Headers and credentials are `attempt`'s."""
    if state.origin is None:
        state.origin = Origin(request.scheme, request.host, request.port, request.path, request.raw_content)
    origin, provider = state.origin, of(account)
    where = provider.destination(account) or Destination(origin.scheme, origin.host, origin.port)
    if (request.scheme, request.host, request.port) != where[:3]:
        request.scheme, request.host, request.port = where[:3]  # in this order, the Host header follows
    request.path = where.prefix + origin.path
    body, target = origin.body, provider.upstream_model(account, state.model)
    if body and target and target != state.model:
        body = await off_loop(with_model, target, body=body) or body
    if body is not request.raw_content:
        request.raw_content = body
        if "content-length" in request.headers:
            request.headers["content-length"] = str(len(body or b""))
