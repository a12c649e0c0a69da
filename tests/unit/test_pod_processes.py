"""Real pod processes: fail:0.3 and a user handler end to end with the checker, and
handlers that end the process (sys.exit, os._exit): the step is not lost and the
pod's exit is reported."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fleetsim.checker import check
from fleetsim.config import FleetTimings
from fleetsim.coordinator import Coordinator
from fleetsim.store import StepSpec, Store, StoreConfig
from tests.helpers import running_fleet, wait_until

H = "tests.pod_handlers:"
FAST = FleetTimings(heartbeat_s=0.2, lease_s=1.5, renew_s=0.5, dead_after_s=1.0,
                    recovery_s=0.2, grace_s=2.0)


def finished(store: Store, n: int) -> bool:
    counts = store.status_counts()
    return counts["completed"] + counts["dead"] == n


@pytest.mark.timeout(120)
def test_fail_0_3_on_real_pods_matches_the_seeded_draws(store: Store, store_config: StoreConfig,
                                                        tmp_path: Path) -> None:
    seed, p, n = 11, 0.3, 300
    with running_fleet(store_config, tmp_path / "run", pods=2, workload=f"fail:{p}",
                       seed=seed, batch=10, timings=FAST):
        ids = store.submit_many([StepSpec("default", {"i": i}) for i in range(n)])
        wait_until(lambda: finished(store, n), 60, what=f"{n} steps finished")
    for step_id in ids:
        # Whichever pod ran which attempt, the outcome is the seeded one.
        draws = [random.Random(f"{seed}:{step_id}:{a}").random() < p for a in range(3)]
        spent = draws.index(False) if False in draws else 3
        step = store.get_step(step_id)
        assert step is not None
        assert (step.status, step.attempts) == (
            ("completed", spent) if spent < 3 else ("dead", 3)), step_id
    counts = store.status_counts()
    assert 0 < counts["dead"] < n * 0.1  # 0.3**3: about 2.7 %
    report = check(store, final=True)
    assert report.valid, report.violations
    # Every attempt is in the history: the failed ones, and one per completion.
    spent = sum(store.get_step(i).attempts for i in ids)  # type: ignore[union-attr]
    assert report.counts["attempts"] == spent + counts["completed"]


@pytest.mark.timeout(120)
def test_a_user_handler_on_real_pods(store: Store, store_config: StoreConfig,
                                     tmp_path: Path) -> None:
    with running_fleet(store_config, tmp_path / "run", pods=2, workload=H + "square",
                       batch=5, timings=FAST):
        ids = store.submit_many([StepSpec("default", {"n": i}) for i in range(100)])
        wait_until(lambda: store.status_counts()["completed"] == 100, 60, what="100 completed")
    for n, step_id in enumerate(ids):
        step = store.get_step(step_id)
        assert step is not None and step.result == {"n": n, "square": n * n}
    report = check(store, final=True)
    assert report.valid, report.violations


def exits(fleet: Coordinator) -> list[tuple[str, int, str]]:
    fleet.poll()
    return [(e["pod"], e["returncode"], e["reason"]) for e in fleet.events
            if e["topic"] == "pod.exited"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("handler, code, reason", [
    ("calls_os_exit", 9, "exit 9"),
    ("calls_sys_exit", 1, "crashed"),
])
def test_a_handler_ending_its_pod_loses_no_step(store: Store, store_config: StoreConfig,
                                                tmp_path: Path, handler: str, code: int,
                                                reason: str) -> None:
    gate = tmp_path / "gate"
    gate.touch()  # the handler opens it before it ends its process: the retry succeeds
    with running_fleet(store_config, tmp_path / "run", pods=2, handlers=(H + handler,),
                       batch=1, timings=FAST) as fleet:
        step = store.submit(payload={"workload": H + handler, "gate": str(gate)})
        others = store.submit_many([StepSpec("default", {}) for _ in range(20)])
        ended = wait_until(lambda: exits(fleet), 20, what="a pod to exit")
        assert len(ended) == 1 and ended[0][1:] == (code, reason), ended
        # Recovered (os._exit: by the leader, once the pod is silent) or
        # failed (sys.exit), then retried by the other pod.
        wait_until(lambda: store.status_counts()["completed"] == 21, 30, what="all completed")
        got = store.get_step(step)
        assert got is not None and got.attempts == 1 and got.result == {"exited": False}
        assert all(store.get_step(i).status == "completed" for i in others)  # type: ignore[union-attr]
    report = check(store, final=True)
    assert report.valid, report.violations
