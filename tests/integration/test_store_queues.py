"""Queues against a real PostgreSQL: strict FIFO, concurrency limits, max length, pause."""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Callable

import psycopg2
import psycopg2.extensions
import pytest

from fleetsim.errors import QueueFull, StoreError
from fleetsim.store import ClaimedStep, QueueConfig, StepSpec, Store, StoreConfig
from fleetsim.store.store import _CLAIM
from tests.integration.claimers import Plan, run_claimers, sql, wait_for


def first_claims_in_token_order(config: StoreConfig, queue: str) -> list[int]:
    """The step ids of each step's first claim, in claim-token order."""
    rows = sql(
        config,
        """
        SELECT a.step_id FROM step_attempts a JOIN steps s ON s.id = a.step_id
         WHERE s.queue = %(queue)s
           AND a.claim_token = (SELECT min(b.claim_token) FROM step_attempts b
                                 WHERE b.step_id = a.step_id)
         ORDER BY a.claim_token
        """,
        {"queue": queue},
    )
    return [int(r[0]) for r in rows]


def max_running(config: StoreConfig, queue: str) -> int:
    """Max over claim instants t of the queue's attempts with claimed_at <= t < finished_at."""
    rows = sql(
        config,
        """
        WITH a AS (
            SELECT a.claimed_at, a.finished_at FROM step_attempts a
              JOIN steps s ON s.id = a.step_id WHERE s.queue = %(queue)s
        )
        SELECT coalesce(max((SELECT count(*) FROM a b
                              WHERE b.claimed_at <= t.claimed_at
                                AND (b.finished_at IS NULL OR t.claimed_at < b.finished_at))), 0)
          FROM a t
        """,
        {"queue": queue},
    )
    return int(rows[0][0])


def completions_per_step(config: StoreConfig, queue: str) -> dict[int, int]:
    """Step id -> number of attempts that completed it."""
    rows = sql(
        config,
        """
        SELECT s.id, count(a.claim_token) FILTER (WHERE a.outcome = 'completed')
          FROM steps s LEFT JOIN step_attempts a ON a.step_id = s.id
         WHERE s.queue = %(queue)s GROUP BY s.id
        """,
        {"queue": queue},
    )
    return {int(r[0]): int(r[1]) for r in rows}


def counts_from_rows(config: StoreConfig) -> dict[tuple[str, str], int]:
    """(queue, status) -> count, straight from ``steps``."""
    rows = sql(config, "SELECT queue, status, count(*) FROM steps GROUP BY queue, status")
    return {(r[0], r[1]): int(r[2]) for r in rows}


def assert_stats_match_rows(store: Store, config: StoreConfig) -> None:
    """queue_stats() and status_counts() agree with ``SELECT count(*) ... GROUP BY``."""
    by_queue = counts_from_rows(config)
    for name, stats in store.queue_stats().items():
        counts = {status: n for (q, status), n in by_queue.items() if q == name}
        for status in ("queued", "claimed", "completed", "failed", "dead", "cancelled"):
            assert getattr(stats, status) == counts.get(status, 0), (name, status, stats)
        assert stats.depth == counts.get("queued", 0) + counts.get("failed", 0)
    overall = sql(config, "SELECT status, count(*) FROM steps GROUP BY status")
    assert {k: v for k, v in store.status_counts().items() if v} == {
        r[0]: int(r[1]) for r in overall
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("steps", "release_rate", "fail_rate"), [(10, 0.0, 0.0), (1000, 0.03, 0.02)]
)
def test_strict_fifo_with_concurrency_one_claims_in_submission_order(
    store: Store, store_config: StoreConfig, seed: int,
    steps: int, release_rate: float, fail_rate: float,
) -> None:
    store.configure_queue(QueueConfig("fifo", concurrency_limit=1, strict_fifo=True))
    rng = random.Random(seed)
    # Priorities are ignored by a strict FIFO queue: only submission order counts.
    ids = store.submit_many(
        [StepSpec("fifo", {"n": i}, priority=rng.randint(-3, 3), max_attempts=5)
         for i in range(steps)]
    )

    plans = [
        Plan(f"fifo-{i}", "fifo", "drain", batch=rng.randint(1, 3), seed=seed + i,
             release_rate=release_rate, fail_rate=fail_rate, watch=steps <= 10)
        for i in range(3)
    ]
    reports = run_claimers(store_config, plans)

    assert first_claims_in_token_order(store_config, "fifo") == ids
    assert completions_per_step(store_config, "fifo") == dict.fromkeys(ids, 1)
    assert max_running(store_config, "fifo") == 1
    assert all(r.max_claimed_seen <= 1 for r in reports.values())
    assert sum(len(r.completed) for r in reports.values()) == steps
    assert store.queue_stats()["fifo"].completed == steps


