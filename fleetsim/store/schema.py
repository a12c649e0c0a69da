"""The store's schema: DDL, its version, and idempotent creation.

The table and column names here are an interface: users query them after a
run, and ``docs/reference/schema.md`` documents them. Change them only with a
new ``SCHEMA_VERSION`` and a note in that document.
"""

from __future__ import annotations

import re

SCHEMA_VERSION = 4

# Statuses a step moves through. 'failed' means "the last attempt failed and
# a retry is scheduled at available_at"; it is claimable like 'queued' once
# available_at has passed. 'dead' is the dead-letter queue (DLQ).
STEP_STATUSES = ("queued", "claimed", "completed", "failed", "dead", "cancelled")
TERMINAL_STATUSES = ("completed", "dead", "cancelled")
ATTEMPT_OUTCOMES = ("completed", "failed", "lease_lost", "released", "cancelled")

# Every registration of a pod id, append-only (schema 4; see DDL below).
POD_REGISTRATIONS = """
    CREATE TABLE IF NOT EXISTS pod_registrations (
        pod_id                text NOT NULL,
        incarnation           integer NOT NULL,
        pid                   integer,
        host                  text,
        registered_at         timestamptz NOT NULL,
        replaced_incarnation  integer
    )
"""

# Every redrive and purge of a dead step (fleetsim dlq), append-only.
DLQ_ACTIONS = """
    CREATE TABLE IF NOT EXISTS dlq_actions (
        id                   bigserial PRIMARY KEY,
        action               text NOT NULL CHECK (action IN ('redrive', 'purge')),
        step_id              bigint NOT NULL,
        queue                text NOT NULL,
        attempts             integer NOT NULL,
        max_attempts_before  integer NOT NULL,
        max_attempts_after   integer,
        error                text,
        at                   timestamptz NOT NULL
    )
"""

# Every batch `fleetsim prune` deleted, append-only (fleetsim.store.prune;
# created by the first prune, no schema version change: a store without it
# was never pruned, and the checker reads it so):
# which step ids (an exact multirange, compact when they are contiguous), how
# many of each terminal status, and the history rows deleted with them. The
# checker adds these to its totals and knows the ids are gone on purpose.
STEP_PRUNES = """
    CREATE TABLE IF NOT EXISTS step_prunes (
        id                bigserial PRIMARY KEY,
        prune_id          uuid NOT NULL,
        at                timestamptz NOT NULL,
        cutoff            timestamptz NOT NULL,
        older_than_s      double precision NOT NULL,
        step_ids          int8multirange NOT NULL,
        completed         integer NOT NULL,
        dead              integer NOT NULL,
        cancelled         integer NOT NULL,
        attempts          integer NOT NULL,
        rejected_writes   integer NOT NULL,
        leader_actions    integer NOT NULL
    )
"""

