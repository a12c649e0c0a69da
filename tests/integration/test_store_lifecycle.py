"""A step's life against a real PostgreSQL: retries, DLQ, release, cancel, recovery, keys."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from fleetsim.errors import StoreError
from fleetsim.store import (
    ClaimedStep,
    QueueConfig,
    RetryPolicy,
    StepSpec,
    Store,
    StoreConfig,
    WriteOutcome,
)
from tests.integration.claimers import sql, wait_db_time_past, wait_for

BASE_S = 0.2
JITTER = 0.5


@pytest.fixture
def retry_store(store_config: StoreConfig) -> Iterator[Store]:
    """A store whose first retry waits between 0.1 and 0.2 s (DB time)."""
    config = dataclasses.replace(store_config, retry=RetryPolicy(BASE_S, 5.0, JITTER))
    with Store(config) as s:
        yield s


def available_at(config: StoreConfig, step_id: int) -> datetime:
    """The step's available_at."""
    value: datetime = sql(config, "SELECT available_at FROM steps WHERE id = %(id)s",
                          {"id": step_id})[0][0]
    return value


def attempt(config: StoreConfig, token: int) -> dict[str, Any]:
    """One step_attempts row as a dict."""
    rows = sql(config, "SELECT step_id, pod_id, claimed_at, finished_at, outcome, rejected_at"
                       " FROM step_attempts WHERE claim_token = %(t)s", {"t": token})
    keys = ("step_id", "pod_id", "claimed_at", "finished_at", "outcome", "rejected_at")
    return dict(zip(keys, rows[0], strict=True))


def seconds(delta: timedelta) -> float:
    return delta.total_seconds()


def claim_all_when_due(
    store: Store, config: StoreConfig, pod: str, step_ids: list[int]
) -> list[ClaimedStep]:
    """Claim every step of ``step_ids``, each never before its available_at (DB time).

    A claim whose statement surely ran before the earliest available_at must
    come back empty; each claim that succeeds must have started at or after
    its step's available_at.
    """
    due = {i: available_at(config, i) for i in step_ids}
    got = store.claim_steps(pod, batch=len(step_ids))
    after = store.db_now()
    if after < min(due.values()):
        assert got == [], f"claimed by {after}, before the earliest available_at"
    claimed = list(got)
    while len(claimed) < len(step_ids):
        claimed += wait_for(lambda: store.claim_steps(pod, batch=len(step_ids)), 10,
                            f"steps {step_ids} to be claimable")
    assert sorted(s.id for s in claimed) == sorted(step_ids)
    for step in claimed:
        assert attempt(config, step.claim_token)["claimed_at"] >= due[step.id]
    return claimed


def claim_when_due(store: Store, config: StoreConfig, pod: str, step_id: int) -> ClaimedStep:
    """Claim ``step_id`` (the only claimable step) once it is due."""
    return claim_all_when_due(store, config, pod, [step_id])[0]


# -- retry backoff and DLQ ----------------------------------------------------


@pytest.mark.timeout(30)
def test_failures_back_off_exponentially_in_db_time_then_go_to_the_dlq(
    retry_store: Store, store_config: StoreConfig
) -> None:
    step_id = retry_store.submit("default", {"n": 1}, max_attempts=3)
    retry_store.register_pod("pod-a")
    [step] = retry_store.claim_steps("pod-a")

    for n in (1, 2):
        outcome = retry_store.fail(step.id, step.claim_token, f"boom {n}")
        delay = BASE_S * 2 ** (n - 1)
        assert outcome.outcome is WriteOutcome.ACCEPTED and outcome.status == "failed"
        assert outcome.retry_in_s is not None and 0 < outcome.retry_in_s <= delay
        row = retry_store.get_step(step_id)
        assert row is not None
        assert (row.status, row.attempts, row.claimed_by, row.error) == (
            "failed", n, None, f"boom {n}"
        )
        failed_at = attempt(store_config, step.claim_token)["finished_at"]
        assert attempt(store_config, step.claim_token)["outcome"] == "failed"
        waited = seconds(available_at(store_config, step_id) - failed_at)
        assert delay * (1 - JITTER) - 1e-6 <= waited <= delay + 1e-6, (n, waited)
        assert retry_store.queue_stats()["default"].failed == 1
        step = claim_when_due(retry_store, store_config, "pod-a", step_id)
        assert step.attempts == n

    outcome = retry_store.fail(step.id, step.claim_token, "boom 3")

    assert (outcome.outcome, outcome.status, outcome.retry_in_s) == (
        WriteOutcome.ACCEPTED, "dead", None
    )
    rows = sql(store_config, "SELECT status, attempts, max_attempts, finished_at IS NOT NULL,"
                             " claimed_by FROM steps WHERE id = %(id)s", {"id": step_id})
    assert rows == [("dead", 3, 3, True, None)]
    assert sql(store_config, "SELECT outcome, count(*) FROM step_attempts GROUP BY outcome") == [
        ("failed", 3)
    ]
    assert retry_store.status_counts()["dead"] == 1
    assert retry_store.claim_steps("pod-a") == []


