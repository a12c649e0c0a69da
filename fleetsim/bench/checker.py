"""`fleetsim bench --checker`: how long `check --final` takes, and its memory, at a size.

A valid history of N steps is generated server-side (``INSERT ... SELECT
generate_series``) in a scratch schema made with fleetsim's own DDL. Per
step, chosen by a hash of its id so every queue gets every kind:

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

over three queues: ``default``, ``fifo`` (strict FIFO) and ``limited``
(concurrency limit 4, reached but never exceeded). Steps start every 2 ms;
claim tokens follow claim time, as the store's sequence does. Leader terms
of 10 s follow each other back to back, held in turn by 8 pods, and every
leader action lies inside its term and is taken by the term's holder.

The tables are VACUUM ANALYZEd and CHECKPOINTed (if allowed) so neither
autovacuum nor the load's flush lands on the timing; then
``fleetsim.checker.check(store, final=True)`` runs ``repeat`` times in a
fresh spawned process, whose peak RSS (``ru_maxrss``) is reported beside the
same after imports and connecting: run two sizes to see the checker's memory
does not grow with the history. The verdict must be ``valid``. The schema is
always dropped.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import resource
import secrets
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from fleetsim.bench import server
from fleetsim.bench.measure import Spread

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


def generate(url: str, schema: str, n: int) -> dict[str, Any]:
    """Fill ``schema`` (initialised by the store, empty) with a valid history of ``n`` steps."""
    params = {"n": n, "base": "2026-01-01 00:00:00+00", "every": STEP_EVERY, "term": TERM,
              "pods": PODS}
    timings: dict[str, float | None] = {}
    started = time.monotonic()
    conn = server.connect(url, "fleetsim-bench-checker", schema)
    try:
        server.query(conn, "SET work_mem = '256MB'")
        server.query(conn, "SET maintenance_work_mem = '256MB'")
        for name, sql in GENERATE:
            t = time.monotonic()
            server.query(conn, sql.format(**params))
            timings[name] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        for table in ("steps", "finished_attempts", "rejected_writes", "leader_actions",
                      "leader_terms", "pods", "queues"):
            server.query(conn, f'VACUUM (ANALYZE) "{schema}".{table}')
        timings["vacuum_analyze"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        try:
            server.query(conn, "CHECKPOINT")
            timings["checkpoint"] = round(time.monotonic() - t, 2)
        except Exception:  # not allowed (not a superuser nor pg_checkpoint)
            timings["checkpoint"] = None
        steps, attempts, terms, actions, size = server.query(conn, """
            SELECT (SELECT count(*) FROM steps), (SELECT count(*) FROM step_attempts),
                   (SELECT count(*) FROM leader_terms), (SELECT count(*) FROM leader_actions),
                   (SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c
                     WHERE c.relnamespace = CAST(%s AS regnamespace)
                       AND c.relkind IN ('r', 'm'))""", (f'"{schema}"',))[0]
    finally:
        conn.close()
    return {"steps": steps, "attempts": attempts, "terms": terms, "leader_actions": actions,
            "bytes": int(size or 0), "generate_s": round(time.monotonic() - started, 1),
            "phases_s": timings}


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux: kilobytes


def _time_checks(url: str, schema: str, repeat: int, results: Any) -> None:
    """The child: import, connect, then time check(final=True) ``repeat`` times."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C
    out: dict[str, Any] = {}
    try:
        from fleetsim.checker import check
        from fleetsim.store import Store, StoreConfig

        store = Store(StoreConfig(url, schema=schema, application_name="fleetsim-bench-checker"))
        store.ping()
        out["rss_before_bytes"] = _maxrss_bytes()
        times: list[float] = []
        verdicts: list[str] = []
        for _ in range(repeat):
            t = time.perf_counter()
            report = check(store, final=True)
            times.append(time.perf_counter() - t)
            verdicts.append(report.verdict)
            results.put({"progress": times[-1], "verdict": report.verdict})
        out.update(times_s=times, verdicts=verdicts, verdict=report.verdict,
                   violations=report.counts["violations"], counts=report.counts,
                   figures=report.figures, rss_peak_bytes=_maxrss_bytes())
        store.close()
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    results.put(out)


def time_checks(url: str, schema: str, repeat: int,
                say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Time ``check(final=True)`` of ``schema`` in a fresh process; RuntimeError if it fails."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=_time_checks, args=(url, schema, repeat, results), daemon=True)
    child.start()
    try:
        while True:
            try:
                item = results.get(timeout=1.0)
            except queue_mod.Empty:
                if not child.is_alive():
                    raise RuntimeError(f"the checking process died (exit {child.exitcode})"
                                       ) from None
                continue
            if "progress" not in item:
                break
            say(f"  check(final=True): {item['progress']:.2f} s, {item['verdict']}")
        child.join(30)
    finally:
        if child.is_alive():
            child.terminate()
            child.join(5)
    if "error" in item:
        raise RuntimeError(f"the checker failed: {item['error']}")
    return dict(item)


def run_checker_bench(url: str, steps: int, repeat: int,
                      say: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Generate a valid history of ``steps`` steps, time the checker on it; one row."""
    from fleetsim.store import Store, StoreConfig

    schema = f"bench_checker_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        with Store(StoreConfig(url, schema=schema)) as store:
            store.init_schema()
        say(f"checker: generating a history of {steps:,} steps in {schema}")
        gen = generate(url, schema, steps)
        say(f"  {gen['attempts']:,} attempts, {gen['terms']:,} terms, "
            f"{gen['leader_actions']:,} leader actions, {gen['bytes'] / 2**20:,.0f} MiB, "
            f"in {gen['generate_s']:.1f} s")
        measured = time_checks(url, schema, repeat, say)
    finally:
        with contextlib.suppress(Exception):
            server.drop_schema(url, schema)
    spread = Spread.of(measured["times_s"])
    assert spread is not None
    return {
        "steps": steps, "generated": gen, "check_s": spread.as_dict(),
        "verdict": measured["verdict"], "verdicts": measured["verdicts"],
        "violations": {k: v for k, v in measured["violations"].items() if v},
        "counts": {k: v for k, v in measured["counts"].items() if k != "violations"},
        "figures": measured["figures"],
        "rss_before_check_bytes": measured["rss_before_bytes"],
        "rss_peak_bytes": measured["rss_peak_bytes"],
    }


def checker_table_lines(row: dict[str, Any]) -> list[str]:
    """The checker table: one line for the size measured, and what it means."""
    def mib(value: int) -> str:
        return f"{value / 2**20:.0f} MiB"

    c, g = row["check_s"], row["generated"]
    span = f"{c['median']:.2f} s" + (f" [{c['min']:.2f}-{c['max']:.2f}]" if c["n"] > 1 else "")
    head = ("steps", "attempts", "leader actions", "tables", "check --final", "peak RSS",
            "RSS before", "verdict")
    body = (f"{row['steps']:,}", f"{g['attempts']:,}", f"{g['leader_actions']:,}",
            mib(g["bytes"]), span, mib(row["rss_peak_bytes"]),
            mib(row["rss_before_check_bytes"]), row["verdict"])
    widths = [max(len(h), len(b)) for h, b in zip(head, body, strict=True)]
    return [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
            "-+-".join("-" * w for w in widths),
            " | ".join(b.ljust(w) for b, w in zip(body, widths, strict=True)),
            "",
            f"check --final: median [min-max] of {c['n']} run(s) in one fresh process; peak "
            "RSS: that process's ru_maxrss; RSS before: the same after imports and "
            "connecting. Run two sizes to see how time and memory grow with the history."]
