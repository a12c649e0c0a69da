"""Execution timeouts with a real store and real pods (issue 12 item 7).

A hung step is abandoned by its pod (failed, retried elsewhere) and, should
the pod not give it up, revoked by the leader once its claim is older than
the timeout plus the grace, even while the pod heartbeats. Either way the
late result is never accepted and the history checks out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fleetsim.checker import check
from fleetsim.config import FleetTimings
from fleetsim.store import QueueConfig, StepSpec, Store, StoreConfig, WriteOutcome
from pods.config import PodConfig
from pods.pod import Pod
from tests.helpers import rows, running_pod, wait_until
from tests.integration.test_cli import fleetsim

FAST = FleetTimings(heartbeat_s=0.05, lease_s=1.0, renew_s=0.2, dead_after_s=0.5,
                    recovery_s=0.1, grace_s=1.0)
HANG_ONCE = "tests.pod_handlers:hang_once"



def test_the_claim_hands_the_effective_timeout_to_the_pod(store: Store) -> None:
    store.set_queue_timeout("timed", 30.0)
    store.configure_queue(QueueConfig("limited", concurrency_limit=5, timeout_s=7.5))
    own, inherited, none, limited = store.submit_many([
        StepSpec("timed", timeout_s=2.0), StepSpec("timed"), StepSpec("default"),
        StepSpec("limited"),
    ])
    store.register_pod("p1")
    claimed = {s.id: s.timeout_s for s in
               store.claim_steps("p1", ["timed", "default", "limited"], 10)}
    assert claimed == {own: 2.0, inherited: 30.0, none: None, limited: 7.5}
    assert store.queues()["timed"].timeout_s == 30.0
    store.set_queue_timeout("timed", None)
    assert store.queues()["timed"].timeout_s is None


@pytest.mark.timeout(30)
def test_the_leader_revokes_an_overdue_claim_of_a_live_pod(store: Store) -> None:
    (step_id,) = store.submit_many([StepSpec("default", timeout_s=0.5, max_attempts=3)])
    store.register_pod("wedged")
    store.register_pod("leader")
    lease = store.acquire_leadership("leader", 30.0)
    assert lease is not None
    (claimed,) = store.claim_steps("wedged", ["default"], 1)
    assert claimed.timeout_s == 0.5

    def revoked() -> bool:
        # Both pods stay alive: only the claim's age can revoke it.
        store.heartbeat("wedged")
        store.heartbeat("leader")
        return step_id in store.recover("leader", lease.term, dead_after_s=0.3).requeued

    began = time.monotonic()
    wait_until(revoked, 5, interval=0.05, what="the leader to revoke the overdue claim")
    assert time.monotonic() - began >= 0.5 + 0.3 - 0.1  # not before timeout + grace
    step = store.get_step(step_id)
    assert step is not None
    assert step.status == "queued" and step.attempts == 1
    assert step.error is not None and step.error.startswith("timed out after 0.5s")
    assert dict(rows(store, "SELECT id, status FROM pods")) == {"wedged": "alive",
                                                              "leader": "alive"}
    actions = rows(store, "SELECT action, target_pod, step_id, claim_token, term "
                          "FROM leader_actions")
    assert [tuple(a) for a in actions] == [
        ("requeue", "wedged", step_id, claimed.claim_token, lease.term)]
    # The wedged runner's late completion is refused.
    assert store.complete(step_id, claimed.claim_token, {"late": True}) == \
        WriteOutcome.LEASE_LOST
    wait_until(lambda: store.claim_steps("leader", ["default"], 1), 5,
               what="the step to be claimable again")
    (again,) = [s for s in rows(store, "SELECT id, claim_token FROM steps")]
    assert store.complete(again[0], again[1], {"late": False}) == WriteOutcome.ACCEPTED
    result = check(store, final=True)
    assert result.valid, result.violations[:5]


@pytest.mark.timeout(30)
def test_the_leader_dead_letters_an_overdue_claim_at_max_attempts(store: Store) -> None:
    store.set_queue_timeout("q", 0.3)
    (step_id,) = store.submit_many([StepSpec("q", max_attempts=1)])
    store.register_pod("p1")
    lease = store.acquire_leadership("p1", 30.0)
    assert lease is not None
    (claimed,) = store.claim_steps("p1", ["q"], 1)

    def dead() -> bool:
        store.heartbeat("p1")
        return step_id in store.recover("p1", lease.term, dead_after_s=0.2).dead_lettered

    wait_until(dead, 5, what="the overdue claim to be dead-lettered")
    step = store.get_step(step_id)
    assert step is not None and step.status == "dead"
    assert step.error is not None and step.error.startswith("timed out after 0.3s")
    assert store.complete(step_id, claimed.claim_token, None) == WriteOutcome.LEASE_LOST
    result = check(store, final=True)
    assert result.valid, result.violations[:5]


@pytest.mark.timeout(60)
def test_a_hung_step_reruns_within_its_timeout_and_its_late_completion_is_never_written(
    store: Store, store_config: StoreConfig, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    timeout = 2.0
    (step_id,) = store.submit_many([StepSpec(
        "default", {"workload": HANG_ONCE, "gate": str(gate), "hang_s": 4.0},
        timeout_s=timeout)])
    first = Pod(PodConfig("pod-a", store_config, handlers=(HANG_ONCE,), timings=FAST,
                          batch=1), Store(store_config))
    second = Pod(PodConfig("pod-b", store_config, handlers=(HANG_ONCE,), timings=FAST,
                           batch=1), Store(store_config))
    with running_pod(first):
        wait_until(lambda: not gate.exists(), 10, what="pod-a to start the hanging step")
        hung_at = time.monotonic()
        with running_pod(second):
            wait_until(lambda: store.status_counts()["completed"] == 1, timeout + 5,
                       what="the step to complete")
            rerun_s = time.monotonic() - hung_at
            # The hung runner returns (at 4 s) while the pods still run: its
            # result must be dropped, not written.
            wait_until(lambda: first.late_results_dropped == 1, 10,
                       what="pod-a's hung runner to return and its result to be dropped")
    assert rerun_s < timeout + 1.0, f"re-ran after {rerun_s:.2f}s"
    attempts = rows(store, "SELECT claim_token, pod_id, outcome FROM finished_attempts "
                           "WHERE step_id = :id ORDER BY claim_token", id=step_id)
    assert [a[2] for a in attempts] == ["failed", "completed"]
    assert attempts[0][1] == "pod-a"
    # The late result was never even sent: no refused write for its token.
    assert rows(store, "SELECT count(*) FROM rejected_writes")[0][0] == 0
    step = store.get_step(step_id)
    assert step is not None and step.result == {"late": False}
    assert step.attempts == 1
    assert first.hung_runners == 1
    result = check(store, final=True)
    assert result.valid, result.violations[:5]


@pytest.mark.timeout(60)
def test_submit_and_queue_set_take_a_timeout(tmp_path: Path, store: Store,
                                             store_config: StoreConfig) -> None:
    env = {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": store_config.schema or ""}
    run_dir = tmp_path / "run"
    result = fleetsim(run_dir, "queue", "set", "orders", "--timeout", "30s", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["timeout_s"] == 30.0
    result = fleetsim(run_dir, "submit", "--queue", "orders", "--timeout", "2s", "--json",
                      env=env)
    assert result.returncode == 0, result.stderr
    step_id = json.loads(result.stdout)["first_id"]
    assert rows(store, "SELECT timeout_s FROM steps WHERE id = :id", id=step_id)[0][0] == 2.0
    bad = fleetsim(run_dir, "submit", "--timeout", "soon", env=env)
    assert bad.returncode != 0 and "invalid duration" in bad.stderr
    assert "Traceback" not in bad.stderr
    result = fleetsim(run_dir, "queue", "set", "orders", "--timeout", "0", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["timeout_s"] is None


@pytest.mark.timeout(60)
def test_init_gives_a_version_3_store_and_an_early_version_4_store_the_timeouts(
    store: Store, store_config: StoreConfig
) -> None:
    from fleetsim.store.schema import SCHEMA_VERSION
    from tests.integration.claimers import sql

    def timeout_columns() -> list[str]:
        return sorted(f"{r[0]}.{r[1]}" for r in sql(
            store_config, "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND column_name = 'timeout_s'"))

    (step_id,) = store.submit_many([StepSpec("default")])
    for version in (3, 4):  # a version-3 store; a version-4 one made before the timeouts
        sql(store_config, """
            DROP INDEX steps_with_timeout;
            ALTER TABLE steps DROP COLUMN timeout_s; ALTER TABLE queues DROP COLUMN timeout_s;
            DELETE FROM fleetsim_schema;
            INSERT INTO fleetsim_schema (version) VALUES (%(version)s);
        """, {"version": version})
        assert timeout_columns() == []
        store.init_schema()
        assert store.check_schema() == SCHEMA_VERSION
        assert timeout_columns() == ["queues.timeout_s", "steps.timeout_s"]
    store.set_queue_timeout("default", 5.0)
    store.register_pod("p1")
    (claimed,) = store.claim_steps("p1", ["default"], 1)
    assert (claimed.id, claimed.timeout_s) == (step_id, 5.0)
