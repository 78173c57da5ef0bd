"""How long one refresh of `claudeflare tui` takes on a flow log of 1,000,000 rows.

The rows span 90 days (the default retention), a row every ~7.8 s, with two accounts, sessions,
errors and failovers among them. One refresh is `claudeflare.tui.load_snapshot`: the accounts, the
account status, today's cost, the totals of the range, the per-minute sparkline and the latest
requests. Timed per range, with and without the filters; exits 1 when the median is not under the bar.

    .venv/bin/python benchmarks/tui_refresh.py [--rows 1000000] [--keep DIR]
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from claudeflare.clock import iso_utc  # noqa: E402
from claudeflare.flowlog import open_db  # noqa: E402
from claudeflare.tui import RANGES, load_snapshot  # noqa: E402

from harness import add_account, key_for  # noqa: E402

BAR = 0.25  # seconds: a refresh a second must leave the machine idle most of the time
DAYS = 90


def rows(n: int, now: float):
    rng = random.Random(1)
    step = DAYS * 86400 / n
    for i in range(n):
        failed = rng.random() < 0.02
        yield {
            "id": f"r{i:07d}",
            "started_at": iso_utc(now - i * step),
            "account": rng.choice(("alpha", "beta")),
            "strategy": "session",
            "session": f"s{i // 20}",
            "client": "laptop",
            "method": "POST",
            "path": "/v1/messages",
            "model": "claude-sonnet-4-5",
            "stream": 1,
            "status": 529 if failed else 200,
            "ttfb_ms": rng.uniform(80, 900),
            "duration_ms": rng.uniform(500, 9000),
            "input_tokens": 100,
            "output_tokens": rng.randint(10, 2000),
            "cache_read_input_tokens": rng.randint(0, 50_000),
            "cache_creation_input_tokens": 0,
            "cost_usd": rng.uniform(0.001, 0.05),
            "priced": 1,
            "attempts": 3 if failed else 1,
            "failovers": json.dumps([{"account": "beta", "status": 529, "reason": "overloaded"}]) if failed else None,
        }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="build the log here (reused when it is there)")
    args = parser.parse_args()
    home = args.keep or Path(tempfile.mkdtemp()) / "home"
    db_path = home / "claudeflare.db"
    now = time.time()
    if not db_path.exists():
        add_account(home, "alpha", api_key=key_for("alpha"))
        add_account(home, "beta", api_key=key_for("beta"))
        started = time.perf_counter()
        db = open_db(db_path)
        with db.conn:
            db["requests"].insert_all(rows(args.rows, now), batch_size=10_000)
        db.close()
        print(f"wrote {args.rows:,} rows in {time.perf_counter() - started:.1f} s")
    worst = 0.0
    for range_key in RANGES:
        for label, kw in (("all", {}), ("errors only", {"errors_only": True}), ("one account", {"account": "beta"})):
            load_snapshot(home, range_key, **kw)  # warm the page cache
            times = []
            for _ in range(5):
                started = time.perf_counter()
                load_snapshot(home, range_key, **kw)
                times.append(time.perf_counter() - started)
            median = statistics.median(times)
            worst = max(worst, median)
            print(f"range {range_key:>3}, {label:<11}: median {median * 1000:7.1f} ms, max {max(times) * 1000:7.1f} ms")
    print(f"worst median {worst * 1000:.1f} ms, bar {BAR * 1000:.0f} ms")
    return 0 if worst < BAR else 1


if __name__ == "__main__":
    sys.exit(main())