@pytest.mark.timeout(120)
def test_concurrency_limit_is_never_exceeded(
    store: Store, store_config: StoreConfig, seed: int
) -> None:
    store.configure_queue(QueueConfig("limited", concurrency_limit=5))
    ids = store.submit_many([StepSpec("limited", {"n": i}) for i in range(1000)])
    rng = random.Random(seed)

    plans = [
        Plan(f"lim-{i}", "limited", "drain", batch=rng.randint(1, 3), seed=seed + i, watch=True)
        for i in range(5)
    ]
    reports = run_claimers(store_config, plans)

    running = max_running(store_config, "limited")
    assert 1 < running <= 5  # the claimers really overlapped, and never beyond the limit
    assert all(1 <= r.max_claimed_seen <= 5 for r in reports.values()), reports
    assert completions_per_step(store_config, "limited") == dict.fromkeys(ids, 1)
    assert store.queue_stats()["limited"].completed == 1000


@pytest.mark.timeout(120)
def test_three_queues_stay_independent(
    store: Store, store_config: StoreConfig, seed: int
) -> None:
    store.configure_queue(QueueConfig("beta", strict_fifo=True))
    store.configure_queue(QueueConfig("gamma", concurrency_limit=2))
    ids = {
        name: store.submit_many([StepSpec(name, {"q": name, "n": i}) for i in range(50)])
        for name in ("alpha", "beta", "gamma")
    }

    plans = [Plan(f"pod-{name}", name, "drain", batch=2, seed=seed) for name in ids]
    reports = run_claimers(store_config, plans)

    for name, queue_ids in ids.items():
        report = reports[f"pod-{name}"]
        assert sorted(sid for sid, _ in report.claims) == queue_ids
        assert sorted(report.completed) == queue_ids
        stats = store.queue_stats()[name]
        assert (stats.completed, stats.depth, stats.claimed) == (50, 0, 0)
    assert max_running(store_config, "gamma") <= 2
    assert first_claims_in_token_order(store_config, "beta") == ids["beta"]
    assert_stats_match_rows(store, store_config)


@pytest.mark.timeout(60)
def test_claiming_one_queue_never_returns_another_and_stats_follow(
    store: Store, store_config: StoreConfig, seed: int
) -> None:
    store.configure_queue(QueueConfig("gamma", concurrency_limit=4))
    names = ("alpha", "beta", "gamma")
    ids = {n: set(store.submit_many([StepSpec(n, {"n": i}) for i in range(50)])) for n in names}
    store.register_pod("pod-a")
    rng = random.Random(seed)

    for _ in range(60):
        name = rng.choice(names)
        for step in store.claim_steps("pod-a", [name], batch=rng.randint(1, 4)):
            assert step.queue == name
            assert step.id in ids[name]
            action = rng.random()
            if action < 0.5:
                store.complete(step.id, step.claim_token)
            elif action < 0.6:
                store.fail(step.id, step.claim_token, "boom")
            elif action < 0.7:
                store.cancel(step.id)
            # else: left claimed
        assert_stats_match_rows(store, store_config)
    assert store.queue_stats()["gamma"].claimed <= 4


