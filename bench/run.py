"""`make bench`: starts the suite on a private PostgreSQL and NATS (nothing
else needs to run), drives it from this process, stops all it started, and
writes .run/bench-summary.json plus a table.

    python -m bench.run [--events N] [--runs N] [--skip-billing] [--skip-growth] [--skip-scale]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench import ingest_bench, storage
from bench.stats import cpu_seconds
from tools.devstack import DEFAULT_BASE_DIR, DevStack
from tools.suite import Suite

TARGETS = {
    "e2e_events_per_s": (">=", 20_000),
    "ingest_ack_p99_ms": ("<=", 100),
    "freshness_p99_ms": ("<=", 2_000),
    "freshness_burst_p99_ms": ("<=", 2_000),
    "query_usage_p99_ms": ("<=", 50),
    # Credits (bench/credits.py): a balance read at 1,000,000 events in the
    # period, and an acknowledged event in the balance under 20,000 events/s.
    "credit_balance_p99_ms": ("<=", 10),
    "credit_reflect_p99_ms": ("<=", 1_000),
    "billing_scale_peak_rss_mb": ("<=", 500),
}


async def one_run(events: int, billing: bool) -> dict[str, float]:
    base = DEFAULT_BASE_DIR / "bench"
    shutil.rmtree(base, ignore_errors=True)
    stack = DevStack(base)
    database_url, nats_url = stack.start()
    suite = Suite(
        database_url,
        nats_url,
        base / "logs",
        extra_env={
            "USAGEBILLING_SCHEDULER_ENABLED": "false",
            "USAGEBILLING_LOG_LEVEL": "warning",
            # The bench measures capacity: one tenant sends as fast as it can
            # (~30,000 events/s on 3 meters, ~100,000 row units/s), over the
            # per-tenant fair-share limit, which is therefore off here.
            "USAGEBILLING_INGEST_RATE_LIMIT": "0",
        },
    )
    try:
        suite.start()

        def cpu() -> dict[str, float]:
            pids: dict[str, int | None] = {s: suite.processes[s].pid for s in ("ingest", "meter")}
            pids |= {"postgres": stack.postgres_pid, "nats": stack.nats_pid}
            return {name: cpu_seconds(pid) for name, pid in pids.items()}

        figures = await ingest_bench.run(suite, events=events, cpu=cpu)
        # Bytes per event of the log, meter's rows and rollups (bench/storage.py).
        figures.update(await storage.run(database_url))
        if billing:
            try:
                from bench import billing_bench
            except ImportError:
                pass
            else:
                figures.update(await billing_bench.run(suite))
        if billing:
            # Credit balances (bench/credits.py): a read at `events` events of
            # one customer, and an event's reflection under 20,000 events/s.
            from bench import credits as credits_bench

            figures.update(await credits_bench.run(suite, events=events))
        return figures
    finally:
        suite.stop()
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)


def _verdict(name: str, value: float) -> str:
    if name not in TARGETS:
        return ""
    op, target = TARGETS[name]
    ok = value >= target if op == ">=" else value <= target
    return f"{'ok ' if ok else 'MISS'} (target {op} {target:,})"


def table(runs: list[dict[str, float]]) -> str:
    names = list(runs[0])
    lines = [
        f"{'figure':<24}"
        + "".join(f"{'run ' + str(i + 1):>14}" for i in range(len(runs)))
        + f"{'median':>14}"
    ]
    for name in names:
        values = [r.get(name, 0.0) for r in runs]
        median = statistics.median(values)
        cells = "".join(f"{v:>14,.1f}" for v in values)
        lines.append(f"{name:<24}{cells}{median:>14,.1f}  {_verdict(name, median)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-billing", action="store_true")
    # One customer's month at 100,000 to 10,000,000 events (bench/growth.py;
    # BENCH_GROWTH_SIZES trims): once, on a stack of its own, after the runs.
    parser.add_argument("--skip-growth", action="store_true")
    # One tenant of 1,000,000 subscriptions (bench/billing_scale.py;
    # BENCH_SUBSCRIPTIONS=100000 for a quick run): once, after the runs.
    parser.add_argument("--skip-scale", action="store_true")
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        started = time.perf_counter()
        runs.append(asyncio.run(one_run(args.events, not args.skip_billing)))
        print(f"run {i + 1}/{args.runs} done in {time.perf_counter() - started:.0f} s", flush=True)
    summary: dict[str, Any] = {
        "runs": runs,
        "median": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
        "targets": {k: {"op": op, "value": v} for k, (op, v) in TARGETS.items()},
    }
    growth_figures: dict[str, float] = {}
    if not args.skip_growth:
        from bench import growth

        growth_figures = asyncio.run(growth.standalone())
        TARGETS.update(growth.targets(growth.sizes()))
        summary["growth"] = growth_figures
    scale_figures: dict[str, float] = {}
    if not args.skip_scale and not args.skip_billing:
        from bench import billing_scale

        scale_figures = asyncio.run(billing_scale.standalone())
        summary["billing_scale"] = scale_figures
    out = Path(DEFAULT_BASE_DIR) / "bench-summary.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(table(runs))
    for once in (growth_figures, scale_figures):
        if once:
            print("\n" + table([once]))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
