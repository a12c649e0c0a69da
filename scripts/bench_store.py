#!/usr/bin/env python3
"""The store's bulk submit and its bytes per step (a benchmark, not a test).

What ``fleetsim bench`` does not measure, on the server given by ``--store``:

1. ``Store.submit_many`` of ``--steps`` steps in one call and in chunks of
   ``--chunk`` (steps/s; the order alternates between repeats);
2. table bytes per queued step (``steps``, heap and indexes), and, after the
   queue is drained by the store's own claim loop (``fleetsim bench
   --store-loop``'s, ``--procs`` processes at batch ``--batch``), bytes per
   completed attempt (``finished_attempts``).

Claim throughput beside the raw SKIP LOCKED reference is ``fleetsim bench
--reference-only --store-loop`` (and the fleet's, ``fleetsim bench``). Every
repeat uses a fresh schema, always dropped. Progress on stderr, the table
(and ``--json``) on stdout.

    python scripts/bench_store.py --store postgresql://postgres@127.0.0.1:5432/test
    python scripts/bench_store.py --steps 10000 --repeat 1 --json store.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

from fleetsim.bench import server
from fleetsim.bench.claimers import run_claimers
from fleetsim.bench.measure import Spread
from fleetsim.bench.storeloop import QUEUE, store_loop
from fleetsim.store import StepSpec, Store, StoreConfig

GOAL_SUBMIT_STEPS_S = 100_000
GOAL_BYTES_PER_STEP = 1024
RESET = "TRUNCATE steps, finished_attempts, rejected_writes, pods RESTART IDENTITY"


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[bench_store {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def one_repeat(args: argparse.Namespace, index: int) -> dict[str, Any]:
    """Submit (one call, chunked), bytes per queued step, drain, bytes per attempt."""
    schema = f"bench_store_{os.getpid()}_{secrets.token_hex(3)}"
    app = f"fleetsim-bench-{schema}"
    store = Store(StoreConfig(args.store, schema=schema, application_name=app))
    admin = server.connect(args.store, app, schema)
    specs = [StepSpec(QUEUE, {"n": i}) for i in range(args.steps)]
    out: dict[str, Any] = {"repeat": index}
    try:
        store.init_schema()

        def one_call() -> None:
            server.query(admin, RESET)
            started = time.perf_counter()
            store.submit_many(specs)
            out["one_call_steps_s"] = args.steps / (time.perf_counter() - started)

        def chunked() -> None:
            server.query(admin, RESET)
            started = time.perf_counter()
            for start in range(0, args.steps, args.chunk):
                store.submit_many(specs[start:start + args.chunk])
            out["chunked_steps_s"] = args.steps / (time.perf_counter() - started)

        for run in (one_call, chunked) if index % 2 == 0 else (chunked, one_call):
            run()
        total, heap, indexes = server.query(
            admin, "SELECT pg_total_relation_size('steps'), pg_relation_size('steps'),"
            " pg_indexes_size('steps')")[0]
        out.update(bytes_per_queued_step=total / args.steps, heap_per_step=heap / args.steps,
                   index_per_step=indexes / args.steps)
        store.analyze()
        store.close()  # its pooled backends would count as the claimers'
        drained = run_claimers("store", store_loop, args.store, schema, app, admin,
                               args.procs, args.batch, args.steps, "noop")
        (attempts, size), = server.query(
            admin, "SELECT count(*), pg_total_relation_size('finished_attempts')"
            " FROM finished_attempts WHERE outcome = 'completed'")
        out.update(completed=drained.completed, claim_steps_s=drained.steps_s,
                   bytes_per_completed_attempt=size / max(attempts, 1))
        log(f"repeat {index + 1}: submit {out['one_call_steps_s']:,.0f} (one call) /"
            f" {out['chunked_steps_s']:,.0f} (chunks) steps/s;"
            f" {out['bytes_per_queued_step']:.0f} B/queued step;"
            f" {out['bytes_per_completed_attempt']:.0f} B/completed attempt")
    finally:
        admin.close()
        store.close()
        with contextlib.suppress(Exception):
            server.drop_schema(args.store, schema)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", "--url", dest="store",
                        default=os.environ.get("FLEETSIM_STORE",
                                               "postgresql://postgres@127.0.0.1:5432/test"),
                        help="PostgreSQL URL (default: $FLEETSIM_STORE or %(default)s)")
    parser.add_argument("--steps", type=int, default=100_000, help="steps to submit")
    parser.add_argument("--chunk", type=int, default=None, help="chunk size (default steps/10)")
    parser.add_argument("--procs", type=int, default=5, help="claimer processes of the drain")
    parser.add_argument("--batch", type=int, default=50, help="claim batch of the drain")
    parser.add_argument("--repeat", type=int, default=3, help="repeats (median reported)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if min(args.steps, args.procs, args.batch, args.repeat) < 1:
        parser.error("--steps, --procs, --batch and --repeat must be at least 1")
    args.chunk = args.chunk or max(1, args.steps // 10)
    try:
        runs = [one_repeat(args, index) for index in range(args.repeat)]
    except KeyboardInterrupt:
        log("interrupted; schemas dropped")
        return 130
    summary = {name: Spread.of(r[name] for r in runs) for name in (
        "one_call_steps_s", "chunked_steps_s", "bytes_per_queued_step",
        "bytes_per_completed_attempt")}

    def show(name: str, spec: str) -> str:
        s = summary[name]
        return "-" if s is None else (f"{s.median:{spec}} [{s.low:{spec}}-{s.high:{spec}}]")

    print(f"submit_many of {args.steps:,} steps, median [min-max] of {args.repeat}:")
    print(f"  one call            {show('one_call_steps_s', ',.0f')} steps/s")
    print(f"  chunks of {args.chunk:<9,} {show('chunked_steps_s', ',.0f')} steps/s")
    print(f"  steps table         {show('bytes_per_queued_step', ',.0f')} bytes/queued step")
    print(f"  finished_attempts   {show('bytes_per_completed_attempt', ',.0f')}"
          " bytes/completed attempt")
    one, size = summary["one_call_steps_s"], summary["bytes_per_queued_step"]
    if one and size:
        print(f"goals: submit >= {GOAL_SUBMIT_STEPS_S:,} steps/s: "
              f"{'met' if one.median >= GOAL_SUBMIT_STEPS_S else 'MISSED'}; < "
              f"{GOAL_BYTES_PER_STEP} bytes/queued step: "
              f"{'met' if size.median < GOAL_BYTES_PER_STEP else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "store"},
                       "summary": {k: v.as_dict() if v else None for k, v in summary.items()},
                       "runs": runs}, out, indent=2)
    return 0 if all(r["completed"] == args.steps for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
