"""The checker against a real history: valid as recorded, invalid after each corruption.

A module fixture runs a real workload through the Store API once, in a
template schema: three worker threads claim, complete, fail and release
steps of a plain queue, a strict-FIFO queue and a queue with a concurrency
limit; a leader pod holds the lease, dies, is replaced once its lease
expires, and the new leader recovers the dead pod's steps (the dead pod's
late writes are refused); leadership then changes hands gracefully. Some
steps are cancelled, some dead-lettered. Each test gets its own copy of that
history, corrupts it with direct SQL the way a broken store would, and
checks that the checker names the right invariant and the right witness.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import psycopg2
import pytest

from fleetsim.checker import INVARIANTS, CheckReport, check
from fleetsim.errors import NotLeader, SchemaMismatch
from fleetsim.history import export_history
from fleetsim.store import (
    ClaimedStep,
    QueueConfig,
    RetryPolicy,
    StepSpec,
    Store,
    StoreConfig,
    WriteOutcome,
)

pytestmark = pytest.mark.timeout(90)

QUEUES = ("normal", "fifo", "limited")
LIMIT = 2  # the limited queue's concurrency limit
DEAD_AFTER_S = 0.5
TABLES = (
    "queues",
    "steps",
    "finished_attempts",
    "rejected_writes",
    "pods",
    "leader_lease",
    "leader_terms",
    "leader_actions",
)
SEQUENCES = ("claim_token_seq", "steps_id_seq", "leader_actions_id_seq")


class Db:
    """A direct autocommit connection to one test schema, for reading and corrupting."""

    def __init__(self, url: str, schema: str) -> None:
        self.conn = psycopg2.connect(url, options=f"-c search_path={schema}")
        self.conn.autocommit = True

    def all(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []

    def one(self, sql: str, *args: Any) -> Any:
        rows = self.all(sql, *args)
        assert rows, f"no row for {sql}"
        return rows[0][0] if len(rows[0]) == 1 else rows[0]

    def close(self) -> None:
        self.conn.close()


# -- the workload -------------------------------------------------------------


def _specs() -> list[StepSpec]:
    specs = [
        # Claimed first by the doomed leader (lowest priority value wins), then
        # dead-lettered by recovery: it has a single attempt.
        StepSpec("normal", {"kind": "ok"}, priority=-1, max_attempts=1),
    ]
    for i in range(120):
        kind = ("ok", "ok", "ok", "ok", "ok", "flaky", "release", "poison", "ok", "ok")[i % 10]
        specs.append(StepSpec("normal", {"kind": kind}, max_attempts=2 if kind == "poison" else 3))
    for i in range(40):
        specs.append(StepSpec("fifo", {"kind": "flaky" if i % 7 == 3 else "ok"}))
    for i in range(40):
        specs.append(StepSpec("limited", {"kind": "flaky" if i % 5 == 2 else "ok"}))
    return specs


class Worker(threading.Thread):
    """One pod's claim loop: heartbeat, claim, do the step's kind of work."""

    def __init__(self, store: Store, pod: str, released: set[int], lock: threading.Lock) -> None:
        super().__init__(name=pod, daemon=True)
        self.store, self.pod, self.incarnation = store, pod, 0
        self.released, self.lock = released, lock
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                beat = self.store.heartbeat(self.pod, self.incarnation)
                if not beat.alive:  # declared dead after a stall: come back as a new incarnation
                    self.incarnation += 1
                    self.store.register_pod(self.pod, incarnation=self.incarnation)
                    continue
                for step_id, token in beat.cancel_requested:
                    self.store.acknowledge_cancel(step_id, token)
                claimed = self.store.claim_steps(
                    self.pod, QUEUES, batch=2, incarnation=self.incarnation
                )
                if not claimed:
                    self.stop.wait(0.005)
                for step in claimed:
                    self.work(step)
        except BaseException as exc:  # reported by the fixture
            self.error = exc

    def work(self, step: ClaimedStep) -> None:
        kind = step.payload["kind"]
        time.sleep(0.001)  # the step's "work": lets claims of the limited queue overlap
        if kind == "poison" or (kind == "flaky" and step.attempts == 0):
            self.store.fail(step.id, step.claim_token, f"{kind} step")
            return
        if kind == "release":
            with self.lock:
                first = step.id not in self.released
                self.released.add(step.id)
            if first:
                self.store.release(step.id, step.claim_token)
                return
        self.store.complete(step.id, step.claim_token, {"by": self.pod})


def _poll(what: str, fn: Any, timeout_s: float = 20.0) -> Any:
    """Call ``fn`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def build_history(store: Store) -> None:
    """Run the workload described in the module docstring, to completion."""
    store.configure_queue(QueueConfig("fifo", strict_fifo=True))
    store.configure_queue(QueueConfig("limited", concurrency_limit=LIMIT))
    ids = store.submit_many(_specs())
    for step_id in ids[2:60:10]:  # a few plain "ok" steps cancelled while queued
        assert store.cancel(step_id) == "cancelled"
    for pod in ("pod-1", "pod-2", "pod-3", "pod-4"):
        store.register_pod(pod)

    # pod-4 leads term 1, holds four steps, then dies (no heartbeat, no renewal).
    lease = store.acquire_leadership("pod-4", ttl_s=0.3)
    assert lease is not None and lease.term == 1
    store.recover("pod-4", 1, DEAD_AFTER_S)
    held = store.claim_steps("pod-4", ["normal"], batch=4)
    assert len(held) == 4 and held[0].id == ids[0]

    # A cooperative cancel: requested while claimed, acknowledged by the pod.
    (victim,) = store.claim_steps("pod-3", ["normal"], batch=1)
    assert store.cancel(victim.id) == "cancel_requested"
    beat = store.heartbeat("pod-3")
    assert (victim.id, victim.claim_token) in beat.cancel_requested
    assert store.acknowledge_cancel(victim.id, victim.claim_token) is WriteOutcome.ACCEPTED

    released: set[int] = set()
    lock = threading.Lock()
    workers = [Worker(store, pod, released, lock) for pod in ("pod-1", "pod-2", "pod-3")]
    for w in workers:
        w.start()
    try:
        # pod-1 takes over once pod-4's lease expired, and recovers its steps.
        lease = _poll("lease takeover", lambda: store.acquire_leadership("pod-1", ttl_s=30))
        assert lease.term == 2
        assert store.renew_leadership("pod-4", 1, 0.3) is None
        recovered: list[int] = []

        def recover_pod4() -> bool:
            done = store.recover("pod-1", 2, DEAD_AFTER_S)
            recovered.extend(done.requeued + done.dead_lettered)
            return "pod-4" in done.marked_dead

        _poll("pod-4 declared dead", recover_pod4)
        assert {s.id for s in held} <= set(recovered)
        # pod-4 wakes up: its late writes are refused (and stamped in the history).
        assert store.complete(held[1].id, held[1].claim_token) is WriteOutcome.LEASE_LOST
        assert store.fail(held[2].id, held[2].claim_token, "late").outcome is (
            WriteOutcome.LEASE_LOST
        )
        with pytest.raises(NotLeader):
            store.recover("pod-4", 1, DEAD_AFTER_S)

        # A graceful handover: pod-1 resigns, pod-2 leads term 3 to the end.
        assert store.release_leadership("pod-1", 2)
        lease = store.acquire_leadership("pod-2", ttl_s=30)
        assert lease is not None and lease.term == 3
        assert store.renew_leadership("pod-2", 3, 30) is not None

        def all_finished() -> bool:
            store.recover("pod-2", 3, DEAD_AFTER_S)
            counts = store.status_counts()
            return counts["queued"] + counts["claimed"] + counts["failed"] == 0

        _poll("every step to finish", all_finished, timeout_s=40)
    finally:
        for w in workers:
            w.stop.set()
        for w in workers:
            w.join(10)
    for w in workers:
        if w.error is not None:
            raise w.error
        store.stop_pod(w.pod, w.incarnation)
    assert store.release_leadership("pod-2", 3)


@pytest.fixture(scope="module")
def template(pg_url: str) -> Iterator[str]:
    """A schema holding the recorded history, built once for the module."""
    config = StoreConfig(
        pg_url,
        schema=f"tmpl_{uuid.uuid4().hex[:12]}",
        retry=RetryPolicy(base_s=0.005, cap_s=0.02, jitter=0.5),
    )
    store = Store(replace(config, pool_size=8))
    store.init_schema()
    try:
        build_history(store)
        assert config.schema is not None
        yield config.schema
    finally:
        store.drop_schema()
        store.close()


@dataclass
class History:
    """A private copy of the recorded history: a Store on it and a raw connection."""

    store: Store
    db: Db


@pytest.fixture
def history(template: str, store_config: StoreConfig, store: Store) -> Iterator[History]:
    """A fresh copy of the template history, in this test's own schema."""
    assert store_config.schema is not None
    db = Db(store_config.url, store_config.schema)
    try:
        db.all("DELETE FROM leader_lease")
        for table in TABLES:
            # Every column but the generated ones (steps.waiting), which
            # PostgreSQL computes and refuses to be given.
            columns = db.one(
                "SELECT string_agg(quote_ident(column_name), ', ' ORDER BY ordinal_position)"
                "  FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = %s AND is_generated = 'NEVER'",
                template,
                table,
            )
            db.all(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {template}.{table}")
        for seq in SEQUENCES:
            last, called = db.one(f"SELECT last_value, is_called FROM {template}.{seq}")
            db.all("SELECT setval(%s, %s, %s)", seq, last, called)
        yield History(store, db)
    finally:
        db.close()


def invariants(report: CheckReport) -> set[str]:
    return {v.invariant for v in report.violations}


def only(report: CheckReport, invariant: str) -> list[dict[str, Any]]:
    """Assert the report is invalid for exactly ``invariant``; return its witnesses."""
    assert report.valid is False, report.summary()
    assert report.exit_code == 1
    assert invariants(report) == {invariant}, report.summary()
    assert report.counts["violations"][invariant] >= 1
    return [v.witness for v in report.violations]


# -- the real history is valid ------------------------------------------------


def test_recorded_history_is_valid(history: History) -> None:
    report = check(history.store)
    assert report.valid is True, report.summary()
    assert report.exit_code == 0
    assert report.violations == []
    assert check(history.store, final=True).valid is True

    counts = report.counts
    assert counts["steps"] == len(_specs())
    assert counts["in_flight"] == 0
    by_status = counts["by_status"]
    assert by_status["completed"] > 150
    assert by_status["dead"] >= 13  # 12 poison steps + the one dead-lettered by recovery
    assert by_status["cancelled"] == 7  # six while queued, one cooperatively
    assert counts["terms"] == 3
    assert counts["rejected_writes"] >= 2
    assert all(n == 0 for n in counts["violations"].values())
    assert set(counts["violations"]) == set(INVARIANTS)

    db = history.db
    assert db.one("SELECT count(*) FROM step_attempts WHERE outcome = 'released'") > 0
    assert db.one("SELECT count(*) FROM leader_actions WHERE action = 'dead_letter'") >= 1
    assert db.one("SELECT count(*) FROM leader_actions WHERE action = 'requeue'") >= 3

    figures = report.figures
    # pod-4's last act as leader was its claim right after acquiring term 1;
    # its 0.3 s lease then had to run out before pod-1 could take term 2.
    failover = figures["failover"]
    assert failover["count"] == 2
    assert failover["max_s"] > 0.25
    assert (failover["worst"]["term"], failover["worst"]["pod"]) == (1, "pod-4")
    assert figures["lease_expiry_to_new_leader"]["count"] == 2
    assert figures["lease_expiry_to_new_leader"]["max_s"] < failover["max_s"]
    assert figures["orphan_recovery"]["count"] >= 3
    assert figures["orphan_recovery"]["median_s"] >= 0
    latency = figures["claim_to_completion"]
    assert latency["count"] == by_status["completed"]
    assert 0 < latency["p50_s"] <= latency["p90_s"] <= latency["p99_s"] <= latency["max_s"]

    document = json.loads(report.to_json())
    assert document["valid"] is True
    assert set(document) >= {"valid", "violations", "counts", "figures"}


# -- each corruption is caught -----------------------------------------------


def _single_attempt_completed(db: Db, queue: str = "normal") -> tuple[int, int, str]:
    """A completed step with one attempt: (step id, its token, its pod)."""
    row: tuple[int, int, str] = db.one(
        """SELECT s.id, s.claim_token, s.claimed_by FROM steps s
            WHERE s.queue = %s AND s.status = 'completed'
              AND (SELECT count(*) FROM step_attempts a WHERE a.step_id = s.id) = 1
            ORDER BY s.id LIMIT 1""",
        queue,
    )
    return row


def test_completed_step_reverted_to_queued_is_lost(history: History) -> None:
    step_id, token, pod = _single_attempt_completed(history.db)
    history.db.all(
        "UPDATE steps SET status = 'queued', finished_at = NULL, result = NULL WHERE id = %s",
        step_id,
    )
    (witness,) = only(check(history.store), "lost_step")
    assert witness["step_id"] == step_id
    assert witness["status"] == "queued"
    assert witness["completions"][0]["claim_token"] == token
    assert witness["completions"][0]["pod"] == pod


def test_second_accepted_completion_is_duplicate(history: History) -> None:
    step_id, token, _ = _single_attempt_completed(history.db)
    later = _after_history(history.db)
    extra = history.db.one(
        """INSERT INTO finished_attempts (claim_token, step_id, pod_id, claimed_at,
                                          finished_at, outcome)
           SELECT nextval('claim_token_seq'), step_id, 'pod-2', %s, %s, 'completed'
             FROM step_attempts WHERE claim_token = %s
           RETURNING claim_token""",
        later(0.2),
        later(0.4),
        token,
    )
    (witness,) = only(check(history.store), "duplicate_completion")
    assert witness["step_id"] == step_id
    assert [c["claim_token"] for c in witness["completions"]] == [token, extra]
    assert [c["pod"] for c in witness["completions"]][1] == "pod-2"


def test_completion_with_superseded_token_is_stale(history: History) -> None:
    db = history.db
    # A step first released, then claimed again and completed.
    step_id, old, new = db.one(
        """SELECT a.step_id, a.claim_token, b.claim_token
             FROM step_attempts a JOIN step_attempts b ON b.step_id = a.step_id
            WHERE a.outcome = 'released' AND b.outcome = 'completed'
              AND b.claim_token > a.claim_token
              AND (SELECT count(*) FROM step_attempts c WHERE c.step_id = a.step_id) = 2
            ORDER BY a.step_id LIMIT 1"""
    )
    # What a store without the token fence records: the old owner's completion
    # lands while the new claim runs, and the new owner's write is refused.
    db.all(
        """UPDATE finished_attempts a
              SET outcome = 'completed',
                  finished_at = b.claimed_at + (b.finished_at - b.claimed_at) / 2
             FROM step_attempts b
            WHERE a.claim_token = %s AND b.claim_token = %s""",
        old,
        new,
    )
    # It then took the step back from the new owner (an attempt spent) and
    # refused that owner's write.
    db.all("UPDATE finished_attempts SET outcome = 'lease_lost' WHERE claim_token = %s", new)
    db.all(
        """INSERT INTO rejected_writes (claim_token, step_id, at)
           SELECT claim_token, step_id, finished_at FROM finished_attempts
            WHERE claim_token = %s""",
        new,
    )
    db.all("UPDATE steps SET attempts = attempts + 1 WHERE id = %s", step_id)
    report = check(history.store)
    # No leader revoked the new claim: the history says so too.
    assert report.valid is False
    assert invariants(report) == {"stale_write", "history_integrity"}, report.summary()
    (revoked,) = [v.witness for v in report.violations if v.invariant == "history_integrity"]
    assert (revoked["kind"], revoked["claim_token"]) == ("unlogged_revocation", new)
    report = replace(report, violations=[v for v in report.violations
                                         if v.invariant == "stale_write"])
    (witness,) = only(report, "stale_write")
    assert witness["step_id"] == step_id
    assert witness["claim_token"] == old
    assert witness["newer_claim_token"] == new
    assert witness["step_claim_token"] == new
    assert "after token" in report.violations[0].message


def test_revoked_claim_accepted_is_stale(history: History) -> None:
    db = history.db
    # A claim the leader revoked (requeued) that later attempts then reclaimed:
    # turn the revoked attempt's outcome into an accepted failure.
    step_id, token, term = db.one(
        """SELECT la.step_id, la.claim_token, la.term FROM leader_actions la
            WHERE la.action = 'requeue' ORDER BY la.id LIMIT 1"""
    )
    db.all("UPDATE finished_attempts SET outcome = 'failed' WHERE claim_token = %s", token)
    (witness,) = only(check(history.store), "stale_write")
    assert (witness["step_id"], witness["claim_token"]) == (step_id, token)
    assert witness["revoked_in_term"] == term


def test_overlapping_leader_terms_are_split_brain(history: History) -> None:
    history.db.all(
        """UPDATE leader_terms
              SET ended_at = LEAST((SELECT started_at FROM leader_terms WHERE term = 3)
                                   + interval '1 s', statement_timestamp())
            WHERE term = 2"""
    )
    (witness,) = only(check(history.store), "split_brain")
    assert (witness["term"], witness["pod"]) == (3, "pod-2")
    assert (witness["other_term"], witness["other_pod"]) == (2, "pod-1")


@pytest.mark.parametrize("how", ["after_term", "by_other_pod", "unknown_term"])
def test_recovery_action_outside_its_term_is_split_brain(history: History, how: str) -> None:
    term, pod, at = {
        # pod-1 still acting a second after its term 2 ended.
        "after_term": (
            2,
            "pod-1",
            # Never in the future (future_time): the check comes after this.
            "LEAST((SELECT ended_at FROM leader_terms WHERE term = 2) + interval '1 s',"
            " statement_timestamp())",
        ),
        # pod-3 acting inside term 2, which pod-1 held.
        "by_other_pod": (
            2,
            "pod-3",
            "(SELECT started_at FROM leader_terms WHERE term = 2) + interval '1 ms'",
        ),
        "unknown_term": (9, "pod-3", "statement_timestamp()"),
    }[how]
    action_id = history.db.one(
        "INSERT INTO leader_actions (term, pod_id, action, target_pod, at)"
        f" VALUES (%s, %s, 'mark_dead', 'pod-1', {at}) RETURNING id",
        term,
        pod,
    )
    (witness,) = only(check(history.store), "split_brain")
    assert (witness["action_id"], witness["term"], witness["pod"]) == (action_id, term, pod)
    if how != "unknown_term":
        assert witness["term_pod"] == "pod-1"


def _after_history(db: Db) -> Any:
    """A function of f in [0, 1]: the instant f of the way from the history's end to now.

    Corruptions that add rows use it: an instant after the check's own
    database time would be a (different) violation.
    """
    end, now = db.one(
        """SELECT greatest((SELECT max(finished_at) FROM finished_attempts),
                           (SELECT max(ended_at) FROM leader_terms),
                           (SELECT max(died_at) FROM pods)),
                  statement_timestamp()"""
    )
    return lambda f: end + (now - end) * f


def test_strict_fifo_claimed_out_of_order(history: History) -> None:
    db = history.db
    later = _after_history(db)
    first, second = (
        r[0]
        for r in db.all(
            """INSERT INTO steps (queue, status, created_at)
               VALUES ('fifo', 'queued', %s), ('fifo', 'queued', %s) RETURNING id""",
            later(0.01),
            later(0.01),
        )
    )
    # The later step is claimed (and completed) first, then the earlier one.
    for offset, step_id in ((0.1, second), (0.5, first)):
        db.all(
            """WITH a AS (
                   INSERT INTO finished_attempts (claim_token, step_id, pod_id,
                                                  claimed_at, finished_at, outcome)
                   VALUES (nextval('claim_token_seq'), %s, 'pod-1', %s, %s, 'completed')
                   RETURNING step_id, claim_token, claimed_at, finished_at)
               UPDATE steps s SET status = 'completed', claim_token = a.claim_token,
                                  claimed_by = 'pod-1', claimed_at = a.claimed_at,
                                  finished_at = a.finished_at
                 FROM a WHERE s.id = a.step_id""",
            step_id,
            later(offset),
            later(offset + 0.1),
        )
    (witness,) = only(check(history.store), "fifo_order")
    assert witness["queue"] == "fifo"
    assert witness["step_id"] == second
    assert witness["earlier_step_id"] == first


def test_concurrency_limit_exceeded(history: History) -> None:
    db = history.db
    later = _after_history(db)
    ids = [
        r[0]
        for r in db.all(
            "INSERT INTO steps (queue, status, created_at) SELECT 'limited', 'completed', %s"
            " FROM generate_series(1, %s) RETURNING id",
            later(0.01),
            LIMIT + 1,
        )
    ]
    # LIMIT + 1 attempts of the limited queue that overlap one another.
    db.all(
        """WITH a AS (
               INSERT INTO finished_attempts (claim_token, step_id, pod_id, claimed_at,
                                              finished_at, outcome)
               SELECT nextval('claim_token_seq'), id, 'pod-' || (id %% 3 + 1),
                      CAST(%s AS timestamptz) + (id - %s) * (CAST(%s AS timestamptz)
                                                             - CAST(%s AS timestamptz)),
                      %s, 'completed'
                 FROM unnest(%s) AS id
               RETURNING step_id, claim_token, pod_id, claimed_at, finished_at)
           UPDATE steps s SET claim_token = a.claim_token, finished_at = a.finished_at,
                              claimed_by = a.pod_id, claimed_at = a.claimed_at
             FROM a WHERE s.id = a.step_id""",
        later(0.1),
        ids[0],
        later(0.11),
        later(0.1),
        later(0.9),
        ids,
    )
    (witness,) = only(check(history.store), "concurrency_limit")
    assert witness["queue"] == "limited"
    assert witness["limit"] == LIMIT
    assert witness["running"] == LIMIT + 1
    assert witness["open_step_ids"] == ids
    assert witness["step_id"] == ids[-1]


@pytest.mark.parametrize("corruption", ["dead_too_early", "exhausted_not_dead"])
def test_dead_letter_mismatch(history: History, corruption: str) -> None:
    db = history.db
    if corruption == "dead_too_early":
        # A step cancelled while queued (no attempt spent) shown as dead.
        step_id = db.one(
            "SELECT min(id) FROM steps s WHERE status = 'cancelled'"
            " AND NOT EXISTS (SELECT 1 FROM step_attempts a WHERE a.step_id = s.id)"
        )
        db.all("UPDATE steps SET status = 'dead' WHERE id = %s", step_id)
    else:
        # A poison step that spent all its attempts shown as cancelled.
        step_id = db.one("SELECT min(id) FROM steps WHERE status = 'dead' AND max_attempts = 2")
        db.all("UPDATE steps SET status = 'cancelled' WHERE id = %s", step_id)
    report = check(history.store)
    (witness,) = only(report, "dlq")
    assert witness["step_id"] == step_id
    should = "should be dead" if corruption == "exhausted_not_dead" else "should not be dead"
    assert should in report.violations[0].message


def test_witnesses_are_capped_but_totals_exact(history: History) -> None:
    history.db.all("UPDATE steps SET status = 'dead' WHERE status = 'cancelled' AND attempts = 0")
    history.db.all(
        "UPDATE steps SET status = 'queued' WHERE id IN (SELECT id FROM steps"
        " WHERE status = 'completed' ORDER BY id LIMIT 30)"
    )
    report = check(history.store, max_witnesses=5)
    assert report.counts["violations"]["lost_step"] == 30
    assert report.counts["violations"]["dlq"] >= 6
    assert len([v for v in report.violations if v.invariant == "lost_step"]) == 5
    assert len([v for v in report.violations if v.invariant == "dlq"]) == 5


# -- unknown and not-a-store --------------------------------------------------


def test_steps_in_flight_make_the_verdict_unknown(history: History) -> None:
    store = history.store
    running_id, waiting_id = store.submit_many([StepSpec("normal"), StepSpec("normal")])
    store.register_pod("pod-9")
    (running,) = store.claim_steps("pod-9", ["normal"], batch=1)
    assert running.id == running_id
    report = check(store)
    assert report.valid is None, report.summary()
    assert report.exit_code == 2
    assert report.counts["in_flight"] == 2
    assert json.loads(report.to_json())["valid"] is None

    final = check(store, final=True)
    assert final.valid is False and final.exit_code == 1
    lost = {w["step_id"]: w["status"] for w in only(final, "lost_step")}
    assert lost == {running_id: "claimed", waiting_id: "queued"}


def test_in_flight_does_not_hide_a_violation(history: History) -> None:
    history.store.submit("normal", {"kind": "ok"})
    step_id, _, _ = _single_attempt_completed(history.db)
    history.db.all("UPDATE steps SET status = 'queued' WHERE id = %s", step_id)
    report = check(history.store)
    assert report.valid is False
    assert [w["step_id"] for w in only(report, "lost_step")] == [step_id]


def test_not_a_fleetsim_store(pg_url: str) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    db = Db(pg_url, "public")
    db.all(f"CREATE SCHEMA {schema}")
    db.all(f"CREATE TABLE {schema}.steps (id int)")
    try:
        with Store(StoreConfig(pg_url, schema=schema)) as store:
            with pytest.raises(SchemaMismatch):
                check(store)
            with pytest.raises(SchemaMismatch):
                export_history(store, io.StringIO())
    finally:
        db.all(f"DROP SCHEMA {schema} CASCADE")
        db.close()


# -- history export -----------------------------------------------------------


def test_export_history_jsonl(history: History) -> None:
    out = io.StringIO()
    written = export_history(history.store, out)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == written
    assert [r["index"] for r in records] == list(range(written))
    times = [r["time"] for r in records]
    assert times == sorted(times)  # ISO strings in UTC sort as times

    db = history.db
    attempts = db.one("SELECT count(*) FROM step_attempts")

    def count(type_: str, f: str) -> int:
        return sum(1 for r in records if r["type"] == type_ and r["f"] == f)

    assert count("invoke", "claim") == count("ok", "claim") == attempts
    assert count("ok", "complete") == db.one(
        "SELECT count(*) FROM step_attempts WHERE outcome = 'completed'"
    )
    assert count("info", "complete") == db.one(
        "SELECT count(*) FROM step_attempts WHERE outcome = 'lease_lost'"
    )
    assert count("fail", "complete") == db.one(
        "SELECT count(*) FROM step_attempts WHERE rejected_at IS NOT NULL"
    )
    assert count("ok", "release") > 0 and count("ok", "fail") > 0
    assert count("ok", "cancel") == 1
    assert [r["value"]["term"] for r in records if r["f"] == "elect"] == [1, 2, 3]
    assert count("ok", "recover") == db.one("SELECT count(*) FROM leader_actions")
    elect = records[0]  # pod-4 led before anything was claimed
    assert (elect["type"], elect["f"], elect["process"]) == ("ok", "elect", "pod-4#0")
    first = next(r for r in records if r["f"] == "claim")
    assert first["type"] == "invoke" and first["process"] == "pod-4#0"
    assert set(first["value"]) == {"step", "queue", "token"}
    # A claim's invoke is followed by its ok.
    claims = [r for r in records if r["f"] == "claim"]
    assert all(
        a["type"] == "invoke" and b["type"] == "ok" and a["value"] == b["value"]
        for a, b in zip(claims[::2], claims[1::2], strict=True)
    )


def test_export_rejects_unknown_format(history: History) -> None:
    from fleetsim.errors import ConfigError

    with pytest.raises(ConfigError):
        export_history(history.store, io.StringIO(), format="edn")
