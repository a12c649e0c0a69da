"""The checker's SQL: invariants and figures computed from the recorded history.

Everything is aggregated in the database: each query scans the history once
or twice, and only violations come back, at most ``limit`` witnesses per
invariant plus the total count. So checking a million steps takes seconds
and the client's memory does not grow with the history. All the queries run
in one REPEATABLE READ, read-only transaction: a fleet that keeps running
while it is checked is seen at one instant.

:mod:`fleetsim.checker` turns the findings into a report; this module only
knows tables. :func:`iter_history` streams the same history as Jepsen-style
operation records through a server-side cursor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from fleetsim.store.store import Store

INVARIANTS = (
    "lost_step",
    "duplicate_completion",
    "stale_write",
    "split_brain",
    "fifo_order",
    "concurrency_limit",
    "dlq",
    "exclusive_claims",
    "history_integrity",
)

# -- invariants -------------------------------------------------------------

# lost_step, duplicate_completion and dlq: one pass over steps joined to a
# per-step aggregate of its attempts.
PER_STEP = """
WITH per_step AS (
    SELECT step_id,
           count(*) FILTER (WHERE outcome = 'completed') AS completions,
           count(*) FILTER (WHERE outcome IN ('failed', 'lease_lost')) AS spent
      FROM step_attempts
     GROUP BY step_id
), suspect AS MATERIALIZED (
    -- One cheap filter over every step first; only suspects are classified.
    SELECT s.id AS step_id, s.queue, s.status, s.attempts, s.max_attempts, s.claim_token,
           coalesce(a.completions, 0) AS completions, coalesce(a.spent, 0) AS spent
      FROM steps s
      LEFT JOIN per_step a ON a.step_id = s.id
     WHERE CASE WHEN s.status = 'completed' THEN coalesce(a.completions, 0) <> 1
                ELSE coalesce(a.completions, 0) > 0
                     OR (CAST(:final AS boolean)
                         AND s.status IN ('queued', 'claimed', 'failed')) END
        OR (s.status = 'dead') <> (coalesce(a.spent, 0) >= s.max_attempts)
        OR s.attempts <> coalesce(a.spent, 0)
), found AS (
    SELECT f.invariant, f.kind, suspect.*
      FROM suspect
     CROSS JOIN LATERAL (VALUES
        -- An accepted completion that the step's row no longer shows.
        ('lost_step', 'completion_lost', status <> 'completed' AND completions > 0),
        ('lost_step', 'not_finished',
         CAST(:final AS boolean) AND status IN ('queued', 'claimed', 'failed')
         AND completions = 0),
        ('duplicate_completion', 'several', completions > 1),
        ('duplicate_completion', 'none', status = 'completed' AND completions = 0),
        -- Dead iff the spent attempts reached max_attempts, and the counter
        -- agrees with the attempts that spent one.
        ('dlq', 'dlq', (status = 'dead') <> (spent >= max_attempts) OR attempts <> spent)
     ) AS f(invariant, kind, hit)
     WHERE f.hit
), ranked AS (
    SELECT found.*,
           row_number() OVER (PARTITION BY invariant ORDER BY step_id, kind) AS n,
           count(*) OVER (PARTITION BY invariant) AS total
      FROM found
)
SELECT invariant, kind, total, step_id, queue, status, attempts, max_attempts,
       claim_token AS step_claim_token, completions, spent
  FROM ranked
 WHERE n <= :limit
 ORDER BY invariant, n
"""

# The attempts of the witness steps, to show who wrote what and when.
ATTEMPTS_OF_STEPS = """
SELECT step_id, claim_token, pod_id, incarnation, claimed_at, finished_at, outcome,
       rejected_at
  FROM step_attempts
 WHERE step_id = ANY(CAST(:ids AS bigint[]))
 ORDER BY step_id, claim_token
