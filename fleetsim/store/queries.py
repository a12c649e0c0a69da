"""Named SQL: every statement the store runs, in one place.

All statements are parametrised (``:name`` binds); none is built by string
formatting of values. Times are always the database's: ``statement_timestamp()``
is used rather than ``now()`` so that, inside a transaction that waited for a
lock, a timestamp reflects when the statement really ran.
"""

from __future__ import annotations

# "status = 'claimed'" for the fenced writes, which find their steps by id.
# Written as a subquery so that the planner can never prove the predicate of
# a partial index of claimed steps: schema version 2 had one (by claimed_by),
# and with a plain literal a generic plan made while few steps were claimed
# read every claimed step on each write instead of looking the ids up by
# primary key. Version 3 has no such index; this keeps the plan pinned if
# one returns.
_IS_CLAIMED = "s.status = (SELECT CAST('claimed' AS text))"

# Backoff delay in seconds for a step that has already spent ``s.attempts``.
_BACKOFF = (
    "make_interval(secs => LEAST(CAST(:retry_cap AS float8),"
    " CAST(:retry_base AS float8) * power(2, s.attempts))"
    " * (1 - CAST(:retry_jitter AS float8) * random()))"
)

SUBMIT_MANY = """
WITH input AS (
    SELECT t.ord, t.queue, t.priority, t.payload, t.max_attempts, t.idempotency_key,
           t.timeout_s
      FROM ROWS FROM (jsonb_to_recordset(CAST(:items AS jsonb))
                      AS (queue text, priority int, payload jsonb, max_attempts int,
                          idempotency_key text, timeout_s float8))
           WITH ORDINALITY AS t(queue, priority, payload, max_attempts, idempotency_key,
                                timeout_s, ord)
), new_queues AS (
    INSERT INTO queues (name)
    SELECT DISTINCT queue FROM input
    ON CONFLICT (name) DO NOTHING
), inserted AS (
    INSERT INTO steps (queue, priority, payload, max_attempts, idempotency_key, timeout_s)
    SELECT queue, priority, payload, max_attempts, idempotency_key, timeout_s
      FROM input
     -- Queues with a max length take the locked path (see Store.submit_many).
     WHERE NOT EXISTS (SELECT 1 FROM queues q
                        WHERE q.name IN (SELECT queue FROM input)
                          AND q.max_length IS NOT NULL)
     ORDER BY ord
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, idempotency_key
)
SELECT id, idempotency_key FROM inserted ORDER BY id
"""

INSERT_STEPS = """
INSERT INTO steps (queue, priority, payload, max_attempts, idempotency_key, timeout_s)
SELECT t.queue, t.priority, t.payload, t.max_attempts, t.idempotency_key, t.timeout_s
      FROM ROWS FROM (jsonb_to_recordset(CAST(:items AS jsonb))
                      AS (queue text, priority int, payload jsonb, max_attempts int,
                          idempotency_key text, timeout_s float8))
           WITH ORDINALITY AS t(queue, priority, payload, max_attempts, idempotency_key,
                                timeout_s, ord)
 ORDER BY t.ord
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id, idempotency_key
"""

# Bulk submit by COPY (Store.submit_many, for large batches without
# idempotency keys): the queues exist, none has a max length, the ids are
# drawn in submission order, then the rows are copied.
ENSURE_QUEUES = """
INSERT INTO queues (name) SELECT unnest(CAST(:names AS text[])) ON CONFLICT (name) DO NOTHING
"""

ANY_MAX_LENGTH = """
SELECT 1 FROM queues WHERE name = ANY(CAST(:names AS text[])) AND max_length IS NOT NULL
"""

NEXT_STEP_IDS = "SELECT nextval('steps_id_seq') FROM generate_series(1, %(n)s)"

COPY_STEPS = "COPY steps (id, queue, priority, payload, max_attempts) FROM STDIN"

# Submitters to a queue with a max length take turns. FOR NO KEY UPDATE:
# it does not wait for the fast-path claims (FOR KEY SHARE on the same row).
LOCK_LIMITED_QUEUES = """
SELECT name, max_length FROM queues
 WHERE name = ANY(CAST(:names AS text[])) AND max_length IS NOT NULL
 ORDER BY name
   FOR NO KEY UPDATE
"""

QUEUE_DEPTH = """
SELECT count(*) FROM steps WHERE queue = :queue AND status IN ('queued', 'failed')
"""

STEPS_BY_KEY = """
SELECT id, idempotency_key FROM steps WHERE idempotency_key = ANY(CAST(:keys AS text[]))
"""