@pytest.mark.timeout(60)
def test_cancelled_positions_of_a_fifo_queue_are_skipped_and_the_rest_keep_order(
    store: Store, store_config: StoreConfig, seed: int
) -> None:
    store.configure_queue(QueueConfig("fifo", concurrency_limit=1, strict_fifo=True))
    ids = store.submit_many([StepSpec("fifo", {"n": i}) for i in range(10)])
    cancelled = sorted(random.Random(seed).sample(ids, 3))
    for step_id in cancelled:
        assert store.cancel(step_id) == "cancelled"
    store.register_pod("pod-a")

    order = []
    while got := store.claim_steps("pod-a", ["fifo"], batch=3):
        assert len(got) == 1  # concurrency 1
        order.append(got[0].id)
        store.complete(got[0].id, got[0].claim_token)

    assert order == [i for i in ids if i not in cancelled]
    assert first_claims_in_token_order(store_config, "fifo") == order
    rows = sql(store_config, "SELECT id, status, finished_at IS NOT NULL FROM steps"
                             " WHERE id = ANY(%(ids)s) ORDER BY id", {"ids": cancelled})
    assert rows == [(i, "cancelled", True) for i in cancelled]
    assert sql(store_config, "SELECT count(*) FROM step_attempts WHERE step_id = ANY(%(ids)s)",
               {"ids": cancelled}) == [(0,)]


@pytest.mark.timeout(60)
def test_a_full_queue_rejects_the_whole_batch_with_a_clear_error(
    store: Store, store_config: StoreConfig
) -> None:
    store.configure_queue(QueueConfig("bounded", max_length=10))
    store.submit_many([StepSpec("bounded", {"n": i}) for i in range(8)])

    with pytest.raises(QueueFull) as raised:
        store.submit_many([StepSpec("bounded", {"n": 100 + i}) for i in range(5)])
    message = str(raised.value)
    assert "'bounded'" in message and "10" in message and "\n" not in message
    assert (raised.value.queue, raised.value.max_length) == ("bounded", 10)
    # A batch that also targets an unlimited queue is refused as a whole too.
    with pytest.raises(QueueFull):
        store.submit_many([StepSpec("free", {"n": 0})]
                          + [StepSpec("bounded", {"n": i}) for i in range(3)])
    assert counts_from_rows(store_config) == {("bounded", "queued"): 8}
    assert_stats_match_rows(store, store_config)

    store.submit_many([StepSpec("bounded", {"n": 8}), StepSpec("bounded", {"n": 9})])
    with pytest.raises(QueueFull, match="bounded"):
        store.submit("bounded", {"n": 10})
    # Claimed steps are no longer waiting: a slot opens.
    store.register_pod("pod-a")
    [step] = store.claim_steps("pod-a", ["bounded"])
    store.submit("bounded", {"n": 11})
    with pytest.raises(QueueFull):
        store.submit("bounded", {"n": 12})
    assert counts_from_rows(store_config) == {("bounded", "queued"): 10,
                                              ("bounded", "claimed"): 1}
    assert store.queue_stats()["bounded"].depth == 10
    assert_stats_match_rows(store, store_config)
    assert step.id == min(r[0] for r in sql(store_config, "SELECT id FROM steps"))


@pytest.mark.timeout(60)
def test_concurrent_submitters_never_push_a_queue_past_its_max_length(
    store_config: StoreConfig,
) -> None:
    with Store(store_config) as admin:
        admin.configure_queue(QueueConfig("bounded", max_length=20))
    accepted: list[int] = []
    refused: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def submitter(n: int) -> None:
        with Store(store_config) as store:
            start.wait(30)
            for i in range(10):
                try:
                    store.submit("bounded", {"by": n, "i": i})
                    outcome = accepted
                except QueueFull:
                    outcome = refused
                with lock:
                    outcome.append(n)

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert (len(accepted), len(refused)) == (20, 20)
    assert sql(store_config, "SELECT count(*) FROM steps WHERE queue = 'bounded'") == [(20,)]


@pytest.mark.timeout(30)
def test_resubmitting_a_known_key_to_a_full_queue_returns_the_first_step(
    store: Store, store_config: StoreConfig
) -> None:
    store.configure_queue(QueueConfig("bounded", max_length=3))
    first = store.submit("bounded", {"n": 0}, idempotency_key="k-0")
    store.submit_many([StepSpec("bounded", {"n": i}) for i in (1, 2)])

    assert store.submit("bounded", {"n": 0}, idempotency_key="k-0") == first
    assert sql(store_config, "SELECT count(*) FROM steps") == [(3,)]


