"""The pod spawner (fleetsim.pod_spawner) with real forked processes and pipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fleetsim.pod_spawner import UNKNOWN_EXIT, ForkedPod, PodSpawner, fork_available
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(not fork_available(), reason="pods are forked on Linux only")


def start_plain(argv: list[str], fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, pass_fds=fds, start_new_session=True)


@pytest.fixture
def spawner() -> Iterator[PodSpawner]:
    spawner = PodSpawner(start_plain)
    try:
        yield spawner
    finally:
        spawner.close()


def target(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "tests.spawn_target", str(out), *args]


def spawn(spawner: PodSpawner, tmp_path: Path, *args: str,
          env: dict[str, str] | None = None) -> tuple[ForkedPod, Path, Path]:
    out, log = tmp_path / f"out-{len(list(tmp_path.iterdir()))}", tmp_path / "child.log"
    pod = spawner.spawn(target(out, *args), {**os.environ, **(env or {})}, log)
    return pod, out, log


def running(spawner: PodSpawner, tmp_path: Path) -> ForkedPod:
    """A released child that sleeps, once it runs."""
    pod, out, _ = spawn(spawner, tmp_path, "sleep")
    spawner.release(pod)
    wait_until(out.exists, 20, what="the child ran")
    return pod


@pytest.mark.timeout(60)
def test_a_child_runs_only_once_released_and_its_exit_status_is_reported(
        spawner: PodSpawner, tmp_path: Path) -> None:
    pod, out, log = spawn(spawner, tmp_path, "exit", "7",
                          env={"SPAWN_TEST": "given", "FLEETSIM_STORE": "postgresql://x"})
    # Ready, titled, waiting: what /proc shows is the command it will run.
    cmdline = psutil.Process(pod.pid).cmdline()
    assert cmdline[:4] == [sys.executable, "-m", "tests.spawn_target", str(out)], cmdline
    assert not out.exists() and pod.poll() is None
    spawner.release(pod)
    assert pod.wait(timeout=20) == 7
    seen = json.loads(out.read_text())
    assert seen["pid"] == pod.pid and seen["sid"] == pod.pid  # a session of its own
    assert seen["argv"] == [str(out), "exit", "7"]
    assert seen["env"] == "given" and seen["store"] == "postgresql://x"
    assert f"hello from {pod.pid}" in log.read_text()  # its output is in its log


@pytest.mark.timeout(60)
def test_a_killed_child_reports_the_signal_and_is_signalled_through_its_pidfd(
        spawner: PodSpawner, tmp_path: Path) -> None:
    pod = running(spawner, tmp_path)
    pod.kill()
    assert pod.wait(timeout=20) == -signal.SIGKILL
    pod.kill()  # once it ended, a signal goes nowhere (its pid may be someone else's)


@pytest.mark.timeout(60)
def test_interpreter_exit_joins_the_childs_threads(spawner: PodSpawner,
                                                    tmp_path: Path) -> None:
    pod, out, _ = spawn(spawner, tmp_path, "thread")
    spawner.release(pod)
    assert pod.wait(timeout=20) == 0
    assert Path(f"{out}.thread").read_text() == "joined"


@pytest.mark.timeout(60)
def test_a_cancelled_child_never_runs(spawner: PodSpawner, tmp_path: Path) -> None:
    pod, out, _ = spawn(spawner, tmp_path, "exit", "0")
    spawner.cancel(pod)
    assert pod.wait(timeout=20) == -signal.SIGKILL
    assert not out.exists()


@pytest.mark.timeout(60)
def test_when_the_coordinator_goes_unreleased_children_die_released_ones_run_on(
        tmp_path: Path) -> None:
    spawner = PodSpawner(start_plain)
    released: ForkedPod | None = None
    try:
        released = running(spawner, tmp_path)
        held, held_out, _ = spawn(spawner, tmp_path, "exit", "0")
        os.close(spawner._requests)  # as the coordinator's death closes it
        assert spawner.process.wait(timeout=20) == 0
        wait_until(lambda: not psutil.pid_exists(held.pid)
                   or psutil.Process(held.pid).status() == psutil.STATUS_ZOMBIE,
                   20, what="the unreleased child killed")
        assert not held_out.exists()
        assert psutil.Process(released.pid).status() != psutil.STATUS_ZOMBIE
    finally:
        if released is not None:
            os.kill(released.pid, signal.SIGKILL)
        spawner.close()


@pytest.mark.timeout(60)
def test_without_its_spawner_a_pods_end_is_still_seen_with_an_unknown_status(
        tmp_path: Path) -> None:
    spawner = PodSpawner(start_plain)
    try:
        pod = running(spawner, tmp_path)
        spawner.process.kill()
        spawner.process.wait()
        wait_until(lambda: spawner.gone, 20, what="the spawner seen gone")
        assert pod.poll() is None  # still running: the spawner's death is not the pod's
        os.kill(pod.pid, signal.SIGKILL)
        assert pod.wait(timeout=20) == UNKNOWN_EXIT
    finally:
        spawner.close()


@pytest.mark.timeout(60)
def test_a_command_that_is_not_python_dash_m_is_refused(spawner: PodSpawner,
                                                        tmp_path: Path) -> None:
    from fleetsim.pod_spawner import SpawnerGone

    with pytest.raises(SpawnerGone, match="not a `python -m module` command"):
        spawner.spawn(["/bin/true"], dict(os.environ), tmp_path / "log")
    # and the spawner still serves
    pod, _, _ = spawn(spawner, tmp_path, "exit", "3")
    spawner.release(pod)
    assert pod.wait(timeout=20) == 3