# The fast path: queues with no concurrency limit, not strict FIFO, not
# paused. One statement claims and issues tokens.
# After picking rows, every claim does the same: a fresh token per step, and
# the claim's fields on the step. Those fields are the open attempt (the
# step_attempts view shows it); its finished_attempts row is written by the
# statement that ends it.
_CLAIM_PICKED = """
, claimed AS (
    UPDATE steps s
       SET status = 'claimed', claimed_by = :pod, claim_token = picked.token,
           claimed_at = statement_timestamp(), claim_incarnation = :incarnation,
           cancel_requested = false, limited_claim = {limited}
      FROM picked
     -- The array lets a generic (cached) plan find the rows by primary key
     -- whatever the batch size.
     WHERE s.id = ANY(ARRAY(SELECT id FROM picked)) AND s.id = picked.id
    RETURNING s.id, s.queue, s.priority, s.payload, s.attempts, s.max_attempts,
              s.claim_token,
              -- The effective execution timeout: the step's, else its queue's
              -- (by primary key, for a step without its own, and only if some
              -- queue has a timeout: that check is one InitPlan per claim).
              CASE WHEN s.timeout_s IS NOT NULL THEN s.timeout_s
                   WHEN EXISTS (SELECT 1 FROM queues WHERE timeout_s IS NOT NULL)
                   THEN (SELECT qt.timeout_s FROM queues qt WHERE qt.name = s.queue)
              END AS timeout_s,
              -- How long the step waited since its submission, in database
              -- time (pods add their own run and write time: end-to-end latency).
              CAST(EXTRACT(EPOCH FROM statement_timestamp() - s.created_at) AS float8)
                AS waited_s
)
-- The payload as text: the client decodes a batch's payloads in one call.
SELECT id, queue, priority, CAST(payload AS text), attempts, max_attempts, claim_token,
       timeout_s, waited_s
  FROM claimed
"""

CLAIM = (
    """
WITH picked AS (
    -- Tokens are drawn here, in claim order (priority, id), whatever order
    -- the update visits the rows in.
    SELECT s.id, nextval('claim_token_seq') AS token
      FROM steps s
     WHERE s.waiting
       -- The claimable queues as a constant array (an InitPlan): a join here
       -- leads the planner to read and sort every waiting row on each claim.
       -- FOR KEY SHARE: a change of a queue's settings (configure_queue locks
       -- its row FOR UPDATE) waits for this claim, and a claim waiting for
       -- that change re-reads the row after it.
       AND s.queue = ANY(ARRAY(SELECT q.name FROM queues q
                                WHERE q.name = ANY(CAST(:queues AS text[]))
                                  AND NOT q.paused AND NOT q.strict_fifo
                                  AND q.concurrency_limit IS NULL
                                  FOR KEY SHARE))
       AND s.available_at <= statement_timestamp()
       AND EXISTS (SELECT 1 FROM pods p WHERE p.id = :pod AND p.status = 'alive'
                                          AND p.incarnation = :incarnation
                      -- Recovery marks the pod dead only when no claim holds
                      -- this lock, so its later sweep sees every claim.
                         FOR SHARE)
     ORDER BY s.priority, s.id
     LIMIT :batch
       FOR UPDATE OF s SKIP LOCKED
)"""
    + _CLAIM_PICKED.format(limited="false")
    + " ORDER BY priority, id"
)

# The locked path for one queue with a concurrency limit or strict FIFO:
# the queue row lock serialises its claimers, and each statement after it
# runs on a fresh snapshot (READ COMMITTED), so the count of claimed steps is
# current and the oldest step is really the next one.
LOCK_QUEUE = """
SELECT concurrency_limit, strict_fifo, paused FROM queues WHERE name = :queue FOR UPDATE
"""

# By the index steps_limited_claims: the claims this path made that are open.
COUNT_CLAIMED = """
SELECT count(*) FROM steps WHERE queue = :queue AND limited_claim AND status = 'claimed'
"""

_CLAIM_ONE_QUEUE = (
    """
WITH picked AS (
    SELECT s.id, nextval('claim_token_seq') AS token
      FROM steps s
     WHERE s.waiting
       AND s.queue = :queue
       AND s.available_at <= statement_timestamp()
       AND EXISTS (SELECT 1 FROM pods p WHERE p.id = :pod AND p.status = 'alive'
                                          AND p.incarnation = :incarnation
                      -- Recovery marks the pod dead only when no claim holds
                      -- this lock, so its later sweep sees every claim.
                         FOR SHARE)
     ORDER BY {order}
     LIMIT :batch
       FOR UPDATE OF s {skip}
)"""
    + _CLAIM_PICKED.format(limited="true")
    + " ORDER BY claim_token"
)
# Strict FIFO ignores priority and waits for a locked row rather than skip it,
# so no claim can overtake an older step.
CLAIM_LIMITED = _CLAIM_ONE_QUEUE.format(order="s.priority, s.id", skip="SKIP LOCKED")
CLAIM_FIFO = _CLAIM_ONE_QUEUE.format(order="s.id", skip="")

# Every input a fenced write did not accept is appended to rejected_writes,
# so the history shows each refused late write: the step_attempts view
# shows it on its attempt if that claim was superseded (lease_lost). A
# repeat of a write that was accepted (a retry after a lost reply) is not a
# stale write: its attempt has another outcome, so it shows nowhere.
# Appending rather than stamping the attempt's row needs no index on the
# history, which every completion writes to.
_REJECT = """
rejected AS (
    INSERT INTO rejected_writes (claim_token, step_id, at)
    SELECT i.token, i.id, statement_timestamp() FROM input i
     WHERE NOT EXISTS (SELECT 1 FROM {done} d WHERE d.id = i.id)
)
"""

