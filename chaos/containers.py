"""Faults on pods that run in containers, through the Docker engine's API.

A pod that runs in a container of the engine (``docker compose up --scale
pod=3 pod``, or ``docker run ... fleetsim pod``) is a host of its own: it
has its own network namespace and address, and no fault proxy of the
coordinator sits on its path to the store. The injector therefore acts on
the container itself, the way Pumba and Blockade do:

- ``kill``: the engine SIGKILLs the container's processes (``docker kill``);
  once the engine has seen them end, the pod's death is certain and is
  recorded in the store at once, as for the coordinator's own children
  (its connections terminated, its lease freed: Store.record_exit);
- ``pause``: the engine freezes the container's cgroup (``docker pause``)
  and thaws it on heal;
- ``partition``: the container is disconnected from every network it is
  on, which cuts it off the store and the bus alike, and reconnected with
  the aliases it had on heal.

A pod is matched to its container by host name: every pod registers its
host name in the store, and a container's host name is its short id unless
the compose file sets another. The container this process runs in is
never a target (its own pods are children, reached by signals).

The engine is reached through the ``docker`` package (``pip install
'fleetsim[containers]'``) and the engine's usual environment
(``DOCKER_HOST``, else ``/var/run/docker.sock``). Whoever can use that
socket is root on the host: mounting it into a container is an explicit
opt-in (docker-compose.engine.yml, docs/containers.md).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from fleetsim.errors import ConfigError, FleetsimError

# Containers the engine can fault: running, or frozen by an earlier pause.
_FAULTABLE = ("running", "paused")


@dataclass(frozen=True)
class PodContainer:
    """The container a pod runs in, as the engine names it."""

    id: str
    name: str
    status: str


@dataclass
class Disconnection:
    """What a partition undid: the networks a container was on, with its aliases."""

    container: PodContainer
    networks: dict[str, list[str]] = field(default_factory=dict)


class ContainerEngine:
    """The engine's API, for the few calls a fault needs."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._own_host = socket.gethostname()

    @classmethod
    def connect(cls) -> tuple[ContainerEngine | None, str]:
        """(the engine, "") when one answers here; (None, why not) otherwise.

        ``FLEETSIM_CONTAINER_FAULTS=0`` turns container faults off even when
        an engine answers (the pods are then reached as before: signals for
        children, the bus for joined pods).
        """
        if os.environ.get("FLEETSIM_CONTAINER_FAULTS", "1").strip().lower() in ("0", "no",
                                                                               "false"):
            return None, "container faults are off (FLEETSIM_CONTAINER_FAULTS=0)"
        try:
            import docker  # the optional dependency: fleetsim[containers]
        except ImportError:
            return None, ("the docker package is not installed "
                          "(pip install 'fleetsim[containers]')")
        try:
            client = docker.from_env(timeout=10)
            client.ping()
        except Exception as exc:  # the engine's client raises many kinds
            return None, f"no Docker engine answers here ({_one_line(exc)})"
        return cls(client), ""

    def containers_for(self, hosts: dict[str, str]) -> dict[str, PodContainer]:
        """The running or paused container of each pod that runs in one.

        ``hosts`` maps pod ids to the host names they registered (their
        ``gethostname()``); the result maps those of them that run in a
        container of this engine to it. One listing of the engine serves
        them all. The container this process runs in is never returned.
        """
        wanted = {pod: host for pod, host in hosts.items() if host and host != self._own_host}
        if not wanted:
            return {}
        by_host: dict[str, list[Any]] = {}
        for container in self._engine("list its containers", self._client.containers.list,
                                      all=True):
            if container.status not in _FAULTABLE:
                continue
            # A container on the host's network reports the host's name: it
            # is not the host a pod registered from, whatever it says.
            if container.attrs.get("HostConfig", {}).get("NetworkMode") == "host":
                continue
            name = container.attrs.get("Config", {}).get("Hostname") or ""
            for host in {name, container.id[:12]}:
                if host:
                    by_host.setdefault(host, []).append(container)
        found = {}
        for pod, host in wanted.items():
            matches = {c.id: c for c in by_host.get(host, [])}
            if len(matches) > 1:
                names = ", ".join(sorted(c.name for c in matches.values()))
                raise ConfigError(f"{pod}'s host {host!r} matches several containers "
                                  f"({names}): give each pod container a host name of its own")
            for container in matches.values():
                found[pod] = PodContainer(container.id, container.name, container.status)
        return found

    def kill(self, target: PodContainer) -> None:
        """SIGKILL every process of the container (``docker kill``)."""
        self._call("kill", target, lambda c: c.kill())

    def wait_stopped(self, target: PodContainer, timeout_s: float = 10.0) -> None:
        """Return once the container's processes are gone (FleetsimError after ``timeout_s``).

        After ``docker kill`` the engine has sent SIGKILL; this waits until
        the engine has seen them end, so the pod's process is certainly gone.
        """
        container = self._get(target)
        self._engine(f"wait for container {target.name} to stop", container.wait,
                     timeout=timeout_s, condition="not-running")

    def pause(self, target: PodContainer) -> None:
        """Freeze the container (the cgroup freezer, ``docker pause``)."""
        self._call("pause", target, lambda c: c.pause())

    def unpause(self, target: PodContainer) -> None:
        """Thaw a paused container; nothing if it is not paused any more."""
        container = self._get(target)
        if container.status == "paused":
            self._call("unpause", target, lambda c: c.unpause())

    def disconnect(self, target: PodContainer) -> Disconnection:
        """Take the container off every network; what to reconnect on heal.

        All or nothing: if one network refuses, those already cut are
        reconnected before the error is raised, so no container is left cut
        off with nobody tracking it.
        """
        container = self._get(target)
        networks = container.attrs.get("NetworkSettings", {}).get("Networks") or {}
        cut = Disconnection(target)
        for name, settings in networks.items():
            # Keep the names other containers use for it (compose's service
            # name); the short id is an alias the engine adds by itself.
            aliases = [a for a in (settings or {}).get("Aliases") or []
                       if not target.id.startswith(a)]
            try:
                self._engine(f"disconnect {target.name} from {name}",
                             lambda n=name: self._client.networks.get(n).disconnect(
                                 container, force=True))
            except FleetsimError:
                self.reconnect(cut)
                raise
            cut.networks[name] = aliases
        if not cut.networks:
            raise ConfigError(f"container {target.name} is on no network to cut it off from")
        return cut

    def reconnect(self, cut: Disconnection) -> None:
        """Put the container back on the networks a partition took it off."""
        if not cut.networks:
            return
        container = self._get(cut.container)
        now_on = container.attrs.get("NetworkSettings", {}).get("Networks") or {}
        for name, aliases in cut.networks.items():
            if name not in now_on:
                self._engine(f"reconnect {cut.container.name} to {name}",
                             lambda n=name, a=aliases: self._client.networks.get(n).connect(
                                 container, aliases=a or None))

    def _get(self, target: PodContainer) -> Any:
        return self._engine(f"find container {target.name}", self._client.containers.get,
                            target.id)

    def _call(self, what: str, target: PodContainer, action: Any) -> None:
        container = self._get(target)
        self._engine(f"{what} container {target.name}", action, container)

    @staticmethod
    def _engine(what: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)``; the engine's errors (the docker package
        raises its own kinds and requests') as one FleetsimError line."""
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            raise FleetsimError(f"the Docker engine could not {what}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__
