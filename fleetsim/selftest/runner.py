"""``fleetsim selftest``: run each mutant under the chaos that should expose it.

A trial is a real fleet (pods on the broken store, spawned as self-test pod
processes), a load and a timed list of faults; it ends with the checker's
final verdict over the store's history and the pods' client histories. A
mutant is *killed* when the verdict is invalid. The same trial on the real
store (``control``) must stay valid, or the trial proves nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from chaos.trial import Trial, TrialResult, run_trial
from fleetsim.config import FleetTimings
from fleetsim.coordinator import Coordinator, FleetSpec
from fleetsim.selftest.mutants import MUTANTS, Mutant

_FAST = FleetTimings(heartbeat_s=0.25, lease_s=2.0, renew_s=0.5, dead_after_s=2.0,
                     recovery_s=0.25, grace_s=2.0)
# A pod declared dead long before its own watchdog (lease) fences it.
_DEAD_EARLY = FleetTimings(heartbeat_s=0.25, lease_s=4.0, renew_s=1.0, dead_after_s=1.5,
                           recovery_s=0.25, grace_s=2.0)
# A pod fenced by its own watchdog (lease) long before it is declared dead.
_FENCE_EARLY = FleetTimings(heartbeat_s=0.25, lease_s=1.5, renew_s=0.5, dead_after_s=8.0,
                            recovery_s=0.25, grace_s=2.0)

TRIALS: dict[str, Trial] = {
    "complete-without-token": Trial(
        "2.5 s of latency on every statement of one pod, three times: its heartbeats"
        " fall past the dead threshold while its completions are on their way, so"
        " they arrive after its steps were requeued and claimed again",
        pods=4, batch=4, workload="sleep:250", steps=500, timings=_DEAD_EARLY,
        faults=tuple((1.0 + 7.0 * i, "storage-fault", f"pod-{i + 1}",
                      {"latency_ms": 2500.0, "for": 6.0}) for i in range(3)),
    ),
    "claim-without-lock": Trial(
        "5 pods claim 5,000 no-op steps in batches of 20 at once",
        pods=5, batch=20, workload="noop", steps=5000,
    ),
    "recover-without-term": Trial(
        "90% of every pod's statements fail, five times: renewals fail until leases run out"
        " while their holders, not told, keep running recovery passes; heartbeats fail"
        " too, so every leader, current or deposed, finds pods to declare dead",
        pods=6, batch=5, workload="sleep:10", steps=4000, timings=_FAST,
        faults=tuple((0.5 + 6.0 * i, "storage-fault", "all", {"error_rate": 0.9, "for": 5.0})
                     for i in range(5)),
    ),
    "renew-without-expiry": Trial(
        "pause the leader past its lease, twice",
        pods=4, batch=5, workload="sleep:20", steps=1500, timings=_FAST,
        faults=((1.0, "pause", "leader", {"for": 3.0}), (6.0, "pause", "leader", {"for": 3.0})),
    ),
    "requeue-without-attempt": Trial(
        "kill two pods holding steps (no restart): recovery requeues their steps",
        pods=5, batch=10, workload="sleep:10", steps=2000, timings=_FAST,
        faults=((1.0, "kill", "random", {}), (2.5, "kill", "random", {})),
    ),
    "release-leaves-claimed": Trial(
        "pause pods past their lease but not past the dead threshold: they fence"
        " themselves and release their batches by token",
        pods=4, batch=10, workload="sleep:20", steps=2000, timings=_FENCE_EARLY,
        faults=tuple((1.0 + 4.0 * i, "pause", "random", {"for": 2.5}) for i in range(3)),
    ),
}


class _MutantCoordinator(Coordinator):
    """A coordinator whose pods run on a broken store."""

    def __init__(self, spec: FleetSpec, mutant: str | None) -> None:
        super().__init__(spec)
        self.mutant = mutant

    def pod_command(self, pod_id: str, incarnation: int) -> list[str]:
        """The usual pod command, through the self-test entry point when mutated."""
        cmd = super().pod_command(pod_id, incarnation)
        if self.mutant is None:
            return cmd
        head = [sys.executable, "-m", "fleetsim", "pod"]
        assert cmd[:4] == head
        return [sys.executable, "-m", "fleetsim.selftest.pod", "--mutant", self.mutant,
                *cmd[4:]]


def mutant_factory(mutant: str | None) -> Callable[[FleetSpec], Coordinator]:
    """A coordinator factory whose pods run ``mutant`` (None: the real store)."""
    return lambda spec: _MutantCoordinator(spec, mutant)


def run_mutant(store_url: str, mutant: Mutant | None, trial: Trial, *, seed: int = 0,
               say: Callable[[str], None] = lambda _: None) -> TrialResult:
    """Run ``trial`` on pods that run ``mutant`` (None: the real store, a control)."""
    name = mutant.name if mutant is not None else "control"
    result = run_trial(store_url, trial, name=name, seed=seed, say=say,
                       factory=mutant_factory(mutant.name if mutant is not None else None))
    if mutant is not None and result.verdict != "error":
        result.killed = result.verdict == "invalid"
    return result


def run_selftest(store_url: str, mutants: list[Mutant], *, controls: bool = False,
                 seed: int = 0, say: Callable[[str], None] = lambda _: None
                 ) -> list[TrialResult]:
    """Run each mutant's trial (and, with ``controls``, the same trial on the real store)."""
    results = []
    for mutant in mutants:
        trial = TRIALS[mutant.name]
        if controls:
            say(f"control for {mutant.name}: {trial.description}")
            results.append(run_mutant(store_url, None, trial, seed=seed, say=say))
        say(f"mutant {mutant.name}: {mutant.description}")
        result = run_mutant(store_url, mutant, trial, seed=seed, say=say)
        if not result.killed and mutant.equivalent:
            result.note = f"equivalent: {mutant.equivalent}"
        results.append(result)
        say(f"  {result.verdict} in {result.seconds:g}s: "
            + ("killed" if result.killed else "SURVIVED")
            + (f" ({', '.join(f'{k} {v}' for k, v in result.violations.items())})"
               if result.violations else ""))
    return results


__all__ = ["MUTANTS", "TRIALS", "Trial", "TrialResult", "run_mutant", "run_selftest"]