# The finished_attempts row of each claim a statement ended: CTE {ended}
# returns the claim's fields (id, claim_token, pod, claim_incarnation,
# claimed_at).
_FINISH = """recorded AS (
    INSERT INTO finished_attempts (claim_token, step_id, pod_id, incarnation, claimed_at,
                                   finished_at, outcome)
    SELECT claim_token, id, pod, coalesce(claim_incarnation, 0), claimed_at,
           statement_timestamp(), {outcome}
      FROM {ended}
)"""

# The steps a fenced write names, locked, with their claim as it is now:
# FAIL and RELEASE clear claimed_by, so RETURNING cannot give it back.
_HELD = """held AS (
    SELECT s.id, s.claimed_by, s.claim_incarnation, s.claimed_at FROM steps s
     WHERE s.id = ANY(ARRAY(SELECT id FROM input))
       AND """ + _IS_CLAIMED + """
     ORDER BY s.id
       FOR UPDATE
)"""

COMPLETE = (
    """
WITH input AS (
    SELECT * FROM jsonb_to_recordset(CAST(:items AS jsonb))
             AS t(id bigint, token bigint, result jsonb)
), done AS (
    UPDATE steps s
       SET status = 'completed', finished_at = statement_timestamp(),
           result = input.result, cancel_requested = false, limited_claim = false
      FROM input
     WHERE s.id = ANY(ARRAY(SELECT id FROM input))
       AND s.id = input.id AND s.claim_token = input.token AND """ + _IS_CLAIMED + """
    -- A completion keeps the claim's fields: they are the attempt's. The
    -- history records the token the writer sent (equal to the row's while
    -- the fence holds; a broken fence shows as a token ended twice).
    RETURNING s.id, input.token AS claim_token, s.claimed_by AS pod, s.claim_incarnation,
              s.claimed_at
), """ + _FINISH.format(ended="done", outcome="'completed'") + """, repeated AS (
    -- A retry of an accepted completion (its reply was lost) is accepted again,
    -- changing nothing. Looked up by primary key, one input row at a time,
    -- and only when some input was not accepted: the count comparison is a
    -- one-time filter, evaluated before any row.
    SELECT input.id FROM input
     WHERE (SELECT count(*) FROM done) < (SELECT count(*) FROM input)
       AND input.id NOT IN (SELECT id FROM done)
       -- A locking read: it sees the row as last committed, not as of this
       -- statement's snapshot, so a first attempt that committed while this
       -- retry waited for the row is seen (and the retry accepted).
       AND EXISTS (SELECT 1 FROM steps s
                    WHERE s.id = input.id AND s.status = 'completed'
                      AND s.claim_token = input.token
                      FOR SHARE)
),"""
    + _REJECT.format(done="done")
    + "SELECT id FROM done UNION ALL SELECT id FROM repeated"
)

FAIL = (
    """
WITH input AS (
    SELECT * FROM jsonb_to_recordset(CAST(:items AS jsonb))
             AS t(id bigint, token bigint, error text)
), """ + _HELD + """, failed AS (
    UPDATE steps s
       SET attempts = s.attempts + 1,
           -- A step whose cancel was requested ends cancelled rather than run again
           -- (unless that was its last attempt: dead iff attempts are spent).
           status = CASE WHEN s.attempts + 1 >= s.max_attempts THEN 'dead'
                         WHEN s.cancel_requested THEN 'cancelled' ELSE 'failed' END,
           finished_at = CASE WHEN s.cancel_requested OR s.attempts + 1 >= s.max_attempts
                              THEN statement_timestamp() END,
           available_at = statement_timestamp() + """
    + _BACKOFF
    + """,
           error = input.error, claimed_by = NULL, cancel_requested = false,
           limited_claim = false
      FROM input JOIN held ON held.id = input.id
     WHERE s.id = ANY(ARRAY(SELECT id FROM held))
       AND s.id = held.id AND s.claim_token = input.token AND """ + _IS_CLAIMED + """
    RETURNING s.id, input.token AS claim_token, s.status,
              extract(epoch FROM s.available_at - statement_timestamp()) AS retry_in,
              held.claimed_by AS pod, held.claim_incarnation, held.claimed_at
), """ + _FINISH.format(ended="failed", outcome="'failed'") + ""","""
    + _REJECT.format(done="failed")
    + "SELECT id, status, retry_in FROM failed"
)

# Release spends no attempt: the step goes back as it was, at once (or ends
# cancelled if a cancel was requested).
_RELEASED = """
       SET status = CASE WHEN s.cancel_requested THEN 'cancelled' ELSE 'queued' END,
           finished_at = CASE WHEN s.cancel_requested THEN statement_timestamp() END,
           claimed_by = NULL, cancel_requested = false, limited_claim = false,
           available_at = statement_timestamp()"""

