"""The leader lease against a real PostgreSQL: one holder, terms, expiry, fencing."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from datetime import datetime
from itertools import pairwise
from typing import Any

import psycopg2
import pytest

from fleetsim.errors import NotLeader
from fleetsim.store import Lease, StepSpec, Store, StoreConfig
from fleetsim.store import queries as q
from fleetsim.store.store import _CLAIM
from tests.integration.claimers import sql, wait_db_time_past, wait_for


def lease_expiry(config: StoreConfig) -> datetime:
    """The lease row's expires_at."""
    value: datetime = sql(config, "SELECT expires_at FROM leader_lease WHERE id = 1")[0][0]
    return value


def terms(config: StoreConfig) -> list[tuple[int, str, datetime, datetime, datetime | None]]:
    """Every leader term as (term, pod, started_at, expires_at, ended_at)."""
    return [
        tuple(r)  # type: ignore[misc]
        for r in sql(config, "SELECT term, pod_id, started_at, expires_at, ended_at"
                             " FROM leader_terms ORDER BY term")
    ]


def assert_terms_never_overlap(config: StoreConfig) -> None:
    """Each term starts at or after the previous one's end (or last expiry)."""
    rows = terms(config)
    for (_, _, _, prev_expires, prev_ended), (_, _, started, _, _) in pairwise(rows):
        assert started >= (prev_ended or prev_expires), rows


def assert_actions_inside_their_terms(config: StoreConfig) -> None:
    """Invariant 4: every leader action lies inside a valid term of its taker, in DB time."""
    rows = terms(config)
    by_term = {r[0]: r for r in rows}
    next_start = {a[0]: b[2] for a, b in pairwise(rows)}
    for term, pod, action, at in sql(
        config, "SELECT term, pod_id, action, at FROM leader_actions ORDER BY id"
    ):
        _, holder, started, expires, ended = by_term[term]
        assert holder == pod, (term, pod, action)
        assert started <= at <= (ended or expires), (
            f"{action} by {pod} at {at} outside term {term} [{started}, {ended or expires}]"
        )
        assert term not in next_start or at < next_start[term], (term, action, at)


@pytest.mark.timeout(30)
def test_exactly_one_of_several_candidates_becomes_leader(
    store: Store, store_config: StoreConfig
) -> None:
    won: list[Lease | None] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def candidate(n: int) -> None:
        with Store(store_config) as own:
            own.ping()  # connect before the race
            start.wait(20)
            lease = own.acquire_leadership(f"cand-{n}", ttl_s=30)
            with lock:
                won.append(lease)

    threads = [threading.Thread(target=candidate, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)

    leases = [lease for lease in won if lease is not None]
    assert len(won) == 6 and len(leases) == 1
    [lease] = leases
    assert lease.term == 1
    current = store.current_leader()
    assert current is not None and (current.holder, current.term) == (lease.holder, lease.term)
    assert [(t, p) for t, p, *_ in terms(store_config)] == [(1, lease.holder)]


@pytest.mark.timeout(30)
def test_an_expired_lease_passes_to_the_next_candidate_with_the_next_term(
    store: Store, store_config: StoreConfig
) -> None:
    first = store.acquire_leadership("pod-a", ttl_s=0.5)
    assert first is not None and 0 < first.expires_in_s <= 0.5
    assert store.acquire_leadership("pod-b", ttl_s=0.5) is None
    assert store.acquire_leadership("pod-a", ttl_s=0.5) is None  # no second term while held

    wait_db_time_past(store, lease_expiry(store_config))
    assert store.current_leader() is None
    second = store.acquire_leadership("pod-b", ttl_s=5)

    assert second is not None and second.term == first.term + 1
    assert store.renew_leadership("pod-a", first.term, ttl_s=5) is None
    assert store.current_leader().holder == "pod-b"  # type: ignore[union-attr]
    rows = terms(store_config)
    assert [(t, p) for t, p, *_ in rows] == [(first.term, "pod-a"), (second.term, "pod-b")]
    assert_terms_never_overlap(store_config)


@pytest.mark.timeout(30)
def test_renewing_extends_the_lease_and_keeps_others_out(
    store: Store, store_config: StoreConfig
) -> None:
    lease = store.acquire_leadership("pod-a", ttl_s=0.5)
    assert lease is not None
    renewed = store.renew_leadership("pod-a", lease.term, ttl_s=30)
    assert renewed is not None and renewed.term == lease.term and renewed.expires_in_s > 25

    assert store.acquire_leadership("pod-b", ttl_s=1) is None
    assert store.renew_leadership("pod-b", lease.term, ttl_s=30) is None
    assert store.renew_leadership("pod-a", lease.term + 1, ttl_s=30) is None
    [(_, _, _, expires, ended)] = terms(store_config)
    assert expires == lease_expiry(store_config) and ended is None


@pytest.mark.timeout(30)
def test_release_lets_another_candidate_acquire_at_once(
    store: Store, store_config: StoreConfig
) -> None:
    lease = store.acquire_leadership("pod-a", ttl_s=30)
    assert lease is not None

    assert store.release_leadership("pod-a", lease.term)
    assert store.current_leader() is None
    nxt = store.acquire_leadership("pod-b", ttl_s=30)

    assert nxt is not None and nxt.term == lease.term + 1
    assert not store.release_leadership("pod-a", lease.term)  # not ours any more
    assert store.current_leader().holder == "pod-b"  # type: ignore[union-attr]
    first = terms(store_config)[0]
    assert first[4] is not None  # ended_at recorded on release
    assert_terms_never_overlap(store_config)


def _leave_a_silent_pod_with_a_claim(store: Store) -> int:
    store.submit_many([StepSpec(payload={"n": 1})])
    store.register_pod("victim")
    [step] = store.claim_steps("victim")
    return step.id


def _world(config: StoreConfig) -> list[Any]:
    return [
        sql(config, "SELECT id, status FROM pods ORDER BY id"),
        sql(config, "SELECT id, status, attempts, claimed_by, claim_token FROM steps"),
        sql(config, "SELECT count(*) FROM leader_actions"),
    ]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["expired", "superseded", "never_held"])
