"""Pruning: delete old terminal steps and their history, and record what went.

A store keeps every step and every attempt for ever, so it grows for ever.
:func:`prune` deletes the terminal steps (``completed``, ``dead``,
``cancelled``; ``failed`` waits for a retry, so it is not terminal) whose
``finished_at`` is older than a cutoff in database time, together with the
history rows the checker reads about them (``finished_attempts``,
``rejected_writes``, the leader's ``requeue``/``dead_letter`` actions naming
them), in batches of at most ``batch`` steps, one short transaction each.

Each batch appends one row to ``step_prunes`` in the same transaction as its
deletes: the exact step ids (a multirange), how many of each status, and how
many history rows went with them. So a step is either present with its
history or recorded as pruned, never silently gone, and the checker
(:mod:`fleetsim.store.checks`, :mod:`fleetsim.crosscheck`) adds the pruned
steps to its totals and does not ask the store (or a client history) for
them.

What is never pruned, because the checker may still judge it differently:

- a step that is not terminal, or finished at or after the cutoff;
- a step with an attempt ended, or a refused write recorded, at or after the
  cutoff (its history is still being written);
- a step a leader action names whose term has not ended before the cutoff:
  while a term is open its lease may still be renewed, so whether that
  action lay inside its term is not decided yet;
- a step locked by someone else right now (a redrive, a late write): batches
  use ``SKIP LOCKED`` so a live fleet never waits for a prune, and the next
  prune takes it.

Rows are locked only for the length of one batch; pods keep claiming and
completing beside a prune.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from fleetsim.errors import ConfigError, StoreError
from fleetsim.store.schema import STEP_PRUNES, TERMINAL_STATUSES
from fleetsim.store.store import Store

#: PostgreSQL 14: step_prunes records ids as an int8multirange.
MIN_SERVER_VERSION = 140000

#: Steps deleted per transaction, by default.
DEFAULT_BATCH = 5000

CUTOFF = "SELECT statement_timestamp() - make_interval(secs => :s)"

# Steps a leader action names under a term not ended before the cutoff:
# whether that action lay inside its term is still open. An action whose
# term is not recorded at all is kept too (the checker reports it).
HELD = """held AS MATERIALIZED (
    SELECT DISTINCT la.step_id FROM leader_actions la
      LEFT JOIN leader_terms t ON t.term = la.term
     WHERE la.step_id IS NOT NULL
       AND (t.term IS NULL OR t.ended_at IS NULL OR t.ended_at >= :cutoff)
)"""

# The next batch of candidates, by id from where the last batch ended.
_CANDIDATE_WHERE = """
     s.id > :after
 AND s.status IN ('completed', 'dead', 'cancelled')
 AND s.finished_at < :cutoff
 AND NOT EXISTS (SELECT 1 FROM held h WHERE h.step_id = s.id)
"""

PICK = "WITH " + HELD + """
SELECT s.id, s.status FROM steps s
 WHERE """ + _CANDIDATE_WHERE + """
 ORDER BY s.id
 LIMIT :batch
   FOR UPDATE OF s SKIP LOCKED
"""  # constant fragments only, as in queries.py

# Candidates whose history is still being written: an attempt ended, or a
# refused write landed, at or after the cutoff.
STILL_WRITTEN = """
SELECT DISTINCT step_id FROM finished_attempts
 WHERE step_id = ANY(CAST(:ids AS bigint[])) AND finished_at >= :cutoff
UNION
SELECT DISTINCT step_id FROM rejected_writes
 WHERE step_id = ANY(CAST(:ids AS bigint[])) AND at >= :cutoff
