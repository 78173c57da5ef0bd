"""Claudeflare with 1, 2, 4… workers (`claudeflare serve --workers N`) on the same fake upstream.

    .venv/bin/python benchmarks/scale.py --workers 1,2 [--requests 2000] [--concurrency 20]
        [--generators 1] [--slow-start 50] [--slow-max 1600] [--slow-tokens 60] [--json PATH]

The fake upstream (tests/fake_anthropic.py) and the load generators (this script with --generate)
run in their own processes, so on a machine with more cores the proxy's workers, not the
measuring, set the figures; raise --generators there. Per worker count:
- throughput: --requests streamed /v1/messages replies of 10 tokens, --concurrency at a time on
  keep-alive connections (spread over the generators), after a warm-up: requests per second and
  p50/p99 time to first byte (the first body byte);
- slow streams: S streams opened together, each --slow-tokens tokens at 1 token / 50 ms, S doubling
  from --slow-start up to --slow-max; S is held when every stream ends with message_stop and the
  p99 of the added inter-event delay (the gap between text deltas as the client receives them,
  less the 50 ms the fake waits) stays under 50 ms. Reports the largest S held;
- rows missing: requests sent less distinct request ids in the flow log once the workers stopped
  (all N write the one SQLite file); errors count as sent, so a failed request shows here too.
Prints a table and one JSON line.
"""

import argparse
import asyncio
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_proxy import BODY, KEY, headers, start_fake  # noqa: E402  (main() is behind a __name__ guard)

from harness import Serve, add_account  # noqa: E402

PACE_MS = 50
ADDED_DELAY_BAR_MS = 50.0
# All the load comes from one address, whose idle connections (accepted, no request yet: a burst of
# slow streams) each worker caps at 64 by default; the bench measures the proxy, not that cap.
ONE_PEER = ("--set", "claudeflare_max_idle_conns=8192", "--set", "claudeflare_max_idle_conns_per_peer=8192")
STREAM_BODY = json.dumps({**BODY, "stream": True}).encode()


def pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


# --- the load generator (its own process: --generate SPEC, one JSON line out) ---


async def throughput(url: str, requests: int, concurrency: int) -> dict:
    ttfbs, errors = [], 0
    queue = iter(range(requests))

    async def client(session):
        nonlocal errors
        for _ in queue:
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/messages", data=STREAM_BODY, headers=headers(10)) as r:
                    first = await r.content.readany()
                    ttfbs.append(time.perf_counter() - start)
                    body = first + await r.read()
                    if r.status != 200 or b"message_stop" not in body:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        began = time.time()  # wall clock: comparable across the generator processes
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return {"ttfbs": ttfbs, "errors": errors, "began": began, "ended": time.time()}


async def slow_streams(url: str, streams: int, tokens: int) -> dict:
    """`streams` streams opened together; the gaps between text deltas as they arrive, less the pace."""
    added, failed = [], 0

    async def one(session):
        nonlocal failed
        last, body = None, b""
        try:
            async with session.post(f"{url}/v1/messages", data=STREAM_BODY, headers=headers(tokens, PACE_MS)) as r:
                async for chunk in r.content.iter_any():
                    now = time.perf_counter()
                    body += chunk
                    if b"content_block_delta" in chunk:
                        if last is not None:
                            added.append((now - last) * 1000 - PACE_MS)
                        last = now
                if r.status != 200 or not body.endswith(b'{"type":"message_stop"}\n\n'):
                    failed += 1
        except aiohttp.ClientError:
            failed += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(one(session) for _ in range(streams)))
    return {"added_ms": added, "failed": failed}


def generate(spec: dict) -> dict:
    if spec["kind"] == "throughput":
        return asyncio.run(throughput(spec["url"], spec["requests"], spec["concurrency"]))
    return asyncio.run(slow_streams(spec["url"], spec["streams"], spec["tokens"]))


