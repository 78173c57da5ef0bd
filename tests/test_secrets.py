"""Secrets never leave the credential store: real traffic with known tokens and keys, then every file
the project wrote, every dashboard page, every CLI --json output and every command line is searched."""

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import psutil
import requests
from click.testing import CliRunner
from conftest import db_rows, key_for, wait_until
from harness import add_account, free_port, wait_for_port

from claudeflare.cli import cli
from claudeflare.credentials import CredentialStore

CLAUDEFLARE = Path(sys.executable).parent / "claudeflare"
MODEL = "claude-sonnet-4-6"
PRIVATE_FILES = {"credentials.json"}  # where the secrets belong


def traffic(proxy, client_key: str) -> int:
    """Streams, plain replies, a refused client key, a 401 that forces a refresh; returns the count of rows
    (a refused client writes none)."""
    session = requests.Session()
    headers = {"x-api-key": client_key, "anthropic-version": "2023-06-01"}
    body = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "secret sweep"}]}
    sent = 0
    for i in range(12):
        reply = session.post(f"{proxy.url}/v1/messages", json={**body, "stream": i % 2 == 0}, headers=headers, timeout=10)
        assert reply.status_code == 200, reply.text
        sent += 1
    assert session.post(f"{proxy.url}/v1/messages/count_tokens", json=body, headers=headers, timeout=10).status_code == 200
    wrong = session.post(f"{proxy.url}/v1/messages", json=body, headers={"x-api-key": "cfk-presented-but-wrong-0123456789"}, timeout=10)
    assert wrong.status_code == 401
    return sent + 1


def crawl(base: str, limit: int = 120) -> dict[str, bytes]:
    """Every page of the dashboard reachable by links from its front page, and each one's JSON."""
    seen: dict[str, bytes] = {}
    queue = [base + "/"]
    session = requests.Session()
    while queue and len(seen) < limit:
        url = queue.pop(0)
        if url in seen:
            continue
        reply = session.get(url, timeout=30)
        seen[url] = reply.content
        if "html" not in reply.headers.get("content-type", ""):
            continue
        for href in re.findall(r'href="([^"#]+)"', reply.text):
            target = urljoin(url, href.replace("&amp;", "&"))
            parts = urlsplit(target)
            if parts.netloc == urlsplit(base).netloc and not parts.path.startswith(("/-/static", "/-/logout")):
                queue.append(target)
                if "." not in parts.path.rsplit("/", 1)[-1] and not parts.query:
                    queue.append(target + ".json")
    return seen


def test_no_secret_leaves_the_credential_store(fake, home, start_proxy, tmp_path):
    api_key = key_for("console")
    fake.add_api_key(api_key, account="console")
    add_account(home, "console", "api-key", 1, api_key=api_key)
    first = {"access_token": "sk-ant-oat01-sweep-" + "a" * 40, "refresh_token": "sk-ant-ort01-sweep-" + "r" * 40}
    fake.add_oauth(account="max", expires_in=60, **first)
    # Expiring within the refresh margin: the proxy refreshes it, so rotated tokens exist too.
    add_account(home, "max", "max", 5, expires_at=time.time() + 60, **first)
    created = CliRunner().invoke(cli, ["--home", str(home), "client-key", "create", "laptop"])
    client_key = created.stdout.strip()
    assert created.exit_code == 0 and client_key.startswith("cfk-")

    proxy = start_proxy(home, "--set", "flow_detail=4", "--set", f"claudeflare_token_url={fake.url}/v1/oauth/token",
                        "--set", "claudeflare_strategy=round-robin")
    assert wait_until(lambda: fake.tokens("max")["refresh_token"] != first["refresh_token"], timeout=10)
    fake.revoke_access_token(fake.tokens("max")["access_token"])  # the next request on it gets a 401 and a refresh
    sent = traffic(proxy, client_key)
    assert len(db_rows(home, expect=sent)) == sent
    secrets = {api_key, client_key, "cfk-presented-but-wrong-0123456789", *first.values(),
               *(v for k, v in fake.tokens("max").items() if k.endswith("token"))}
    assert len(secrets) == 7  # the 401 rotated the tokens once more

    runner = CliRunner()
    outputs = {}
    for args in (["list", "--json"], ["stats", "--json"], ["client-key", "list", "--json"], ["list"], ["stats"]):
        result = runner.invoke(cli, ["--home", str(home), *args])
        assert result.exit_code == 0, result.output
        outputs[" ".join(args)] = (result.stdout + result.stderr).encode()

    port = free_port()
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as out:
        dashboard = subprocess.Popen([str(CLAUDEFLARE), "--home", str(home), "dashboard", "--public", "--allow-sql",
                                      "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 30, alive=lambda: dashboard.poll() is None)
        pages = crawl(f"http://127.0.0.1:{port}")
        everything = requests.get(f"http://127.0.0.1:{port}/claudeflare.json",
                                  params={"sql": "select * from requests"}, timeout=30)
        pages["sql: select * from requests"] = everything.content
        command_lines = {p.pid: " ".join(p.cmdline()) for p in (psutil.Process(dashboard.pid), psutil.Process(proxy.proc.pid))}
    finally:
        dashboard.terminate()
        dashboard.wait(10)
    assert len(pages) > 30 and b"secret sweep" not in everything.content  # bodies are not logged either
    assert everything.json()["rows"]

    def files() -> dict:
        return {p: p.read_bytes() for p in [*home.rglob("*"), *tmp_path.glob("*.log")] if p.is_file()}

    running = files()  # the WAL and SQLite's shared memory exist only while a connection is open
    proxy.stop()
    written = {**running, **files()}
    assert (home / "claudeflare.db-wal") in running
    assert {p.name for p in written} >= {"claudeflare.db", "accounts.toml", "credentials.json", "mitmdump-0.log", "dashboard.log"}
    places = {**{str(p): b for p, b in written.items() if p.name not in PRIVATE_FILES}, **outputs, **pages,
              **{f"command line of {pid}": c.encode() for pid, c in command_lines.items()}}
    leaks = [(secret[:16], where) for secret in secrets for where, data in places.items() if secret.encode() in data]
    assert leaks == []
    assert b"[redacted by claudeflare]" in written[tmp_path / "mitmdump-0.log"]  # flow_detail=4 did print headers

    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    for p in home.iterdir():
        if p.name in PRIVATE_FILES or p.suffix == ".lock" or "password" in p.name or p.name == "accounts.toml":
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    assert CredentialStore(home).credentials()["max"].refresh_token == fake.tokens("max")["refresh_token"]
