"""Claudeflare against the pools people would pick instead, on the same fake upstream, in one run.

    .venv/bin/python benchmarks/peers.py [--scratch DIR] [--rounds 3] [--workers 2] [--requests 300]
        [--concurrency 10] [--slow-start 50] [--slow-max 800] [--skip-install]

Installs into a scratch folder (default: a new temporary one; never inside the repository):
- better-ccflare, from npm (`npm install better-ccflare@VERSION`): the package ships one compiled
  Bun executable (dist/better-ccflare), so no Bun runtime is needed. Its account is an
  "anthropic-compatible" API-key account whose endpoint is the fake upstream;
- LiteLLM's proxy, `pip install 'litellm[proxy]'` into its own virtualenv, with a config.yaml that
  routes the model to the anthropic provider at the fake upstream, one worker (its default).
Then it starts the fake upstream (tests/fake_anthropic.py) with one API key and, behind it, bare
mitmdump (reverse mode), Claudeflare with 1 and with N workers (`claudeflare serve`),
better-ccflare and LiteLLM, all on loopback with the same key, and in each round runs the same load
against each, the order rotating every round: --requests streamed /v1/messages replies of 10
tokens, --concurrency at a time on keep-alive connections, from a load-generator process
(benchmarks/scale.py's). Per target: requests per second, p50/p99 time to first byte, and the CPU
time of the target's processes (psutil, the whole process tree) per request. Medians over rounds.
Then, once per target, slow streams held (scale.py's measure: S streams of --slow-tokens tokens at
1 token / 50 ms opened together, S doubling from --slow-start to --slow-max; held when every stream
ends whole and the p99 of the added inter-event delay is under 50 ms), after one burst not counted.
A peer that cannot be installed or started here is reported as "not run here: <reason>".
Every process it started is stopped at the end, also on Ctrl-C or failure. The scratch folder is
kept (its path is printed first), so a later run can reuse it with --scratch DIR --skip-install.
"""

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_proxy import KEY, start_fake  # noqa: E402
from scale import ONE_PEER, measure_slow, measure_throughput, try_slow  # noqa: E402

from harness import Mitmdump, Serve, add_account, free_port, wait_for_port  # noqa: E402

BETTER_CCFLARE = "better-ccflare@3.5.4"  # the accounts row below is this version's schema
MODEL = "claude-sonnet-4-5-20250929"  # bench_proxy.BODY's
QUIET = ("--set", "flow_detail=0")


class NotRunHere(Exception):
    """A peer that cannot be installed or started on this machine; the message says why."""


def run(cmd: list[str], what: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NotRunHere(f"{what}: {e}") from None
    if done.returncode:
        raise NotRunHere(f"{what} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    return done


# --- installing (into the scratch folder) ---


def install_better_ccflare(scratch: Path, skip: bool) -> Path:
    prefix = scratch / "better-ccflare"
    binary = prefix / "node_modules" / "better-ccflare" / "dist" / "better-ccflare"
    if not skip:
        prefix.mkdir(parents=True, exist_ok=True)
        run(["npm", "view", BETTER_CCFLARE, "version"], "npm view better-ccflare", 60)
        run(
            ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", BETTER_CCFLARE],
            "npm install better-ccflare",
            300,
        )
    if not binary.exists():
        raise NotRunHere(f"no {binary} (installed?)")
    binary.chmod(0o755)
    return binary


def install_litellm(scratch: Path, skip: bool) -> Path:
    venv = scratch / "litellm-venv"
    if not skip:
        run([sys.executable, "-m", "venv", str(venv)], "python -m venv", 120)
        run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], "pip install 'litellm[proxy]'", 900)
    if not (venv / "bin" / "litellm").exists():
        raise NotRunHere(f"no {venv}/bin/litellm (installed?)")
    return venv / "bin" / "litellm"


# --- the targets: each started, its processes, stopped ---


