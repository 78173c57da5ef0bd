"""2 workers behind SO_REUSEPORT (`claudeflare serve`) against 2 mitmdumps behind HAProxy (`mode tcp`).

    .venv/bin/python benchmarks/balancers.py [--rounds 4] [--requests 2000] [--slow 200]

Needs `haproxy` (Debian's package) on PATH. The fake upstream and the load generator run in their
own processes (scale.py's). Both set-ups serve one home in reverse mode: in plain mode the clients'
Host names HAProxy's port, not a worker's, and the gate refuses them. For the same reason
HAProxy checks its servers with a TCP connect, not `GET /health`. In each round both get the same load, the order
alternating: throughput and TTFB (scale.py's measure), then one try of --slow slow streams. Prints
one line per round and measure, then the medians.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
import scale  # noqa: E402
from bench_proxy import KEY, start_fake  # noqa: E402

from harness import Serve, add_account, claudeflare_proxy, free_port, wait_for_port  # noqa: E402

HAPROXY = """
global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
frontend claudeflare
    bind 127.0.0.1:{port}
    default_backend workers
backend workers
    balance leastconn
{servers}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--slow", type=int, default=200)
    parser.add_argument("--slow-tokens", type=int, default=40)
    args = parser.parse_args()
    args.generators = 1
    started = []
    with tempfile.TemporaryDirectory(prefix="claudeflare-balancers-") as tmp:
        tmp = Path(tmp)
        fake, url = start_fake(tmp)
        try:
            home = tmp / "home"
            add_account(home, "bench", "api-key", 1, api_key=KEY)
            common = ("--set", "flow_detail=0", "--mode", f"reverse:{url}", *scale.ONE_PEER)
            workers = [claudeflare_proxy(home, url, tmp / f"worker-{n}.log", *common) for n in (1, 2)]
            started += workers
            for worker in workers:
                worker.start()
            port = free_port()
            servers = "\n".join(f"    server w{n} 127.0.0.1:{w.port} check inter 2s" for n, w in enumerate(workers, 1))
            (tmp / "haproxy.cfg").write_text(HAPROXY.format(port=port, servers=servers))
            haproxy = subprocess.Popen(
                ["haproxy", "-f", str(tmp / "haproxy.cfg"), "-db"],
                stdout=open(tmp / "haproxy.log", "wb"),
                stderr=subprocess.STDOUT,
            )
            wait_for_port(port, 10, alive=lambda: haproxy.poll() is None)
            serve = Serve(home, url, tmp / "serve.log", *common)
            started.append(serve)
            serve.start()
            targets = {"SO_REUSEPORT": serve.url, "HAProxy": f"http://127.0.0.1:{port}"}
            for target in targets.values():  # warm-up
                scale.run_generators([{"kind": "throughput", "url": target, "requests": 300, "concurrency": 10}])
            results = {name: [] for name in targets}
            for n in range(args.rounds):
                for name in list(targets) if n % 2 == 0 else list(reversed(targets)):
                    row = scale.measure_throughput(targets[name], args)
                    slow = scale.try_slow(targets[name], args.slow, args)
                    row.update(slow_p99_added_ms=slow["added_p99_ms"], slow_failed=slow["failed"])
                    results[name].append(row)
                    print(n, name, json.dumps(row), flush=True)
        finally:
            if "haproxy" in locals():
                haproxy.terminate()
                haproxy.wait(10)
            for proc in started:
                proc.stop()
            fake.terminate()
            fake.wait(10)
    for name, rows in results.items():
        medians = {
            k: round(statistics.median(r[k] for r in rows), 1)
            for k in ("requests_per_s", "ttfb_p50_ms", "ttfb_p99_ms", "slow_p99_added_ms")
        }
        print(name, "medians:", json.dumps(medians), "errors:", sum(r["errors"] + r["slow_failed"] for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
