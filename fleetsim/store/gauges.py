"""The store's own figures for the metrics time series (read-only, cheap to poll).

Depth per queue (steps waiting: queued, or failed and waiting for a retry),
dead tuples of ``steps`` (what autovacuum has yet to reclaim: a claim scans
past them), the size of ``steps`` on disk (table, indexes and TOAST: a soak
watches it grow), the connections open to the database and how many of them are
running a statement, and the leader's term. Nothing here is evidence for the
checker.
"""

from __future__ import annotations

from typing import Any, Final

from fleetsim.store.store import Store

__all__ = ["store_gauges"]

# Every queue, with 0 for an empty one; by the partial index on waiting steps.
_DEPTH: Final = """
SELECT q.name, coalesce(w.n, 0)
  FROM queues q
  LEFT JOIN (SELECT queue, count(*) AS n FROM steps WHERE waiting GROUP BY queue) w
    ON w.queue = q.name
"""

_DEAD_TUPLES: Final = """
SELECT n_dead_tup FROM pg_stat_user_tables
 WHERE relname = 'steps' AND schemaname = current_schema()
"""

# Table, indexes and TOAST; the relation looked up by name in this schema.
_TABLE_BYTES: Final = """
SELECT pg_total_relation_size(c.oid)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relname = :table AND n.nspname = current_schema()
"""

_CONNECTIONS: Final = """
SELECT count(*), count(*) FILTER (WHERE state = 'active')
  FROM pg_stat_activity WHERE datname = current_database()
"""

_LEADER: Final = "SELECT holder, term, expires_at > statement_timestamp() FROM leader_lease"


def store_gauges(store: Store) -> dict[str, Any]:
    """``{depth: {queue: n}, steps_dead_tuples, steps_bytes, connections, connections_active,
    leader, term}``.

    ``leader`` and ``term`` are the lease's holder and term while the lease
    is valid, else None.
    """
    depth = {str(name): int(n) for name, n in store._rows(_DEPTH)}
    dead = store._rows(_DEAD_TUPLES)
    size = store._rows(_TABLE_BYTES, table="steps")
    total, active = store._rows(_CONNECTIONS)[0]
    lease = store._rows(_LEADER)
    holder, term = (lease[0][0], int(lease[0][1])) if lease and lease[0][2] else (None, None)
    return {
        "depth": dict(sorted(depth.items())),
        "steps_dead_tuples": int(dead[0][0]) if dead else None,
        "steps_bytes": int(size[0][0]) if size and size[0][0] is not None else None,
        "connections": int(total),
        "connections_active": int(active),
        "leader": holder,
        "term": term,
    }
