"""A step's payload selects among the pod's allowed workloads; it never imports code.

A real pod process runs in a private folder; steps that name a handler it was
not started with (``subprocess:call`` among them) fail with a clear error,
spending an attempt, and leave no trace of running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fleetsim.store import Step, StepSpec, Store, StoreConfig
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
HANDLER = "tests.workload_handlers:touch"
OTHER = "tests.workload_handlers:touch_other"


@contextmanager
def pod_process(
    store_config: StoreConfig, cwd: Path, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """One `fleetsim pod` in ``cwd`` (so a stray command would write there)."""
    env = dict(os.environ, FLEETSIM_STORE=store_config.url, PYTHONPATH=str(REPO))
    env.pop("FLEETSIM_WORKLOAD", None)
    log = open(cwd / "pod.log", "wb")  # noqa: SIM115  (closed below)
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(cwd / "run"), "pod", "--id",
         "pod-allow", "--schema", store_config.schema or "fleetsim", "--heartbeat", "0.2",
         *args],
        cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


def finished(store: Store, ids: list[int], pod: subprocess.Popen[bytes], log: Path) -> list[Step]:
    """Wait until every step is completed or dead; the pod must stay up meanwhile."""

    def done() -> list[Step] | None:
        assert pod.poll() is None, f"the pod exited: {log.read_text()[-2000:]}"
        steps = [store.get_step(i) for i in ids]
        if all(s is not None and s.status in ("completed", "dead") for s in steps):
            return steps  # type: ignore[return-value]
        return None

    return wait_until(done, timeout=60, interval=0.1, what="the steps to finish")


@pytest.mark.timeout(90)
def test_payload_cannot_run_a_handler_the_pod_was_not_started_with(
    store: Store, store_config: StoreConfig, tmp_path: Path
) -> None:
    # jsonb orders keys by length: subprocess.call(payload) would run
    # `touch workload` in the pod's folder.
    forged = {"touch": 0, "workload": "subprocess:call"}
    other = {"workload": OTHER, "path": str(tmp_path / "other")}
    own_default = {"path": str(tmp_path / "own-default")}
    own_named = {"workload": HANDLER, "path": str(tmp_path / "own-named")}
    builtin = {"workload": "sleep:1"}
    with pod_process(store_config, tmp_path, "--workload", HANDLER) as pod:
        ids = store.submit_many([StepSpec("default", p, max_attempts=1)
                                 for p in (forged, other, own_default, own_named, builtin)])
        steps = finished(store, ids, pod, tmp_path / "pod.log")
    by_payload = dict(zip(("forged", "other", "own_default", "own_named", "builtin"), steps,
                          strict=True))
    assert not (tmp_path / "workload").exists(), "subprocess.call ran on the pod"
    assert not (tmp_path / "other").exists(), "a handler not allowed at start ran"
    for name in ("forged", "other"):
        step = by_payload[name]
        assert step.status == "dead" and step.attempts == 1, step
        assert step.error is not None and "not allowed" in step.error, step.error
    assert by_payload["forged"].error is not None
    assert "subprocess:call" in by_payload["forged"].error
    for name in ("own_default", "own_named", "builtin"):
        assert by_payload[name].status == "completed", by_payload[name]
    assert (tmp_path / "own-default").exists() and (tmp_path / "own-named").exists()


@pytest.mark.timeout(90)
def test_handlers_given_at_start_are_allowed_besides_the_default(
    store: Store, store_config: StoreConfig, tmp_path: Path
) -> None:
    with pod_process(store_config, tmp_path, "--workload", "noop", "--handler", HANDLER) as pod:
        ids = store.submit_many([
            StepSpec("default", {"workload": HANDLER, "path": str(tmp_path / "by-handler")},
                     max_attempts=1),
            StepSpec("default", {"workload": OTHER, "path": str(tmp_path / "other")},
                     max_attempts=1),
            StepSpec("default", {}, max_attempts=1),
        ])
        by_handler, other, default = finished(store, ids, pod, tmp_path / "pod.log")
    assert by_handler.status == "completed" and (tmp_path / "by-handler").exists()
    assert other.status == "dead" and not (tmp_path / "other").exists()
    assert default.status == "completed"


@pytest.mark.timeout(30)
def test_pod_refuses_a_handler_it_cannot_import(store_config: StoreConfig,
                                                tmp_path: Path) -> None:
    with pod_process(store_config, tmp_path, "--handler", "tests.workload_handlers:nope") as pod:
        code = pod.wait(20)
    text = (tmp_path / "pod.log").read_text()
    assert code != 0
    assert "Traceback" not in text
    assert "tests.workload_handlers:nope" in text
