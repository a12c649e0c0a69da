#!/usr/bin/env python3
"""Benchmark the history checker on a large synthetic history (a benchmark, not a test).

A valid history of ``--steps`` steps (default 1,000,000) is generated
server-side, with ``INSERT ... SELECT generate_series``, in a scratch schema
created with fleetsim's own DDL. It holds, per step (chosen by a hash of its
id, so every queue gets every kind):

=================  ======  ===================================================
kind               share   attempts
=================  ======  ===================================================
ok                 80 %    completed
retried            10 %    failed, completed
orphaned           6 %     lease_lost (its pod declared dead: the leader logs
                           ``mark_dead`` + ``requeue``; half of them also got a
                           late write refused, ``rejected_at``), completed
failed out (DLQ)   2 %     failed, failed (max_attempts 2): dead
orphaned out (DLQ) 2 %     failed, lease_lost (``mark_dead`` + ``dead_letter``):
                           dead
=================  ======  ===================================================

over three queues: ``default``, ``fifo`` (strict FIFO: first claims in
submission order) and ``limited`` (concurrency limit 4, reached but never
exceeded). Steps start every 2 ms; claim tokens are issued in claim-time
order, as the store's sequence does. Leader terms of 10 s follow each other
back to back, held in turn by 8 pods, and every leader action lies inside
its term and is taken by the term's holder (never against itself).

Then ``fleetsim.checker.check(store, final=True)`` is timed (median of
``--repeat``), at two sizes: ``--steps`` and a tenth of it (``--small-steps``),
each in a fresh process, so its peak RSS (``resource.getrusage``) shows that
the checker's memory does not grow with the history. The verdict must be
``valid``.

    /work/venv/bin/python scripts/bench_checker.py                 # 100k and 1M steps
    /work/venv/bin/python scripts/bench_checker.py --steps 100000 --repeat 1
    /work/venv/bin/python scripts/bench_checker.py --json checker.json --keep

Before timing, the generated tables are VACUUM ANALYZEd (as autovacuum would
soon do after such a bulk load, and so that it does not run during the
timing) and a CHECKPOINT is requested (if allowed), so the flush of the load
does not land on the measurement. Progress goes to stderr, the table and JSON
to stdout. The scratch schemas are dropped at the end, also on Ctrl-C or
SIGTERM, unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import resource
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import psycopg2.extras

# scripts/ is not a package: import bench_store by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_store
from bench_store import connect, log

DEFAULT_URL = bench_store.DEFAULT_URL
GOAL_S = 30.0  # check(final=True) of 1,000,000 steps
GOAL_STEPS = 1_000_000
APP = f"fleetsim-bench-checker-{os.getpid()}"

# Pods taking turns as leader, in 10-second terms.
PODS = 8
TERM = "10 s"
STEP_EVERY = "2 ms"

# One statement per phase, in order; {n} is the step count, {base} the start of
# the history. Everything is computed in the server.
GENERATE: tuple[tuple[str, str], ...] = (
    ("queues and pods", """
INSERT INTO queues (name, strict_fifo, concurrency_limit) VALUES
    ('default', false, NULL), ('fifo', true, NULL), ('limited', false, 4);
INSERT INTO pods (id, incarnation, pid, host, status, started_at, heartbeat_at)
SELECT 'pod-' || p, 0, NULL, 'bench', 'alive', timestamptz '{base}' - interval '1 s',
       timestamptz '{base}' + {n} * interval '{every}' + interval '1 s'
  FROM generate_series(1, {pods}) p;
"""),
    # Per step: queue (i % 10), kind (a hash of i: independent of the queue),
    # first claim t0, and how long each of its attempts runs. The limited
    # queue gets a step every 20 ms running 30 ms per attempt (two attempts:
    # 61 ms): at most 4 of its attempts ever run at once, its limit.
    ("plan", """
CREATE TEMP TABLE plan ON COMMIT PRESERVE ROWS AS
SELECT i,
       CASE i % 10 WHEN 0 THEN 'fifo' WHEN 5 THEN 'limited' ELSE 'default' END AS queue,
       CASE WHEN h < 80 THEN 'ok' WHEN h < 90 THEN 'retried' WHEN h < 96 THEN 'orphaned'
            WHEN h < 98 THEN 'failed_out' ELSE 'orphaned_out' END AS kind,
       timestamptz '{base}' + i * interval '{every}' AS t0,
       CASE WHEN i % 10 = 5 THEN interval '30 ms' ELSE interval '500 us' END AS dur
  FROM (SELECT i, abs(CAST(hashint8(i) AS bigint)) % 100 AS h
          FROM generate_series(CAST(1 AS bigint), {n}) i) g;
