"""The SQL behind a run's figures and report: latency percentiles and time series.

Everything is read from the recorded history (``steps``, ``step_attempts``,
``pod_registrations``, ``leader_terms``, ``leader_actions``, ``pods``) in one
REPEATABLE READ snapshot. Percentiles are computed in the database
(``percentile_cont``), series are binned there, so only a few hundred rows
come back whatever the size of the run. Times come back as unix seconds
(database time). :mod:`fleetsim.figures` adds the fault windows and the
metrics file; this module only knows tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from fleetsim.store.checks import _snapshot
from fleetsim.store.store import Store

__all__ = ["HistoryFigures", "HistorySeries", "completions_within", "history_figures",
           "history_series", "registrations"]

# Submit -> completion and submit -> first claim, over the whole history.
# A step's first claim is its earliest attempt (finished or open).
FIGURES = """
WITH first_claim AS (
    SELECT step_id, min(claimed_at) AS at FROM step_attempts GROUP BY step_id
), s AS (
    SELECT s.status, s.created_at, s.finished_at, f.at AS first_claimed_at
      FROM steps s LEFT JOIN first_claim f ON f.step_id = s.id
)
SELECT count(*) AS submitted,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
           (ORDER BY CAST(extract(epoch FROM finished_at - created_at) AS float8))
           FILTER (WHERE status = 'completed') AS e2e,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
           (ORDER BY CAST(extract(epoch FROM first_claimed_at - created_at) AS float8))
           FILTER (WHERE first_claimed_at IS NOT NULL) AS wait,
       CAST(extract(epoch FROM min(first_claimed_at)) AS float8) AS first_claim,
       CAST(extract(epoch FROM max(finished_at) FILTER (WHERE status = 'completed'))
            AS float8) AS last_completion,
       CAST(extract(epoch FROM min(created_at)) AS float8) AS first_submit
  FROM s
"""

# The whole life of the run as the store saw it: first registration or
# submit, to the last heartbeat, stop or completion.
SPAN = """
SELECT CAST(extract(epoch FROM least((SELECT min(registered_at) FROM pod_registrations),
                                     (SELECT min(started_at) FROM pods),
                                     (SELECT min(created_at) FROM steps))) AS float8) AS start,
       CAST(extract(epoch FROM greatest((SELECT max(finished_at) FROM steps),
                                        (SELECT max(heartbeat_at) FROM pods),
                                        (SELECT max(died_at) FROM pods),
                                        (SELECT max(coalesce(ended_at, expires_at))
                                           FROM leader_terms))) AS float8) AS "end"
"""

# Completed steps whose completion falls in one of the windows [start, end)
# (unix seconds; the caller merges overlapping windows).
COMPLETIONS_WITHIN = """
SELECT count(*) FROM steps s
 WHERE s.status = 'completed'
   AND EXISTS (SELECT 1 FROM unnest(CAST(:starts AS float8[]), CAST(:ends AS float8[]))
                        AS w(a, b)
                WHERE s.finished_at >= to_timestamp(w.a) AND s.finished_at < to_timestamp(w.b))
"""

# Accepted completions per pod and bin (bin = floor((t - t0) / width)).
THROUGHPUT_SERIES = """
SELECT pod_id AS pod,
       CAST(floor((extract(epoch FROM finished_at) - :t0) / :width) AS integer) AS bin,
       count(*) AS n
  FROM finished_attempts
 WHERE outcome = 'completed'
 GROUP BY 1, 2
 ORDER BY 2, 1
"""

# End-to-end latency percentiles of the steps completed in each bin.
LATENCY_SERIES = """
SELECT CAST(floor((extract(epoch FROM finished_at) - :t0) / :width) AS integer) AS bin,
       count(*) AS n,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
           (ORDER BY CAST(extract(epoch FROM finished_at - created_at) AS float8)) AS p
  FROM steps
 WHERE status = 'completed'
 GROUP BY 1
 ORDER BY 1
"""

# The change of each queue's depth (steps waiting: queued, or failed and
# waiting for a retry) per bin, from the history: +1 at the submit, -1 at
# each claim, +1 when an attempt gives its step back to the queue (failed,
# lease lost or released, and the step was claimed again or still waits),
# -1 when a never-claimed step is cancelled. The caller sums the changes.
DEPTH_CHANGES = """
WITH a AS (
    SELECT a.step_id, a.claimed_at, a.finished_at, a.outcome,
           lead(a.claimed_at) OVER (PARTITION BY a.step_id ORDER BY a.claim_token) AS next_claim
      FROM step_attempts a
), ev AS (
    SELECT queue, created_at AS at, 1 AS d FROM steps
    UNION ALL
    SELECT s.queue, a.claimed_at, -1 FROM a JOIN steps s ON s.id = a.step_id
    UNION ALL
    SELECT s.queue, a.finished_at, 1 FROM a JOIN steps s ON s.id = a.step_id
     WHERE a.outcome IN ('failed', 'lease_lost', 'released')
       AND (a.next_claim IS NOT NULL OR s.waiting)
    UNION ALL
    SELECT queue, finished_at, -1 FROM steps
     WHERE status = 'cancelled' AND claim_token IS NULL AND finished_at IS NOT NULL
)
SELECT queue, CAST(floor((extract(epoch FROM at) - :t0) / :width) AS integer) AS bin,
       sum(d) AS d
  FROM ev
 GROUP BY 1, 2
 ORDER BY 2, 1