def test_a_stale_leader_can_neither_recover_nor_act(
    store: Store, store_config: StoreConfig, how: str
) -> None:
    _leave_a_silent_pod_with_a_claim(store)
    lease = store.acquire_leadership("old", ttl_s=0.3)
    assert lease is not None
    wait_db_time_past(store, lease_expiry(store_config))
    term = lease.term
    if how == "superseded":
        assert store.acquire_leadership("new", ttl_s=30) is not None
    elif how == "never_held":
        term = lease.term + 7
    before = _world(store_config)

    with pytest.raises(NotLeader):
        store.recover("old", term, dead_after_s=0.0)
    with pytest.raises(NotLeader), store.leader_transaction("old", term) as tx:
        tx.mark_pod_dead("victim")
        raise AssertionError("the fenced block ran")

    assert _world(store_config) == before
    assert before[2] == [(0,)]


@pytest.mark.timeout(30)
def test_the_current_leader_recovers_and_logs_under_its_term(
    store: Store, store_config: StoreConfig
) -> None:
    step_id = _leave_a_silent_pod_with_a_claim(store)
    lease = store.acquire_leadership("boss", ttl_s=30)
    assert lease is not None

    done = store.recover("boss", lease.term, dead_after_s=0.0)

    assert done.marked_dead == ("victim",)
    assert done.requeued == (step_id,)
    rows = sql(store_config, "SELECT term, pod_id, action, target_pod, step_id FROM leader_actions"
                             " ORDER BY id")
    assert sorted(rows, key=str) == sorted(
        [(lease.term, "boss", "mark_dead", "victim", None),
         (lease.term, "boss", "requeue", "victim", step_id)], key=str)
    assert_actions_inside_their_terms(store_config)


@pytest.mark.timeout(30)
def test_a_leader_action_never_lands_after_its_term_expired(
    store: Store, store_config: StoreConfig
) -> None:
    """A leader that passed the fence, then stalled past its expiry, must not act.

    This is the paused-leader case: the transaction's opening check succeeded,
    the lease then ran out in DB time, and a new candidate arrived while the
    old leader's transaction was still open.
    """
    store.register_pod("victim")
    lease = store.acquire_leadership("old", ttl_s=0.3)
    assert lease is not None
    app = f"cand-{store_config.schema}"
    candidate_config = dataclasses.replace(store_config, application_name=app)
    candidate_leases: list[Lease | None] = []

    with Store(candidate_config) as candidate:
        candidate.ping()
        thread = threading.Thread(
            target=lambda: candidate_leases.append(candidate.acquire_leadership("new", 30))
        )
        with contextlib.suppress(NotLeader), store.leader_transaction("old", lease.term) as tx:
            wait_db_time_past(store, lease_expiry(store_config))
            thread.start()
            # The candidate's acquire is now waiting on the lease row we share-lock.
            wait_for(
                lambda: sql(store_config,
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE application_name = %(app)s AND wait_event_type = 'Lock'",
                            {"app": app})[0][0],
                10, "the candidate to block on the lease row",
            )
            tx.mark_pod_dead("victim")
        thread.join(10)

    assert [lease is not None for lease in candidate_leases] == [True]
    assert_terms_never_overlap(store_config)
    assert_actions_inside_their_terms(store_config)
    assert sql(store_config, "SELECT status FROM pods WHERE id = 'victim'") == [("alive",)]