"""

# stale_write: an accepted write whose token was no longer current when it
# was made. Tokens only grow, and a step is claimable again only after its
# previous attempt ended (available_at >= that finish), so in a valid history
# every later claim of a step starts at or after each earlier attempt's end.
# A write is stale if (a) a later claim of the same step had already started
# when it was made, (b) recovery had revoked its token (the leader requeued
# or dead-lettered that claim), or (c) it is a step's only completion but not
# its latest claim. Steps with several completions are duplicate_completion.
STALE_WRITES = """
WITH w AS (
    SELECT a.step_id, a.claim_token, a.pod_id, a.incarnation, a.outcome, a.claimed_at,
           a.finished_at,
           min(a.claimed_at) OVER later AS next_claimed_at,
           count(*) FILTER (WHERE a.outcome = 'completed') OVER whole AS completions,
           max(a.claim_token) OVER whole AS max_token
      FROM step_attempts a
    WINDOW later AS (PARTITION BY a.step_id ORDER BY a.claim_token DESC
                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
           whole AS (PARTITION BY a.step_id ORDER BY a.claim_token DESC
                     ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
), revoked AS (
    SELECT claim_token, min(at) AS at, min(term) AS term
      FROM leader_actions
     WHERE action IN ('requeue', 'dead_letter') AND claim_token IS NOT NULL
     GROUP BY claim_token
), found AS MATERIALIZED (
    SELECT w.step_id, w.claim_token, w.pod_id, w.incarnation, w.outcome, w.claimed_at,
           w.finished_at, w.next_claimed_at, s.claim_token AS step_claim_token,
           r.at AS revoked_at, r.term AS revoked_term,
           w.finished_at > w.next_claimed_at AS superseded,
           (w.outcome = 'completed' AND w.completions = 1
            AND (w.claim_token <> s.claim_token OR w.claim_token <> w.max_token))
               AS not_latest
      FROM w
      JOIN steps s ON s.id = w.step_id
      LEFT JOIN revoked r ON r.claim_token = w.claim_token
     WHERE w.outcome IN ('completed', 'failed', 'released', 'cancelled')
       AND (w.finished_at > w.next_claimed_at
            OR r.claim_token IS NOT NULL
            OR (w.outcome = 'completed' AND w.completions = 1
                AND (w.claim_token <> s.claim_token OR w.claim_token <> w.max_token)))
), limited AS (
    SELECT found.*, count(*) OVER () AS total
      FROM found
     ORDER BY step_id, claim_token
     LIMIT :limit
)
SELECT l.total, l.step_id, l.claim_token, l.pod_id, l.incarnation, l.outcome,
       l.claimed_at, l.finished_at, l.step_claim_token, l.revoked_at, l.revoked_term,
       l.superseded, l.not_latest,
       nxt.claim_token AS newer_claim_token, nxt.pod_id AS newer_pod,
       nxt.claimed_at AS newer_claimed_at
  FROM limited l
  LEFT JOIN LATERAL (
      SELECT b.claim_token, b.pod_id, b.claimed_at
        FROM step_attempts b
       WHERE b.step_id = l.step_id AND b.claim_token > l.claim_token
       ORDER BY b.claimed_at, b.claim_token
       LIMIT 1
  ) nxt ON true
 ORDER BY l.step_id, l.claim_token
"""

# split_brain (terms): ordered by term, each term starts after every earlier
# term ended (ended_at, else its last expiry) and after the previous start.
OVERLAPPING_TERMS = """
WITH t AS (
    SELECT term, pod_id, started_at, coalesce(ended_at, expires_at) AS end_at,
           lag(started_at) OVER (ORDER BY term) AS prev_started_at,
           max(coalesce(ended_at, expires_at)) OVER (
               ORDER BY term ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_end_at
      FROM leader_terms
), limited AS (
    SELECT t.*, count(*) OVER () AS total
      FROM t
     WHERE t.started_at < t.prev_end_at OR t.started_at <= t.prev_started_at
     ORDER BY t.term
     LIMIT :limit
)
SELECT l.total, l.term, l.pod_id, l.started_at, l.end_at,
       o.term AS other_term, o.pod_id AS other_pod, o.started_at AS other_started_at,
       o.end_at AS other_end_at
  FROM limited l
  LEFT JOIN LATERAL (
      SELECT p.term, p.pod_id, p.started_at, coalesce(p.ended_at, p.expires_at) AS end_at
        FROM leader_terms p
       WHERE p.term < l.term
         AND (coalesce(p.ended_at, p.expires_at) > l.started_at
              OR p.started_at >= l.started_at)
       ORDER BY p.term DESC
       LIMIT 1
  ) o ON true
 ORDER BY l.term
"""

# split_brain (actions): every leader action lies inside the term it names
# and was taken by that term's holder.
ACTIONS_OUTSIDE_TERMS = """
SELECT count(*) OVER () AS total, la.id AS action_id, la.term, la.pod_id, la.action,
       la.target_pod, la.step_id, la.claim_token, la.at,
       t.pod_id AS term_pod, t.started_at AS term_started_at,
       coalesce(t.ended_at, t.expires_at) AS term_end_at
  FROM leader_actions la
  LEFT JOIN leader_terms t ON t.term = la.term
 WHERE t.term IS NULL
    OR la.pod_id <> t.pod_id
    OR la.at < t.started_at
    OR la.at > coalesce(t.ended_at, t.expires_at)
 ORDER BY la.id
 LIMIT :limit
"""

# fifo_order: in a strict-FIFO queue, no step is first claimed while an
# earlier-submitted step of the queue is still waiting. A step "leaves" the
# queue at its first claim, at its cancellation if it was never claimed, or
# never. Claims of one statement share a timestamp and count as simultaneous.
FIFO_ORDER = """
WITH fifo AS (
    SELECT s.id, s.queue, s.status, f.first_claimed_at, f.first_token,
           coalesce(f.first_claimed_at,
                    CASE WHEN s.status = 'cancelled' THEN s.finished_at END,
                    CAST('infinity' AS timestamptz)) AS left_at
      FROM steps s
      JOIN queues q ON q.name = s.queue AND q.strict_fifo
      -- One aggregate pass over the history (it has no index by step).
      LEFT JOIN (
          SELECT a.step_id, min(a.claimed_at) AS first_claimed_at,
                 min(a.claim_token) AS first_token
            FROM step_attempts a
           GROUP BY a.step_id
      ) f ON f.step_id = s.id
), w AS (
    SELECT fifo.*,
           max(left_at) OVER (PARTITION BY queue ORDER BY id
                              ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
               AS earlier_left_at
      FROM fifo
), found AS MATERIALIZED (
    SELECT w.* FROM w WHERE w.first_claimed_at < w.earlier_left_at
), limited AS (
    SELECT found.*, count(*) OVER () AS total
      FROM found
     ORDER BY queue, id
     LIMIT :limit
)
SELECT l.total, l.queue, l.id AS step_id, l.first_token, l.first_claimed_at,
       e.id AS earlier_step_id, e.status AS earlier_status,
       e.first_token AS earlier_first_token, e.first_claimed_at AS earlier_first_claimed_at
  FROM limited l
  LEFT JOIN LATERAL (
      SELECT f.id, f.status, f.first_token, f.first_claimed_at
        FROM fifo f
       WHERE f.queue = l.queue AND f.id < l.id AND f.left_at > l.first_claimed_at
       ORDER BY f.id
       LIMIT 1
  ) e ON true
 ORDER BY l.queue, l.id
"""

# concurrency_limit: a sweep over the claim (+1) and end (-1) events of each
# limited queue's attempts; at equal times ends come first, since a claim
# that counted the queue after a finish committed started after that finish.
CONCURRENCY = """
WITH la AS (
    SELECT s.queue, q.concurrency_limit AS lim, a.step_id, a.claim_token, a.pod_id,
           a.claimed_at, a.finished_at
      FROM step_attempts a
      JOIN steps s ON s.id = a.step_id
      JOIN queues q ON q.name = s.queue
     WHERE q.concurrency_limit IS NOT NULL
), sweep AS (
    SELECT la.queue, la.lim, la.step_id, la.claim_token, la.pod_id, e.at, e.delta,
           sum(e.delta) OVER (PARTITION BY la.queue ORDER BY e.at, e.delta, la.claim_token
                              ROWS UNBOUNDED PRECEDING) AS running
      FROM la
     CROSS JOIN LATERAL (VALUES (la.claimed_at, 1), (la.finished_at, -1)) AS e(at, delta)
     WHERE e.at IS NOT NULL
), found AS MATERIALIZED (
    SELECT sweep.* FROM sweep WHERE delta = 1 AND running > lim
), limited AS (
    SELECT found.*, count(*) OVER () AS total
      FROM found
     ORDER BY queue, at, claim_token
     LIMIT :limit
)
SELECT l.total, l.queue, l.lim, l.at, l.running, l.step_id, l.claim_token, l.pod_id,
       o.step_ids, o.tokens, o.pods
  FROM limited l
 CROSS JOIN LATERAL (
      SELECT array_agg(x.step_id ORDER BY x.claim_token) AS step_ids,
             array_agg(x.claim_token ORDER BY x.claim_token) AS tokens,
             array_agg(x.pod_id ORDER BY x.claim_token) AS pods
        FROM la x
       WHERE x.queue = l.queue AND x.claimed_at <= l.at
         AND coalesce(x.finished_at, CAST('infinity' AS timestamptz)) > l.at
  ) o
 ORDER BY l.queue, l.at, l.claim_token
"""

# Every attempt, finished or open, for the integrity checks (the step_attempts
# view without its join to rejected_writes, which these checks do not need).
_ATT = """att AS (
    SELECT claim_token, step_id, pod_id, incarnation, claimed_at, finished_at, outcome
      FROM finished_attempts
    UNION ALL
    SELECT claim_token, id, claimed_by, coalesce(claim_incarnation, 0), claimed_at,
           CAST(NULL AS timestamptz), CAST(NULL AS text)
      FROM steps WHERE status = 'claimed'
)"""

# exclusive_claims: the attempts of one step never overlap in time. Ordered by
# token, each attempt ends before the step's next claim starts. Accepted writes
# that end after a later claim are stale_write (superseded); this covers the
# rest: revoked (lease_lost) attempts and open ones.
# Built from constant fragments only (no values), as in queries.py.
EXCLUSIVE_CLAIMS = "WITH " + _ATT + """, w AS (
    SELECT att.*,
           min(claimed_at) OVER (PARTITION BY step_id ORDER BY claim_token DESC
                                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
               AS next_claimed_at
      FROM att
), found AS MATERIALIZED (
    SELECT w.* FROM w
     WHERE (w.outcome = 'lease_lost' OR w.outcome IS NULL)
       AND w.next_claimed_at IS NOT NULL
       AND (w.finished_at IS NULL OR w.finished_at > w.next_claimed_at)
), limited AS (
    SELECT found.*, count(*) OVER () AS total
      FROM found ORDER BY step_id, claim_token LIMIT :limit
)
SELECT l.total, l.step_id, l.claim_token, l.pod_id, l.incarnation, l.outcome, l.claimed_at,
       l.finished_at, n.claim_token AS next_claim_token, n.pod_id AS next_pod,
       n.claimed_at AS next_claimed_at
  FROM limited l
  LEFT JOIN LATERAL (
      SELECT b.claim_token, b.pod_id, b.claimed_at FROM att b
       WHERE b.step_id = l.step_id AND b.claim_token > l.claim_token
       ORDER BY b.claimed_at, b.claim_token LIMIT 1
  ) n ON true
 ORDER BY l.step_id, l.claim_token
"""  # noqa: S608

# history_integrity: the history is whole and consistent with itself. Each
# branch is one rule (its kind); each row a witness as jsonb. The rules and
# what the store cannot show are in docs/reference/checker.md.
INTEGRITY = "WITH " + _ATT + """, per_step AS (
    SELECT step_id,
           count(*) FILTER (WHERE outcome IN ('failed', 'lease_lost')) AS spent,
           min(claimed_at) AS first_claimed_at, min(claim_token) AS first_token,
           min(pod_id) AS some_pod,
           count(*) FILTER (WHERE outcome = 'completed') AS completions,
           min(claim_token) FILTER (WHERE outcome = 'completed') AS c_token,
           min(pod_id) FILTER (WHERE outcome = 'completed') AS c_pod,
           min(incarnation) FILTER (WHERE outcome = 'completed') AS c_incarnation,
           min(claimed_at) FILTER (WHERE outcome = 'completed') AS c_claimed_at
      FROM finished_attempts GROUP BY step_id
), steps_x AS MATERIALIZED (
    -- One join of the steps with their attempts' aggregate serves four rules
    -- (an open claim is the step's own claimed_at).
    SELECT p.*, s.id, s.status, s.created_at, s.claim_token, s.claimed_by,
           coalesce(s.claim_incarnation, 0) AS claim_incarnation, s.claimed_at, s.error,
           s.attempts,
           LEAST(p.first_claimed_at, s.claimed_at) AS first_claim_at
      FROM per_step p FULL JOIN steps s ON s.id = p.step_id
     WHERE s.id IS NULL
        OR LEAST(p.first_claimed_at, s.claimed_at) < s.created_at
        OR (s.status = 'completed' AND p.completions = 1 AND p.c_token = s.claim_token
            AND (p.c_pod IS DISTINCT FROM s.claimed_by
                 OR p.c_incarnation <> coalesce(s.claim_incarnation, 0)
                 OR p.c_claimed_at IS DISTINCT FROM s.claimed_at))
        OR ((s.error IS NOT NULL OR s.status = 'failed') AND coalesce(p.spent, 0) = 0)
), revocations AS MATERIALIZED (
    SELECT * FROM leader_actions
     WHERE action IN ('requeue', 'dead_letter') AND claim_token IS NOT NULL
), rev AS MATERIALIZED (
    -- Each revocation with the attempt it names (looked up for these tokens only).
    SELECT r.id, r.action, r.term, r.step_id, r.claim_token, r.target_pod, r.at,
           a.claim_token AS a_token, a.step_id AS a_step_id, a.pod_id AS a_pod,
           a.outcome AS a_outcome, a.claimed_at AS a_claimed_at,
           a.finished_at AS a_finished_at
      FROM revocations r
      LEFT JOIN (SELECT * FROM att
                  WHERE claim_token IN (SELECT claim_token FROM revocations)) a
        ON a.claim_token = r.claim_token
), found AS MATERIALIZED (
    -- Attempts whose step does not exist.
    SELECT 'orphan_attempt' AS kind, x.step_id, x.first_token AS token,
           jsonb_build_object('step_id', x.step_id, 'claim_token', x.first_token,
                              'pod', x.some_pod) AS w
      FROM steps_x x WHERE x.id IS NULL
       -- A dead step purged with `fleetsim dlq purge` is gone on purpose.
       AND NOT EXISTS (SELECT 1 FROM dlq_actions d
                        WHERE d.action = 'purge' AND d.step_id = x.step_id)
    UNION ALL
    -- Steps a leader action names that are gone with all their attempts.
    SELECT 'missing_step', la.step_id, min(la.claim_token),
           jsonb_build_object('step_id', la.step_id, 'claim_token', min(la.claim_token),
                              'action', min(la.action), 'term', min(la.term))
      FROM leader_actions la
     WHERE la.step_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.id = la.step_id)
       AND NOT EXISTS (SELECT 1 FROM steps_x x WHERE x.id IS NULL AND x.step_id = la.step_id)
       AND NOT EXISTS (SELECT 1 FROM dlq_actions d
                        WHERE d.action = 'purge' AND d.step_id = la.step_id)
     GROUP BY la.step_id
    UNION ALL
    -- A claim token recorded twice.
    SELECT 'duplicate_token', min(step_id), claim_token,
           jsonb_build_object('claim_token', claim_token,
                              'step_ids', jsonb_build_array(min(step_id), max(step_id)))
      FROM att GROUP BY claim_token HAVING count(*) > 1
    UNION ALL
    -- Pods named anywhere that never registered (the pods table keeps one row
    -- per pod id, whatever its incarnations).
    SELECT 'unknown_pod', min(r.step_id), min(r.token),
           jsonb_build_object('pod', r.pod, 'named_by', min(r.src), 'rows', sum(r.n),
                              'step_id', min(r.step_id))
      FROM (SELECT pod_id AS pod, 'attempt' AS src, min(step_id) AS step_id,
                   min(claim_token) AS token, count(*) AS n
              FROM finished_attempts GROUP BY pod_id
            UNION ALL
            SELECT claimed_by, 'step', min(id), min(claim_token), count(*) FROM steps
             WHERE claimed_by IS NOT NULL GROUP BY claimed_by
            UNION ALL
            SELECT pod_id, 'leader_term', NULL, NULL, count(*) FROM leader_terms GROUP BY pod_id
            UNION ALL
            SELECT pod_id, 'leader_action', min(step_id), min(claim_token), count(*)
              FROM leader_actions GROUP BY pod_id
            UNION ALL
            SELECT target_pod, 'leader_action', min(step_id), min(claim_token), count(*)
              FROM leader_actions WHERE target_pod IS NOT NULL GROUP BY target_pod) r
     WHERE NOT EXISTS (SELECT 1 FROM pods p WHERE p.id = r.pod)
     GROUP BY r.pod
    UNION ALL
    -- A claim made after the pod's latest registration must carry that
    -- incarnation (earlier incarnations are not kept: see the limits).
    SELECT 'unknown_incarnation', a.step_id, a.claim_token,
           jsonb_build_object('step_id', a.step_id, 'claim_token', a.claim_token,
                              'pod', a.pod_id, 'incarnation', a.incarnation,
                              'claimed_at', a.claimed_at,
                              'registered_incarnation', p.incarnation,
                              'registered_at', p.started_at)
      FROM att a JOIN pods p ON p.id = a.pod_id
     WHERE a.claimed_at >= p.started_at AND a.incarnation <> p.incarnation
    UNION ALL
    -- Every claim was made by an incarnation registered before it
    -- (pod_registrations, schema 4; claims older than a pod's first recorded
    -- registration, in a store migrated from version 3, are not judged).
    SELECT 'unknown_incarnation', a.step_id, a.claim_token,
           jsonb_build_object('step_id', a.step_id, 'claim_token', a.claim_token,
                              'pod', a.pod_id, 'incarnation', a.incarnation,
                              'claimed_at', a.claimed_at, 'registered_incarnation', NULL)
      FROM att a
      JOIN (SELECT pod_id, min(registered_at) AS first_at FROM pod_registrations
             GROUP BY pod_id) f ON f.pod_id = a.pod_id AND a.claimed_at >= f.first_at
     WHERE NOT EXISTS (SELECT 1 FROM pod_registrations r
                        WHERE r.pod_id = a.pod_id AND r.incarnation = a.incarnation
                          AND r.registered_at <= a.claimed_at)
       -- Claims since the latest registration are the rule above's.
       AND NOT EXISTS (SELECT 1 FROM pods p
                        WHERE p.id = a.pod_id AND a.claimed_at >= p.started_at)
    UNION ALL
    -- A completed step shows the claim that completed it.
    SELECT 'attempt_mismatch', x.id, x.claim_token,
           jsonb_build_object('step_id', x.id, 'claim_token', x.claim_token,
                              'attempt_pod', x.c_pod, 'step_pod', x.claimed_by,
                              'attempt_incarnation', x.c_incarnation,
                              'step_incarnation', x.claim_incarnation,
                              'attempt_claimed_at', x.c_claimed_at,
                              'step_claimed_at', x.claimed_at)
      FROM steps_x x
     WHERE x.status = 'completed' AND x.completions = 1 AND x.c_token = x.claim_token
       AND (x.c_pod IS DISTINCT FROM x.claimed_by
            OR x.c_incarnation <> x.claim_incarnation
            OR x.c_claimed_at IS DISTINCT FROM x.claimed_at)
    UNION ALL
    -- Instants out of order.
    SELECT 'ends_before_start', x.step_id, x.token,
           jsonb_build_object('what', x.what, 'step_id', x.step_id, 'claim_token', x.token,
                              'pod', x.pod, 'term', x.term, 'started_at', x.started_at,
                              'ended_at', x.ended_at)
      FROM (SELECT 'attempt' AS what, step_id, claim_token AS token, pod_id AS pod,
                   CAST(NULL AS bigint) AS term, claimed_at AS started_at,
                   finished_at AS ended_at
              FROM finished_attempts WHERE finished_at < claimed_at
            UNION ALL
            SELECT 'claim_before_submit', id, first_token, claimed_by, NULL, created_at,
                   first_claim_at
              FROM steps_x WHERE first_claim_at < created_at
            UNION ALL
            SELECT 'step', id, claim_token, claimed_by, NULL, coalesce(claimed_at, created_at),
                   finished_at
              FROM steps WHERE finished_at < coalesce(claimed_at, created_at)
            UNION ALL
            SELECT 'term', NULL, NULL, pod_id, term, started_at,
                   coalesce(ended_at, expires_at)
              FROM leader_terms WHERE coalesce(ended_at, expires_at) < started_at
            UNION ALL
            SELECT 'revocation', step_id, claim_token, target_pod, term, a_claimed_at, at
              FROM rev WHERE at < a_claimed_at
            UNION ALL
            SELECT 'pod', NULL, NULL, id, NULL, started_at,
                   LEAST(heartbeat_at, died_at)
              FROM pods WHERE LEAST(heartbeat_at, died_at) < started_at) x
    UNION ALL
    -- Instants after the check's own database time.
    SELECT 'future_time', x.step_id, x.token,
           jsonb_build_object('what', x.what, 'step_id', x.step_id, 'claim_token', x.token,
                              'pod', x.pod, 'term', x.term, 'at', x.at,
                              'db_now', statement_timestamp())
      FROM (SELECT 'attempt' AS what, step_id, claim_token AS token, pod_id AS pod,
                   CAST(NULL AS bigint) AS term,
                   greatest(claimed_at, finished_at) AS at
              FROM att
            UNION ALL
            SELECT 'step', id, claim_token, claimed_by, NULL,
                   greatest(created_at, claimed_at, finished_at)
              FROM steps
            UNION ALL
            SELECT 'term', NULL, NULL, pod_id, term, greatest(started_at, ended_at)
              FROM leader_terms
            UNION ALL
            SELECT 'leader_action', step_id, claim_token, pod_id, term, at FROM leader_actions
            UNION ALL
            SELECT 'pod', NULL, NULL, id, NULL, greatest(started_at, heartbeat_at, died_at)
              FROM pods
            UNION ALL
            SELECT 'rejected_write', step_id, claim_token, NULL, NULL, at
              FROM rejected_writes) x
     WHERE x.at > statement_timestamp()
    UNION ALL
    -- Terms the lease or the later terms prove were granted, missing.
    SELECT 'missing_term', NULL, g.term,
           jsonb_build_object('term', g.term,
                              'lease_term', (SELECT term FROM leader_lease WHERE id = 1),
                              'recorded_terms', (SELECT count(*) FROM leader_terms))
      FROM generate_series(1, greatest((SELECT max(term) FROM leader_terms),
                                       (SELECT term FROM leader_lease WHERE id = 1))) g(term)
     WHERE NOT EXISTS (SELECT 1 FROM leader_terms t WHERE t.term = g.term)
    UNION ALL
    -- A pod marked dead is marked by a leader action of the same instant.
    SELECT 'unlogged_death', NULL, NULL,
           jsonb_build_object('pod', p.id, 'died_at', p.died_at)
      FROM pods p
     WHERE p.status = 'dead'
       AND NOT EXISTS (SELECT 1 FROM leader_actions la
                        WHERE la.action = 'mark_dead' AND la.target_pod = p.id
                          AND la.at = p.died_at)
    UNION ALL
    -- Nothing a process did lands after its recorded exit (its coordinator
    -- waited out its backends first, Store.record_exit): no claim, no
    -- accepted write of that registration later, unless the same
    -- incarnation registered again in between.
    SELECT 'activity_after_exit', a.step_id, a.claim_token,
           jsonb_build_object('step_id', a.step_id, 'claim_token', a.claim_token,
                              'pod', a.pod_id, 'incarnation', a.incarnation,
                              'what', x.what, 'at', x.at, 'exited_at', e.exited_at)
      FROM att a
      JOIN pod_exits e ON e.pod_id = a.pod_id AND e.incarnation = a.incarnation
                      AND a.claimed_at >= e.registered_at
     CROSS JOIN LATERAL (VALUES ('claim', a.claimed_at),
                                (CASE WHEN a.outcome IN ('completed', 'failed', 'released',
                                                         'cancelled')
                                      THEN a.outcome END, a.finished_at)) AS x(what, at)
     WHERE x.what IS NOT NULL AND x.at > e.exited_at
       AND NOT EXISTS (SELECT 1 FROM pod_registrations r
                        WHERE r.pod_id = a.pod_id AND r.incarnation = a.incarnation
                          AND r.registered_at > e.exited_at AND r.registered_at <= x.at)
    UNION ALL
    -- A revoked claim (lease_lost) was revoked by a leader's requeue or
    -- dead_letter naming its token, or by its pod registering again (at that
    -- instant; only the latest registration is kept, so an earlier one is
    -- given the benefit of the doubt).
    SELECT 'unlogged_revocation', a.step_id, a.claim_token,
           jsonb_build_object('step_id', a.step_id, 'claim_token', a.claim_token,
                              'pod', a.pod_id, 'incarnation', a.incarnation,
                              'revoked_at', a.finished_at, 'registered_at', p.started_at)
      FROM finished_attempts a
      LEFT JOIN pods p ON p.id = a.pod_id
     WHERE a.outcome = 'lease_lost'
       AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.claim_token = a.claim_token)
       AND p.started_at < a.finished_at
    UNION ALL
    -- A leader's revocation matches the attempt it ended: same step and pod,
    -- revoked (lease_lost) at the action's instant. An accepted write under a
    -- revoked token is stale_write instead.
    SELECT 'revocation_mismatch', step_id, claim_token,
           jsonb_build_object('step_id', step_id, 'claim_token', claim_token,
                              'action_id', id, 'action', action, 'at', at,
                              'target_pod', target_pod, 'attempt_step_id', a_step_id,
                              'attempt_pod', a_pod, 'attempt_outcome', a_outcome,
                              'attempt_finished_at', a_finished_at)
      FROM rev
     WHERE a_token IS NULL
        OR a_step_id <> step_id
        OR a_pod IS DISTINCT FROM target_pod
        OR a_outcome IS NULL
        OR (a_outcome = 'lease_lost' AND a_finished_at <> at)
    UNION ALL
    -- A step's last error proves a spent attempt: only a failure or a
    -- revocation writes steps.error.
    SELECT 'erased_failure', x.id, x.claim_token,
           jsonb_build_object('step_id', x.id, 'status', x.status, 'attempts', x.attempts,
                              'error', left(x.error, 200))
      FROM steps_x x
     WHERE (x.error IS NOT NULL OR x.status = 'failed') AND coalesce(x.spent, 0) = 0
), ranked AS (
    SELECT found.*, count(*) OVER () AS total,
           row_number() OVER (ORDER BY kind, step_id, token) AS n
      FROM found
)
SELECT total, kind, w FROM ranked WHERE n <= :limit ORDER BY n
"""  # noqa: S608

# -- counts and figures -----------------------------------------------------

COUNTS = """
SELECT (SELECT count(*) FROM steps) AS steps,
       (SELECT count(*) FROM step_attempts) AS attempts,
       (SELECT count(*) FROM step_attempts WHERE rejected_at IS NOT NULL) AS rejected_writes,
       (SELECT count(*) FROM pods) AS pods,
       (SELECT count(*) FROM queues) AS queues,
       (SELECT count(*) FROM leader_terms) AS terms,
       (SELECT count(*) FROM leader_actions) AS leader_actions,
       -- Step ids the sequence handed out that no step has: a hint, not proof
       -- (a rolled-back or deduplicated submit draws an id too, and a submit
       -- running now may have drawn one this snapshot cannot see).
       (SELECT greatest(coalesce(max(id), 0),
                        (SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                           FROM steps_id_seq)) - count(*) FROM steps) AS step_id_gaps
"""

STATUS_COUNTS = "SELECT status, count(*) FROM steps GROUP BY status"

# What `fleetsim prune` deleted, over every prune (fleetsim.store.prune).
PRUNED_TOTALS = """
SELECT count(*) AS prunes, count(DISTINCT prune_id) AS runs,
       sum(completed) AS completed, sum(dead) AS dead, sum(cancelled) AS cancelled,
       sum(attempts) AS attempts, sum(rejected_writes) AS rejected_writes,
       sum(leader_actions) AS leader_actions, max(cutoff) AS watermark
  FROM step_prunes
"""

# history_integrity (pruned_but_present): a step recorded as pruned still
# exists, so the prune's counts account for a step twice (or a step id was
# used again). Attempts left behind by a prune are orphan_attempt.
PRUNED_BUT_PRESENT = """
WITH u AS MATERIALIZED (
    -- Every pruned id as one multirange: a containment test per step is a
    -- binary search in it (one pass over the steps, whatever the prunes).
    SELECT range_agg(r) AS m FROM step_prunes p, unnest(p.step_ids) AS r
), found AS MATERIALIZED (
    SELECT st.id AS step_id, st.status FROM steps st, u WHERE st.id <@ u.m
), ranked AS (
    SELECT found.*, count(*) OVER () AS total, row_number() OVER (ORDER BY step_id) AS n
      FROM found
)
SELECT r.*, p.prune_id, p.at AS pruned_at
  FROM ranked r
  LEFT JOIN LATERAL (SELECT prune_id, at FROM step_prunes
                      WHERE r.step_id <@ step_ids ORDER BY id LIMIT 1) p ON true
 WHERE r.n <= :limit
 ORDER BY r.n
"""

# failover: for each change of leader (term k to term k+1), how long the fleet
# was without a working leader, in database time: from the old leader's last
# recorded sign of life up to the start of term k+1 (its acquisition, the new
# term's first act). A sign of life is anything the old leader's pod wrote
# itself: its term's start, a leader action, a claim, an accepted write
# (complete, fail, release, cancel ack), its last heartbeat and its own stop,
# counted only if before term k+1 started. The store does not record lease
# renewals (leader_terms.expires_at is overwritten), so the last renewal is
# bounded by these signs: see docs/reference/checker.md.
# lease_expiry_to_new_leader is the other part: term k's recorded end
# (ended_at, else expires_at) to term k+1's start, the candidates' reaction
# once the lease ran out (what "failover" measured before).
FAILOVER = """
WITH t AS (
    SELECT term, pod_id, started_at, coalesce(ended_at, expires_at) AS end_at,
           lead(term) OVER (ORDER BY term) AS next_term,
           lead(pod_id) OVER (ORDER BY term) AS next_pod,
           lead(started_at) OVER (ORDER BY term) AS next_started_at,
           row_number() OVER (ORDER BY started_at, term) AS bucket
      FROM leader_terms
), leaders AS (
    SELECT DISTINCT pod_id FROM leader_terms
), signs AS (
    -- One pass over the attempts: the claim, and the pod's own write.
    SELECT a.pod_id AS pod, e.at
      FROM finished_attempts a
     CROSS JOIN LATERAL (VALUES (a.claimed_at),
                                (CASE WHEN a.outcome <> 'lease_lost' THEN a.finished_at END))
           AS e(at)
    UNION ALL
    SELECT s.claimed_by, s.claimed_at
      FROM steps s WHERE s.status = 'claimed' AND s.claimed_by IN (SELECT pod_id FROM leaders)
    UNION ALL
    SELECT p.id, p.heartbeat_at FROM pods p WHERE p.id IN (SELECT pod_id FROM leaders)
    UNION ALL
    SELECT p.id, p.died_at FROM pods p
     WHERE p.status = 'stopped' AND p.id IN (SELECT pod_id FROM leaders)
    UNION ALL
    SELECT la.pod_id, la.at FROM leader_actions la
), last_signs AS (
    -- Each sign falls between two term starts (a binary search in the
    -- sorted starts, no sort of the signs): the latest sign of each pod in
    -- each interval. The interval of term k runs from its start to the next.
    SELECT pod, width_bucket(at, ARRAY(SELECT started_at FROM leader_terms
                                        ORDER BY started_at, term)) AS bucket,
           max(at) AS at
      FROM signs
     WHERE at IS NOT NULL
     GROUP BY 1, 2
), changes AS (
    SELECT t.term, t.pod_id, t.next_term, t.next_pod, t.next_started_at, t.end_at,
           greatest(t.started_at, l.at) AS last_alive
      FROM t LEFT JOIN last_signs l ON l.pod = t.pod_id AND l.bucket = t.bucket
     WHERE t.next_started_at IS NOT NULL
), gaps AS (
    SELECT changes.*,
           CAST(extract(epoch FROM next_started_at - last_alive) AS float8) AS s,
           CAST(extract(epoch FROM next_started_at - end_at) AS float8) AS tail_s
      FROM changes
), worst AS (
    SELECT * FROM gaps ORDER BY s DESC, term LIMIT 1
)
SELECT (SELECT count(s) FROM gaps) AS n,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s) FROM gaps) AS median,
       (SELECT max(s) FROM gaps) AS max,
       (SELECT count(tail_s) FROM gaps) AS tail_n,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY tail_s) FROM gaps) AS tail_median,
       (SELECT max(tail_s) FROM gaps) AS tail_max,
       w.term, w.pod_id, w.next_term, w.next_pod, w.last_alive, w.next_started_at
  FROM (SELECT 1) one LEFT JOIN worst w ON true
