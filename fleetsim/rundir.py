"""The run directory (``.fleetsim/``): how separate commands find a running fleet.

It holds ``run.json`` (store URL, bus endpoints, coordinator and pod pids),
``children.json`` (every process a fleet of this directory started, recorded
the moment it was spawned), pod logs, the embedded database and exported
histories. It is readable by its owner only, since the store URL may carry a
password.

Pids get reused, so a pid alone never decides what to signal: every process
is recorded with its create time and command line, and both must still
match (:meth:`ProcessRecord.is_running`) before fleetsim signals it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from fleetsim.errors import ConfigError, FleetNotRunning

RUN_FILE = "run.json"
CHILDREN_FILE = "children.json"
# psutil's create time is the boot time (whole seconds of wall clock, which
# can move by one when the clock is adjusted) plus ticks since boot; where
# the ticks themselves are readable (Linux) they are compared exactly.
_CREATE_TIME_SLACK_S = 1.0
# Kinds of process a fleet starts, and what `down` calls them.
KINDS = ("coordinator", "store", "proxy", "spawner", "pod")


@dataclass(frozen=True)
class RunDir:
    """A run directory on disk."""

    path: Path

    @property
    def run_file(self) -> Path:
        """``run.json``: the running fleet's description."""
        return self.path / RUN_FILE

    @property
    def logs(self) -> Path:
        """Pod and coordinator logs."""
        return self.path / "logs"

    @property
    def pgdata(self) -> Path:
        """The embedded PostgreSQL's data directory."""
        return self.path / "pgdata"

    @property
    def children_file(self) -> Path:
        """``children.json``: every process a fleet of this directory started."""
        return self.path / CHILDREN_FILE

    def ensure(self) -> RunDir:
        """Create the directory (mode 0700) and its logs folder."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
            self.logs.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use run directory {self.path}: {exc.strerror}") from None
        return self

    def write(self, data: dict[str, Any]) -> None:
        """Atomically replace ``run.json`` (mode 0600)."""
        _write_json(self.run_file, data)

    def read(self) -> dict[str, Any]:
        """The contents of ``run.json``, checked field by field.

        FleetNotRunning if there is none; ConfigError (one line, no
        traceback) if it is not a run file this version of fleetsim wrote.
        """
        try:
            data = json.loads(self.run_file.read_text())
        except FileNotFoundError:
            raise FleetNotRunning(
                f"no fleet in {self.path} (start one with `fleetsim up`)"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable {self.run_file}: {exc}") from None
        problem = run_file_problem(data)
        if problem is not None:
            raise ConfigError(f"invalid {self.run_file}: {problem}")
        checked: dict[str, Any] = data
        return checked

    def read_running(self) -> dict[str, Any]:
        """``run.json`` of a fleet whose coordinator is alive (and is the one recorded)."""
        data = self.read()
        pid = data["coordinator_pid"]
        coordinator = coordinator_record(data)
        if coordinator is None or not coordinator.is_running():
            raise FleetNotRunning(
                f"the fleet in {self.path} is not running (coordinator pid {pid} is gone"
                " or is another process now); start one with `fleetsim up`"
            )
        return data

    # -- children.json ---------------------------------------------------------

    @contextlib.contextmanager
    def _children_locked(self) -> Iterator[None]:
        """Serialise read-modify-write of ``children.json`` across processes."""
        fd = os.open(self.path / ".children.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def children(self) -> list[ProcessRecord]:
        """Every process recorded in ``children.json`` (alive or not)."""
        try:
            data = json.loads(self.children_file.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unreadable {self.children_file}: {exc}") from None
        if not isinstance(data, list):
            raise ConfigError(f"invalid {self.children_file}: not a list")
        try:
            return [ProcessRecord.from_dict(item) for item in data]
        except ValueError as exc:
            raise ConfigError(f"invalid {self.children_file}: {exc}") from None

    def record_child(self, record: ProcessRecord) -> None:
        """Add a just-spawned process; forget recorded processes that are gone."""
        with self._children_locked():
            kept = [c for c in self.children() if c.kind == "store" or not c.is_gone()]
            kept = [c for c in kept if not c.same_as(record)]
            _write_json(self.children_file, [c.to_dict() for c in [*kept, record]])

    def forget_children(self, records: list[ProcessRecord]) -> None:
        """Drop ``records`` (stopped) and every recorded process that is gone."""
        with self._children_locked():
            kept = [c for c in self.children() if not any(c.same_as(r) for r in records)]
            kept = [c for c in kept if c.kind == "store" or not c.is_gone()]
            if kept:
                _write_json(self.children_file, [c.to_dict() for c in kept])
            else:
                self.children_file.unlink(missing_ok=True)

    def live_children(self) -> list[ProcessRecord]:
        """Recorded processes still running as themselves (the store: if it runs)."""
        return [c for c in self.children() if c.is_running()]

    def remove_run_file(self) -> None:
        """Forget the fleet (after a clean shutdown)."""
        self.run_file.unlink(missing_ok=True)


@dataclass(frozen=True)
class ProcessRecord:
    """A process a fleet started, as recorded when it was spawned.

    ``kind`` is one of :data:`KINDS`; ``name`` is what people call it (a pod
    id, ``fault-proxy``). The embedded server (kind ``store``) is recorded by
    its data directory before it starts, since `pg_ctl` daemonises it and
    :class:`~fleetsim.store.embedded.EmbeddedPostgres` finds (and checks) its
    postmaster from there.
    """

    kind: str
    name: str
    pid: int | None = None
    create_time: float | None = None
    cmdline: tuple[str, ...] = ()
    pgdata: str | None = None
    start_ticks: int | None = None  # Linux: clock ticks from boot to the process's start

    @classmethod
    def of(cls, kind: str, name: str, pid: int,
           cmdline: list[str] | None = None) -> ProcessRecord:
        """Record the live process ``pid``: its create time, and ``cmdline``.

        Pass the argv the process was spawned with: right after the spawn
        ``/proc/<pid>/cmdline`` can still read empty.
        """
        try:
            proc = psutil.Process(pid)
            args = tuple(cmdline) if cmdline is not None else _cmdline(proc)
            return cls(kind, name, pid, proc.create_time(), args,
                       start_ticks=_start_ticks(pid))
        except psutil.Error:
            # Already gone (or unreadable): no identity, so it is never signalled.
            return cls(kind, name, pid)

    @classmethod
    def store(cls, pgdata: Path) -> ProcessRecord:
        """The embedded server of ``pgdata``."""
        return cls("store", "embedded PostgreSQL", pgdata=str(Path(pgdata).resolve()))

    @classmethod
    def from_dict(cls, data: Any) -> ProcessRecord:
        """A record from ``children.json`` / ``run.json``; ValueError if malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"a process record must be an object, got {_kind_of(data)}")
        kind, name = data.get("kind"), data.get("name")
        pid, create_time = data.get("pid"), data.get("create_time")
        cmdline, pgdata = data.get("cmdline", []), data.get("pgdata")
        start_ticks = data.get("start_ticks")
        if start_ticks is not None and (isinstance(start_ticks, bool)
                                        or not isinstance(start_ticks, int)):
            raise ValueError(f"start_ticks must be an integer, got {start_ticks!r}")
        if kind not in KINDS:
            raise ValueError(f"unknown process kind {kind!r}")
        if not isinstance(name, str):
            raise ValueError(f"a process name must be a string, got {_kind_of(name)}")
        if pid is not None and not _is_pid(pid):
            raise ValueError(f"pid must be a positive integer, got {pid!r}")
        if create_time is not None and (isinstance(create_time, bool)
                                        or not isinstance(create_time, int | float)):
            raise ValueError(f"create_time must be a number, got {create_time!r}")
        if not isinstance(cmdline, list) or not all(isinstance(a, str) for a in cmdline):
            raise ValueError("cmdline must be a list of strings")
        if pgdata is not None and not isinstance(pgdata, str):
            raise ValueError("pgdata must be a string")
        if kind == "store" and pgdata is None:
            raise ValueError("the store record names no pgdata")
        return cls(kind, name, pid, None if create_time is None else float(create_time),
                   tuple(cmdline), pgdata, start_ticks)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON."""
        return {"kind": self.kind, "name": self.name, "pid": self.pid,
                "create_time": self.create_time, "cmdline": list(self.cmdline),
                "pgdata": self.pgdata, "start_ticks": self.start_ticks}

    def same_as(self, other: ProcessRecord) -> bool:
        """Whether two records describe the same process."""
        if self.kind == "store" or other.kind == "store":
            return self.kind == other.kind and self.pgdata == other.pgdata
        if self.start_ticks is not None and other.start_ticks is not None:
            return (self.pid, self.start_ticks) == (other.pid, other.start_ticks)
        return (self.pid, self.create_time) == (other.pid, other.create_time)

    def is_running(self) -> bool:
        """Whether the recorded process still runs: same pid, create time and command line.

        A record without an identity (create time, command line) never
        matches: fleetsim does not signal what it cannot tell apart.
        """
        if self.kind == "store":
            from fleetsim.store.embedded import EmbeddedPostgres

            return self.pgdata is not None and EmbeddedPostgres(Path(self.pgdata)).is_running()
        if self.pid is None or self.pid <= 1 or self.create_time is None or not self.cmdline:
            return False
        try:
            return not self._gone() and _cmdline(psutil.Process(self.pid)) == self.cmdline
        except psutil.Error:
            return False

    def is_gone(self) -> bool:
        """Whether the recorded process has certainly ended (its pid is free or reused).

        Weaker than ``not is_running()``: an unreadable command line does not
        make a process gone, so its record is kept.
        """
        if self.kind == "store":
            return not self.is_running()
        if self.pid is None or self.create_time is None:
            return True
        try:
            return self._gone()
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False

    def _gone(self) -> bool:
        assert self.pid is not None and self.create_time is not None
        proc = psutil.Process(self.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        ticks = _start_ticks(self.pid) if self.start_ticks is not None else None
        if ticks is not None:
            return ticks != self.start_ticks
        return bool(abs(proc.create_time() - self.create_time) > _CREATE_TIME_SLACK_S)

    def signal(self, signum: int) -> bool:
        """Send ``signum`` if (and only if) the recorded process still runs; True if sent.

        On Linux the check and the signal go through one pidfd, so the pid
        cannot be reused between them.
        """
        if self.kind == "store" or self.pid is None:
            return False
        pidfd = None
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(self.pid)
        try:
            if not self.is_running():
                return False
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(self.pid, signum)
            return True
        except ProcessLookupError:
            return False
        finally:
            if pidfd is not None:
                os.close(pidfd)


def stop_processes(records: list[ProcessRecord], grace_s: float) -> list[ProcessRecord]:
    """SIGTERM the recorded processes still running, SIGKILL them after ``grace_s``.

    Returns the ones that were running (and so were stopped). Only verified
    processes are signalled (:meth:`ProcessRecord.signal`).
    """
    stopped = [r for r in records if r.kind != "store" and r.signal(signal.SIGTERM)]
    deadline = time.monotonic() + grace_s
    while any(r.is_running() for r in stopped) and time.monotonic() < deadline:
        time.sleep(0.05)
    for record in stopped:
        record.signal(signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while any(r.is_running() for r in stopped) and time.monotonic() < deadline:
        time.sleep(0.05)
    return stopped


def coordinator_record(data: dict[str, Any]) -> ProcessRecord | None:
    """The coordinator's identity in a checked ``run.json`` (None if it has none)."""
    identity = data.get("coordinator")
    if identity is None:
        return None
    record = ProcessRecord.from_dict(identity)
    return record if record.pid == data["coordinator_pid"] else None


