"""Nothing unbounded before the client is known (issue #10, items 5, 7, 9), through a real mitmdump:
head size, refused bodies, slowloris, running out of file descriptors, big JSON bodies."""

import http.client
import json
import socket
import sys
import threading
import time

import psutil
import pytest
from click.testing import CliRunner

from claudeflare.cli import cli

from harness import api_key_accounts, claudeflare_proxy, db_rows, wait_until

MODEL = "claude-sonnet-4-6"
# Run mitmdump under a lower descriptor limit (soft and hard, so the proxy can't raise it).
NOFILE = (
    "import os, resource, sys; soft, hard = map(int, sys.argv[1].split(':')); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)); os.execv(sys.argv[2], sys.argv[2:])"
)


@pytest.fixture
def limited_proxy(tmp_path, fake):
    """start(home, nofile, *extra): a proxy whose open-file limit is `nofile` ("soft:hard", or both)."""
    started = []

    def start(home, nofile, *extra):
        proxy = claudeflare_proxy(home, fake.url, tmp_path / f"limited-{len(started)}.log", *extra)
        limit = nofile if isinstance(nofile, str) else f"{nofile}:{nofile}"
        proxy.args = [sys.executable, "-c", NOFILE, limit, *proxy.args]
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


def rss(proxy) -> int:
    return psutil.Process(proxy.proc.pid).memory_info().rss