"""

# A dead pod's lost claims (outcome lease_lost) to their next claim. The death
# is the exit recorded for the pod during that attempt (pod_exits: its
# coordinator saw the process end), else the latest mark_dead action naming
# the pod during that attempt, else its
# pods.died_at if during the attempt, else the requeue itself (a restarting
# pod gives its claims back as it registers).
ORPHAN_RECOVERY = """
WITH ev AS (
    SELECT target_pod AS pod, at AS t, 0 AS k, at AS death,
           CAST(NULL AS bigint) AS token, CAST(NULL AS bigint) AS step_id,
           CAST(NULL AS timestamptz) AS claimed_at, CAST(NULL AS timestamptz) AS next_claimed_at
      FROM leader_actions WHERE action = 'mark_dead' AND target_pod IS NOT NULL
    UNION ALL
    SELECT pod_id, finished_at, 1, NULL, claim_token, step_id, claimed_at, next_claimed_at
      FROM (SELECT a.*,
                   -- The step's next claim: one sorted pass, not a lookup per
                   -- lost claim (the history has no index by step).
                   min(a.claimed_at) OVER (
                       PARTITION BY a.step_id ORDER BY a.claim_token DESC
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS next_claimed_at
              FROM step_attempts a) a
     WHERE outcome = 'lease_lost' AND finished_at IS NOT NULL
), carried AS (
    SELECT ev.*, max(death) OVER (PARTITION BY pod ORDER BY t, k ROWS UNBOUNDED PRECEDING)
               AS last_death
      FROM ev
), lost AS (
    SELECT c.token, c.step_id, c.next_claimed_at,
           -- A certain death (pod_exits) is known before the leader marks it.
           coalesce((SELECT min(e.exited_at) FROM pod_exits e
                      WHERE e.pod_id = c.pod AND e.exited_at BETWEEN c.claimed_at AND c.t),
                    CASE WHEN c.last_death >= c.claimed_at THEN c.last_death END,
                    CASE WHEN p.died_at BETWEEN c.claimed_at AND c.t THEN p.died_at END,
                    c.t) AS died_at
      FROM carried c
      LEFT JOIN pods p ON p.id = c.pod
     WHERE c.k = 1
), recovered AS (
    SELECT CAST(extract(epoch FROM lost.next_claimed_at - lost.died_at) AS float8) AS s
      FROM lost
)
SELECT count(s), count(*) - count(s),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY s), max(s)
  FROM recovered