class Process:
    """A peer's server in its own session (so stopping it reaches its children), output to a log."""

    def __init__(self, cmd: list[str], log: Path, port: int, env: dict, cwd: Path, ready_path: str = ""):
        self.cmd, self.log, self.port, self.env, self.cwd, self.ready_path = cmd, log, port, env, cwd, ready_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "Process":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True
            )
        try:
            wait_for_port(self.port, timeout, alive=lambda: self.proc.poll() is None)
            if self.ready_path:  # listening is not ready for every server (LiteLLM loads its config after)
                deadline = time.monotonic() + timeout
                while requests.get(self.url + self.ready_path, timeout=5).status_code != 200:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.ready_path} not ready after {timeout}s")
                    time.sleep(0.2)
        except (RuntimeError, TimeoutError, requests.RequestException) as e:
            self.stop()
            raise NotRunHere(f"did not start ({e}): {self.log.read_text(errors='replace').strip()[-300:]}") from None
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def start_better_ccflare(binary: Path, folder: Path, upstream: str) -> Process:
    home = folder / "better-ccflare-home"
    home.mkdir(exist_ok=True)
    db = home / "better-ccflare.db"
    env = {
        **os.environ,
        "HOME": str(home),
        "BETTER_CCFLARE_DB_PATH": str(db),
        "BETTER_CCFLARE_CONFIG_PATH": str(home / "config.json"),
        "BETTER_CCFLARE_HOST": "127.0.0.1",
        "LOG_LEVEL": "WARN",
        "STORE_PAYLOADS": "false",
    }
    # `--list` creates the database; the account is the row `--add-account NAME --mode
    # anthropic-compatible` writes (its prompts do not take piped answers reliably).
    run([str(binary), "--list"], "better-ccflare --list", 60, env=env, cwd=home)
    with closing(sqlite3.connect(db)) as con, con:
        con.execute("delete from accounts")
        con.execute(
            "insert into accounts (id, name, provider, api_key, refresh_token, access_token, expires_at,"
            " created_at, request_count, total_requests, priority, custom_endpoint)"
            " values (?, 'bench', 'anthropic-compatible', ?, null, null, null, ?, 0, 0, 0, ?)",
            (str(uuid.uuid4()), KEY, int(time.time() * 1000), upstream),
        )
    port = free_port()
    return Process(
        [str(binary), "--serve", "--port", str(port)], folder / "better-ccflare.log", port, env, home
    ).start()


