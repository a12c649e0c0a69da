"""Generated chaos: random fault schedules crossed with random load shapes, shrunk on failure.

Each case is drawn from one seed (``random.Random(f"fuzz:{seed}:{n}")``), so
a case is replayed exactly from its seed and number, or from the JSON it is
written to. A case that fails (the checker's final verdict is not valid)
is written as a case file and a scenario file and shrunk: its faults, then
its load features, are dropped one at a time while it still fails, and the
smallest failing case is printed and written too. Fault schedules no one
wrote by hand find what hand-written scenarios miss; shrinking turns a
failure into something a person can read.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from chaos.trial import CoordinatorFactory, Fault, Load, Trial, TrialResult, run_trial
from fleetsim.config import FleetTimings
from fleetsim.coordinator import Coordinator

# Timings short enough for faults to bite within a short case.
_TIMINGS = FleetTimings(heartbeat_s=0.25, lease_s=2.0, renew_s=0.5, dead_after_s=2.0,
                        recovery_s=0.25, grace_s=2.0)

FAULT_KINDS = ("kill", "kill-leader", "pause", "partition-store", "partition-bus",
               "storage-errors", "storage-latency", "storage-disconnects", "lost-replies",
               "store-restart")


def generate(seed: int, number: int, duration_s: float, *, store_restart: bool) -> Trial:
    """Case ``number`` of the campaign ``seed``: a random load and fault schedule."""
    rng = random.Random(f"fuzz:{seed}:{number}")
    pods = rng.randint(2, 5)
    span = max(2.0, duration_s - 2.0)
    load = Load(
        steps=rng.choice((300, 800, 1500)),
        rate=rng.choice((0.0, 0.0, 40.0, 80.0)),
        bursts=rng.choice((0, 0, 2)),
        limited=rng.random() < 0.3,
        fifo=rng.random() < 0.3,
        cancels=rng.choice((0, 0, 5)),
        resubmits=rng.random() < 0.3,
        failing=rng.choice((0.0, 0.0, 0.2)),
        workload=rng.choice(("noop", "sleep:5", "sleep:20")),
    )
    if load.rate:  # a trickle lasts the case, below the fleet's capacity
        load = replace(load, steps=int(load.rate * span))
    kinds = [k for k in FAULT_KINDS if store_restart or k != "store-restart"]
    faults = tuple(sorted(
        (_fault(rng, rng.choice(kinds), span) for _ in range(rng.randint(1, 4))),
        key=lambda f: f[0]))
    return Trial(
        f"fuzz seed {seed} case {number}", pods=pods, batch=rng.choice((1, 5, 20)),
        restart=True, timings=_TIMINGS, faults=faults, drain_s=60.0, load=load,
        fault_proxy=any(f[1] == "partition" and f[3].get("from") != "bus" for f in faults),
    )


def _fault(rng: random.Random, kind: str, span: float) -> Fault:
    at = round(rng.uniform(0.3, span * 0.8), 2)
    lasting = round(rng.uniform(1.0, 4.0), 2)
    match kind:
        case "kill":
            return (at, "kill", "random", {})
        case "kill-leader":
            return (at, "kill-leader", None, {})
        case "pause":
            return (at, "pause", rng.choice(("random", "leader")), {"for": lasting})
        case "partition-store" | "partition-bus":
            where = "store" if kind == "partition-store" else "bus"
            return (at, "partition", "random", {"from": where, "for": lasting,
                                                 "mode": rng.choice(("blackhole", "reset"))})
        case "storage-errors":
            return (at, "storage-fault", "all", {"error_rate": 0.3, "for": lasting})
        case "storage-latency":
            return (at, "storage-fault", "random", {"latency_ms": 200.0, "for": lasting})
        case "storage-disconnects":
            return (at, "storage-fault", "all", {"disconnect_rate": 0.1, "for": lasting})
        case "lost-replies":
            return (at, "storage-fault", "all", {"reply_loss_rate": 0.1, "for": lasting})
    return (at, "store-restart", None, {})


@dataclass
class FuzzReport:
    """A campaign's outcome."""

    seed: int
    runs: list[TrialResult] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)  # case, shrunk, files

    @property
    def passed(self) -> bool:
        """Every case valid."""
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"seed": self.seed, "passed": self.passed,
                "runs": [r.as_dict() for r in self.runs], "failed": self.failed}