def connect(port: int, timeout: float = 10, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def read_reply(s: socket.socket) -> bytes:
    """All the proxy sends until it closes (or resets) the connection."""
    reply = b""
    try:
        while chunk := s.recv(65536):
            reply += chunk
    except ConnectionResetError:
        pass
    return reply


def error_json(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


def messages_request(port: int, body: bytes, *headers: bytes) -> bytes:
    return (
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (port, len(body), b"".join(h + b"\r\n" for h in headers), body)
    )


def small_body(text: str = "hi") -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": text}]}).encode()


# --- item 5: head size, refused bodies -----------------------------------------------------------


def test_an_oversize_head_gets_431_at_the_cap_and_is_neither_kept_nor_logged(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home)
    before = rss(proxy)
    with connect(proxy.port) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Junk: ")
        try:
            for _ in range(256):  # up to 16 MiB of one header, never ended
                s.sendall(b"j" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused at the cap, long before the end
        reply = read_reply(s)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    payload = error_json(reply)
    assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert "claudeflare_max_head_kb" in payload["error"]["message"]
    assert rss(proxy) - before < 8 * 1024**2
    # A head cut off mid-way is logged in one bounded line, not verbatim.
    with connect(proxy.port) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nX-Junk: " + b"k" * 60_000)
        time.sleep(0.2)
    assert wait_until(lambda: "before completing request headers" in proxy.output())
    assert max(len(line) for line in proxy.output().splitlines()) < 1000
    # Served on: a normal request right after.
    with connect(proxy.port) as s:
        s.sendall(messages_request(proxy.port, small_body(), b"Connection: close"))
        assert read_reply(s).startswith(b"HTTP/1.1 200")


def test_a_chunk_size_line_that_never_ends_gets_400_at_the_cap(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home)
    before = rss(proxy)
    with connect(proxy.port) as s:
        s.sendall(
            b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nTransfer-Encoding: chunked\r\n\r\n" % proxy.port
        )
        try:
            for _ in range(256):  # up to 16 MiB of chunk size
                s.sendall(b"1" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = read_reply(s)
    assert reply.startswith(b"HTTP/1.1 400") and "chunk-size" in error_json(reply)["error"]["message"]
    assert rss(proxy) - before < 8 * 1024**2
    (row,) = db_rows(home, expect=1)
    assert "chunk-size" in row["error"] and fake.requests == []


def test_a_client_still_sending_a_body_over_the_limit_reads_the_413_not_a_reset(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home, "--set", "claudeflare_max_body_mb=1")
    for _ in range(3):  # as SDKs do: send the whole body, then read the reply
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        conn.request("POST", "/v1/messages", b"x" * (4 * 1024**2), {"content-type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 413 and json.loads(reply.read())["error"]["type"] == "request_too_large"
        conn.close()
    assert fake.requests == []
    assert all("body_size_limit" in r["error"] for r in db_rows(home, expect=3))


def test_data_sent_ahead_of_a_pending_reply_is_capped(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home)
    with connect(proxy.port) as s:
        s.sendall(messages_request(proxy.port, small_body(), b"x-fake-first-byte-ms: 3000"))
        started = time.monotonic()
        try:
            for _ in range(16):  # 1 MiB "pipelined" while the reply is pending
                s.sendall(b"p" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert read_reply(s) == b"" and time.monotonic() - started < 2.5  # closed, not buffered until the reply
    (row,) = db_rows(home, expect=1)
    assert row["error"]
    assert "crashed" not in proxy.output() and "Traceback" not in proxy.output()


def test_a_refused_request_is_answered_before_its_body_which_is_never_buffered(fake, home, start_proxy):
    api_key_accounts(fake, home, ("a", 1))
    CliRunner().invoke(cli, ["--home", str(home), "client-key", "create", "laptop"], catch_exceptions=False)
    proxy = start_proxy(home)
    before = rss(proxy)
    mib = 1024**2
    head = (
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nx-api-key: wrong\r\nExpect: 100-continue\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (proxy.port, 30 * mib)
    )
    conns = [connect(proxy.port) for _ in range(4)]
    try:
        for s in conns:
            s.sendall(head)
            s.settimeout(5)
            first = s.recv(65536)  # the refusal comes at once: no 100 Continue, no waiting for 30 MiB
            assert first.startswith(b"HTTP/1.1 401"), first[:100]
            assert b"connection: close" in first.lower()
        for s in conns:  # a client that sends its body anyway: read and dropped, never kept
            try:
                for _ in range(8):
                    s.sendall(b"x" * mib)
            except (BrokenPipeError, ConnectionResetError):
                pass
        assert rss(proxy) - before < 12 * mib
    finally:
        for s in conns:
            s.close()
    assert fake.requests == []
    proxy.stop()  # the gate logs its summary of refusals, at the latest when it stops
    assert "refused 4 request(s)" in proxy.output()
    assert db_rows(home) == []  # refused before the client is known: no rows (the gate's rule)


# --- item 7: slowloris, file descriptors ---------------------------------------------------------


def test_half_sent_heads_time_out_and_cannot_exhaust_descriptors(fake, home, limited_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = limited_proxy(
        home, 128, "--set", "claudeflare_head_timeout=2", "--set", "claudeflare_max_idle_conns_per_peer=40"
    )
    half = b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    slow = []
    try:
        for _ in range(150):  # from another address (loopback too): more than the descriptor limit allows
            try:
                s = connect(proxy.port, source="127.0.0.2")
            except ConnectionRefusedError:
                continue  # a full accept queue on a loaded machine: refused before it was a connection
            try:
                s.sendall(half)
            except OSError:
                pass  # refused at once: over the cap
            slow.append(s)
        started = time.monotonic()
        with connect(proxy.port) as s:  # a real client is still served
            s.sendall(messages_request(proxy.port, small_body(), b"Connection: close"))
            assert read_reply(s).startswith(b"HTTP/1.1 200")
        tunnel = connect(proxy.port, source="127.0.0.4")  # a CONNECT, then no TLS handshake
        slow.append(tunnel)
        target = fake.url.removeprefix("http://").encode()  # loopback: the fake
        tunnel.sendall(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target))
        assert tunnel.recv(65536).startswith(b"HTTP/1.1 200")
        trickle = connect(proxy.port, source="127.0.0.3")
        slow.append(trickle)
        closed = False
        for byte in b"X-Trickle: " + b"t" * 40:  # a byte every 0.2 s: never inactive, never done
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
        assert closed or trickle.recv(1) == b""
        assert time.monotonic() - started < 6
        for s in slow:  # every half-sent head, and the idle tunnel, has been closed by now
            s.settimeout(3)
            assert read_reply(s) == b""
    finally:
        for s in slow:
            s.close()
    assert "Too many open files" not in proxy.output()


def test_a_burst_past_the_per_peer_cap_that_sends_its_heads_at_once_is_served(fake, home, start_proxy):
    """500 Claude Code streams opened at once wait, for a moment, as idle connections would: past
    the cap they get GRACE to send a head, and do (they used to be reset at once)."""
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home, "--set", "claudeflare_max_idle_conns_per_peer=20")
    burst = [connect(proxy.port) for _ in range(60)]  # all open before any head: 40 past the cap
    try:
        for n, s in enumerate(burst):
            s.sendall(messages_request(proxy.port, small_body(f"burst {n}"), b"Connection: close"))
        replies = [read_reply(s) for s in burst]
    finally:
        for s in burst:
            s.close()
    assert [r[:12] for r in replies] == [b"HTTP/1.1 200"] * 60
    late = [connect(proxy.port) for _ in range(30)]  # past the cap, and no head: closed within GRACE
    try:
        started = time.monotonic()
        for s in late[20:]:
            s.settimeout(5)
            assert read_reply(s) == b""
        assert time.monotonic() - started < 3
        late[0].sendall(messages_request(proxy.port, small_body(), b"Connection: close"))
        assert read_reply(late[0]).startswith(b"HTTP/1.1 200")  # one within the cap keeps its time
    finally:
        for s in late:
            s.close()
    assert "connections refused: too many are open without a request" in proxy.output()


def test_a_reply_outlasting_the_head_timeout_is_not_cut_and_the_idle_connection_closes_after_it(
    fake, home, start_proxy
):
    api_key_accounts(fake, home, ("a", 1))
    proxy = start_proxy(home, "--set", "claudeflare_head_timeout=1")
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    body = json.dumps(
        {"model": MODEL, "max_tokens": 30, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    for _ in range(2):  # twice on one kept-alive connection: the deadline starts again after each reply
        conn.request(
            "POST",
            "/v1/messages",
            body,
            {"content-type": "application/json", "x-fake-tokens": "15", "x-fake-delay-ms": "100"},
        )
        reply = conn.getresponse()
        assert reply.status == 200 and b"message_stop" in reply.read()  # 1.5 s of stream, whole
        time.sleep(0.5)
    started = time.monotonic()
    assert conn.sock.recv(1) == b""  # idle: closed a head timeout after the last reply
    assert time.monotonic() - started < 2
    conn.close()
    assert [r["status"] for r in db_rows(home, expect=2)] == [200, 200]


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(home, limited_proxy):
    proxy = limited_proxy(home, "256:4096")
    assert psutil.Process(proxy.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (4096, 4096)


def test_running_out_of_descriptors_logs_one_line_not_a_traceback_a_second(fake, home, limited_proxy):
    api_key_accounts(fake, home, ("a", 1))
    proxy = limited_proxy(home, 64, "--set", "claudeflare_head_timeout=3")
    idle = [connect(proxy.port) for _ in range(100)]  # beyond 64 descriptors: accept() fails, again and again
    try:
        time.sleep(3.5)
    finally:
        for s in idle:
            s.close()
    output = proxy.output()
    assert "Traceback" not in output and "socket.accept() out of system resource" not in output
    assert output.count("out of file descriptors") == 1
    with connect(proxy.port) as s:  # the descriptors came back: served again
        s.sendall(messages_request(proxy.port, small_body(), b"Connection: close"))
        assert read_reply(s).startswith(b"HTTP/1.1 200")


# --- item 9: big JSON bodies off the loop --------------------------------------------------------


def big_body(mib: int) -> bytes:
    """A conversation start of `mib` MiB in many small blocks, as a pasted log or a long chat would be."""
    block = {"type": "text", "text": "All work and no play makes Jack a dull boy. " * 2}
    count = mib * 1024**2 // len(json.dumps(block))
    return json.dumps(
        {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": [block] * count}]}
    ).encode()


def test_big_json_bodies_do_not_stall_the_event_loop(home, start_proxy):
    proxy = start_proxy(home)  # no account: each big request is parsed (session, summary) and refused with 503
    body = big_body(16)
    latencies, done = [], threading.Event()

    def probe():
        with connect(proxy.port) as s:
            while not done.is_set():  # Claude Code's warm-up, answered by the proxy itself
                started = time.monotonic()
                s.sendall(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % proxy.port)
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
                latencies.append(time.monotonic() - started)
                time.sleep(0.01)

    def send_big():
        with connect(proxy.port, timeout=60) as s:
            s.sendall(messages_request(proxy.port, body, b"Connection: close"))
            replies.append(read_reply(s))

    replies: list[bytes] = []
    prober = threading.Thread(target=probe)
    prober.start()
    senders = [threading.Thread(target=send_big) for _ in range(3)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(60)
    time.sleep(0.3)
    done.set()
    prober.join(10)
    assert [r.split(b"\r\n", 1)[0] for r in replies] == [b"HTTP/1.1 503 Service Unavailable"] * 3
    print(f"probe: {len(latencies)} requests, slowest {[round(x * 1000) for x in sorted(latencies)[-5:]]} ms")
    assert max(latencies) < 0.5  # about 1.5 s when parsed on the loop
    rows = db_rows(home, "status = 503", expect=3)
    assert [r["model"] for r in rows] == [MODEL] * 3  # the big bodies are still read, off the loop
