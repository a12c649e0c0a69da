"""Helpers shared by the integration and chaos tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil

from fleetsim.coordinator import Coordinator, FleetSpec
from fleetsim.store import Store, StoreConfig

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def running_fleet(
    store_config: StoreConfig, run_dir: Path, **spec: Any
) -> Iterator[Coordinator]:
    """A fleet on the test's private schema; stopped (and checked stopped) afterwards."""
    fleet = Coordinator(
        FleetSpec(run_dir=run_dir, store_url=store_config.url, schema=store_config.schema
                  or "fleetsim", **spec)
    )
    fleet.start()
    pids = [p.pid for p in fleet.pods.values()]
    try:
        yield fleet
    finally:
        fleet.stop(grace_s=5.0)
        assert_no_processes(pids + [p.pid for p in fleet.pods.values()])


def assert_no_processes(pids: list[int]) -> None:
    """No process of ``pids`` is still running (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"processes left behind: {alive}"


def rows(store: Store, sql: str, **params: Any) -> list[Any]:
    """Run a read-only query on the store (tests read the history directly)."""
    return store._rows(sql, **params)


def leader_pod(store: Store) -> tuple[str, int]:
    """(pod id, term) of the current leader, waiting for one."""
    lease = wait_until(store.current_leader, timeout=10, what="a leader")
    return lease.holder, lease.term


def newer_leader(store: Store, term: int) -> bool:
    """Whether a leader with a term above ``term`` holds the lease now."""
    lease = store.current_leader()
    return lease is not None and lease.term > term


def wait_drained(fleet: Coordinator, store: Store, total: int, timeout: float = 120) -> None:
    """Supervise ``fleet`` until all ``total`` steps completed or dead-lettered.

    A store restart (chaos) may kill our pooled connections: such a poll
    just counts as "not yet".
    """
    from fleetsim.errors import StoreUnavailable

    def drained() -> bool:
        fleet.poll()
        try:
            counts = store.status_counts()
        except StoreUnavailable:
            return False
        return counts["completed"] + counts["dead"] == total

    wait_until(drained, timeout, interval=0.2, what=f"{total} steps to finish")


def submit_steps(store: Store, count: int, workload: str | None = None) -> list[int]:
    """Submit ``count`` steps to the default queue, running ``workload`` if given."""
    from fleetsim.store import StepSpec

    payload = {"workload": workload} if workload else {}
    return store.submit_many([StepSpec("default", payload)] * count)


def wait_lease_loss_logged(log_path: Path, timeout: float) -> None:
    """Wait until a pod's log says it learned it is no longer leader."""

    def logged() -> bool:
        text = log_path.read_text()
        return "lost the leader lease" in text or "leader action refused" in text

    wait_until(logged, timeout, what=f"{log_path.stem} to notice it lost the lease")


class Trickle(threading.Thread):
    """Submits ``total`` steps one at a time at ``rate`` per second (its own store).

    A load below the fleet's capacity: claims come back short of a full
    batch, which takes paths a bulk submit never does.
    """

    def __init__(self, config: StoreConfig, total: int, rate: float, workload: str) -> None:
        super().__init__(name="trickle", daemon=True)
        self.config, self.total, self.rate, self.workload = config, total, rate, workload
        self.submitted = 0

    def run(self) -> None:
        from fleetsim.store import StepSpec

        start = time.monotonic()
        with Store(self.config) as store:
            while self.submitted < self.total:
                store.submit_many([StepSpec("default", {"workload": self.workload})])
                self.submitted += 1
                time.sleep(max(0.0, start + self.submitted / self.rate - time.monotonic()))


@contextmanager
def running_pod(pod: Any) -> Iterator[Any]:
    """Run a pods.pod.Pod in-process on a thread (real store, real threads); stop it after."""
    thread = threading.Thread(target=pod.run, name=f"pod-{pod.config.pod_id}", daemon=True)
    thread.start()
    try:
        yield pod
    finally:
        pod.stopping.set()
        thread.join(timeout=10)
        assert not thread.is_alive()
