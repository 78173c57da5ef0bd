"""Where Claudeflare keeps its files, and the settings shared by the proxy and the CLI."""

import os
import stat
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

ACCOUNTS_FILE = "accounts.toml"
CREDENTIALS_FILE = "credentials.json"
DB_FILE = "claudeflare.db"

DEFAULT_UPSTREAM = "https://api.anthropic.com"
STRATEGIES = ("session", "round-robin", "weighted", "least-requests")
DEFAULT_STRATEGY = "session"
# The proxy's other defaults (its options are described in proxy.Claudeflare.load).
DEFAULT_SESSION_HOURS = 5
DEFAULT_SWITCH_UTILIZATION = 0.95
DEFAULT_RETRY_ATTEMPTS, DEFAULT_RETRY_DELAY_MS, DEFAULT_RETRY_BACKOFF = 3, 1000, 2
DEFAULT_REFRESH_MARGIN = 300
DEFAULT_USAGE_INTERVAL = 300
DEFAULT_MAX_BODY_MB = 32  # Anthropic's own cap is 32 MB
DEFAULT_SUBSCRIPTION_CLIENTS = "claude-code"
# `claudeflare serve` gives each worker its number, 1…N: worker n serves metrics on the port + n - 1.
WORKER_ENV = "CLAUDEFLARE_WORKER"


def default_home() -> Path:
    """`CLAUDEFLARE_HOME`, else `$XDG_CONFIG_HOME/claudeflare`, else `~/.config/claudeflare`."""
    env = os.environ.get("CLAUDEFLARE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "claudeflare"


def resolve_home(value: str | os.PathLike | None) -> Path:
    """The home folder as an absolute path; a relative one is taken from the working directory."""
    return Path(value).expanduser().resolve() if value else default_home().resolve()


class HomeError(ValueError):
    """A folder that must not be Claudeflare's home."""


def check_home(home: Path) -> Path:
    """Refuse a home that is not a folder, or that another user could write into: it holds credentials."""
    try:
        st = home.stat()
    except FileNotFoundError:
        return home
    if not stat.S_ISDIR(st.st_mode):
        raise HomeError(f"{home} is not a folder")
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise HomeError(
            f"{home} is owned or writable by another user, and it would hold credentials: use a folder of your own (chmod 700)"
        )
    return home


def ensure_home(home: Path) -> Path:
    check_home(home)  # an existing one; a new one is ours, made private here
    # The home holds credentials: nobody else gets to list it.
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return home


def default_upstream() -> str:
    return os.environ.get("CLAUDEFLARE_UPSTREAM") or DEFAULT_UPSTREAM


def default_strategy() -> str:
    return os.environ.get("LB_STRATEGY") or DEFAULT_STRATEGY


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return name


class Upstream(NamedTuple):
    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_upstream(url: str) -> Upstream:
    """`https://api.anthropic.com` → Upstream("https", "api.anthropic.com", 443)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream must be an http(s) URL such as {DEFAULT_UPSTREAM}, got {url!r}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"upstream must not have a path or query, got {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Upstream(parts.scheme, parts.hostname, port)