@pytest.mark.timeout(30)
def test_recovery_does_not_wait_for_a_claim_in_flight_and_sweeps_it_once_it_ends(
    store: Store, store_config: StoreConfig
) -> None:
    """A claim in flight holds its pod's row FOR SHARE. Recovery skips that pod
    rather than wait (its claimer may be frozen mid-transaction, and every
    other pod's recovery would wait too), then marks it and sweeps the claim.
    """
    (step_id,) = store.submit_many([StepSpec(payload={"n": 1})])
    store.register_pod("victim")
    store.register_pod("silent")
    lease = store.acquire_leadership("boss", ttl_s=30)
    assert lease is not None
    passes = []
    # The victim's claim, as the store runs it, but held open (not committed).
    claim = psycopg2.connect(store_config.url, options=f"-c search_path={store_config.schema}")
    try:
        with claim.cursor() as cur:
            cur.execute(_CLAIM.prepare)
            cur.execute(_CLAIM.execute_py,
                        {"queues": ["default"], "pod": "victim", "batch": 1, "incarnation": 0})
            assert [row[0] for row in cur.fetchall()] == [step_id]
            thread = threading.Thread(
                target=lambda: passes.append(store.recover("boss", lease.term, 0.0))
            )
            thread.start()
            thread.join(5)
            assert not thread.is_alive(), "recovery waited for the claim in flight"
        claim.commit()
    finally:
        claim.close()

    # The first pass marked the other silent pod and left the victim alone...
    (first,) = passes
    assert first.marked_dead == ("silent",)
    assert first.requeued == ()
    # ... and the next one marks the victim and sweeps its committed claim.
    second = store.recover("boss", lease.term, dead_after_s=0.0)
    assert second.marked_dead == ("victim",)
    assert second.requeued == (step_id,)
    # A pod marked in a pass is swept once more by the next, then never again.
    assert store.recover("boss", lease.term, dead_after_s=0.0).requeued == ()
    assert sql(store_config, "SELECT swept_at IS NOT NULL FROM pods WHERE id = 'victim'") == [
        (True,)]


@pytest.mark.timeout(30)
def test_an_acquire_that_waited_for_a_release_starts_after_it(
        store: Store, store_config: StoreConfig) -> None:
    """An acquire that began while another pod's acquire was committing, and
    that waited for it, found the lease already released when it woke: its
    term must start after that release ended, not when its statement began.

    Found by a short fleet run: pod-1's first term lasted 9 ms (acquired,
    then released at shutdown) while pod-2's acquire, begun in between,
    waited and won; its term was stamped 1 ms before term 1's end and the
    checker saw split brain. Here pod-1's acquire and release run in one
    transaction, which leaves the row in the same states for the waiter.
    """
    holder = psycopg2.connect(store_config.url,
                              options=f"-c search_path={store_config.schema}")
    try:
        with holder.cursor() as cur:
            cur.execute(psycopg2_style(q.ACQUIRE_LEASE), {"pod": "pod-1", "ttl": 30.0})
            ((term, _),) = cur.fetchall()
            acquired: list[Lease | None] = []
            waiter = threading.Thread(
                target=lambda: acquired.append(store.acquire_leadership("pod-2", ttl_s=30)))
            waiter.start()  # pod-2's acquire sees the lease free and waits for the row
            wait_for(lambda: sql(store_config,
                                 "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                 " AND query LIKE '%%leader_lease%%'"), 10, "the acquire waiting")
            cur.execute(psycopg2_style(q.RELEASE_LEASE), {"pod": "pod-1", "term": term})
            assert cur.fetchall() == [(term,)]
        holder.commit()
        waiter.join(10)
    finally:
        holder.close()
    assert acquired and acquired[0] is not None and acquired[0].term == term + 1
    assert_terms_never_overlap(store_config)


def psycopg2_style(statement: str) -> str:
    """A store statement's ``:name`` parameters as psycopg2's ``%(name)s``."""
    return re.sub(r"(?<!:):(\w+)", r"%(\1)s", statement)