def fuzz(store_url: str, *, seed: int, runs: int, duration_s: float, out_dir: Path,
         store_restart: bool = False, shrink: bool = True, stop_at_failure: bool = False,
         factory: CoordinatorFactory = Coordinator,
         say: Callable[[str], None] = lambda _: None) -> FuzzReport:
    """Run ``runs`` generated cases; write and shrink each one that fails."""
    report = FuzzReport(seed)
    for number in range(runs):
        trial = generate(seed, number, duration_s, store_restart=store_restart)
        say(f"case {number + 1}/{runs} (seed {seed}): {describe(trial)}")
        result = run_trial(store_url, trial, name=f"{seed}:{number}", seed=seed + number,
                           factory=factory, say=say)
        report.runs.append(result)
        say(f"  {result.verdict} in {result.seconds:g}s"
            + (f": {', '.join(f'{k} {v}' for k, v in result.violations.items())}"
               if result.violations else "") + (f" {result.note}" if result.note else ""))
        if result.verdict == "valid":
            continue
        failure: dict[str, Any] = {"case": number, "verdict": result.verdict,
                                   "violations": result.violations,
                                   "witnesses": result.witnesses,
                                   "files": write_case(out_dir, f"fuzz-{seed}-{number}", trial)}
        say(f"  FAILED: case written to {failure['files']['case']}")
        if shrink and result.verdict != "error":
            smallest = shrink_case(store_url, trial, seed + number, factory, say)
            name = f"fuzz-{seed}-{number}-shrunk"
            failure["shrunk"] = {"trial": describe(smallest),
                                 "files": write_case(out_dir, name, smallest)}
            say(f"  shrunk to: {describe(smallest)}")
            say(f"  replay: fleetsim chaos fuzz --replay {failure['shrunk']['files']['case']}")
        report.failed.append(failure)
        if stop_at_failure:
            break
    return report


def shrink_case(store_url: str, trial: Trial, seed: int, factory: CoordinatorFactory,
                say: Callable[[str], None]) -> Trial:
    """Drop faults, then load features, one at a time while the case still fails."""

    def fails(candidate: Trial) -> bool:
        result = run_trial(store_url, candidate, name="shrink", seed=seed, factory=factory)
        say(f"    without {_difference(trial, candidate)}: {result.verdict}")
        return result.verdict == "invalid"

    current = trial
    index = 0
    while index < len(current.faults):
        candidate = replace(current, faults=current.faults[:index] + current.faults[index + 1:])
        if fails(candidate):
            current = candidate
        else:
            index += 1
    assert current.load is not None
    defaults = Load()
    for feature in current.load.features():
        load = replace(current.load, **{feature: getattr(defaults, feature)})
        if feature == "rate":
            load = replace(load, steps=min(load.steps, 1500))
        candidate = replace(current, load=load)
        if fails(candidate):
            current = candidate
    return current


def describe(trial: Trial) -> str:
    """One line: the fleet, the load and the faults."""
    load = trial.load or Load()
    shape = f"{load.steps} steps" + (f" at {load.rate:g}/s" if load.rate else " at once")
    extras = [f for f in load.features() if f != "rate"]
    faults = "; ".join(f"{a:g}s {act} {t or ''} {p or ''}".replace("  ", " ").strip()
                       for a, act, t, p in trial.faults) or "no faults"
    return (f"{trial.pods} pods, batch {trial.batch}, {load.workload}, {shape}"
            + (f" (+{', '.join(extras)})" if extras else "") + f"; faults: {faults}")


def _difference(before: Trial, after: Trial) -> str:
    gone = [f"{f[1]}@{f[0]:g}s" for f in before.faults if f not in after.faults]
    if before.load != after.load and before.load and after.load:
        gone += [f for f in before.load.features() if f not in after.load.features()]
    return ", ".join(gone) or "nothing"


def write_case(out_dir: Path, name: str, trial: Trial) -> dict[str, str]:
    """Write ``trial`` as a case file (exact replay) and a scenario file (faults only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    case = out_dir / f"{name}.json"
    case.write_text(json.dumps(trial.as_dict(), indent=2) + "\n")
    scenario = out_dir / f"{name}.toml"
    scenario.write_text(to_scenario(name, trial))
    return {"case": str(case), "scenario": str(scenario)}


def to_scenario(name: str, trial: Trial) -> str:
    """The case's faults as a scenario file (``fleetsim chaos run`` replays them)."""
    load = trial.load or Load()
    duration = max((a + float(p.get("for", 0.0)) for a, _, _, p in trial.faults),
                   default=1.0) + 2.0
    lines = [f'name = "{name}"',
             f'description = "{describe(trial)}"'.replace("\\", ""),
             f'duration = "{duration:.1f}s"', "", "[workload]", f"pods = {trial.pods}",
             f"steps = {load.steps}", f'workload = "{load.workload}"']
    if load.rate:
        lines.append(f"rate = {max(1, int(load.rate))}")
    for at, action, target, params in trial.faults:
        lines += ["", "[[fault]]", f'action = "{action}"']
        if target is not None:
            lines.append(f'target = "{target}"')
        lines.append(f'at = "{at:g}s"')
        for key, value in params.items():
            if key == "for":
                lines.append(f'for = "{float(value):g}s"')
            elif key == "latency_ms":
                lines.append(f'latency = "{float(value):g}ms"')
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def load_case(path: Path) -> Trial:
    """A case file written by :func:`write_case`."""
    return Trial.from_dict(json.loads(path.read_text()))
