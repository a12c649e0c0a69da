#!/usr/bin/env python3
"""The cost of client histories: fleet throughput with them on versus off.

Both modes run in the same invocation, alternating (on, off, off, on, ...)
so that drift of a noisy machine falls on both; each round is a fresh
fleet on a fresh schema draining the same bulk of no-op steps. Throughput
is completed steps over the store's own window (first claim to last
completion, database time). Prints the median of each mode and the median
of the paired ratios (on / off).

    python scripts/bench_client_history.py --store postgresql://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from fleetsim.coordinator import Coordinator, FleetSpec
from fleetsim.store import StepSpec, Store, StoreConfig


def one_round(url: str, history: bool, pods: int, steps: int, batch: int) -> float:
    """Steps per second of one fleet draining ``steps`` no-op steps."""
    schema = f"bench_ch_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="fleetsim-bench-") as run_dir:
        fleet = Coordinator(FleetSpec(run_dir=Path(run_dir), pods=pods, batch=batch,
                                      store_url=url, schema=schema, fault_proxy=False,
                                      client_history=history))
        admin = Store(StoreConfig(url, schema=schema))
        try:
            admin.init_schema()
            admin.submit_many([StepSpec("default", {})] * steps)
            admin.analyze()
            fleet.start()
            deadline = time.monotonic() + 300
            while admin.status_counts()["completed"] < steps:
                if time.monotonic() > deadline:
                    raise RuntimeError("the fleet did not drain in 300 s")
                fleet.poll()
                time.sleep(0.05)
            window = admin.run_summary()["window_s"]
        finally:
            fleet.stop(grace_s=2.0)
            admin.drop_schema()
            admin.close()
    return steps / float(window)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=os.environ.get(
        "FLEETSIM_STORE", "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--rounds", type=int, default=5, help="pairs of runs (default 5)")
    parser.add_argument("--pods", type=int, default=5)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    on: list[float] = []
    off: list[float] = []
    for r in range(args.rounds):
        order = (True, False) if r % 2 == 0 else (False, True)
        got = {mode: one_round(args.store, mode, args.pods, args.steps, args.batch)
               for mode in order}
        on.append(got[True])
        off.append(got[False])
        print(f"round {r + 1}: on {got[True]:,.0f} steps/s, off {got[False]:,.0f} steps/s,"
              f" ratio {got[True] / got[False]:.3f}", file=sys.stderr)
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    figures = {
        "pods": args.pods, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
        "on_median": statistics.median(on), "off_median": statistics.median(off),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    print(f"client history on:  {figures['on_median']:,.0f} steps/s (median of {args.rounds})")
    print(f"client history off: {figures['off_median']:,.0f} steps/s")
    print(f"paired ratio on/off: median {figures['ratio_median']:.3f}"
          f" (min {figures['ratio_min']:.3f}, max {figures['ratio_max']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
