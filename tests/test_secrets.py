"""Secrets never leave the credential store: real traffic with known tokens and keys, then every file
the project wrote, every dashboard page, every CLI --json output and every command line is searched."""

import json
import os
import re
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from secrets import token_hex
from urllib.parse import urljoin, urlsplit

import psutil
import pytest
import requests
from click.testing import CliRunner
from mitmproxy import io

from claudeflare.cli import cli
from claudeflare.credentials import CredentialStore

from harness import (
    ADDON,
    CLAUDE_CODE_SYSTEM,
    MITMDUMP,
    add_account,
    claudeflare_proxy,
    db_rows,
    free_port,
    key_for,
    wait_for_port,
    wait_until,
)

CLAUDEFLARE = Path(sys.executable).parent / "claudeflare"
MITMWEB = Path(sys.executable).parent / "mitmweb"
MODEL = "claude-sonnet-4-6"
PRIVATE_FILES = {"credentials.json"}  # where the secrets belong

pytestmark = pytest.mark.e2e  # every test here starts mitmdump or mitmweb


def traffic(proxy, client_key: str) -> int:
    """Streams, plain replies, a refused client key, a 401 that forces a refresh; returns the count of rows
    (a refused client writes none)."""
    session = requests.Session()
    headers = {"x-api-key": client_key, "anthropic-version": "2023-06-01"}
    # Claude Code's prompt, so the subscription account serves its share too.
    body = {
        "model": MODEL,
        "max_tokens": 50,
        "system": CLAUDE_CODE_SYSTEM,
        "messages": [{"role": "user", "content": "secret sweep"}],
    }
    sent = 0
    for i in range(12):
        reply = session.post(
            f"{proxy.url}/v1/messages", json={**body, "stream": i % 2 == 0}, headers=headers, timeout=10
        )
        assert reply.status_code == 200, reply.text
        sent += 1
    assert (
        session.post(f"{proxy.url}/v1/messages/count_tokens", json=body, headers=headers, timeout=10).status_code == 200
    )
    wrong = session.post(
        f"{proxy.url}/v1/messages", json=body, headers={"x-api-key": "cfk-presented-but-wrong-0123456789"}, timeout=10
    )
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


