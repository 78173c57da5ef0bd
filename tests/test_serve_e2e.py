"""`claudeflare serve --workers N` (issue #14): real workers behind one port, a real supervisor, one
flow log written by all of them."""

import signal
import socket
import subprocess
import threading
import time
import uuid

import psutil
import pytest
import requests

from harness import (
    CLAUDEFLARE,
    LISTENING,
    Load,
    Serve,
    api_key_accounts,
    db_rows,
    free_port,
    logged_ids,
    wait_until,
)

MODEL = "claude-sonnet-4-6"
CLIENTS = 20


@pytest.fixture
def start_serve(tmp_path, fake):
    started = []

    def start(home, *extra, workers=2):
        serve = Serve(
            home, fake.url, tmp_path / f"serve-{len(started)}.log", "--set", "flow_detail=0", *extra, workers=workers
        )
        started.append(serve)
        return serve.start()

    yield start
    for serve in started:
        serve.stop()


def connections_per_worker(serve: Serve) -> list[int]:
    """Client connections each worker holds on the shared port."""
    return [
        sum(
            1
            for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == serve.port
        )
        for pid in serve.worker_pids()
    ]


def test_two_workers_share_one_port_and_both_serve(start_serve, fake, home):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    serve = start_serve(home)
    assert len(serve.worker_pids()) == 2
    results, held = [], []

    def slow_stream(n):
        body = {
            "model": MODEL,
            "max_tokens": 50,
            "stream": True,
            "messages": [{"role": "user", "content": f"slow {n}"}],
        }
        reply = requests.post(
            f"{serve.url}/v1/messages", json=body, timeout=20, headers={"x-fake-tokens": "40", "x-fake-delay-ms": "50"}
        )
        results.append((reply.status_code, reply.content.endswith(b'{"type":"message_stop"}\n\n')))

    threads = [threading.Thread(target=slow_stream, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    # The 20 streams are open together for 2 s: the kernel has spread their connections over both.
    assert wait_until(lambda: held.append(connections_per_worker(serve)) or sum(held[-1]) == CLIENTS, 10), held
    for t in threads:
        t.join(30)
    assert all(n > 0 for n in held[-1]), held[-1]
    assert results == [(200, True)] * CLIENTS
    assert len(db_rows(home, expect=CLIENTS)) == CLIENTS


def free_port_pair() -> int:
    """A loopback port free together with the next one."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port
    raise RuntimeError("no two free ports in a row")


def test_each_worker_serves_its_own_metrics_on_the_port_plus_its_number(start_serve, fake, home):
    api_key_accounts(fake, home, ("a", 1))
    port = free_port_pair()
    serve = start_serve(home, "--set", f"claudeflare_metrics_port={port}")

    def counted(p) -> float | None:
        try:
            text = requests.get(f"http://127.0.0.1:{p}/metrics", timeout=5).text
        except requests.ConnectionError:
            return None  # that worker is still starting
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("claudeflare_requests_total{")
        )

    # Both workers up, each on its own port: the second did not collide with the first.
    assert wait_until(lambda: counted(port) == counted(port + 1) == 0, timeout=20), serve.output()
    assert len(serve.worker_pids()) == 2
    for n in range(CLIENTS):
        body = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": f"count {n}"}]}
        assert requests.post(f"{serve.url}/v1/messages", json=body, timeout=10).status_code == 200
    # Each worker counts only what it served; scraped apart, they add up to every request.
    assert wait_until(lambda: counted(port) + counted(port + 1) == CLIENTS, timeout=10)


def test_a_conversations_turns_work_on_either_worker(start_serve, fake, home):
    api_key_accounts(fake, home, ("a", 1))
    serve = start_serve(home)
    session_id = str(uuid.uuid4())
    messages = []
    for turn in range(8):  # each turn on a new connection, so either worker may take it
        messages.append({"role": "user", "content": f"turn {turn}"})
        reply = requests.post(
            f"{serve.url}/v1/messages",
            timeout=10,
            headers={"x-claude-code-session-id": session_id},
            json={"model": MODEL, "max_tokens": 50, "messages": messages},
        )
        assert reply.status_code == 200, reply.text
        messages.append({"role": "assistant", "content": reply.json()["content"]})
    rows = db_rows(home, expect=8)
    assert len(rows) == 8 and {r["status"] for r in rows} == {200} and {r["account"] for r in rows} == {"a"}


def test_a_worker_killed_under_load_is_restarted_and_the_survivors_rows_are_all_there(start_serve, fake, home):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    serve = start_serve(home)
    victim, survivor = serve.worker_pids()
    load = Load(serve.url, reconnect=True)
    time.sleep(2)
    killed_at = time.monotonic()
    psutil.Process(victim).send_signal(signal.SIGKILL)
    # Restarted: a new worker beside the survivor, listening on the same port.
    assert wait_until(lambda: len(set(serve.worker_pids()) - {victim, survivor}) == 1, 10), serve.output()
    assert wait_until(lambda: len(LISTENING.findall(serve.log.read_bytes())) == 3, 20), serve.output()
    assert f"(pid {victim}) exited with -9; restarting" in serve.output()
    assert survivor in serve.worker_pids()
    time.sleep(2)
    load.stop()
    assert serve.stop(signal.SIGTERM) == 0
    ids = set(logged_ids(home))
    after = {rid for rid, at in load.acknowledged if at > killed_at + 0.5}
    assert len(after) > 50 and after <= ids  # the survivor (and the new worker) served on, and logged it all
    # Only the killed worker's last half-second batch may be missing, so only replies acknowledged
    # around the kill.
    lost = [at for rid, at in load.acknowledged if rid not in ids]
    assert all(killed_at - 1.0 <= at <= killed_at + 0.5 for at in lost), (killed_at, lost)


def test_sigterm_stops_every_worker_and_every_acknowledged_row_is_written(start_serve, fake, home):
    api_key_accounts(fake, home, ("a", 1), ("b", 1))
    serve = start_serve(home)
    workers = serve.worker_pids()
    load = Load(serve.url, reconnect=True)
    time.sleep(3)
    assert serve.stop(signal.SIGTERM) == 0
    load.stop()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers)
    ids = logged_ids(home)
    assert len(load.acknowledged) > 100 and len(ids) == len(set(ids))
    assert {rid for rid, _ in load.acknowledged} <= set(ids)
    assert serve.output().count("stopped (0)") == 2


def test_workers_that_cannot_start_stop_serve_with_an_error(home, tmp_path, fake):
    serve = Serve(home, fake.url, tmp_path / "serve.log", "--set", "claudeflare_strategy=nonsense")
    result = subprocess.run(serve.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout.count("claudeflare_strategy") >= 3, result.stdout  # the workers said why
    assert "times in a row at start: stopping" in result.stdout


def test_serve_refuses_to_be_given_the_listening_address_twice(home):
    result = subprocess.run(
        [str(CLAUDEFLARE), "--home", str(home), "serve", "--", "--listen-port", "9"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "'--listen-port' is set by `claudeflare serve`" in result.stderr


def test_a_killed_supervisor_takes_its_workers_with_it_and_their_rows_are_written(start_serve, fake, home):
    api_key_accounts(fake, home, ("a", 1))
    serve = start_serve(home)
    workers = serve.worker_pids()
    for n in range(4):
        assert (
            requests.post(
                f"{serve.url}/v1/messages",
                timeout=10,
                json={"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": f"hi {n}"}]},
            ).status_code
            == 200
        )
    serve.stop(signal.SIGKILL)
    # Each worker got SIGTERM from the kernel (PR_SET_PDEATHSIG), so none holds the port, and they wrote their rows.
    assert wait_until(
        lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers),
        20,
    )
    assert len(db_rows(home, expect=4)) == 4