"""),
    # Attempt k of a step is claimed 1 ms after attempt k-1 ended (the
    # requeue's backoff) and runs for its queue's duration. A lease_lost
    # attempt is never the current leader's own: its pod was declared dead.
    ("attempts", """
CREATE TEMP TABLE att ON COMMIT PRESERVE ROWS AS
SELECT x.*,
       CAST(floor(extract(epoch FROM x.finished_at - timestamptz '{base}')
                  / extract(epoch FROM interval '{term}')) AS bigint) + 1 AS term
  FROM (SELECT p.i AS step_id, k.k, p.kind,
               p.t0 + k.k * (p.dur + interval '1 ms') AS claimed_at,
               p.t0 + k.k * (p.dur + interval '1 ms') + p.dur AS finished_at,
               CASE WHEN p.kind = 'ok' THEN 'completed'
                    WHEN k.k = 0 AND p.kind = 'orphaned' THEN 'lease_lost'
                    WHEN k.k = 0 THEN 'failed'
                    WHEN p.kind = 'failed_out' THEN 'failed'
                    WHEN p.kind = 'orphaned_out' THEN 'lease_lost'
                    ELSE 'completed' END AS outcome
          FROM plan p
         CROSS JOIN generate_series(0, 1) k(k)
         WHERE k.k = 0 OR p.kind <> 'ok') x;
"""),
    ("finished_attempts", """
INSERT INTO finished_attempts (claim_token, step_id, pod_id, incarnation, claimed_at,
                           finished_at, outcome)
SELECT row_number() OVER (ORDER BY a.claimed_at, a.step_id),
       a.step_id,
       'pod-' || CASE WHEN a.outcome = 'lease_lost'
                       AND (a.step_id + a.k) % {pods} = a.term % {pods}
                      THEN (a.step_id + a.k + 1) % {pods} + 1
                      ELSE (a.step_id + a.k) % {pods} + 1 END,
       0, a.claimed_at, a.finished_at, a.outcome
  FROM att a;
"""),
    ("rejected_writes", """
INSERT INTO rejected_writes (claim_token, step_id, at)
SELECT claim_token, step_id, finished_at + interval '200 us' FROM finished_attempts
 WHERE outcome = 'lease_lost' AND step_id % 2 = 0;
"""),
    ("steps", """
INSERT INTO steps (id, queue, status, priority, payload, attempts, max_attempts,
                   claimed_by, claim_token, claimed_at, available_at, created_at,
                   finished_at, result, error)
SELECT p.i, p.queue,
       CASE WHEN p.kind IN ('failed_out', 'orphaned_out') THEN 'dead' ELSE 'completed' END,
       0, CAST('{{}}' AS jsonb),
       CASE p.kind WHEN 'ok' THEN 0 WHEN 'retried' THEN 1 WHEN 'orphaned' THEN 1 ELSE 2 END,
       CASE WHEN p.kind IN ('failed_out', 'orphaned_out') THEN 2 ELSE 3 END,
       CASE WHEN p.kind IN ('failed_out', 'orphaned_out') THEN NULL ELSE last.pod_id END,
       last.claim_token, last.claimed_at,
       CASE WHEN p.kind IN ('failed_out', 'orphaned_out')
            THEN last.finished_at + interval '1 ms' ELSE p.t0 - interval '500 ms' END,
       p.t0 - interval '500 ms', last.finished_at,
       CASE WHEN p.kind IN ('failed_out', 'orphaned_out') THEN NULL
            ELSE CAST('{{"ok": true}}' AS jsonb) END,
       CASE p.kind WHEN 'failed_out' THEN 'injected failure'
                   WHEN 'orphaned_out' THEN 'pod ' || last.pod_id || ' declared dead'
       END
  FROM plan p
  JOIN (SELECT DISTINCT ON (step_id) step_id, pod_id, claim_token, claimed_at, finished_at
          FROM step_attempts ORDER BY step_id, claim_token DESC) last
    ON last.step_id = p.i;
"""),
    # Back-to-back terms covering the whole history; the last one released.
    ("leader_terms", """
