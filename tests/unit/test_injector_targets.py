"""The injector's targets are live pods only (issue 12, item 1), with real child processes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from chaos.injector import FaultInjector
from fleetsim.bus import SelfKill
from fleetsim.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


class _Fleet:
    """Two children as pod-1 and pod-2 (never reaped here: a killed one stays a zombie)."""

    def __init__(self, children: list[subprocess.Popen[bytes]]) -> None:
        self.pids = {f"pod-{i + 1}": child.pid for i, child in enumerate(children)}
        self.remote = ["far-1"]
        self.commands: list[tuple[str, Any]] = []

    def pod_pids(self) -> dict[str, int]:
        return dict(self.pids)

    def remote_pods(self) -> list[str]:
        return list(self.remote)  # still "heard" for a while after it died

    def known_pods(self) -> list[str]:
        return sorted(self.pids)

    def leader(self) -> tuple[str, int] | None:
        return ("pod-1", 3)

    def send_command(self, pod_id: str, command: Any) -> Any:
        self.commands.append((pod_id, command))
        return None

    def set_proxy_fault(self, pod_id: str, mode: str | None) -> None:
        raise AssertionError("not used")

    def restart_store(self) -> dict[str, Any]:
        raise AssertionError("not used")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for _ in range(2)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_a_killed_child_is_never_a_target_even_before_it_is_reaped(
        children: list[subprocess.Popen[bytes]]) -> None:
    fleet = _Fleet(children)
    injector = FaultInjector(fleet, seed=0)
    assert injector.live_pods() == ["far-1", "pod-1", "pod-2"]
    injector.apply("kill", "pod-1", {})
    # pod-1 is a zombie now: its pid exists, it is not running.
    assert "pod-1" not in injector.live_pods()
    for _ in range(50):
        assert injector.resolve("random") != ["pod-1"]
    with pytest.raises(ConfigError, match="pod-1 is not running"):
        injector.apply("kill", "pod-1", {})
    with pytest.raises(ConfigError, match="the leader pod-1 is not running"):
        injector.apply("kill-leader", None, {})
    with pytest.raises(ConfigError, match="no pod named 'pod-9'"):
        injector.apply("kill", "pod-9", {})


def test_a_killed_remote_pod_is_not_a_target_while_the_bus_still_lists_it(
        children: list[subprocess.Popen[bytes]]) -> None:
    fleet = _Fleet(children)
    injector = FaultInjector(fleet, seed=0)
    injector.apply("kill", "far-1", {})
    assert fleet.commands == [("far-1", SelfKill())]
    assert injector.live_pods() == ["pod-1", "pod-2"]
    assert injector.resolve("all", allow_all=True) == ["pod-1", "pod-2"]
    with pytest.raises(ConfigError, match="far-1 is not running"):
        injector.apply("kill", "far-1", {})


def test_no_live_pod_left_is_a_plain_error(children: list[subprocess.Popen[bytes]]) -> None:
    fleet = _Fleet(children)
    fleet.remote = []
    injector = FaultInjector(fleet, seed=0)
    injector.apply("kill", "random", {})
    injector.apply("kill", "random", {})
    with pytest.raises(ConfigError, match="no live pods"):
        injector.apply("kill", "random", {})
