"""Claudeflare under sustained load: memory, file descriptors, the flow log, and many slow streams.

    .venv/bin/python benchmarks/soak.py [--requests 20000] [--concurrency 20] [--warmup 500] [--slow 500] [--json PATH]

Starts the fake upstream (tests/fake_anthropic.py, its own process) and Claudeflare with two API-key
accounts, so the balancer spreads the load, then:

1. Soak: after a warm-up, N /v1/messages requests, C at a time, streamed and non-streamed alternating,
   5..50 output tokens, each a new conversation (its own x-claude-code-session-id). Every reply is
   checked (status 200, the fake's full text). The proxy's RSS and open fds are sampled after the
   warm-up, every 2 s, and at the end; both end figures are taken idle (client connections closed)
   like the warm-up ones, so keep-alive connections don't count. Once the flow log has flushed, its
   `requests` table must hold exactly one row per request: matched on the upstream request-id each
   client saw, and on the session id each client sent.
2. Slow streams: S streams opened at once, each 200 tokens at 1 token / 50 ms (about 10 s), all held
   open together; each must end with 200, message_stop and the full text. Reports the proxy's CPU
   (process CPU time over wall time, % of one core), the peak of streams open at once and max RSS.

Bars (issue: soak): RSS growth after warm-up < 30 MB; no fd growth (end ≤ after warm-up + 5); no
lost or duplicated flow-log rows; every request answered 200 with the right text; no traceback in
the proxy's log. Prints a summary, then one JSON line with every figure. Exits 1 if a bar is missed.
"""

import argparse
import asyncio
import json
import resource
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from bench_proxy import BODY, KEY, pct, start_fake  # noqa: E402  (main() is behind a __name__ guard)

from fake_anthropic import expected_text  # noqa: E402
from harness import Mitmdump, add_account  # noqa: E402

SECOND_KEY = "sk-ant-api03-benchmark-second-" + "s" * 25
# What the client presents: no client keys are configured and we are on loopback, so the proxy
# accepts it and injects an account's key. The fake knows no such key, so a request that got
# through without the pool's credential would come back 401 and fail the run.
CLIENT_KEY = "sk-ant-api03-soak-client-not-an-account-key"
STREAM_BODY = json.dumps({**BODY, "stream": True}).encode()
JSON_BODY = json.dumps({**BODY, "stream": False}).encode()
RSS_GROWTH_BAR_MB = 30.0
# The idle fd counts are compared with client connections closed and drained, so what is left is the
# proxy's own files (listening sockets, epoll, the flow log's db/-wal/-shm, its log). The slack is for
# a handle that may be open at the instant of a sample without being a leak: a connection whose close
# is still in flight, SQLite opening its journal. A leak of one fd per connection or request would
# be thousands here, far beyond it.
FD_SLACK = 5
SAMPLE_EVERY = 2.0


@dataclass
class Reply:
    status: int | None = None
    ttfb: float | None = None
    request_id: str | None = None
    session: str = ""
    error: str | None = None  # None when the status was 200 and the body complete and right


@dataclass
class Samples:
    """The proxy process's RSS (bytes) and open fds, sampled while load runs."""

    rss: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)


def sse_text(body: bytes) -> tuple[str, bool]:
    """The concatenated text_delta texts of an SSE body, and whether it ended with message_stop."""
    text, stopped = [], False
    for block in body.split(b"\n\n"):
        if block.startswith(b"event: content_block_delta"):
            delta = json.loads(block.split(b"\ndata: ", 1)[1])["delta"]
            if delta.get("type") == "text_delta":
                text.append(delta["text"])
        elif block.startswith(b"event: message_stop"):
            stopped = True
    return "".join(text), stopped


def check_body(body: bytes, stream: bool, tokens: int) -> str | None:
    try:
        if stream:
            text, stopped = sse_text(body)
            if not stopped:
                return "stream without message_stop"
        else:
            text = json.loads(body)["content"][0]["text"]
    except (ValueError, KeyError, IndexError) as e:
        return f"unreadable body: {e!r}"
    return None if text == expected_text(tokens) else f"wrong text ({len(text)} chars, {tokens} tokens asked)"