"""

LATENCY = """
SELECT count(*),
       percentile_cont(ARRAY[0.5, 0.9, 0.95, 0.99]) WITHIN GROUP (ORDER BY s),
       max(s)
  FROM (SELECT CAST(extract(epoch FROM finished_at - claimed_at) AS float8) AS s
          FROM step_attempts WHERE outcome = 'completed') c
"""

# -- history export ---------------------------------------------------------

# One row per operation record, in DB-time order. An attempt yields its
# claim (invoke + ok), its end, and a refused late write if any. Leader
# records carry the pod's incarnation when its pods row is that incarnation.
HISTORY = """
SELECT e.at, e.phase, e.ord, e.type, e.f, a.pod_id AS pod,
       CAST(a.incarnation AS text) AS incarnation, a.step_id, s.queue,
       a.claim_token AS token, CAST(NULL AS bigint) AS term, e.outcome,
       CAST(NULL AS text) AS action, CAST(NULL AS text) AS target_pod,
       CAST(NULL AS timestamptz) AS expires_at, CAST(NULL AS timestamptz) AS ended_at
  FROM step_attempts a
  JOIN steps s ON s.id = a.step_id
 CROSS JOIN LATERAL (VALUES
     (a.claimed_at, 1, 0, 'invoke', 'claim', CAST(NULL AS text)),
     (a.claimed_at, 1, 1, 'ok', 'claim', NULL),
     (a.finished_at, 0, 2,
      CASE a.outcome WHEN 'lease_lost' THEN 'info' ELSE 'ok' END,
      CASE a.outcome WHEN 'failed' THEN 'fail' WHEN 'released' THEN 'release'
                     WHEN 'cancelled' THEN 'cancel' ELSE 'complete' END,
      a.outcome),
     (a.rejected_at, 0, 3, 'fail', 'complete', 'superseded')
 ) AS e(at, phase, ord, type, f, outcome)
 WHERE e.at IS NOT NULL
