"""The bench matrix: configurations interleaved, repeated, summarised.

Every repeat runs each fleet configuration and the reference loop for each
(processes, batch, workload) the fleets use (and, with ``store_loop``, the
store's own loop for each as well), in one order on even repeats and the
reverse on odd ones, so drift on a shared machine hits every row alike. A
fleet's (or store loop's) ratio is taken against the reference of the same
repeat (side by side), then the median over repeats is reported with its
range.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetsim.bench.claimers import ClaimerResult, step_runner
from fleetsim.bench.fleet import FleetConfig, FleetResult, run_fleet
from fleetsim.bench.measure import Spread
from fleetsim.bench.reference import run_reference
from fleetsim.bench.storeloop import run_store_loop
from fleetsim.errors import ConfigError, FleetsimError


@dataclass(frozen=True)
class BenchPlan:
    """What `fleetsim bench` was asked to measure."""

    pods: tuple[int, ...] = (5,)
    concurrency: tuple[int, ...] = (1,)
    batch: tuple[int, ...] = (50,)
    workloads: tuple[str, ...] = ("noop",)
    steps: int = 20_000
    repeat: int = 3
    fleet: bool = True  # False: the reference rows only
    timeout_s: float = 600.0
    store_loop: bool = False  # also the store's own claim loop, without pods
    metrics: tuple[bool, ...] = (True,)  # fleets with pod metrics on and/or off
    client_history: tuple[bool, ...] = (True,)  # fleets with client histories on and/or off

    def __post_init__(self) -> None:
        for name in ("pods", "concurrency", "batch"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values):
                raise ConfigError(f"--{name} takes positive integers, got {values}")
        if not self.workloads:
            raise ConfigError("--workload needs at least one workload")
        if self.steps < 1 or self.repeat < 1:
            raise ConfigError("--steps and --repeat must be at least 1")
        if not self.metrics or not self.client_history:
            raise ConfigError("--metrics and --client-history take on, off or on,off")

    def fleets(self) -> list[FleetConfig]:
        """Every fleet configuration, workload-major."""
        if not self.fleet:
            return []
        return [FleetConfig(p, c, b, w, metrics=m, client_history=h)
                for w in self.workloads for b in self.batch for p in self.pods
                for c in self.concurrency for m in self.metrics for h in self.client_history]

    def references(self) -> list[tuple[int, int, str]]:
        """(processes, batch, workload) of every reference row (those it can run)."""
        out = []
        for w in self.workloads:
            try:
                step_runner(w)
            except ConfigError:
                continue  # a user handler: no reference row, no ratio
            out += [(p, b, w) for b in self.batch for p in self.pods]
        return out


def reference_key(procs: int, batch: int, workload: str, kind: str = "reference") -> str:
    """A reference (or store loop) row's name in tables and baselines."""
    return f"{kind} procs={procs} batch={batch} {workload}"


@dataclass
class BenchReport:
    """Every trial measured so far, and whether the run was cut short."""

    plan: BenchPlan
    trials: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    started_at: float = field(default_factory=time.time)

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per configuration, references first, in plan order."""
        keys: list[str] = []
        for trial in self.trials:
            if trial["key"] not in keys:
                keys.append(trial["key"])
        keys.sort(key=lambda k: (not k.startswith("reference"), self._order(k)))
        return [self._row(k) for k in keys]

    def _order(self, key: str) -> int:
        for i, trial in enumerate(self.trials):
            if trial["key"] == key:
                return i
        return 0

    def _row(self, key: str) -> dict[str, Any]:
        mine = [t for t in self.trials if t["key"] == key]
        ok = [t for t in mine if not t.get("error")]
        steps = sum(t["steps"] for t in mine)
        completed = sum(t.get("completed", 0) for t in mine)

        def spread(name: str) -> dict[str, float] | None:
            s = Spread.of(t.get(name) for t in ok)
            return s.as_dict() if s else None

        def median(name: str) -> float | None:
            values = [t[name] for t in ok if t.get(name) is not None]
            return statistics.median(values) if values else None

        def peak(name: str) -> int | None:
            values = [t[name] for t in ok if t.get(name)]
            return max(values) if values else None

        return {
            "key": key, "kind": mine[0]["kind"], "trials": len(mine),
            "errors": [t["error"] for t in mine if t.get("error")],
            "completed": completed, "steps": steps,
            "success_pct": 100.0 * completed / steps if steps else None,
            "steps_s": spread("steps_s"), "ratio": spread("ratio"),
            "cpu_ratio": spread("cpu_ratio"), "server_cpu_ratio": spread("server_cpu_ratio"),
            "e2e_p50_s": median("e2e_p50_s"), "e2e_p95_s": median("e2e_p95_s"),
            "e2e_p99_s": median("e2e_p99_s"),
            "rss_pod": peak("rss_pod"), "rss_coordinator": peak("rss_coordinator"),
            "cpu_us_per_step": median("cpu_us_per_step"),
            "pods_cpu_us_per_step": median("pods_cpu_us_per_step"),
            "coordinator_cpu_us_per_step": median("coordinator_cpu_us_per_step"),
            "server_cpu_us_per_step": median("server_cpu_us_per_step"),
            "transactions_per_step": median("transactions_per_step"),
        }

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (`--json`)."""
        from dataclasses import asdict

        return {"plan": asdict(self.plan), "interrupted": self.interrupted,
                "rows": self.rows(), "trials": self.trials}