def run_file_problem(data: Any) -> str | None:
    """What is wrong with the contents of a ``run.json``, or None if nothing is."""
    if not isinstance(data, dict):
        return f"expected an object, got {_kind_of(data)}"
    if "coordinator_pid" not in data:
        return "no coordinator_pid"
    if not _is_pid(data["coordinator_pid"]):
        return f"coordinator_pid must be a positive integer, got {data['coordinator_pid']!r}"
    optional: dict[str, tuple[type, ...]] = {
        "version": (int,), "state": (str,), "store_url": (str,), "schema": (str,),
        "embedded": (bool,), "pgdata": (str,), "timings": (dict,), "workload": (str,),
        "queues": (list,), "restart": (bool,), "pods": (list,), "bus": (dict,),
        "bus_keys": (str,), "coordinator": (dict,),
    }
    for name, types in optional.items():
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"{name} must be {types[0].__name__}, got {_kind_of(value)}"
    if data.get("proxy_pid") is not None and not _is_pid(data["proxy_pid"]):
        return f"proxy_pid must be a positive integer, got {data['proxy_pid']!r}"
    for pod in data.get("pods") or []:
        if (not isinstance(pod, dict) or not isinstance(pod.get("id"), str)
                or not _is_pid(pod.get("pid"))
                or isinstance(pod.get("incarnation", 0), bool)
                or not isinstance(pod.get("incarnation", 0), int)):
            return f"each pod must have a string id, a pid and an integer incarnation: {pod!r}"
    if not all(isinstance(q, str) for q in data.get("queues") or []):
        return "queues must be strings"
    if not all(isinstance(v, str) for v in (data.get("bus") or {}).values()):
        return "bus endpoints must be strings"
    if data.get("coordinator") is not None:
        try:
            ProcessRecord.from_dict(data["coordinator"])
        except ValueError as exc:
            return f"coordinator: {exc}"
    return None


def _cmdline(proc: psutil.Process) -> tuple[str, ...]:
    """A live process's command line (re-read while it is still empty, just after exec)."""
    deadline = time.monotonic() + 0.5
    while True:
        args = tuple(proc.cmdline())
        if args or time.monotonic() > deadline:
            return args
        time.sleep(0.01)


def _start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat``: the start in ticks since boot (None if unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _is_pid(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _kind_of(value: Any) -> str:
    return {list: "a list", dict: "an object", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                      type(value).__name__)


def _write_json(path: Path, data: Any) -> None:
    """Atomically replace ``path`` with ``data`` as JSON (mode 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2, sort_keys=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