@pytest.mark.timeout(30)
def test_backoff_is_capped(store_config: StoreConfig) -> None:
    config = dataclasses.replace(store_config, retry=RetryPolicy(0.1, 0.15, 0.0))
    with Store(config) as store:
        step_id = store.submit("default", {"n": 1}, max_attempts=5)
        store.register_pod("pod-a")
        waits = []
        [step] = store.claim_steps("pod-a")
        for _ in range(3):
            store.fail(step.id, step.claim_token, "boom")
            finished = attempt(store_config, step.claim_token)["finished_at"]
            waits.append(round(seconds(available_at(store_config, step_id) - finished), 6))
            step = claim_when_due(store, store_config, "pod-a", step_id)
    assert waits == [0.1, 0.15, 0.15]


# -- release --------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_release_spends_no_attempt_and_the_step_is_claimable_at_once(
    store: Store, store_config: StoreConfig
) -> None:
    step_id = store.submit("default", {"n": 1}, max_attempts=1)
    store.register_pod("pod-a")
    [first] = store.claim_steps("pod-a")

    assert store.release(first.id, first.claim_token) is WriteOutcome.ACCEPTED

    row = store.get_step(step_id)
    assert row is not None and (row.status, row.attempts, row.claimed_by) == ("queued", 0, None)
    released = attempt(store_config, first.claim_token)
    assert released["outcome"] == "released" and released["finished_at"] is not None
    [again] = store.claim_steps("pod-a")
    assert (again.id, again.attempts) == (step_id, 0)
    assert again.claim_token > first.claim_token
    assert store.release(first.id, first.claim_token) is WriteOutcome.LEASE_LOST
    # max_attempts=1 and it can still complete: the release cost nothing.
    assert store.complete(again.id, again.claim_token, "ok") is WriteOutcome.ACCEPTED


# -- cancel ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_cancelling_a_waiting_step_is_immediate(
    retry_store: Store, store_config: StoreConfig
) -> None:
    retrying = retry_store.submit("default", {"n": 1})
    retry_store.register_pod("pod-a")
    [step] = retry_store.claim_steps("pod-a")
    retry_store.fail(step.id, step.claim_token, "boom")
    queued = retry_store.submit("default", {"n": 2})

    assert retry_store.cancel(queued) == "cancelled"
    assert retry_store.cancel(retrying) == "cancelled"

    rows = sql(store_config, "SELECT id, status, finished_at IS NOT NULL FROM steps ORDER BY id")
    assert rows == [(retrying, "cancelled", True), (queued, "cancelled", True)]
    assert retry_store.cancel(queued) == "cancelled"  # again: its final status
    wait_db_time_past(retry_store, available_at(store_config, retrying))
    assert retry_store.claim_steps("pod-a", batch=2) == []


@pytest.mark.timeout(30)
def test_cancelling_a_claimed_step_is_cooperative(
    store: Store, store_config: StoreConfig
) -> None:
    step_id = store.submit("default", {"n": 1})
    store.register_pod("pod-a")
    [step] = store.claim_steps("pod-a")
    assert store.heartbeat("pod-a").cancel_requested == ()

    assert store.cancel(step_id) == "cancel_requested"

    row = store.get_step(step_id)
    assert row is not None and (row.status, row.cancel_requested) == ("claimed", True)
    beat = store.heartbeat("pod-a")
    assert beat.alive and beat.cancel_requested == ((step_id, step.claim_token),)
    assert store.acknowledge_cancel(step_id, step.claim_token + 1) is WriteOutcome.LEASE_LOST
    assert store.acknowledge_cancel(step_id, step.claim_token) is WriteOutcome.ACCEPTED
    row = store.get_step(step_id)
    assert row is not None and (row.status, row.cancel_requested) == ("cancelled", False)
    assert attempt(store_config, step.claim_token)["outcome"] == "cancelled"
    assert store.heartbeat("pod-a").cancel_requested == ()
    assert store.complete(step_id, step.claim_token) is WriteOutcome.LEASE_LOST


