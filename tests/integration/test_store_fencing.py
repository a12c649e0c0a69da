"""Fenced writes against a real PostgreSQL: a superseded claim token changes nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from fleetsim.store import (
    ClaimedStep,
    RetryPolicy,
    StepSpec,
    Store,
    StoreConfig,
    WriteOutcome,
)
from tests.integration.claimers import sql, wait_for


@pytest.fixture
def fast_store(store_config: StoreConfig) -> Iterator[Store]:
    """A store whose retries come back after 20-40 ms."""
    config = dataclasses.replace(store_config, retry=RetryPolicy(0.04, 1.0, 0.5))
    with Store(config) as s:
        yield s


def step_row(config: StoreConfig, step_id: int) -> tuple[Any, ...]:
    """The whole ``steps`` row."""
    return tuple(sql(config, "SELECT * FROM steps WHERE id = %(id)s", {"id": step_id})[0])


def attempt_row(config: StoreConfig, token: int) -> tuple[Any, ...]:
    """(step id, pod, outcome, finished?, rejected?) of one attempt."""
    return tuple(sql(
        config,
        "SELECT step_id, pod_id, outcome, finished_at IS NOT NULL, rejected_at IS NOT NULL"
        " FROM step_attempts WHERE claim_token = %(t)s",
        {"t": token},
    )[0])


def supersede(store: Store) -> tuple[ClaimedStep, ClaimedStep]:
    """pod-a claims a step, is declared dead, the leader requeues it, pod-b claims it."""
    store.submit_many([StepSpec(payload={"n": 1}, max_attempts=5)])
    store.register_pod("pod-a")
    [old] = store.claim_steps("pod-a")
    lease = store.acquire_leadership("leader", ttl_s=30)
    assert lease is not None
    with store.leader_transaction("leader", lease.term) as tx:
        assert tx.mark_pod_dead("pod-a")
    assert store.recover("leader", lease.term, dead_after_s=60).requeued == (old.id,)
    store.register_pod("pod-b")
    [new] = wait_for(lambda: store.claim_steps("pod-b"), 10, "the requeued step")
    assert (new.id, new.attempts) == (old.id, 1)
    assert new.claim_token > old.claim_token
    return old, new


STALE_WRITES = {
    "complete": lambda s, step: s.complete(step.id, step.claim_token, {"late": True}),
    "fail": lambda s, step: s.fail(step.id, step.claim_token, "late failure").outcome,
    "release": lambda s, step: s.release(step.id, step.claim_token),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("write", sorted(STALE_WRITES))
def test_a_superseded_token_is_refused_and_changes_nothing(
    fast_store: Store, store_config: StoreConfig, write: str
) -> None:
    old, new = supersede(fast_store)
    before = step_row(store_config, old.id)

    assert STALE_WRITES[write](fast_store, old) is WriteOutcome.LEASE_LOST

    assert step_row(store_config, old.id) == before
    step = fast_store.get_step(old.id)
    assert step is not None
    assert (step.status, step.claimed_by, step.claim_token, step.result, step.attempts) == (
        "claimed", "pod-b", new.claim_token, None, 1
    )
    # The history shows the refused late write against the old attempt only.
    assert attempt_row(store_config, old.claim_token) == (old.id, "pod-a", "lease_lost", True, True)
    assert attempt_row(store_config, new.claim_token) == (old.id, "pod-b", None, False, False)
    # The new owner is unaffected.
    assert fast_store.complete(new.id, new.claim_token, {"ok": 1}) is WriteOutcome.ACCEPTED
    assert fast_store.get_step(new.id).result == {"ok": 1}  # type: ignore[union-attr]


@pytest.mark.timeout(30)
def test_a_late_write_after_the_new_owner_completed_keeps_its_result(
    fast_store: Store, store_config: StoreConfig
) -> None:
    old, new = supersede(fast_store)
    assert fast_store.complete(new.id, new.claim_token, {"by": "b"}) is WriteOutcome.ACCEPTED
    before = step_row(store_config, old.id)

    assert fast_store.complete(old.id, old.claim_token, {"by": "a"}) is WriteOutcome.LEASE_LOST
    assert fast_store.fail(old.id, old.claim_token, "x").outcome is WriteOutcome.LEASE_LOST
    assert fast_store.release(old.id, old.claim_token) is WriteOutcome.LEASE_LOST

    assert step_row(store_config, old.id) == before
    assert fast_store.get_step(old.id).result == {"by": "b"}  # type: ignore[union-attr]
    assert sql(store_config, "SELECT count(*) FROM step_attempts WHERE outcome = 'completed'"
                             " AND rejected_at IS NULL") == [(1,)]


@pytest.mark.timeout(30)
def test_a_batch_write_accepts_current_tokens_and_refuses_stale_ones(
    fast_store: Store, store_config: StoreConfig
) -> None:
    old, _ = supersede(fast_store)
    other_id = fast_store.submit("default", {"n": 2})
    [other] = fast_store.claim_steps("pod-b")
    assert other.id == other_id

    accepted = fast_store.complete_many(
        [(old.id, old.claim_token, "stale"), (other.id, other.claim_token, "fresh")]
    )

    assert accepted == {other.id}
    assert fast_store.get_step(old.id).status == "claimed"  # type: ignore[union-attr]
    assert fast_store.get_step(other.id).result == "fresh"  # type: ignore[union-attr]
    assert attempt_row(store_config, old.claim_token)[4] is True


@pytest.mark.timeout(30)
def test_a_token_of_another_step_is_refused(store: Store, store_config: StoreConfig) -> None:
    store.submit_many([StepSpec(payload={"n": i}) for i in range(2)])
    store.register_pod("pod-a")
    first, second = store.claim_steps("pod-a", batch=2)
    before = step_row(store_config, first.id)

    assert store.complete(first.id, second.claim_token) is WriteOutcome.LEASE_LOST
    assert store.fail(first.id, second.claim_token, "x").outcome is WriteOutcome.LEASE_LOST
    assert store.release(first.id, second.claim_token) is WriteOutcome.LEASE_LOST
    assert store.acknowledge_cancel(first.id, second.claim_token) is WriteOutcome.LEASE_LOST

    assert step_row(store_config, first.id) == before
    assert store.complete(first.id, first.claim_token) is WriteOutcome.ACCEPTED
