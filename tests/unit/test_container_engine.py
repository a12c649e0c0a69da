"""Finding the container a pod runs in (chaos/containers.py), and when the engine is not used.

The faults themselves are the compose tier's (tests/compose), on a real
engine; this checks the matching rules on the engine's own listing shape.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import pytest

from chaos.containers import ContainerEngine
from fleetsim.errors import ConfigError


@dataclass
class Listed:
    """A container as the docker package lists it (the fields the engine reads)."""

    id: str
    name: str
    status: str
    hostname: str
    attrs: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.attrs = {"Config": {"Hostname": self.hostname}}


class Listing:
    def __init__(self, *containers: Listed) -> None:
        self.containers = self
        self._all = containers

    def list(self, all: bool = False) -> list[Listed]:
        return list(self._all)


def engine(*containers: Listed) -> ContainerEngine:
    return ContainerEngine(Listing(*containers))


def test_a_pod_is_matched_to_the_running_or_paused_container_of_its_host() -> None:
    found = engine(
        Listed("a1b2c3d4e5f6" + "0" * 52, "tier-pod-1", "running", "a1b2c3d4e5f6"),
        Listed("b1b2c3d4e5f6" + "0" * 52, "tier-pod-2", "paused", "b1b2c3d4e5f6"),
        Listed("c1b2c3d4e5f6" + "0" * 52, "tier-pod-3", "exited", "c1b2c3d4e5f6"),
        Listed("d1b2c3d4e5f6" + "0" * 52, "named", "running", "worker-7"),
    ).containers_for({"pod-a1b2c3d4e5f6-1": "a1b2c3d4e5f6",
                      "pod-b1b2c3d4e5f6-1": "b1b2c3d4e5f6",
                      "pod-c1b2c3d4e5f6-1": "c1b2c3d4e5f6",  # exited: nothing to fault
                      "pod-worker-7-1": "worker-7",
                      "pod-elsewhere-9": "elsewhere"})
    assert {pod: c.name for pod, c in found.items()} == {
        "pod-a1b2c3d4e5f6-1": "tier-pod-1",
        "pod-b1b2c3d4e5f6-1": "tier-pod-2",
        "pod-worker-7-1": "named",
    }


def test_the_container_this_process_runs_in_is_never_a_target() -> None:
    own = socket.gethostname()
    found = engine(Listed("e" * 64, "me", "running", own)).containers_for({"pod-1": own})
    assert found == {}


def test_two_containers_with_one_host_name_are_refused_not_guessed() -> None:
    twins = engine(Listed("1" * 64, "left", "running", "twin"),
                   Listed("2" * 64, "right", "running", "twin"))
    with pytest.raises(ConfigError, match="left, right"):
        twins.containers_for({"pod-twin-1": "twin"})


def test_container_faults_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETSIM_CONTAINER_FAULTS", "0")
    found, why = ContainerEngine.connect()
    assert found is None and "FLEETSIM_CONTAINER_FAULTS=0" in why


@pytest.mark.timeout(30)
def test_no_engine_is_a_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.delenv("FLEETSIM_CONTAINER_FAULTS", raising=False)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no.sock")
    found, why = ContainerEngine.connect()
    assert found is None and "no Docker engine answers" in why and "\n" not in why