@pytest.mark.timeout(30)
def test_a_key_repeated_in_one_batch_counts_once_against_max_length(
    store: Store, store_config: StoreConfig
) -> None:
    store.configure_queue(QueueConfig("bounded", max_length=3))
    store.submit_many([StepSpec("bounded", {"n": i}) for i in (1, 2)])

    # Two specs, one key: one new step, which fits in the last slot.
    ids = store.submit_many([StepSpec("bounded", {"n": 3}, idempotency_key="k"),
                             StepSpec("bounded", {"n": 3}, idempotency_key="k")])

    assert ids[0] == ids[1]
    assert sql(store_config, "SELECT count(*) FROM steps") == [(3,)]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "config",
    [QueueConfig("q"), QueueConfig("q", concurrency_limit=2), QueueConfig("q", strict_fifo=True)],
    ids=["plain", "limited", "fifo"],
)
def test_a_paused_queue_yields_no_claims_until_resumed(
    store: Store, store_config: StoreConfig, config: QueueConfig
) -> None:
    store.configure_queue(config)
    ids = store.submit_many([StepSpec("q", {"n": i}) for i in range(3)])
    store.register_pod("pod-a")

    store.set_queue_paused("q", True)
    assert store.queues()["q"].paused
    assert store.claim_steps("pod-a", ["q"], batch=3) == []
    assert sql(store_config, "SELECT count(*) FROM step_attempts") == [(0,)]
    assert store.queue_stats()["q"].queued == 3

    store.set_queue_paused("q", False)
    got = store.claim_steps("pod-a", ["q"], batch=1)
    assert [s.id for s in got] == ids[:1]

    # configure_queue(paused=True) pauses too, with claimed work left alone.
    store.configure_queue(QueueConfig(config.name, config.concurrency_limit, None,
                                      config.strict_fifo, paused=True))
    assert store.claim_steps("pod-a", ["q"], batch=3) == []
    assert store.queue_stats()["q"].claimed == 1


@pytest.mark.timeout(30)
def test_pausing_an_unknown_queue_is_an_error(store: Store) -> None:
    with pytest.raises(StoreError, match="nope"):
        store.set_queue_paused("nope", True)


@pytest.mark.timeout(60)
def test_a_large_submit_into_a_limited_queue_is_all_or_nothing(store) -> None:  # type: ignore[no-untyped-def]
    from fleetsim.errors import QueueFull
    from fleetsim.store import QueueConfig

    store.configure_queue(QueueConfig("big", max_length=15_000))
    with pytest.raises(QueueFull):
        store.submit_many([StepSpec("big")] * 25_000)
    assert store.status_counts()["queued"] == 0
    ids = store.submit_many([StepSpec("big")] * 12_000)
    assert len(ids) == 12_000 and ids == sorted(ids)
    more = store.submit_many([StepSpec("default")] * 25_000)
    assert len(more) == 25_000 and more == sorted(more) and more[0] > ids[-1]


@pytest.mark.timeout(30)
def test_a_limit_set_on_a_busy_queue_counts_the_claims_it_already_has(store: Store) -> None:
    store.submit_many([StepSpec("busy", {"n": i}) for i in range(4)])
    store.register_pod("pod-1")
    held = store.claim_steps("pod-1", ["busy"], 2)  # the fast path: no limit yet
    assert len(held) == 2

    store.configure_queue(QueueConfig("busy", concurrency_limit=2))

    # Both open claims count against the new limit...
    assert store.claim_steps("pod-1", ["busy"], 2) == []
    # ... and each one that ends frees its place.
    store.complete(held[0].id, held[0].claim_token)
    assert len(store.claim_steps("pod-1", ["busy"], 2)) == 1
    assert store.claim_steps("pod-1", ["busy"], 2) == []


def _waiting_on_a_lock(config: StoreConfig, application_name: str) -> bool:
    return bool(sql(config,
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = %(app)s AND wait_event_type = 'Lock'",
                    {"app": application_name})[0][0])


