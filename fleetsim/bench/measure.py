"""What a bench trial measures on the processes it watches.

A :class:`ProcessWatch` samples the RSS of a set of processes (and of their
children, found as they appear) every 100 ms and keeps each one's peak;
:func:`cpu_seconds` sums user + system CPU of processes that are still alive.
Percentiles and medians live here too, so every table row is computed the
same way.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psutil

SAMPLE_PERIOD_S = 0.1


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by linear interpolation; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Spread:
    """Median and range of one figure over the repeats of a configuration."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        """The spread of the values that were measured (None if none was)."""
        got = [v for v in values if v is not None]
        if not got:
            return None
        return cls(statistics.median(got), min(got), max(got), len(got))

    @property
    def relative(self) -> float:
        """(max - min) / median: how noisy the figure is."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def as_dict(self) -> dict[str, float]:
        """JSON form."""
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def cpu_seconds(procs: Iterable[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds of each live process, by pid."""
    out: dict[int, float] = {}
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = times.user + times.system
    return out


class ProcessWatch(threading.Thread):
    """Peak RSS of a root process and of every descendant, sampled every 100 ms.

    The root is the fleet's coordinator; the descendants found are its pods
    (and whatever they start). Descendants are looked up again every sample
    so pods that start late are caught.
    """

    def __init__(self, root_pid: int) -> None:
        super().__init__(name="bench-watch", daemon=True)
        self.root = psutil.Process(root_pid)
        self.peak: dict[int, int] = {}
        self.procs: dict[int, psutil.Process] = {root_pid: self.root}
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def members(self) -> list[psutil.Process]:
        """The root and every descendant seen so far."""
        with self._lock:
            return list(self.procs.values())

    def sample(self) -> None:
        """Take one sample now (also called once more before the fleet stops)."""
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            children = []
        with self._lock:
            for child in children:
                self.procs.setdefault(child.pid, child)
            procs = list(self.procs.values())
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            self.peak[proc.pid] = max(rss, self.peak.get(proc.pid, 0))

    def run(self) -> None:
        while not self._stop.wait(SAMPLE_PERIOD_S):
            self.sample()

    def stop(self) -> None:
        """Stop sampling (after one last sample)."""
        self.sample()
        self._stop.set()
