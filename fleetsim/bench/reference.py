"""The reference: the smallest honest ``FOR UPDATE SKIP LOCKED`` queue.

N processes, each one psycopg2 connection, claim a batch with one
``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING id``,
run the workload on each step and mark the batch done with one more
statement: two round trips per batch, no leases, no fencing, no history.
That is what the hardware and the server allow; fleetsim's throughput is
reported as a ratio to it, measured side by side in the same run.

It is a product feature, not a test helper: point ``fleetsim bench --store
URL --reference-only`` at your own database to see what a bare queue gets
there. It runs in a schema of its own, always dropped afterwards.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import resource
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Any

from fleetsim.bench import server
from fleetsim.bench.measure import percentile
from fleetsim.errors import ConfigError

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
START_TIMEOUT_S = 120.0


def step_runner(workload: str) -> tuple[str, float]:
    """(kind, seconds) of the workloads the reference can run: noop, sleep:<ms>, cpu:<ms>."""
    kind, _, amount = workload.partition(":")
    if kind == "noop" and not amount:
        return kind, 0.0
    if kind in ("sleep", "cpu"):
        try:
            ms = float(amount)
        except ValueError:
            ms = -1.0
        if ms >= 0:
            return kind, ms / 1000.0
    raise ConfigError(f"the reference loop runs noop, sleep:<ms> and cpu:<ms>, not {workload!r}")


@dataclass(frozen=True)
class ReferenceResult:
    """One run of the reference loop."""

    procs: int
    batch: int
    workload: str
    steps: int
    completed: int
    seconds: float  # first claim -> last completion
    e2e_s: tuple[float, float, float] | None  # p50/p95/p99, from the start to each completion
    client_cpu_s: float
    server_cpu_s: float | None  # local server only
    transactions: int | None  # the database's, over the run (others' too)
    peak_rss: int  # the largest claimer's, bytes

    @property
    def steps_s(self) -> float:
        """Completed steps per second."""
        return self.completed / self.seconds if self.seconds > 0 else 0.0


def _claimer(url: str, schema: str, app: str, batch: int, workload: str,
             barriers: tuple[Any, Any, Any], results: Any) -> None:
    """One claimer process: connect, wait for the start, claim+run+done until empty."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C
    kind, seconds = step_runner(workload)
    out: dict[str, Any] = {"pid": os.getpid()}
    try:
        conn = server.connect(url, app, schema)
        cur = conn.cursor()
        barriers[0].wait(timeout=START_TIMEOUT_S)
        barriers[1].wait(timeout=START_TIMEOUT_S)
        cpu0 = time.process_time()
        start = time.monotonic()
        done_at: list[float] = []
        while True:
            cur.execute(CLAIM, (batch,))
            ids = [row[0] for row in cur.fetchall()]
            if not ids:
                break
            for _ in ids:
                if kind == "sleep":
                    time.sleep(seconds)
                elif kind == "cpu":
                    until = time.process_time() + seconds
                    while time.process_time() < until:
                        pass
            cur.execute(DONE, (ids,))
            now = time.monotonic()
            done_at.extend([now] * cur.rowcount)
        out.update(start=start, done_at=done_at, cpu_s=time.process_time() - cpu0,
                   rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        results.put(out)
        barriers[2].wait(timeout=START_TIMEOUT_S)  # keep the connection until counted
        conn.close()
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        for barrier in barriers:
            with contextlib.suppress(Exception):
                barrier.abort()
        results.put(out)


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
    ctx = mp.get_context("spawn")
    children: list[Any] = []
    try:
        server.query(admin, f'CREATE SCHEMA "{schema}"')
        for ddl in DDL:
            server.query(admin, ddl)
        server.query(admin, FILL, (steps,))
        server.query(admin, "ANALYZE ref_jobs")
        with contextlib.suppress(Exception):
            server.query(admin, "CHECKPOINT")
        barriers = tuple(ctx.Barrier(procs + 1) for _ in range(3))
        results = ctx.Queue()
        children = [ctx.Process(target=_claimer, daemon=True,
                                args=(url, schema, app, batch, workload, barriers, results))
                    for _ in range(procs)]
        # Started with SIGINT blocked (the mask survives exec): a Ctrl-C during
        # their start must not kill them half-way; the parent ends them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for child in children:
                child.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        barriers[0].wait(timeout=START_TIMEOUT_S)  # every claimer is connected
        backends = server.backends_named(admin, app)
        cpu_before = server.backend_cpu(backends)
        xacts_before = server.transactions(admin)
        barriers[1].wait(timeout=START_TIMEOUT_S)  # go
        outs: list[dict[str, Any]] = []
        while len(outs) < procs:
            try:
                outs.append(results.get(timeout=1))
            except queue_mod.Empty:
                if not any(c.is_alive() for c in children) and results.empty():
                    raise RuntimeError("reference claimers died without a result") from None
        errors = [o["error"] for o in outs if "error" in o]
        if errors:
            raise RuntimeError(f"reference claimer failed: {errors[0]}")
        cpu_after = server.backend_cpu(backends) if cpu_before is not None else None
        barriers[2].wait(timeout=START_TIMEOUT_S)
        for child in children:
            child.join(10)
        time.sleep(0.6)  # let the claimers' statistics reach pg_stat_database
        xacts_after = server.transactions(admin)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
                child.join(5)
        with contextlib.suppress(Exception):
            server.query(admin, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.close()
    start = min(o["start"] for o in outs)
    done = sorted(t - start for o in outs for t in o["done_at"])
    server_cpu = None
    if cpu_before is not None and cpu_after is not None:
        server_cpu = sum(v - cpu_before.get(pid, 0.0) for pid, v in cpu_after.items())
    e2e = None
    if done:
        p50, p95, p99 = (percentile(done, q) for q in (0.5, 0.95, 0.99))
        e2e = (p50 or 0.0, p95 or 0.0, p99 or 0.0)
    return ReferenceResult(
        procs=procs, batch=batch, workload=workload, steps=steps, completed=len(done),
        seconds=done[-1] if done else 0.0, e2e_s=e2e,
        client_cpu_s=sum(o["cpu_s"] for o in outs), server_cpu_s=server_cpu,
        transactions=(xacts_after - xacts_before
                      if xacts_before is not None and xacts_after is not None else None),
        peak_rss=max(o["rss"] for o in outs),
    )