@pytest.mark.timeout(30)
def test_cancelling_a_finished_step_returns_its_status_and_changes_nothing(
    store: Store, store_config: StoreConfig
) -> None:
    step_id = store.submit("default", {"n": 1})
    store.register_pod("pod-a")
    [step] = store.claim_steps("pod-a")
    store.complete(step.id, step.claim_token, {"r": 1})
    before = sql(store_config, "SELECT * FROM steps")

    assert store.cancel(step_id) == "completed"

    assert sql(store_config, "SELECT * FROM steps") == before
    with pytest.raises(StoreError, match="no step"):
        store.cancel(step_id + 1000)


# -- recovery -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_recovery_requeues_a_silent_pods_steps_with_backoff_or_dead_letters_them(
    retry_store: Store, store_config: StoreConfig
) -> None:
    store = retry_store
    dead_after = 1.0  # wide enough that the healthy pod's last beat never ages past it
    retry_ids = store.submit_many([StepSpec(payload={"n": i}, max_attempts=3) for i in range(2)])
    [last_chance] = store.submit_many([StepSpec(payload={"n": 2}, max_attempts=1)])
    [kept] = store.submit_many([StepSpec(payload={"n": 3})])
    store.register_pod("dying")
    lost = store.claim_steps("dying", batch=3)
    assert [s.id for s in lost] == [*retry_ids, last_chance]
    store.register_pod("healthy")
    [held] = store.claim_steps("healthy")
    assert held.id == kept
    lease = store.acquire_leadership("leader", ttl_s=30)
    assert lease is not None

    def dying_is_silent() -> bool:
        store.heartbeat("healthy")
        return any(p["id"] == "dying" and p["heartbeat_age_s"] > dead_after for p in store.pods())

    wait_for(dying_is_silent, 10, "the dying pod's heartbeat to age past dead_after")
    store.heartbeat("healthy")
    done = store.recover("leader", lease.term, dead_after)

    assert done.marked_dead == ("dying",)
    assert done.requeued == tuple(retry_ids)
    assert done.dead_lettered == (last_chance,)
    assert {p["id"]: p["state"] for p in store.pods()} == {"dying": "dead", "healthy": "alive"}
    actions = sql(store_config, "SELECT term, pod_id, action, target_pod, step_id, claim_token, at"
                                " FROM leader_actions ORDER BY action, step_id")
    tokens = {s.id: s.claim_token for s in lost}
    assert [a[:6] for a in actions] == [
        (lease.term, "leader", "dead_letter", "dying", last_chance, tokens[last_chance]),
        (lease.term, "leader", "mark_dead", "dying", None, None),
        *[(lease.term, "leader", "requeue", "dying", i, tokens[i]) for i in retry_ids],
    ]
    recovered_at = actions[0][6]
    for step_id in retry_ids:
        row = store.get_step(step_id)
        assert row is not None
        assert (row.status, row.attempts, row.claimed_by) == ("queued", 1, None)
        assert "dying" in (row.error or "")
        waited = seconds(available_at(store_config, step_id) - recovered_at)
        assert BASE_S * (1 - JITTER) - 1e-6 <= waited <= BASE_S + 1e-6
    rows = sql(store_config, "SELECT status, attempts, finished_at IS NOT NULL FROM steps"
                             " WHERE id = %(id)s", {"id": last_chance})
    assert rows == [("dead", 1, True)]
    for step in lost:
        lost_attempt = attempt(store_config, step.claim_token)
        assert lost_attempt["outcome"] == "lease_lost" and lost_attempt["finished_at"] is not None
    assert store.get_step(kept).claimed_by == "healthy"  # type: ignore[union-attr]

    # A second pass finds nothing more to do.
    assert store.recover("leader", lease.term, dead_after).requeued == ()
    assert sql(store_config, "SELECT count(*) FROM leader_actions") == [(4,)]

    # The requeued steps come back only once their backoff has passed.
    again = claim_all_when_due(store, store_config, "healthy", retry_ids)
    assert [s.attempts for s in again] == [1, 1]

    # The dead pod learns it is dead and claims nothing; registering again revives it.
    fresh = store.submit("default", {"n": 4})
    assert not store.heartbeat("dying").alive
    assert store.claim_steps("dying") == []
    assert store.register_pod("dying") == 0
    assert store.heartbeat("dying").alive
    assert {p["id"]: p["state"] for p in store.pods()}["dying"] == "alive"
    assert [s.id for s in store.claim_steps("dying")] == [fresh]


