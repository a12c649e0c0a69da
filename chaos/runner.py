"""Runs a scenario's seeded schedule against a live fleet.

The schedule is fixed by the scenario and the seed before anything runs;
targets like ``random`` or ``fraction:0.4`` are drawn from a seeded picker
when each fault fires (only then are the live pods known). Everything applied
is written to ``faults.jsonl`` so a failure can be replayed. When the
scenario's duration is over, every fault still in force is healed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chaos.injector import FaultInjector
from chaos.scenario import FaultLog, PlannedFault, Scenario, TargetPicker
from fleetsim.errors import FleetsimError

log = logging.getLogger("fleetsim.scenario")

# Actions whose target is not a pod (the injector resolves it).
_UNTARGETED = ("kill-leader", "store-restart")


class ScenarioRunner(threading.Thread):
    """Applies one scenario in the background; ``done`` is set when it is over."""

    def __init__(
        self,
        scenario: Scenario,
        seed: int,
        injector: FaultInjector,
        *,
        pods: Callable[[], list[str]],
        leader: Callable[[], str | None],
        log_path: Path,
        stopping: threading.Event | None = None,
    ) -> None:
        super().__init__(name=f"scenario-{scenario.name}", daemon=True)
        self.scenario = scenario
        self.seed = seed
        self.injector = injector
        self.schedule: list[PlannedFault] = scenario.schedule(seed)
        self._pods = pods
        self._leader = leader
        self._log_path = log_path
        self._stopping = stopping or threading.Event()
        self.done = threading.Event()
        self.applied = 0
        self.failed = 0

    def run(self) -> None:
        fault_log = FaultLog(self._log_path)
        picker = TargetPicker(self.seed)
        fault_log.start(self.scenario, self.seed, self.schedule)
        started = time.monotonic()
        try:
            for fault in self.schedule:
                if self._stopping.wait(max(0.0, started + fault.offset_s - time.monotonic())):
                    break
                try:
                    self._apply(fault, picker, fault_log)
                except Exception as exc:
                    self.failed += 1
                    log.exception("fault %s failed unexpectedly", fault.action)
                    fault_log.record(fault, [], "failed", {"error": repr(exc)})
            self._stopping.wait(max(0.0, started + self.scenario.duration_s - time.monotonic()))
        finally:
            healed = self.injector.heal(None, {}).get("healed", [])
            fault_log.note("heal-all", healed=healed)
            fault_log.note("end", applied=self.applied, failed=self.failed,
                           elapsed_s=round(time.monotonic() - started, 3))
            fault_log.close()
            self.done.set()

    def _apply(self, fault: PlannedFault, picker: TargetPicker, fault_log: FaultLog) -> None:
        params: dict[str, Any] = dict(fault.params)
        if fault.duration_s is not None:
            params["for"] = fault.duration_s
        if fault.action in _UNTARGETED:
            targets: list[str | None] = [None]
        elif fault.action == "heal" and fault.target in (None, "all"):
            targets = [None]
        else:
            try:
                picked = picker.pick(fault.target or "random", sorted(self._pods()),
                                     self._leader())
            except FleetsimError as exc:  # e.g. a pod id the fleet does not have
                self.failed += 1
                fault_log.record(fault, [], "failed", {"error": str(exc)})
                log.warning("fault %s: %s", fault.action, exc)
                return
            if not picked:
                fault_log.record(fault, [], "skipped", picked.reason)
                return
            targets = list(picked)
            if fault.action == "storage-fault" and len(targets) > 1:
                targets = ["all"] if set(targets) == set(self._pods()) else targets
        replies = []
        outcome = "applied"
        for target in targets:
            try:
                replies.append(self.injector.apply(fault.action, target, params))
                self.applied += 1
            except FleetsimError as exc:
                outcome = "failed"
                self.failed += 1
                replies.append({"error": str(exc)})
                log.warning("fault %s on %s failed: %s", fault.action, target, exc)
        fault_log.record(fault, [t or "" for t in targets], outcome, replies)