def assert_saved_pool_flows(path: Path, count: int) -> None:
    """`-w` saved every pool flow (all of them answered), each showing its account by name only."""
    with open(path, "rb") as f:
        flows = [flow for flow in io.FlowReader(f).stream() if "claudeflare" in flow.metadata]
    assert len(flows) == count and all(flow.response for flow in flows)
    served = [flow for flow in flows if flow.metadata["claudeflare"].get("account")]
    assert {flow.metadata["claudeflare"]["account"] for flow in served} == {"console", "max"}
    for flow in served:
        account = flow.metadata["claudeflare"]["account"]
        shown = flow.request.headers.get("x-api-key") or flow.request.headers.get("authorization")
        assert shown.endswith(f"[claudeflare: {account}]"), shown


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

    saved = tmp_path / "flows.mitm"
    proxy = start_proxy(
        home,
        "-w",
        str(saved),
        "--set",
        "flow_detail=4",
        "--set",
        "termlog_verbosity=debug",
        "--set",
        f"claudeflare_token_url={fake.url}/v1/oauth/token",
        "--set",
        "claudeflare_strategy=round-robin",
    )
    assert wait_until(lambda: fake.tokens("max")["refresh_token"] != first["refresh_token"], timeout=10)
    fake.revoke_access_token(fake.tokens("max")["access_token"])  # the next request on it gets a 401 and a refresh
    sent = traffic(proxy, client_key)
    assert len(db_rows(home, expect=sent)) == sent
    secrets = {
        api_key,
        client_key,
        "cfk-presented-but-wrong-0123456789",
        *first.values(),
        *(v for k, v in fake.tokens("max").items() if k.endswith("token")),
    }
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
        dashboard = subprocess.Popen(
            [str(CLAUDEFLARE), "--home", str(home), "dashboard", "--public", "--allow-sql", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, 30, alive=lambda: dashboard.poll() is None)
        pages = crawl(f"http://127.0.0.1:{port}")
        everything = requests.get(
            f"http://127.0.0.1:{port}/claudeflare.json", params={"sql": "select * from requests"}, timeout=30
        )
        pages["sql: select * from requests"] = everything.content
        command_lines = {
            p.pid: " ".join(p.cmdline()) for p in (psutil.Process(dashboard.pid), psutil.Process(proxy.proc.pid))
        }
    finally:
        dashboard.terminate()
        dashboard.wait(10)
    assert len(pages) > 30 and b"secret sweep" not in everything.content  # bodies are not logged either
    assert everything.json()["rows"]

    def files() -> dict:
        return {p: p.read_bytes() for p in [*home.rglob("*"), *tmp_path.glob("*.log"), saved] if p.is_file()}

    running = files()  # the WAL and SQLite's shared memory exist only while a connection is open
    proxy.stop()
    written = {**running, **files()}
    assert (home / "claudeflare.db-wal") in running
    assert {p.name for p in written} >= {
        "claudeflare.db",
        "accounts.toml",
        "credentials.json",
        "mitmdump-0.log",
        "dashboard.log",
        "flows.mitm",
    }
    places = {
        **{str(p): b for p, b in written.items() if p.name not in PRIVATE_FILES},
        **outputs,
        **pages,
        **{f"command line of {pid}": c.encode() for pid, c in command_lines.items()},
    }
    leaks = [(secret[:16], where) for secret in secrets for where, data in places.items() if secret.encode() in data]
    assert leaks == []
    proxy_log = written[tmp_path / "mitmdump-0.log"]
    assert (
        b"[claudeflare: console]" in proxy_log and b"Bearer [claudeflare: max]" in proxy_log
    )  # flow_detail=4 printed headers
    assert b"unserializable" not in proxy_log
    assert_saved_pool_flows(saved, sent)

    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    for p in home.iterdir():
        if p.name in PRIVATE_FILES or p.suffix == ".lock" or "password" in p.name or p.name == "accounts.toml":
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    assert CredentialStore(home).credentials()["max"].refresh_token == fake.tokens("max")["refresh_token"]


def test_mitmweb_never_shows_a_credential(fake, home, tmp_path):
    """mitmweb lists a flow from the moment it arrives: while it waits for the upstream, and after."""
    api_key = key_for("web")
    fake.add_api_key(api_key, account="web")
    add_account(home, "web", "api-key", 1, api_key=api_key)
    first = {"access_token": "sk-ant-oat01-mitmweb-" + "a" * 40, "refresh_token": "sk-ant-ort01-mitmweb-" + "r" * 40}
    fake.add_oauth(account="max", expires_in=60, **first)
    add_account(home, "max", "max", 5, expires_at=time.time() + 60, **first)  # refreshed at once: a new token
    web_port, password = free_port(), token_hex(16)
    proxy = claudeflare_proxy(
        home,
        fake.url,
        tmp_path / "mitmweb.log",
        "--no-web-open-browser",
        "--set",
        f"web_port={web_port}",
        "--set",
        "web_host=127.0.0.1",
        "--set",
        f"web_password={password}",
        "--set",
        f"claudeflare_token_url={fake.url}/v1/oauth/token",
        "--set",
        "claudeflare_strategy=round-robin",
    )
    proxy.args[0] = str(MITMWEB)  # the same addon and options under mitmweb
    own_key = "sk-ant-api03-the-clients-own-" + "k" * 24  # a client's own credential is not shown either
    body = {
        "model": MODEL,
        "max_tokens": 20,
        "system": CLAUDE_CODE_SYSTEM,
        "messages": [{"role": "user", "content": "in flight"}],
    }
    web = requests.Session()
    web.headers["authorization"] = f"Bearer {password}"

    def post() -> requests.Response:
        return requests.post(
            f"{proxy.url}/v1/messages",
            json=body,
            timeout=30,
            headers={"x-api-key": own_key, "anthropic-version": "2023-06-01", "x-fake-first-byte-ms": "3000"},
        )

    def pool_flows() -> list[dict]:
        listed = web.get(f"http://127.0.0.1:{web_port}/flows", timeout=10)
        assert listed.status_code == 200
        return [f for f in listed.json() if f["request"]["path"] == "/v1/messages"]

    def shown(flow: dict) -> set[str]:
        return {value for name, value in flow["request"]["headers"] if name.lower() in ("x-api-key", "authorization")}

    views = {}
    proxy.start()
    try:
        wait_for_port(web_port, 30)
        assert wait_until(lambda: fake.tokens("max")["refresh_token"] != first["refresh_token"], timeout=10)
        with ThreadPoolExecutor(2) as pool:
            replies = [pool.submit(post) for _ in range(2)]
            # Both are routed and wait for the upstream's first byte: the state a credential used to show in.
            assert wait_until(
                lambda: len([f for f in pool_flows() if shown(f) and "response" not in f]) == 2, timeout=10
            )
            flying = pool_flows()
            views["/flows in flight"] = json.dumps(flying).encode()
            views["/flows/dump in flight"] = web.get(f"http://127.0.0.1:{web_port}/flows/dump", timeout=10).content
            assert all(not reply.done() for reply in replies)
            assert [r.result().status_code for r in replies] == [200, 200]
        assert set().union(*map(shown, flying)) == {"[claudeflare: web]", "Bearer [claudeflare: max]"}
        done = pool_flows()
        assert len(done) == 2 and all(f["response"]["status_code"] == 200 for f in done)
        views["/flows after"] = json.dumps(done).encode()
        views["/flows/dump after"] = web.get(f"http://127.0.0.1:{web_port}/flows/dump", timeout=10).content
    finally:
        proxy.stop()
    secrets = {api_key, own_key, *first.values(), *(v for k, v in fake.tokens("max").items() if k.endswith("token"))}
    assert len(secrets) == 6
    views["mitmweb's log"] = proxy.log.read_bytes()
    assert (
        b"[claudeflare: web]" in views["/flows/dump in flight"] and b"[claudeflare: max]" in views["/flows/dump after"]
    )
    assert [
        (secret[:16], where) for secret in secrets for where, data in views.items() if secret.encode() in data
    ] == []


def test_proxy_debug_is_refused(home):
    """mitmproxy's proxy_debug logs the bytes on the wire, where the credential is: not with the addon."""
    add_account(home, "console", "api-key", 1, api_key=key_for("console"))
    run = subprocess.run(
        [
            str(MITMDUMP),
            "-s",
            str(ADDON),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            "0",
            "--set",
            f"claudeflare_home={home}",
            "--set",
            "proxy_debug=true",
        ],
        capture_output=True,
        timeout=30,
    )
    assert run.returncode != 0 and b"proxy_debug logs credentials" in run.stdout + run.stderr
