"""The credential store: tokens, API keys and client-key hashes, apart from the TOML users edit.

One JSON file, mode 0600, replaced atomically (write a temp file, fsync, rename, fsync the folder)
so a crash at any instant leaves either the old or the new file, never a torn one. Writers take an
exclusive `flock` on a side lock file, so several processes sharing a home folder serialise their
read-modify-write cycles.
"""

import contextlib
import fcntl
import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .client_rules import LimitsError, parse_limits
from .config import CREDENTIALS_FILE

# Secrets go into HTTP headers: printable ASCII without spaces, or one could inject headers.
HEADER_SAFE_RE = re.compile(r"[\x21-\x7e]+")
SECRET_RE = re.compile(r"[\x21-\x7e]{8,4096}")  # and what a pasted one looks like
SECRET_FIELDS = ("token", "key", "key_id")  # a Credential field whose name ends so holds a secret


@dataclass(frozen=True)
class Credential:
    access_token: str | None = None
    refresh_token: str | None = None
    expires_at: float | None = None  # epoch seconds
    api_key: str | None = None
    needs_login: bool = False  # the refresh token was refused: only a new log-in helps
    aws_access_key_id: str | None = None  # a Bedrock account's stored key pair (else botocore's chain)
    aws_secret_access_key: str | None = None

    def __repr__(self) -> str:
        # Never let a token reach a log line or a traceback through repr().
        held = [f.name for f in fields(self) if getattr(self, f.name) and f.name.endswith(SECRET_FIELDS)]
        return f"Credential(holds={held}, expires_at={self.expires_at}, needs_login={self.needs_login})"

    @functools.cached_property  # a credential is immutable; checked once, not on every request
    def well_formed(self) -> bool:
        """Every secret held is safe to put in a header (from a hand-edited file, env var or token server)."""
        held = [getattr(self, f.name) for f in fields(self) if f.name.endswith(SECRET_FIELDS)]
        return all(v is None or (isinstance(v, str) and HEADER_SAFE_RE.fullmatch(v)) for v in held)

    def valid_token(self, now: float | None = None, margin: float = 0.0) -> bool:
        if not self.access_token:
            return False
        if self.expires_at is None:
            return True
        return self.expires_at - margin > (time.time() if now is None else now)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}

    @classmethod
    def from_json(cls, data: dict) -> "Credential":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class CredentialStore:
    """`credentials.json` in the home folder: `{"accounts": {name: {...}}, "client_keys": {name: {...}}}`."""

    def __init__(self, home: Path):
        self.path = home / CREDENTIALS_FILE
        self.lock_path = home / (CREDENTIALS_FILE + ".lock")

    def read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"accounts": {}, "client_keys": {}}
        except (OSError, ValueError) as e:
            # The message names the file only: its content is secret.
            raise CredentialStoreError(f"cannot read {self.path}: {type(e).__name__}") from None
        if not isinstance(data, dict):
            raise CredentialStoreError(f'{self.path}: expected a JSON object with "accounts" and "client_keys"')
        data.setdefault("accounts", {})
        data.setdefault("client_keys", {})
        for section in ("accounts", "client_keys"):
            if not isinstance(data[section], dict):
                raise CredentialStoreError(f'{self.path}: "{section}" must be an object of name: {{...}}')
            for name, entry in data[section].items():
                if problem := entry_problem(section, entry):
                    # The name only if it looks like one: the file may hold anything, secrets included.
                    shown = repr(name) if NAME_LIKE_RE.fullmatch(name) else "an entry"
                    raise CredentialStoreError(f"{self.path}: {section} {shown}: {problem}")
        return data

    def credentials(self) -> dict[str, Credential]:
        return {name: Credential.from_json(raw) for name, raw in self.read()["accounts"].items()}

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def update(self, change: Callable[[dict], None]) -> dict:
        """Apply `change` to the stored data under the lock and persist the result durably."""
        with self.locked():
            data = self.read()
            change(data)
            write_private(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")
            return data

    @contextlib.contextmanager
    def account_lock(self, name: str) -> Iterator[None]:
        """Held across a token refresh, so processes sharing this home refresh an account once."""
        fd = os.open(self.path.with_name(f".refresh-{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def set_account(self, name: str, credential: Credential) -> None:
        self.update(lambda d: d["accounts"].__setitem__(name, credential.to_json()))

    def remove_account(self, name: str) -> None:
        self.update(lambda d: d["accounts"].pop(name, None))


class CredentialStoreError(Exception):
    pass


NAME_LIKE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def entry_problem(section: str, entry) -> str | None:
    """What is wrong with one stored entry's shape, if anything (never quoting a value)."""
    if not isinstance(entry, dict):
        return "must be an object"
    if section == "client_keys":
        if not isinstance(entry.get("sha256"), str):
            return 'needs "sha256", a string'
        try:
            parse_limits(entry.get("limits"))
        except LimitsError as e:
            return f"limits: {e}"
        return None
    expires = entry.get("expires_at")
    if expires is not None and (
        isinstance(expires, bool) or not isinstance(expires, (int, float)) or not 0 <= expires < 1e11
    ):
        return '"expires_at" must be a time in seconds since 1970'
    if not isinstance(entry.get("needs_login", False), bool):
        return '"needs_login" must be true or false'
    return None


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically and durably, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a leftover temp file
        f.write(text.encode())
        f.flush()
        os.fsync(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
