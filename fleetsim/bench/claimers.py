"""N claimer processes draining a filled queue: the one harness of the loop rows.

The reference loop (:mod:`fleetsim.bench.reference`) and the store's own
loop (:mod:`fleetsim.bench.storeloop`) differ only in how a process claims
and completes; everything around it is here, once: the processes are
spawned with Ctrl-C blocked, connect, wait at a barrier, start together,
report each completion's time; the server's CPU (their backends, local
server only) and the database's transactions are read around the run.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetsim.bench import server
from fleetsim.bench.measure import percentile
from fleetsim.errors import ConfigError

START_TIMEOUT_S = 120.0


def step_runner(workload: str) -> tuple[str, float]:
    """(kind, seconds) of the workloads a loop can run: noop, sleep:<ms>, cpu:<ms>."""
    kind, _, amount = workload.partition(":")
    if kind == "noop" and not amount:
        return kind, 0.0
    if kind in ("sleep", "cpu"):
        try:
            ms = float(amount)
        except ValueError:
            ms = -1.0
        if ms >= 0:
            return kind, ms / 1000.0
    raise ConfigError(f"the reference loop runs noop, sleep:<ms> and cpu:<ms>, not {workload!r}")


def step_work(workload: str) -> Callable[[], None]:
    """The work of one step of ``workload``, as a function of no arguments."""
    kind, seconds = step_runner(workload)

    def work() -> None:
        if kind == "sleep":
            time.sleep(seconds)
        elif kind == "cpu":
            until = time.process_time() + seconds
            while time.process_time() < until:
                pass

    return work


@dataclass(frozen=True)
class ClaimerResult:
    """One drain of a queue by ``procs`` claimer processes."""

    kind: str  # "reference" or "store"
    procs: int
    batch: int
    workload: str
    steps: int
    completed: int
    seconds: float  # first claim -> last completion
    e2e_s: tuple[float, float, float] | None  # p50/p95/p99, from the start to each completion
    client_cpu_s: float
    server_cpu_s: float | None  # local server only
    transactions: int | None  # the database's, over the run (others' too)
    peak_rss: int  # the largest claimer's, bytes

    @property
    def steps_s(self) -> float:
        """Completed steps per second."""
        return self.completed / self.seconds if self.seconds > 0 else 0.0


class Clock:
    """A claimer's side of the harness: :meth:`ready` once connected, :meth:`done` at the end."""

    def __init__(self, barriers: tuple[Any, Any, Any], results: Any, out: dict[str, Any]) -> None:
        self._barriers = barriers
        self._results = results
        self._out = out
        self._cpu0 = 0.0
        self._start = 0.0

    def ready(self) -> None:
        """Wait for every claimer, then for the start; the clock runs from here."""
        self._barriers[0].wait(timeout=START_TIMEOUT_S)
        self._barriers[1].wait(timeout=START_TIMEOUT_S)
        self._cpu0 = time.process_time()
        self._start = time.monotonic()

    def done(self, done_at: list[float]) -> None:
        """Report the completion times; returns once the parent has read the server's CPU."""
        self._out.update(start=self._start, done_at=done_at,
                         cpu_s=time.process_time() - self._cpu0,
                         rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        self._results.put(self._out)
        # Keep the connection until the parent has counted its backend's CPU.
        self._barriers[2].wait(timeout=START_TIMEOUT_S)


# A loop: (url, schema, app, index, batch, workload, clock) -> None; a module-level
# function, so that a spawned process can import it by name.
Loop = Callable[[str, str, str, int, int, str, Clock], None]


def _claimer(loop: Loop, url: str, schema: str, app: str, index: int, batch: int,
             workload: str, barriers: tuple[Any, Any, Any], results: Any) -> None:
    """One claimer process: run ``loop``; an error aborts the barriers and is reported."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C
    out: dict[str, Any] = {"pid": os.getpid()}
    try:
        loop(url, schema, app, index, batch, workload, Clock(barriers, results, out))
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        for barrier in barriers:
            with contextlib.suppress(Exception):
                barrier.abort()
        results.put(out)


def _first_error(results: Any) -> str:
    """The error a claimer reported (it aborted the barriers), or why none is known."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            out = results.get(timeout=1)
        except queue_mod.Empty:
            continue
        if "error" in out:
            return str(out["error"])
    return "the start was aborted (no error reported)"


def run_claimers(kind: str, loop: Loop, url: str, schema: str, app: str, admin: Any,
                 procs: int, batch: int, steps: int, workload: str) -> ClaimerResult:
    """Drain the filled queue in ``schema`` with ``procs`` processes running ``loop``.

    ``admin`` is a connection of the caller's (application name ``app``
    too, so the claimers' backends are found by that name). Raises
    RuntimeError if a claimer fails; every process started is ended.
    """
    ctx = mp.get_context("spawn")
    barriers = tuple(ctx.Barrier(procs + 1) for _ in range(3))
    results = ctx.Queue()
    children = [ctx.Process(target=_claimer, daemon=True,
                            args=(loop, url, schema, app, i, batch, workload, barriers, results))
                for i in range(procs)]
    try:
        # Started with SIGINT blocked (the mask survives exec): a Ctrl-C during
        # their start must not kill them half-way; the parent ends them.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for child in children:
                child.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            barriers[0].wait(timeout=START_TIMEOUT_S)  # every claimer is connected
            backends = server.backends_named(admin, app)
            cpu_before = server.backend_cpu(backends)
            xacts_before = server.transactions(admin)
            barriers[1].wait(timeout=START_TIMEOUT_S)  # go
        except threading.BrokenBarrierError:
            raise RuntimeError(f"{kind} claimer failed: {_first_error(results)}") from None
        outs: list[dict[str, Any]] = []
        while len(outs) < procs:
            try:
                outs.append(results.get(timeout=1))
            except queue_mod.Empty:
                if not any(c.is_alive() for c in children) and results.empty():
                    raise RuntimeError(f"{kind} claimers died without a result") from None
        errors = [o["error"] for o in outs if "error" in o]
        if errors:
            raise RuntimeError(f"{kind} claimer failed: {errors[0]}")
        cpu_after = server.backend_cpu(backends) if cpu_before is not None else None
        barriers[2].wait(timeout=START_TIMEOUT_S)
        for child in children:
            child.join(10)
        time.sleep(0.6)  # let the claimers' statistics reach pg_stat_database
        xacts_after = server.transactions(admin)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
                child.join(5)
    start = min(o["start"] for o in outs)
    done = sorted(t - start for o in outs for t in o["done_at"])
    server_cpu = None
    if cpu_before is not None and cpu_after is not None:
        server_cpu = sum(v - cpu_before.get(pid, 0.0) for pid, v in cpu_after.items())
    e2e = None
    if done:
        p50, p95, p99 = (percentile(done, q) for q in (0.5, 0.95, 0.99))
        e2e = (p50 or 0.0, p95 or 0.0, p99 or 0.0)
    return ClaimerResult(
        kind=kind, procs=procs, batch=batch, workload=workload, steps=steps,
        completed=len(done), seconds=done[-1] if done else 0.0, e2e_s=e2e,
        client_cpu_s=sum(o["cpu_s"] for o in outs), server_cpu_s=server_cpu,
        transactions=(xacts_after - xacts_before
                      if xacts_before is not None and xacts_after is not None else None),
        peak_rss=max(o["rss"] for o in outs),
    )
