"""Latency histograms with fixed buckets, and the ``metrics.jsonl`` time series.

A :class:`Histogram` counts observations (seconds) into fixed, log-spaced
buckets shared by every process of a fleet (:data:`BUCKETS_S`), so two
histograms merge by adding their counts: the fleet-wide end-to-end latency
is the sum of the pods' histograms, and a window is the difference of two
cumulative snapshots. Percentiles are read by linear interpolation inside
the bucket that holds them (as Prometheus' ``histogram_quantile`` does):
the error is bounded by the bucket's width, about 15% of the value.

On the bus a histogram travels inside a pod's ``Metrics.counters``
(:meth:`Histogram.to_counters`): each bucket is a cumulative counter
``h.<name>.<index>`` (empty ones left out), plus ``h.<name>.sum``.

The coordinator writes one JSON object per line to ``metrics.jsonl`` in the
run directory (see docs/reference/metrics.md); :func:`read_samples` and
:func:`latest` read it back for `fleetsim metrics` and reports.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from fleetsim.errors import ConfigError

METRICS_FILE = "metrics.jsonl"

# Upper bounds (inclusive) of the buckets: 10^(k/8) s, 8 per decade, from
# 0.1 ms to about 10 minutes. Steps of 10^(1/8) keep the bound error near 15%
# with 56 buckets, small enough to send every heartbeat.
BUCKETS_S: tuple[float, ...] = tuple(10 ** (k / 8) for k in range(-32, 23))

# The histograms a pod keeps, by name (what each measures).
HISTOGRAMS = {
    "claim_s": "claim round trip (one claim statement, the whole batch)",
    "exec_s": "execution of one step by its workload",
    "e2e_s": "end to end: submission to accepted completion (queue wait + run + write)",
}


class Histogram:
    """Counts of observations in the fixed buckets :data:`BUCKETS_S` (plus overflow)."""

    __slots__ = ("counts", "total")

    def __init__(self, counts: Sequence[int] | None = None, total: float = 0.0) -> None:
        if counts is None:
            counts = [0] * (len(BUCKETS_S) + 1)
        if len(counts) != len(BUCKETS_S) + 1:
            raise ConfigError(f"a histogram has {len(BUCKETS_S) + 1} buckets, got {len(counts)}")
        if any(c < 0 for c in counts):
            raise ConfigError("a histogram bucket cannot hold a negative count")
        self.counts = [int(c) for c in counts]
        self.total = float(total)

    def observe(self, value_s: float) -> None:
        """Count one observation (seconds; negative values count as 0)."""
        self.counts[bisect.bisect_left(BUCKETS_S, value_s)] += 1
        self.total += max(0.0, value_s)

    def observe_many(self, values_s: Iterable[float]) -> None:
        """Count several observations."""
        counts, bounds = self.counts, BUCKETS_S
        total = 0.0
        for value in values_s:
            counts[bisect.bisect_left(bounds, value)] += 1
            total += max(0.0, value)
        self.total += total

    @property
    def count(self) -> int:
        """How many observations."""
        return sum(self.counts)

    def merge(self, other: Histogram) -> Histogram:
        """A new histogram holding both (the buckets are the same everywhere)."""
        return Histogram([a + b for a, b in zip(self.counts, other.counts, strict=True)],
                         self.total + other.total)

    def minus(self, earlier: Histogram) -> Histogram:
        """What was observed since ``earlier`` (a previous snapshot of the same series).

        ConfigError if ``earlier`` is not an earlier snapshot (some bucket
        shrank): a restarted series starts again from zero and cannot be
        differenced against its predecessor.
        """
        counts = [a - b for a, b in zip(self.counts, earlier.counts, strict=True)]
        if any(c < 0 for c in counts):
            raise ConfigError("not an earlier snapshot of this histogram: a bucket shrank")
        return Histogram(counts, max(0.0, self.total - earlier.total))

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0 < q <= 1) in seconds, interpolated; None if empty.

        A quantile that falls in the overflow bucket is reported as the
        largest bound (the true value is at least that).
        """
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"a quantile is in (0, 1], got {q}")
        n = self.count
        if n == 0:
            return None
        rank = q * n
        seen = 0
        for index, count in enumerate(self.counts):
            if count and seen + count >= rank:
                if index == len(BUCKETS_S):
                    return BUCKETS_S[-1]
                lower = BUCKETS_S[index - 1] if index > 0 else 0.0
                upper = BUCKETS_S[index]
                return lower + (upper - lower) * (rank - seen) / count
            seen += count
        return BUCKETS_S[-1]  # unreachable: the counts sum to n

    def percentiles(self, prefix: str) -> dict[str, float | None]:
        """``{prefix_p50_s, prefix_p95_s, prefix_p99_s}``, rounded to the microsecond."""
        return {f"{prefix}_p{p}_s": _round(self.quantile(p / 100)) for p in (50, 95, 99)}

    def to_counters(self, name: str) -> dict[str, float]:
        """The wire form: ``h.<name>.<bucket index>`` for each non-empty bucket, and
        ``h.<name>.sum``.

        Each bucket is a cumulative counter, so a histogram travels in a pod's
        ``Metrics.counters`` like any other counter (coalescing a snapshot
        loses nothing); empty buckets are left out.
        """
        prefix = f"h.{name}."
        wire = {f"{prefix}{i}": float(c) for i, c in enumerate(self.counts) if c}
        wire[f"{prefix}sum"] = self.total
        return wire

    @classmethod
    def from_counters(cls, counters: Mapping[str, float], name: str) -> Histogram:
        """Inverse of :meth:`to_counters` (empty if absent); ConfigError if malformed."""
        prefix = f"h.{name}."
        counts = [0] * (len(BUCKETS_S) + 1)
        total = 0.0
        for key, value in counters.items():
            if not key.startswith(prefix):
                continue
            index = key[len(prefix):]
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(f"histogram {name}: {key!r} holds {value!r}")
            if index == "sum":
                total = float(value)
                continue
            # isascii: str.isdigit() also accepts "²", which int() refuses.
            if not (index.isascii() and index.isdigit()) or int(index) >= len(counts):
                raise ConfigError(f"histogram {name}: no bucket {index!r}")
            if not math.isfinite(value) or value != int(value) or value < 0:
                raise ConfigError(f"histogram {name}: bucket {index} holds {value!r}")
            counts[int(index)] = int(value)
        return cls(counts, total)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Histogram) and self.counts == other.counts
                and math.isclose(self.total, other.total))

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, sum={self.total:g})"


