"""One trial: a real fleet, a load, timed faults, and the checker's final verdict.

Shared by the checker's self-test (``fleetsim selftest``: the same trial on
a broken store must fail) and the fuzzer (``fleetsim chaos fuzz``: random
trials on the real store must pass). A trial runs in a fresh PostgreSQL
schema of the given server and a temporary run directory, both removed
afterwards; the verdict reads the store's history and the pods' and
submitter's client histories.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleetsim.client_history import ClientHistory
from fleetsim.config import FleetTimings
from fleetsim.coordinator import Coordinator, FleetSpec
from fleetsim.errors import FleetsimError
from fleetsim.store import QueueConfig, StepSpec, Store, StoreConfig

# A timed fault: (seconds after the load starts, action, target, parameters).
Fault = tuple[float, str, str | None, dict[str, Any]]


@dataclass(frozen=True)
class Load:
    """What is submitted, and how.

    ``steps`` go in at once (bulk) unless ``rate`` is set (a trickle of that
    many steps per second). The other features each add one kind of work.
    """

    steps: int = 1000
    rate: float = 0.0  # steps/s; 0: all at once
    bursts: int = 0  # extra bursts of steps/10 steps, spread over the trial
    limited: bool = False  # a queue with a concurrency limit of 2 gets a tenth
    fifo: bool = False  # a strict-FIFO queue gets a tenth
    cancels: int = 0  # steps cancelled while the trial runs
    resubmits: bool = False  # each step has an idempotency key, submitted twice
    failing: float = 0.0  # probability a step's workload fails (fail:p)
    workload: str = "sleep:10"

    def queues(self) -> tuple[str, ...]:
        """The queues the pods must serve."""
        return ("default", *(("limited",) if self.limited else ()),
                *(("fifo",) if self.fifo else ()))

    def features(self) -> list[str]:
        """The optional features that are on (what the shrinker tries to turn off)."""
        defaults = Load()
        return [name for name in ("rate", "bursts", "limited", "fifo", "cancels",
                                  "resubmits", "failing")
                if getattr(self, name) != getattr(defaults, name)]


@dataclass(frozen=True)
class Trial:
    """The fleet, load and faults of one trial."""

    description: str
    pods: int = 4
    batch: int = 5
    workload: str = "sleep:20"
    steps: int = 1500
    restart: bool = False
    timings: FleetTimings = field(default_factory=FleetTimings)
    faults: tuple[Fault, ...] = ()
    drain_s: float = 40.0  # how long the load may take to finish once the faults end
    load: Load | None = None  # None: ``steps`` of ``workload``, all at once
    fault_proxy: bool = False  # needed for partitions from the store

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (to replay it)."""
        data = asdict(self)
        data["faults"] = [list(f) for f in self.faults]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        """Inverse of :meth:`as_dict`."""
        values = dict(data)
        values["timings"] = FleetTimings.from_dict(values.get("timings", {}))
        values["faults"] = tuple((float(a), str(b), c, dict(d)) for a, b, c, d in
                                 values.get("faults", ()))
        if values.get("load") is not None:
            values["load"] = Load(**values["load"])
        return cls(**values)


@dataclass
class TrialResult:
    """What a trial came to."""

    name: str
    trial: str
    verdict: str  # valid, invalid, unknown or error
    violations: dict[str, int]
    seconds: float
    faults_applied: int
    killed: bool | None = None  # for a mutant: was it caught
    note: str = ""
    witnesses: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # the checker's (failover, ...)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


CoordinatorFactory = Callable[[FleetSpec], Coordinator]


