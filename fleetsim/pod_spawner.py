"""Pods forked from a warm process: how a coordinator starts 50 pods in seconds.

A pod started as ``python -m fleetsim pod ...`` spends about 0.3 CPU-s
importing (SQLAlchemy alone is half of it) before it does anything; 50 of
them on 2 cores took 17 to 20 s to start. The coordinator instead starts
one *spawner* process (``python -m fleetsim.pod_spawner``) that imports
what a pod needs once and then forks a pod per request. A forked pod runs
exactly what ``python -m <module> <args>`` would run (the same CLI, the
same code), in a session of its own, its output appended to its log.

What a spawned process keeps from a plain one:

- **Recorded before it runs.** The child sets its command line (``ps``
  shows ``python -m fleetsim pod --id pod-3 ...``, through setproctitle),
  tells the spawner it is ready and waits; the coordinator reads that
  command line, records the pod in ``children.json`` and only then
  releases it (:meth:`PodSpawner.release`), as ``spawn_recorded`` does for
  an exec'd child. A coordinator killed in between leaves a child that the
  spawner kills when its request pipe closes.
- **A certain death.** The spawner is the pod's parent: it reaps each pod
  and reports its exit status, which ends :meth:`ForkedPod.wait`. The
  coordinator also holds a pidfd of every pod (signals go through it, so a
  reused pid is never signalled); if the spawner itself is gone, a pidfd
  turning readable still says the pod ended, with an unknown status
  (:data:`UNKNOWN_EXIT`).
- **Nothing of the spawner's.** The child closes the spawner's pipes,
  restores default signal handling and takes the environment it was given
  (the store URL travels there, never on a command line).

Protocol (JSON lines; requests on one inherited pipe, replies on another):
``{"op": "spawn", "id", "argv", "env", "log"}`` -> ``{"op": "spawned", "id",
"pid"}`` or ``{"op": "error", "id", "error"}``; ``{"op": "release"|"cancel",
"pid"}``; and, unasked, ``{"op": "exit", "pid", "code"}`` (negative: the
signal that killed it).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleetsim.errors import FleetsimError

log = logging.getLogger(__name__)

# What a pod imports on its way to its claim loop: imported once, here.
PRELOAD = (
    "fleetsim.cli", "fleetsim.cli.fleet", "fleetsim.store", "fleetsim.client_history",
    "fleetsim.bus", "fleetsim.bus.client", "fleetsim.bus.security", "chaos.storage_faults",
    "pods.pod", "pods.config", "pods.exitcodes", "pods.identity", "pods.metrics",
    "pods.workloads", "sqlalchemy.dialects.postgresql.psycopg2", "psycopg2.extras", "zmq",
    "psutil", "tenacity", "setproctitle",
)

# How a coordinator may start its pods (`up --spawn`): forked by the spawner,
# or each a fresh `python -m fleetsim pod`.
SPAWN_MODES = ("fork", "exec")

# The status of a pod that ended while no spawner was left to reap it.
UNKNOWN_EXIT = 255

# How long a forked child may take to say it is ready.
_READY_TIMEOUT_S = 10.0


def fork_available() -> bool:
    """Whether pods can be forked here (Linux: fork, pidfds and /proc)."""
    return hasattr(os, "fork") and hasattr(os, "pidfd_open") and sys.platform == "linux"


def spawner_command(requests_fd: int, replies_fd: int) -> list[str]:
    """The spawner's command line, given the fds of its request and reply pipes."""
    return [sys.executable, "-m", "fleetsim.pod_spawner", "--requests", str(requests_fd),
            "--replies", str(replies_fd)]


