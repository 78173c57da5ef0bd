"""`anthropic-compatible`: any endpoint that speaks the Messages API, with its own key.

    [[accounts]]
    name = "glm"
    provider = "anthropic-compatible"
    base_url = "https://api.example.com/api/anthropic"
    auth = "bearer"                      # or "x-api-key" (the default)
    models = { "claude-sonnet-*" = "glm-4.6", "claude-haiku-*" = "glm-4.5-air" }

The client's model is mapped by the first glob that matches it (in the table's order); a model
that is itself a mapped-to name is sent as is; any other model is not this account's to serve.
Without `models`, every model is served as asked.
"""

import fnmatch
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import Destination, Provider, ProviderError

AUTHS = ("x-api-key", "bearer")
MODEL_RE = re.compile(r"[A-Za-z0-9._:@/*?\[\]-]{1,128}")  # globs and names, as policy reads a model


def mapped(models, model: str | None) -> str | None:
    """The target of the first `models` glob that matches `model` (the table's order), or None."""
    if model:
        for glob, target in models:
            if fnmatch.fnmatchcase(model, glob):
                return target
    return None


@dataclass(frozen=True)
class Settings:
    destination: Destination
    auth: str = "x-api-key"
    models: tuple[tuple[str, str], ...] = ()  # (glob, upstream model), first match wins


def parse_base_url(url) -> Destination:
    if not isinstance(url, str):
        raise ProviderError("'base_url' is required: the endpoint's URL, e.g. https://api.example.com/anthropic")
    parts = urlsplit(url)
    if parts.username or parts.password:  # not echoed: the URL holds a secret
        raise ProviderError(
            "'base_url' must not hold credentials: store the key with `claudeflare add` or use api_key_env"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ProviderError(f"'base_url' must be http(s)://host[:port][/path], without query, got {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ProviderError(f"'base_url' has a bad port: {url!r}") from None
    return Destination(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def base_url(where: Destination) -> str:
    """The `base_url` that `parse_base_url` reads as `where`."""
    default_port = {"https": 443, "http": 80}[where.scheme]
    return f"{where.scheme}://{where.host}{'' if where.port == default_port else f':{where.port}'}{where.prefix}"


def parse_models(models) -> tuple[tuple[str, str], ...]:
    if models is None:
        return ()
    if not isinstance(models, dict):
        raise ProviderError("'models' must be a table of client model (glob) = upstream model")
    for glob, target in models.items():
        if (
            not MODEL_RE.fullmatch(glob)
            or not isinstance(target, str)
            or not MODEL_RE.fullmatch(target)
            or set("*?[]") & set(target)
        ):
            raise ProviderError(f"'models': {glob!r} = {target!r} is not a model glob = model name")
    return tuple(models.items())


class AnthropicCompatible(Provider):
    name = "anthropic-compatible"
    keys = frozenset({"base_url", "auth", "models"})
    paths = frozenset({"/v1/messages", "/v1/messages/count_tokens"})  # files, batches, models: Anthropic's

    def parse(self, name: str, table: dict) -> Settings:
        auth = table.get("auth", "x-api-key")
        if auth not in AUTHS:
            raise ProviderError(f"'auth' must be one of {', '.join(AUTHS)}, got {auth!r}")
        return Settings(parse_base_url(table.get("base_url")), auth, parse_models(table.get("models")))

    def table(self, settings: Settings) -> dict:
        return {
            "base_url": base_url(settings.destination),
            "auth": settings.auth,
            **({"models": dict(settings.models)} if settings.models else {}),
        }

    def upstream_model(self, account, model: str | None) -> str | None:
        return mapped(account.settings.models, model)

    def rewrites(self, account, state) -> bool:
        target = self.upstream_model(account, state.model)
        return target is not None and target != state.model

    def rewrite(self, account, state, data: dict) -> None:
        model = data.get("model")
        if target := self.upstream_model(account, model if isinstance(model, str) else None):
            data["model"] = target

    def serves(self, account, model: str | None) -> bool:
        models = account.settings.models
        return (
            not models
            or model is None
            or self.upstream_model(account, model) is not None
            or any(model == t for _, t in models)
        )

    def destination(self, account) -> Destination:
        return account.settings.destination

    def authenticate(self, headers, account, credential, request) -> None:
        for name in ("authorization", "x-api-key"):
            headers.pop(name, None)
        if account.settings.auth == "bearer":
            headers["authorization"] = f"Bearer {credential.api_key}"
        else:
            headers["x-api-key"] = credential.api_key
