"""`claudeflare serve --workers N`: N `mitmdump -s addon/claudeflare.py` processes on one port,
supervised.

One mitmdump runs on one core. The workers (worker.py: mitmdump itself) all listen on the same
address with SO_REUSEPORT (`hardening.share_listening_port`), and the kernel spreads new connections over them: no balancer process,
no extra hop. They share the home folder as separate mitmdumps always could: accounts,
credentials (a file lock for refreshes) and the flow log (SQLite in WAL mode, each its own writer,
rows kept and retried while the database is busy).

The supervisor holds the port (a bound SO_REUSEPORT socket that never listens, so it takes no
connection) from start to end: `--listen-port 0` picks a free one, and no other program can take
it while a worker restarts. A worker that exits is started again after a backoff; one that keeps
failing at start (a bad option) stops them all, with a non-zero exit. SIGTERM or SIGINT is passed
to every worker, which writes its pending rows before it exits.
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import WORKER_ENV

# addon/claudeflare.py: a link to it in a checkout, a copy of it in an installed wheel.
ADDON = Path(__file__).parent / "entry" / "claudeflare.py"
# Options the supervisor sets for every worker; mitmdump refuses an option given twice.
OWN_OPTIONS = ("-p", "--listen-host", "--listen-port", "listen_host=", "listen_port=")
START_GRACE = 5.0  # a worker that exits sooner failed to start
MAX_FAILED_STARTS = 3  # in a row, for one worker: then give up
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0  # seconds before a restart, doubling per failed start
STOP_TIMEOUT = 30.0  # for all workers to write their rows and exit after SIGTERM, then SIGKILL
POLL = 0.1


class ServeError(Exception):
    """A setting the supervisor cannot run with; the message says which."""


def check_mitmdump_args(args: list[str]) -> None:
    for arg in args:
        if arg.startswith(OWN_OPTIONS):
            raise ServeError(
                f"{arg.split('=', 1)[0]!r} is set by `claudeflare serve` (use --listen-host / --listen-port before --)"
            )


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, never listening SO_REUSEPORT socket: the workers join it on the same port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ServeError(f"cannot listen on {host or '*'}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host or '*'}:{port}: {e.strerror or e}") from None
    return sock


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, however (Linux's PR_SET_PDEATHSIG),
    so that a killed supervisor leaves no worker holding the port."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Worker:
    number: int
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    failed_starts: int = 0
    restart_at: float = 0.0


class Supervisor:
    def __init__(self, command: list[str], workers: int, env: dict[str, str] | None = None, say=print) -> None:
        self.command = command
        self.workers = [Worker(n) for n in range(1, workers + 1)]
        self.env = env
        self.say = say
        self.stopping = False
        self.failed = False

    def run(self) -> int:
        """Until SIGTERM or SIGINT (0), or until a worker keeps failing at start (1)."""
        handlers = {sig: signal.signal(sig, self.stop_soon) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self.stopping:
                now = time.monotonic()
                for worker in self.workers:
                    if worker.proc is None and now >= worker.restart_at:
                        self.start(worker)
                    elif worker.proc is not None and worker.proc.poll() is not None:
                        self.exited(worker, now)
                time.sleep(POLL)
        finally:
            self.stop_all()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return 1 if self.failed else 0

    def stop_soon(self, signum, frame) -> None:
        self.stopping = True

    def start(self, worker: Worker) -> None:
        linux = sys.platform.startswith("linux")
        env = {**(os.environ if self.env is None else self.env), WORKER_ENV: str(worker.number)}
        worker.proc = subprocess.Popen(self.command, env=env, preexec_fn=die_with_parent if linux else None)
        worker.started_at = time.monotonic()
        self.say(f"claudeflare serve: worker {worker.number} started (pid {worker.proc.pid})")

    def exited(self, worker: Worker, now: float) -> None:
        code, pid = worker.proc.returncode, worker.proc.pid
        worker.proc = None
        worker.failed_starts = worker.failed_starts + 1 if now - worker.started_at < START_GRACE else 0
        if worker.failed_starts >= MAX_FAILED_STARTS:
            self.say(
                f"claudeflare serve: worker {worker.number} (pid {pid}) exited with {code}, "
                f"{worker.failed_starts} times in a row at start: stopping (its log says why)"
            )
            self.failed = self.stopping = True
            return
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**worker.failed_starts)
        worker.restart_at = now + delay
        self.say(f"claudeflare serve: worker {worker.number} (pid {pid}) exited with {code}; restarting in {delay:g} s")

    def stop_all(self) -> None:
        running = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for worker in running:
            worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker in running:
            try:
                code = worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                code = worker.proc.wait()
                self.say(
                    f"claudeflare serve: worker {worker.number} (pid {worker.proc.pid}) did not stop "
                    f"within {STOP_TIMEOUT:g} s: killed"
                )
            else:
                self.say(f"claudeflare serve: worker {worker.number} (pid {worker.proc.pid}) stopped ({code})")


def serve(workers: int, host: str, port: int, mitmdump_args: list[str], env: dict[str, str], say=print) -> int:
    """Run `workers` mitmdumps on host:port until stopped; the exit code for the command."""
    check_mitmdump_args(mitmdump_args)
    reserved = reserve_port(host, port)
    try:
        port = reserved.getsockname()[1]
        # mitmdump, with the port shared (worker.py)
        command = [
            sys.executable,
            "-m",
            "claudeflare.worker",
            "-s",
            str(ADDON),
            "--listen-host",
            host,
            "--listen-port",
            str(port),
            *mitmdump_args,
        ]
        say(f"claudeflare serve: {workers} worker(s) on {host or '*'}:{port}")
        return Supervisor(command, workers, env, say).run()
    finally:
        reserved.close()