UNION ALL
SELECT t.started_at, 0, 4, 'ok', 'elect', t.pod_id,
       CASE WHEN p.started_at <= t.started_at THEN CAST(p.incarnation AS text) END,
       NULL, NULL, NULL, t.term, NULL, NULL, NULL, t.expires_at, t.ended_at
  FROM leader_terms t
  LEFT JOIN pods p ON p.id = t.pod_id
UNION ALL
SELECT la.at, 0, 5, 'ok', 'recover', la.pod_id,
       CASE WHEN p.started_at <= la.at THEN CAST(p.incarnation AS text) END,
       la.step_id, NULL, la.claim_token, la.term, NULL, la.action, la.target_pod,
       NULL, NULL
  FROM leader_actions la
  LEFT JOIN pods p ON p.id = la.pod_id
 -- At one instant, ends (phase 0) come before claims: a claim that saw a step
 -- free started after the end that freed it. A claim's invoke precedes its ok.
 ORDER BY at, phase, token, ord, term
"""


# -- running them -----------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One violation row: which invariant, which rule of it, and its witness."""

    invariant: str
    kind: str
    witness: dict[str, Any]


@dataclass(frozen=True)
class HistoryFacts:
    """What the checker queries found, ready to be judged and reported."""

    findings: tuple[Finding, ...]
    totals: dict[str, int]  # violations per invariant, all of them (witnesses are capped)
    counts: dict[str, Any]
    figures: dict[str, dict[str, Any]]


