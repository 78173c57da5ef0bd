import json
import os
import stat
import time

import pytest

from claudeflare.accounts import AccountsError, Pool, PoolWatcher, load_pool, parse_accounts
from claudeflare.credentials import Credential, CredentialStore


def test_example_file_parses():
    accounts = parse_accounts(open("accounts.example.toml").read()).accounts
    assert [(a.name, a.mode, a.tier, a.priority) for a in accounts] == [
        ("max-main", "max", 20, 0),
        ("work-key", "api-key", 1, 1),
    ]


def test_defaults():
    (account,) = parse_accounts('[[accounts]]\nname = "x"\nmode = "api-key"\n').accounts
    assert (account.tier, account.priority, account.paused, account.api_key_env) == (1, 0, False, None)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[[accounts]]\nname = "a"\nmode = "max"\ntier = 3\n', "line 1: account 'a': 'tier' must be 1, 5 or 20"),
        (
            '[[accounts]]\nname = "a"\nmode = "max"\n\n[[accounts]]\nname = "b"\nmode = "oops"\n',
            "line 5: account 'b': 'mode'",
        ),
        (
            '[[accounts]]\nname = "a"\nmode = "max"\n[[accounts]]\nname = "a"\nmode = "max"\n',
            "line 4: duplicate account name 'a'",
        ),
        ('[[accounts]]\nname = "a b"\nmode = "max"\n', "invalid name 'a b'"),
        ('[[accounts]]\nname = "a\\r\\nX-Evil: 1"\nmode = "max"\n', "invalid name"),
        ('[[accounts]]\nname = "a"\nmode = "max"\ncolour = "red"\n', "unknown key(s) colour"),
        ('[[accounts]]\nname = "a"\nmode = "max"\napi_key_env = "K"\n', "api-key accounts only"),
        ('strategy = "fastest"\n', "unknown strategy 'fastest'"),
        ('[[accounts]\nname = "a"\n', "line 1"),
        ('[[accounts]]\nname = "a"\nmode = "max"\ntier = \n', "line 4"),
    ],
)
def test_errors_name_the_line_and_the_problem(text, message):
    with pytest.raises(AccountsError) as e:
        parse_accounts(text, "accounts.toml")
    assert message in str(e.value)
    assert str(e.value).startswith("accounts.toml")


def test_credential_store_is_private_and_atomic(tmp_path):
    store = CredentialStore(tmp_path)
    store.set_account("a", Credential(api_key="sk-ant-api03-secret"))
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert store.credentials()["a"].api_key == "sk-ant-api03-secret"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_credential_repr_hides_secrets():
    cred = Credential(access_token="sk-ant-oat01-topsecret", refresh_token="sk-ant-ort01-alsosecret", expires_at=5.0)
    assert "secret" not in repr(cred) and "secret" not in str(cred)


def test_pool_states(tmp_path, monkeypatch):
    (tmp_path / "accounts.toml").write_text(
        """
[[accounts]]
name = "key"
mode = "api-key"
[[accounts]]
name = "fresh"
mode = "max"
tier = 5
[[accounts]]
name = "stale"
mode = "max"
[[accounts]]
name = "resting"
mode = "api-key"
paused = true
[[accounts]]
name = "envkey"
mode = "api-key"
api_key_env = "CF_TEST_KEY"
[[accounts]]
name = "nothing"
mode = "max"
[[accounts]]
name = "relogin"
mode = "max"
[[accounts]]
name = "refreshable"
mode = "max"
"""
    )
    store = CredentialStore(tmp_path)
    store.set_account("key", Credential(api_key="sk-ant-api03-aaaaaaaa"))
    store.set_account("fresh", Credential(access_token="at-fresh", refresh_token="rt", expires_at=time.time() + 3600))
    store.set_account("stale", Credential(access_token="at-stale", expires_at=time.time() - 1))
    store.set_account("relogin", Credential(access_token="at", refresh_token="rt", needs_login=True))
    store.set_account("refreshable", Credential(access_token="at", refresh_token="rt", expires_at=time.time() - 1))
    store.set_account("resting", Credential(api_key="sk-ant-api03-bbbbbbbb"))
    monkeypatch.delenv("CF_TEST_KEY", raising=False)
    pool = load_pool(tmp_path)
    states = {a.name: pool.state(a) for a in pool.accounts}
    assert states == {
        "key": "ok",
        "fresh": "ok",
        "stale": "token-expired",
        "resting": "paused",
        "envkey": "no-credentials",
        "nothing": "no-credentials",
        "relogin": "needs-login",
        "refreshable": "ok",
    }
    monkeypatch.setenv("CF_TEST_KEY", "sk-ant-api03-fromenv")
    assert [a.name for a in pool.usable()] == ["key", "fresh", "envkey", "refreshable"]
    assert pool.credential(pool.accounts[4]).api_key == "sk-ant-api03-fromenv"


def test_watcher_reloads_and_keeps_last_good(tmp_path, caplog):
    path = tmp_path / "accounts.toml"
    path.write_text('[[accounts]]\nname = "a"\nmode = "api-key"\n')
    watcher = PoolWatcher(tmp_path)
    assert watcher.poll() and [a.name for a in watcher.pool.accounts] == ["a"]
    assert not watcher.poll()  # unchanged files are not re-read

    path.write_text('[[accounts]]\nname = "a"\nmode = "api-key"\n[[accounts]]\nname = "b"\nmode = "nope"\n')
    assert not watcher.poll()
    assert [a.name for a in watcher.pool.accounts] == ["a"]
    assert "line 4" in watcher.error and "line 4" in caplog.text

    path.write_text('[[accounts]]\nname = "a"\nmode = "api-key"\n[[accounts]]\nname = "b"\nmode = "max"\n')
    assert watcher.poll() and watcher.error is None
    assert [a.name for a in watcher.pool.accounts] == ["a", "b"]


def test_watcher_sees_credential_changes(tmp_path):
    (tmp_path / "accounts.toml").write_text('[[accounts]]\nname = "a"\nmode = "api-key"\n')
    watcher = PoolWatcher(tmp_path)
    watcher.poll()
    assert watcher.pool.usable() == []
    CredentialStore(tmp_path).set_account("a", Credential(api_key="sk-ant-api03-cccccccc"))
    assert watcher.poll() and [a.name for a in watcher.pool.usable()] == ["a"]


def test_corrupt_credentials_file_is_reported_without_content(tmp_path):
    (tmp_path / "credentials.json").write_text('{"accounts": {"a": {"api_key": "sk-ant-api03-leak')
    watcher = PoolWatcher(tmp_path)
    watcher.poll()
    assert "credentials.json" in watcher.error and "leak" not in watcher.error
    assert watcher.pool == Pool()


def test_store_update_keeps_other_entries(tmp_path):
    store = CredentialStore(tmp_path)
    store.set_account("a", Credential(api_key="sk-ant-api03-dddddddd"))
    store.update(lambda d: d["client_keys"].__setitem__("laptop", {"sha256": "00"}))
    data = json.loads(store.path.read_text())
    assert set(data["accounts"]) == {"a"} and set(data["client_keys"]) == {"laptop"}
