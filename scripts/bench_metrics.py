#!/usr/bin/env python3
"""The cost of metrics: fleet throughput with them on versus off, and the hook's own cost.

The fleets are ``fleetsim bench --metrics on,off``'s (``fleetsim.bench``:
each a fresh fleet on a fresh schema, beside the reference loop, order
reversed every other repeat). The figure is the median over repeats of the
paired ratio on/off (1.0: no cost; the goal is >= 0.95, a drop of at most
5 %), with its range. On a shared machine read the median.

Beside it, a noise-free bound: the pod-side cost of the metrics hook, timed
in this process (microseconds per step for a batch of 50 through every hook
method a step meets, and milliseconds per snapshot, taken every heartbeat),
turned into the CPU share it costs the fleet at the measured throughput.

    python scripts/bench_metrics.py --store postgresql://postgres@127.0.0.1:5432/test
    python scripts/bench_metrics.py --repeat 7 --pods 5 --steps 20000 --json out.json

Progress on stderr, the result (JSON) on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from fleetsim.bench import BenchPlan, run_bench
from fleetsim.bench.measure import Spread


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=os.environ.get("FLEETSIM_STORE", os.environ.get(
                            "FLEETSIM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")),
                        help="PostgreSQL URL (default: $FLEETSIM_STORE, "
                        "$FLEETSIM_TEST_DATABASE_URL or %(default)s)")
    parser.add_argument("--repeat", "--rounds", dest="repeat", type=int, default=5)
    parser.add_argument("--pods", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--workload", default="noop")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--json", dest="json_out", type=Path, default=None,
                        help="also write the result to this file")
    args = parser.parse_args()
    plan = BenchPlan(pods=(args.pods,), concurrency=(args.concurrency,), batch=(args.batch,),
                     workloads=(args.workload,), steps=args.steps, repeat=args.repeat,
                     metrics=(True, False))
    report = run_bench(plan, args.store, lambda line: print(line, file=sys.stderr))
    on_key, off_key = (config.key for config in plan.fleets())
    by_repeat: dict[int, dict[str, float]] = {}
    for trial in report.trials:
        if trial["key"] in (on_key, off_key) and not trial.get("error"):
            by_repeat.setdefault(trial["repeat"], {})[trial["key"]] = trial["steps_s"]
    pairs = [r for r in by_repeat.values() if r.get(on_key) and r.get(off_key)]
    ratio = Spread.of(r[on_key] / r[off_key] for r in pairs)
    off = Spread.of(r[off_key] for r in pairs)
    cost: dict[str, Any] = hook_cost()
    if off is not None:
        # CPU seconds per second the hooks cost the whole fleet at that rate:
        # per step, plus a snapshot per pod every heartbeat (0.5 s).
        cost["fleet_cpu_s_per_s"] = round(cost["hook_us_per_step"] * off.median / 1e6
                                          + args.pods * 2 * cost["snapshot_ms"] / 1e3, 4)
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("store", "json_out")},
        "ratio_on_off": ratio.as_dict() if ratio else None,
        "on_steps_per_s": s.as_dict() if (s := Spread.of(r[on_key] for r in pairs)) else None,
        "off_steps_per_s": off.as_dict() if off else None,
        "drop_percent_median": round((1 - ratio.median) * 100, 2) if ratio else None,
        "hook_cost": cost, "cores": os.cpu_count(),
        "goal": "ratio >= 0.95 (a drop of at most 5%)",
        "errors": [t["error"] for t in report.trials if t.get("error")],
    }
    text = json.dumps(result, indent=2)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    print(text)
    return 0 if ratio is not None and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
