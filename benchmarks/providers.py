"""What each provider's translation costs: one Claudeflare per provider on its stand-in, in one run (#16).

    .venv/bin/python benchmarks/providers.py [--rounds 3] [--requests 200] [--concurrency 10]

One mitmdump with the addon per provider, each with a single account of that provider:
`anthropic` (an API key on tests/fake_anthropic.py: the baseline), `anthropic-compatible` (a second
FakeAnthropic with its own key and a model map), `vertex` (tests/fake_vertex.py, a service-account
file) and `bedrock` (tests/fake_bedrock.py, SigV4 from the AWS environment). The stand-ins have no
standalone entry point, so all four run in threads of one child process of this script: out of the
load generator's process, and alike for every provider. Each round gives every proxy the same
load back to back, the order rotated per round: N streamed /v1/messages requests (short replies:
10 tokens from the Anthropic fakes, 7 from Vertex's, 9 from Bedrock's), C at a time, then N
non-streamed ones. Measured per provider and kind: requests/s, p50/p99 time to first body byte,
and the proxy's CPU time per request (psutil: user + system of the mitmdump process over the
load). Ratios to `anthropic` are taken within each round, then their median over rounds.
Reports only: no bar, exit 0 unless a request fails.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from claudeflare.config import ensure_home  # noqa: E402
from claudeflare.credentials import Credential, CredentialStore  # noqa: E402

from harness import Mitmdump, add_account  # noqa: E402

PROVIDERS = ("anthropic", "anthropic-compatible", "vertex", "bedrock")
KINDS = ("stream", "json")
ANTHROPIC_KEY = "sk-ant-api03-benchmark-" + "p" * 32
COMPATIBLE_KEY = "compatible-benchmark-key-0123456789"
MODEL = "claude-sonnet-4-5"  # an alias every stand-in serves (Vertex and Bedrock as its dated version)


def serve_stand_ins(conn) -> None:
    """Child process: the four stand-ins in threads, their addresses sent up, until told to stop."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fake_anthropic import FakeAnthropic
    from fake_bedrock import FakeBedrock
    from fake_vertex import FakeVertex

    with (
        FakeAnthropic(record=False) as anthropic,
        FakeAnthropic(record=False) as compatible,
        FakeVertex() as vertex,
        FakeBedrock() as bedrock,
    ):
        anthropic.add_api_key(ANTHROPIC_KEY, account="bench")
        compatible.add_api_key(COMPATIBLE_KEY, account="compatible")
        conn.send(
            {
                "anthropic": anthropic.url,
                "compatible": compatible.url,
                "vertex": vertex.url,
                "service_account": vertex.service_account(),
                "bedrock": bedrock.url,
                "bedrock_env": bedrock.env,
            }
        )
        conn.recv()  # the stop message (or EOF when the parent dies)


def append_account(home: Path, table: str) -> None:
    ensure_home(home)
    with open(home / "accounts.toml", "a") as f:
        f.write("\n[[accounts]]\n" + table)


def start_proxies(tmp: Path, up: dict, proxies: dict[str, Mitmdump]) -> None:
    """One Claudeflare per provider, each with one account of it, into `proxies` as each starts (so
    the caller stops those that did if a later one fails); the flow log written as usual."""
    homes = {p: tmp / p for p in PROVIDERS}
    add_account(homes["anthropic"], "bench", "api-key", 1, api_key=ANTHROPIC_KEY)
    ensure_home(homes["anthropic-compatible"])
    CredentialStore(homes["anthropic-compatible"]).set_account("compatible", Credential(api_key=COMPATIBLE_KEY))
    append_account(
        homes["anthropic-compatible"],
        f'name = "compatible"\nprovider = "anthropic-compatible"\nbase_url = "{up["compatible"]}"\n'
        'models = { "claude-sonnet-*" = "glm-4.6" }\n',
    )
    service_account = tmp / "sa.json"
    service_account.write_text(json.dumps(up["service_account"]))
    os.chmod(service_account, 0o600)
    append_account(
        homes["vertex"],
        f'name = "vertex"\nprovider = "vertex"\nregion = "us-east5"\nbase_url = "{up["vertex"]}"\n'
        f"credentials_file = {json.dumps(str(service_account))}\n",
    )
    append_account(homes["bedrock"], f'name = "aws"\nprovider = "bedrock"\nbase_url = "{up["bedrock"]}"\n')
    for provider in PROVIDERS:
        proxies[provider] = Mitmdump(
            "--set",
            f"claudeflare_home={homes[provider]}",
            "--set",
            f"claudeflare_upstream={up['anthropic']}",
            "--set",
            "flow_detail=0",
            log=tmp / f"{provider}.log",
            env=up["bedrock_env"] if provider == "bedrock" else None,
        ).start()


