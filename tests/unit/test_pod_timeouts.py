"""The pod's execution timeouts: its batch stops waiting for a step past its deadline.

The batch runner is driven directly with claimed steps made by hand (no
store needed), as in test_pod_handlers.
"""

from __future__ import annotations

import time

import pytest

from fleetsim.config import FleetTimings
from fleetsim.store import ClaimedStep, Store, StoreConfig
from pods.config import PodConfig
from pods.pod import Pod
from pods.workloads import HANG_DEFAULT_MS, parse_workload
from tests.helpers import wait_until

FAST = FleetTimings(heartbeat_s=0.2, lease_s=1.5, renew_s=0.5, dead_after_s=1.0,
                    recovery_s=0.2, grace_s=2.0)
NOWHERE = StoreConfig("postgresql://nobody@127.0.0.1:1/none", connect_timeout_s=1)


def pod(concurrency: int) -> Pod:
    cfg = PodConfig("p1", NOWHERE, concurrency=concurrency, timings=FAST, batch=10)
    return Pod(cfg, Store(NOWHERE))


def step(step_id: int, workload: str, timeout_s: float | None) -> ClaimedStep:
    return ClaimedStep(step_id, "default", 0, {"workload": workload}, 0, 3, 100 + step_id,
                       timeout_s)


@pytest.mark.timeout(20)
def test_a_step_past_its_timeout_fails_without_waiting_and_its_late_result_is_dropped() -> None:
    p = pod(concurrency=2)
    # Lane 0: step 1 hangs for 1.5 s (timeout 0.3 s), then step 3 would run.
    # Lane 1: step 2 and step 4 finish quickly.
    batch = [step(1, "hang:1500", 0.3), step(2, "sleep:50", 0.3),
             step(3, "noop", None), step(4, "noop", 5.0)]
    began = time.monotonic()
    out = p._run_batch(batch)
    took = time.monotonic() - began
    assert took < 0.3 + 0.4, f"the batch waited {took:.2f}s for a hung step"
    assert [(i, e) for i, _, e in out.failed] == [(1, "TimeoutError: timed out after 0.3s")]
    assert sorted(i for i, _, _ in out.completed) == [2, 4]
    # The hung lane's later step was never started: released.
    assert out.unstarted == [(3, 103)]
    assert p.hung_runners == 1
    # The hung runner returns later: its result is dropped, never handed on.
    wait_until(lambda: p.late_results_dropped == 1, 5, what="the hung runner to return")
    assert not out.running and not out.hung
    assert [i for i, _, _ in out.completed] == [2, 4]
    assert [i for i, _, _ in out.failed] == [1]
    assert out.unstarted == [(3, 103)]


@pytest.mark.timeout(20)
def test_the_pod_keeps_its_concurrency_after_a_hung_runner() -> None:
    p = pod(concurrency=1)
    out = p._run_batch([step(1, "hang:2000", 0.2)])
    assert [i for i, _, _ in out.failed] == [1]
    # The only runner thread is hung, yet the next batch runs at once.
    began = time.monotonic()
    out = p._run_batch([step(2, "noop", None), step(3, "sleep:10", 1.0)])
    assert time.monotonic() - began < 1.0
    assert sorted(i for i, _, _ in out.completed) == [2, 3]
    assert not out.failed


@pytest.mark.timeout(20)
def test_steps_within_their_timeout_complete() -> None:
    p = pod(concurrency=1)
    out = p._run_batch([step(1, "sleep:50", 1.0), step(2, "sleep:50", 1.0)])
    assert sorted(i for i, _, _ in out.completed) == [1, 2]
    assert not out.failed and p.hung_runners == 0


def test_the_hang_workload() -> None:
    assert parse_workload("hang").amount == HANG_DEFAULT_MS == 3_600_000
    quick = parse_workload("hang:30")
    began = time.monotonic()
    assert quick.run({}, step_id=1, attempt=0, seed=0) is None
    assert 0.02 < time.monotonic() - began < 1.0


@pytest.mark.timeout(20)
def test_the_hang_fault_makes_the_next_step_hang_and_only_that_one() -> None:
    from fleetsim.bus import HangNextStep, Ok

    p = pod(concurrency=1)
    reply = p.handle_command(HangNextStep(1.0))
    assert isinstance(reply, Ok) and reply.data["hang_s"] == 1.0
    out = p._run_batch([step(1, "noop", 0.2), step(2, "noop", 0.2)])
    assert [(i, e) for i, _, e in out.failed] == [(1, "TimeoutError: timed out after 0.2s")]
    assert out.unstarted == [(2, 102)]  # the hung lane's next step, released
    out = p._run_batch([step(3, "noop", 0.2)])
    assert [i for i, _, _ in out.completed] == [3] and not out.failed