def module_argv(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """``(module, args)`` of ``[sys.executable, "-m", module, *args]``, else None."""
    if len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m":
        return argv[2], list(argv[3:])
    return None


# -- the coordinator's side -----------------------------------------------------


class ForkedPod:
    """A pod forked by the spawner, driven like a ``subprocess.Popen``."""

    def __init__(self, pid: int, argv: Sequence[str]) -> None:
        self.pid = pid
        self.args = list(argv)
        self.returncode: int | None = None
        self._ended = threading.Event()
        # Opened while the child waits to be released, so it cannot be
        # reaped (and its pid reused) before this is held, unless something
        # killed it meanwhile: its exit report then follows.
        self.pidfd: int | None = None
        with contextlib.suppress(ProcessLookupError):
            self.pidfd = os.pidfd_open(pid)

    def _set_exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        """The exit status once the spawner reported it (None while it runs)."""
        return self.returncode if self._ended.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit status; ``subprocess.TimeoutExpired`` after ``timeout``."""
        import subprocess

        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        """Signal the pod through its pidfd (a pid reused meanwhile is never hit)."""
        if self._ended.is_set() or self.pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signum)

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Close the pidfd (once the pod has ended)."""
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = None


class SpawnerGone(FleetsimError):
    """The spawner process ended or stopped answering."""


class PodSpawner:
    """The coordinator's handle on its spawner process.

    ``start`` gets the spawner's argv and the two fds the spawner must
    inherit and returns its ``Popen`` (the coordinator records it like any
    child). Thread-safe: spawns from several threads are serialised.
    """

    def __init__(self, start: Any) -> None:
        requests_r, self._requests = os.pipe()
        self._replies, replies_w = os.pipe()
        try:
            self.process = start(spawner_command(requests_r, replies_w), (requests_r, replies_w))
        except BaseException:
            os.close(self._requests)
            os.close(self._replies)
            raise
        finally:
            os.close(requests_r)
            os.close(replies_w)
        self._lock = threading.Lock()  # one request at a time
        self._state = threading.Condition()
        self._replies_by_id: dict[int, dict[str, Any]] = {}
        self._pods: dict[int, ForkedPod] = {}
        self._early_exits: dict[int, int] = {}  # exits reported before their pod was known
        self._next_id = 0
        self.gone = False
        self._reader = threading.Thread(target=self._read_replies, name="pod-spawner",
                                        daemon=True)
        self._reader.start()

    # requests

    def spawn(self, argv: Sequence[str], env: dict[str, str], log_path: Path,
              timeout_s: float = _READY_TIMEOUT_S + 5) -> ForkedPod:
        """Fork a child that will run ``argv`` (``python -m module args``); not yet released.

        The child has its command line and waits: record it, then
        :meth:`release` it (or :meth:`cancel` it). Raises SpawnerGone.
        """
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            self._send({"op": "spawn", "id": request_id, "argv": list(argv), "env": env,
                        "log": str(log_path)})
            deadline = time.monotonic() + timeout_s
            with self._state:
                while request_id not in self._replies_by_id:
                    if self.gone:
                        raise SpawnerGone("the pod spawner is gone")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise SpawnerGone(f"the pod spawner did not answer in {timeout_s:g}s")
                    self._state.wait(left)
                reply = self._replies_by_id.pop(request_id)
            if reply.get("op") != "spawned":
                raise SpawnerGone(f"the pod spawner could not fork: {reply.get('error')}")
            pod = ForkedPod(int(reply["pid"]), argv)
            with self._state:
                self._pods[pod.pid] = pod
                early = self._early_exits.pop(pod.pid, None)
                # The spawner died since it answered: the reader's watch of
                # the orphans began without this one.
                orphan = self.gone
            if early is not None:
                self._ended(pod, early)
            elif orphan:
                threading.Thread(target=self._watch_orphans, args=([pod],), daemon=True,
                                 name="pod-spawner-orphans").start()
            return pod

    def release(self, pod: ForkedPod) -> None:
        """Let a recorded child run."""
        with self._lock:
            self._send({"op": "release", "pid": pod.pid})

    def cancel(self, pod: ForkedPod) -> None:
        """Kill a child that could not be recorded (it never ran)."""
        with self._lock, contextlib.suppress(SpawnerGone):
            self._send({"op": "cancel", "pid": pod.pid})
        pod.kill()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the spawner (its pods are not touched) and wait for it."""
        with contextlib.suppress(OSError):
            os.close(self._requests)
        try:
            self.process.wait(timeout=timeout_s)
        except Exception:  # a spawner that will not stop is killed
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout_s)

    def _send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            while data:
                data = data[os.write(self._requests, data):]
        except OSError as exc:
            raise SpawnerGone(f"the pod spawner is gone ({exc.strerror})") from exc

    # replies

    def _read_replies(self) -> None:
        buffer = b""
        try:
            while True:
                try:
                    chunk = os.read(self._replies, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self._handle(json.loads(line))
        finally:
            os.close(self._replies)
            with self._state:
                self.gone = True
                self._state.notify_all()
                left = [p for p in self._pods.values() if not p._ended.is_set()]
            if left:
                log.warning("the pod spawner is gone: %d pods are watched by pidfd, their "
                            "exit statuses will be unknown", len(left))
                threading.Thread(target=self._watch_orphans, args=(left,), daemon=True,
                                 name="pod-spawner-orphans").start()

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "exit":
            pid, code = int(message["pid"]), int(message["code"])
            with self._state:
                pod = self._pods.get(pid)
                if pod is None:
                    self._early_exits[pid] = code
                    return
            self._ended(pod, code)
        elif op in ("spawned", "error"):
            with self._state:
                self._replies_by_id[int(message["id"])] = message
                self._state.notify_all()

    def _ended(self, pod: ForkedPod, code: int) -> None:
        with self._state:
            self._pods.pop(pod.pid, None)
        pod._set_exit(code)
        pod.close()

    def _watch_orphans(self, pods: list[ForkedPod]) -> None:
        """Without a spawner to reap them: a readable pidfd is the pod's end."""
        watching = {p.pidfd: p for p in pods if p.pidfd is not None}
        for pod in pods:
            if pod.pidfd is None:
                self._ended(pod, UNKNOWN_EXIT)
        poller = select.poll()
        for fd in watching:
            poller.register(fd, select.POLLIN)
        while watching:
            for fd, _ in poller.poll():
                poller.unregister(fd)
                self._ended(watching.pop(fd), UNKNOWN_EXIT)


# -- the spawner process ----------------------------------------------------------


def serve(requests_fd: int, replies_fd: int) -> int:
    """The spawner's loop: fork pods on request, report their exits; ends with its pipe."""
    for name in PRELOAD:
        __import__(name)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the coordinator's to handle
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select
    waiting: dict[int, int] = {}  # pid -> the write end of its release pipe
    buffer = b""

    def reply(message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        with contextlib.suppress(BrokenPipeError):
            while data:
                data = data[os.write(replies_fd, data):]

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            fd = waiting.pop(pid, None)
            if fd is not None:
                os.close(fd)
            reply({"op": "exit", "pid": pid, "code": os.waitstatus_to_exitcode(status)})

    while True:
        try:
            ready, _, _ = select.select([requests_fd, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 4096):
                    pass
            reap()
        if requests_fd not in ready:
            continue
        chunk = os.read(requests_fd, 65536)
        if not chunk:
            # The coordinator is gone: the children it never recorded must
            # not run; the others go on (as exec'd pods do), reparented.
            for pid in list(waiting):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return 0
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            op = request.get("op")
            if op == "spawn":
                # The child keeps none of the spawner's fds: not its pipes, nor
                # the release pipes of other children (a pipe it held open
                # would keep such a child from seeing the spawner's end).
                reply(_fork(request, waiting, close=(requests_fd, replies_fd, wake_r, wake_w,
                                                     *waiting.values())))
            elif op in ("release", "cancel"):
                pid = int(request["pid"])
                fd = waiting.pop(pid, None)
                if op == "cancel":
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if fd is not None:
                    with contextlib.suppress(OSError):
                        if op == "release":
                            os.write(fd, b"g")
                    os.close(fd)
            reap()


def _fork(request: dict[str, Any], waiting: dict[int, int],
          close: tuple[int, ...]) -> dict[str, Any]:
    """Fork one child for a spawn request; return the reply once it is ready."""
    request_id = request.get("id")
    try:
        argv, env, log_path = list(request["argv"]), dict(request["env"]), str(request["log"])
        target = module_argv(argv)
        if target is None:
            raise ValueError(f"not a `python -m module` command: {argv[:3]}")
        go_r, go_w = os.pipe()
        ready_r, ready_w = os.pipe()
    except (KeyError, TypeError, ValueError, OSError) as exc:
        return {"op": "error", "id": request_id, "error": str(exc)}
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            for fd in (*close, go_w, ready_r):
                os.close(fd)
            code = _child(argv, target, env, log_path, go_r, ready_w)
        except BaseException:  # a child must not return into the loop
            with contextlib.suppress(Exception):
                import traceback

                traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(go_r)
    os.close(ready_w)
    try:
        ok = bool(select.select([ready_r], [], [], _READY_TIMEOUT_S)[0]) and \
            os.read(ready_r, 1) == b"r"
    finally:
        os.close(ready_r)
    if not ok:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.close(go_w)
        return {"op": "error", "id": request_id, "error": "the child did not get ready"}
    waiting[pid] = go_w
    return {"op": "spawned", "id": request_id, "pid": pid}


def _child(argv: list[str], target: tuple[str, list[str]], env: dict[str, str],
           log_path: str, go_r: int, ready_w: int) -> int:
    """In the forked child: become the pod, wait to be released, run it; its exit status."""
    import runpy

    from setproctitle import setproctitle

    os.setsid()  # its own session, as `start_new_session` gives an exec'd pod
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    # Unbuffered, as PYTHONUNBUFFERED makes an exec'd pod's output.
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - fd 0 stays open for the process
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True,
                                  line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True,
                                  line_buffering=True, errors="backslashreplace")
    setproctitle(" ".join(argv))
    os.write(ready_w, b"r")
    os.close(ready_w)
    released = _read_byte(go_r)
    os.close(go_r)
    if released != b"g":
        return 1  # cancelled, or the spawner died before releasing it
    os.environ.clear()
    os.environ.update(env)
    module, args = target
    sys.argv = [argv[0], *args]
    code: int = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:  # reported as an uncaught exception would be
        import traceback

        traceback.print_exc()
        code = 1
    # What interpreter exit does: join the non-daemon threads (and the
    # thread pools' own exit hooks), then the atexit functions.
    threading._shutdown()  # type: ignore[attr-defined]
    import atexit

    atexit._run_exitfuncs()
    return code


def _read_byte(fd: int) -> bytes:
    while True:
        try:
            return os.read(fd, 1)
        except InterruptedError:
            continue
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            return b""


def _exit_code(code: Any) -> int:
    """The status ``sys.exit(code)`` gives a process."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fleetsim.pod_spawner --requests FD --replies FD``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fleetsim.pod_spawner",
                                     description="Fork fleetsim pods for a coordinator.")
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--replies", type=int, required=True)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s pod-spawner %(message)s")
    return serve(options.requests, options.replies)


if __name__ == "__main__":
    sys.exit(main())