RELEASE = (
    """
WITH input AS (
    SELECT * FROM jsonb_to_recordset(CAST(:items AS jsonb)) AS t(id bigint, token bigint)
), """ + _HELD + """, released AS (
    UPDATE steps s""" + _RELEASED + """
      FROM input JOIN held ON held.id = input.id
     WHERE s.id = ANY(ARRAY(SELECT id FROM held))
       AND s.id = held.id AND s.claim_token = input.token AND """ + _IS_CLAIMED + """
    RETURNING s.id, input.token AS claim_token, held.claimed_by AS pod,
              held.claim_incarnation, held.claimed_at
), """ + _FINISH.format(ended="released", outcome="'released'") + ""","""
    + _REJECT.format(done="released")
    + "SELECT id FROM released"
)

# Every claim a pod's incarnation holds, released (Store.release_claims_of):
# by pod, not token, because the pod does not know them all.
RELEASE_CLAIMS_OF = (
    """
WITH released AS (
    UPDATE steps s""" + _RELEASED + """
     -- Locked in id order, like the fenced writes (no deadlock with them).
     WHERE s.id IN (SELECT id FROM steps
                     WHERE status = 'claimed' AND claimed_by = :pod
                       AND coalesce(claim_incarnation, 0) = :incarnation
                     ORDER BY id
                       FOR UPDATE)
    RETURNING s.id, s.claim_token, CAST(:pod AS text) AS pod, s.claim_incarnation,
              s.claimed_at
), """ + _FINISH.format(ended="released", outcome="'released'") + """
SELECT id FROM released ORDER BY id
"""
)

CANCEL = """
UPDATE steps
   SET status = CASE WHEN status = 'claimed' THEN status ELSE 'cancelled' END,
       finished_at = CASE WHEN status = 'claimed' THEN finished_at
                          ELSE statement_timestamp() END,
       cancel_requested = (status = 'claimed')
 WHERE id = :id AND status IN ('queued', 'failed', 'claimed')
RETURNING status
"""

ACK_CANCEL = (
    """
WITH acked AS (
    UPDATE steps s SET status = 'cancelled', finished_at = statement_timestamp(),
                       cancel_requested = false, limited_claim = false
     WHERE s.id = :id AND s.claim_token = :token AND """ + _IS_CLAIMED + """
    RETURNING s.id, CAST(:token AS bigint) AS claim_token, s.claimed_by AS pod,
              s.claim_incarnation, s.claimed_at
), """
    + _FINISH.format(ended="acked", outcome="'cancelled'")
    + """
SELECT id FROM acked
"""
)

STEP_STATUS = "SELECT status FROM steps WHERE id = :id"

GET_STEP = """
SELECT id, queue, status, priority, payload, attempts, max_attempts, idempotency_key,
       claimed_by, claim_token, cancel_requested, result, error
  FROM steps WHERE id = :id
"""

UPSERT_QUEUE = """
INSERT INTO queues (name, concurrency_limit, max_length, strict_fifo, paused, timeout_s)
VALUES (:name, :concurrency_limit, :max_length, :strict_fifo, :paused, :timeout_s)
ON CONFLICT (name) DO UPDATE
   SET concurrency_limit = EXCLUDED.concurrency_limit,
       max_length = EXCLUDED.max_length,
       strict_fifo = EXCLUDED.strict_fifo,
       paused = EXCLUDED.paused,
       timeout_s = EXCLUDED.timeout_s
"""

# When a queue gets a concurrency limit (or strict FIFO), the claims it
# already has open were made by the fast path, unflagged: flag them, so the
# locked path counts them. The fast path holds the queue's row FOR KEY SHARE
# and configure_queue locks it FOR UPDATE first, so no fast-path claim is in
# flight here; one that starts later re-reads the row once the lock is gone
# and leaves the queue to the locked path.
# Rows are locked in id order, as the fenced writes lock theirs, so this
# multi-row update cannot deadlock with a completion.
FLAG_OPEN_CLAIMS = """
UPDATE steps SET limited_claim = true
 WHERE id IN (SELECT id FROM steps
               WHERE queue = :queue AND status = 'claimed' AND NOT limited_claim
               ORDER BY id
                 FOR UPDATE)
"""

# Sets (null: removes) a queue's execution timeout, creating the queue if new.
SET_QUEUE_TIMEOUT = """
INSERT INTO queues (name, timeout_s) VALUES (:name, :timeout_s)
ON CONFLICT (name) DO UPDATE SET timeout_s = EXCLUDED.timeout_s
"""

SET_PAUSED = "UPDATE queues SET paused = :paused WHERE name = :name RETURNING name"

GET_QUEUES = """
SELECT name, concurrency_limit, max_length, strict_fifo, paused, timeout_s
  FROM queues ORDER BY name
"""

QUEUE_STATS = """
SELECT queue, depth, queued, claimed, completed, failed, dead, cancelled
  FROM queue_stats ORDER BY queue
"""

STATUS_COUNTS = "SELECT status, count(*) FROM steps GROUP BY status"

# Whether any step is still to run: waiting ones by the steps_claimable index;
# claimed ones (no index) only once none waits. Cheap enough to poll while a
# fleet drains, unlike STATUS_COUNTS (a scan of every row).
HAS_OPEN_STEPS = """
SELECT EXISTS (SELECT 1 FROM steps WHERE waiting)
    OR EXISTS (SELECT 1 FROM steps WHERE status = 'claimed')
"""