def run_trial(store_url: str, trial: Trial, *, name: str = "trial", seed: int = 0,
              factory: CoordinatorFactory = Coordinator,
              say: Callable[[str], None] = lambda _: None) -> TrialResult:
    """Run ``trial`` on a fresh schema of ``store_url`` and judge it."""
    from fleetsim.checker import check

    schema = f"trial_{uuid.uuid4().hex[:10]}"
    run_dir = Path(tempfile.mkdtemp(prefix="fleetsim-trial-"))
    started = time.monotonic()
    applied = 0
    load = trial.load or Load(steps=trial.steps, workload=trial.workload)
    fleet = factory(FleetSpec(
        run_dir=run_dir, pods=trial.pods, batch=trial.batch, workload=load.workload,
        store_url=store_url, schema=schema, seed=seed, restart=trial.restart,
        timings=trial.timings, fault_proxy=trial.fault_proxy, queues=load.queues(),
    ))
    admin = Store(StoreConfig(store_url, schema=schema))
    try:
        admin.init_schema()
        if load.limited:
            admin.configure_queue(QueueConfig("limited", concurrency_limit=2))
        if load.fifo:
            admin.configure_queue(QueueConfig("fifo", strict_fifo=True))
        fleet.start()
        submitter = _Submitter(StoreConfig(store_url, schema=schema), load, seed,
                               fleet.client_history_dir, _longest(trial.faults))
        submitter.start()
        applied = _apply_faults(fleet, trial.faults, say)
        submitter.join(timeout=60)
        if submitter.is_alive():
            raise RuntimeError("the load was still being submitted 60 s after the faults")
        _drain(fleet, admin, trial.drain_s)
        fleet.stop(grace_s=2.0)
        report = check(admin, final=True, client_histories=fleet.client_history_dir)
        totals = {k: v for k, v in report.counts["violations"].items() if v}
        if submitter.error:
            totals["submit_error"] = 1
        result = TrialResult(name, trial.description, report.verdict, totals,
                             round(time.monotonic() - started, 1), applied,
                             witnesses=[v.message for v in report.violations[:5]],
                             figures=report.figures)
    except Exception as exc:  # a row of a table, not the end of the campaign
        fleet.stop(grace_s=1.0)
        return TrialResult(name, trial.description, "error", {},
                           round(time.monotonic() - started, 1), applied,
                           note=f"{type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(FleetsimError):
            admin.drop_schema()
        admin.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _longest(faults: tuple[Fault, ...]) -> float:
    return max((at + float(p.get("for", 0.0)) for at, _, _, p in faults), default=0.0)


class _Submitter(threading.Thread):
    """Submits a trial's load, with a client history like every submitter."""

    def __init__(self, config: StoreConfig, load: Load, seed: int, history: Path,
                 span_s: float) -> None:
        super().__init__(name="trial-load", daemon=True)
        self.config, self.load, self.history = config, load, history
        self.rng = random.Random(f"load:{seed}")
        self.span_s = max(span_s, 2.0)
        self.error: str | None = None

    def run(self) -> None:
        load = self.load
        workload = f"fail:{load.failing:g}" if load.failing else load.workload
        specs = []
        for i in range(load.steps):
            queue = "default"
            if load.limited and i % 10 == 3:
                queue = "limited"
            elif load.fifo and i % 10 == 7:
                queue = "fifo"
            specs.append(StepSpec(queue, {"workload": workload},
                                  idempotency_key=f"k{i}" if load.resubmits else None))
        history = ClientHistory.for_submitter(self.history)
        try:
            with Store(self.config) as store:
                self._submit(store, history, specs)
        except FleetsimError as exc:
            self.error = str(exc)
        finally:
            history.close()

    def _submit(self, store: Store, history: ClientHistory, specs: list[StepSpec]) -> None:
        load = self.load
        ids: list[int] = []
        chunk = max(1, int(load.rate / 10)) if load.rate else len(specs)
        start = time.monotonic()
        burst_at = [self.span_s * (k + 1) / (load.bursts + 1) for k in range(load.bursts)]
        for first in range(0, len(specs), chunk):
            part = specs[first:first + chunk]
            got = store.submit_many(part)
            for spec, step_id in zip(part, got, strict=True):
                history.submitted(spec.queue, [step_id])
            ids += got
            if load.rate:
                time.sleep(max(0.0, start + (first + chunk) / load.rate - time.monotonic()))
            while burst_at and time.monotonic() - start >= burst_at[0]:
                burst_at.pop(0)
                extra = store.submit_many([StepSpec("default", {"workload": "noop"})]
                                          * max(1, load.steps // 10))
                history.submitted("default", extra)
        if load.resubmits:
            again = store.submit_many(specs)
            history.submitted("default", again)
            if again != ids:
                self.error = "resubmitting the same idempotency keys gave other ids"
        for step_id in self.rng.sample(ids, min(load.cancels, len(ids))):
            store.cancel(step_id)


def _apply_faults(fleet: Coordinator, faults: tuple[Fault, ...],
                  say: Callable[[str], None]) -> int:
    """Apply the faults at their times (supervising the fleet meanwhile); return how many."""
    start = time.monotonic()
    applied = 0
    for at, action, target, params in sorted(faults, key=lambda f: f[0]):
        while time.monotonic() < start + at:
            fleet.poll()
            fleet.stopping.wait(0.05)
        assert fleet.injector is not None
        try:
            fleet.injector.apply(action, target, params)
            applied += 1
        except FleetsimError as exc:  # a random target that just died, no leader yet
            say(f"  fault {action} {target}: {exc}")
    until = start + _longest(faults)
    while time.monotonic() < until:
        fleet.poll()
        fleet.stopping.wait(0.05)
    return applied


def _drain(fleet: Coordinator, store: Store, timeout_s: float) -> None:
    """Supervise until no step is waiting or claimed, or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fleet.poll()
        try:
            counts = store.status_counts()
        except FleetsimError:
            counts = {"queued": 1}
        if counts["queued"] + counts["claimed"] + counts["failed"] == 0:
            return
        fleet.stopping.wait(0.2)
