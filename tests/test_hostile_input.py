"""Hostile input: names and secrets that would inject headers or reach outside the home, a home
folder others could write to, and client keys made of junk. Bodies that are not JSON, deeply nested
or over the size cap are in test_proxy_e2e; fuzzing of the SSE parser and conversation key in
test_usage and test_conversation."""

import json
import os
import re
import socket
import sqlite3
import stat
import time

import pytest
from click.testing import CliRunner

from claudeflare.accounts import AccountsError, check_name, load_accounts
from claudeflare.cli import cli
from claudeflare.credentials import Credential, CredentialStore

from harness import add_account, api_key_accounts, claudeflare_proxy, db_rows, key_for

BAD_NAMES = ["a\n", "a\r\nX-Injected: 1", "../../etc/passwd", "a/b", "", ".hidden", "a b", "café", "a" * 65]
MODEL = "claude-sonnet-4-6"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_could_inject_headers_or_paths_are_refused(name, home):
    with pytest.raises(AccountsError, match="invalid name"):
        check_name(name)
    runner = CliRunner()
    for args in (["add", name, "--mode", "api-key"], ["client-key", "create", name]):
        result = runner.invoke(cli, ["--home", str(home), *args], input=key_for("x") + "\n")
        assert result.exit_code == 2 and "invalid name" in result.output
    home.mkdir(mode=0o700)
    (home / "accounts.toml").write_text(f'[[accounts]]\nname = {json.dumps(name)}\nmode = "api-key"\n')
    with pytest.raises(AccountsError, match="line"):
        load_accounts(home)
    assert sorted(p.name for p in home.iterdir()) == ["accounts.toml"]  # no lock or file named after it


