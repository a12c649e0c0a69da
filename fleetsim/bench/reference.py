"""The reference: the smallest honest ``FOR UPDATE SKIP LOCKED`` queue.

N processes, each one psycopg2 connection, claim a batch with one
``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING id``,
run the workload on each step and mark the batch done with one more
statement: two round trips per batch, no leases, no fencing, no history.
That is what the hardware and the server allow; fleetsim's throughput is
reported as a ratio to it, measured side by side in the same run.

It is a product feature, not a test helper: point ``fleetsim bench --store
URL --reference-only`` at your own database to see what a bare queue gets
there. It runs in a schema of its own, always dropped afterwards. The
processes around the loop are :mod:`fleetsim.bench.claimers`'.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time

from fleetsim.bench import server
from fleetsim.bench.claimers import (
    ClaimerResult,
    Clock,
    run_claimers,
    step_runner,
    step_work,
)

DDL = (
    "CREATE TABLE ref_jobs (id bigserial PRIMARY KEY, status text NOT NULL,"
    " payload jsonb, priority int NOT NULL DEFAULT 0)",
    "CREATE INDEX ref_jobs_queued ON ref_jobs (priority, id) WHERE status = 'queued'",
)
CLAIM = (
    "UPDATE ref_jobs SET status = 'running' WHERE id IN ("
    "SELECT id FROM ref_jobs WHERE status = 'queued' ORDER BY priority, id"
    " LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id"
)
DONE = "UPDATE ref_jobs SET status = 'done' WHERE id = ANY(%s)"
FILL = (
    "INSERT INTO ref_jobs (status, payload, priority)"
    " SELECT 'queued', jsonb_build_object('n', g), 0 FROM generate_series(1, %s) g"
)

ReferenceResult = ClaimerResult  # the name the matrix and users know

__all__ = ["ReferenceResult", "reference_loop", "run_reference", "step_runner"]


def reference_loop(url: str, schema: str, app: str, index: int, batch: int, workload: str,
                   clock: Clock) -> None:
    """One reference claimer: claim a batch, run it, mark it done, until the queue is empty."""
    work = step_work(workload)
    conn = server.connect(url, app, schema)
    try:
        cur = conn.cursor()
        clock.ready()
        done_at: list[float] = []
        while True:
            cur.execute(CLAIM, (batch,))
            ids = [row[0] for row in cur.fetchall()]
            if not ids:
                break
            for _ in ids:
                work()
            cur.execute(DONE, (ids,))
            done_at.extend([time.monotonic()] * cur.rowcount)
        clock.done(done_at)
    finally:
        conn.close()


def run_reference(url: str, procs: int, batch: int, steps: int,
                  workload: str = "noop") -> ReferenceResult:
    """Fill a fresh schema with ``steps`` jobs and drain them with ``procs`` processes.

    The table is ANALYZEd and CHECKPOINTed (if allowed) after the fill, so
    neither stale statistics nor the fill's write burst weigh on the run.
    Raises RuntimeError if a claimer fails; the schema is always dropped.
    """
    step_runner(workload)  # a workload it cannot run is rejected before anything starts
    schema = f"bench_ref_{os.getpid()}_{secrets.token_hex(3)}"
    app = f"fleetsim-bench-{schema}"
    admin = server.connect(url, app, schema)
    try:
        server.query(admin, f'CREATE SCHEMA "{schema}"')
        for ddl in DDL:
            server.query(admin, ddl)
        server.query(admin, FILL, (steps,))
        server.query(admin, "ANALYZE ref_jobs")
        with contextlib.suppress(Exception):
            server.query(admin, "CHECKPOINT")
        return run_claimers("reference", reference_loop, url, schema, app, admin,
                            procs, batch, steps, workload)
    finally:
        with contextlib.suppress(Exception):
            server.query(admin, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()
