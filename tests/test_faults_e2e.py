"""Faults through a real proxy: the upstream failing in each way the contract allows, the flow log's
database locked or its disk full, accounts.toml broken while running.

Each time: flows beside the faulty one are served, the client of the faulty one gets Anthropic's
error shape or a stream that ends (never a hang), and every row that can be written is written once
the fault clears."""

import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import requests
from test_failover_e2e import assert_nothing_in_flight

from fake_anthropic import FakeAnthropic
from harness import api_key_accounts, db_rows, free_port, key_for, wait_until

MODEL = "claude-sonnet-4-6"
FAST_RETRY = ("--set", "claudeflare_retry_delay_ms=50", "--set", "claudeflare_retry_backoff=2")


def body(stream: bool) -> dict:
    return {"model": MODEL, "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


def assert_anthropic_error(reply: requests.Response, status: int, kind: str, content: bytes | None = None) -> None:
    assert reply.status_code == status and reply.headers["content-type"] == "application/json"
    data = json.loads(reply.content if content is None else content)
    assert data["type"] == "error" and data["error"]["type"] == kind and data["error"]["message"]


@contextmanager
def other_traffic(proxy, limit: int = 400):
    """Plain requests on their own connection while the fault happens; yields their statuses."""
    statuses: list[int] = []
    stop = threading.Event()

    def run():
        with requests.Session() as session:
            while not stop.is_set() and len(statuses) < limit:
                statuses.append(session.post(f"{proxy.url}/v1/messages", json=body(False), timeout=10).status_code)
                time.sleep(0.01)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        thread.join(30)


def read_all(reply: requests.Response) -> tuple[bytes, str | None]:
    """Everything the client receives, and how the stream ended: None when whole."""
    received = b""
    try:
        for chunk in reply.iter_content(chunk_size=None):
            received += chunk
    except requests.exceptions.RequestException as e:
        return received, type(e).__name__
    return received, None


def test_refused_connections_get_anthropic_errors_until_the_upstream_is_back(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    port = free_port()
    proxy = start_proxy(home, *FAST_RETRY, upstream=f"http://127.0.0.1:{port}")
    # The first refusal is mitmproxy's own reply (its connection attempt failed); later ones come
    # from the retrying client: both in Anthropic's shape, not an HTML page.
    for _ in range(2):
        assert_anthropic_error(
            requests.post(f"{proxy.url}/v1/messages", json=body(False), timeout=10), 502, "api_error"
        )
    with FakeAnthropic(port=port) as revived:
        revived.add_api_key(key_for("a"), account="a")
        reply = requests.post(f"{proxy.url}/v1/messages", json=body(True), timeout=10)
        assert reply.status_code == 200 and "message_stop" in reply.text
    rows = db_rows(home, expect=3)
    assert [bool(r["error"]) for r in rows] == [True, True, False] and rows[2]["output_tokens"] == 10
    assert_nothing_in_flight(home)


FAULTS = {
    # fault: (stream, ends like this for the client, wrote usage)
    "reset-mid-stream": (True, "ChunkedEncodingError", False),
    "stall": (True, "ChunkedEncodingError", False),
    "stall-mid-stream": (True, "ChunkedEncodingError", False),
    "malformed-sse": (True, None, True),  # garbage is forwarded as is; the usage around it still counts
    "bad-content-length": (False, None, False),  # a 502 in Anthropic's shape: nothing had reached the client
}


@pytest.mark.parametrize("fault", FAULTS)
def test_upstream_faults_end_cleanly_and_are_logged(fake, home, start_proxy, fault):
    stream, ending, counted = FAULTS[fault]
    api_key_accounts(fake, home, ("a", 1))
    # A stalled upstream ends with mitmproxy's inactivity timeout (600 s by default, as Anthropic's SDKs).
    proxy = start_proxy(home, "--set", "tcp_timeout=3")
    with other_traffic(proxy) as statuses:
        started = time.monotonic()
        reply = requests.post(
            f"{proxy.url}/v1/messages",
            json=body(stream),
            stream=True,
            timeout=30,
            headers={"x-fake-fault": fault, "x-fake-tokens": "30"},
        )
        received, how = read_all(reply)
        took = time.monotonic() - started
        time.sleep(0.3)  # other flows go on after the fault too
    assert how == ending and took < 10
    if fault == "bad-content-length":
        assert_anthropic_error(reply, 502, "api_error", received)
    elif fault == "malformed-sse":
        assert reply.status_code == 200 and received.endswith(b'data: {"type":"message_stop"}\n\n')
    assert statuses and set(statuses) == {200}
    rows = db_rows(home, expect=len(statuses) + 1)
    assert len(rows) == len(statuses) + 1
    (faulty,) = [r for r in rows if r["stream"] == stream and (r["error"] or r["output_tokens"] == 30)]
    assert bool(faulty["error"]) != counted and (faulty["output_tokens"] == 30) == counted
    assert faulty["status"] == reply.status_code  # the status the client got (502: mitmproxy's, not the upstream's 200)
    assert all(not r["error"] and r["status"] == 200 for r in rows if r is not faulty)
    assert_nothing_in_flight(home)


def test_client_leaving_mid_stream_is_logged_and_the_rest_served(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home)
    with other_traffic(proxy) as statuses:
        reply = requests.post(
            f"{proxy.url}/v1/messages",
            json=body(True),
            stream=True,
            timeout=10,
            headers={"x-fake-tokens": "100", "x-fake-delay-ms": "20"},
        )
        next(reply.iter_content(chunk_size=None))
        reply.close()
        time.sleep(0.5)
    assert statuses and set(statuses) == {200}
    rows = db_rows(home, expect=len(statuses) + 1)
    (left,) = [r for r in rows if r["stream"]]
    assert left["error"] and len(rows) == len(statuses) + 1
    assert_nothing_in_flight(home)


HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("begin exclusive")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("rollback")
"""


def test_database_locked_by_another_process_for_10s(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home)
    session = requests.Session()
    assert session.post(f"{proxy.url}/v1/messages", json=body(False), timeout=10).status_code == 200
    assert len(db_rows(home, expect=1)) == 1
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(home / "claudeflare.db"), "10"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        locked_at = time.monotonic()
        for i in range(30):
            started = time.monotonic()
            assert session.post(f"{proxy.url}/v1/messages", json=body(i % 2 == 0), timeout=10).status_code == 200
            assert time.monotonic() - started < 2  # the proxy does not wait for the database
        assert time.monotonic() - locked_at < 8 and len(db_rows(home, timeout=0)) == 1
        assert holder.wait(20) == 0
    finally:
        holder.kill()
    rows = db_rows(home, expect=31, timeout=15)
    assert len(rows) == 31 and len({r["id"] for r in rows}) == 31
    # The writer logs it just after the rows, through mitmproxy's event loop: not instantly.
    assert "flow log write failed" in proxy.output() and wait_until(lambda: "flow log writable again" in proxy.output())


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs (tests run as root, as CI does here)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_disk_full_keeps_rows_until_there_is_room(fake, tiny_disk, start_proxy):
    home = tiny_disk / "home"
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home)
    session = requests.Session()
    assert session.post(f"{proxy.url}/v1/messages", json=body(False), timeout=10).status_code == 200
    assert len(db_rows(home, expect=1)) == 1
    filler = tiny_disk / "filler"
    fill(filler)
    for i in range(40):
        assert session.post(f"{proxy.url}/v1/messages", json=body(i % 2 == 0), timeout=10).status_code == 200
    assert wait_until(lambda: "flow log write failed" in proxy.output(), timeout=5)
    filler.unlink()
    rows = db_rows(home, expect=41, timeout=15)
    assert len(rows) == 41 and len({r["id"] for r in rows}) == 41
    assert wait_until(lambda: "flow log writable again" in proxy.output())


def test_corrupted_accounts_file_while_serving(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    proxy = start_proxy(home, "--set", "claudeflare_strategy=round-robin")
    accounts = home / "accounts.toml"
    good = accounts.read_text()
    with other_traffic(proxy) as statuses:
        time.sleep(0.3)
        accounts.write_text(good + "\n[[accounts]\nname = 'half written\n")
        assert wait_until(lambda: "keeping the last good accounts" in proxy.output())
        served = len(statuses)
        time.sleep(0.5)
        assert len(statuses) > served  # still serving, on both accounts
        accounts.write_text(good.replace('name = "a"', 'name = "a"\npaused = true'))
        assert wait_until(lambda: "accounts file fixed" in proxy.output())
        fixed = len(statuses)
        time.sleep(0.5)
    assert set(statuses) == {200}
    rows = db_rows(home, expect=len(statuses))
    assert len(rows) == len(statuses)
    assert {r["account"] for r in rows[:served]} == {"a", "b"}
    assert {r["account"] for r in rows[fixed + 2 :]} == {"b"}
    assert "line" in proxy.output().split("keeping the last good accounts", 1)[1].splitlines()[0]


def test_started_on_a_broken_accounts_file_it_says_so_until_fixed(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    accounts = home / "accounts.toml"
    good = accounts.read_text()
    accounts.write_text(good.replace('mode = "api-key"', 'mode = "api-key'))
    proxy = start_proxy(home)
    reply = requests.post(f"{proxy.url}/v1/messages", json=body(False), timeout=10)
    assert_anthropic_error(reply, 503, "api_error")
    assert "accounts.toml" in reply.json()["error"]["message"] and "line" in reply.json()["error"]["message"]
    accounts.write_text(good)
    assert wait_until(
        lambda: requests.post(f"{proxy.url}/v1/messages", json=body(False), timeout=10).status_code == 200
    )
    assert proxy.proc.poll() is None


def test_started_on_a_non_utf8_accounts_file_its_503_names_the_file_and_line(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    accounts = home / "accounts.toml"
    good = accounts.read_bytes()
    accounts.write_bytes(good + b"# caf\xe9\n")
    proxy = start_proxy(home)
    reply = requests.post(f"{proxy.url}/v1/messages", json=body(False), timeout=10)
    assert_anthropic_error(reply, 503, "api_error")
    assert f"{accounts} line {good.count(b'\n') + 1}: not UTF-8" in reply.json()["error"]["message"]
    accounts.write_bytes(good)
    assert wait_until(
        lambda: requests.post(f"{proxy.url}/v1/messages", json=body(False), timeout=10).status_code == 200
    )


def test_a_retried_reply_over_the_body_cap_is_refused_like_mitmproxy_would(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    proxy = start_proxy(home, "--set", "claudeflare_max_body_mb=1", "--set", "claudeflare_strategy=round-robin")
    fake.set_fault("*", "status:429-windowless", 1)  # the first attempt fails over: the retry is fetched by our client
    reply = requests.post(
        f"{proxy.url}/v1/messages", json=body(True), timeout=30, headers={"x-fake-tokens": "100000"}
    )  # about 10 MB of events
    assert_anthropic_error(reply, 502, "api_error")
    assert "claudeflare_max_body_mb" in reply.json()["error"]["message"]
    (row,) = db_rows(home, expect=1)
    assert row["status"] == 502 and row["attempts"] == 2
    fake.set_fault("*", "status:429-windowless", 1)
    small = requests.post(f"{proxy.url}/v1/messages", json=body(True), timeout=30)  # under the cap: served whole
    assert small.status_code == 200 and "message_stop" in small.text
    assert_nothing_in_flight(home)
