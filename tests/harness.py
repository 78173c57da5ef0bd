"""Helpers for the tests and benchmarks: running a real `mitmdump -s addon/claudeflare.py`, enrolling
accounts, reading its flow log."""

import hashlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from claudeflare.accounts import Account, add_account_table, edit_accounts
from claudeflare.config import ensure_home
from claudeflare.credentials import Credential, CredentialStore

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon" / "claudeflare.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"
LISTENING = re.compile(rb" listening at (?:127\.0\.0\.1|\*):(\d+)\.")  # * : all interfaces

# Claude Code's system prompt as 2.1.197 sends it (contract §8): a billing-header block, then its
# identity. Subscriptions serve only Claude Code, so requests meant for an OAuth account carry it.
CLAUDE_CODE_SYSTEM = [
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.fa0; cc_entrypoint=cli;"},
    {
        "type": "text",
        "text": "You are Claude Code, Anthropic's official CLI for Claude.",
        "cache_control": {"type": "ephemeral"},
    },
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("process exited before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def add_account(home: Path, name: str, mode: str = "api-key", tier: int = 1, priority: int = 0, **secret) -> None:
    """Enrol an account the way the CLI does: secret in the store, table in accounts.toml."""
    ensure_home(home)
    if secret:
        CredentialStore(home).set_account(name, Credential(**secret))
    edit_accounts(home, lambda doc: add_account_table(doc, Account(name, mode, tier, priority)))


class Mitmdump:
    """A mitmdump subprocess on a free loopback port; its output goes to a log file."""

    def __init__(self, *args: str, log: Path, env: dict | None = None, addon: bool = True):
        self.port: int | None = None  # mitmdump picks a free one and says which: no race for it
        self.log = log
        self.args = [
            str(MITMDUMP),
            *(["-s", str(ADDON)] if addon else []),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            "0",
            # mitmproxy refuses an option set twice: a caller's own verbosity replaces this default.
            *([] if "termlog_verbosity=" in " ".join(args) else ["--set", "termlog_verbosity=info"]),
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> "Mitmdump":
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if found := LISTENING.search(self.log.read_bytes()[offset:]):
                self.port = int(found.group(1))
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mitmdump did not start:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


USAGE_READS = "claudeflare_usage_interval=300"  # the default: for the tests about usage reads


def claudeflare_proxy(home: Path, upstream: str, log: Path, *extra: str, env: dict | None = None) -> Mitmdump:
    """Usage reads are off unless `extra` sets their interval: the read at start would race a test's
    first requests (a spent account may then be moved away from before or after its 429)."""
    reads = [] if "claudeflare_usage_interval=" in " ".join(extra) else ["--set", "claudeflare_usage_interval=0"]
    return Mitmdump(
        "--set",
        f"claudeflare_home={home}",
        "--set",
        f"claudeflare_upstream={upstream}",
        *reads,
        *extra,
        log=log,
        env=env,
    )


def db_rows(home, where="1=1", expect=None, timeout=10.0):
    """Rows of the flow log, waiting (bounded) until `expect` rows are there."""
    path = home / "claudeflare.db"
    deadline = time.monotonic() + timeout
    while True:
        rows = []
        if path.exists():
            conn = sqlite3.connect(path)
            conn.row_factory = sqlite3.Row
            try:
                rows = [dict(r) for r in conn.execute(f"select * from requests where {where} order by started_at")]
            except sqlite3.OperationalError:
                pass
            finally:
                conn.close()
        if expect is None or len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def wait_until(predicate, timeout=5.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def key_for(name):
    return f"sk-ant-api03-{name}-" + hashlib.sha256(name.encode()).hexdigest()[:24]


def api_key_accounts(fake, home, *specs):
    """specs: (name, tier[, priority]) — enrolled in the proxy and known to the fake."""
    for name, tier, *priority in specs:
        fake.add_api_key(key_for(name), account=name)
        add_account(home, name, "api-key", tier, *priority, api_key=key_for(name))


CLAUDEFLARE = Path(sys.executable).parent / "claudeflare"


class Serve(Mitmdump):
    """`claudeflare serve --workers N` on a free loopback port; `start` returns once every worker listens."""

    def __init__(self, home: Path, upstream: str, log: Path, *extra: str, workers: int = 2, env: dict | None = None):
        super().__init__(log=log, env=env)
        self.workers = workers
        self.args = [
            str(CLAUDEFLARE),
            "--home",
            str(home),
            "serve",
            "--workers",
            str(workers),
            "--listen-port",
            "0",
            "--",
            "--set",
            "termlog_verbosity=info",
            "--set",
            f"claudeflare_upstream={upstream}",
            *extra,
        ]

    def start(self, timeout: float = 30) -> "Serve":
        super().start(timeout)
        if not wait_until(lambda: len(LISTENING.findall(self.log.read_bytes())) >= self.workers, timeout):
            self.stop()
            raise RuntimeError(f"not every worker listens:\n{self.output()}")
        return self

    def worker_pids(self) -> list[int]:
        import psutil

        return [child.pid for child in psutil.Process(self.proc.pid).children()]


class Load:
    """`clients` threads sending requests (half streamed) until stopped. After an error a client
    stops, unless `reconnect` (a worker of several may die under it): then it goes on with a new
    connection. `acknowledged`: (request-id, monotonic time it was complete) of every reply received
    whole; `errors`: the connection errors met."""

    def __init__(self, url: str, clients: int = 20, reconnect: bool = False, model: str = "claude-sonnet-4-6"):
        self.url, self.reconnect, self.model = url, reconnect, model
        self.acknowledged: list[tuple[str, float]] = []
        self.errors = 0
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(n,)) for n in range(clients)]
        for t in self.threads:
            t.start()

    def client(self, n: int) -> None:
        session = requests.Session()
        for i in range(2000):  # bounded, whatever happens
            if self.stopping.is_set():
                break
            stream = (n + i) % 2 == 0
            body = {
                "model": self.model,
                "max_tokens": 50,
                "stream": stream,
                "messages": [{"role": "user", "content": f"load {n} {i}"}],
            }
            try:
                reply = session.post(
                    f"{self.url}/v1/messages",
                    json=body,
                    timeout=10,
                    headers={"x-fake-tokens": "20", "x-fake-delay-ms": "1"},
                )
            except requests.RequestException:
                self.errors += 1
                session.close()
                if not self.reconnect:
                    return
                session = requests.Session()
                time.sleep(0.05)
                continue
            if reply.status_code == 200 and (not stream or reply.content.endswith(b'{"type":"message_stop"}\n\n')):
                self.acknowledged.append((reply.headers["request-id"], time.monotonic()))
        session.close()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)


def logged_ids(home: Path) -> list[str]:
    """Anthropic's request-id of every row in the flow log, after an integrity check."""
    conn = sqlite3.connect(home / "claudeflare.db")
    try:
        assert conn.execute("pragma integrity_check").fetchone() == ("ok",)
        return [r[0] for r in conn.execute("select request_id from requests where request_id is not null")]
    finally:
        conn.close()


class RedisServer:
    """A throwaway redis-server on a free loopback port, without persistence."""

    def __init__(self, tmp_path):
        self.port, self.dir = free_port(), tmp_path
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10, alive=lambda: self.proc.poll() is None)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def raw_stream(url: str, model: str) -> requests.Response:
    """A streamed /v1/messages request sent as raw HTTP (no SDK), its reply read whole."""
    body = {"model": model, "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    return requests.post(f"{url}/v1/messages", json=body, timeout=30)


def sse_events(text: str) -> list[str]:
    """The `event:` lines of an SSE body, in order."""
    return [line for line in text.splitlines() if line.startswith("event: ")]


def claude_code_turn(proxy, stream=False, tokens=10, session=None, model="claude-sonnet-4-6") -> requests.Response:
    """One turn of a Claude Code conversation (its system prompt; `session`: its session header),
    for a reply of `tokens` tokens from the fake upstream."""
    headers = {"x-fake-tokens": str(tokens)}
    if session:
        headers["x-claude-code-session-id"] = session
    body = {
        "model": model,
        "max_tokens": 100,
        "stream": stream,
        "system": CLAUDE_CODE_SYSTEM,
        "messages": [{"role": "user", "content": "hi"}],
    }
    return requests.post(f"{proxy.url}/v1/messages", json=body, headers=headers, timeout=30)