INSERT INTO leader_terms (term, pod_id, started_at, expires_at, ended_at)
SELECT n, 'pod-' || (n % {pods} + 1),
       timestamptz '{base}' + (n - 1) * interval '{term}',
       timestamptz '{base}' + n * interval '{term}',
       timestamptz '{base}' + n * interval '{term}'
  FROM generate_series(CAST(1 AS bigint),
                       CAST(ceil(extract(epoch FROM {n} * interval '{every}' + interval '1 s')
                                 / extract(epoch FROM interval '{term}')) AS bigint) + 1) n;
"""),
    # For each lost claim: the leader of that moment marks the pod dead and
    # requeues the claim (or dead-letters it when its attempts are spent).
    ("leader_actions", """
INSERT INTO leader_actions (term, pod_id, action, target_pod, step_id, claim_token, at)
SELECT t.term, t.pod_id, x.action, a.pod_id, x.step_id, x.claim_token, a.finished_at
  FROM step_attempts a
  JOIN steps s ON s.id = a.step_id
  JOIN leader_terms t
    ON t.term = CAST(floor(extract(epoch FROM a.finished_at - timestamptz '{base}')
                           / extract(epoch FROM interval '{term}')) AS bigint) + 1
 CROSS JOIN LATERAL (VALUES
     ('mark_dead', CAST(NULL AS bigint), CAST(NULL AS bigint)),
     (CASE WHEN s.status = 'dead' THEN 'dead_letter' ELSE 'requeue' END, a.step_id,
      a.claim_token)) x(action, step_id, claim_token)
 WHERE a.outcome = 'lease_lost'
 ORDER BY a.finished_at, a.claim_token, x.action;
"""),
    ("sequences", """
SELECT setval('claim_token_seq', (SELECT max(claim_token) FROM step_attempts));
SELECT setval('steps_id_seq', {n});
DROP TABLE att;
DROP TABLE plan;
"""),
)


class BenchError(RuntimeError):
    """A measurement could not be taken."""


# -- generation (parent process) ----------------------------------------------


def generate(conn: Any, schema: str, n: int) -> dict[str, Any]:
    """Fill ``schema`` (already initialised) with a valid history of ``n`` steps."""
    params = {"n": n, "base": "2026-01-01 00:00:00+00", "every": STEP_EVERY, "term": TERM,
              "pods": PODS}
    timings: dict[str, float] = {}
    started = time.monotonic()
    with conn.cursor() as cur:
        cur.execute(f"SET search_path = {schema}")
        cur.execute("SET work_mem = '256MB'")
        cur.execute("SET maintenance_work_mem = '256MB'")
        for name, sql in GENERATE:
            t = time.monotonic()
            cur.execute(sql.format(**params))
            timings[name] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        for table in ("steps", "finished_attempts", "rejected_writes", "leader_actions",
                      "leader_terms", "pods", "queues"):
            cur.execute(f"VACUUM (ANALYZE) {schema}.{table}")
        timings["vacuum_analyze"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        try:
            cur.execute("CHECKPOINT")
            timings["checkpoint"] = round(time.monotonic() - t, 2)
        except psycopg2.errors.InsufficientPrivilege:
            timings["checkpoint"] = None
        cur.execute(f"""
            SELECT (SELECT count(*) FROM {schema}.steps),
                   (SELECT count(*) FROM {schema}.step_attempts),
                   (SELECT count(*) FROM {schema}.leader_terms),
                   (SELECT count(*) FROM {schema}.leader_actions),
                   (SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c
                     WHERE c.relnamespace = CAST('{schema}' AS regnamespace)
                       AND c.relkind IN ('r', 'm'))""")
        steps, attempts, terms, actions, size = cur.fetchone()
        cur.execute("RESET search_path")
    return {"steps": steps, "attempts": attempts, "terms": terms, "leader_actions": actions,
            "bytes": int(size or 0), "generate_s": round(time.monotonic() - started, 1),
            "phases_s": timings}


# -- timing (a fresh child process per size) ----------------------------------


def _maxrss_bytes() -> int:
    # Linux reports kilobytes (macOS bytes).
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _time_checks(url: str, schema: str, repeat: int, app: str, results: Any) -> None:
    """Child process: import, connect, then time check(final=True) ``repeat`` times."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C and the cleanup
    out: dict[str, Any] = {"pid": os.getpid()}
    try:
        from fleetsim.checker import check
        from fleetsim.store import Store, StoreConfig

        store = Store(StoreConfig(url, schema=schema, application_name=app))
        store.ping()
        out["rss_before_bytes"] = _maxrss_bytes()
        times: list[float] = []
        reports = []
        for _ in range(repeat):
            t = time.perf_counter()
            report = check(store, final=True)
            times.append(time.perf_counter() - t)
            reports.append(report.verdict)
            results.put({"progress": times[-1], "verdict": report.verdict})
        out.update(times_s=times, verdicts=reports, verdict=report.verdict,
                   violations=report.counts["violations"], counts=report.counts,
                   figures=report.figures, rss_peak_bytes=_maxrss_bytes())
        store.close()
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    results.put(out)