# A (re)registering pod holds no work from before: whatever its id still has
# claimed is requeued now, spending an attempt, as recovery would.
#
# One live process per pod id. A registration is refused (no row returned)
# while another process owns the id: its row is alive, its heartbeat younger
# than :live_within, and it is not this very process (same incarnation, pid
# and host: a retry of our own registration whose reply was lost). A higher
# incarnation takes over (a restart by a supervisor that saw the old process
# die): the old incarnation is fenced, because the heartbeat, the claim and
# release_claims_of all check the incarnation, and its claims are revoked
# here. The condition sits in ON CONFLICT's WHERE, which PostgreSQL checks
# against the row as locked, so two registrations racing for a new id
# cannot both win. Every registration is appended to pod_registrations.
REGISTER_POD = (
    """
WITH owner AS (
    SELECT incarnation, status = 'alive' AND heartbeat_at > statement_timestamp()
               - make_interval(secs => CAST(:live_within AS float8)) AS live
      -- The row as of the statement's start (not locked: the upsert below
      -- locks and re-checks it), for the record of what was replaced.
      FROM pods WHERE id = :pod
), pod AS (
    INSERT INTO pods (id, incarnation, pid, host, status, started_at, heartbeat_at)
    VALUES (:pod, :incarnation, :pid, :host, 'alive', statement_timestamp(),
            statement_timestamp())
    ON CONFLICT (id) DO UPDATE
       SET incarnation = EXCLUDED.incarnation, pid = EXCLUDED.pid, host = EXCLUDED.host,
           status = 'alive', started_at = EXCLUDED.started_at,
           heartbeat_at = EXCLUDED.heartbeat_at, died_at = NULL, swept_at = NULL
     WHERE NOT (pods.status = 'alive'
                AND pods.heartbeat_at > statement_timestamp()
                    - make_interval(secs => CAST(:live_within AS float8))
                AND pods.incarnation >= EXCLUDED.incarnation
                AND (pods.incarnation, pods.pid, pods.host)
                    IS DISTINCT FROM (EXCLUDED.incarnation, EXCLUDED.pid, EXCLUDED.host))
    RETURNING id
), registered AS (
    INSERT INTO pod_registrations (pod_id, incarnation, pid, host, registered_at,
                                   replaced_incarnation)
    SELECT :pod, :incarnation, :pid, :host, statement_timestamp(),
           (SELECT incarnation FROM owner WHERE live AND incarnation <> :incarnation)
     WHERE EXISTS (SELECT 1 FROM pod)
)
SELECT EXISTS (SELECT 1 FROM pod) AS registered,
       p.incarnation, p.pid, p.host,
       extract(epoch FROM statement_timestamp() - p.heartbeat_at) AS heartbeat_age_s
  FROM (SELECT 1) AS one
  LEFT JOIN pods p ON p.id = :pod
"""
)

# Run after REGISTER_POD, in its transaction: whatever the id still has
# claimed (from an earlier incarnation) is requeued, spending an attempt.
REQUEUE_LEFTOVERS = (
    """
WITH orphans AS (
    UPDATE steps s
       SET attempts = s.attempts + 1,
           status = CASE WHEN s.attempts + 1 >= s.max_attempts THEN 'dead'
                         WHEN s.cancel_requested THEN 'cancelled' ELSE 'queued' END,
           finished_at = CASE WHEN s.cancel_requested OR s.attempts + 1 >= s.max_attempts
                              THEN statement_timestamp() END,
           -- With backoff, like recovery: a crash-looping pod must not take its
           -- orphans straight back.
           available_at = statement_timestamp() + """
    + _BACKOFF
    + """,
           claimed_by = NULL, cancel_requested = false, limited_claim = false,
           error = 'pod ' || :pod || ' restarted while holding this step'
     WHERE s.status = 'claimed' AND s.claimed_by = :pod
    RETURNING s.id, s.claim_token, CAST(:pod AS text) AS pod, s.claim_incarnation,
              s.claimed_at
), recorded AS (
    -- Stamped with the registration's instant (the statement before this
    -- one), so the history shows the revocation as the registration's.
    INSERT INTO finished_attempts (claim_token, step_id, pod_id, incarnation, claimed_at,
                                   finished_at, outcome)
    SELECT claim_token, id, pod, coalesce(claim_incarnation, 0), claimed_at,
           (SELECT started_at FROM pods WHERE id = :pod), 'lease_lost'
      FROM orphans
)
SELECT count(*) FROM orphans
"""
)

HEARTBEAT = """
WITH beat AS (
    UPDATE pods SET heartbeat_at = statement_timestamp()
     WHERE id = :pod AND incarnation = :incarnation AND status = 'alive'
    RETURNING id
)
SELECT EXISTS (SELECT 1 FROM beat) AS alive,
       (SELECT incarnation FROM pods WHERE id = :pod) AS incarnation,
       ARRAY(SELECT s.id FROM steps s
              WHERE s.claimed_by = :pod AND s.status = 'claimed' AND s.cancel_requested
              ORDER BY s.id) AS cancel_ids,
       ARRAY(SELECT s.claim_token FROM steps s
              WHERE s.claimed_by = :pod AND s.status = 'claimed' AND s.cancel_requested
              ORDER BY s.id) AS cancel_tokens
"""

