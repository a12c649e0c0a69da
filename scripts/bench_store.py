#!/usr/bin/env python3
"""Benchmark the fleetsim PostgreSQL store (a benchmark, not a test).

Measures, on the server given by ``--url``:

1. bulk submit: ``Store.submit_many`` of 100,000 steps in one call and in
   chunks of 10,000 (steps/s);
2. claim+complete of no-op steps with 1, 2, 5 and 10 claimer processes
   (spawn) at batch 1 and batch 50, store vs. a minimal hand-written
   ``FOR UPDATE SKIP LOCKED`` reference on plain psycopg2, interleaved A/B so
   machine noise hits both;
3. the ratio store/reference per (processes, batch);
4. table bytes per queued step (``steps``) and per completed attempt
   (``finished_attempts``).

Every run (``--repeat N``, median reported) uses its own fresh PostgreSQL
schema, dropped at the end, also on Ctrl-C or SIGTERM.

    /work/venv/bin/python scripts/bench_store.py                 # full run
    /work/venv/bin/python scripts/bench_store.py --quick --repeat 1
    /work/venv/bin/python scripts/bench_store.py --json bench.json
    /work/venv/bin/python scripts/bench_store.py --procs 5 --batches 50 --skip-submit

Before a claim run the freshly filled table is ANALYZEd (both sides), as
autovacuum would do soon after a bulk submit; ``--no-analyze`` skips that to
show the plans a store gets right after a big submit. After each fill the
script also runs CHECKPOINT (if allowed; ``--no-checkpoint`` to skip), so the
flush of that write burst does not land on whichever trial runs next.

Progress goes to stderr, the result table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg2

try:
    from fleetsim.store import StepSpec, Store, StoreConfig
except ImportError:  # run from a checkout without installing: the root is scripts/..
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fleetsim.store import StepSpec, Store, StoreConfig

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
QUEUE = "default"

# Goals (see the task that asked for this benchmark).
GOAL_SUBMIT_STEPS_S = 100_000
GOAL_RATIO = 0.70
GOAL_RATIO_PROCS = 5
GOAL_BYTES_PER_STEP = 1024

# The reference: the smallest honest SKIP LOCKED queue.
REF_DDL = (
    "CREATE TABLE ref_jobs (id bigserial PRIMARY KEY, status text NOT NULL,"
    " payload jsonb, priority int NOT NULL DEFAULT 0)",
    "CREATE INDEX ref_jobs_queued ON ref_jobs (priority, id) WHERE status = 'queued'",
)
REF_CLAIM = (
    "UPDATE ref_jobs SET status = 'running' WHERE id IN ("
    "SELECT id FROM ref_jobs WHERE status = 'queued' ORDER BY priority, id"
    " LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id"
)
REF_DONE = "UPDATE ref_jobs SET status = 'done' WHERE id = ANY(%s)"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def libpq_dsn(url: str) -> str:
    """The URL as libpq wants it (SQLAlchemy's ``+psycopg2`` suffix removed)."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


def connect(url: str, schema: str | None, app: str) -> Any:
    options = f"-c search_path={schema}" if schema else ""
    conn = psycopg2.connect(
        libpq_dsn(url), application_name=app, options=options, connect_timeout=10
    )
    conn.autocommit = True
    return conn


# -- claimer processes (spawned: top-level functions, picklable by name) ------


def _claimer(
    kind: str, url: str, schema: str, app: str, pod: str, batch: int,
    barriers: tuple[Any, Any, Any], results: Any,
) -> None:
    """One claimer process: connect, wait for the start, claim+complete until empty.

    ``barriers`` are (ready, go, finish): the parent samples the server's CPU
    between ready and go, and again once the results are in, before finish
    lets the claimers close their connections.
    """
    # The parent owns Ctrl-C: it terminates us and cleans up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out: dict[str, Any] = {"pod": pod, "pid": os.getpid()}
    try:
        if kind == "store":
            _store_loop(url, schema, app, pod, batch, barriers, results, out)
        else:
            _ref_loop(url, schema, app, batch, barriers, results, out)
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        for barrier in barriers:
            with contextlib.suppress(Exception):
                barrier.abort()
        results.put(out)


def _report(
    out: dict[str, Any], barriers: tuple[Any, Any, Any], results: Any,
    first: float, last: float, cpu0: float, done: int, claims: int,
) -> None:
    out.update(first_claim=first, last_done=last, completed=done, claims=claims,
               client_cpu_s=time.process_time() - cpu0)
    results.put(out)
    barriers[2].wait(timeout=300)


def _store_loop(
    url: str, schema: str, app: str, pod: str, batch: int,
    barriers: tuple[Any, Any, Any], results: Any, out: dict[str, Any],
) -> None:
    store = Store(StoreConfig(url, schema=schema, application_name=app))
    try:
        store.register_pod(pod, pid=os.getpid())
        store.ping()  # the pooled connection is open before the clock starts
        barriers[0].wait(timeout=300)
        barriers[1].wait(timeout=300)
        cpu0 = time.process_time()
        first = time.monotonic()
        last = first
        done = claims = 0
        while True:
            steps = store.claim_steps(pod, [QUEUE], batch)
            claims += 1
            if not steps:
                break
            accepted = store.complete_many([(s.id, s.claim_token, None) for s in steps])
            done += len(accepted)
            last = time.monotonic()
        _report(out, barriers, results, first, last, cpu0, done, claims)
    finally:
        store.close()


def _ref_loop(
    url: str, schema: str, app: str, batch: int,
    barriers: tuple[Any, Any, Any], results: Any, out: dict[str, Any],
) -> None:
    conn = connect(url, schema, app)
    try:
        cur = conn.cursor()
        barriers[0].wait(timeout=300)
        barriers[1].wait(timeout=300)
        cpu0 = time.process_time()
        first = time.monotonic()
        last = first
        done = claims = 0
        while True:
            cur.execute(REF_CLAIM, (batch,))
            ids = [row[0] for row in cur.fetchall()]
            claims += 1
            if not ids:
                break
            cur.execute(REF_DONE, (ids,))
            done += cur.rowcount
            last = time.monotonic()
        _report(out, barriers, results, first, last, cpu0, done, claims)
    finally:
        conn.close()


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of a local PostgreSQL backend; None if we cannot see it.

    A remote server's backend pid may name an unrelated local process: only a
    process called ``postgres`` counts.
    """
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != "postgres":
                return None
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


# -- one benchmark run: its own schema ----------------------------------------


class Run:
    """One run of everything, in a fresh schema that is always dropped."""

    def __init__(
        self, url: str, index: int, ctx: Any, analyze: bool = True, checkpoint: bool = True
    ) -> None:
        self.url = url
        self.analyze = analyze
        self.checkpoint = checkpoint
        self.index = index
        self.ctx = ctx
        self.schema = f"bench_store_{os.getpid()}_{index}_{secrets.token_hex(3)}"
        # Every connection of this run (ours and the claimers') carries this
        # name, so cleanup can end exactly the backends this run started.
        self.app = f"fleetsim-bench-{self.schema}"[:63]
        self.children: list[Any] = []
        self.store: Store | None = None
        self.admin: Any = None

    # setup / teardown

    def setup(self) -> None:
        self.admin = connect(self.url, self.schema, self.app)
        self.store = Store(StoreConfig(self.url, schema=self.schema, application_name=self.app))
        self.store.init_schema()
        with self.admin.cursor() as cur:
            for ddl in REF_DDL:
                cur.execute(ddl)
        log(f"run {self.index}: schema {self.schema} created")

    def cleanup(self) -> None:
        """Stop our claimers, end our leftover backends, drop the schema."""
        for proc in self.children:
            if proc.is_alive():
                proc.terminate()
        for proc in self.children:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self.children.clear()
        if self.store is not None:
            self.store.close()
        admin = self.admin
        try:
            if admin is None or admin.closed:
                admin = connect(self.url, None, self.app)
            with admin.cursor() as cur:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = %s AND pid <> pg_backend_pid()",
                    (self.app,),
                )
        except psycopg2.Error as exc:
            log(f"run {self.index}: could not end leftover connections: {exc}")
        dropped = False
        if self.store is not None:
            try:
                self.store.drop_schema()
                dropped = True
            except Exception as exc:
                log(f"run {self.index}: Store.drop_schema failed ({exc}); retrying directly")
            finally:
                self.store.close()
        if not dropped and admin is not None:
            try:
                with admin.cursor() as cur:
                    cur.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
                dropped = True
            except psycopg2.Error as exc:
                log(f"run {self.index}: DROP SCHEMA {self.schema} failed: {exc}")
        if admin is not None:
            admin.close()
        self.admin = None
        if dropped:
            log(f"run {self.index}: schema {self.schema} dropped")

    def sql(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.admin.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def settle(self) -> None:
        """Flush dirty pages now, so a write burst (a fill) is not paid by the next trial."""
        if not self.checkpoint:
            return
        try:
            self.sql("CHECKPOINT")
        except psycopg2.Error as exc:  # not a superuser (or pg_checkpoint member)
            log(f"CHECKPOINT not allowed ({str(exc).strip()}); continuing without")
            self.checkpoint = False

    def reset_store_tables(self) -> None:
        self.sql("TRUNCATE steps, finished_attempts, rejected_writes, pods RESTART IDENTITY")

    # 1. bulk submit + 5. bytes per queued step

    def bench_submit(self, n: int, chunk: int) -> dict[str, Any]:
        assert self.store is not None
        specs = [StepSpec(QUEUE, {"n": i}) for i in range(n)]
        out: dict[str, Any] = {"steps": n, "chunk": chunk}

        def one_call() -> None:
            self.reset_store_tables()
            t0 = time.perf_counter()
            ids = self.store.submit_many(specs)  # type: ignore[union-attr]
            elapsed = time.perf_counter() - t0
            assert len(ids) == n, (len(ids), n)
            out["one_call_s"] = elapsed
            out["one_call_steps_s"] = n / elapsed
            total, heap, indexes, count = self.sql(
                "SELECT pg_total_relation_size('steps'), pg_relation_size('steps'),"
                " pg_indexes_size('steps'), (SELECT count(*) FROM steps)"
            )[0]
            out["steps_total_bytes"] = total
            out["steps_heap_bytes"] = heap
            out["steps_index_bytes"] = indexes
            out["bytes_per_queued_step"] = total / count
            log(
                f"run {self.index}: submit_many({n}) one call: {elapsed:.2f} s ="
                f" {n / elapsed:,.0f} steps/s; {total / count:.0f} B/step"
                f" (heap {heap / count:.0f}, indexes {indexes / count:.0f})"
            )

        def chunked() -> None:
            self.reset_store_tables()
            t0 = time.perf_counter()
            got = 0
            for start in range(0, n, chunk):
                got += len(self.store.submit_many(specs[start:start + chunk]))  # type: ignore[union-attr]
            elapsed = time.perf_counter() - t0
            assert got == n, (got, n)
            out["chunked_s"] = elapsed
            out["chunked_steps_s"] = n / elapsed
            log(
                f"run {self.index}: submit_many in chunks of {chunk}: {elapsed:.2f} s ="
                f" {n / elapsed:,.0f} steps/s"
            )

        # Alternate the order between runs so neither always goes first.
        for step in (one_call, chunked) if self.index % 2 == 0 else (chunked, one_call):
            step()
        self.reset_store_tables()
        self.settle()
        return out

    # 2./3. claim + complete

    def fill(self, kind: str, n: int) -> None:
        if kind == "store":
            assert self.store is not None
            self.reset_store_tables()
            for start in range(0, n, 10_000):
                self.store.submit_many(
                    [StepSpec(QUEUE, {"n": i}) for i in range(start, min(n, start + 10_000))]
                )
            if self.analyze:
                self.sql("ANALYZE steps")
        else:
            self.sql("TRUNCATE ref_jobs RESTART IDENTITY")
            self.sql(
                "INSERT INTO ref_jobs (status, payload, priority)"
                " SELECT 'queued', jsonb_build_object('n', g), 0"
                " FROM generate_series(0, %s - 1) g",
                (n,),
            )
            if self.analyze:
                self.sql("ANALYZE ref_jobs")
        self.settle()

    def backend_cpu(self) -> dict[int, float] | None:
        """CPU seconds of each server backend of this run's claimers (local server only)."""
        rows = self.sql(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND pid <> pg_backend_pid()",
            (self.app,),
        )
        cpu = {}
        for (pid,) in rows:
            value = _process_cpu_s(pid)
            if value is None:
                return None
            cpu[pid] = value
        return cpu

    def bench_claim(self, kind: str, procs: int, batch: int, n: int) -> dict[str, Any]:
        self.fill(kind, n)
        barriers = tuple(self.ctx.Barrier(procs + 1) for _ in range(3))
        results = self.ctx.Queue()
        self.children = [
            self.ctx.Process(
                target=_claimer,
                args=(kind, self.url, self.schema, self.app, f"bench-pod-{i}", batch,
                      barriers, results),
                daemon=True,
            )
            for i in range(procs)
        ]
        # Claimers start with SIGINT blocked (the mask survives exec): a Ctrl-C
        # during their start-up must not kill them half-way; we terminate them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for proc in self.children:
                proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        load = os.getloadavg()[0]
        barriers[0].wait(timeout=300)  # every claimer is connected (and registered)
        cpu_before = self.backend_cpu()
        barriers[1].wait(timeout=300)  # go
        outs: list[dict[str, Any]] = []
        deadline = time.monotonic() + 1800
        while len(outs) < procs:
            try:
                outs.append(results.get(timeout=1))
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} claimers did not finish in time") from None
                if not any(p.is_alive() for p in self.children) and results.empty():
                    raise RuntimeError(f"{kind} claimers died without a result") from None
        cpu_after = self.backend_cpu() if cpu_before is not None else None
        if not any("error" in o for o in outs):
            barriers[2].wait(timeout=300)  # the claimers may close their connections now
        for proc in self.children:
            proc.join(30)
        self.children = []
        errors = [o["error"] for o in outs if "error" in o]
        if errors:
            raise RuntimeError(f"{kind} claimer failed: {errors[0]}")
        completed = sum(o["completed"] for o in outs)
        span = max(o["last_done"] for o in outs) - min(o["first_claim"] for o in outs)
        result: dict[str, Any] = {
            "kind": kind, "procs": procs, "batch": batch, "steps": n,
            "completed": completed, "seconds": span,
            "steps_s": completed / span if span > 0 else 0.0,
            "claims": sum(o["claims"] for o in outs),
            "per_process": sorted(o["completed"] for o in outs),
            "loadavg_1m_before": load,
            "client_cpu_us_per_step": 1e6 * sum(o["client_cpu_s"] for o in outs)
            / max(completed, 1),
            "server_cpu_us_per_step": None,
        }
        if cpu_before is not None and cpu_after is not None:
            server = sum(v - cpu_before.get(pid, 0.0) for pid, v in cpu_after.items())
            result["server_cpu_us_per_step"] = 1e6 * server / max(completed, 1)
        if kind == "store":
            (left,) = self.sql("SELECT count(*) FROM steps WHERE status <> 'completed'")[0]
            total_s, total_a, attempts = self.sql(
                "SELECT pg_total_relation_size('steps'),"
                " pg_total_relation_size('finished_attempts'),"
                " (SELECT count(*) FROM finished_attempts WHERE outcome = 'completed')"
            )[0]
            result["steps_bytes_per_completed_step"] = total_s / max(completed, 1)
            result["attempt_bytes_per_completed_attempt"] = total_a / max(attempts, 1)
            result["completed_attempts"] = attempts
        else:
            (left,) = self.sql("SELECT count(*) FROM ref_jobs WHERE status <> 'done'")[0]
        result["not_done"] = left
        result["ok"] = completed == n and left == 0
        log(
            f"run {self.index}: {kind:5s} procs={procs:2d} batch={batch:2d}:"
            f" {completed}/{n} in {span:.2f} s = {result['steps_s']:,.0f} steps/s"
            f" (load {load:.1f}){'' if result['ok'] else '  !! NOT ALL DONE'}"
        )
        return result


