"""Accounts: `accounts.toml` (what the user edits) joined with the credential store (the secrets).

The proxy never re-reads files per request: a `PoolWatcher` thread polls both files and publishes an
immutable `Pool` snapshot; request hooks only read the latest snapshot.
"""

import hashlib
import logging
import os
import re
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomlkit
import tomlkit.exceptions

from . import providers
from .alerts import AlertsConfig, parse_alerts
from .client_rules import Limits, parse_limits
from .config import ACCOUNTS_FILE, check_strategy
from .credentials import Credential, CredentialStore, write_private
from .states import AccountState

logger = logging.getLogger(__name__)

MODES = ("max", "console", "api-key")
TIERS = (1, 5, 20)
# Names end up in headers, log lines and SQL rows: keep them plain.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: `$` would let a final newline in
PRIORITY_MIN, PRIORITY_MAX = -1_000_000, 1_000_000  # TOML takes any integer; SQLite and the eye don't
ACCOUNT_KEYS = {"name", "mode", "tier", "priority", "paused", "api_key_env", "provider"} | providers.all_keys()


class AccountsError(ValueError):
    pass


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AccountsError(
            f"invalid name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Account:
    name: str
    mode: str
    tier: int = 1
    priority: int = 0
    paused: bool = False
    api_key_env: str | None = None
    provider: str = providers.DEFAULT
    settings: object = None  # the provider's own, parsed by it (providers.Provider.parse)

    @property
    def oauth(self) -> bool:
        return self.mode in ("max", "console")


@dataclass(frozen=True)
class AccountsFile:
    accounts: tuple[Account, ...] = ()
    strategy: str | None = None  # overrides the proxy option while set
    alerts: AlertsConfig | None = None


def parse_accounts(text: str, source: str = ACCOUNTS_FILE) -> AccountsFile:
    """Parse and validate accounts.toml; errors name the file and line."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AccountsError(f"{source}: {e}") from None
    # Line of each [[accounts]] header, so semantic errors can point at the table.
    header_lines = [i for i, line in enumerate(text.splitlines(), 1) if re.match(r"\s*\[\[\s*accounts\s*\]\]", line)]
    strategy = doc.get("strategy")
    if strategy is not None:
        try:
            check_strategy(strategy if isinstance(strategy, str) else repr(strategy))
        except ValueError as e:
            raise AccountsError(f"{source}: {e}") from None
    unknown = set(doc) - {"strategy", "accounts", "alerts"}
    if unknown:
        raise AccountsError(f"{source}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    tables = doc.get("accounts", [])
    if not isinstance(tables, list):
        raise AccountsError(f"{source}: 'accounts' must be a list of [[accounts]] tables")
    accounts, seen = [], set()
    for i, table in enumerate(tables):
        where = f"{source} line {header_lines[i]}" if i < len(header_lines) else f"{source} account #{i + 1}"
        try:
            account = _account(table)
        except AccountsError as e:
            raise AccountsError(f"{where}: {e}") from None
        if account.name in seen:
            raise AccountsError(f"{where}: duplicate account name {account.name!r}")
        seen.add(account.name)
        accounts.append(account)
    return AccountsFile(tuple(accounts), strategy, _alerts(doc, text, source))


def _alerts(doc: dict, text: str, source: str) -> AlertsConfig | None:
    if "alerts" not in doc:
        return None
    line = next((i for i, line in enumerate(text.splitlines(), 1) if re.match(r"\s*\[\s*alerts\s*\]", line)), None)
    try:
        return parse_alerts(doc["alerts"])
    except ValueError as e:
        raise AccountsError(f"{source} line {line}: {e}" if line else f"{source}: {e}") from None


def _account(table: dict) -> Account:
    if not isinstance(table, dict):
        raise AccountsError("each account must be a table")
    unknown = set(table) - ACCOUNT_KEYS
    if unknown:
        raise AccountsError(f"unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(ACCOUNT_KEYS))}")
    name = table.get("name")
    if not isinstance(name, str):
        raise AccountsError("'name' is required and must be a string")
    check_name(name)
    try:
        provider = providers.check_provider(table.get("provider", providers.DEFAULT))
    except providers.ProviderError as e:
        raise AccountsError(f"account {name!r}: {e}") from None
    foreign = set(table) & (providers.all_keys() - providers.PROVIDERS[provider].keys)
    if foreign:
        raise AccountsError(f"account {name!r}: {', '.join(sorted(foreign))} not for provider {provider!r}")
    # Other providers' accounts hold a key (or their own credentials), never a subscription.
    mode = table.get("mode", "api-key" if provider != providers.DEFAULT else None)
    if provider != providers.DEFAULT and mode != "api-key":
        raise AccountsError(f"account {name!r}: provider {provider!r} takes mode 'api-key' (the default), got {mode!r}")
    if mode not in MODES:
        raise AccountsError(f"account {name!r}: 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    tier = table.get("tier", 1)
    if tier not in TIERS or isinstance(tier, bool):
        raise AccountsError(f"account {name!r}: 'tier' must be 1, 5 or 20, got {tier!r}")
    priority = table.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise AccountsError(
            f"account {name!r}: 'priority' must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}, got {priority!r}"
        )
    paused = table.get("paused", False)
    if not isinstance(paused, bool):
        raise AccountsError(f"account {name!r}: 'paused' must be true or false, got {paused!r}")
    key_env = table.get("api_key_env")
    if key_env is not None and (mode != "api-key" or not isinstance(key_env, str) or not key_env):
        raise AccountsError(f"account {name!r}: 'api_key_env' is a variable name, for api-key accounts only")
    try:
        settings = providers.PROVIDERS[provider].parse(name, table)
    except providers.ProviderError as e:
        raise AccountsError(f"account {name!r}: {e}") from None
    return Account(name, mode, tier, priority, paused, key_env, provider, settings)


def read_accounts_text(path: Path) -> str | None:
    """The file's text, None when there is none; AccountsError naming the file (and line) otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AccountsError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise AccountsError(f"{path} line {line}: not UTF-8 (byte {e.start}); TOML files are UTF-8") from None


def load_accounts(home: Path) -> AccountsFile:
    path = home / ACCOUNTS_FILE
    text = read_accounts_text(path)
    return AccountsFile() if text is None else parse_accounts(text, str(path))


# --- editing (CLI) -------------------------------------------------------------------------------
# tomlkit keeps the user's comments and layout; the result is validated before it replaces the file.


def edit_accounts(home: Path, change: Callable[[tomlkit.TOMLDocument], None]) -> AccountsFile:
    path = home / ACCOUNTS_FILE
    store = CredentialStore(home)
    with store.locked():  # one CLI edit at a time
        text = read_accounts_text(path)
        try:
            doc = tomlkit.document() if text is None else tomlkit.parse(text)
        except tomlkit.exceptions.ParseError as e:
            raise AccountsError(f"{path}: {e}") from None
        change(doc)
        text = tomlkit.dumps(doc)
        parsed = parse_accounts(text, str(path))
        write_private(path, text)
    return parsed


def account_table(doc: tomlkit.TOMLDocument, name: str):
    for table in doc.get("accounts", []):
        if table.get("name") == name:
            return table
    raise AccountsError(f"no account named {name!r} (see `claudeflare list`)")


def add_account_table(doc: tomlkit.TOMLDocument, account: Account) -> None:
    if any(t.get("name") == account.name for t in doc.get("accounts", [])):
        raise AccountsError(f"an account named {account.name!r} already exists")
    table = tomlkit.table()
    table.update({"name": account.name, "mode": account.mode, "tier": account.tier})
    if account.provider != providers.DEFAULT:
        table.update({"provider": account.provider, **providers.of(account).table(account.settings)})
    if account.priority:
        table["priority"] = account.priority
    if account.api_key_env:
        table["api_key_env"] = account.api_key_env
    if "accounts" not in doc:
        doc["accounts"] = tomlkit.aot()
    doc["accounts"].append(table)


# --- the snapshot the proxy routes with ----------------------------------------------------------


def hash_client_key(key: str) -> str:
    # Client keys are long random strings, so a plain SHA-256 is enough to store them safely.
    # A presented key may hold any bytes: mitmproxy decodes header values with surrogateescape.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class Pool:
    accounts: tuple[Account, ...] = ()
    credentials: dict[str, Credential] = field(default_factory=dict)
    client_keys: dict[str, str] = field(default_factory=dict)  # sha256 hex -> client name
    strategy: str | None = None
    alerts: AlertsConfig | None = None
    client_limits: dict[str, Limits] = field(default_factory=dict)  # client name -> its key's limits, if any

    def stored_credential(self, account: Account) -> Credential | None:
        if account.api_key_env:
            key = os.environ.get(account.api_key_env)
            return Credential(api_key=key) if key else None
        return self.credentials.get(account.name)

    def credential(self, account: Account) -> Credential | None:
        """The account's credential, if it is safe to send (see `Credential.well_formed`)."""
        credential = self.stored_credential(account)
        return credential if credential and credential.well_formed else None

    def usable(self, now: float | None = None) -> list[Account]:
        """Accounts that may take traffic: not paused and holding a credential that works now."""
        return [a for a in self.accounts if not a.paused and self.state(a, now) == AccountState.OK]

    def state(self, account: Account, now: float | None = None) -> AccountState:
        if account.paused:
            return AccountState.PAUSED
        if providers.of(account).own_credentials:
            return AccountState.OK  # fetched when needed (providers.Provider.credential)
        cred = self.stored_credential(account)
        if cred is None:
            return AccountState.NO_CREDENTIALS
        if not cred.well_formed:
            return AccountState.MALFORMED_CREDENTIALS
        if cred.api_key:
            return AccountState.OK
        if cred.needs_login:
            return AccountState.NEEDS_LOGIN
        if cred.refresh_token:
            return AccountState.OK  # an expired access token is refreshed on the way
        if not cred.access_token:
            return AccountState.NO_CREDENTIALS
        return AccountState.OK if cred.valid_token(now) else AccountState.TOKEN_EXPIRED

    def client_for(self, presented: str | None) -> str | None:
        return self.client_keys.get(hash_client_key(presented)) if presented else None


def load_pool(home: Path) -> Pool:
    accounts_file = load_accounts(home)
    data = CredentialStore(home).read()
    credentials = {n: Credential.from_json(c) for n, c in data["accounts"].items()}  # shapes checked by read()
    client_keys = {c["sha256"]: n for n, c in data["client_keys"].items()}
    client_limits = {n: parse_limits(c["limits"]) for n, c in data["client_keys"].items() if c.get("limits")}
    return Pool(
        accounts_file.accounts, credentials, client_keys, accounts_file.strategy, accounts_file.alerts, client_limits
    )


class PoolWatcher:
    """Polls accounts.toml and credentials.json; publishes a new `Pool` when either changes.

    A file that fails to parse is reported once (with its line) and the last good pool stays.
    """

    def __init__(self, home: Path, interval: float = 0.5, on_change: Callable[[Pool], None] | None = None):
        self.home = home
        self.interval = interval
        self.on_change = on_change
        self.pool = Pool()
        self.error: str | None = None
        self._signature: tuple | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stat_signature(self) -> tuple:
        sig = []
        for name in (ACCOUNTS_FILE, CredentialStore(self.home).path.name):
            try:
                st = (self.home / name).stat()
                sig.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                sig.append(None)
        return tuple(sig)

    def poll(self) -> bool:
        """Reload if the files changed; True when a new pool was published."""
        signature = self._stat_signature()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            pool = load_pool(self.home)
        except Exception as e:  # any parse error: keep serving with the last good pool
            message = str(e)
            if message != self.error:
                # A warning: mitmdump exits on an error logged while it starts, and this one heals
                # itself when the file is fixed.
                logger.warning("claudeflare: keeping the last good accounts (%d): %s", len(self.pool.accounts), message)
            self.error = message
            return False
        if self.error:
            logger.info("claudeflare: accounts file fixed, reloaded")
        self.error = None
        self.pool = pool
        logger.info("claudeflare: %d account(s) loaded, %d usable", len(pool.accounts), len(pool.usable()))
        if self.on_change:
            self.on_change(pool)
        return True

    def start(self) -> None:
        self.poll()
        self._thread = threading.Thread(target=self._run, name="claudeflare-accounts", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # the watcher must outlive any surprise
                logger.exception("claudeflare: account watcher error")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)


def apply_control(home: Path, action: str, account: str | None, value: str | None) -> str:
    """Carry out a control request from the dashboard by editing accounts.toml, as the CLI would."""
    try:
        if action in ("pause", "resume"):
            edit_accounts(home, lambda doc: account_table(doc, account or "").__setitem__("paused", action == "pause"))
        elif action == "strategy":
            check_strategy(value or "")
            edit_accounts(home, lambda doc: doc.__setitem__("strategy", value))
        else:
            return f"error: unknown action {action!r}"
    except ValueError as e:  # AccountsError included
        return f"error: {e}"
    return "ok"
