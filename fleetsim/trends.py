"""Resource trends of a run, from its ``metrics.jsonl``: does any process leak?

:func:`resource_trends` reads the samples of a metrics series (the lines
of ``metrics.jsonl``, as :func:`fleetsim.metrics.read_samples` returns them)
and computes, for each process series and for the store:

- a **process series** is one pod incarnation (``pod-2#0``, ``pod-2#1``: a
  restarted pod is a new process, so its first sample is the start of a new
  series, never a jump in the old one), the coordinator (``coordinator``)
  or a helper process it started (``fault-proxy``, ``pod-spawner``); ``<name>#<pid>`` when
  the file holds several pids under one name. For
  its ``rss_bytes`` and ``open_fds``: ``first`` (first sample after the
  warm-up), ``last``, ``peak`` (whole series, warm-up included),
  ``growth_pct`` and ``slope_per_min``;
- the **store**: ``steps_bytes`` (``pg_total_relation_size`` of ``steps``)
  and ``steps_dead_tuples``, the same figures.

Definitions (docs/reference/metrics.md#resource-trends):

- **warm-up**: the first ``min(20% of the run, 60 s)`` of each series is
  left out (imports, connection pools, caches filling; the run is the span
  of the whole file). A series shorter than the warm-up plus
  :data:`MIN_SERIES_S` after it gets ``null`` growth and slope (``note``
  says why);
- **growth_pct**: the median of the last window against the median of the
  first window after the warm-up, each window 20% of what is left, in
  percent. Medians make it robust to noise (a garbage collection, a burst
  of work) and to a few outliers; ``null`` when the first median is 0;
- **slope_per_min**: the least-squares slope of every sample after the
  warm-up, in units (bytes, fds, tuples) per minute;
- a process series **leaks** when its RSS growth is at least
  ``growth_limit_pct`` (default :data:`GROWTH_LIMIT_PCT`, 10%).

A run shorter than :data:`MIN_RUN_S` (30 s by default) has no trends:
:class:`TooShort` says why. The function is pure: no clock, no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from fleetsim.errors import FleetsimError

__all__ = [
    "GROWTH_LIMIT_PCT",
    "MIN_RUN_S",
    "MIN_SERIES_S",
    "THRESHOLD_NAMES",
    "TooShort",
    "resource_trends",
    "threshold_figures",
    "trend",
    "trend_rows",
    "warmup_s",
]

#: The warm-up: this fraction of the run, at most WARMUP_MAX_S.
WARMUP_FRACTION: Final = 0.2
WARMUP_MAX_S: Final = 60.0
#: Each of the two windows compared by growth_pct: this fraction of the series after warm-up.
WINDOW_FRACTION: Final = 0.2
#: A run shorter than this (first to last sample) has no trends.
MIN_RUN_S: Final = 30.0
#: A series needs this long after its warm-up (and 5 samples) for a growth and a slope.
MIN_SERIES_S: Final = 20.0
MIN_POINTS: Final = 5
#: RSS growth (percent) from which a process series is reported as leaking.
GROWTH_LIMIT_PCT: Final = 10.0

#: Names a threshold may use (in ``result["figures"]``), from :func:`threshold_figures`.
THRESHOLD_NAMES: Final = ("rss_growth_pct_max", "rss_slope_bytes_per_min_max",
                          "fds_growth_pct_max", "steps_dead_tuples_end")

_PROCESS_FIGURES: Final = ("rss_bytes", "open_fds")
_STORE_FIGURES: Final = ("steps_bytes", "steps_dead_tuples")


class TooShort(FleetsimError):
    """The series is too short (or empty) for trends."""


def warmup_s(run_s: float) -> float:
    """The warm-up of a run lasting ``run_s`` seconds: 20% of it, at most 60 s."""
    return min(WARMUP_FRACTION * max(0.0, run_s), WARMUP_MAX_S)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of value over time (per second); None if time does not vary."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var <= 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def trend(points: Sequence[tuple[float, float]], warmup: float,
          min_series_s: float = MIN_SERIES_S) -> dict[str, Any]:
    """The trend of one series of ``(t, value)`` points (any order) after ``warmup`` seconds.

    ``{"first", "last", "peak", "growth_pct", "slope_per_min", "samples"}``
    (and ``note`` when growth and slope could not be computed); ``samples``
    counts the points after the warm-up. Empty ``points``: ValueError.
    """
    if not points:
        raise ValueError("a trend needs at least one point")
    ordered = sorted(points)
    start = ordered[0][0] + warmup
    kept = [p for p in ordered if p[0] >= start] or ordered[-1:]
    out: dict[str, Any] = {
        "first": kept[0][1], "last": kept[-1][1], "peak": max(v for _, v in ordered),
        "growth_pct": None, "slope_per_min": None, "samples": len(kept),
    }
    span = kept[-1][0] - kept[0][0]
    if len(kept) < MIN_POINTS or span < min_series_s:
        out["note"] = (f"too short after the {warmup:.0f} s warm-up ({span:.0f} s, "
                       f"{len(kept)} samples; needs {min_series_s:.0f} s and {MIN_POINTS})")
        return out
    window = WINDOW_FRACTION * span
    head = statistics.median(v for t, v in kept if t <= kept[0][0] + window)
    tail = statistics.median(v for t, v in kept if t >= kept[-1][0] - window)
    if head > 0:
        out["growth_pct"] = round(100.0 * (tail - head) / head, 3)
    slope = _slope(kept)
    out["slope_per_min"] = None if slope is None else round(60.0 * slope, 3)
    return out


def _series(samples: Iterable[Mapping[str, Any]]) -> tuple[
        dict[str, dict[str, list[tuple[float, float]]]], dict[str, list[tuple[float, float]]],
        float, float]:
    """Points per process series and per store figure, and the file's first and last t."""
    processes: dict[str, dict[str, list[tuple[float, float]]]] = {}
    # The coordinator and its helper processes (the fault proxy), by (name, pid).
    named: dict[tuple[str, int], dict[str, list[tuple[float, float]]]] = {}
    store: dict[str, list[tuple[float, float]]] = {name: [] for name in _STORE_FIGURES}
    first, last = math.inf, -math.inf
    for sample in samples:
        t = _number(sample.get("t"))
        if t is None:
            continue
        first, last = min(first, t), max(last, t)
        kind = sample.get("kind")
        if kind == "pod" and isinstance(sample.get("pod"), str):
            incarnation = _number(sample.get("incarnation"))
            key = f"{sample['pod']}#{int(incarnation or 0)}"
            target = processes.setdefault(key, {name: [] for name in _PROCESS_FIGURES})
        elif kind == "coordinator" or (kind == "process" and isinstance(sample.get("name"), str)
                                       and sample["name"]):
            name = "coordinator" if kind == "coordinator" else str(sample["name"])
            target = named.setdefault((name, int(_number(sample.get("pid")) or 0)),
                                      {figure: [] for figure in _PROCESS_FIGURES})
        elif kind == "store":
            target = store
        else:
            continue
        for figure, points in target.items():
            value = _number(sample.get(figure))
            if value is not None:
                points.append((t, value))
    for (name, pid), figures in sorted(named.items()):
        alone = sum(1 for other, _ in named if other == name) == 1
        processes[name if alone else f"{name}#{pid}"] = figures
    return processes, store, first, last


