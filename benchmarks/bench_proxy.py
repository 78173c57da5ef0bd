"""Claudeflare against a bare mitmdump reverse proxy, on the same fake upstream, in one run.

    .venv/bin/python benchmarks/bench_proxy.py [--rounds 3] [--requests 200] [--concurrency 10]

Measures, for streamed /v1/messages replies at N concurrent streams:
- p50/p95 time to first byte (first body byte: the SSE message_start) through each proxy;
- throughput (completed requests per second) through each proxy;
- Claudeflare's p50 TTFB for 10-token against 2,000-token replies, one stream at a time, paced at
  1 token/ms (streaming must not buffer);
- what failover costs: TTFB of streams retried on a second account after a 429, against direct ones;
- what the Redis backend of the shared state costs against the home one (state.db): the same load
  through a Claudeflare with `claudeflare_state=redis://…` on a local redis-server (no bar).
Both proxies are measured back to back in each round (alternating which goes first); the ratios are
taken within each round and their median over rounds is compared with the bars from issue 2, so
noise that shifts a whole round cancels out. Exits 1 if a bar is missed.
"""

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from claudeflare.accounts import hash_client_key  # noqa: E402
from claudeflare.credentials import CredentialStore  # noqa: E402

from harness import Mitmdump, RedisServer, add_account, wait_for_port  # noqa: E402

KEY = "sk-ant-api03-benchmark-" + "b" * 32
FIRST_KEY = "sk-ant-api03-benchmark-first-" + "f" * 26
BODY = {
    "model": "claude-sonnet-4-5-20250929",
    "max_tokens": 4096,
    "stream": True,
    "messages": [{"role": "user", "content": "benchmark " * 200}],
}


def start_fake(tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "fake.port"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "fake_anthropic.py"),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--no-record",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "fake.log", "wb"),
    )
    deadline = time.monotonic() + 20
    while not (port_file.exists() and port_file.read_text().strip()):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("fake upstream did not start: " + (tmp / "fake.log").read_text())
        time.sleep(0.05)
    url = f"http://127.0.0.1:{int(port_file.read_text())}"
    wait_for_port(int(port_file.read_text()), 10)
    import requests

    requests.post(f"{url}/_fake/api_keys", json={"key": KEY, "account": "bench"}, timeout=5).raise_for_status()
    return proc, url


def headers(tokens: int, delay_ms: int = 0) -> dict:
    """A streamed request's headers, for a reply of `tokens` paced at `delay_ms` each; a new
    conversation each time, so none is pinned to an account."""
    return {
        "x-api-key": KEY,
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "x-fake-tokens": str(tokens),
        "x-fake-delay-ms": str(delay_ms),
        "x-claude-code-session-id": str(uuid.uuid4()),
    }


async def one(session: aiohttp.ClientSession, url: str, tokens: int, delay_ms: int = 0) -> float:
    start = time.perf_counter()
    async with session.post(
        f"{url}/v1/messages",
        data=json.dumps(BODY),
        headers=headers(tokens, delay_ms),
    ) as reply:
        assert reply.status == 200, await reply.text()
        first = None
        async for _ in reply.content.iter_any():
            if first is None:
                first = time.perf_counter() - start
    return first