STOP_POD = """
UPDATE pods SET status = 'stopped', died_at = statement_timestamp()
 WHERE id = :pod AND incarnation = :incarnation AND status = 'alive'
"""

ALIVE_PODS = "SELECT id, incarnation, pid, host FROM pods WHERE status = 'alive'"

PODS = """
WITH done AS (
    SELECT pod_id, count(*) AS n FROM finished_attempts WHERE outcome = 'completed'
     GROUP BY pod_id
), held AS (
    SELECT claimed_by, count(*) AS n FROM steps WHERE status = 'claimed' GROUP BY claimed_by
)
SELECT p.id, p.incarnation, p.pid, p.host, p.status,
       extract(epoch FROM statement_timestamp() - p.heartbeat_at) AS heartbeat_age_s,
       coalesce(held.n, 0) AS claimed, coalesce(done.n, 0) AS completed
  FROM pods p
  LEFT JOIN held ON held.claimed_by = p.id
  LEFT JOIN done ON done.pod_id = p.id
 ORDER BY p.id
"""

POD_COUNTS = """
SELECT count(*) FILTER (WHERE status = 'alive'), count(*) FROM pods
"""

# A term starts when the lease row is taken, not when the statement began:
# an acquire that waited for a concurrent release (and then found the lease
# free) must not be stamped before that release's end, or the history would
# show two terms overlapping that never did. Hence clock_timestamp() in SET,
# evaluated on the row version the update applies to.
ACQUIRE_LEASE = """
WITH won AS (
    UPDATE leader_lease
       SET holder = :pod, term = term + 1, acquired_at = clock_timestamp(),
           expires_at = clock_timestamp() + make_interval(secs => CAST(:ttl AS float8))
     WHERE id = 1 AND (holder IS NULL OR expires_at <= statement_timestamp())
    RETURNING term, acquired_at, expires_at
), closed AS (
    UPDATE leader_terms t SET ended_at = LEAST(t.expires_at, won.acquired_at)
      FROM won WHERE t.ended_at IS NULL AND t.term < won.term
), opened AS (
    INSERT INTO leader_terms (term, pod_id, started_at, expires_at)
    SELECT term, :pod, acquired_at, expires_at FROM won
)
SELECT term, extract(epoch FROM expires_at - clock_timestamp()) FROM won
"""

RENEW_LEASE = """
WITH renewed AS (
    UPDATE leader_lease
       SET expires_at = statement_timestamp() + make_interval(secs => CAST(:ttl AS float8))
     WHERE id = 1 AND holder = :pod AND term = :term AND expires_at > statement_timestamp()
    RETURNING term, expires_at
), recorded AS (
    UPDATE leader_terms t SET expires_at = renewed.expires_at
      FROM renewed WHERE t.term = renewed.term
)
SELECT term, extract(epoch FROM expires_at - statement_timestamp()) FROM renewed
"""

RELEASE_LEASE = """
WITH released AS (
    UPDATE leader_lease SET holder = NULL, expires_at = statement_timestamp()
     WHERE id = 1 AND holder = :pod AND term = :term AND expires_at > statement_timestamp()
    RETURNING term
), recorded AS (
    UPDATE leader_terms t SET ended_at = statement_timestamp(),
                              expires_at = statement_timestamp()
      FROM released WHERE t.term = released.term
)
SELECT term FROM released
"""

CURRENT_LEASE = """
SELECT holder, term, extract(epoch FROM expires_at - statement_timestamp())
  FROM leader_lease
 WHERE id = 1 AND holder IS NOT NULL AND expires_at > statement_timestamp()
"""

# The fence for every leader action: holder, term and expiry re-checked in
# the acting transaction. FOR SHARE keeps a new holder from taking the lease
# until the action commits, so no action can land inside the next term.
CHECK_LEASE = """
SELECT term FROM leader_lease
 WHERE id = 1 AND holder = :pod AND term = :term AND expires_at > statement_timestamp()
   FOR SHARE
"""

