"""The checker's figures on a constructed history whose gaps are known exactly.

The history is written with direct SQL into an empty schema, every instant
an exact offset from one base time T0 (in the past), so each figure has one
right value. It is the shape a real kill-leader run leaves: a leader that
stops renewing, a lease that runs out, a candidate that takes it at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleetsim.checker import check
from fleetsim.store import Store, StoreConfig
from tests.integration.test_checker import Db

pytestmark = pytest.mark.timeout(30)

# T0 + s seconds, in database time.
T = "(SELECT t0 FROM base) + make_interval(secs => {})"


@pytest.fixture
def db(store_config: StoreConfig, store: Store) -> Iterator[Db]:
    assert store_config.schema is not None
    conn = Db(store_config.url, store_config.schema)
    conn.all("CREATE TABLE base AS SELECT statement_timestamp() - interval '100 s' AS t0")
    try:
        yield conn
    finally:
        conn.close()


def at(s: float) -> str:
    return T.format(s)


def build_known_gaps(db: Db) -> None:
    """Three terms; the two leader changes left the fleet leaderless 2.5 s and 2.2 s.

    term 1, pod-a: acquired at 0, its last sign of life is a heartbeat at 1.5
      (then SIGKILLed; its lease, last renewed at 1.9 with a 2 s TTL, runs out
      at 3.9; recovery marks it dead at 6.0). term 2, pod-b, acquires at 4.0:
      failover 4.0 - 1.5 = 2.5 s (the lease's own tail is only 0.1 s).
    term 2, pod-b: claims a step at 7.0 and completes it at 7.8, claims another
      at 8.0, then dies (its lease runs out at 10.0; it is respawned as
      incarnation 1 at 50, which overwrites its pods row). term 3, pod-c,
      acquires at 10.2: failover 10.2 - 8.0 = 2.2 s (lease tail 0.2 s).
    """
    db.all(
        f"""INSERT INTO pods (id, incarnation, status, started_at, heartbeat_at, died_at,
                              swept_at)
            VALUES ('pod-a', 0, 'dead', {at(0)}, {at(1.5)}, {at(6.0)}, {at(6.0)}),
                   ('pod-b', 1, 'alive', {at(50)}, {at(99)}, NULL, NULL),
                   ('pod-c', 0, 'alive', {at(0)}, {at(99)}, NULL, NULL)"""
    )
    db.all(
        f"""INSERT INTO leader_terms (term, pod_id, started_at, expires_at, ended_at)
            VALUES (1, 'pod-a', {at(0)}, {at(3.9)}, {at(3.9)}),
                   (2, 'pod-b', {at(4.0)}, {at(10.0)}, {at(10.0)}),
                   (3, 'pod-c', {at(10.2)}, {at(130)}, NULL)"""
    )
    db.all(
        f"""UPDATE leader_lease SET holder = 'pod-c', term = 3, acquired_at = {at(10.2)},
                                    expires_at = {at(130)}"""
    )
    db.all(
        f"""INSERT INTO leader_actions (term, pod_id, action, target_pod, at)
            VALUES (2, 'pod-b', 'mark_dead', 'pod-a', {at(6.0)})"""
    )
    db.all(
        f"""INSERT INTO queues (name) VALUES ('q');
            INSERT INTO steps (id, queue, status, created_at, claimed_by, claim_token,
                               claimed_at, claim_incarnation, finished_at, attempts,
                               error, available_at)
            VALUES (1, 'q', 'completed', {at(0)}, 'pod-b', 1, {at(7.0)}, 0, {at(7.8)}, 0,
                    NULL, {at(0)}),
                   (2, 'q', 'completed', {at(0)}, 'pod-c', 3, {at(11.0)}, 0, {at(11.5)}, 1,
                    'pod pod-b died while holding this step', {at(10.5)});
            INSERT INTO finished_attempts (claim_token, step_id, pod_id, incarnation,
                                           claimed_at, finished_at, outcome)
            VALUES (1, 1, 'pod-b', 0, {at(7.0)}, {at(7.8)}, 'completed'),
                   (2, 2, 'pod-b', 0, {at(8.0)}, {at(10.5)}, 'lease_lost'),
                   (3, 2, 'pod-c', 0, {at(11.0)}, {at(11.5)}, 'completed');
            INSERT INTO leader_actions (term, pod_id, action, target_pod, step_id,
                                        claim_token, at)
            VALUES (3, 'pod-c', 'mark_dead', 'pod-b', NULL, NULL, {at(10.5)}),
                   (3, 'pod-c', 'requeue', 'pod-b', 2, 2, {at(10.5)});
            SELECT setval('steps_id_seq', 2), setval('claim_token_seq', 3)"""
    )


def test_failover_is_last_sign_of_life_to_next_term(db: Db, store: Store) -> None:
    build_known_gaps(db)
    report = check(store, final=True)
    failover = report.figures["failover"]
    assert failover["count"] == 2
    assert failover["max_s"] == pytest.approx(2.5, abs=1e-6)
    assert failover["median_s"] == pytest.approx(2.35, abs=1e-6)
    worst = failover["worst"]
    assert (worst["term"], worst["pod"], worst["next_term"], worst["next_pod"]) == (
        1, "pod-a", 2, "pod-b"
    )
    # The lease's own tail after expiry: what the old figure reported.
    tail = report.figures["lease_expiry_to_new_leader"]
    assert tail["count"] == 2
    assert tail["max_s"] == pytest.approx(0.2, abs=1e-6)
    assert tail["median_s"] == pytest.approx(0.15, abs=1e-6)