"""

DELETE_ATTEMPTS = """
DELETE FROM finished_attempts WHERE step_id = ANY(CAST(:ids AS bigint[]))
"""
DELETE_REJECTED = "DELETE FROM rejected_writes WHERE step_id = ANY(CAST(:ids AS bigint[]))"
DELETE_ACTIONS = "DELETE FROM leader_actions WHERE step_id = ANY(CAST(:ids AS bigint[]))"
# Re-checked under the lock: only a step still terminal and old is deleted.
DELETE_STEPS = """
DELETE FROM steps
 WHERE id = ANY(CAST(:ids AS bigint[]))
   AND status IN ('completed', 'dead', 'cancelled') AND finished_at < :cutoff
RETURNING id, status
"""

RECORD = """
INSERT INTO step_prunes (prune_id, at, cutoff, older_than_s, step_ids, completed, dead,
                         cancelled, attempts, rejected_writes, leader_actions)
SELECT :prune_id, statement_timestamp(), :cutoff, :older_than_s,
       (SELECT range_agg(int8range(i, i, '[]'))
          FROM unnest(CAST(:ids AS bigint[])) AS i),
       :completed, :dead, :cancelled, :attempts, :rejected, :actions
"""

# --dry-run: what a prune would delete now (no locks; a live fleet may change it).
DRY_RUN = "WITH " + HELD + """, picked AS (
    SELECT s.id, s.status FROM steps s WHERE """ + _CANDIDATE_WHERE + """
), fresh AS (
    SELECT step_id FROM finished_attempts
     WHERE finished_at >= :cutoff AND step_id IN (SELECT id FROM picked)
    UNION
    SELECT step_id FROM rejected_writes
     WHERE at >= :cutoff AND step_id IN (SELECT id FROM picked)
), kept AS (
    SELECT * FROM picked WHERE id NOT IN (SELECT step_id FROM fresh)
)
SELECT (SELECT count(*) FROM kept WHERE status = 'completed') AS completed,
       (SELECT count(*) FROM kept WHERE status = 'dead') AS dead,
       (SELECT count(*) FROM kept WHERE status = 'cancelled') AS cancelled,
       (SELECT count(*) FROM finished_attempts
         WHERE step_id IN (SELECT id FROM kept)) AS attempts,
       (SELECT count(*) FROM rejected_writes
         WHERE step_id IN (SELECT id FROM kept)) AS rejected_writes,
       (SELECT count(*) FROM leader_actions
         WHERE step_id IN (SELECT id FROM kept)) AS leader_actions
"""  # noqa: S608

COUNT_KEYS = ("completed", "dead", "cancelled", "attempts", "rejected_writes",
              "leader_actions")


@dataclass(frozen=True)
class PruneResult:
    """What one prune deleted (or, with ``dry_run``, would delete)."""

    older_than_s: float
    watermark: datetime  # the cutoff: every pruned step finished before it
    counts: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    dry_run: bool = False
    prune_id: str | None = None

    @property
    def steps(self) -> int:
        """Steps deleted (of every terminal status)."""
        return sum(self.counts.get(s, 0) for s in TERMINAL_STATUSES)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of ``fleetsim prune --json``."""
        return {
            "pruned": {"steps": self.steps, **self.counts},
            "older_than_s": self.older_than_s,
            "watermark": self.watermark.isoformat(),
            "batches": self.batches,
            "dry_run": self.dry_run,
            "prune_id": self.prune_id,
        }


def ensure_schema(store: Store, *, create: bool = True) -> None:
    """Create ``step_prunes`` if this (version 4) store has none yet; idempotent.

    Raises SchemaMismatch first if the database holds no fleetsim store of
    this version (a prune never creates tables in a schema that is not one),
    and ConfigError on a server older than PostgreSQL 14. With
    ``create=False`` only checks.
    """
    store.check_schema()
    version = int(store._rows("SELECT current_setting('server_version_num')")[0][0])
    if version < MIN_SERVER_VERSION:
        raise ConfigError(
            f"fleetsim prune needs PostgreSQL 14 or newer (multiranges); {store.url_for_display}"
            f" runs {version // 10000}")
    if not create:
        return
    with store._transaction() as conn:
        # Serialised like init_schema: CREATE ... IF NOT EXISTS races otherwise.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(7364003)"))
        conn.execute(sa.text(STEP_PRUNES))