async def fire(
    session: aiohttp.ClientSession, url: str, stream: bool, tokens: int, delay_ms: int = 0, on_open=None, on_close=None
) -> Reply:
    reply = Reply(session=str(uuid.uuid4()))
    headers = {
        "x-api-key": CLIENT_KEY,
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "x-fake-tokens": str(tokens),
        "x-claude-code-session-id": reply.session,
    }
    if delay_ms:
        headers["x-fake-delay-ms"] = str(delay_ms)
    start = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/messages", data=STREAM_BODY if stream else JSON_BODY, headers=headers) as r:
            if on_open:
                on_open()
            try:
                reply.status, reply.request_id = r.status, r.headers.get("request-id")
                chunks = []
                async for chunk in r.content.iter_any():
                    if reply.ttfb is None:
                        reply.ttfb = time.perf_counter() - start
                    chunks.append(chunk)
            finally:
                if on_close:
                    on_close()
        body = b"".join(chunks)
        if r.status != 200:
            reply.error = f"status {r.status}: {body[:200]!r}"
        else:
            reply.error = check_body(body, stream, tokens)
    except (TimeoutError, aiohttp.ClientError) as e:
        reply.error = f"{type(e).__name__}: {e}"
    return reply


async def sample_while(
    proc: psutil.Process, samples: Samples, done: asyncio.Event, every: float = SAMPLE_EVERY
) -> None:
    while True:
        samples.rss.append(proc.memory_info().rss)
        samples.fds.append(proc.num_fds())
        try:
            await asyncio.wait_for(done.wait(), every)
            return
        except TimeoutError:
            pass


