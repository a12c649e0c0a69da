"""Applies faults to a running fleet: the coordinator's chaos actions.

Every action returns a JSON-ready dict saying what it did, and is appended to
``faults.jsonl`` in the run directory with a timestamp, so a failure can be
replayed. Faults with a duration are healed by a timer; ``heal`` ends them
early. Kills and pauses are real signals; partitions are the pod's fault
proxy (store) or a bus partition; storage faults are a bus command the pod
applies at its SQL layer. A pod that runs in a container of a Docker engine
this process reaches is killed, frozen and cut off through the engine
instead (chaos/containers.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from chaos.containers import ContainerEngine, PodContainer
from fleetsim.bus import (
    BusPartition,
    ClearStorageFault,
    Error,
    HangNextStep,
    SelfKill,
    SetStorageFault,
)
from fleetsim.durations import parse_duration
from fleetsim.errors import BusError, ConfigError, FleetsimError
from fleetsim.rundir import pid_alive

log = logging.getLogger("fleetsim.chaos")

PARTITION_FROM = ("store", "bus", "all")
# How long the bus goes on listing a pod after its last message
# (BusService.connected_pods): a remote pod killed more recently may still
# be listed, dead.
REMOTE_SILENCE_S = 5.0
PARTITION_MODES = ("blackhole", "reset")


class Fleet(Protocol):
    """What the injector needs from the coordinator."""

    def pod_pids(self) -> dict[str, int]:
        """Pods this coordinator spawned and their pids."""

    def remote_pods(self) -> list[str]:
        """Pods connected over the bus that this coordinator did not spawn."""

    def leader(self) -> tuple[str, int] | None:
        """(pod id, term) of the current leader, from the store."""

    def send_command(self, pod_id: str, command: Any) -> Any:
        """Send a bus command to a pod and return its reply."""

    def set_proxy_fault(self, pod_id: str, mode: str | None) -> None:
        """Put the pod's store proxy in ``mode`` (None: heal)."""

    def restart_store(self) -> dict[str, Any]:
        """Restart the PostgreSQL server; return what happened."""

    # Optional: ``pod_hosts() -> dict[str, str]``, the host name of every
    # pod the store has alive, lets the injector find pods that run in
    # containers (see _pod_hosts); ``pod_registration(pod) -> (incarnation,
    # pid) | None`` and ``record_remote_exit(pod, incarnation, pid, *,
    # returncode) -> bool`` let it record the certain death of a pod whose
    # container it killed (see _record_container_exit).


@dataclass
class _ActiveFault:
    action: str
    pod: str
    timer: threading.Timer | None
    undo: Callable[[], None]