def resource_trends(samples: Iterable[Mapping[str, Any]], *,
                    warmup: float | None = None,
                    growth_limit_pct: float = GROWTH_LIMIT_PCT,
                    min_run_s: float = MIN_RUN_S,
                    min_series_s: float = MIN_SERIES_S) -> dict[str, Any]:
    """The resource trends of a metrics series (the module's docstring defines them).

    ``warmup`` overrides the default (:func:`warmup_s` of the run's span).
    Returns ``{"run_s", "warmup_s", "growth_limit_pct", "processes": {key:
    {"rss_bytes": trend, "open_fds": trend, "leaking": bool}}, "store":
    {"steps_bytes": trend, "steps_dead_tuples": trend} (a figure never
    sampled: null), "leaking": [keys], "rss_growth_pct_max",
    "rss_slope_bytes_per_min_max", "fds_growth_pct_max"}``. TooShort if the
    series spans less than ``min_run_s`` or holds no process sample.
    """
    processes, store, first, last = _series(samples)
    run_s = last - first if last >= first else 0.0
    if run_s < min_run_s:
        raise TooShort(f"the metrics series spans {run_s:.0f} s; resource trends need "
                       f"at least {min_run_s:.0f} s")
    if not any(points for figures in processes.values() for points in figures.values()):
        raise TooShort("the metrics series holds no process sample (rss_bytes, open_fds)")
    w = warmup_s(run_s) if warmup is None else max(0.0, warmup)
    out_processes: dict[str, Any] = {}
    for key in sorted(processes, key=_process_order):
        figures = processes[key]
        entry: dict[str, Any] = {
            name: trend(points, w, min_series_s) if points else None
            for name, points in figures.items()}
        rss = entry.get("rss_bytes")
        entry["leaking"] = bool(rss and rss["growth_pct"] is not None
                                and rss["growth_pct"] >= growth_limit_pct)
        out_processes[key] = entry
    result: dict[str, Any] = {
        "run_s": round(run_s, 3),
        "warmup_s": round(w, 3),
        "growth_limit_pct": growth_limit_pct,
        "processes": out_processes,
        "store": {name: trend(points, w, min_series_s) if points else None
                  for name, points in store.items()},
        "leaking": [key for key, entry in out_processes.items() if entry["leaking"]],
    }
    result.update(_maxima(out_processes))
    return result