def _claim_in_open_transaction(config: StoreConfig) -> psycopg2.extensions.connection:
    """A connection that has claimed 2 steps of "busy" as the fast path does, uncommitted."""
    claim = psycopg2.connect(config.url, options=f"-c search_path={config.schema}")
    with claim.cursor() as cur:
        cur.execute(_CLAIM.prepare)
        cur.execute(_CLAIM.execute_py,
                    {"queues": ["busy"], "pod": "pod-1", "batch": 2, "incarnation": 0})
        assert len(cur.fetchall()) == 2
    return claim


def _run_beside(
    config: StoreConfig, held: psycopg2.extensions.connection, action: Callable[[Store], object]
) -> bool:
    """Run ``action`` on a store of its own while ``held``'s transaction is open.

    Once ``action`` has ended or waits on a lock, ``held`` commits (and is
    closed) and ``action`` must end. Returns whether it had waited.
    """
    app = f"beside-{config.schema}"
    try:
        with Store(dataclasses.replace(config, application_name=app)) as other:
            thread = threading.Thread(target=action, args=(other,))
            thread.start()
            wait_for(lambda: not thread.is_alive() or _waiting_on_a_lock(config, app),
                     10, "the action to end or to wait on a lock")
            waited = thread.is_alive()
            held.commit()
            thread.join(10)
            assert not thread.is_alive()
    finally:
        held.close()
    return waited


@pytest.mark.timeout(60)
def test_a_limit_set_while_a_claim_is_in_flight_waits_for_it_and_counts_it(
    store: Store, store_config: StoreConfig
) -> None:
    store.submit_many([StepSpec("busy", {"n": i}) for i in range(4)])
    store.register_pod("pod-1")
    claim = _claim_in_open_transaction(store_config)

    # It waits for the claim (without FOR KEY SHARE it would not).
    _run_beside(store_config, claim,
                lambda admin: admin.configure_queue(QueueConfig("busy", concurrency_limit=1)))

    # The two claims made before the limit count against it: nothing more is admitted.
    assert sql(store_config, "SELECT count(*) FROM steps WHERE queue = 'busy'"
                             " AND status = 'claimed' AND limited_claim") == [(2,)]
    assert store.claim_steps("pod-1", ["busy"], 2) == []


@pytest.mark.timeout(60)
def test_a_claim_that_waits_for_a_new_limit_leaves_the_queue_to_the_locked_path(
    store: Store, store_config: StoreConfig
) -> None:
    store.submit_many([StepSpec("busy", {"n": i}) for i in range(4)])
    store.register_pod("pod-1")
    change = psycopg2.connect(store_config.url, options=f"-c search_path={store_config.schema}")
    with change.cursor() as cur:
        # A settings change in progress, as configure_queue makes it.
        cur.execute("SELECT 1 FROM queues WHERE name = 'busy' FOR UPDATE")
        cur.execute("UPDATE queues SET concurrency_limit = 1 WHERE name = 'busy'")
    claimed: list[list[ClaimedStep]] = []

    _run_beside(store_config, change,
                lambda claimer: claimed.append(claimer.claim_steps("pod-1", ["busy"], 2)))

    # The waiting claim re-read the queue's row: no unflagged claim, the limit holds.
    assert len(claimed[0]) <= 1
    assert sql(store_config, "SELECT count(*) FROM steps WHERE queue = 'busy'"
                             " AND status = 'claimed' AND NOT limited_claim") == [(0,)]
    assert len(store.claim_steps("pod-1", ["busy"], 2)) + len(claimed[0]) == 1


@pytest.mark.timeout(60)
def test_a_submit_to_a_queue_with_a_max_length_does_not_wait_for_claims_in_flight(
    store: Store, store_config: StoreConfig
) -> None:
    store.configure_queue(QueueConfig("busy", max_length=10))
    store.submit_many([StepSpec("busy", {"n": i}) for i in range(4)])
    store.register_pod("pod-1")
    claim = _claim_in_open_transaction(store_config)

    waited = _run_beside(store_config, claim, lambda submitter: submitter.submit("busy", {"n": 4}))

    assert not waited, "the submit waited for a claim"
    assert store.queue_stats()["busy"].depth == 3