# One statement per entry, run in order inside one transaction. Every
# statement is idempotent so `fleetsim init` can run any number of times.
DDL: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS fleetsim_schema (
        version     integer PRIMARY KEY,
        applied_at  timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS queues (
        name               text PRIMARY KEY,
        concurrency_limit  integer CHECK (concurrency_limit > 0),
        max_length         integer CHECK (max_length > 0),
        strict_fifo        boolean NOT NULL DEFAULT false,
        paused             boolean NOT NULL DEFAULT false,
        created_at         timestamptz NOT NULL DEFAULT now(),
        -- Execution timeout of this queue's steps in seconds (null: none),
        -- unless a step sets its own (steps.timeout_s).
        timeout_s          double precision CHECK (timeout_s > 0)
    )
    """,
    # A global sequence: claim tokens grow monotonically across the whole
    # store, so "newer claim" is a plain integer comparison everywhere.
    "CREATE SEQUENCE IF NOT EXISTS claim_token_seq",
    """
    CREATE TABLE IF NOT EXISTS steps (
        id                bigserial PRIMARY KEY,
        queue             text NOT NULL,
        status            text NOT NULL DEFAULT 'queued' CHECK (status IN
                          ('queued','claimed','completed','failed','dead','cancelled')),
        priority          integer NOT NULL DEFAULT 0,
        payload           jsonb NOT NULL DEFAULT '{}'::jsonb,
        attempts          integer NOT NULL DEFAULT 0,
        max_attempts      integer NOT NULL DEFAULT 3 CHECK (max_attempts > 0),
        idempotency_key   text,
        claimed_by        text,
        claim_token       bigint,
        claimed_at        timestamptz,
        -- The claiming pod's incarnation (with claimed_by, claim_token and
        -- claimed_at: the open attempt, shown by the step_attempts view).
        claim_incarnation integer,
        cancel_requested  boolean NOT NULL DEFAULT false,
        available_at      timestamptz NOT NULL DEFAULT now(),
        created_at        timestamptz NOT NULL DEFAULT now(),
        finished_at       timestamptz,
        result            jsonb,
        error             text,
        -- Reserved for runs (pipelines): the steps this one waits on.
        depends_on        bigint[],
        -- Claimable (queued, or failed and waiting for its retry). Derived,
        -- so it can never disagree with status; see "A completion that
        -- touches no index" below.
        waiting           boolean GENERATED ALWAYS AS
                          (status IN ('queued', 'failed')) STORED,
        -- Set while the step is claimed through a queue's locked path
        -- (concurrency limit or strict FIFO), so that path can count the
        -- queue's open claims by index; false otherwise.
        limited_claim     boolean NOT NULL DEFAULT false,
        -- This step's execution timeout in seconds (null: its queue's).
        timeout_s         double precision CHECK (timeout_s > 0)
    ) WITH (fillfactor = 70)
    """,
    # A completion that touches no index. A completion changes status,
    # finished_at and result, so it is a HOT update (no new index entries,
    # a small WAL record) if and only if no index mentions those columns,
    # not even in a predicate, and the page has room (fillfactor above). A
    # completion was half the store's writes per step. So:
    # - the claimable index is keyed on the derived `waiting`, which a
    #   completion leaves false;
    # - there is no index of claimed steps: any such index must drop the
    #   step at completion. Recovery scans instead, once per pod that stops
    #   being alive (pods.swept_at); cancel requests and limited queues have
    #   the two small indexes below, which a completion leaves unchanged.
    """
    CREATE INDEX IF NOT EXISTS steps_claimable ON steps (priority, id) WHERE waiting
    """,
    # Heartbeats look up their pod's steps whose cancel was requested.
    """
    CREATE INDEX IF NOT EXISTS steps_cancel_requested
        ON steps (claimed_by) WHERE cancel_requested
    """,
    # The locked claim path counts its queue's open claims.
    """
    CREATE INDEX IF NOT EXISTS steps_limited_claims ON steps (queue) WHERE limited_claim
    """,
    # A store made at version 4 before the timeouts existed gets them here.
    "ALTER TABLE steps ADD COLUMN IF NOT EXISTS timeout_s double precision CHECK (timeout_s > 0)",
    "ALTER TABLE queues ADD COLUMN IF NOT EXISTS timeout_s double precision CHECK (timeout_s > 0)",
    # Recovery looks for overdue claims among the steps with their own
    # timeout. Partial, and on a column no write after the submit changes,
    # so completions stay HOT and steps without a timeout cost it nothing.
    """
    CREATE INDEX IF NOT EXISTS steps_with_timeout ON steps (id) WHERE timeout_s IS NOT NULL
    """,
    # Partial, so the many steps without a key cost this index nothing when
    # they change status.
    """
    CREATE UNIQUE INDEX IF NOT EXISTS steps_idempotency_key
        ON steps (idempotency_key) WHERE idempotency_key IS NOT NULL
    """,
    # The history of claims is append-only: an attempt is written once, by
    # the statement that ends it. An open attempt is the claim fields of its
    # `claimed` step; the step_attempts view (below) shows both as one row
    # per claim. Writing a row at the claim and updating it at the end cost
    # two contended writes per step; see docs/architecture.md.
    """
    CREATE TABLE IF NOT EXISTS finished_attempts (
        claim_token  bigint NOT NULL,
        step_id      bigint NOT NULL,
        pod_id       text NOT NULL,
        incarnation  integer NOT NULL DEFAULT 0,
        claimed_at   timestamptz NOT NULL,
        finished_at  timestamptz NOT NULL,
        outcome      text NOT NULL CHECK (outcome IN
                     ('completed','failed','lease_lost','released','cancelled'))
    )
    """,
    # No index on finished_attempts: every completion inserts here, and
    # index entries were a third of the store's cost per step. Nothing on
    # the hot path reads it back (a fenced write finds its step by primary
    # key; a refused write is appended to rejected_writes, not looked up),
    # and the checker reads it whole. A token is written once by
    # construction: only the statement that changes its `claimed` step
    # (under the row lock) ends an attempt.
    #
    # Every fenced write that was refused, as given: the step_attempts view
    # shows the first one as rejected_at on a superseded (lease_lost)
    # attempt. Rows for other tokens (a retry of an accepted write, a token
    # that never existed) show nowhere.
    """
    CREATE TABLE IF NOT EXISTS rejected_writes (
        claim_token  bigint NOT NULL,
        step_id      bigint NOT NULL,
        at           timestamptz NOT NULL
    )
    """,
    """
    CREATE OR REPLACE VIEW step_attempts AS
    SELECT a.claim_token, a.step_id, a.pod_id, a.incarnation, a.claimed_at, a.finished_at,
           a.outcome, CASE WHEN a.outcome = 'lease_lost' THEN r.rejected_at END AS rejected_at
      FROM finished_attempts a
      LEFT JOIN (SELECT claim_token, step_id, min(at) AS rejected_at
                   FROM rejected_writes GROUP BY claim_token, step_id) r
        ON r.claim_token = a.claim_token AND r.step_id = a.step_id
    UNION ALL
    SELECT claim_token, id, claimed_by, coalesce(claim_incarnation, 0), claimed_at,
           NULL::timestamptz, NULL::text, NULL::timestamptz
      FROM steps
     WHERE status = 'claimed'
    """,
    """
    CREATE TABLE IF NOT EXISTS pods (
        id            text PRIMARY KEY,
        incarnation   integer NOT NULL DEFAULT 0,
        pid           integer,
        host          text,
        status        text NOT NULL DEFAULT 'alive'
                      CHECK (status IN ('alive','dead','stopped')),
        started_at    timestamptz NOT NULL DEFAULT now(),
        heartbeat_at  timestamptz NOT NULL DEFAULT now(),
        died_at       timestamptz,
        -- When recovery last looked for this pod's claims after it stopped
        -- being alive; null while alive and until then. Recovery scans the
        -- steps for a pod once this is set.
        swept_at      timestamptz
    )
    """,
    # Every certain death of a pod process, append-only: its supervisor (the
    # coordinator) reaped it, then waited until the store had none of its
    # connections left (Store.record_exit), so nothing it sent can land
    # later. ``registered_at`` is the pods.started_at of the registration
    # that exited: recovery marks that very registration dead at once, never
    # a newer one (or the same incarnation registered again). ``ended_term``
    # is the leader term ended with it, if it held the lease. Created here,
    # not by a migration: a version 4 store gets it on its next `init`.
    """
    CREATE TABLE IF NOT EXISTS pod_exits (
        pod_id         text NOT NULL,
        incarnation    integer NOT NULL,
        pid            integer,
        registered_at  timestamptz NOT NULL,
        exited_at      timestamptz NOT NULL,
        returncode     integer,
        ended_term     bigint,
        PRIMARY KEY (pod_id, registered_at)
    )
    """,
    # Every registration of a pod id, append-only: which process (incarnation,
    # pid, host) held the id from when, and which live incarnation it
    # replaced, if any. The pods row shows only the latest; the checker needs
    # them all to tell a real claimer from an invented one.
    POD_REGISTRATIONS,
    # Every redrive and purge of a dead step, append-only (fleetsim dlq): the
    # checker accounts for purged steps and for attempt budgets granted again.
    DLQ_ACTIONS,
    # Not STEP_PRUNES: it is created by the first `fleetsim prune`
    # (fleetsim.store.prune), since its multirange needs PostgreSQL 14 and
    # `init` must keep working on older servers.
    """
    CREATE TABLE IF NOT EXISTS leader_lease (
        id           integer PRIMARY KEY CHECK (id = 1),
        holder       text,
        term         bigint NOT NULL DEFAULT 0,
        acquired_at  timestamptz,
        expires_at   timestamptz NOT NULL DEFAULT '-infinity'
    )
    """,
    "INSERT INTO leader_lease (id) VALUES (1) ON CONFLICT (id) DO NOTHING",
    """
    CREATE TABLE IF NOT EXISTS leader_terms (
        term        bigint PRIMARY KEY,
        pod_id      text NOT NULL,
        started_at  timestamptz NOT NULL,
        -- The lease's expiry as last renewed: the latest instant this term
        -- could act. ended_at is set on release or when superseded.
        expires_at  timestamptz NOT NULL,
        ended_at    timestamptz
    )
    """,
    # Every recovery action a leader took, with the term it acted under, so
    # the checker can prove each was taken inside a valid term.
    """
    CREATE TABLE IF NOT EXISTS leader_actions (
        id           bigserial PRIMARY KEY,
        term         bigint NOT NULL,
        pod_id       text NOT NULL,
        action       text NOT NULL CHECK (action IN
                     ('mark_dead','requeue','dead_letter')),
        target_pod   text,
        step_id      bigint,
        claim_token  bigint,
        at           timestamptz NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE OR REPLACE VIEW queue_stats AS
    SELECT q.name AS queue,
           count(s.id) FILTER (WHERE s.status IN ('queued','failed')) AS depth,
           count(s.id) FILTER (WHERE s.status = 'queued')    AS queued,
           count(s.id) FILTER (WHERE s.status = 'claimed')   AS claimed,
           count(s.id) FILTER (WHERE s.status = 'completed') AS completed,
           count(s.id) FILTER (WHERE s.status = 'failed')    AS failed,
           count(s.id) FILTER (WHERE s.status = 'dead')      AS dead,
           count(s.id) FILTER (WHERE s.status = 'cancelled') AS cancelled
      FROM queues q LEFT JOIN steps s ON s.queue = q.name
     GROUP BY q.name
    """,
    """
    INSERT INTO fleetsim_schema (version) VALUES (4) ON CONFLICT (version) DO NOTHING
    """,
)


# Statements that bring a store at the given version to the next one, run by
# `fleetsim init` in order from the store's version (MIGRATIONS[1], then
# MIGRATIONS[2], ...) before DDL, which then completes the current version.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 1 -> 2: the attempt history became append-only. step_attempts was a
    # table written at the claim and updated at the end; now the ended
    # attempts are the table finished_attempts, and the open ones are the
    # claim fields of their step.
    1: (
        "ALTER TABLE steps ADD COLUMN IF NOT EXISTS claim_incarnation integer",
        """
        UPDATE steps s SET claim_incarnation = a.incarnation
          FROM step_attempts a
         WHERE a.claim_token = s.claim_token AND s.status = 'claimed'
        """,
        "DELETE FROM step_attempts WHERE outcome IS NULL",
        "ALTER TABLE step_attempts RENAME TO finished_attempts",
        "ALTER INDEX step_attempts_pkey RENAME TO finished_attempts_pkey",
        "ALTER INDEX step_attempts_step RENAME TO finished_attempts_step",
        "UPDATE finished_attempts SET finished_at = claimed_at WHERE finished_at IS NULL",
        """
        ALTER TABLE finished_attempts
            ALTER COLUMN finished_at SET NOT NULL,
            ALTER COLUMN outcome SET NOT NULL,
            ALTER COLUMN claimed_at DROP DEFAULT
        """,
    ),
    # 2 -> 3: finished_attempts lost its indexes, and refused writes moved
    # from its rejected_at column (set by a lookup on its primary key) to
    # the append-only rejected_writes.
    2: (
        "DROP VIEW IF EXISTS step_attempts",
        """
        CREATE TABLE IF NOT EXISTS rejected_writes (
            claim_token  bigint NOT NULL,
            step_id      bigint NOT NULL,
            at           timestamptz NOT NULL
        )
        """,
        """
        INSERT INTO rejected_writes (claim_token, step_id, at)
        SELECT claim_token, step_id, rejected_at FROM finished_attempts
         WHERE rejected_at IS NOT NULL
        """,
        "ALTER TABLE finished_attempts DROP COLUMN rejected_at",
        "ALTER TABLE finished_attempts DROP CONSTRAINT IF EXISTS finished_attempts_pkey",
        "DROP INDEX IF EXISTS finished_attempts_step",
        # Completions became HOT updates: no index mentions status.
        "DROP INDEX IF EXISTS steps_claimable",
        "DROP INDEX IF EXISTS steps_claimed_by",
        """
        ALTER TABLE steps
            ADD COLUMN IF NOT EXISTS waiting boolean GENERATED ALWAYS AS
                (status IN ('queued', 'failed')) STORED,
            ADD COLUMN IF NOT EXISTS limited_claim boolean NOT NULL DEFAULT false,
            SET (fillfactor = 70)
        """,
        """
        UPDATE steps SET limited_claim = true
         WHERE status = 'claimed'
           AND queue IN (SELECT name FROM queues
                          WHERE concurrency_limit IS NOT NULL OR strict_fifo)
        """,
        "ALTER TABLE pods ADD COLUMN IF NOT EXISTS swept_at timestamptz",
    ),
    # 3 -> 4: pod registrations are recorded (pod_registrations, created by
    # DDL); the pods known so far are their own first registration. Steps
    # and queues got an execution timeout (null: none).
    3: (
        "ALTER TABLE steps ADD COLUMN IF NOT EXISTS timeout_s double precision"
        " CHECK (timeout_s > 0)",
        "ALTER TABLE queues ADD COLUMN IF NOT EXISTS timeout_s double precision"
        " CHECK (timeout_s > 0)",
        POD_REGISTRATIONS,
        """
        INSERT INTO pod_registrations (pod_id, incarnation, pid, host, registered_at)
        SELECT id, incarnation, pid, host, started_at FROM pods
        """,
    ),
}


def _named(pattern: str) -> tuple[str, ...]:
    found = (re.search(pattern, statement) for statement in DDL)
    return tuple(sorted({m.group(1) for m in found if m}))


# What a complete store at SCHEMA_VERSION has, read off DDL: its tables,
# sequences, indexes and views, and the columns DDL adds to older tables.
# `init` on a store at this version runs DDL only if one of them is
# missing (a store made at version 4 before the timeouts existed): DDL
# takes locks that live pods' transactions would wait behind.
CURRENT_RELATIONS = _named(
    r"CREATE (?:TABLE|SEQUENCE|(?:UNIQUE )?INDEX) IF NOT EXISTS (\w+)") + _named(
    r"CREATE OR REPLACE VIEW (\w+)")
CURRENT_COLUMNS = tuple(sorted(
    f"{m.group(1)}.{m.group(2)}" for statement in DDL
    if (m := re.search(r"ALTER TABLE (\w+) ADD COLUMN IF NOT EXISTS (\w+)", statement))))

# The names of CURRENT_RELATIONS and CURRENT_COLUMNS present in the store's schema.
PRESENT_RELATIONS = """
SELECT c.relname FROM pg_class c
 WHERE c.relnamespace = to_regnamespace(current_schema())
   AND c.relname = ANY(CAST(:names AS text[]))
"""
PRESENT_COLUMNS = """
SELECT table_name || '.' || column_name FROM information_schema.columns
 WHERE table_schema = current_schema()
   AND table_name || '.' || column_name = ANY(CAST(:names AS text[]))
"""