async def one(session: aiohttp.ClientSession, url: str, stream: bool) -> float:
    start = time.perf_counter()
    async with session.post(
        f"{url}/v1/messages",
        data=json.dumps(
            {
                "model": MODEL,
                "max_tokens": 64,
                "stream": stream,
                "messages": [{"role": "user", "content": "benchmark " * 200}],
            }
        ),
        headers={
            "x-api-key": "client-key-ignored",
            "content-type": "application/json",
            "anthropic-version": "2023-06-01",
            "x-fake-tokens": "10",
            "x-claude-code-session-id": str(uuid.uuid4()),  # a new conversation each time
        },
    ) as reply:
        first = None
        async for _ in reply.content.iter_any():
            if first is None:
                first = time.perf_counter() - start
        if reply.status != 200:
            raise RuntimeError(f"{url}: HTTP {reply.status}")
    return first


async def load(url: str, requests_n: int, concurrency: int, stream: bool) -> tuple[list[float], float]:
    """`requests_n` requests, `concurrency` at a time: (TTFBs in s, requests per second)."""
    ttfbs: list[float] = []
    left = list(range(requests_n))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=60),
    ) as session:

        async def worker():
            while left:
                left.pop()
                ttfbs.append(await one(session, url, stream))

        await one(session, url, stream)  # warm the connection pool
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return ttfbs, requests_n / elapsed


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def measure(proxy: Mitmdump, requests_n: int, concurrency: int, stream: bool) -> dict:
    process = psutil.Process(proxy.proc.pid)
    before = cpu_seconds(process)
    ttfbs, rps = asyncio.run(load(proxy.url, requests_n, concurrency, stream))
    # the warm-up request is inside the CPU window: n + 1 requests
    return {"ttfbs": ttfbs, "rps": rps, "cpu": (cpu_seconds(process) - before) / (requests_n + 1)}


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def report(results: dict, args) -> None:
    print(
        f"{args.rounds} rounds × {args.requests} requests per provider and kind, {args.concurrency} concurrent; "
        "ratios: median over rounds of provider ÷ anthropic within the round"
    )
    print(
        f"{'provider':22}{'kind':>7}{'req/s':>8}{'p50 TTFB':>10}{'p99 TTFB':>10}{'CPU/req':>9}"
        f"{'  ratio: req/s':>15}{'p50':>7}{'CPU':>7}"
    )
    for kind in KINDS:
        base = results["anthropic"][kind]
        for provider in PROVIDERS:
            rounds = results[provider][kind]
            ttfbs = [t for r in rounds for t in r["ttfbs"]]

            def ratio(get, rounds=rounds, base=base):
                return statistics.median(get(r) / get(b) for r, b in zip(rounds, base, strict=True))

            print(
                f"{provider:22}{kind:>7}{statistics.median(r['rps'] for r in rounds):>8.1f}"
                f"{pct(ttfbs, 50) * 1000:>8.2f}ms{pct(ttfbs, 99) * 1000:>8.2f}ms"
                f"{statistics.median(r['cpu'] for r in rounds) * 1000:>7.2f}ms"
                f"{ratio(lambda r: r['rps']):>15.3f}{ratio(lambda r: pct(r['ttfbs'], 50)):>7.3f}"
                f"{ratio(lambda r: r['cpu']):>7.3f}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200, help="per provider, kind and round")
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    if not (1 <= args.rounds <= 50 and 1 <= args.requests <= 10_000 and 1 <= args.concurrency <= 200):
        parser.error("--rounds 1..50, --requests 1..10000, --concurrency 1..200")

    parent, child = multiprocessing.get_context("spawn").Pipe()
    stand_ins = multiprocessing.get_context("spawn").Process(target=serve_stand_ins, args=(child,), daemon=True)
    stand_ins.start()
    proxies: dict[str, Mitmdump] = {}
    results = {p: {k: [] for k in KINDS} for p in PROVIDERS}
    try:
        if not parent.poll(60):
            raise RuntimeError("the stand-ins did not start")
        up = parent.recv()
        with tempfile.TemporaryDirectory() as tmp_name:
            try:
                start_proxies(Path(tmp_name), up, proxies)
                for proxy in proxies.values():  # warm up: imports, tokens, signers, connection pools
                    for stream in (True, False):
                        asyncio.run(load(proxy.url, 50, args.concurrency, stream))
                for i in range(args.rounds):
                    order = PROVIDERS[i % len(PROVIDERS) :] + PROVIDERS[: i % len(PROVIDERS)]
                    for kind in KINDS:
                        for provider in order:
                            results[provider][kind].append(
                                measure(proxies[provider], args.requests, args.concurrency, kind == "stream")
                            )
            finally:
                for proxy in proxies.values():
                    proxy.stop()
    finally:
        if stand_ins.is_alive():
            parent.send("stop")
        stand_ins.join(15)
        if stand_ins.is_alive():
            stand_ins.terminate()
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