class Bench:
    """Schemas and child processes of this run, and their cleanup."""

    def __init__(self, url: str, keep: bool) -> None:
        self.url = url
        self.keep = keep
        self.conn = connect(url, None, APP)
        self.schemas: list[str] = []
        self.children: list[Any] = []

    def new_schema(self, n: int) -> str:
        from fleetsim.store import Store, StoreConfig

        name = f"bench_checker_{os.getpid()}_{secrets.token_hex(3)}_{n}"
        self.schemas.append(name)
        with Store(StoreConfig(self.url, schema=name, application_name=APP)) as store:
            store.init_schema()
        return name

    def measure(self, schema: str, n: int, repeat: int) -> dict[str, Any]:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        child = ctx.Process(target=_time_checks, args=(self.url, schema, repeat, APP, results),
                            name=f"check-{n}")
        self.children.append(child)
        child.start()
        while True:
            try:
                item = results.get(timeout=1.0)
            except Exception:  # queue.Empty
                if not child.is_alive():
                    raise BenchError(f"the checker process died (exit {child.exitcode})"
                                     ) from None
                continue
            if "progress" in item:
                log(f"  check(final=True) of {n:,} steps: {item['progress']:.2f} s,"
                    f" {item['verdict']}")
                continue
            break
        child.join(30)
        self.children.remove(child)
        if "error" in item:
            raise BenchError(f"the checker failed: {item['error']}")
        return item

    def drop(self, schema: str) -> None:
        with self.conn.cursor() as cur:
            cur.execute("SET lock_timeout = '30s'")
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        self.schemas.remove(schema)

    def cleanup(self) -> None:
        for child in self.children:
            with contextlib.suppress(Exception):
                child.terminate()
                child.join(5)
                if child.is_alive():
                    child.kill()
                    child.join()
        if self.conn.closed:
            self.conn = connect(self.url, None, APP)
        with self.conn.cursor() as cur:
            # A killed child's query runs on until the server notices: end it,
            # or DROP SCHEMA would wait for its locks.
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = %s AND pid <> pg_backend_pid()", (APP,))
        if self.keep:
            for schema in self.schemas:
                log(f"kept schema {schema}")
        else:
            for schema in list(self.schemas):
                self.drop(schema)
        self.conn.close()


def run_size(bench: Bench, n: int, repeat: int) -> dict[str, Any]:
    schema = bench.new_schema(n)
    log(f"{n:,} steps: generating in schema {schema}")
    gen = generate(bench.conn, schema, n)
    log(f"  {gen['steps']:,} steps, {gen['attempts']:,} attempts, {gen['terms']:,} terms,"
        f" {gen['leader_actions']:,} leader actions, {gen['bytes'] / 2**20:,.0f} MiB,"
        f" generated in {gen['generate_s']:.1f} s ({gen['phases_s']})")
    measured = bench.measure(schema, n, repeat)
    if not bench.keep:
        bench.drop(schema)
    times = measured["times_s"]
    result = {
        "steps": n, "schema": schema if bench.keep else None, "generated": gen,
        "check_s": {"median": statistics.median(times), "min": min(times), "max": max(times),
                    "all": times},
        "verdict": measured["verdict"], "verdicts": measured["verdicts"],
        "violations": measured["violations"],
        "counts": {k: v for k, v in measured["counts"].items() if k != "violations"},
        "figures": measured["figures"],
        "rss_before_check_bytes": measured["rss_before_bytes"],
        "rss_peak_bytes": measured["rss_peak_bytes"],
    }
    log(f"  median {result['check_s']['median']:.2f} s, peak RSS "
        f"{result['rss_peak_bytes'] / 2**20:.0f} MiB (after imports and connect "
        f"{result['rss_before_check_bytes'] / 2**20:.0f} MiB), verdict {result['verdict']}")
    return result


# -- report -----------------------------------------------------------------------