def merge_all(histograms: Iterable[Histogram]) -> Histogram:
    """The sum of several histograms (empty: an empty one)."""
    merged = Histogram()
    for histogram in histograms:
        merged = merged.merge(histogram)
    return merged


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def process_gauges(process: psutil.Process) -> dict[str, float]:
    """rss_bytes, cpu_percent (since the previous call), open_fds, threads of ``process``.

    A figure psutil cannot read here is left out.
    """
    gauges: dict[str, float] = {}
    readers: dict[str, Any] = {
        "rss_bytes": lambda: process.memory_info().rss,
        "cpu_percent": lambda: process.cpu_percent(None),
        "open_fds": process.num_fds,
        "threads": process.num_threads,
    }
    with process.oneshot():
        for name, read in readers.items():
            try:
                gauges[name] = float(read())
            except (psutil.Error, AttributeError, OSError):
                continue
    return gauges


# -- the time series file -------------------------------------------------------


def metrics_path(run_dir: Path) -> Path:
    """Where a fleet of ``run_dir`` writes its time series."""
    return run_dir / METRICS_FILE


def read_samples(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of ``path`` from byte ``offset``, and the offset after them.

    A last line still being written (no newline yet) is left for the next
    read; a line that is not a JSON object with a ``kind`` and a numeric
    ``t`` is skipped (every reader may rely on those two).
    """
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    samples = []
    for line in data[:end].splitlines():
        try:
            sample = json.loads(line)
        except ValueError:
            continue
        if (isinstance(sample, dict) and isinstance(sample.get("kind"), str)
                and isinstance(sample.get("t"), int | float)
                and not isinstance(sample["t"], bool)):
            samples.append(sample)
    return samples, offset + end


def iter_samples(path: Path) -> Iterator[dict[str, Any]]:
    """Every sample of a ``metrics.jsonl`` file, in order."""
    yield from read_samples(path)[0]


class Latest:
    """The latest sample of each kind (and of each pod), fed samples in file order."""

    def __init__(self) -> None:
        self.fleet: dict[str, Any] | None = None
        self.coordinator: dict[str, Any] | None = None
        self.store: dict[str, Any] | None = None
        self.pods: dict[str, dict[str, Any]] = {}

    def add(self, samples: Iterable[dict[str, Any]]) -> Latest:
        """Take newer samples into account; return self."""
        for sample in samples:
            kind = sample.get("kind")
            if kind == "pod" and isinstance(sample.get("pod"), str):
                self.pods[sample["pod"]] = sample
            elif kind in ("fleet", "coordinator", "store"):
                setattr(self, kind, sample)
        return self

    @property
    def empty(self) -> bool:
        """Whether no sample was seen."""
        return not (self.pods or self.fleet or self.coordinator or self.store)

    def as_dict(self) -> dict[str, Any]:
        """``{"fleet": {...}, "pods": {"pod-1": {...}}, "coordinator": ..., "store": ...}``."""
        from fleetsim.coordinator import pod_sort_key

        def strip(sample: dict[str, Any] | None, *keys: str) -> dict[str, Any] | None:
            if sample is None:
                return None
            return {k: v for k, v in sample.items() if k not in ("kind", *keys)}

        return {
            "fleet": strip(self.fleet, "e2e_hist"),
            "pods": {pod: strip(self.pods[pod], "pod")
                     for pod in sorted(self.pods, key=pod_sort_key)},
            "coordinator": strip(self.coordinator),
            "store": strip(self.store),
        }


__all__ = [
    "BUCKETS_S",
    "HISTOGRAMS",
    "METRICS_FILE",
    "Histogram",
    "Latest",
    "iter_samples",
    "merge_all",
    "metrics_path",
    "process_gauges",
    "read_samples",
]