def run_generators(specs: list[dict]) -> tuple[list[dict], float]:
    """Each spec in its own process, started together; their results and the wall time."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen([sys.executable, __file__, "--generate", json.dumps(s)], stdout=subprocess.PIPE) for s in specs
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    wall = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise RuntimeError("a load generator failed")
    return [json.loads(out) for out in outs], wall


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


# --- the measuring ---


def measure_throughput(url: str, args) -> dict:
    specs = [
        {"kind": "throughput", "url": url, "requests": r, "concurrency": c}
        for r, c in zip(split(args.requests, args.generators), split(args.concurrency, args.generators), strict=True)
    ]
    results, _ = run_generators(specs)
    ttfbs = [t for r in results for t in r["ttfbs"]]
    wall = max(r["ended"] for r in results) - min(r["began"] for r in results)  # without starting Python
    return {
        "requests_per_s": round(len(ttfbs) / wall, 1),
        "ttfb_p50_ms": round(pct(ttfbs, 50) * 1000, 2),
        "ttfb_p99_ms": round(pct(ttfbs, 99) * 1000, 2),
        "errors": sum(r["errors"] for r in results),
    }


def try_slow(url: str, streams: int, args) -> dict:
    specs = [
        {"kind": "slow", "url": url, "streams": s, "tokens": args.slow_tokens} for s in split(streams, args.generators)
    ]
    results, wall = run_generators(specs)
    added = [a for r in results for a in r["added_ms"]]
    failed = sum(r["failed"] for r in results)
    p99 = pct(added, 99)
    return {
        "streams": streams,
        "failed": failed,
        "added_p99_ms": round(p99, 1),
        "seconds": round(wall, 1),
        "held": failed == 0 and p99 < ADDED_DELAY_BAR_MS,
    }


def measure_slow(url: str, args) -> dict:
    tries, streams = [], args.slow_start
    while streams <= args.slow_max:  # bounded by --slow-max
        tries.append(try_slow(url, streams, args))
        print(
            f"    {streams} slow streams: p99 added delay {tries[-1]['added_p99_ms']} ms, "
            f"{tries[-1]['failed']} failed, {tries[-1]['seconds']} s",
            flush=True,
        )
        if not tries[-1]["held"]:
            break
        streams *= 2
    held = [t["streams"] for t in tries if t["held"]]
    return {"slow_streams_held": max(held, default=0), "slow_tries": tries}


def measure(workers: int, fake_url: str, tmp: Path, args) -> dict:
    home = tmp / f"home-{workers}"
    add_account(home, "bench", "api-key", 1, api_key=KEY)
    serve = Serve(home, fake_url, tmp / f"serve-{workers}.log", "--set", "flow_detail=0", *ONE_PEER, workers=workers)
    serve.start(60)
    try:
        run_generators([{"kind": "throughput", "url": serve.url, "requests": 200, "concurrency": 10}])  # warm-up
        row = {"workers": workers, **measure_throughput(serve.url, args), **measure_slow(serve.url, args)}
    finally:
        serve.stop()
    # N workers, N writers on one SQLite file: once they have stopped (SIGTERM), every request is a row.
    sent = 200 + args.requests + sum(t["streams"] for t in row["slow_tries"])
    with closing(sqlite3.connect(home / "claudeflare.db")) as db:
        row["rows_missing"] = sent - db.execute("select count(distinct request_id) from requests").fetchone()[0]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--generators", type=int, default=1, help="load generator processes")
    parser.add_argument("--slow-start", type=int, default=50)
    parser.add_argument("--slow-max", type=int, default=1600)
    parser.add_argument("--slow-tokens", type=int, default=60, help="tokens per slow stream (at 50 ms each)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--generate", help=argparse.SUPPRESS)  # a load generator process
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(generate(json.loads(args.generate))))
        return 0
    counts = [int(n) for n in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="claudeflare-scale-") as tmp:
        fake, fake_url = start_fake(Path(tmp))
        try:
            for n in counts:
                print(f"{n} worker(s):", flush=True)
                rows.append(measure(n, fake_url, Path(tmp), args))
        finally:
            fake.terminate()
            fake.wait(10)
    print(
        "\n| workers | req/s | p50 TTFB | p99 TTFB | errors | slow streams held (p99 added delay < 50 ms) | rows missing |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['requests_per_s']} | {r['ttfb_p50_ms']} ms | {r['ttfb_p99_ms']} ms | "
            f"{r['errors']} | {r['slow_streams_held']} | {r['rows_missing']} |"
        )
    print(json.dumps(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