class FaultInjector:
    """Chaos actions against one fleet."""

    def __init__(self, fleet: Fleet, *, seed: int = 0, log_path: Path | None = None,
                 containers: bool = True) -> None:
        self.fleet = fleet
        self.rng = random.Random(seed)
        self.log_path = log_path
        self._lock = threading.RLock()
        self._active: list[_ActiveFault] = []
        # pod -> (when this injector killed it, its pid; None for a remote pod)
        self._killed: dict[str, tuple[float, int | None]] = {}
        # The Docker engine, looked for on first need (containers=False: never).
        self._containers = containers
        self._engine: ContainerEngine | None = None
        self._engine_why = "not looked for yet"
        self._engine_checked_at: float | None = None
        self._engine_lock = threading.Lock()

    # -- entry point ----------------------------------------------------------

    def apply(self, action: str, target: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Apply one action; ConfigError/BusError for a bad target or parameter."""
        handlers: dict[str, Callable[[str | None, dict[str, Any]], dict[str, Any]]] = {
            "kill": self.kill,
            "kill-leader": lambda _t, p: self.kill("leader", p),
            "pause": self.pause,
            "resume": self.resume,
            "partition": self.partition,
            "heal": self.heal,
            "storage-fault": self.storage_fault,
            "store-restart": lambda _t, _p: self.fleet.restart_store(),
            "hang": self.hang,
        }
        handler = handlers.get(action)
        if handler is None:
            raise ConfigError(f"unknown chaos action {action!r}")
        started = time.time()
        try:
            result = handler(target, dict(params))
        except FleetsimError as exc:
            self._record(action, target, params, started, error=str(exc))
            raise
        self._record(action, target, params, started, result=result)
        return {"action": action, **result}

    # -- targets --------------------------------------------------------------

    def resolve(self, target: str | None, *, allow_all: bool = False) -> list[str]:
        """Pod ids named by a target: a pod id, ``leader``, ``random`` or ``all``.

        ``random`` and ``all`` choose among live pods only (see
        :meth:`live_pods`): a pod killed a moment ago is never picked again,
        even before the store declares it dead.
        """
        pods = self.live_pods()
        if target in (None, ""):
            raise ConfigError("name a target pod (a pod id, leader, random"
                              + (" or all)" if allow_all else ")"))
        if target == "leader":
            lead = self.fleet.leader()
            if lead is None:
                raise ConfigError("there is no leader right now")
            if lead[0] not in pods:
                if lead[0] in self._killed or lead[0] in _known_pods(self.fleet):
                    raise ConfigError(f"the leader {lead[0]} is not running (its lease has "
                                      "not expired yet); try again once a new leader is "
                                      "elected")
                raise ConfigError(f"the leader {lead[0]} is out of reach: not a pod of this "
                                  "fleet, nor heard on its bus (`fleetsim pod --join`)")
            return [lead[0]]
        if target == "random":
            if not pods:
                raise ConfigError("there are no live pods to choose from")
            return [self.rng.choice(pods)]
        if target == "all":
            if not allow_all:
                raise ConfigError("this action takes one pod, not all")
            if not pods:
                raise ConfigError("there are no live pods")
            return pods
        assert target is not None
        if target not in pods:
            shown = ", ".join(pods) or "none"
            if target in self._killed or target in _known_pods(self.fleet):
                raise ConfigError(f"{target} is not running (it was killed or exited); "
                                  f"live pods: {shown}")
            raise ConfigError(f"no pod named {target!r} (live pods: {shown})")
        return [target]

    def live_pods(self) -> list[str]:
        """Pods a fault can hit now, sorted: the fleet's running children (a
        killed child not yet reaped is not running), and remote pods heard on
        the bus, except one this injector killed within the bus's silence
        window (it is still "heard" for that long after it died).

        The set is bounded: ``_killed`` holds one entry per pod id.
        """
        now = time.monotonic()
        with self._lock:
            killed = dict(self._killed)
        # A child this injector killed is gone even while the signal is still
        # being delivered (its pid still runs for a moment); its respawn,
        # with a new pid, is live.
        local = {pod for pod, pid in self.fleet.pod_pids().items()
                 if pid_alive(pid) and killed.get(pod, (0.0, None))[1] != pid}
        gone = {pod for pod, (at, pid) in killed.items()
                if pid is None and now - at < REMOTE_SILENCE_S}
        remote = set(self.fleet.remote_pods()) - gone
        in_containers = set(self._containers_of(exclude=set(self.fleet.pod_pids()))) - gone
        return sorted(local | remote | in_containers, key=_natural_key)

    def faultable_pods(self) -> list[str]:
        """Live pods that every action can reach: children of this fleet and
        pods in containers of the engine (remote pods on the bus can only be
        killed or given storage faults). Scenarios choose among these."""
        local = set(self.fleet.pod_pids())
        in_containers = self._containers_of(exclude=local)
        return [p for p in self.live_pods() if p in local or p in in_containers]

    # -- pods in containers ---------------------------------------------------

    def engine(self) -> ContainerEngine | None:
        """The Docker engine, if one answers here (looked for again after a
        minute when it did not)."""
        if not self._containers:
            return None
        # Not under self._lock: connecting may take the engine's timeout, and
        # heals and expiry timers need that lock meanwhile.
        with self._engine_lock:
            now = time.monotonic()
            if self._engine is None and (self._engine_checked_at is None
                                         or now - self._engine_checked_at > 60.0):
                self._engine, self._engine_why = ContainerEngine.connect()
                self._engine_checked_at = now
            return self._engine

    def _containers_of(self, exclude: set[str]) -> dict[str, PodContainer]:
        """Pods the store has alive that run in a container of the engine.

        Children of this fleet (``exclude``) are reached by signals even when
        the fleet itself runs in a container.
        """
        hosts = {pod: host for pod, host in _pod_hosts(self.fleet).items()
                 if pod not in exclude}
        engine = self.engine() if hosts else None
        if engine is None:
            return {}
        try:
            return engine.containers_for(hosts)
        except FleetsimError as exc:
            # The engine went away (or restarts): faults on the fleet's own
            # pods go on; container pods are out of reach meanwhile.
            log.warning("pods in containers are out of reach: %s", exc)
            return {}

    def _container(self, pod: str) -> PodContainer | None:
        """The container ``pod`` runs in, when it is not our child and the
        engine is reachable; else None."""
        if pod in self.fleet.pod_pids():
            return None
        return self._containers_of(exclude=set()).get(pod)

    def _pid(self, pod: str) -> int:
        pid = self.fleet.pod_pids().get(pod)
        if pid is None:
            if pod in self.fleet.remote_pods():
                raise ConfigError(f"{pod} runs on another host: it can be killed (over the bus)"
                                  " or given storage faults, not paused or partitioned here; "
                                  "in a container of a Docker engine this coordinator reaches"
                                  f" it could be ({self._engine_why})")
            raise ConfigError(f"no pod named {pod!r}")
        return pid

    # -- actions --------------------------------------------------------------

    def kill(self, target: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """SIGKILL a pod (``leader``, ``random`` or an id)."""
        lead = self.fleet.leader()
        (pod,) = self.resolve(target)
        term = lead[1] if lead is not None and lead[0] == pod else None
        container = self._container(pod)
        if container is not None:
            engine = self._require_engine()
            # Read before the kill: a container restarted at once registers
            # the next incarnation, which this death must not touch.
            registration = _registration(self.fleet, pod)
            self._resume_if_paused(pod)  # the engine refuses to kill a paused container
            engine.kill(container)
            with self._lock:
                self._killed[pod] = (time.monotonic(), None)
            return {"pod": pod, "pid": None, "term": term, "via": "engine",
                    "container": container.name,
                    "exit_recorded": self._record_container_exit(engine, container, pod,
                                                                 registration)}
        if pod not in self.fleet.pod_pids():
            # Not our child: ask it to SIGKILL itself.
            self._check(self.fleet.send_command(pod, SelfKill()))
            with self._lock:
                self._killed[pod] = (time.monotonic(), None)
            return {"pod": pod, "pid": None, "term": lead[1] if lead and lead[0] == pod else None}
        pid = self._pid(pod)
        self._resume_if_paused(pod)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            raise ConfigError(f"{pod} (pid {pid}) is not running") from None
        with self._lock:
            self._killed[pod] = (time.monotonic(), pid)
        return {"pod": pod, "pid": pid, "term": term}

    def _record_container_exit(self, engine: ContainerEngine, container: PodContainer,
                               pod: str, registration: tuple[int, int | None] | None) -> bool:
        """Once the engine has seen the killed container stop, record the pod's
        certain death (as the coordinator does for its children), so its lease
        and steps are freed now rather than after the dead threshold. False if
        not recorded: the pod's silence gives it away later, as before."""
        record = getattr(self.fleet, "record_remote_exit", None)
        if registration is None or not callable(record):
            return False
        try:
            engine.wait_stopped(container)
            return bool(record(pod, *registration, returncode=-signal.SIGKILL))
        except FleetsimError as exc:
            log.warning("%s was killed; its death is left to the dead threshold: %s", pod, exc)
            return False

    def pause(self, target: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """SIGSTOP a pod; SIGCONT after ``for`` if given."""
        (pod,) = self.resolve(target)
        duration = _duration(params.get("for"))
        container = self._container(pod)
        if container is not None:
            engine = self._require_engine()
            engine.pause(container)
            self._track("pause", pod, duration, functools.partial(engine.unpause, container))
            return {"pod": pod, "pid": None, "for_s": duration, "via": "engine",
                    "container": container.name}
        pid = self._pid(pod)
        os.kill(pid, signal.SIGSTOP)
        self._track("pause", pod, duration, lambda: _signal(pid, signal.SIGCONT))
        return {"pod": pod, "pid": pid, "for_s": duration}

    def resume(self, target: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """SIGCONT a paused pod (or thaw its container)."""
        (pod,) = self.resolve(target)
        container = self._container(pod)
        if container is not None:
            self._end(lambda f: f.action == "pause" and f.pod == pod)
            self._require_engine().unpause(container)
            return {"pod": pod, "pid": None, "via": "engine", "container": container.name}
        pid = self._pid(pod)
        self._end(lambda f: f.action == "pause" and f.pod == pod)
        _signal(pid, signal.SIGCONT)
        return {"pod": pod, "pid": pid}

    def partition(self, target: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Cut a pod off from the store (its proxy), the bus, or both."""
        (pod,) = self.resolve(target)
        where = params.get("from", "store")
        mode = params.get("mode", "blackhole")
        if where not in PARTITION_FROM:
            raise ConfigError(f"--from must be one of {', '.join(PARTITION_FROM)}, got {where!r}")
        if mode not in PARTITION_MODES:
            raise ConfigError(f"--mode must be one of {', '.join(PARTITION_MODES)}, got {mode!r}")
        duration = _duration(params.get("for"))
        container = self._container(pod) if where in ("store", "all") else None
        if container is not None:
            # No proxy sits on a container's path: it leaves every network,
            # which cuts it off the store and the bus alike.
            engine = self._require_engine()
            cut = engine.disconnect(container)
            self._track("partition-network", pod, duration,
                        functools.partial(engine.reconnect, cut))
            return {"pod": pod, "from": "network", "mode": "disconnect", "for_s": duration,
                    "via": "engine", "container": container.name,
                    "networks": sorted(cut.networks)}
        if where in ("store", "all"):
            self._pid(pod)  # only our own pods reach the store through our proxies
            self.fleet.set_proxy_fault(pod, mode)
            self._track("partition-store", pod, duration,
                        lambda: self.fleet.set_proxy_fault(pod, None))
        if where in ("bus", "all"):
            # The pod itself goes deaf and mute on the bus; it ends by itself.
            self._check(self.fleet.send_command(
                pod, BusPartition(duration or BusPartition.DEFAULT_S)))
        return {"pod": pod, "from": where, "mode": mode, "for_s": duration}

    def heal(self, target: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """End partitions and pauses (of one pod, or all)."""
        pods = None if target in (None, "", "all") else set(self.resolve(target))
        ended = self._end(lambda f: pods is None or f.pod in pods)
        return {"healed": ended}

    def storage_fault(self, target: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Errors, latency, disconnects and lost replies on the pods' store statements."""
        pods = self.resolve(target, allow_all=True)
        duration = _duration(params.get("for"))
        command = SetStorageFault(
            error_rate=float(params.get("error_rate", 0.0)),
            latency_ms=float(params.get("latency_ms", 0.0)),
            disconnect_rate=float(params.get("disconnect_rate", 0.0)),
            duration_s=duration,
            reply_loss_rate=float(params.get("reply_loss_rate", 0.0)),
        )
        applied = []
        for pod in pods:
            self._check(self.fleet.send_command(pod, command))
            applied.append(pod)
            # The pod ends the fault itself after the duration (the timer here only
            # forgets it, with a redundant clear); heal clears it early.
            self._track("storage-fault", pod, duration,
                        functools.partial(self.fleet.send_command, pod, ClearStorageFault()))
        return {"pods": applied, "error_rate": command.error_rate,
                "latency_ms": command.latency_ms, "disconnect_rate": command.disconnect_rate,
                "reply_loss_rate": command.reply_loss_rate, "for_s": duration}

    def hang(self, target: str | None, params: dict[str, Any]) -> dict[str, Any]:
        """Make one pod's next step hang (``for`` seconds; default an hour)."""
        (pod,) = self.resolve(target)
        hang_s = _duration(params.get("for"))
        self._check(self.fleet.send_command(pod, HangNextStep(hang_s)))
        return {"pods": [pod], "for_s": hang_s}

    def heal_all(self) -> None:
        """End every fault (the coordinator calls this before stopping)."""
        self._end(lambda f: True)

    # -- bookkeeping ----------------------------------------------------------

    def _track(self, action: str, pod: str, duration: float | None,
               undo: Callable[[], None]) -> None:
        fault = _ActiveFault(action, pod, None, undo)
        if duration is not None:
            fault.timer = threading.Timer(duration, self._expire, (fault,))
            fault.timer.daemon = True
            fault.timer.start()
        with self._lock:
            self._active.append(fault)

    def _expire(self, fault: _ActiveFault) -> None:
        with self._lock:
            if fault not in self._active:
                return
            self._active.remove(fault)
        self._quiet(fault.undo)
        self._record(f"end-{fault.action}", fault.pod, {}, time.time(), result={"expired": True})

    def _end(self, which: Callable[[_ActiveFault], bool]) -> list[str]:
        with self._lock:
            ending = [f for f in self._active if which(f)]
            self._active = [f for f in self._active if f not in ending]
        for fault in ending:
            if fault.timer is not None:
                fault.timer.cancel()
            self._quiet(fault.undo)
        return [f"{f.action}:{f.pod}" for f in ending]

    def _resume_if_paused(self, pod: str) -> None:
        self._end(lambda f: f.action == "pause" and f.pod == pod)

    def _require_engine(self) -> ContainerEngine:
        engine = self.engine()
        if engine is None:
            raise FleetsimError(f"the Docker engine went away: {self._engine_why}")
        return engine

    @staticmethod
    def _check(reply: Any) -> None:
        if isinstance(reply, Error):
            raise BusError(f"the pod refused: {reply.message}")

    @staticmethod
    def _quiet(call: Callable[..., Any], *args: Any) -> None:
        try:
            call(*args)
        except Exception as exc:
            log.warning("undoing a fault failed: %s", exc)

    def _record(self, action: str, target: str | None, params: dict[str, Any], started: float,
                **outcome: Any) -> None:
        if self.log_path is None:
            return
        line = {"type": "action", "ts": started, "action": action, "target": target,
                "params": params, **outcome}
        with self._lock, open(self.log_path, "a") as out:
            out.write(json.dumps(line, default=str) + "\n")


def _duration(value: Any) -> float | None:
    """A fault's ``for``: None (until healed) or a duration longer than zero.

    Zero is refused rather than read as "for ever": ``--for 0s`` is never
    meant to outlast the fleet.
    """
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ConfigError(f"--for must be longer than zero, got {value!r} (leave it out to "
                          "last until `chaos heal`)")
    return seconds


def _pod_hosts(fleet: Fleet) -> dict[str, str]:
    """The host name of every pod the store has alive, if the fleet can tell."""
    hosts = getattr(fleet, "pod_hosts", None)
    return dict(hosts()) if callable(hosts) else {}


def _registration(fleet: Fleet, pod: str) -> tuple[int, int | None] | None:
    """(incarnation, pid) of the pod's live registration in the store, if the fleet can tell."""
    registration = getattr(fleet, "pod_registration", None)
    if not callable(registration):
        return None
    try:
        found: tuple[int, int | None] | None = registration(pod)
    except FleetsimError:
        return None
    return found


def _known_pods(fleet: Fleet) -> list[str]:
    """Every pod the fleet ran, live or not, if it can tell."""
    known = getattr(fleet, "known_pods", None)
    return list(known()) if callable(known) else []


def _natural_key(pod_id: str) -> tuple[str, int]:
    """Sort pod-2 before pod-10."""
    prefix, _, number = pod_id.rpartition("-")
    return (prefix, int(number)) if number.isdigit() else (pod_id, 0)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
