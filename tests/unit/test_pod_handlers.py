"""A pod running handlers that misbehave, and hooks that raise: in-process.

The batch runner is driven directly with claimed steps made by hand (no
store needed); the write-back and the history are checked with a real
store and a pod running in a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from fleetsim.checker import check
from fleetsim.config import FleetTimings
from fleetsim.store import ClaimedStep, Store, StoreConfig
from pods.config import PodConfig
from pods.exitcodes import PodExit
from pods.hooks import PodHook
from pods.pod import Pod
from tests.helpers import wait_until

H = "tests.pod_handlers:"
HANDLERS = tuple(H + n for n in ("raises", "not_json", "calls_sys_exit", "square"))
FAST = FleetTimings(heartbeat_s=0.2, lease_s=1.5, renew_s=0.5, dead_after_s=1.0,
                    recovery_s=0.2, grace_s=2.0)
# Never connected to: the batch runner needs no store.
NOWHERE = StoreConfig("postgresql://nobody@127.0.0.1:1/none", connect_timeout_s=1)


class Exploding(PodHook):
    """A hook that raises in every method."""

    def __init__(self) -> None:
        self.calls = 0

    def _boom(self, *args: object) -> None:
        self.calls += 1
        raise RuntimeError("hook exploded")

    on_claimed = on_step_done = on_write = on_leadership = on_fenced = _boom


class Recording(PodHook):
    def __init__(self) -> None:
        self.done: list[tuple[int, bool, str | None]] = []

    def on_step_done(self, step: ClaimedStep, ok: bool, duration_s: float,
                     error: str | None) -> None:
        self.done.append((step.id, ok, error))


def steps(*payloads: dict) -> list[ClaimedStep]:
    return [ClaimedStep(i + 1, "default", 0, p, 0, 3, 100 + i) for i, p in enumerate(payloads)]


def pod(config: StoreConfig = NOWHERE, hooks: Sequence[PodHook] = (), concurrency: int = 1,
        store: Store | None = None, pod_id: str = "p1") -> Pod:
    cfg = PodConfig(pod_id, config, handlers=HANDLERS, concurrency=concurrency, timings=FAST,
                    batch=10)
    return Pod(cfg, store or Store(config), hooks)


@pytest.mark.timeout(20)
def test_a_raising_handler_fails_its_step_only() -> None:
    p = pod()
    out = p._run_batch(steps({"workload": H + "raises", "n": 3}, {"workload": H + "square",
                                                                  "n": 4}, {}))
    assert [(i, e) for i, _, e in out.failed] == [(1, "ValueError: handler raised for 3")]
    assert [(i, r) for i, _, r in out.completed] == [(2, {"n": 4, "square": 16}), (3, None)]
    assert not p.stopping.is_set()


@pytest.mark.timeout(20)
def test_a_result_that_is_not_json_fails_its_step_only() -> None:
    p = pod()
    out = p._run_batch(steps({"workload": H + "not_json"}, {}))
    assert [i for i, _, _ in out.failed] == [1]
    assert "cannot be stored" in out.failed[0][2]
    assert [i for i, _, _ in out.completed] == [2]


@pytest.mark.timeout(20)
def test_a_handler_calling_sys_exit_fails_its_step_and_stops_the_pod(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    p = pod()
    out = p._run_batch(steps({"workload": H + "calls_sys_exit", "gate": str(gate)}, {}, {}))
    # Not lost: the step is failed (retried with backoff), the rest given back.
    assert [(i, e) for i, _, e in out.failed] == [
        (1, "SystemExit: the handler called sys.exit(7)")]
    assert sorted(i for i, _ in out.unstarted) == [2, 3]
    assert out.completed == []
    assert p.stopping.is_set()


@pytest.mark.timeout(20)
def test_hooks_that_raise_do_not_stop_the_pod() -> None:
    exploding, recording = Exploding(), Recording()
    p = pod(hooks=[exploding, recording], concurrency=2)
    out = p._run_batch(steps({}, {"workload": H + "raises"}, {"workload": "fail:1"}, {}))
    assert sorted(i for i, _, _ in out.completed) == [1, 4]
    assert sorted(i for i, _, _ in out.failed) == [2, 3]
    # The hooks after the one that raised still ran, and so did the counters.
    assert exploding.calls == 4
    assert sorted((i, ok) for i, ok, _ in recording.done) == [
        (1, True), (2, False), (3, False), (4, True)]
    assert p.counters.snapshot() == {"steps_ok": 2, "steps_raised": 2}
    p._notify("on_leadership", 3)
    p._notify("on_fenced", True)
    assert p.counters.term == 3 and p.counters.fenced


@contextmanager
def running(p: Pod) -> Iterator[list[PodExit]]:
    code: list[PodExit] = []
    thread = threading.Thread(target=lambda: code.append(p.run()), daemon=True)
    thread.start()
    try:
        yield code
    finally:
        p.stopping.set()
        thread.join(15)
        assert not thread.is_alive()


@pytest.mark.timeout(60)
def test_misbehaving_handlers_and_hooks_with_a_real_store(store: Store,
                                                          store_config: StoreConfig) -> None:
    exploding = Exploding()
    p = pod(store_config, hooks=[exploding], store=store)
    ids = {
        "raises": store.submit(payload={"workload": H + "raises", "n": 1}, max_attempts=2),
        "not_json": store.submit(payload={"workload": H + "not_json"}, max_attempts=2),
        "square": store.submit(payload={"workload": H + "square", "n": 5}),
        "noop": store.submit(payload={}),
    }
    with running(p) as code:
        wait_until(lambda: store.status_counts()["completed"] == 2
                   and store.status_counts()["dead"] == 2, 30, what="all finished")
    assert code == [PodExit.OK]
    raised, bad = store.get_step(ids["raises"]), store.get_step(ids["not_json"])
    assert raised is not None and raised.error == "ValueError: handler raised for 1"
    assert bad is not None and bad.error is not None and "cannot be stored" in bad.error
    squared = store.get_step(ids["square"])
    assert squared is not None and squared.result == {"n": 5, "square": 25}
    assert exploding.calls > 0
    report = check(store, final=True)
    assert report.valid, report.violations


@pytest.mark.timeout(60)
def test_sys_exit_in_a_handler_with_a_real_store(store: Store, store_config: StoreConfig,
                                                 tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    step = store.submit(payload={"workload": H + "calls_sys_exit", "gate": str(gate)})
    others = [store.submit(payload={}) for _ in range(5)]
    first = pod(store_config, store=store)
    with running(first) as code:
        wait_until(lambda: code, 20, what="the pod to exit")
    assert code == [PodExit.CRASHED]
    got = store.get_step(step)
    assert got is not None and got.status == "failed" and got.attempts == 1
    # The next pod retries it (the gate opened) and runs the rest.
    second = pod(store_config, store=store, pod_id="p2")
    with running(second):
        wait_until(lambda: store.status_counts()["completed"] == 6, 20, what="all completed")
    assert {store.get_step(i).status for i in others} == {"completed"}  # type: ignore[union-attr]
    report = check(store, final=True)
    assert report.valid, report.violations
