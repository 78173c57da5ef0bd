"""Stopping the proxy under load: SIGTERM loses no acknowledged row; kill -9 leaves a database that
opens cleanly and lacks at most the rows of the last second."""

import signal
import sqlite3
import threading
import time

import requests

from harness import api_key_accounts, claudeflare_proxy

MODEL = "claude-sonnet-4-6"
CLIENTS = 20


class Load:
    """CLIENTS threads sending requests (half streamed) until stopped or the proxy goes away.
    `acknowledged`: (request-id, monotonic time it was complete) of every reply received whole."""

    def __init__(self, proxy):
        self.url = proxy.url
        self.acknowledged: list[tuple[str, float]] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(n,)) for n in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def client(self, n: int) -> None:
        with requests.Session() as session:
            for i in range(2000):  # bounded, whatever happens
                if self.stopping.is_set():
                    return
                stream = (n + i) % 2 == 0
                body = {
                    "model": MODEL,
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
                    return
                if reply.status_code == 200 and (not stream or reply.content.endswith(b'{"type":"message_stop"}\n\n')):
                    self.acknowledged.append((reply.headers["request-id"], time.monotonic()))

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)


def logged_ids(home) -> list[str]:
    conn = sqlite3.connect(home / "claudeflare.db")
    try:
        assert conn.execute("pragma integrity_check").fetchone() == ("ok",)
        return [r[0] for r in conn.execute("select request_id from requests where request_id is not null")]
    finally:
        conn.close()


def test_sigterm_under_load_loses_no_acknowledged_row(fake, home, tmp_path):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    proxy = claudeflare_proxy(home, fake.url, tmp_path / "mitm.log", "--set", "flow_detail=0").start()
    load = Load(proxy)
    time.sleep(3)
    assert proxy.stop(signal.SIGTERM) is not None
    load.stop()
    ids = logged_ids(home)
    assert len(load.acknowledged) > 100 and len(ids) == len(set(ids))
    assert {rid for rid, _ in load.acknowledged} <= set(ids)


def test_kill_9_under_load_leaves_a_clean_database_short_of_the_last_second(fake, home, tmp_path):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    proxy = claudeflare_proxy(home, fake.url, tmp_path / "mitm.log", "--set", "flow_detail=0").start()
    load = Load(proxy)
    time.sleep(3)
    killed_at = time.monotonic()
    proxy.stop(signal.SIGKILL)
    load.stop()
    ids = set(logged_ids(home))
    older = {rid for rid, at in load.acknowledged if at < killed_at - 1.0}
    assert len(older) > 100 and older <= ids
    lost = [at for rid, at in load.acknowledged if rid not in ids]
    assert all(at >= killed_at - 1.0 for at in lost)
