"""Atomic claiming against a real PostgreSQL: racing processes, order, tokens."""

from __future__ import annotations

import random

import pytest

from fleetsim.store import QueueConfig, StepSpec, Store, StoreConfig
from tests.integration.claimers import Plan, run_claimers, sql


def attempts(config: StoreConfig) -> list[tuple[int, int, str]]:
    """Every recorded claim as (step id, claim token, pod), in token order."""
    return [
        (int(r[0]), int(r[1]), r[2])
        for r in sql(config, "SELECT step_id, claim_token, pod_id FROM step_attempts"
                             " ORDER BY claim_token")
    ]


def claimed_rows(config: StoreConfig) -> dict[int, tuple[str, str, int]]:
    """Step id -> (status, claimed_by, claim_token) for every step."""
    return {
        int(r[0]): (r[1], r[2], r[3])
        for r in sql(config, "SELECT id, status, claimed_by, claim_token FROM steps")
    }


@pytest.mark.timeout(120)
def test_two_processes_race_for_one_step_and_exactly_one_wins(
    store: Store, store_config: StoreConfig, seed: int
) -> None:
    [step_id] = store.submit_many([StepSpec(payload={"n": 1})])

    reports = run_claimers(store_config, [Plan(f"racer-{i}", seed=seed + i) for i in range(2)])

    winners = {pod: r.claims for pod, r in reports.items() if r.claims}
    assert len(winners) == 1, reports
    [(pod, [(claimed_id, token)])] = [(p, list(c)) for p, c in winners.items()]
    assert claimed_id == step_id
    assert attempts(store_config) == [(step_id, token, pod)]
    assert claimed_rows(store_config) == {step_id: ("claimed", pod, token)}


@pytest.mark.timeout(120)
def test_twenty_processes_claim_ten_steps_exactly_once(
    store: Store, store_config: StoreConfig, seed: int
) -> None:
    ids = store.submit_many([StepSpec(payload={"n": i}) for i in range(10)])

    plans = [Plan(f"claimer-{i:02d}", mode="until_empty", seed=seed + i) for i in range(20)]
    reports = run_claimers(store_config, plans)

    claims = [(sid, tok, pod) for pod, r in reports.items() for sid, tok in r.claims]
    assert len(claims) == 10
    assert sorted(sid for sid, _, _ in claims) == sorted(ids)
    assert len({tok for _, tok, _ in claims}) == 10
    # The rows agree with what the processes were told, claim for claim.
    assert attempts(store_config) == sorted(claims, key=lambda c: c[1])
    rows = claimed_rows(store_config)
    assert rows == {sid: ("claimed", pod, tok) for sid, tok, pod in claims}


@pytest.mark.timeout(120)
def test_five_processes_claiming_once_each_get_one_of_five_steps(
    store: Store, store_config: StoreConfig, seed: int
) -> None:
    ids = store.submit_many([StepSpec(payload={"n": i}) for i in range(5)])

    reports = run_claimers(
        store_config, [Plan(f"claimer-{i}", batch=1, seed=seed + i) for i in range(5)]
    )

    # SKIP LOCKED: a claimer passes over a row another is claiming, so none
    # comes back empty while steps remain.
    assert all(len(r.claims) == 1 for r in reports.values()), reports
    assert sorted(r.claims[0][0] for r in reports.values()) == ids
    recorded = attempts(store_config)
    assert len(recorded) == 5
    assert {pod for _, _, pod in recorded} == set(reports)
    assert {status for status, _, _ in claimed_rows(store_config).values()} == {"claimed"}


@pytest.mark.timeout(30)
def test_claims_take_the_oldest_step_first_by_priority_then_id(
    store: Store, store_config: StoreConfig, seed: int
) -> None:
    rng = random.Random(seed)
    priorities = [rng.choice([-5, 0, 0, 3, 10]) for _ in range(30)]
    ids = store.submit_many([StepSpec(payload={"n": i}, priority=p)
                             for i, p in enumerate(priorities)])
    expected = [i for _, i in sorted(zip(priorities, ids, strict=True))]
    store.register_pod("pod-a")

    first_batch = store.claim_steps("pod-a", batch=4)
    assert [s.id for s in first_batch] == expected[:4]
    assert [s.priority for s in first_batch] == sorted(s.priority for s in first_batch)
    one_by_one = []
    while got := store.claim_steps("pod-a"):
        one_by_one += [s.id for s in got]
    assert one_by_one == expected[4:]
    # The attempts were recorded in the same order.
    assert [sid for sid, _, _ in attempts(store_config)] == expected


@pytest.mark.timeout(30)
def test_claims_across_queues_follow_priority_then_id(store: Store) -> None:
    a = store.submit("qa", {"n": 1}, priority=5)
    b = store.submit("qb", {"n": 2}, priority=1)
    c = store.submit("qa", {"n": 3}, priority=1)
    d = store.submit("qc", {"n": 4}, priority=0)  # not asked for: never returned
    store.register_pod("pod-a")

    got = store.claim_steps("pod-a", ["qa", "qb"], batch=10)

    assert [s.id for s in got] == [b, c, a]
    assert store.get_step(d).status == "queued"  # type: ignore[union-attr]


@pytest.mark.timeout(30)
def test_claim_tokens_strictly_increase(store: Store, store_config: StoreConfig) -> None:
    store.configure_queue(QueueConfig("limited", concurrency_limit=3))
    store.configure_queue(QueueConfig("fifo", strict_fifo=True))
    for name in ("plain", "limited", "fifo"):
        store.submit_many([StepSpec(name, {"n": i}) for i in range(6)])
    store.register_pod("pod-a")

    tokens: list[int] = []
    for _ in range(3):
        for name in ("plain", "limited", "fifo"):
            for step in store.claim_steps("pod-a", [name], batch=2):
                tokens.append(step.claim_token)
                store.complete(step.id, step.claim_token)

    assert len(tokens) == 18
    assert tokens == sorted(set(tokens))  # strictly increasing: no repeats, no going back
    assert [tok for _, tok, _ in attempts(store_config)] == tokens


@pytest.mark.timeout(30)
def test_only_a_registered_alive_pod_can_claim(store: Store, store_config: StoreConfig) -> None:
    store.submit("default", {"n": 1})

    assert store.claim_steps("stranger") == []
    store.register_pod("pod-a")
    store.stop_pod("pod-a")
    assert store.claim_steps("pod-a") == []
    assert attempts(store_config) == []

    store.register_pod("pod-a")
    assert len(store.claim_steps("pod-a")) == 1
