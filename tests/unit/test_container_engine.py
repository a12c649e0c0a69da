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


# -- the injector's routing: which pods go to the engine ----------------------


class _Engine:
    """Records what the injector asks of the engine (its calls are the compose
    tier's to prove on a real one)."""

    def __init__(self, hosts: dict[str, str]) -> None:
        self.hosts = hosts  # host -> container name
        self.calls: list[tuple[str, str]] = []

    def containers_for(self, hosts: dict[str, str]) -> dict[str, Any]:
        from chaos.containers import PodContainer

        return {pod: PodContainer(host, self.hosts[host], "running")
                for pod, host in hosts.items() if host in self.hosts}

    def kill(self, target: Any) -> None:
        self.calls.append(("kill", target.name))

    def pause(self, target: Any) -> None:
        self.calls.append(("pause", target.name))

    def unpause(self, target: Any) -> None:
        self.calls.append(("unpause", target.name))

    def disconnect(self, target: Any) -> Any:
        from chaos.containers import Disconnection

        self.calls.append(("disconnect", target.name))
        return Disconnection(target, {"tier_default": ["pod"]})

    def reconnect(self, cut: Any) -> None:
        self.calls.append(("reconnect", cut.container.name))


class _Fleet:
    """One child (pid of this test process), one bus-only remote pod, one pod in
    a container and one in the store with no container."""

    def pod_pids(self) -> dict[str, int]:
        import os

        return {"pod-1": os.getpid()}

    def remote_pods(self) -> list[str]:
        return ["far-1"]

    def pod_hosts(self) -> dict[str, str]:
        return {"pod-1": socket.gethostname(), "far-1": "elsewhere",
                "pod-c0ffee-1": "c0ffee", "pod-beef-1": "beef", "pod-gone-1": "gone"}

    def leader(self) -> tuple[str, int] | None:
        return ("pod-c0ffee-1", 4)

    def send_command(self, pod_id: str, command: Any) -> Any:
        raise AssertionError(f"{pod_id} is reached through the engine, not the bus")


def injector_with(engine: _Engine, tmp_path: Any) -> Any:
    from chaos.injector import FaultInjector

    injector = FaultInjector(_Fleet(), log_path=tmp_path / "faults.jsonl")  # type: ignore[arg-type]
    injector._engine = engine  # type: ignore[assignment]  # as if it answered
    injector._engine_checked_at = 0.0
    return injector


def test_container_pods_are_targets_and_go_to_the_engine(tmp_path: Any) -> None:
    import json

    engine = _Engine({"c0ffee": "tier-pod-1", "beef": "tier-pod-2"})
    injector = injector_with(engine, tmp_path)
    assert injector.live_pods() == ["far-1", "pod-1", "pod-beef-1", "pod-c0ffee-1"]
    # Scenarios choose among pods every action reaches: not a bus-only remote pod.
    assert injector.faultable_pods() == ["pod-1", "pod-beef-1", "pod-c0ffee-1"]

    killed = injector.apply("kill-leader", None, {})
    assert killed["via"] == "engine" and killed["term"] == 4
    # Killed through the engine: no longer a target, though its container
    # may still be listed for a moment.
    assert "pod-c0ffee-1" not in injector.live_pods()
    injector.apply("pause", "pod-beef-1", {"for": "1h"})
    injector.apply("partition", "pod-beef-1", {"for": "1h"})
    injector.apply("heal", "pod-beef-1", {})
    assert engine.calls == [("kill", "tier-pod-1"), ("pause", "tier-pod-2"),
                            ("disconnect", "tier-pod-2"), ("unpause", "tier-pod-2"),
                            ("reconnect", "tier-pod-2")]
    logged = [json.loads(line) for line in (tmp_path / "faults.jsonl").read_text().splitlines()]
    assert [(r["action"], r["result"].get("container")) for r in logged] == [
        ("kill-leader", "tier-pod-1"), ("pause", "tier-pod-2"), ("partition", "tier-pod-2"),
        ("heal", None)]


def test_a_pod_in_no_container_is_refused_with_the_reason(tmp_path: Any) -> None:
    injector = injector_with(_Engine({}), tmp_path)
    with pytest.raises(ConfigError, match="another host"):
        injector.apply("pause", "far-1", {})
    with pytest.raises(ConfigError, match="no pod named 'pod-gone-1'"):
        injector.apply("pause", "pod-gone-1", {})


def test_a_partition_the_engine_half_refuses_is_undone_not_left_behind() -> None:
    """Two networks; the second refuses the disconnect: the first is
    reconnected and the error is one FleetsimError line."""
    from chaos.containers import PodContainer
    from fleetsim.errors import FleetsimError

    events: list[str] = []
    connected = {"first": {"Aliases": ["pod"]}, "second": {"Aliases": []}}

    class Network:
        def __init__(self, name: str) -> None:
            self.name = name

        def disconnect(self, container: Any, force: bool) -> None:
            if self.name == "second":
                raise RuntimeError("500 Server Error: boom\n(details)")
            events.append(f"disconnect {self.name}")
            del connected[self.name]

        def connect(self, container: Any, aliases: Any) -> None:
            events.append(f"connect {self.name} {aliases}")
            connected[self.name] = {"Aliases": aliases}

    class Container:
        status = "running"

        @property
        def attrs(self) -> dict[str, Any]:
            return {"NetworkSettings": {"Networks": dict(connected)}}

    class Client:
        class containers:  # the docker package's attribute names
            @staticmethod
            def get(container_id: str) -> Any:
                return Container()

        class networks:
            @staticmethod
            def get(name: str) -> Network:
                return Network(name)

    engine = ContainerEngine(Client())
    with pytest.raises(FleetsimError, match="could not disconnect tier-pod-1 from second: "
                                            "500 Server Error: boom"):
        engine.disconnect(PodContainer("f" * 64, "tier-pod-1", "running"))
    assert events == ["disconnect first", "connect first ['pod']"]
