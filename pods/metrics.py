"""The pod's metrics hook: latency histograms, in-flight steps, its own process.

Installed only when the pod has somewhere to send metrics (the coordinator's
metrics channel, or a Prometheus port). The hot path pays one bucket
increment per observation under a lock; psutil is read only when a snapshot
is taken, on the heartbeat thread (the metrics cadence), never in the claim
loop.

End-to-end latency (submission to accepted completion) needs no shared
clock: the claim returns how long each step waited, in database time, and
the pod adds its own monotonic time from the claim to the accepted write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence
from typing import Any

import psutil

from fleetsim.metrics import HISTOGRAMS, Histogram, process_gauges
from fleetsim.store import ClaimedStep
from pods.hooks import PodHook

# The pod's counters under the names of the metrics contract (the rest keep theirs).
COUNTER_NAMES = {"lease_lost": "stale_writes_refused"}


class PodMetrics(PodHook):
    """Histograms and gauges of one pod; :meth:`snapshot` is what it sends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.histograms = {name: Histogram() for name in HISTOGRAMS}
        # The current batch: step id -> monotonic time of its submission
        # (estimated). The claim loop runs one batch at a time, so each
        # claim replaces it.
        self._submitted: dict[int, float] = {}
        self._claim_started: float | None = None
        self.in_flight = 0
        self._process = psutil.Process()
        self._process.cpu_percent(None)  # the first call only starts the measure

    def on_claim_done(self, duration_s: float, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.histograms["claim_s"].observe(duration_s)
            self._claim_started = now - duration_s
            if not count:
                self._submitted = {}
                self.in_flight = 0

    def on_claimed(self, steps: Sequence[ClaimedStep]) -> None:
        # The database measured each wait at the claim statement's start:
        # from the pod's side, about when the claim was sent.
        with self._lock:
            start = self._claim_started if self._claim_started is not None else time.monotonic()
            self._claim_started = None
            self._submitted = {s.id: start - (s.waited_s or 0.0) for s in steps}
            self.in_flight = len(steps)

    def on_step_done(
        self, step: ClaimedStep, ok: bool, duration_s: float, error: str | None
    ) -> None:
        with self._lock:
            self.histograms["exec_s"].observe(duration_s)

    def on_write(self, kind: str, accepted: int, rejected: int) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - accepted - rejected)

    def on_accepted(self, kind: str, step_ids: Collection[int]) -> None:
        if kind != "complete":
            return
        now = time.monotonic()
        with self._lock:
            submitted = self._submitted
            self.histograms["e2e_s"].observe_many(
                now - submitted[i] for i in step_ids if i in submitted)

    def snapshot(self, counters: dict[str, int]) -> tuple[dict[str, float], dict[str, float]]:
        """(counters, gauges) to send: ``counters`` (the pod's) renamed, plus the histograms.

        Reads psutil: call it on the metrics cadence, not per step.
        """
        wire: dict[str, float] = {
            COUNTER_NAMES.get(name, name): float(value) for name, value in counters.items()
        }
        with self._lock:
            for name, histogram in self.histograms.items():
                wire.update(histogram.to_counters(name))
            in_flight = self.in_flight
        gauges: dict[str, float] = {"in_flight": float(in_flight)}
        gauges.update(process_gauges(self._process))
        return wire, gauges




def pod_figures(pod: Any) -> Any:
    """A pod's figures for its own Prometheus endpoint (`fleetsim pod --metrics-port`)."""
    from fleetsim.prometheus import Figures, PodFigures

    counters, gauges = pod.enable_metrics().snapshot(pod.counters.snapshot())
    return Figures(pods=[PodFigures(pod.config.pod_id, pod.config.incarnation, counters,
                                    gauges)],
                   leader_term=pod.term)


__all__ = ["COUNTER_NAMES", "PodMetrics", "pod_figures"]