def raw_request(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1:%d" % port))
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def test_malformed_credentials_are_never_sent(fake, home, start_proxy):
    api_key_accounts(fake, home, ("good", 1))
    add_account(home, "from-env", "api-key", 1)
    accounts = home / "accounts.toml"
    accounts.write_text(
        accounts.read_text().replace('name = "from-env"', 'name = "from-env"\napi_key_env = "EVIL_KEY"')
    )
    add_account(
        home,
        "edited",
        "max",
        5,
        access_token="sk-ant-oat01-ok\r\nX-Injected: 1",
        refresh_token="sk-ant-ort01-" + "r" * 30,
    )
    proxy = start_proxy(
        home, "--set", "claudeflare_strategy=round-robin", env={"EVIL_KEY": key_for("good") + "\r\nX-Injected: 1"}
    )
    body = json.dumps({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}).encode()
    for _ in range(6):
        reply = raw_request(
            proxy.port,
            b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        assert reply.startswith(b"HTTP/1.1 200")
    seen = [r for r in fake.requests if r["path"] == "/v1/messages"]
    assert [r["account"] for r in seen] == ["good"] * 6
    assert not any("x-injected" in {k.lower() for k in r["headers"]} for r in seen)
    listed = CliRunner().invoke(cli, ["--home", str(home), "list", "--json"])
    states = {a["name"]: a["state"] for a in json.loads(listed.output)}
    assert states["edited"] == "malformed-credentials" and "X-Injected" not in listed.output


def test_junk_client_keys_get_401_and_the_proxy_serves_on(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    CliRunner().invoke(cli, ["--home", str(home), "client-key", "create", "laptop"], catch_exceptions=False)
    proxy = start_proxy(home)
    for key in (b"\xff\xfe\x80junk", b"k" * 60_000, b"cfk-" + b"\x00" * 10, b"Bearer"):
        reply = raw_request(
            proxy.port,
            b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"x-api-key: " + key + b"\r\nContent-Length: 2\r\n\r\n{}",
        )
        status, _, rest = reply.partition(b"\r\n")
        assert status.split()[1] in (b"400", b"401", b"431"), status  # refused by us, or by mitmproxy's parser
        payload = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        assert payload["type"] == "error" and payload["error"]["message"]
    assert fake.requests == []


@pytest.mark.e2e
def test_home_that_is_a_file_or_writable_by_others_is_refused(tmp_path, fake):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    for home, message in ((not_a_folder, "is (not a folder|a file)"), (shared, "writable by another user")):
        proxy = claudeflare_proxy(home, fake.url, tmp_path / f"{home.name}.log")
        try:
            proxy.start(timeout=20)  # mitmdump may bind its port before it reports the error and exits
        except RuntimeError:
            pass
        assert proxy.proc.wait(20) != 0 and re.search(f"claudeflare_home: .*{message}", proxy.output())
        result = CliRunner().invoke(cli, ["--home", str(home), "list"])
        assert result.exit_code == 2 and re.search(message, result.output)
    assert not_a_folder.read_text() == "x" and list(shared.iterdir()) == []


def test_home_given_with_dot_dots_is_resolved_and_private(tmp_path, fake):
    home = tmp_path / "real-home"
    winding = tmp_path / "a" / ".." / "b" / ".." / "real-home"
    api_key_accounts(fake, winding, ("a", 1))
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert CredentialStore(home).credentials()["a"] == Credential(api_key=key_for("a"))
    result = CliRunner().invoke(cli, ["--home", str(winding), "list", "--json"])
    assert [a["name"] for a in json.loads(result.output)] == ["a"]


def test_a_body_claiming_10_gb_is_refused_before_any_of_it_is_sent(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home, "--set", "claudeflare_max_body_mb=1")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b'Content-Length: %d\r\n\r\n{"model": ' % (proxy.port, 10 * 1024**3)
        )
        head = s.recv(65536)  # answered with the headers alone: the 10 GB are never awaited
    assert head.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in head
    assert fake.requests == []
    (row,) = db_rows(home, expect=1)
    assert "body_size_limit" in row["error"]


def test_a_chunked_body_is_refused_once_past_the_limit_not_at_its_end(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home, "--set", "claudeflare_max_body_mb=1")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nTransfer-Encoding: chunked\r\n\r\n" % proxy.port
        )
        chunk = b"x" * 65536
        for _ in range(20):  # 1.25 MiB, and never the final empty chunk
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in head
    assert fake.requests == []


def test_one_hostile_request_cannot_silence_the_flow_log(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home)

    def post(path: bytes, body: bytes) -> bytes:
        return raw_request(
            proxy.port,
            b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        )

    def body(model: str) -> bytes:
        return b'{"model": "%s", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}' % model.encode()

    post(b"/v1/messages", body("\\ud800"))  # a lone surrogate, as JSON allows
    post(b"/v1/messages\xff\xfe", body(MODEL))  # bytes that are no UTF-8 in the path
    post(b"/v1/messages", body("\\u0000" + "m" * 5000))
    assert post(b"/v1/messages", body(MODEL)).startswith(b"HTTP/1.1 200")
    logged = db_rows(home, expect=4)
    assert len(logged) == 4
    assert {r["model"] for r in logged} >= {"?", MODEL} and all(len(r["model"]) <= 100 for r in logged)
    assert any(r["path"].startswith("/v1/messages?") for r in logged)
    conn = sqlite3.connect(home / "claudeflare.db")
    before = conn.execute("select updated_at from account_status where name = 'a'").fetchone()
    time.sleep(1.5)
    after = conn.execute("select updated_at from account_status where name = 'a'").fetchone()
    conn.close()
    assert before and after and after[0] > before[0]  # the status chore still runs
    post(b"/v1/messages", body("\\udfff"))
    proxy.stop()  # SIGTERM: the pending row is written
    assert len(db_rows(home)) == 5
    assert "Traceback" not in proxy.output()


def test_priorities_beyond_sqlite_are_refused(home):
    runner = CliRunner()
    runner.invoke(
        cli, ["--home", str(home), "add", "a", "--mode", "api-key"], input=key_for("a") + "\n", catch_exceptions=False
    )
    for args in (
        ["set", "a", "--priority", "99999999999999999999"],
        ["add", "b", "--mode", "api-key", "--priority", "-10000000"],
    ):
        result = runner.invoke(cli, ["--home", str(home), *args], input=key_for("b") + "\n")
        assert result.exit_code == 2 and "is not in the range" in result.output
    text = (home / "accounts.toml").read_text()
    assert "priority" not in text
    (home / "accounts.toml").write_text(text + "priority = 99999999999999999999\n")
    with pytest.raises(
        AccountsError, match=r"line 1: account 'a': 'priority' must be an integer from -1000000 to 1000000"
    ):
        load_accounts(home)
    result = runner.invoke(cli, ["--home", str(home), "list"])
    assert result.exit_code == 1 and "'priority' must be an integer" in result.output
    for since in ("99999999999999999d", "0001-01-01"):
        result = runner.invoke(cli, ["--home", str(home), "stats", "--since", since])
        assert result.exit_code == 2 and "use 30m, 24h, 7d" in result.output


@pytest.mark.e2e
def test_a_retention_period_past_the_calendar_is_refused_at_start(tmp_path, home, fake):
    proxy = claudeflare_proxy(home, fake.url, tmp_path / "proxy.log", "--set", "claudeflare_keep_days=99999999999")
    try:
        proxy.start(timeout=20)  # mitmdump may bind its port before it reports the error and exits
    except RuntimeError:
        pass
    assert proxy.proc.wait(20) != 0 and "claudeflare_keep_days must be from 0 (keep all) to 36500" in proxy.output()