async def load(
    url: str, requests_n: int, concurrency: int, tokens: int, delay_ms: int = 0
) -> tuple[list[float], float]:
    """Fire `requests_n` streamed requests, `concurrency` at a time; (TTFBs in s, requests per second)."""
    ttfbs: list[float] = []
    queue = list(range(requests_n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def worker():
            while queue:
                queue.pop()
                ttfbs.append(await one(session, url, tokens, delay_ms))

        await one(session, url, tokens)  # warm the connection pool
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return ttfbs, requests_n / elapsed


async def first_bytes(url: str, samples: int, lengths: tuple[int, ...], delay_ms: int) -> dict[int, list[float]]:
    """One stream at a time on one connection, the lengths interleaved so drift hits them alike, in
    ABBA order: each length follows a long stream as often as a short one (what the previous stream
    leaves behind, in the proxy or the fake, lands on both alike)."""
    ttfbs: dict[int, list[float]] = {n: [] for n in lengths}
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        await one(session, url, 10)
        for i in range(samples):
            for n in lengths if i % 2 == 0 else lengths[::-1]:
                ttfbs[n].append(await one(session, url, n, delay_ms))
    return ttfbs


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200, help="per proxy per round")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument(
        "--length-samples", type=int, default=40, help="streams per length for the 10 vs 2,000 token check"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fake, upstream = start_fake(tmp)
        home, redis_home = tmp / "home", tmp / "redis-home"
        for each in (home, redis_home):
            add_account(each, "bench", "api-key", 1, api_key=KEY)
            # The client's key is a client key with every limit, none of them reached: the checks are on the path.
            limits = {
                "budget_usd": 1e6,
                "per": "day",
                "rpm": 10**6,
                "concurrency": 10**5,
                "models": ["claude-*"],
                "expires_at": "2999-01-01T00:00:00Z",
            }
            CredentialStore(each).update(
                lambda d, limits=limits: d["client_keys"].__setitem__(
                    "bench", {"sha256": hash_client_key(KEY), "limits": limits}
                )
            )
        quiet = ("--set", "flow_detail=0")
        # The bare proxy streams bodies too (stream_large_bodies=1), so both forward SSE as it comes.
        bare = Mitmdump(
            "--mode", f"reverse:{upstream}", "--set", "stream_large_bodies=1", *quiet, log=tmp / "bare.log", addon=False
        ).start()
        pool = Mitmdump(
            "--set",
            f"claudeflare_home={home}",
            "--set",
            f"claudeflare_upstream={upstream}",
            *quiet,
            log=tmp / "claudeflare.log",
        ).start()
        # A pool whose preferred account refuses every request with a windowless 429 (which benches
        # nothing), so each request is retried on the second account: what failover costs.
        import requests

        requests.post(
            f"{upstream}/_fake/api_keys", json={"key": FIRST_KEY, "account": "first"}, timeout=5
        ).raise_for_status()
        requests.post(
            f"{upstream}/_fake/faults",
            json={"account": "first", "fault": "status:429-windowless", "count": 10**9},
            timeout=5,
        ).raise_for_status()
        retry_home = tmp / "retry-home"
        add_account(retry_home, "first", "api-key", 1, 0, api_key=FIRST_KEY)
        add_account(retry_home, "bench", "api-key", 1, 1, api_key=KEY)
        failover = Mitmdump(
            "--set",
            f"claudeflare_home={retry_home}",
            "--set",
            f"claudeflare_upstream={upstream}",
            *quiet,
            log=tmp / "failover.log",
        ).start()
        redis = RedisServer(tmp).start()
        on_redis = Mitmdump(
            "--set",
            f"claudeflare_home={redis_home}",
            "--set",
            f"claudeflare_upstream={upstream}",
            "--set",
            f"claudeflare_state={redis.url}",
            *quiet,
            log=tmp / "redis.log",
        ).start()
        results = {"bare": ([], []), "claudeflare": ([], []), "redis": ([], [])}
        retried = {10: ([], []), 400: ([], [])}  # tokens -> (direct TTFBs, retried TTFBs)
        try:
            for proxy in (bare, pool, failover, on_redis):  # warm up: imports, caches, connection pools
                asyncio.run(load(proxy.url, 100, args.concurrency, 10))
            for i in range(args.rounds):
                trio = (("bare", bare), ("claudeflare", pool), ("redis", on_redis))
                for name, proxy in trio[i % 3 :] + trio[: i % 3]:  # rotate which goes first
                    ttfbs, rps = asyncio.run(load(proxy.url, args.requests, args.concurrency, 10))
                    results[name][0].append(ttfbs)
                    results[name][1].append(rps)
            # One stream at a time, paced at 1 token/ms (Claude streams far slower): what is measured is
            # buffering, not CPU shared with other streams nor mitmproxy working through a burst.
            lengths = asyncio.run(first_bytes(pool.url, args.length_samples, (10, 2000), delay_ms=1))
            bare_lengths = asyncio.run(first_bytes(bare.url, args.length_samples, (10, 2000), delay_ms=1))
            for tokens in retried:  # paced like a real stream: 1 token per 5 ms
                ttfbs, _ = asyncio.run(load(pool.url, 5, 1, tokens, delay_ms=5))
                retried[tokens][0].extend(ttfbs)
                ttfbs, _ = asyncio.run(load(failover.url, 5, 1, tokens, delay_ms=5))
                retried[tokens][1].extend(ttfbs)
        finally:
            bare.stop()
            pool.stop()
            failover.stop()
            on_redis.stop()
            redis.stop()
            fake.terminate()

    def summary(name):
        rounds, rps = results[name]
        ttfbs = [t for one_round in rounds for t in one_round]
        return pct(ttfbs, 50) * 1000, pct(ttfbs, 95) * 1000, statistics.median(rps)

    b50, b95, brps = summary("bare")
    c50, c95, crps = summary("claudeflare")
    r50, r95, rrps = summary("redis")
    short, long_ = statistics.median(lengths[10]) * 1000, statistics.median(lengths[2000]) * 1000
    # Ratios within each round (both proxies measured back to back), then the median over rounds:
    # machine noise that shifts a whole round cancels out.
    ttfb_ratio = statistics.median(
        pct(c, 50) / pct(b, 50) for b, c in zip(results["bare"][0], results["claudeflare"][0], strict=True)
    )
    rps_ratio = statistics.median(c / b for b, c in zip(results["bare"][1], results["claudeflare"][1], strict=True))
    length_ratio = long_ / short
    bare_length_ratio = statistics.median(bare_lengths[2000]) / statistics.median(bare_lengths[10])
    print(f"{args.rounds} rounds × {args.requests} streamed requests per proxy, {args.concurrency} concurrent")
    print(f"{'':14}{'p50 TTFB':>10}{'p95 TTFB':>10}{'req/s':>9}")
    print(f"{'bare mitmdump':14}{b50:>8.2f}ms{b95:>8.2f}ms{brps:>9.1f}")
    print(f"{'claudeflare':14}{c50:>8.2f}ms{c95:>8.2f}ms{crps:>9.1f}")
    print(f"{'  on Redis':14}{r50:>8.2f}ms{r95:>8.2f}ms{rrps:>9.1f}")
    redis_ttfb = statistics.median(
        pct(r, 50) / pct(c, 50) for c, r in zip(results["claudeflare"][0], results["redis"][0], strict=True)
    )
    redis_rps = statistics.median(r / c for c, r in zip(results["claudeflare"][1], results["redis"][1], strict=True))
    print(f"shared state on Redis vs home: p50 TTFB ratio {redis_ttfb:.3f}, throughput ratio {redis_rps:.3f} (no bar)")
    checks = [
        (f"p50 TTFB ratio        {ttfb_ratio:.3f}  (bar ≤ 1.15)", ttfb_ratio <= 1.15),
        (f"throughput ratio      {rps_ratio:.3f}  (bar ≥ 0.85)", rps_ratio >= 0.85),
        (
            f"TTFB 2000 / 10 tokens {length_ratio:.3f}  (bar within ±10 %: {short:.2f}ms vs {long_:.2f}ms; "
            f"bare mitmdump: {bare_length_ratio:.3f})",
            abs(length_ratio - 1) <= 0.10,
        ),
    ]
    for tokens, (direct, again) in retried.items():
        print(
            f"failover, {tokens:>4}-token stream: p50 TTFB {statistics.median(again) * 1000:.2f}ms retried "
            f"vs {statistics.median(direct) * 1000:.2f}ms direct (1 token / 5 ms; no bar)"
        )
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
