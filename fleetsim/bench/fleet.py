"""One fleet trial: a real coordinator with real pods, drained once, measured.

The coordinator runs in a spawned child process (so its RSS and CPU are its
own, not the bench's) in a session of its own (a Ctrl-C at the terminal
reaches only the bench, which stops the trial with SIGTERM). The queue is
filled while paused and ANALYZEd, so the fleet, like the reference, starts
on a full queue; the clock runs from the first claim to the last completion
(database time), and CPU from the resume to the moment the queue is drained.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from fleetsim.bench import server
from fleetsim.bench.measure import ProcessWatch, cpu_seconds
from fleetsim.errors import FleetsimError

if TYPE_CHECKING:
    from fleetsim.coordinator import FleetSpec

QUEUE = "default"
START_TIMEOUT_S = 120.0
_SUBMIT_CHUNK = 10_000


@dataclass(frozen=True)
class FleetConfig:
    """One fleet configuration of the matrix."""

    pods: int
    concurrency: int
    batch: int
    workload: str
    metrics: bool = True  # pods send metrics (`fleetsim run --no-metrics`: off)
    client_history: bool = True  # pods and submitter keep client histories

    @property
    def key(self) -> str:
        """Its name in tables and baselines (a default option is not named, so
        baselines from before the options existed still match)."""
        key = f"pods={self.pods} c={self.concurrency} batch={self.batch} {self.workload}"
        if not self.metrics:
            key += " metrics=off"
        if not self.client_history:
            key += " client-history=off"
        return key

    def spec(self, url: str, schema: str, run_dir: Path) -> FleetSpec:
        """The coordinator's fleet spec of this configuration (no fault proxies)."""
        from fleetsim.coordinator import FleetSpec

        return FleetSpec(run_dir=run_dir, pods=self.pods, concurrency=self.concurrency,
                         batch=self.batch, workload=self.workload, store_url=url,
                         schema=schema, fault_proxy=False, metrics=self.metrics,
                         client_history=self.client_history)


@dataclass(frozen=True)
class FleetResult:
    """One drained fleet."""

    config: FleetConfig
    steps: int
    completed: int
    seconds: float  # first claim -> last completion, database time
    e2e_s: tuple[float, float, float] | None  # first claim -> each completion, p50/p95/p99
    pods_cpu_s: float
    coordinator_cpu_s: float
    server_cpu_s: float | None  # local server only
    transactions: int | None  # the database's, over the run (others' too)
    peak_rss_pod: int
    peak_rss_coordinator: int

    @property
    def steps_s(self) -> float:
        """Completed steps per second."""
        return self.completed / self.seconds if self.seconds > 0 else 0.0