@pytest.mark.timeout(30)
def test_a_restarting_pod_gives_up_what_it_held(store: Store, store_config: StoreConfig) -> None:
    step_id = store.submit("default", {"n": 1})
    store.register_pod("pod-a")
    [step] = store.claim_steps("pod-a")

    assert store.register_pod("pod-a", incarnation=1) == 1

    row = store.get_step(step_id)
    assert row is not None and (row.status, row.attempts, row.claimed_by) == ("queued", 1, None)
    assert attempt(store_config, step.claim_token)["outcome"] == "lease_lost"
    assert not store.heartbeat("pod-a", incarnation=0).alive  # the old incarnation is fenced
    assert store.heartbeat("pod-a", incarnation=1).alive
    assert store.complete(step.id, step.claim_token) is WriteOutcome.LEASE_LOST


# -- idempotency keys ------------------------------------------------------------


@pytest.mark.timeout(30)
def test_the_same_key_twice_returns_the_first_step(store: Store, store_config: StoreConfig) -> None:
    first = store.submit("default", {"v": 1}, idempotency_key="k-1")
    again = store.submit("default", {"v": 2}, idempotency_key="k-1")
    in_batch = store.submit_many([StepSpec(payload={"v": 3}, idempotency_key="k-2"),
                                  StepSpec(payload={"v": 4}, idempotency_key="k-2")])
    between = store.submit_many([StepSpec(payload={"v": 5}, idempotency_key="k-2"),
                                 StepSpec(payload={"v": 6}, idempotency_key="k-1")])

    assert again == first
    assert in_batch[0] == in_batch[1]
    assert between == [in_batch[0], first]
    rows = sql(store_config, "SELECT idempotency_key, payload FROM steps ORDER BY id")
    assert rows == [("k-1", {"v": 1}), ("k-2", {"v": 3})]


@pytest.mark.timeout(30)
def test_a_mixed_batch_returns_ids_in_input_order(store: Store, store_config: StoreConfig) -> None:
    known = store.submit("default", {"i": -1}, idempotency_key="known")
    specs = [
        StepSpec(payload={"i": 0}, idempotency_key="new-a"),
        StepSpec(payload={"i": 1}),
        StepSpec(payload={"i": 2}, idempotency_key="known"),
        StepSpec(payload={"i": 3}),
        StepSpec(payload={"i": 4}, idempotency_key="new-a"),
        StepSpec("other", {"i": 5}, idempotency_key="new-b"),
        StepSpec(payload={"i": 6}),
    ]

    ids = store.submit_many(specs)

    assert ids[2] == known and ids[4] == ids[0]
    payload_of = {r[0]: r[1]["i"] for r in sql(store_config, "SELECT id, payload FROM steps")}
    assert [payload_of[i] for i in ids] == [0, 1, -1, 3, 0, 5, 6]
    assert len(payload_of) == 6  # known + new-a + two unkeyed + new-b + one more unkeyed


@pytest.mark.timeout(30)
def test_the_same_key_from_racing_submitters_makes_one_step(store_config: StoreConfig) -> None:
    ids: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def submitter(n: int) -> None:
        with Store(store_config) as own:
            own.ping()
            start.wait(20)
            got = own.submit("default", {"by": n}, idempotency_key="shared")
            with lock:
                ids.append(got)

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(ids) == 4 and len(set(ids)) == 1
    assert sql(store_config, "SELECT count(*) FROM steps") == [(1,)]


# -- bulk submit ----------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bounded", [False, True], ids=["plain", "max_length"])
def test_bulk_submit_of_ten_thousand_steps_returns_ids_in_order(
    store: Store, store_config: StoreConfig, bounded: bool
) -> None:
    if bounded:  # the locked path (queue with a max length) must keep the order too
        store.configure_queue(QueueConfig("bulk", max_length=10_000))
    specs = [StepSpec("bulk", {"n": n}, priority=n % 7) for n in range(10_000)]

    ids = store.submit_many(specs)

    assert len(ids) == 10_000
    rows = sql(store_config, "SELECT id, (payload->>'n')::int, priority FROM steps ORDER BY id")
    assert [r[0] for r in rows] == ids
    assert [(r[1], r[2]) for r in rows] == [(n, n % 7) for n in range(10_000)]
    assert store.queue_stats()["bulk"].queued == 10_000


