#!/usr/bin/env python3
"""Benchmark the cost of metrics: a fleet's throughput with metrics on versus off.

Only public tools are driven: ``fleetsim run --json`` (its ``steps_per_s``:
completed steps over the window from the first claim to the last
completion, so start-up is not counted) with ``--metrics`` and with
``--no-metrics``, the pair run back to back in each round and its order
flipped every round, and psycopg2 to drop each run's schema afterwards.

The figure is the median over rounds of the paired ratio on/off (1.0: no
cost; the goal is >= 0.95, a drop of at most 5%), with the spread of the
ratios. On a shared machine read the median; a single run means little.

Beside it, a noise-free bound: the pod-side cost of the metrics hook, timed
in this process (microseconds per step for a batch of 50 through every hook
method a step meets, and milliseconds per snapshot, taken every heartbeat),
turned into the CPU share it costs the fleet at the measured throughput.

    .venv/bin/python scripts/bench_metrics.py --store postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python scripts/bench_metrics.py --rounds 7 --pods 5 --steps 20000 --json out.json

Progress goes to stderr, the result to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2


def run_fleet(args: argparse.Namespace, metrics: bool, run_dir: Path) -> dict[str, Any]:
    """One `fleetsim run`; its JSON result (plus the wall time and the schema)."""
    schema = f"bench_metrics_{secrets.token_hex(4)}"
    argv = [sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), "run",
            "--pods", str(args.pods), "--steps", str(args.steps), "--workload", args.workload,
            "--concurrency", str(args.concurrency), "--batch", str(args.batch),
            "--schema", schema, "--json", "--metrics" if metrics else "--no-metrics"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSIM_")}
    env["FLEETSIM_STORE"] = args.store
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    finally:
        drop_schema(args.store, schema)
    if done.returncode != 0:
        raise SystemExit(f"fleetsim run failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["wall_s"] = round(time.monotonic() - started, 2)
    return result


def drop_schema(url: str, schema: str) -> None:
    """Drop a run's schema (it is kept by `fleetsim run` for `check`)."""
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        conn.close()


def hook_cost(batches: int = 2000) -> dict[str, float]:
    """The metrics hook's cost per step (us) and per snapshot (ms), timed here."""
    from fleetsim.store import ClaimedStep
    from pods.hooks import CountingHook
    from pods.metrics import PodMetrics

    metrics, counting = PodMetrics(), CountingHook()
    steps = [ClaimedStep(i, "default", 0, {}, 0, 3, i, None, 0.5) for i in range(50)]
    started = time.perf_counter()
    for _ in range(batches):
        metrics.on_claim_done(0.004, len(steps))
        metrics.on_claimed(steps)
        for step in steps:
            metrics.on_step_done(step, True, 1e-5, None)
        metrics.on_write("complete", len(steps), 0)
        metrics.on_accepted("complete", {step.id for step in steps})
    per_step_us = (time.perf_counter() - started) / (batches * len(steps)) * 1e6
    started = time.perf_counter()
    for _ in range(200):
        metrics.snapshot(counting.snapshot())
    snapshot_ms = (time.perf_counter() - started) / 200 * 1e3
    return {"hook_us_per_step": round(per_step_us, 3), "snapshot_ms": round(snapshot_ms, 3)}


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles of ``values``."""
    ordered = sorted(values)
    quartiles = (statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) >= 2
                 else [ordered[0]] * 3)
    return {"median": round(statistics.median(ordered), 4), "min": round(ordered[0], 4),
            "q1": round(quartiles[0], 4), "q3": round(quartiles[2], 4),
            "max": round(ordered[-1], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=os.environ.get("FLEETSIM_TEST_DATABASE_URL"),
                        help="PostgreSQL URL (default: $FLEETSIM_TEST_DATABASE_URL)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pods", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--workload", default="noop")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--json", dest="json_out", type=Path, default=None,
                        help="also write the result to this file")
    args = parser.parse_args()
    if not args.store:
        parser.error("give --store URL (or set FLEETSIM_TEST_DATABASE_URL)")

    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        for index in range(args.rounds):
            order = (True, False) if index % 2 == 0 else (False, True)
            figures: dict[bool, dict[str, Any]] = {}
            for metrics in order:
                figures[metrics] = run_fleet(args, metrics, Path(tmp) / f"r{index}")
                print(f"round {index + 1}/{args.rounds} metrics {'on ' if metrics else 'off'}: "
                      f"{figures[metrics]['steps_per_s']} steps/s", file=sys.stderr)
            on, off = figures[True]["steps_per_s"], figures[False]["steps_per_s"]
            rounds.append({"on_steps_per_s": on, "off_steps_per_s": off,
                           "ratio": round(on / off, 4), "first": "on" if order[0] else "off"})
    ratios = [r["ratio"] for r in rounds]
    cost = hook_cost()
    rate = statistics.median(r["off_steps_per_s"] for r in rounds)
    # CPU seconds per second the hooks cost the whole fleet at that rate:
    # per step, plus a snapshot per pod every heartbeat (0.5 s).
    cost["fleet_cpu_s_per_s"] = round(
        cost["hook_us_per_step"] * rate / 1e6 + args.pods * 2 * cost["snapshot_ms"] / 1e3, 4)
    cost["cores"] = os.cpu_count() or 1
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("store", "json_out")},
        "rounds": rounds,
        "ratio_on_off": spread(ratios),
        "on_steps_per_s": spread([r["on_steps_per_s"] for r in rounds]),
        "off_steps_per_s": spread([r["off_steps_per_s"] for r in rounds]),
        "drop_percent_median": round((1 - statistics.median(ratios)) * 100, 2),
        "hook_cost": cost,
        "goal": "ratio >= 0.95 (a drop of at most 5%)",
    }
    text = json.dumps(result, indent=2)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
