"""Adding and removing accounts: the one code path of `claudeflare add/remove/login` and the dashboard.

Plain blocking functions (file locks, `requests` to the token URL): the dashboard calls them from a
worker thread. They raise `AccountsError` (the request is wrong: a name, a duplicate, a malformed
key), `OAuthError` (the log-in failed) or `CredentialStoreError`, whose messages never hold a secret.
"""

import re
from pathlib import Path

from .accounts import (
    MODES,
    PRIORITY_MAX,
    PRIORITY_MIN,
    TIERS,
    Account,
    AccountsError,
    account_table,
    add_account_table,
    check_name,
    edit_accounts,
    load_accounts,
)
from .config import ensure_home
from .credentials import SECRET_RE, Credential, CredentialStore
from .oauth import LoginFlow, OAuthSettings, create_api_key, exchange_code

OAUTH_MODES = ("max", "console")


def check_secret(value: str, what: str) -> str:
    value = value.strip()
    if not SECRET_RE.fullmatch(value):
        raise AccountsError(f"that does not look like {what}: expected 8-4096 printable characters without spaces")
    return value


def new_account(name: str, mode: str, tier: int, priority: int, api_key_env: str | None = None) -> Account:
    """An account checked as accounts.toml would check it (the CLI's options already are; a form's are not)."""
    check_name(name)
    if mode not in MODES:
        raise AccountsError(f"mode must be one of {', '.join(MODES)}")
    if tier not in TIERS or isinstance(tier, bool):
        raise AccountsError(f"tier must be {', '.join(map(str, TIERS))}")
    if not isinstance(priority, int) or isinstance(priority, bool) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise AccountsError(f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}")
    return Account(name, mode, tier, priority, api_key_env=api_key_env)


def refuse_duplicate(home: Path, name: str) -> None:
    if any(a.name == name for a in load_accounts(home).accounts):
        raise AccountsError(f"an account named {name!r} already exists")


def enrol(home: Path, account: Account, credential: Credential | None) -> None:
    """Store the secret, then add the account; undo the secret if the account can't be added."""
    ensure_home(home)
    refuse_duplicate(home, account.name)
    store = CredentialStore(home)
    if credential:
        store.set_account(account.name, credential)
    try:
        edit_accounts(home, lambda doc: add_account_table(doc, account))
    except Exception:
        if credential:
            store.remove_account(account.name)
        raise


def add_api_key_account(home: Path, account: Account, key: str | None) -> None:
    """An api-key account with its key (None with `api_key_env`: the proxy reads it from there)."""
    if account.mode != "api-key":
        raise AccountsError("an API key is for an api-key account")
    if (key is None) == (account.api_key_env is None):
        raise AccountsError("give either the key or the environment variable that holds it")
    enrol(home, account, None if key is None else Credential(api_key=check_secret(key, "an API key")))


AWS_KEY_ID_RE = re.compile(r"[A-Z0-9]{16,128}")


def aws_key_pair(key_id: str, secret: str) -> Credential:
    """A Bedrock account's stored key pair, checked (the messages never quote it)."""
    if not AWS_KEY_ID_RE.fullmatch(key_id.strip()):
        raise AccountsError("that does not look like an AWS access key id: expected 16-128 capitals and digits")
    return Credential(aws_access_key_id=key_id.strip(), aws_secret_access_key=check_secret(secret, "an AWS secret key"))


def start_oauth(mode: str) -> tuple[LoginFlow, str]:
    """A fresh PKCE log-in and the authorization link to open; the flow (its verifier) stays with the caller."""
    if mode not in OAUTH_MODES:
        raise AccountsError(f"OAuth log-in is for modes {' and '.join(OAUTH_MODES)}")
    flow = LoginFlow.start(mode)
    return flow, flow.authorize_url(OAuthSettings.from_env())


def oauth_credential(flow: LoginFlow, pasted: str) -> Credential:
    """The credential a pasted `CODE#STATE` earns: the tokens, or for Console a minted API key."""
    settings = OAuthSettings.from_env()
    credential = exchange_code(settings, flow, flow.parse_pasted(pasted))
    if flow.mode == "console":
        # Console log-ins serve through an API key minted once; the OAuth tokens are not kept.
        credential = Credential(api_key=create_api_key(settings, credential.access_token))
    return credential


def finish_oauth(home: Path, account: Account, flow: LoginFlow, pasted: str) -> None:
    """Exchange the pasted code and enrol the new OAuth account."""
    if account.mode != flow.mode:
        raise AccountsError(f"this log-in was started for mode {flow.mode}")
    refuse_duplicate(home, account.name)  # before the single-use code is spent
    enrol(home, account, oauth_credential(flow, pasted))


def oauth_account(home: Path, name: str) -> Account:
    """An existing OAuth account, to log in again (e.g. when it shows needs-login)."""
    for account in load_accounts(home).accounts:
        if account.name == name:
            if not account.oauth:
                raise AccountsError(f"{name} is an api-key account; replace its key by removing and adding it again")
            return account
    raise AccountsError(f"no account named {name!r}")


def finish_relogin(home: Path, account: Account, flow: LoginFlow, pasted: str) -> None:
    """Exchange the pasted code and replace the existing account's credentials."""
    if account.mode != flow.mode:
        raise AccountsError(f"this log-in was started for mode {flow.mode}")
    oauth_account(home, account.name)  # still there
    CredentialStore(ensure_home(home)).set_account(account.name, oauth_credential(flow, pasted))


def remove_account(home: Path, name: str) -> None:
    """Remove an account and its stored credentials."""

    def change(doc):
        table = account_table(doc, name)  # first: a file without accounts has no "accounts" to look into
        doc["accounts"].remove(table)

    edit_accounts(ensure_home(home), change)
    CredentialStore(home).remove_account(name)