@pytest.mark.timeout(30)
def test_a_cancel_requested_step_that_fails_or_is_released_ends_cancelled(store) -> None:  # type: ignore[no-untyped-def]
    first, second = store.submit_many([StepSpec(), StepSpec()])
    store.register_pod("pod-c")
    claimed = {c.id: c for c in store.claim_steps("pod-c", batch=2)}
    assert store.cancel(first) == "cancel_requested"
    assert store.cancel(second) == "cancel_requested"
    failed = store.fail(first, claimed[first].claim_token, "boom")
    assert failed.status == "cancelled"
    assert store.release(second, claimed[second].claim_token).value == "accepted"
    assert store.get_step(first).status == "cancelled"
    assert store.get_step(second).status == "cancelled"
    assert store.claim_steps("pod-c", batch=5) == []


@pytest.mark.timeout(60)
def test_bulk_submit_keeps_awkward_queue_names_and_payloads_intact(
    store: Store, store_config: StoreConfig
) -> None:
    """Large batches are copied (COPY's text format): its escapes must round-trip."""
    awkward = ["tab\there", "new\nline", "back\\slash", "ünïcode ✓", "cr\rlf", "\\N"]
    payloads = [
        {"text": "a\\b\tc\nd\re", "quote": '"q"', "null": None, "uni": "é☃\u2028", "n": n}
        for n in range(1200)
    ]
    specs = [StepSpec(awkward[n % len(awkward)], payloads[n], priority=-n, max_attempts=2)
             for n in range(1200)]

    ids = store.submit_many(specs)

    rows = sql(store_config, "SELECT id, queue, payload, priority, max_attempts FROM steps"
                             " ORDER BY id")
    assert [r[0] for r in rows] == ids
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [
        (s.queue, s.payload, s.priority, 2) for s in specs]
    assert sorted(store.queues()) == sorted(set(awkward))


def test_has_open_steps_until_every_step_is_finished(retry_store: Store) -> None:
    store = retry_store
    assert not store.has_open_steps()  # nothing submitted
    ok, bad = store.submit_many([StepSpec("default"), StepSpec("default", max_attempts=2)])
    assert store.has_open_steps()  # queued
    store.register_pod("pod-a")
    claimed = {s.id: s for s in store.claim_steps("pod-a", batch=2)}
    assert store.has_open_steps()  # claimed, none waiting
    store.complete(ok, claimed[ok].claim_token)
    store.fail(bad, claimed[bad].claim_token, "boom")
    assert store.has_open_steps()  # failed, waiting for its retry
    [retry] = wait_for(lambda: store.claim_steps("pod-a"), 10, "the retry")
    assert store.has_open_steps()  # claimed again
    store.fail(bad, retry.claim_token, "boom again")  # its last attempt: dead
    assert not store.has_open_steps()


@pytest.mark.timeout(60)
def test_the_run_summary_counts_unbacked_and_duplicate_completions_fast(
    store: Store, store_config: StoreConfig
) -> None:
    """Right after a run (no statistics on its attempts) the summary is quick and exact."""
    store.submit_many([StepSpec("default")] * 3000)
    store.analyze()  # as `fleetsim run` does: before the attempts exist
    store.register_pod("pod-a")
    while steps := store.claim_steps("pod-a", batch=500):
        store.complete_many([(s.id, s.claim_token, None) for s in steps])
    ok = store.run_summary()
    assert (ok["completed"], ok["completed_without_attempt"], ok["duplicate_completions"]) \
        == (3000, 0, 0)
    # Broken histories: one completion's attempt row gone, another's doubled.
    sql(store_config, "DELETE FROM finished_attempts WHERE step_id = 1")
    sql(store_config, "INSERT INTO finished_attempts SELECT * FROM finished_attempts"
                      " WHERE step_id = 2")
    started = time.monotonic()
    broken = store.run_summary()
    assert time.monotonic() - started < 5  # it took 10 s on 20,000 steps with NOT EXISTS
    assert (broken["completed_without_attempt"], broken["duplicate_completions"]) == (1, 1)