# One fenced statement: mark silent pods dead, requeue (or dead-letter) every
# step claimed by a pod that is not alive, and every claim older than its
# execution timeout plus :dead_after (the grace) even if its pod is alive
# (a wedged runner thread), and log each action with its term.
RECOVER = (
    """
WITH lease AS (
    SELECT term FROM leader_lease
     WHERE id = 1 AND holder = :pod AND term = :term
       AND expires_at > statement_timestamp()
       FOR SHARE
), dying AS (
    -- A claim in flight holds its pod's row FOR SHARE. Skip such a pod and
    -- mark it on a later pass rather than wait: its claimer may be frozen
    -- mid-transaction (SIGSTOP), and this statement holds up every other
    -- pod's recovery and the lease while it waits.
    -- A pod is dead once silent for :dead_after, or at once if its process
    -- is certainly gone: its supervisor recorded the exit of this very
    -- registration (pod_exits, by primary key; see Store.record_exit).
    SELECT p.id FROM pods p
     WHERE p.status = 'alive'
       AND (p.heartbeat_at < statement_timestamp()
                             - make_interval(secs => CAST(:dead_after AS float8))
            OR EXISTS (SELECT 1 FROM pod_exits e
                        WHERE e.pod_id = p.id AND e.registered_at = p.started_at
                          AND e.incarnation = p.incarnation))
       AND EXISTS (SELECT 1 FROM lease)
     ORDER BY p.id
       FOR NO KEY UPDATE SKIP LOCKED
), newly_dead AS (
    UPDATE pods p SET status = 'dead', died_at = statement_timestamp()
      FROM dying
     WHERE p.id = dying.id
    RETURNING p.id
), unswept AS (
    -- Pods that stopped being alive in an earlier statement and whose steps
    -- have not been swept since. Marking a pod dead (or stopped) locked its
    -- row, which no claim in flight held (they lock it FOR SHARE) and every
    -- later claim finds dead, so this statement's snapshot holds every claim
    -- it will ever make: one sweep after the marking is enough, and a pod is
    -- never swept again.
    UPDATE pods p SET swept_at = statement_timestamp()
     WHERE p.status <> 'alive' AND p.swept_at IS NULL
       AND EXISTS (SELECT 1 FROM lease)
    RETURNING p.id
), orphans AS (
    -- There is no index of claimed steps (a completion would have to
    -- update it): this scans steps, but only in a pass that has pods to
    -- sweep (the condition is evaluated once, before the scan). The pods
    -- marked dead by this very statement are swept now too, and again by
    -- the next pass.
    SELECT s.id, s.claimed_by, s.claim_token, s.claim_incarnation, s.claimed_at
      FROM steps s
     WHERE (EXISTS (SELECT 1 FROM newly_dead) OR EXISTS (SELECT 1 FROM unswept))
       AND s.status = 'claimed'
       AND (s.claimed_by IN (SELECT id FROM newly_dead)
            OR s.claimed_by IN (SELECT id FROM unswept))
), overdue AS (
    -- Claims past their execution timeout plus the grace, whoever holds
    -- them. Only once some queue or step has a timeout (evaluated once, the
    -- steps by steps_with_timeout); then this scans steps (no index of
    -- claimed steps, see above).
    SELECT s.id, s.claimed_by, s.claim_token, s.claim_incarnation, s.claimed_at,
           COALESCE(s.timeout_s, qt.timeout_s) AS timeout_s
      FROM steps s
      LEFT JOIN queues qt ON qt.name = s.queue
     WHERE EXISTS (SELECT 1 FROM lease)
       AND (EXISTS (SELECT 1 FROM queues WHERE timeout_s IS NOT NULL)
            OR EXISTS (SELECT 1 FROM steps WHERE timeout_s IS NOT NULL))
       AND s.status = 'claimed'
       AND COALESCE(s.timeout_s, qt.timeout_s) IS NOT NULL
       AND s.claimed_at < statement_timestamp() - make_interval(
               secs => COALESCE(s.timeout_s, qt.timeout_s) + CAST(:dead_after AS float8))
       AND s.id NOT IN (SELECT id FROM orphans)
), revoked AS (
    SELECT id, claimed_by, claim_token, claim_incarnation, claimed_at,
           'pod ' || claimed_by || ' died while holding this step' AS error
      FROM orphans
    UNION ALL
    SELECT id, claimed_by, claim_token, claim_incarnation, claimed_at,
           'timed out after '
           || rtrim(rtrim(CAST(CAST(timeout_s AS numeric(14, 3)) AS text), '0'), '.')
           || 's: revoked from pod ' || claimed_by || ' by the leader' AS error
      FROM overdue
), requeued AS (
    UPDATE steps s
       SET attempts = s.attempts + 1,
           status = CASE WHEN s.attempts + 1 >= s.max_attempts THEN 'dead'
                         WHEN s.cancel_requested THEN 'cancelled' ELSE 'queued' END,
           finished_at = CASE WHEN s.cancel_requested OR s.attempts + 1 >= s.max_attempts
                              THEN statement_timestamp() END,
           available_at = statement_timestamp() + """
    + _BACKOFF
    + """,
           claimed_by = NULL, cancel_requested = false, limited_claim = false,
           error = revoked.error
      FROM revoked
     -- Re-checked after any row lock wait: the token pins the exact claim.
     WHERE s.id = revoked.id AND s.status = 'claimed'
       AND s.claim_token = revoked.claim_token
    RETURNING s.id, s.claim_token, s.status,
              revoked.claimed_by AS pod, revoked.claim_incarnation, revoked.claimed_at
), """
    + _FINISH.format(ended="requeued", outcome="'lease_lost'")
    + """, log_dead AS (
    INSERT INTO leader_actions (term, pod_id, action, target_pod, at)
    SELECT :term, :pod, 'mark_dead', id, statement_timestamp() FROM newly_dead
), log_requeued AS (
    INSERT INTO leader_actions (term, pod_id, action, target_pod, step_id, claim_token, at)
    SELECT :term, :pod,
           CASE WHEN status = 'dead' THEN 'dead_letter' ELSE 'requeue' END,
           -- requeued.pod held the claim; :pod is the leader acting.
           requeued.pod, id, claim_token, statement_timestamp()
      FROM requeued
)
SELECT EXISTS (SELECT 1 FROM lease) AS valid,
       ARRAY(SELECT id FROM newly_dead ORDER BY id) AS marked_dead,
       ARRAY(SELECT id FROM requeued WHERE status = 'queued' ORDER BY id) AS requeued,
       ARRAY(SELECT id FROM requeued WHERE status = 'dead' ORDER BY id) AS dead_lettered
"""
)