class _Stop(BaseException):
    """SIGTERM from the bench: stop the fleet and leave."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Stop


def _coordinator_main(config: FleetConfig, url: str, schema: str, run_dir: str,
                      steps: int, timeout_s: float, pipe: Any) -> None:
    """The child: start the fleet, fill the paused queue, drain it on "go", report."""
    os.setsid()
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from fleetsim.coordinator import Coordinator
    from fleetsim.store import StepSpec
    from fleetsim.store.queue_settings import change_queue

    coordinator = Coordinator(config.spec(url, schema, Path(run_dir)))
    try:
        coordinator.start()
        store = coordinator.store
        assert store is not None
        change_queue(store, QUEUE, paused=True)
        for start in range(0, steps, _SUBMIT_CHUNK):
            store.submit_many([StepSpec(QUEUE)] * min(_SUBMIT_CHUNK, steps - start))
        store.analyze()
        pipe.send(("ready", sorted(coordinator.pod_pids().values())))
        if pipe.recv() != "go":
            return
        store.set_queue_paused(QUEUE, False)
        deadline = time.monotonic() + timeout_s
        while True:
            # Not status_counts(): a scan of every row 20 times a second cost
            # the fleet ~10% of its throughput here (server CPU it shares).
            if not store.has_open_steps():
                break
            if time.monotonic() > deadline:
                raise FleetsimError(f"not drained after {timeout_s:.0f}s")
            coordinator.poll()
            time.sleep(0.05)
        pipe.send(("drained", None))
        pipe.recv()  # "finish": the bench has its measurements
    except _Stop:
        pass
    except BaseException as exc:
        with contextlib.suppress(Exception):
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish stopping the pods
        coordinator.stop(grace_s=5.0)


def _expect(pipe: Any, what: str, timeout_s: float, child: Any) -> Any:
    deadline = time.monotonic() + timeout_s
    while not pipe.poll(0.2):
        if not child.is_alive():
            raise RuntimeError(f"the fleet's coordinator exited (code {child.exitcode}) "
                               f"before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
    kind, value = pipe.recv()
    if kind == "error":
        raise RuntimeError(f"fleet trial failed: {value}")
    if kind != what:
        raise RuntimeError(f"fleet trial: expected {what}, got {kind}")
    return value


def _ports(procs: list[psutil.Process]) -> set[int]:
    ports: set[int] = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            ports.update(c.laddr.port for c in proc.net_connections(kind="tcp") if c.laddr)
    return ports


def run_fleet(config: FleetConfig, url: str, steps: int, timeout_s: float = 600.0
              ) -> FleetResult:
    """Start a fleet in a fresh schema, drain ``steps`` no-op (or other) steps, measure it.

    Everything it started is stopped and the schema dropped, also on Ctrl-C.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    schema = f"bench_fleet_{os.getpid()}_{secrets.token_hex(3)}"
    run_dir = tempfile.mkdtemp(prefix="fleetsim-bench-")
    observer = server.connect(url, "fleetsim-bench")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_coordinator_main, daemon=False,
                        args=(config, url, schema, run_dir, steps, timeout_s, theirs))
    watch: ProcessWatch | None = None
    try:
        child.start()
        assert child.pid is not None
        coordinator_pid = child.pid
        watch = ProcessWatch(coordinator_pid)
        watch.start()
        pod_pids = _expect(ours, "ready", START_TIMEOUT_S + steps / 5_000, child)
        watch.sample()
        coordinator = psutil.Process(coordinator_pid)
        pods = [p for p in watch.members() if p.pid in set(pod_pids)]
        members = [coordinator, *pods]
        backends = set(server.backends_of_ports(observer, _ports(members)))
        server_before = server.backend_cpu(backends)
        xacts_before = server.transactions(observer)
        cpu_before = cpu_seconds(members)
        ours.send("go")
        _expect(ours, "drained", timeout_s + 30, child)
        cpu_after = cpu_seconds(members)
        backends |= set(server.backends_of_ports(observer, _ports(members)))
        server_after = server.backend_cpu(backends) if server_before is not None else None
        watch.stop()
        ours.send("finish")
        completed, window_s = server.drain_window(observer, schema)
        e2e = server.completion_percentiles(observer, schema)
        child.join(60)
        # A backend reports its transactions when its client leaves (a busy
        # one may hold them back for seconds): count once the pods are gone.
        # Their goodbyes (a few statements each) count too.
        time.sleep(0.5)
        xacts_after = server.transactions(observer)
    finally:
        if watch is not None:
            watch.stop()
        if child.is_alive():
            child.terminate()  # SIGTERM: it stops its pods
            child.join(30)
            if child.is_alive():
                child.kill()
                child.join(5)
        with contextlib.suppress(Exception):
            server.drop_schema(url, schema)
        observer.close()
        shutil.rmtree(run_dir, ignore_errors=True)

    def delta(before: dict[int, float], after: dict[int, float], pids: set[int]) -> float:
        return sum(after.get(pid, before.get(pid, 0.0)) - before.get(pid, 0.0) for pid in pids)

    server_cpu = None
    if server_before is not None and server_after is not None:
        server_cpu = sum(v - server_before.get(pid, 0.0) for pid, v in server_after.items())
    pod_set = set(pod_pids)
    return FleetResult(
        config=config, steps=steps, completed=completed, seconds=window_s, e2e_s=e2e,
        pods_cpu_s=delta(cpu_before, cpu_after, pod_set),
        coordinator_cpu_s=delta(cpu_before, cpu_after, {coordinator_pid}),
        server_cpu_s=server_cpu,
        transactions=(xacts_after - xacts_before
                      if xacts_before is not None and xacts_after is not None else None),
        peak_rss_pod=max((watch.peak.get(pid, 0) for pid in pod_set), default=0),
        peak_rss_coordinator=watch.peak.get(coordinator_pid, 0),
    )
