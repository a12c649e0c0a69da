#!/usr/bin/env python3
"""Where the store's server CPU per step goes: its claim and completion SQL, and variants.

N processes drain a fresh store schema with the store's own CLAIM and
COMPLETE statements, through psycopg2, each reading its backend's CPU
(psutil, local server only) around the drain. Each variant takes one piece
out (a lock, the history row, the token sequence, the fence): what the
server's µs/step drops by is what that piece costs. Variants are interleaved,
the order reversed every other round; medians are printed. A variant whose
edit no longer matches the store's SQL fails the run (the SQL changed:
update the variant). Not a correctness tool: the variants are broken on
purpose and only ever run on the script's own schema.

    python scripts/bench_sql_variants.py --store postgresql://postgres@127.0.0.1:5432/test
    python scripts/bench_sql_variants.py --variants as-is,bare-complete --rounds 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import psutil
import psycopg2

from fleetsim.store import StepSpec, Store, StoreConfig
from fleetsim.store import queries as q

Edit = Callable[[str], str]


def _replace(old: str, new: str) -> Edit:
    def edit(sql: str) -> str:
        if old not in sql:
            raise SystemExit(f"the store's SQL no longer holds {old!r}: update this variant")
        return sql.replace(old, new)
    return edit


def _drop_history(sql: str) -> str:
    start, end = sql.index("recorded AS ("), sql.index("), repeated AS (")
    return sql[:start - 2] + sql[end + 1:]  # the ", recorded AS (...)" CTE, and its comma


BARE_COMPLETE = (
    "UPDATE steps SET status = 'completed', finished_at = statement_timestamp()"
    " WHERE id = ANY(ARRAY(SELECT CAST(x->>'id' AS bigint)"
    " FROM jsonb_array_elements(CAST(:items AS jsonb)) x)) RETURNING id"
)

# name -> (edit of CLAIM, edit of COMPLETE)
VARIANTS: dict[str, tuple[Edit | None, Edit | None]] = {
    "as-is": (None, None),
    "no-queue-lock": (_replace("FOR KEY SHARE))", "))"), None),
    "no-pod-lock": (_replace("FOR SHARE)", ")"), None),
    "no-nextval": (_replace("nextval('claim_token_seq') AS token",
                            "s.id + 1000000000 AS token"), None),
    "no-history-row": (None, _drop_history),
    "bare-complete": (None, lambda _sql: BARE_COMPLETE),
}


def _psycopg(sql: str) -> str:
    return re.sub(r"(?<!:):([a-z_]+)", r"%(\1)s", sql)


def _claimer(url: str, schema: str, index: int, batch: int, claim: str, complete: str,
             out: Any) -> None:
    conn = psycopg2.connect(url, options=f"-c search_path={schema}")
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")
    backend = psutil.Process(cur.fetchone()[0])
    conn.commit()
    before = sum(backend.cpu_times()[:2])
    out.put("ready")
    done = 0
    while True:
        cur.execute(claim, {"queues": ["default"], "pod": f"bench-pod-{index}",
                            "batch": batch, "incarnation": 0})
        rows = cur.fetchall()
        conn.commit()
        if not rows:
            break
        items = json.dumps([{"id": r[0], "token": r[6], "result": None} for r in rows])
        cur.execute(complete, {"items": items})
        cur.fetchall()
        conn.commit()
        done += len(rows)
    out.put((done, sum(backend.cpu_times()[:2]) - before))
    conn.close()


def trial(url: str, variant: str, steps: int, procs: int, batch: int) -> tuple[float, float]:
    """(steps/s, server µs/step) of one drain with ``variant``."""
    claim_edit, complete_edit = VARIANTS[variant]
    claim = _psycopg(claim_edit(q.CLAIM) if claim_edit else q.CLAIM)
    complete = _psycopg(complete_edit(q.COMPLETE) if complete_edit else q.COMPLETE)
    schema = f"bench_sql_{uuid.uuid4().hex[:8]}"
    store = Store(StoreConfig(url, schema=schema, application_name="bench-sql"))
    try:
        store.init_schema()
        for index in range(procs):
            store.register_pod(f"bench-pod-{index}", pid=os.getpid())
        for start in range(0, steps, 10_000):
            store.submit_many([StepSpec("default")] * min(10_000, steps - start))
        store.analyze()
        out: Any = mp.Queue()
        workers = [mp.Process(target=_claimer, args=(url, schema, i, batch, claim, complete, out))
                   for i in range(procs)]
        for worker in workers:
            worker.start()
        for _ in workers:
            out.get(timeout=60)  # each connected, its backend's CPU read
        started = time.monotonic()
        done, server_s = 0, 0.0
        for _ in workers:
            n, cpu = out.get(timeout=600)
            done, server_s = done + n, server_s + cpu
        seconds = time.monotonic() - started
        for worker in workers:
            worker.join(30)
        if done != steps:
            raise SystemExit(f"{variant}: drained {done} of {steps} steps")
        return done / seconds, server_s / done * 1e6
    finally:
        store.drop_schema()
        store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=os.environ.get("FLEETSIM_STORE"),
                        help="PostgreSQL URL, local server (its backends' CPU is read)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=30_000)
    parser.add_argument("--procs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.store:
        parser.error("give --store URL (or FLEETSIM_STORE)")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            results[name].append(trial(args.store, name, args.steps, args.procs, args.batch))
            print(f"round {round_ + 1}: {name}: {results[name][-1][1]:.1f} server µs/step",
                  file=sys.stderr)
    print(f"{'variant':16s} {'steps/s':>9s} {'server µs/step':>15s}  per round")
    for name, runs in results.items():
        print(f"{name:16s} {statistics.median(r[0] for r in runs):9.0f}"
              f" {statistics.median(r[1] for r in runs):15.1f}  {[round(r[1], 1) for r in runs]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