DB_NOW = "SELECT statement_timestamp()"

RUN_SUMMARY = """
WITH done AS (
    SELECT step_id, count(*) AS n FROM finished_attempts
     WHERE outcome = 'completed' GROUP BY step_id
)
SELECT (SELECT count(*) FROM steps) AS submitted,
       extract(epoch FROM (SELECT max(finished_at) FROM finished_attempts
                            WHERE outcome = 'completed')
                          - (SELECT min(claimed_at) FROM step_attempts)) AS window_s,
       (SELECT count(*) FROM done WHERE n > 1) AS duplicates,
       -- NOT IN (a hashed subplan), not NOT EXISTS: right after a run the
       -- statistics know nothing of the attempts, and the anti join planned on
       -- them loops over every pair (10 s for 20,000 steps, past the
       -- statement timeout on a busy machine). step_id is never NULL.
       (SELECT count(*) FROM steps s WHERE s.status = 'completed'
           AND s.id NOT IN (SELECT step_id FROM done)) AS unbacked,
       (SELECT count(DISTINCT pod_id) FROM finished_attempts
         WHERE outcome = 'completed') AS pods_with_work
"""

MARK_POD_DEAD = """
WITH lease AS (
    SELECT term FROM leader_lease
     WHERE id = 1 AND holder = :pod AND term = :term
       AND expires_at > statement_timestamp()
), dead AS (
    UPDATE pods SET status = 'dead', died_at = statement_timestamp()
     WHERE id = :target AND status = 'alive' AND EXISTS (SELECT 1 FROM lease)
    RETURNING id
), logged AS (
    INSERT INTO leader_actions (term, pod_id, action, target_pod, at)
    SELECT :term, :pod, 'mark_dead', id, statement_timestamp() FROM dead
    RETURNING id
)
SELECT EXISTS (SELECT 1 FROM lease) AS valid, EXISTS (SELECT 1 FROM logged) AS marked
"""

# A certain death (Store.record_exit), step 1: the dead process's backends,
# by the application name every pod connects with (pod_application_name).
# Terminated, then waited out (PROCESS_BACKENDS_LEFT): a statement it sent
# before dying may still be running, or be on its way in a socket buffer.
TERMINATE_BACKENDS = """
SELECT pid, pg_terminate_backend(pid) AS signalled
  FROM pg_stat_activity
 WHERE application_name = :app AND datname = current_database()
   AND pid <> pg_backend_pid()
"""

PROCESS_BACKENDS_LEFT = """
SELECT count(*) FROM pg_stat_activity
 WHERE (application_name = :app AND datname = current_database()
        AND pid <> pg_backend_pid())
    OR pid = ANY(CAST(:pids AS integer[]))
"""

# Step 2, in one transaction. The pod's row, locked: a registration of the
# id (a restart as incarnation n + 1) waits for this transaction, or has
# already replaced the row, and then nothing here matches.
LOCK_EXITED_POD = """
SELECT incarnation, pid, status, started_at FROM pods WHERE id = :pod FOR UPDATE
"""

# The lease, if the exited registration holds it: a term acquired since that
# registration by this id (no later registration exists: its row is locked
# above). Nothing the holder sent can land any more, so its term ends now:
# clock_timestamp(), after any lock wait, so no action of the term is stamped
# after its end. holder = NULL fences a statement that waited for the lock:
# it re-reads the row and finds no holder. A successor may acquire at once.
END_EXITED_TERM = """
WITH ended AS (
    UPDATE leader_lease
       SET holder = NULL, expires_at = clock_timestamp()
     WHERE id = 1 AND holder = :pod AND expires_at > statement_timestamp()
       AND acquired_at >= :registered_at
    RETURNING term, expires_at
), recorded AS (
    UPDATE leader_terms t SET ended_at = ended.expires_at, expires_at = ended.expires_at
      FROM ended WHERE t.term = ended.term
)
SELECT term FROM ended
"""

RECORD_EXIT = """
INSERT INTO pod_exits (pod_id, incarnation, pid, registered_at, exited_at, returncode,
                       ended_term)
VALUES (:pod, :incarnation, :pid, :registered_at, clock_timestamp(), :returncode,
        :ended_term)
ON CONFLICT (pod_id, registered_at) DO NOTHING
RETURNING exited_at
"""

# Whether a pod whose exit was recorded is still alive (the leader looks for
# one between its recovery passes, so a certain death is acted on at once).
UNMARKED_EXITS = """
SELECT EXISTS (SELECT 1 FROM pods p
                WHERE p.status = 'alive'
                  AND EXISTS (SELECT 1 FROM pod_exits e
                               WHERE e.pod_id = p.id AND e.registered_at = p.started_at
                                 AND e.incarnation = p.incarnation))
"""
