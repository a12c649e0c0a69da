"""The dead-letter queue: list, redrive and purge dead steps.

A dead step spent its attempts (``attempts >= max_attempts``). The checker's
DLQ invariant reads ``steps.attempts`` and ``steps.max_attempts`` against the
attempts the history shows spent (outcomes ``failed`` and ``lease_lost``):
a step is dead iff it spent ``max_attempts``, and ``attempts`` equals what
it spent. A redrive keeps both true without the checker knowing of it: it
does not forget the attempts spent (the history still shows them), it
grants a fresh budget on top of them, ``max_attempts = attempts + budget``,
where the budget is the step's original ``max_attempts``. Each redrive and
each purge is appended to ``dlq_actions``, with the counts before and after,
so the history says why a step's ``max_attempts`` grew or why it is gone.

Functions take a :class:`~fleetsim.store.Store`; each action is one
transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from fleetsim.errors import ConfigError
from fleetsim.store.schema import DLQ_ACTIONS
from fleetsim.store.store import Store

LIST_DEAD = """
SELECT id, queue, attempts, max_attempts, error, finished_at, payload
  FROM steps
 WHERE status = 'dead' AND (CAST(:queue AS text) IS NULL OR queue = :queue)
 ORDER BY finished_at, id
 LIMIT :limit
"""

COUNT_DEAD = """
SELECT count(*) FROM steps
 WHERE status = 'dead' AND (CAST(:queue AS text) IS NULL OR queue = :queue)
"""

# The budget a redrive grants is the step's first max_attempts: the one it
# had before any redrive (recorded by the first), else its current one.
REDRIVE = """
WITH picked AS (
    SELECT s.id FROM steps s
     WHERE s.status = 'dead'
       AND (CAST(:all AS boolean) OR s.id = ANY(CAST(:ids AS bigint[])))
       AND (CAST(:queue AS text) IS NULL OR s.queue = :queue)
     ORDER BY s.id
       FOR UPDATE
), before AS (
    SELECT s.id, s.queue, s.attempts, s.max_attempts, s.error,
           coalesce((SELECT d.max_attempts_before FROM dlq_actions d
                      WHERE d.step_id = s.id AND d.action = 'redrive'
                      ORDER BY d.id LIMIT 1), s.max_attempts) AS budget
      FROM steps s JOIN picked ON picked.id = s.id
), redriven AS (
    UPDATE steps s
       SET status = 'queued', max_attempts = before.attempts + before.budget,
           finished_at = NULL, available_at = statement_timestamp(), error = NULL,
           result = NULL, claimed_by = NULL, cancel_requested = false,
           limited_claim = false
      FROM before
     WHERE s.id = before.id AND s.status = 'dead'
    RETURNING s.id, s.max_attempts
), recorded AS (
    INSERT INTO dlq_actions (action, step_id, queue, attempts, max_attempts_before,
                             max_attempts_after, error, at)
    SELECT 'redrive', b.id, b.queue, b.attempts, b.max_attempts, r.max_attempts, b.error,
           statement_timestamp()
      FROM before b JOIN redriven r ON r.id = b.id
)
SELECT id FROM redriven ORDER BY id
"""

PURGE = """
WITH purged AS (
    DELETE FROM steps
     WHERE id IN (SELECT id FROM steps
                   WHERE status = 'dead'
                     AND (CAST(:queue AS text) IS NULL OR queue = :queue)
                   ORDER BY id
                     FOR UPDATE)
       AND status = 'dead'
    RETURNING id, queue, attempts, max_attempts, error
), recorded AS (
    INSERT INTO dlq_actions (action, step_id, queue, attempts, max_attempts_before,
                             max_attempts_after, error, at)
    SELECT 'purge', id, queue, attempts, max_attempts, NULL, error, statement_timestamp()
      FROM purged
)
SELECT id FROM purged ORDER BY id
"""

STATUS_OF = "SELECT id, status FROM steps WHERE id = ANY(CAST(:ids AS bigint[]))"

ACTIONS = """
SELECT id, action, step_id, queue, attempts, max_attempts_before, max_attempts_after,
       error, at
  FROM dlq_actions ORDER BY id
"""


@dataclass(frozen=True)
class DeadStep:
    """A step in the dead-letter queue."""

    id: int
    queue: str
    attempts: int
    max_attempts: int
    error: str | None
    died_at: datetime | None
    workload: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "id": self.id,
            "queue": self.queue,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "error": self.error,
            "died_at": self.died_at.isoformat() if self.died_at else None,
            "workload": self.workload,
        }


@dataclass(frozen=True)
class Redrive:
    """What a redrive did: the steps requeued, and the ids named that were not dead."""

    redriven: tuple[int, ...]
    not_dead: dict[int, str]  # id -> its status ("missing" if no such step)


def _ensure(conn: sa.Connection) -> None:
    # Serialised like init_schema: CREATE ... IF NOT EXISTS races otherwise.
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(7364002)"))
    conn.execute(sa.text(DLQ_ACTIONS))  # schema 4 has it; a no-op then


def ensure_schema(store: Store) -> None:
    """Create ``dlq_actions`` if the store has none yet (idempotent)."""
    with store._transaction() as conn:
        _ensure(conn)


def dead_steps(store: Store, queue: str | None = None, limit: int = 1000) -> list[DeadStep]:
    """The dead steps (oldest death first), at most ``limit``."""
    if limit < 1:
        raise ConfigError("the limit must be at least 1")
    rows = store._rows(LIST_DEAD, queue=queue, limit=limit)
    return [
        DeadStep(int(r.id), r.queue, int(r.attempts), int(r.max_attempts), r.error,
                 r.finished_at, (r.payload or {}).get("workload")
                 if isinstance(r.payload, dict) else None)
        for r in rows
    ]


def count_dead(store: Store, queue: str | None = None) -> int:
    """How many steps are dead (in ``queue``, or in all queues)."""
    return int(store._rows(COUNT_DEAD, queue=queue)[0][0])


def redrive(
    store: Store, ids: Sequence[int] = (), *, all_dead: bool = False, queue: str | None = None
) -> Redrive:
    """Requeue dead steps with a fresh attempt budget; record each in ``dlq_actions``.

    Either ``ids`` or ``all_dead`` (optionally restricted to ``queue``).
    Ids that name no dead step are returned in ``not_dead`` with their status.
    """
    if bool(ids) == all_dead:
        raise ConfigError("name the steps to redrive, or all of them")
    with store._transaction() as conn:
        _ensure(conn)
        done = [int(r[0]) for r in conn.execute(
            sa.text(REDRIVE),
            {"all": all_dead, "ids": list(ids), "queue": queue},
        )]
        not_dead: dict[int, str] = {}
        if ids:
            missed = sorted(set(ids) - set(done))
            if missed:
                found = {int(r[0]): str(r[1]) for r in conn.execute(
                    sa.text(STATUS_OF), {"ids": missed})}
                not_dead = {i: found.get(i, "missing") for i in missed}
    return Redrive(tuple(done), not_dead)


def purge(store: Store, queue: str | None = None) -> list[int]:
    """Delete the dead steps (of ``queue``, or all); record each in ``dlq_actions``.

    Their attempts stay in the history; the deleted rows are listed in
    ``dlq_actions`` with action ``purge``.
    """
    with store._transaction() as conn:
        _ensure(conn)
        return [int(r[0]) for r in conn.execute(sa.text(PURGE), {"queue": queue})]


def actions(store: Store) -> list[dict[str, Any]]:
    """Every recorded redrive and purge, oldest first."""
    ensure_schema(store)
    return [dict(r._mapping) for r in store._rows(ACTIONS)]
