"""The fleet: real pod processes, real PostgreSQL, real signals."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from fleetsim.config import FleetTimings
from fleetsim.store import Store, StoreConfig
from tests.helpers import (
    leader_pod,
    newer_leader,
    rows,
    running_fleet,
    submit_steps,
    wait_lease_loss_logged,
    wait_until,
)

DEFAULT = FleetTimings()


def completed_once(store: Store) -> tuple[int, int]:
    """(steps completed exactly once, steps with a duplicate completion), from step_attempts."""
    once, twice = rows(
        store,
        "SELECT count(*) FILTER (WHERE n = 1), count(*) FILTER (WHERE n > 1) FROM"
        " (SELECT step_id, count(*) n FROM step_attempts WHERE outcome = 'completed'"
        "  GROUP BY step_id) t",
    )[0]
    return int(once), int(twice)


@pytest.mark.timeout(120)
def test_five_pods_drain_2000_steps_each_once(store: Store, store_config: StoreConfig,
                                              tmp_path: Path) -> None:
    ids = submit_steps(store, 2000)
    # sleep:5, not noop: on a loaded machine four pods could drain 2000 noop
    # steps before the fifth is scheduled at all.
    with running_fleet(store_config, tmp_path, pods=5, batch=10, workload="sleep:5"):
        wait_until(lambda: store.status_counts()["completed"] == 2000, 60, what="drain")
    once, twice = completed_once(store)
    assert (once, twice) == (2000, 0)
    assert store.status_counts()["completed"] == len(ids)
    workers = rows(store, "SELECT DISTINCT pod_id FROM step_attempts WHERE outcome='completed'")
    assert {w[0] for w in workers} == {f"pod-{i}" for i in range(1, 6)}


def _pod_holding_steps(store: Store, exclude: str) -> tuple[str, list[int]]:
    def find() -> tuple[str, list[int]] | None:
        for pod_id, ids in rows(
            store, "SELECT claimed_by, array_agg(id) FROM steps WHERE status='claimed'"
            " AND claimed_by <> :leader GROUP BY claimed_by", leader=exclude,
        ):
            return pod_id, list(ids)
        return None

    return wait_until(find, 20, what="a non-leader pod holding steps")


@pytest.mark.timeout(120)
def test_sigkill_non_leader_its_steps_are_reclaimed_in_time(
    store: Store, store_config: StoreConfig, tmp_path: Path
) -> None:
    submit_steps(store, 300, "sleep:100")
    with running_fleet(store_config, tmp_path, pods=4, batch=2) as fleet:
        leader, _ = leader_pod(store)
        victim, held = _pod_holding_steps(store, exclude=leader)
        killed_at = time.monotonic()
        os.kill(fleet.pods[victim].pid, signal.SIGKILL)

        def reclaimed() -> bool:
            n = rows(store, "SELECT count(DISTINCT step_id) FROM step_attempts"
                     " WHERE step_id = ANY(:ids) AND pod_id <> :victim",
                     ids=held, victim=victim)[0][0]
            return n == len(held)

        wait_until(reclaimed, 30, what="the victim's steps re-claimed")
        elapsed = time.monotonic() - killed_at
        # A certain death (the coordinator saw its child exit) is not waited
        # out: under the dead threshold (3 s), with room for a busy machine
        # (about 0.3 s on a quiet one).
        limit = 2.8
        assert elapsed <= limit, f"re-claimed after {elapsed:.2f}s (limit {limit}s)"
        wait_until(lambda: store.status_counts()["completed"] == 300, 60, what="drain")
    assert completed_once(store) == (300, 0)
    lost = rows(store, "SELECT count(*) FROM step_attempts WHERE pod_id = :v"
                " AND outcome = 'lease_lost'", v=victim)[0][0]
    assert lost == len(held)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spawn", ["fork", "exec"])
def test_sigkill_leader_new_term_in_time_and_recovery_continues(
    store: Store, store_config: StoreConfig, tmp_path: Path, spawn: str
) -> None:
    """Whether the pods were forked by the pod-spawner or exec'd, the
    coordinator sees the leader's death at once."""
    submit_steps(store, 300, "sleep:100")
    with running_fleet(store_config, tmp_path, pods=3, batch=2, spawn=spawn) as fleet:
        leader, term = leader_pod(store)
        wait_until(lambda: rows(store, "SELECT 1 FROM steps WHERE claimed_by=:p AND"
                                " status='claimed'", p=leader), 20, what="leader holds steps")
        killed_at = time.monotonic()
        os.kill(fleet.pods[leader].pid, signal.SIGKILL)

        def new_leader() -> bool:
            lease = store.current_leader()
            return lease is not None and lease.term > term and lease.holder != leader

        wait_until(new_leader, 15, interval=0.02, what="a new leader")
        elapsed = time.monotonic() - killed_at
        # The dead leader's term ended as its exit was recorded: no lease
        # (3 s) to run out, with room for a busy machine (about 0.1 s on a
        # quiet one).
        limit = 2.5
        assert elapsed <= limit, f"new leader after {elapsed:.2f}s (limit {limit}s)"
        # Recovery continues under a later term than the dead leader's: its
        # steps come back. (Any later term: on a loaded machine the first new
        # leader may recover them and lose its term before this test reads
        # the lease again.)
        wait_until(lambda: rows(store, "SELECT 1 FROM leader_actions WHERE term > :t AND"
                                " target_pod = :p AND action IN ('requeue','dead_letter')",
                                t=term, p=leader), 30, what="recovery under a later term")
        wait_until(lambda: store.status_counts()["completed"] == 300, 60, what="drain")
    assert completed_once(store) == (300, 0)