def prune(
    store: Store, older_than_s: float, *, batch: int = DEFAULT_BATCH, dry_run: bool = False,
    progress: Callable[[PruneResult], None] | None = None,
) -> PruneResult:
    """Delete terminal steps finished more than ``older_than_s`` ago, and their history.

    One transaction per batch of at most ``batch`` steps; each records its
    step ids and counts in ``step_prunes``. ``progress`` is called with the
    running totals after each batch. With ``dry_run``, nothing is deleted
    or locked and the counts are what a prune would delete now.
    """
    if batch < 1:
        raise ConfigError("the batch size must be at least 1")
    if older_than_s < 0:
        raise ConfigError("--older-than cannot be negative")
    ensure_schema(store, create=not dry_run)  # a dry run changes nothing
    cutoff: datetime = store._rows(CUTOFF, s=older_than_s)[0][0]
    if dry_run:
        with store._transaction() as conn:
            # One statement over the whole store: more than an operation's timeout.
            conn.execute(sa.text("SET LOCAL statement_timeout = '10min'"))
            row = conn.execute(sa.text(DRY_RUN), {"cutoff": cutoff, "after": 0}).one()
        counts = {k: int(getattr(row, k)) for k in COUNT_KEYS}
        return PruneResult(older_than_s, cutoff, counts, 0, dry_run=True)

    prune_id = str(uuid.uuid4())
    totals = dict.fromkeys(COUNT_KEYS, 0)
    after, batches = 0, 0
    while True:
        with store._transaction() as conn:
            # A prune must never make a pod wait: give up on a lock quickly
            # (SKIP LOCKED covers the steps; this covers anything else).
            conn.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            # A batch scans the history tables (they have no index by step,
            # so completions stay cheap): give a large store's scan time.
            conn.execute(sa.text("SET LOCAL statement_timeout = '5min'"))
            picked = list(conn.execute(sa.text(PICK), {"cutoff": cutoff, "after": after,
                                                       "batch": batch}))
            if not picked:
                break
            after = max(int(r.id) for r in picked)
            ids = [int(r.id) for r in picked]
            fresh = {int(r[0]) for r in conn.execute(sa.text(STILL_WRITTEN),
                                                     {"ids": ids, "cutoff": cutoff})}
            ids = [i for i in ids if i not in fresh]
            if ids:
                params = {"ids": ids}
                attempts = conn.execute(sa.text(DELETE_ATTEMPTS), params).rowcount
                rejected = conn.execute(sa.text(DELETE_REJECTED), params).rowcount
                actions = conn.execute(sa.text(DELETE_ACTIONS), params).rowcount
                deleted = list(conn.execute(sa.text(DELETE_STEPS), {**params,
                                                                     "cutoff": cutoff}))
                # The steps were locked and re-checked by PICK, so every one
                # is deleted; were one not, its history is gone already and
                # the transaction must not commit.
                if len(deleted) != len(ids):
                    raise StoreError(
                        "a locked step changed under the prune; its batch was rolled back")
                by_status = dict.fromkeys(TERMINAL_STATUSES, 0)
                for r in deleted:
                    by_status[str(r.status)] += 1
                conn.execute(sa.text(RECORD), {
                    "prune_id": prune_id, "cutoff": cutoff, "older_than_s": older_than_s,
                    "ids": ids, **by_status, "attempts": attempts, "rejected": rejected,
                    "actions": actions,
                })
                for key, n in (*by_status.items(), ("attempts", attempts),
                               ("rejected_writes", rejected), ("leader_actions", actions)):
                    totals[key] += n
                batches += 1
        if progress is not None:
            progress(PruneResult(older_than_s, cutoff, dict(totals), batches,
                                 prune_id=prune_id))
        if len(picked) < batch:
            break
    return PruneResult(older_than_s, cutoff, totals, batches, prune_id=prune_id)