async def soak(
    url: str, n: int, concurrency: int, proc: psutil.Process | None = None, first: int = 0
) -> tuple[list[Reply], float, Samples]:
    """n requests, `concurrency` at a time, on one client session closed at the end (so its
    connections are gone before the idle fd count). Request i is streamed when i is even and asks
    for 5..50 tokens; `first` continues the numbering after the warm-up."""
    replies: list[Reply] = []
    samples = Samples()
    next_i = iter(range(first, first + n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker():
            for i in next_i:  # one shared iterator: each request number is taken once
                replies.append(await fire(session, url, stream=i % 2 == 0, tokens=5 + (i * 7) % 46))

        done = asyncio.Event()
        sampler = asyncio.create_task(sample_while(proc, samples, done)) if proc else None
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        done.set()
        if sampler:
            await sampler
    return replies, n / elapsed, samples


async def slow_streams(url: str, n: int, tokens: int, delay_ms: int, proc: psutil.Process) -> dict:
    """n streams opened at once and held open together; what the proxy spent on them."""
    open_now = peak = 0

    def opened():
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)

    def closed():
        nonlocal open_now
        open_now -= 1

    samples = Samples()
    done = asyncio.Event()
    # limit=0: no pool cap, every stream gets its own connection at once.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sampler = asyncio.create_task(sample_while(proc, samples, done, every=0.25))
        cpu0, start = proc.cpu_times(), time.perf_counter()
        replies = await asyncio.gather(*(fire(session, url, True, tokens, delay_ms, opened, closed) for _ in range(n)))
        wall = time.perf_counter() - start
        cpu1 = proc.cpu_times()
        done.set()
        await sampler
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    errors = [r.error for r in replies if r.error]
    return {
        "streams": n,
        "ok": n - len(errors),
        "errors": len(errors),
        "error_examples": errors[:5],
        "wall_s": wall,
        "cpu_percent": 100 * cpu / wall,
        "peak_open": peak,
        "max_rss_mb": max(samples.rss) / 2**20,
        "max_fds": max(samples.fds),
        "replies": replies,
    }


def settle_fds(proc: psutil.Process, timeout: float = 10.0) -> int:
    """The fd count once it has held still for a second (closed connections take a moment to go)."""
    deadline = time.monotonic() + timeout
    last, since = proc.num_fds(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = proc.num_fds()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            break
    return last


def db_rows(db: Path) -> list[dict]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("select id, session, request_id, status, account from requests")]
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        conn.close()


def wait_for_rows(db: Path, expected: int, timeout: float = 30.0) -> list[dict]:
    """The flow log writes half-second batches off the event loop: wait until it holds `expected`
    rows and has stayed there a moment (a late duplicate would show), or stops changing."""
    deadline = time.monotonic() + timeout
    rows = db_rows(db)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = db_rows(db)
        if len(now) != len(rows):
            rows, since = now, time.monotonic()
        elif time.monotonic() - since >= (1.5 if len(rows) >= expected else 5.0):
            break
    return rows


def ledger(replies: list[Reply], rows: list[dict]) -> dict:
    """Flow-log rows against what the clients saw: by session id (one per request) and request-id."""
    sessions = {r.session for r in replies}
    mine = [row for row in rows if row["session"] in sessions]
    ids = Counter(row["request_id"] for row in mine)
    seen = {r.request_id for r in replies if r.request_id}
    return {
        "rows": len(mine),
        "distinct_request_ids": len(ids),
        "duplicated": sum(c - 1 for c in ids.values() if c > 1),
        "lost": len(seen - ids.keys()) + len(sessions - {row["session"] for row in mine}),
        "not_200": sum(1 for row in mine if row["status"] != 200),
        "per_account": dict(Counter(row["account"] for row in mine)),
    }


def mb(n: int) -> float:
    return n / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="measured soak requests")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--slow", type=int, default=500, help="slow streams held open at once (0: skip)")
    # 200 tokens at 50 ms: 10 s each, longer than it takes to open them all, so all are open at once.
    parser.add_argument("--slow-tokens", type=int, default=200)
    parser.add_argument("--slow-delay-ms", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    # Each slow stream is two sockets in the proxy (client side, upstream side), one in the fake and
    # one here; the children inherit this limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(args.slow, args.concurrency) + 512
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))

    figures: dict = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "warmup": args.warmup,
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    checks: list[tuple[str, bool]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fake, upstream = start_fake(tmp)
        requests.post(
            f"{upstream}/_fake/api_keys", json={"key": SECOND_KEY, "account": "second"}, timeout=5
        ).raise_for_status()
        home = tmp / "home"
        add_account(home, "bench", "api-key", 1, 0, api_key=KEY)
        add_account(home, "second", "api-key", 1, 0, api_key=SECOND_KEY)
        db = home / "claudeflare.db"
        log = tmp / "claudeflare.log"
        proxy = Mitmdump(
            "--set",
            f"claudeflare_home={home}",
            "--set",
            f"claudeflare_upstream={upstream}",
            "--set",
            "flow_detail=0",
            log=log,
        ).start()
        try:
            proc = psutil.Process(proxy.proc.pid)

            # --- 1. soak ---------------------------------------------------------------------------
            warm, _, _ = asyncio.run(soak(proxy.url, args.warmup, args.concurrency))
            warm_errors = [r.error for r in warm if r.error]
            wait_for_rows(db, args.warmup)  # the flow log's database is open and warm too
            fds_warm = settle_fds(proc)
            rss_warm = proc.memory_info().rss
            cpu0 = proc.cpu_times()

            replies, rps, samples = asyncio.run(
                soak(proxy.url, args.requests, args.concurrency, proc, first=args.warmup)
            )
            cpu1 = proc.cpu_times()
            rows = wait_for_rows(db, args.warmup + args.requests)
            fds_end = settle_fds(proc)
            rss_end = proc.memory_info().rss
            rss_max = max(samples.rss + [rss_end])

            errors = [r.error for r in replies if r.error]
            statuses = Counter(r.status for r in replies)
            ttfbs = [r.ttfb for r in replies if r.ttfb is not None]
            book = ledger(replies, rows)
            total_dupes = sum(c - 1 for c in Counter(row["request_id"] for row in rows).values() if c > 1)
            figures.update(
                {
                    "requests_per_s": round(rps, 1),
                    "ttfb_p50_ms": round(pct(ttfbs, 50) * 1000, 2),
                    "ttfb_p95_ms": round(pct(ttfbs, 95) * 1000, 2),
                    "ttfb_p99_ms": round(pct(ttfbs, 99) * 1000, 2),
                    "proxy_cpu_ms_per_request": round(
                        1000 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / args.requests, 2
                    ),
                    "status_counts": {str(k): v for k, v in statuses.items()},
                    "errors": len(errors) + len(warm_errors),
                    "rss_after_warmup_mb": round(mb(rss_warm), 1),
                    "rss_end_mb": round(mb(rss_end), 1),
                    "rss_max_mb": round(mb(rss_max), 1),
                    "rss_growth_mb": round(mb(rss_end - rss_warm), 1),
                    "rss_samples_mb": [round(mb(x), 1) for x in samples.rss],
                    "fds_after_warmup": fds_warm,
                    "fds_end": fds_end,
                    "fds_max_under_load": max(samples.fds),
                    "db_rows_total": len(rows),
                    "db_rows_expected": args.warmup + args.requests,
                    "db_rows_measured": book["rows"],
                    "db_distinct_request_ids": book["distinct_request_ids"],
                    "db_duplicated": book["duplicated"] + total_dupes,
                    "db_lost": book["lost"],
                    "db_not_200": book["not_200"],
                    "per_account": book["per_account"],
                }
            )
            checks += [
                (
                    f"every request answered 200 with the full text ({len(errors)} errors"
                    f"{': ' + errors[0] if errors else ''}; warm-up {len(warm_errors)})",
                    not errors and not warm_errors,
                ),
                (
                    f"RSS growth after warm-up {figures['rss_growth_mb']:.1f} MB (bar < {RSS_GROWTH_BAR_MB:.0f} MB)",
                    mb(rss_end - rss_warm) < RSS_GROWTH_BAR_MB,
                ),
                (
                    f"open fds idle {fds_end} at end vs {fds_warm} after warm-up (bar ≤ +{FD_SLACK})",
                    fds_end <= fds_warm + FD_SLACK,
                ),
                (
                    f"flow-log rows for the measured requests {book['rows']} (expected {args.requests}), "
                    f"table total {len(rows)} (expected {args.warmup + args.requests})",
                    book["rows"] == args.requests and len(rows) == args.warmup + args.requests,
                ),
                (
                    f"no duplicated rows ({figures['db_duplicated']}; distinct request ids {book['distinct_request_ids']})",
                    figures["db_duplicated"] == 0 and book["distinct_request_ids"] == book["rows"],
                ),
                (f"no lost rows ({book['lost']} client-seen request ids or sessions missing)", book["lost"] == 0),
                (f"both accounts served ({book['per_account']})", len(book["per_account"]) == 2),
            ]

            # --- 2. slow streams -------------------------------------------------------------------
            if args.slow:
                rows_before = len(rows)
                slow = asyncio.run(slow_streams(proxy.url, args.slow, args.slow_tokens, args.slow_delay_ms, proc))
                slow_rows = wait_for_rows(db, rows_before + args.slow)
                slow_book = ledger(slow.pop("replies"), slow_rows)
                figures["slow"] = {
                    **{k: round(v, 2) if isinstance(v, float) else v for k, v in slow.items()},
                    "tokens": args.slow_tokens,
                    "delay_ms": args.slow_delay_ms,
                    "db_rows": slow_book["rows"],
                    "db_lost": slow_book["lost"],
                    "db_duplicated": slow_book["duplicated"],
                }
                checks += [
                    (
                        f"{args.slow} slow streams: {slow['ok']} complete with the full text, {slow['errors']} errors"
                        f"{': ' + slow['error_examples'][0] if slow['errors'] else ''}",
                        slow["errors"] == 0,
                    ),
                    (
                        f"all {args.slow} slow streams held open at once (peak {slow['peak_open']})",
                        slow["peak_open"] == args.slow,
                    ),
                    (
                        f"slow streams logged once each ({slow_book['rows']} rows, {slow_book['lost']} lost, "
                        f"{slow_book['duplicated']} duplicated)",
                        slow_book["rows"] == args.slow and not slow_book["lost"] and not slow_book["duplicated"],
                    ),
                ]
        finally:
            proxy.stop()
            fake.terminate()
            fake.wait(10)
        tracebacks = proxy.output().count("Traceback")
        figures["proxy_log_tracebacks"] = tracebacks
        checks.append((f"no traceback in the proxy's log ({tracebacks})", tracebacks == 0))

    f = figures
    print(
        f"soak: {args.requests} requests (after {args.warmup} warm-up), {args.concurrency} concurrent, "
        f"streamed/non-streamed alternating, 5..50 tokens, 2 API-key accounts {f['per_account']}"
    )
    print(
        f"  {f['requests_per_s']:.1f} req/s; TTFB p50 {f['ttfb_p50_ms']:.2f} ms, p95 {f['ttfb_p95_ms']:.2f} ms, "
        f"p99 {f['ttfb_p99_ms']:.2f} ms; proxy CPU {f['proxy_cpu_ms_per_request']:.2f} ms/request"
    )
    print(
        f"  RSS {f['rss_after_warmup_mb']:.1f} MB after warm-up → {f['rss_end_mb']:.1f} MB at end "
        f"(max {f['rss_max_mb']:.1f} MB, growth {f['rss_growth_mb']:+.1f} MB)"
    )
    print(
        f"  open fds (idle) {f['fds_after_warmup']} after warm-up → {f['fds_end']} at end "
        f"(max {f['fds_max_under_load']} under load)"
    )
    print(
        f"  flow log: {f['db_rows_measured']} rows for {args.requests} requests, {f['db_distinct_request_ids']} distinct "
        f"request ids, {f['db_duplicated']} duplicated, {f['db_lost']} lost"
    )
    if "slow" in f:
        s = f["slow"]
        print(
            f"slow streams: {s['streams']} × {s['tokens']} tokens at 1 / {s['delay_ms']} ms, opened at once: "
            f"{s['ok']} ok, {s['errors']} errors in {s['wall_s']:.2f} s; peak {s['peak_open']} open at once"
        )
        print(
            f"  proxy CPU {s['cpu_percent']:.1f} % of one core; max RSS {s['max_rss_mb']:.1f} MB, max fds {s['max_fds']}"
        )
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    figures["pass"] = all(ok for _, ok in checks)
    line = json.dumps(figures, ensure_ascii=False)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)
    return 0 if figures["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