@pytest.mark.timeout(120)
def test_sigstop_leader_beyond_lease_loses_it_without_split_brain(
    store: Store, store_config: StoreConfig, tmp_path: Path
) -> None:
    submit_steps(store, 200, "sleep:50")
    with running_fleet(store_config, tmp_path, pods=3, batch=2) as fleet:
        leader, term = leader_pod(store)
        pid = fleet.pods[leader].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: newer_leader(store, term), 15,
                       what="a new leader while the old one is frozen")
            # Stay frozen for 3x the lease in all.
            time.sleep(max(0.0, 3 * DEFAULT.lease_s - DEFAULT.lease_s))  # fault duration
        finally:
            os.kill(pid, signal.SIGCONT)
        log = fleet.pods[leader].log_path
        wait_lease_loss_logged(log, 15)
        wait_until(lambda: store.status_counts()["completed"] == 200, 60, what="drain")
    assert completed_once(store) == (200, 0)
    overlaps = rows(store, """
        SELECT a.term, b.term FROM leader_terms a JOIN leader_terms b ON b.term > a.term
         WHERE b.started_at < coalesce(a.ended_at, a.expires_at)""")
    assert overlaps == []
    stale_actions = rows(store, """
        SELECT x.id FROM leader_actions x JOIN leader_terms t ON t.term = x.term
         WHERE x.at > coalesce(t.ended_at, t.expires_at) OR x.at < t.started_at
            OR x.pod_id <> t.pod_id""")
    assert stale_actions == []


@pytest.mark.timeout(120)
def test_sigterm_mid_step_finishes_or_releases_and_exits_0(
    store: Store, store_config: StoreConfig, tmp_path: Path
) -> None:
    submit_steps(store, 40, "sleep:700")
    grace = 5.0
    with running_fleet(store_config, tmp_path, pods=2, batch=4, concurrency=2,
                       timings=FleetTimings(grace_s=grace)) as fleet:
        victim = "pod-1"
        wait_until(lambda: rows(store, "SELECT 1 FROM steps WHERE claimed_by=:p AND"
                                " status='claimed'", p=victim), 20, what="pod-1 mid-step")
        process = fleet.pods[victim].process
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=grace + 5)
        assert code == 0
        assert time.monotonic() - sent <= grace + 1.0
        open_attempts = rows(store, "SELECT count(*) FROM step_attempts WHERE pod_id=:p"
                             " AND finished_at IS NULL", p=victim)[0][0]
        assert open_attempts == 0
        outcomes = {r[0] for r in rows(store, "SELECT DISTINCT outcome FROM step_attempts"
                                            " WHERE pod_id=:p", p=victim)}
        assert outcomes <= {"completed", "released"}
        state = rows(store, "SELECT status FROM pods WHERE id=:p", p=victim)[0][0]
        assert state == "stopped"
        wait_until(lambda: store.status_counts()["completed"] == 40, 60, what="drain")
    assert completed_once(store) == (40, 0)


@pytest.mark.timeout(120)
def test_a_fleet_whose_pod_spawner_died_still_sees_its_pods_die_and_restarts_them(
    store: Store, store_config: StoreConfig, tmp_path: Path
) -> None:
    """The spawner is the forked pods' parent: killed, it reports no more
    exits. The coordinator still sees a pod end (its pidfd), with an unknown
    status, and restarts it through a new spawner."""
    from fleetsim.pod_spawner import UNKNOWN_EXIT

    with running_fleet(store_config, tmp_path, pods=2, restart=True) as fleet:
        assert fleet.spawner is not None
        old_spawner = fleet.spawner
        old_spawner.process.kill()
        wait_until(lambda: old_spawner.gone, 20, what="the spawner seen gone")
        victim = fleet.pods["pod-2"]
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.process.wait(timeout=20) == UNKNOWN_EXIT
        # What the supervision loop does every 0.2 s: reap, and restart.
        wait_until(lambda: ("pod-2", UNKNOWN_EXIT) in fleet.poll(), 30,
                   what="pod-2's exit seen and the pod restarted")
        assert fleet.pods["pod-2"].incarnation == 1
        wait_until(lambda: any(p["id"] == "pod-2" and p["incarnation"] == 1
                               and p["state"] == "alive" for p in store.pods()),
                   30, what="pod-2's next incarnation alive")
        assert fleet.spawner is not old_spawner and not fleet.spawner.gone