def start_litellm(binary: Path, folder: Path, upstream: str) -> Process:
    config = folder / "litellm-config.yaml"
    config.write_text(
        json.dumps(
            {  # JSON is YAML
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {"model": f"anthropic/{MODEL}", "api_base": upstream, "api_key": KEY},
                    }
                ],
                "litellm_settings": {"telemetry": False},
                # without it LiteLLM drops the x-fake-* headers, and the fake could not pace the slow streams
                "general_settings": {"forward_client_headers_to_llm_api": True},
            }
        )
    )
    # The master key is the clients' key too, so every target gets the same request bytes.
    env = {**os.environ, "LITELLM_MASTER_KEY": KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    port = free_port()
    return Process(
        [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        folder / "litellm.log",
        port,
        env,
        folder,
        ready_path="/health/liveliness",
    ).start()


def tree(pid: int) -> list[psutil.Process]:
    top = psutil.Process(pid)
    return [top, *top.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def held_cell(slow: dict) -> str:
    """The largest S held, and the p99 added delay of the first S missed (what missed looks like)."""
    missed = [t for t in slow["slow_tries"] if not t["held"]]
    miss = missed[0] if missed else None
    return f"{slow['slow_streams_held']}" + (
        f" ({miss['streams']}: {miss['added_p99_ms']} ms, {miss['failed']} failed)" if miss else ""
    )


# --- the run ---


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, help="install and run here (default: a new temporary folder)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="Claudeflare's N (it also runs with 1)")
    parser.add_argument("--requests", type=int, default=300, help="per target per round")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--slow-start", type=int, default=50, help="slow streams: first try (0: skip them)")
    parser.add_argument("--slow-max", type=int, default=800)
    parser.add_argument("--slow-tokens", type=int, default=60, help="tokens per slow stream (at 50 ms each)")
    parser.add_argument("--skip-install", action="store_true", help="use what an earlier run installed in --scratch")
    args = parser.parse_args()
    args.generators = 1  # what scale.measure_throughput reads
    scratch = (args.scratch or Path(tempfile.mkdtemp(prefix="claudeflare-peers-"))).resolve()
    if scratch.is_relative_to(ROOT):
        parser.error(f"--scratch must be outside the repository ({ROOT})")
    if args.skip_install and not args.scratch:
        parser.error("--skip-install needs the --scratch of an earlier run")
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"scratch folder: {scratch}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below stops everything

    not_run: dict[str, str] = {}
    installed = {}
    for name, install in (("better-ccflare", install_better_ccflare), ("LiteLLM proxy", install_litellm)):
        print(f"installing {name}…", flush=True)
        try:
            installed[name] = install(scratch, args.skip_install)
        except NotRunHere as e:
            not_run[name] = str(e)
            print(f"  {name}: not run here: {e}", flush=True)

    run_dir = scratch / time.strftime("run-%Y%m%d-%H%M%S")  # logs, homes and port files of this run only
    run_dir.mkdir()
    targets: dict[str, object] = {}
    fake = None
    try:
        fake, upstream = start_fake(run_dir)
        homes = {n: run_dir / f"claudeflare-home-{n}" for n in (1, args.workers)}
        for home in homes.values():
            add_account(home, "bench", "api-key", 1, api_key=KEY)
        starters = {
            "bare mitmdump": lambda: Mitmdump(
                "--mode",
                f"reverse:{upstream}",
                "--set",
                "stream_large_bodies=1",
                *QUIET,
                log=run_dir / "bare.log",
                addon=False,
            ).start(),
            **{
                f"Claudeflare, {n} worker{'s' * (n > 1)}": (
                    lambda n=n: Serve(
                        homes[n], upstream, run_dir / f"claudeflare-{n}.log", *QUIET, *ONE_PEER, workers=n
                    ).start(60)
                )
                for n in homes
            },
            "better-ccflare": lambda: start_better_ccflare(installed["better-ccflare"], run_dir, upstream),
            "LiteLLM proxy": lambda: start_litellm(installed["LiteLLM proxy"], run_dir, upstream),
        }
        for name, start in starters.items():
            if name in not_run:
                continue
            print(f"starting {name}…", flush=True)
            try:
                targets[name] = start()
                warm = measure_throughput(targets[name].url, argparse.Namespace(**{**vars(args), "requests": 100}))
                if warm["errors"]:
                    raise NotRunHere(f"{warm['errors']} of 100 warm-up requests failed (see {run_dir})")
            except (NotRunHere, RuntimeError) as e:
                not_run[name] = str(e).splitlines()[0][:300]
                print(f"  {name}: not run here: {not_run[name]}", flush=True)
                if name in targets:
                    targets.pop(name).stop()
        rows: dict[str, list[dict]] = {name: [] for name in targets}
        order = list(targets)
        for i in range(args.rounds):
            for name in order[i % len(order) :] + order[: i % len(order)]:  # rotate which goes first
                pid = targets[name].proc.pid
                before = cpu_seconds(pid)
                figures = measure_throughput(targets[name].url, args)
                figures["cpu_ms_per_request"] = (cpu_seconds(pid) - before) * 1000 / args.requests
                rows[name].append(figures)
                print(f"  round {i + 1}: {name}: {figures}", flush=True)
        slow = {}
        for name in order if args.slow_start else ():  # once each, after the rounds: seconds per try
            print(f"  {name}:", flush=True)
            try_slow(targets[name].url, args.slow_start, args)  # a warm-up burst, not counted
            slow[name] = measure_slow(targets[name].url, args)
    finally:
        for target in targets.values():
            target.stop()
        if fake is not None:
            fake.terminate()
            fake.wait(10)

    print(
        f"\n{args.rounds} rounds × {args.requests} streamed 10-token replies per target, {args.concurrency} concurrent; "
        "medians over rounds\n"
    )
    print(
        "| target | req/s | p50 TTFB | p99 TTFB | errors | proxy CPU per request | requests per CPU-second "
        "| slow streams held |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    for name in starters:
        if name in not_run:
            print(f"| {name} | not run here: {not_run[name]} | | | | | | |")
            continue
        med = {
            k: statistics.median(r[k] for r in rows[name])
            for k in ("requests_per_s", "ttfb_p50_ms", "ttfb_p99_ms", "cpu_ms_per_request")
        }
        med["errors"] = sum(r["errors"] for r in rows[name])
        med["slow_streams_held"] = held_cell(slow[name]) if name in slow else "—"
        summary[name] = med
        print(
            f"| {name} | {med['requests_per_s']:.1f} | {med['ttfb_p50_ms']:.2f} ms | {med['ttfb_p99_ms']:.2f} ms | "
            f"{med['errors']} | {med['cpu_ms_per_request']:.2f} ms | {1000 / med['cpu_ms_per_request']:.0f} | {med['slow_streams_held']} |"
        )
    print(json.dumps({"rounds": rows, "slow_streams_held": slow, "medians": summary, "not_run": not_run}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