def _maxima(processes: Mapping[str, Any]) -> dict[str, Any]:
    def largest(figure: str, field: str) -> float | None:
        values = [entry[figure][field] for entry in processes.values()
                  if entry.get(figure) and entry[figure][field] is not None]
        return max(values) if values else None

    return {"rss_growth_pct_max": largest("rss_bytes", "growth_pct"),
            "rss_slope_bytes_per_min_max": largest("rss_bytes", "slope_per_min"),
            "fds_growth_pct_max": largest("open_fds", "growth_pct")}


def _process_order(key: str) -> tuple[int, str, int, int]:
    """The coordinator, its helpers, then pods in natural order (pod-2 before pod-10)."""
    name, _, incarnation = key.partition("#")
    number = int(incarnation) if incarnation.isdigit() else 0
    if name == "coordinator":
        return (0, "", 0, number)
    if not name.startswith("pod"):
        return (1, name, 0, number)
    stem = name.rstrip("0123456789")
    return (2, stem, int(name[len(stem):] or -1), number)


def threshold_figures(resources: Mapping[str, Any] | None) -> dict[str, Any]:
    """The flat figures thresholds may name (:data:`THRESHOLD_NAMES`); None when not measured."""
    if not resources:
        return dict.fromkeys(THRESHOLD_NAMES)
    dead = (resources.get("store") or {}).get("steps_dead_tuples")
    return {
        "rss_growth_pct_max": resources.get("rss_growth_pct_max"),
        "rss_slope_bytes_per_min_max": resources.get("rss_slope_bytes_per_min_max"),
        "fds_growth_pct_max": resources.get("fds_growth_pct_max"),
        "steps_dead_tuples_end": dead["last"] if dead else None,
    }


def _largest(processes: Mapping[str, Any], figure: str, field: str) -> tuple[str, float] | None:
    found = [(entry[figure][field], key) for key, entry in processes.items()
             if entry.get(figure) and entry[figure][field] is not None]
    if not found:
        return None
    value, key = max(found)
    return key, value


def trend_rows(resources: Mapping[str, Any] | None,
               skipped: str | None = None) -> list[tuple[str, str]]:
    """The trends as (name, value) rows of a human table (one row saying why if none)."""
    if not resources:
        return [("resource trends", f"none: {skipped or 'not measured'}")]
    processes = resources["processes"]
    rows = [("resource trends", f"{len(processes)} processes over {resources['run_s']:.0f} s, "
                                f"after a {resources['warmup_s']:.0f} s warm-up")]
    growth = _largest(processes, "rss_bytes", "growth_pct")
    slope = _largest(processes, "rss_bytes", "slope_per_min")
    if growth and slope:
        rows.append(("RSS growth / slope (largest)",
                     f"{growth[1]:+.1f} % ({growth[0]}) / {slope[1] / 2**20:+.2f} MiB/min "
                     f"({slope[0]})"))
    fds = _largest(processes, "open_fds", "growth_pct")
    if fds:
        rows.append(("open fds growth (largest)", f"{fds[1]:+.1f} % ({fds[0]})"))
    size, dead = resources["store"].get("steps_bytes"), resources["store"].get("steps_dead_tuples")
    if size:
        rows.append(("steps table size", f"{size['first'] / 2**20:.1f} → "
                                         f"{size['last'] / 2**20:.1f} MiB"))
    if dead:
        rows.append(("steps dead tuples", f"{dead['first']:.0f} → {dead['last']:.0f}"))
    if resources["leaking"]:
        rows.append((f"LEAKING (RSS growth ≥ {resources['growth_limit_pct']:g} %)",
                     ", ".join(resources["leaking"])))
    return rows