"""

QUEUES = "SELECT name FROM queues ORDER BY name"

REGISTRATIONS = """
SELECT pod_id AS pod, incarnation, CAST(extract(epoch FROM registered_at) AS float8) AS at
  FROM pod_registrations
 ORDER BY registered_at, pod_id
"""

PODS = """
SELECT id AS pod, incarnation, status,
       CAST(extract(epoch FROM heartbeat_at) AS float8) AS heartbeat_at,
       CAST(extract(epoch FROM died_at) AS float8) AS died_at
  FROM pods
 ORDER BY id
"""

MARKED_DEAD = """
SELECT target_pod AS pod, CAST(extract(epoch FROM at) AS float8) AS at
  FROM leader_actions
 WHERE action = 'mark_dead' AND target_pod IS NOT NULL
 ORDER BY at
"""

TERMS = """
SELECT term, pod_id AS pod, CAST(extract(epoch FROM started_at) AS float8) AS start,
       CAST(extract(epoch FROM coalesce(ended_at, expires_at)) AS float8) AS "end"
  FROM leader_terms
 ORDER BY term
"""


@dataclass(frozen=True)
class HistoryFigures:
    """Whole-run figures from the store; times in unix seconds (database time).

    Percentiles are ``(p50, p95, p99)`` in seconds, or None without data.
    """

    submitted: int
    completed: int
    e2e: tuple[float, float, float] | None
    queue_wait: tuple[float, float, float] | None
    first_claim: float | None
    last_completion: float | None
    first_submit: float | None
    span: tuple[float, float] | None  # first registration/submit .. last sign of the run


@dataclass(frozen=True)
class HistorySeries:
    """Binned series and the facts of the per-pod timeline, from one snapshot.

    Bin ``i`` covers ``[t0 + i * width, t0 + (i + 1) * width)``.
    """

    t0: float
    width: float
    throughput: dict[str, dict[int, int]]  # pod -> bin -> completions
    latency: list[tuple[int, int, float, float, float]]  # (bin, n, p50, p95, p99)
    depth_changes: dict[str, dict[int, int]]  # queue -> bin -> change of depth
    queues: list[str]
    registrations: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    marked_dead: list[dict[str, Any]] = field(default_factory=list)
    terms: list[dict[str, Any]] = field(default_factory=list)


def _triple(value: Any) -> tuple[float, float, float] | None:
    if value is None or any(v is None for v in value):
        return None
    p50, p95, p99 = (float(v) for v in value)
    return (p50, p95, p99)


def history_figures(store: Store) -> HistoryFigures:
    """Counts, latency percentiles and the time span of ``store``'s history.

    Raises SchemaMismatch (via the store) if the database holds no fleetsim store.
    """
    store.check_schema()
    with _snapshot(store) as conn:
        row = conn.execute(sa.text(FIGURES)).one()
        span = conn.execute(sa.text(SPAN)).one()
    return HistoryFigures(
        submitted=int(row.submitted),
        completed=int(row.completed),
        e2e=_triple(row.e2e),
        queue_wait=_triple(row.wait),
        first_claim=row.first_claim,
        last_completion=row.last_completion,
        first_submit=row.first_submit,
        span=None if span.start is None or span.end is None else (span.start, span.end),
    )


def completions_within(store: Store, windows: Sequence[tuple[float, float]]) -> int:
    """How many completed steps finished inside ``windows`` (unix seconds, disjoint)."""
    if not windows:
        return 0
    with _snapshot(store) as conn:
        return int(conn.execute(sa.text(COMPLETIONS_WITHIN), {
            "starts": [float(a) for a, _ in windows], "ends": [float(b) for _, b in windows],
        }).scalar_one())


def history_series(store: Store, t0: float, width: float) -> HistorySeries:
    """The binned series (bins of ``width`` seconds from ``t0``) and timeline facts."""
    store.check_schema()
    params = {"t0": float(t0), "width": float(width)}
    with _snapshot(store) as conn:

        def rows(sql: str, **p: Any) -> list[dict[str, Any]]:
            return [dict(r._mapping) for r in conn.execute(sa.text(sql), p)]

        throughput: dict[str, dict[int, int]] = {}
        for r in rows(THROUGHPUT_SERIES, **params):
            throughput.setdefault(r["pod"], {})[int(r["bin"])] = int(r["n"])
        latency = []
        for r in rows(LATENCY_SERIES, **params):
            p = _triple(r["p"])
            if p is not None:
                latency.append((int(r["bin"]), int(r["n"]), *p))
        depth: dict[str, dict[int, int]] = {}
        for r in rows(DEPTH_CHANGES, **params):
            depth.setdefault(r["queue"], {})[int(r["bin"])] = int(r["d"])
        return HistorySeries(
            t0=float(t0), width=float(width), throughput=throughput, latency=latency,
            depth_changes=depth, queues=[r["name"] for r in rows(QUEUES)],
            registrations=rows(REGISTRATIONS), pods=rows(PODS),
            marked_dead=rows(MARKED_DEAD), terms=rows(TERMS),
        )


def registrations(store: Store) -> list[dict[str, Any]]:
    """Every registration of a pod: ``{"pod", "incarnation", "at"}`` (unix seconds)."""
    with _snapshot(store) as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(REGISTRATIONS))]