def plain(value: Any) -> Any:
    """A JSON-ready form of a database value (times as ISO strings in UTC)."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


@contextmanager
def _snapshot(store: Store) -> Iterator[Connection]:
    """One read-only transaction that sees the whole history at one instant."""
    with store._errors(), store._auto.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            # A million-step history needs more than an operation's timeout,
            # and sorts run faster in memory; both bounded, neither grows with it.
            conn.execute(sa.text("SET LOCAL statement_timeout = '10min'"))
            conn.execute(sa.text("SET LOCAL work_mem = '64MB'"))
            # The integrity query's many branches cost seconds of JIT
            # compilation (4.3 s of a 5.7 s run at 100,000 steps) for no gain.
            conn.execute(sa.text("SET LOCAL jit = off"))
            yield conn


def check_history(store: Store, *, final: bool, limit: int) -> HistoryFacts:
    """Run every invariant and figure query on one snapshot of ``store``'s history.

    ``limit`` caps the witnesses per invariant (totals are exact). With
    ``final``, steps not yet finished are lost_step findings.
    Raises SchemaMismatch (via the store) if the database holds no fleetsim store.
    """
    store.check_schema()
    findings: list[Finding] = []
    totals = dict.fromkeys(INVARIANTS, 0)
    with _snapshot(store) as conn:

        def rows(sql: str, **params: Any) -> list[dict[str, Any]]:
            return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]

        per_step = rows(PER_STEP, final=final, limit=limit)
        ids = sorted({r["step_id"] for r in per_step})
        attempts: dict[int, list[dict[str, Any]]] = {}
        if ids:
            for a in rows(ATTEMPTS_OF_STEPS, ids=ids):
                attempts.setdefault(a["step_id"], []).append(a)
        for r in per_step:
            totals[r["invariant"]] = int(r["total"])
            findings.append(_per_step_finding(r, attempts.get(r["step_id"], [])))

        for r in rows(STALE_WRITES, limit=limit):
            totals["stale_write"] = int(r["total"])
            findings.append(_stale_finding(r))

        split = rows(OVERLAPPING_TERMS, limit=limit)
        outside = rows(ACTIONS_OUTSIDE_TERMS, limit=limit)
        totals["split_brain"] = sum(int(r["total"]) for r in (split[:1] + outside[:1]))
        for r in split:
            findings.append(_overlap_finding(r))
        for r in outside[: max(0, limit - len(split))]:
            findings.append(_action_finding(r))

        for r in rows(FIFO_ORDER, limit=limit):
            totals["fifo_order"] = int(r["total"])
            findings.append(_fifo_finding(r))

        for r in rows(CONCURRENCY, limit=limit):
            totals["concurrency_limit"] = int(r["total"])
            findings.append(_concurrency_finding(r))

        for r in rows(EXCLUSIVE_CLAIMS, limit=limit):
            totals["exclusive_claims"] = int(r["total"])
            findings.append(_overlap_attempt_finding(r))

        exits = bool(conn.execute(sa.text("SELECT to_regclass('pod_exits')")).scalar())
        for r in rows(INTEGRITY if exits else without_exits(INTEGRITY), limit=limit):
            totals["history_integrity"] = int(r["total"])
            findings.append(_integrity_finding(r))

        pruned: dict[str, Any] | None = None
        if conn.execute(sa.text("SELECT to_regclass('step_prunes')")).scalar():
            pruned = rows(PRUNED_TOTALS)[0]
            present = rows(PRUNED_BUT_PRESENT, limit=limit)
            if present:
                totals["history_integrity"] += int(present[0]["total"])
            for r in present:
                findings.append(Finding("history_integrity", "pruned_but_present", {
                    "kind": "pruned_but_present", "step_id": r["step_id"],
                    "status": r["status"], "prune_id": str(r["prune_id"]),
                    "pruned_at": plain(r["pruned_at"])}))

        counts: dict[str, Any] = rows(COUNTS)[0]
        by_status = {name: int(n) for name, n in conn.execute(sa.text(STATUS_COUNTS))}
        figures = _figures(conn)

    counts = {k: int(v) for k, v in counts.items()}
    counts["by_status"] = by_status
    counts["in_flight"] = sum(by_status.get(s, 0) for s in ("queued", "claimed", "failed"))
    counts["pruned"] = _pruned_counts(pruned)
    # Pruned ids are ids the sequence handed out that no step has, on purpose.
    counts["step_id_gaps"] -= counts["pruned"]["steps"]
    counts["violations"] = totals
    order = {name: i for i, name in enumerate(INVARIANTS)}
    findings.sort(key=lambda f: order[f.invariant])
    return HistoryFacts(tuple(findings), totals, counts, figures)


def _pruned_counts(row: dict[str, Any] | None) -> dict[str, Any]:
    """The totals of every prune (``fleetsim prune``), zeros if there was none."""
    keys = ("completed", "dead", "cancelled", "attempts", "rejected_writes", "leader_actions")
    if row is None:
        row = {}
    out: dict[str, Any] = {k: int(row.get(k) or 0) for k in keys}
    out["steps"] = out["completed"] + out["dead"] + out["cancelled"]
    out["batches"] = int(row.get("prunes") or 0)
    out["prunes"] = int(row.get("runs") or 0)
    out["watermark"] = plain(row.get("watermark"))
    return out


def _figure(count: Any, median: Any, maximum: Any) -> dict[str, Any]:
    return {
        "count": int(count or 0),
        "median_s": _round(median),
        "max_s": _round(maximum),
    }


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 6)


def without_exits(sql: str) -> str:
    """``sql`` for a store not initialised since pod_exits came: it has no exits."""
    return sql.replace("pod_exits e", "(SELECT CAST(NULL AS text) AS pod_id,"
                       " CAST(NULL AS integer) AS incarnation,"
                       " CAST(NULL AS timestamptz) AS registered_at,"
                       " CAST(NULL AS timestamptz) AS exited_at WHERE false) e")


def _figures(conn: Connection) -> dict[str, dict[str, Any]]:
    failover = conn.execute(sa.text(FAILOVER)).one()
    orphan_sql = ORPHAN_RECOVERY
    if not conn.execute(sa.text("SELECT to_regclass('pod_exits')")).scalar():
        orphan_sql = without_exits(orphan_sql)
    orphan = conn.execute(sa.text(orphan_sql)).one()
    latency = conn.execute(sa.text(LATENCY)).one()
    p50, p90, p95, p99 = latency[1] if latency[1] is not None else (None, None, None, None)
    return {
        "failover": {
            **_figure(failover.n, failover.median, failover.max),
            "worst": None
            if failover.term is None
            else {
                "term": failover.term,
                "pod": failover.pod_id,
                "last_sign_of_life": plain(failover.last_alive),
                "next_term": failover.next_term,
                "next_pod": failover.next_pod,
                "next_started_at": plain(failover.next_started_at),
            },
        },
        "lease_expiry_to_new_leader": _figure(
            failover.tail_n, failover.tail_median, failover.tail_max
        ),
        "orphan_recovery": {
            **_figure(orphan[0], orphan[2], orphan[3]),
            "not_reclaimed": int(orphan[1] or 0),
        },
        "claim_to_completion": {
            **_figure(latency[0], p50, latency[2]),
            "p50_s": _round(p50),
            "p90_s": _round(p90),
            "p95_s": _round(p95),
            "p99_s": _round(p99),
        },
    }


# -- witnesses --------------------------------------------------------------


def _attempt(a: dict[str, Any]) -> dict[str, Any]:
    out = {
        "claim_token": a["claim_token"],
        "pod": a["pod_id"],
        "incarnation": a["incarnation"],
        "claimed_at": plain(a["claimed_at"]),
        "finished_at": plain(a["finished_at"]),
        "outcome": a["outcome"],
    }
    if a["rejected_at"] is not None:
        out["rejected_at"] = plain(a["rejected_at"])
    return out


def _per_step_finding(r: dict[str, Any], attempts: list[dict[str, Any]]) -> Finding:
    witness: dict[str, Any] = {
        "step_id": r["step_id"],
        "queue": r["queue"],
        "status": r["status"],
    }
    completions = [_attempt(a) for a in attempts if a["outcome"] == "completed"]
    kind = r["kind"]
    if kind == "completion_lost" or kind == "several":
        witness["completions"] = completions
    elif kind == "none":
        witness["claim_token"] = r["step_claim_token"]
        witness["attempts"] = [_attempt(a) for a in attempts]
    elif kind == "not_finished":
        witness["claim_token"] = r["step_claim_token"]
        witness["attempts"] = r["attempts"]
    else:  # dlq
        witness.update(
            attempts=r["attempts"],
            max_attempts=r["max_attempts"],
            spent_attempts=r["spent"],
            tokens=[a["claim_token"] for a in attempts],
        )
    return Finding(r["invariant"], kind, witness)


def _stale_finding(r: dict[str, Any]) -> Finding:
    witness: dict[str, Any] = {
        "step_id": r["step_id"],
        "claim_token": r["claim_token"],
        "pod": r["pod_id"],
        "incarnation": r["incarnation"],
        "outcome": r["outcome"],
        "written_at": plain(r["finished_at"]),
        "step_claim_token": r["step_claim_token"],
    }
    if r["newer_claim_token"] is not None:
        witness.update(
            newer_claim_token=r["newer_claim_token"],
            newer_pod=r["newer_pod"],
            newer_claimed_at=plain(r["newer_claimed_at"]),
        )
    if r["revoked_at"] is not None:
        witness.update(revoked_at=plain(r["revoked_at"]), revoked_in_term=r["revoked_term"])
    if r["superseded"] and r["newer_claim_token"] is not None:
        kind = "superseded"
    elif r["revoked_at"] is not None:
        kind = "revoked"
    else:
        kind = "not_latest"
    return Finding("stale_write", kind, witness)


def _overlap_finding(r: dict[str, Any]) -> Finding:
    witness = {
        "term": r["term"],
        "pod": r["pod_id"],
        "started_at": plain(r["started_at"]),
        "ended_at": plain(r["end_at"]),
        "other_term": r["other_term"],
        "other_pod": r["other_pod"],
        "other_started_at": plain(r["other_started_at"]),
        "other_ended_at": plain(r["other_end_at"]),
    }
    return Finding("split_brain", "overlap", witness)


def _action_finding(r: dict[str, Any]) -> Finding:
    witness = {
        "action_id": r["action_id"],
        "action": r["action"],
        "term": r["term"],
        "pod": r["pod_id"],
        "at": plain(r["at"]),
        "target_pod": r["target_pod"],
        "step_id": r["step_id"],
        "claim_token": r["claim_token"],
        "term_pod": r["term_pod"],
        "term_started_at": plain(r["term_started_at"]),
        "term_ended_at": plain(r["term_end_at"]),
    }
    if r["term_pod"] is None:
        kind = "unknown_term"
    elif r["term_pod"] != r["pod_id"]:
        kind = "not_holder"
    else:
        kind = "outside_term"
    return Finding("split_brain", kind, {k: v for k, v in witness.items() if v is not None})


def _fifo_finding(r: dict[str, Any]) -> Finding:
    witness = {
        "queue": r["queue"],
        "step_id": r["step_id"],
        "claim_token": r["first_token"],
        "claimed_at": plain(r["first_claimed_at"]),
        "earlier_step_id": r["earlier_step_id"],
        "earlier_status": r["earlier_status"],
        "earlier_claim_token": r["earlier_first_token"],
        "earlier_claimed_at": plain(r["earlier_first_claimed_at"]),
    }
    return Finding("fifo_order", "overtaken", witness)


def _concurrency_finding(r: dict[str, Any]) -> Finding:
    witness = {
        "queue": r["queue"],
        "limit": r["lim"],
        "running": int(r["running"]),
        "at": plain(r["at"]),
        "step_id": r["step_id"],
        "claim_token": r["claim_token"],
        "pod": r["pod_id"],
        "open_step_ids": list(r["step_ids"] or []),
        "open_tokens": list(r["tokens"] or []),
        "open_pods": list(r["pods"] or []),
    }
    return Finding("concurrency_limit", "exceeded", witness)


def _overlap_attempt_finding(r: dict[str, Any]) -> Finding:
    witness = {
        "step_id": r["step_id"],
        "claim_token": r["claim_token"],
        "pod": r["pod_id"],
        "incarnation": r["incarnation"],
        "outcome": r["outcome"],
        "claimed_at": plain(r["claimed_at"]),
        "finished_at": plain(r["finished_at"]),
        "next_claim_token": r["next_claim_token"],
        "next_pod": r["next_pod"],
        "next_claimed_at": plain(r["next_claimed_at"]),
    }
    return Finding("exclusive_claims", "overlap", witness)


def _integrity_finding(r: dict[str, Any]) -> Finding:
    witness = {k: v for k, v in dict(r["w"]).items() if v is not None}
    return Finding("history_integrity", r["kind"], {"kind": r["kind"], **witness})


# -- history export ---------------------------------------------------------


def iter_history(store: Store, *, batch_size: int = 2000) -> Iterator[dict[str, Any]]:
    """Yield the history's operation records in DB-time order, streamed.

    Each record is ``{"type", "f", "process", "value", "time"}`` (no index);
    rows come through a server-side cursor ``batch_size`` at a time, on one
    snapshot, so memory stays flat however long the history is.
    """
    store.check_schema()
    with _snapshot(store) as conn:
        result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(
            sa.text(HISTORY)
        )
        for row in result:
            yield _record(row._mapping)


def _record(r: Any) -> dict[str, Any]:
    process = r["pod"] if r["incarnation"] is None else f"{r['pod']}#{r['incarnation']}"
    f = r["f"]
    if f == "elect":
        value: dict[str, Any] = {
            "term": r["term"],
            "expires_at": plain(r["expires_at"]),
            "ended_at": plain(r["ended_at"]),
        }
    elif f == "recover":
        value = {
            "term": r["term"],
            "action": r["action"],
            "target_pod": r["target_pod"],
            "step": r["step_id"],
            "token": r["token"],
        }
    else:
        value = {"step": r["step_id"], "queue": r["queue"], "token": r["token"]}
        if r["outcome"] is not None:
            value["outcome"] = r["outcome"]
    return {
        "type": r["type"],
        "f": f,
        "process": process,
        "value": {k: v for k, v in value.items() if v is not None},
        "time": plain(r["at"]),
    }