@contextmanager
def fresh_run(
    url: str, index: int, ctx: Any, analyze: bool, checkpoint: bool
) -> Iterator[Run]:
    run = Run(url, index, ctx, analyze, checkpoint)
    try:
        run.setup()
        yield run
    finally:
        # Finish the cleanup even if Ctrl-C is pressed again meanwhile.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            run.cleanup()
        finally:
            signal.signal(signal.SIGINT, previous)


# -- summary ------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cpu_split(rows: list[dict[str, Any]], kind: str) -> dict[str, float | None]:
    """Median client and server CPU per step of one kind's trials."""
    mine = [r for r in rows if r["kind"] == kind]
    server = [r["server_cpu_us_per_step"] for r in mine
              if r["server_cpu_us_per_step"] is not None]
    return {
        "client": statistics.median(r["client_cpu_us_per_step"] for r in mine),
        "server": statistics.median(server) if server else None,
    }


def summarise(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    submit = raw["submit"]
    summary: dict[str, Any] = {"submit": None, "claim": []}
    if submit:
        summary["submit"] = {
            "steps": args.submit_steps,
            "chunk": args.chunk,
            "one_call_steps_s": stats([r["one_call_steps_s"] for r in submit]),
            "chunked_steps_s": stats([r["chunked_steps_s"] for r in submit]),
            "bytes_per_queued_step": stats([r["bytes_per_queued_step"] for r in submit]),
        }
    claims = raw["claim"]
    attempt_bytes = []
    for batch in args.batches:
        for procs in args.procs:
            rows = [r for r in claims if r["procs"] == procs and r["batch"] == batch]
            ref = [r["steps_s"] for r in rows if r["kind"] == "ref"]
            sto = [r["steps_s"] for r in rows if r["kind"] == "store"]
            if not ref or not sto:
                continue
            paired = [
                s["steps_s"] / r["steps_s"]
                for r in rows if r["kind"] == "ref"
                for s in rows if s["kind"] == "store" and s["run"] == r["run"]
            ]
            summary["claim"].append({
                "procs": procs, "batch": batch,
                "steps": rows[0]["steps"],
                "reference_steps_s": stats(ref),
                "store_steps_s": stats(sto),
                "reference_cpu_us_per_step": cpu_split(rows, "ref"),
                "store_cpu_us_per_step": cpu_split(rows, "store"),
                "ratio_of_medians": statistics.median(sto) / statistics.median(ref),
                "paired_ratio": stats(paired),
                "all_ok": all(r["ok"] for r in rows),
            })
            attempt_bytes += [
                r["attempt_bytes_per_completed_attempt"]
                for r in rows if r["kind"] == "store" and r["batch"] > 1
            ]
    if attempt_bytes:
        summary["attempt_bytes_per_completed_attempt"] = stats(attempt_bytes)
    return summary


def fmt_range(s: dict[str, float], spec: str = ",.0f") -> str:
    return f"{s['median']:{spec}} ({s['min']:{spec}}-{s['max']:{spec}})"


def print_report(summary: dict[str, Any], meta: dict[str, Any]) -> None:
    sub = summary["submit"]
    print()
    print(f"fleetsim store benchmark - {meta['runs']} run(s), median (min-max)")
    print(f"store code {meta['fleetsim']}; server {meta['server_version']}; {meta['cpus']} CPUs;"
          f" load avg {meta['loadavg_start'][0]:.2f} -> {meta['loadavg_end'][0]:.2f}")
    print()
    if sub:
        print(f"submit_many, {sub['steps']:,} steps:")
        print(f"  one call            {fmt_range(sub['one_call_steps_s'])} steps/s")
        print(f"  chunks of {sub['chunk']:<9,} {fmt_range(sub['chunked_steps_s'])} steps/s")
        print(f"  steps table         {fmt_range(sub['bytes_per_queued_step'])}"
              " bytes/queued step")
    if "attempt_bytes_per_completed_attempt" in summary:
        print(f"  finished_attempts   "
              f"{fmt_range(summary['attempt_bytes_per_completed_attempt'])}"
              " bytes/completed attempt")
    print()
    print("claim + complete (no-op steps), steps/s:")
    header = (f"{'procs':>5} {'batch':>5} {'steps':>6}  {'reference':>26}  {'store':>26}"
              f"  {'ratio':>5}  {'paired ratio':>14}")
    print(header)
    print("-" * len(header))
    for row in summary["claim"]:
        pr = row["paired_ratio"]
        flag = "" if row["all_ok"] else "  !! not all steps done"
        print(f"{row['procs']:>5} {row['batch']:>5} {row['steps']:>6}"
              f"  {fmt_range(row['reference_steps_s']):>26}"
              f"  {fmt_range(row['store_steps_s']):>26}"
              f"  {row['ratio_of_medians']:>5.0%}"
              f"  {pr['min']:.0%}-{pr['max']:.0%}{flag}".rstrip())
    print()
    print("CPU per completed step, microseconds (median): client = the claimer processes,")
    print("server = their PostgreSQL backends (read from /proc; local server only)")
    header = (f"{'procs':>5} {'batch':>5}  {'ref client':>10} {'ref server':>10}"
              f"  {'store client':>12} {'store server':>12}  {'store/ref total':>15}")
    print(header)
    print("-" * len(header))
    for row in summary["claim"]:
        ref, sto = row["reference_cpu_us_per_step"], row["store_cpu_us_per_step"]

        def us(value: float | None) -> str:
            return "-" if value is None else f"{value:,.0f}"

        factor = "-"
        if ref["server"] is not None and sto["server"] is not None:
            factor = f"{(sto['client'] + sto['server']) / (ref['client'] + ref['server']):.1f}x"
        print(f"{row['procs']:>5} {row['batch']:>5}  {us(ref['client']):>10}"
              f" {us(ref['server']):>10}  {us(sto['client']):>12} {us(sto['server']):>12}"
              f"  {factor:>15}")
    print()
    print("goals:")
    if sub:
        ok = sub["one_call_steps_s"]["median"] >= GOAL_SUBMIT_STEPS_S
        print(f"  submit >= {GOAL_SUBMIT_STEPS_S:,} steps/s (one call):"
              f" {sub['one_call_steps_s']['median']:,.0f} {'met' if ok else 'MISSED'}")
    for row in summary["claim"]:
        if row["procs"] == GOAL_RATIO_PROCS:
            ok = row["ratio_of_medians"] >= GOAL_RATIO
            print(f"  store/reference >= {GOAL_RATIO:.0%} at {GOAL_RATIO_PROCS} procs,"
                  f" batch {row['batch']}: {row['ratio_of_medians']:.0%}"
                  f" {'met' if ok else 'MISSED'}")
    if sub:
        ok = sub["bytes_per_queued_step"]["median"] < GOAL_BYTES_PER_STEP
        print(f"  < {GOAL_BYTES_PER_STEP} bytes per queued step:"
              f" {sub['bytes_per_queued_step']['median']:.0f} {'met' if ok else 'MISSED'}")


# -- main ---------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, comma-separated")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the fleetsim store against a minimal SKIP LOCKED reference.",
    )
    parser.add_argument("--url", default=os.environ.get("FLEETSIM_STORE", DEFAULT_URL),
                        help="PostgreSQL URL (default: $FLEETSIM_STORE or %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs to take the median of (default 3)")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--procs", type=int_list, default=[1, 2, 5, 10],
                        help="claimer process counts (default 1,2,5,10)")
    parser.add_argument("--batches", type=int_list, default=[1, 50],
                        help="claim batch sizes (default 1,50)")
    parser.add_argument("--submit-steps", type=int, help="steps to submit (default 100000)")
    parser.add_argument("--chunk", type=int, help="submit chunk size (default steps/10)")
    parser.add_argument("--claim-steps", type=int,
                        help="pre-submitted steps per claim run at batch > 1 (default 20000)")
    parser.add_argument("--claim-steps-batch1", type=int,
                        help="pre-submitted steps per claim run at batch 1 (default 3000)")
    parser.add_argument("--no-analyze", action="store_true",
                        help="do not ANALYZE the freshly filled table before a claim run"
                             " (default: ANALYZE, as autovacuum would soon after a bulk submit)")
    parser.add_argument("--no-checkpoint", action="store_true",
                        help="do not CHECKPOINT after each fill (default: do, so the"
                             " write burst of a fill does not slow the next trial down)")
    parser.add_argument("--warmup-steps", type=int,
                        help="steps of the discarded warm-up trial of each run (default 1000)")
    parser.add_argument("--skip-submit", action="store_true", help="skip the submit benchmark")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    quick = args.quick
    args.submit_steps = args.submit_steps or (10_000 if quick else 100_000)
    args.chunk = args.chunk or max(1, args.submit_steps // 10)
    args.claim_steps = args.claim_steps or (2_000 if quick else 20_000)
    args.claim_steps_batch1 = args.claim_steps_batch1 or (300 if quick else 3_000)
    args.warmup_steps = args.warmup_steps or (200 if quick else 1_000)
    return args


def store_sources_digest() -> str:
    """A digest of the store's SQL and code, to tell which version a result is for."""
    folder = Path(sys.modules[Store.__module__].__file__ or ".").parent
    digest = hashlib.sha256()
    for name in ("schema.py", "queries.py", "store.py"):
        with contextlib.suppress(OSError):
            digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:16]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    ctx = mp.get_context("spawn")
    try:
        probe = connect(args.url, None, "fleetsim-bench-probe")
    except psycopg2.Error as exc:
        print(f"bench_store: cannot connect: {str(exc).strip().splitlines()[0]}",
              file=sys.stderr)
        return 2
    with probe.cursor() as cur:
        cur.execute("SELECT current_setting('server_version'),"
                    " current_setting('synchronous_commit'), current_setting('fsync'),"
                    " current_setting('shared_buffers'), current_setting('max_connections')")
        version, sync_commit, fsync, shared_buffers, max_conn = cur.fetchone()
    probe.close()
    meta: dict[str, Any] = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "server_version": version,
        "server_settings": {"synchronous_commit": sync_commit, "fsync": fsync,
                            "shared_buffers": shared_buffers, "max_connections": max_conn},
        "fleetsim": str(Path(sys.modules[Store.__module__].__file__ or "?").parent.parent),
        "store_sources_sha256": store_sources_digest(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "runs": args.repeat,
        "args": {k: v for k, v in vars(args).items() if k != "url"},
    }
    raw: dict[str, Any] = {"submit": [], "claim": []}
    kinds = ("ref", "store")
    try:
        for index in range(args.repeat):
            with fresh_run(
                args.url, index, ctx, not args.no_analyze, not args.no_checkpoint
            ) as run:
                if not args.skip_submit:
                    result = run.bench_submit(args.submit_steps, args.chunk)
                    result["run"] = index
                    raw["submit"].append(result)
                # A discarded warm-up pair: the first trial of a run is slower
                # (fresh backends and caches, the flush of the schema's creation).
                log(f"run {index}: warm-up (not counted)")
                for kind in kinds:
                    run.bench_claim(kind, 1, 50, args.warmup_steps)
                trial = 0
                for batch in args.batches:
                    n = args.claim_steps_batch1 if batch == 1 else args.claim_steps
                    for procs in args.procs:
                        # A/B side by side, alternating which goes first.
                        order = kinds if (index + trial) % 2 == 0 else kinds[::-1]
                        trial += 1
                        for kind in order:
                            result = run.bench_claim(kind, procs, batch, n)
                            result["run"] = index
                            raw["claim"].append(result)
    except KeyboardInterrupt:
        log("interrupted; schemas dropped")
        return 130
    meta["loadavg_end"] = os.getloadavg()
    summary = summarise(raw, args)
    print_report(summary, meta)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"meta": meta, "summary": summary, "raw": raw}, indent=2) + "\n"
        )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