def _per_step(value: float | None, completed: int) -> float | None:
    return None if value is None or not completed else 1e6 * value / completed


def _loop_trial(r: ClaimerResult) -> dict[str, Any]:
    p50, p95, p99 = r.e2e_s or (None, None, None)
    return {
        "kind": r.kind, "procs": r.procs, "batch": r.batch, "workload": r.workload,
        "steps": r.steps, "completed": r.completed, "seconds": r.seconds,
        "steps_s": r.steps_s, "e2e_p50_s": p50, "e2e_p95_s": p95, "e2e_p99_s": p99,
        "rss_pod": r.peak_rss, "rss_coordinator": None,
        "cpu_us_per_step": _per_step(r.client_cpu_s, r.completed),
        "server_cpu_us_per_step": _per_step(r.server_cpu_s, r.completed),
        "transactions_per_step": (r.transactions / r.completed
                                  if r.transactions is not None and r.completed else None),
    }


def _fleet_trial(r: FleetResult) -> dict[str, Any]:
    p50, p95, p99 = r.e2e_s or (None, None, None)
    c = r.config
    return {
        "kind": "fleet", "pods": c.pods, "concurrency": c.concurrency, "batch": c.batch,
        "workload": c.workload, "steps": r.steps, "completed": r.completed,
        "seconds": r.seconds, "steps_s": r.steps_s,
        "e2e_p50_s": p50, "e2e_p95_s": p95, "e2e_p99_s": p99,
        "rss_pod": r.peak_rss_pod, "rss_coordinator": r.peak_rss_coordinator,
        "cpu_us_per_step": _per_step(r.pods_cpu_s + r.coordinator_cpu_s, r.completed),
        "pods_cpu_us_per_step": _per_step(r.pods_cpu_s, r.completed),
        "coordinator_cpu_us_per_step": _per_step(r.coordinator_cpu_s, r.completed),
        "server_cpu_us_per_step": _per_step(r.server_cpu_s, r.completed),
        "transactions_per_step": (r.transactions / r.completed
                                  if r.transactions is not None and r.completed else None),
    }


def run_bench(plan: BenchPlan, url: str, say: Callable[[str], None]) -> BenchReport:
    """Run the plan against ``url``; a Ctrl-C ends it early with what was measured."""
    report = BenchReport(plan)
    work: list[tuple[str, Any]] = [("reference", r) for r in plan.references()]
    if plan.store_loop:
        work += [("store", r) for r in plan.references()]
    work += [("fleet", f) for f in plan.fleets()]
    try:
        for repeat in range(plan.repeat):
            order = work if repeat % 2 == 0 else work[::-1]
            done: dict[str, dict[str, Any]] = {}
            for index, (kind, what) in enumerate(order, 1):
                key = (what.key if kind == "fleet"
                       else reference_key(what[0], what[1], what[2], kind))
                say(f"[{repeat + 1}/{plan.repeat}] {index}/{len(order)} {key}: "
                    f"{plan.steps} steps")
                trial: dict[str, Any] = {"key": key, "kind": kind, "repeat": repeat,
                                         "steps": plan.steps}
                try:
                    if kind == "reference":
                        trial.update(_loop_trial(
                            run_reference(url, what[0], what[1], plan.steps, what[2])))
                    elif kind == "store":
                        trial.update(_loop_trial(
                            run_store_loop(url, what[0], what[1], plan.steps, what[2])))
                    else:
                        trial.update(_fleet_trial(
                            run_fleet(what, url, plan.steps, plan.timeout_s)))
                except (RuntimeError, OSError, FleetsimError) as exc:
                    trial["error"] = f"{type(exc).__name__}: {exc}"
                    say(f"  failed: {trial['error']}")
                else:
                    say(f"  {trial['completed']}/{plan.steps} in {trial['seconds']:.2f}s = "
                        f"{trial['steps_s']:,.0f} steps/s")
                report.trials.append(trial)
                done[key] = trial
            _pair(report, done, repeat)
    except KeyboardInterrupt:
        report.interrupted = True
        say("interrupted: reporting what was measured")
    return report


def _pair(report: BenchReport, done: dict[str, dict[str, Any]], repeat: int) -> None:
    """Each fleet (and store loop) trial's ratios to the reference of the same repeat."""
    for trial in report.trials:
        if trial["repeat"] != repeat or trial["kind"] == "reference" or trial.get("error"):
            continue
        procs = trial["pods"] if trial["kind"] == "fleet" else trial["procs"]
        ref = done.get(reference_key(procs, trial["batch"], trial["workload"]))
        if not ref or ref.get("error") or not ref.get("steps_s"):
            continue
        trial["ratio"] = trial["steps_s"] / ref["steps_s"]
        if trial.get("cpu_us_per_step") and ref.get("cpu_us_per_step"):
            trial["cpu_ratio"] = trial["cpu_us_per_step"] / ref["cpu_us_per_step"]
        if trial.get("server_cpu_us_per_step") and ref.get("server_cpu_us_per_step"):
            trial["server_cpu_ratio"] = (trial["server_cpu_us_per_step"]
                                         / ref["server_cpu_us_per_step"])