def print_report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    def mib(v: int) -> str:
        return f"{v / 2**20:.0f} MiB"

    print()
    print(f"fleetsim checker benchmark: check(store, final=True), median of {meta['repeat']}"
          f" (min-max)")
    print(f"server {meta['server_version']}; {meta['cpus']} CPUs, shared; load avg "
          f"{meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f}")
    print()
    header = (f"{'steps':>10} {'attempts':>10} {'actions':>8} {'tables':>9} {'check (s)':>22}"
              f" {'peak RSS':>9} {'RSS pre':>8}  verdict")
    print(header)
    for r in rows:
        g, c = r["generated"], r["check_s"]
        span = f"{c['median']:.2f} ({c['min']:.2f}-{c['max']:.2f})"
        print(f"{r['steps']:>10,} {g['attempts']:>10,} {g['leader_actions']:>8,}"
              f" {mib(g['bytes']):>9} {span:>22} {mib(r['rss_peak_bytes']):>9}"
              f" {mib(r['rss_before_check_bytes']):>8}  {r['verdict']}")
    print()
    print("peak RSS: the checking process's ru_maxrss (a fresh process per size);"
          " RSS pre: the same after imports and connecting, before the first check")
    big = max(rows, key=lambda r: r["steps"])
    if big["steps"] >= GOAL_STEPS:
        ok = big["check_s"]["median"] < GOAL_S
        print(f"goal: {GOAL_STEPS:,} steps < {GOAL_S:.0f} s: "
              f"{'met' if ok else 'MISSED'} ({big['check_s']['median']:.1f} s)")
    if len(rows) > 1:
        small = min(rows, key=lambda r: r["steps"])
        grow = big["rss_peak_bytes"] - small["rss_peak_bytes"]
        print(f"memory: {big['steps'] // max(1, small['steps'])}x the history,"
              f" peak RSS {grow / 2**20:+.1f} MiB")


# -- main -----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time fleetsim's checker on a large synthetic valid history.")
    parser.add_argument("--url", default=os.environ.get("FLEETSIM_STORE", DEFAULT_URL),
                        help="PostgreSQL URL (default: $FLEETSIM_STORE or %(default)s)")
    parser.add_argument("--steps", type=int, default=GOAL_STEPS,
                        help="steps in the large history (default %(default)s)")
    parser.add_argument("--small-steps", type=int, default=None,
                        help="steps in the small history (default: --steps / 10; 0: skip it)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed checks per size, median reported (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep the generated schemas (their names are printed)")
    args = parser.parse_args(argv)
    if args.steps < 100:
        parser.error("--steps must be at least 100")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.small_steps is None:
        args.small_steps = args.steps // 10
    if args.small_steps and not 100 <= args.small_steps < args.steps:
        parser.error("--small-steps must be 0, or between 100 and --steps")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    interrupted = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # Make psycopg2 queries interruptible: Ctrl-C cancels the running statement.
    psycopg2.extensions.set_wait_callback(psycopg2.extras.wait_select)
    try:
        bench = Bench(args.url, args.keep)
    except psycopg2.Error as exc:
        print(f"bench_checker: cannot connect: {str(exc).strip().splitlines()[0]}",
              file=sys.stderr)
        return 2
    with bench.conn.cursor() as cur:
        cur.execute("SELECT current_setting('server_version')")
        (version,) = cur.fetchone()
    meta: dict[str, Any] = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "server_version": version, "python": platform.python_version(),
        "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "repeat": args.repeat,
        "sizes": [n for n in (args.small_steps, args.steps) if n],
    }
    rows: list[dict[str, Any]] = []
    code = 0
    try:
        for n in meta["sizes"]:
            rows.append(run_size(bench, n, args.repeat))
    except KeyboardInterrupt:
        code = 130
    except (BenchError, psycopg2.Error) as exc:
        if interrupted:
            code = 130
        else:
            log(f"failed: {str(exc).strip()}")
            code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if code == 130:
            log("interrupted: cleaning up")
        try:
            bench.cleanup()
            log("cleaned up" + ("" if args.keep else ": schemas dropped"))
        except psycopg2.Error as exc:
            log(f"cleanup failed: {str(exc).strip()}")
    if code or not rows:
        return code or 1
    meta["loadavg_end"] = os.getloadavg()
    print_report(rows, meta)
    document = {"meta": meta, "results": rows}
    print()
    print(json.dumps(document, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    if any(r["verdict"] != "valid" for r in rows):
        log("!! the synthetic history was not judged valid")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
