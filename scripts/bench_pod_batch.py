#!/usr/bin/env python3
"""The pod's own CPU per step, without a store: ``Pod._run_batch`` on no-op batches.

Runs batches of no-op steps through a pod's lane pool and hooks (the claim
and the writes are left out: no store is touched) and prints the process's
CPU per step, with and without the metrics hook, median of --rounds. What
a fleet's "client µs/step" holds beyond the store's own loop is this, plus
the writes' bookkeeping, heartbeats and the bus.

    python scripts/bench_pod_batch.py
    python scripts/bench_pod_batch.py --batch 50 --batches 200 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from fleetsim.store import StoreConfig
from fleetsim.store.records import ClaimedStep
from pods.config import PodConfig
from pods.pod import Pod


def cpu_per_step(metrics: bool, batch: int, batches: int) -> float:
    """Process CPU (every thread) per step over ``batches`` batches, in µs."""
    # The store is never reached: _run_batch only runs the steps.
    pod = Pod(PodConfig("bench-pod", StoreConfig("postgresql://unused@127.0.0.1/unused"),
                        batch=batch), store=None)  # type: ignore[arg-type]
    if metrics:
        pod.enable_metrics()
    try:
        started = time.process_time()
        for n in range(batches):
            steps = [ClaimedStep(n * batch + i, "default", 0, {}, 0, 3, n * batch + i, None, 0.01)
                     for i in range(batch)]
            pod._notify("on_claimed", steps)
            pod._run_batch(steps)
        return (time.process_time() - started) / (batch * batches) * 1e6
    finally:
        pod._pool.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    for metrics in (False, True):
        runs = [cpu_per_step(metrics, args.batch, args.batches) for _ in range(args.rounds)]
        print(f"metrics {'on ' if metrics else 'off'}: {statistics.median(runs):.2f} µs/step"
              f" of CPU (median of {args.rounds}; {min(runs):.2f}-{max(runs):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
