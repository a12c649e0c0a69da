"""A run's figures: latency, success and throughput in and out of faults, peak memory.

Three sources, each optional but the first:

- the store's history (:mod:`fleetsim.store.figures`): submit, claim and
  completion times of every step, in database time;
- ``faults.jsonl`` in the run directory: what the chaos injector did and
  when (wall clock), turned into fault windows (:func:`fault_windows`);
- ``metrics.jsonl`` in the run directory: the coordinator's samples of each
  process (``rss_bytes``, ``cpu_percent``, ...); without it the memory
  figures are null.

The figure names are a contract (experiment thresholds look them up):

=================================  ===============================================
``e2e_p50_s`` / ``_p95_s`` /       submit -> completion of completed steps, seconds
``_p99_s``
``queue_wait_p50_s`` / ...         submit -> first claim, seconds
``success_pct``                    completed / submitted x 100
``throughput_steps_per_s``         completions / (first claim -> last completion)
``throughput_in_faults_...``       the same, inside / outside the fault windows
``throughput_in_faults_ratio``     inside / outside (null without faults)
``peak_rss_coordinator_bytes``     largest RSS sample of the coordinator
``peak_rss_pod_bytes``             largest RSS sample of any pod
=================================  ===============================================

Fault windows and metrics are wall-clock times; the history is database
time. They agree when the store runs on the same host (the embedded store,
a local server); docs/reference/report.md says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetsim.bus import BusPartition
from fleetsim.store import Store
from fleetsim.store.figures import (
    HistoryFigures,
    completions_within,
    history_figures,
    registrations,
)

__all__ = [
    "FIGURE_NAMES",
    "FaultWindow",
    "compute_figures",
    "fault_windows",
    "figure_rows",
    "merge_windows",
    "read_metrics",
]

FAULTS_FILE = "faults.jsonl"
METRICS_FILE = "metrics.jsonl"

FIGURE_NAMES = (
    "e2e_p50_s", "e2e_p95_s", "e2e_p99_s",
    "queue_wait_p50_s", "queue_wait_p95_s", "queue_wait_p99_s",
    "success_pct",
    "throughput_steps_per_s", "throughput_in_faults_steps_per_s",
    "throughput_outside_faults_steps_per_s", "throughput_in_faults_ratio",
    "peak_rss_coordinator_bytes", "peak_rss_pod_bytes",
)

# Actions that end an open fault early, by the fault's kind.
_ENDS = {"pause": "pause", "partition": "partition-store", "storage-fault": "storage-fault"}


@dataclass(frozen=True)
class FaultWindow:
    """One applied fault and how long it lasted (unix seconds, wall clock).

    A kill lasts until the pod registers again (its restart), else to the
    end of the run; a store restart for its measured downtime; pauses,
    partitions and storage faults for their ``for`` duration, or until
    healed, resumed or expired, whichever came first.
    """

    start: float
    end: float
    action: str
    pods: tuple[str, ...]
    label: str

    @property
    def duration_s(self) -> float:
        """How long the fault lasted."""
        return max(0.0, self.end - self.start)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; malformed lines (a torn tail) are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fault_windows(
    run_dir: Path | None,
    span: tuple[float, float] | None,
    registrations: Sequence[dict[str, Any]] = (),
) -> list[FaultWindow]:
    """The fault windows recorded in ``run_dir``'s ``faults.jsonl`` during ``span``.

    Only the injector's ``action`` records are read (the scenario's own
    records describe the same faults). ``registrations`` (pod, at) end a
    kill's window at the pod's restart. A run directory holds the faults of
    every run made in it, so faults starting outside ``span`` (padded by a
    second) are left out; windows are clipped to it.
    """
    if run_dir is None or span is None:
        return []
    records = [r for r in _read_jsonl(run_dir / FAULTS_FILE)
               if r.get("type") == "action" and _number(r.get("ts")) is not None
               and "error" not in r]
    lo, hi = span[0] - 1.0, span[1] + 1.0
    records.sort(key=lambda r: float(r["ts"]))
    windows = []
    for i, r in enumerate(records):
        start = float(r["ts"])
        if not lo <= start <= hi:
            continue
        action = str(r.get("action"))
        result = r.get("result") if isinstance(r.get("result"), dict) else {}
        assert isinstance(result, dict)
        pods = _pods_of(result)
        for_s = _number(result.get("for_s"))
        end: float
        label: str
        if action in ("kill", "kill-leader"):
            end = min((float(g["at"]) for g in registrations
                       if g.get("pod") in pods and float(g["at"]) > start), default=span[1])
            term = result.get("term")
            label = f"{action} {', '.join(pods)}" + (f" (T{term})" if term else "")
        elif action == "store-restart":
            end = start + (_number(result.get("downtime_s")) or 0.0)
            label = "store restart"
        elif action == "partition" and result.get("from") == "bus":
            # The pod ends a bus partition itself (10 s when no --for was given).
            end = start + (for_s or BusPartition.DEFAULT_S)
            label = _fault_label(action, pods, result)
        elif action in _ENDS:
            # A pod in a container is partitioned through the engine, tracked
            # (and ended) as partition-network rather than partition-store.
            kind = ("partition-network" if action == "partition"
                    and result.get("from") == "network" else _ENDS[action])
            ends = [_ended(records[i + 1:], kind, pod, start + (for_s or math.inf))
                    for pod in pods]
            end = min(max(ends, default=span[1]), span[1])
            label = _fault_label(action, pods, result)
        elif action == "hang":
            end = start + (for_s or 0.0)
            label = f"hang {', '.join(pods)}"
        else:
            continue  # heal, resume and end-* records close the windows above
        windows.append(FaultWindow(start, max(start, min(end, hi)), action, pods, label))
    return windows


def _pods_of(result: dict[str, Any]) -> tuple[str, ...]:
    pods = result.get("pods")
    if isinstance(pods, list):
        return tuple(str(p) for p in pods)
    return (str(result["pod"]),) if result.get("pod") else ()


def _fault_label(action: str, pods: tuple[str, ...], result: dict[str, Any]) -> str:
    who = ", ".join(pods) if len(pods) <= 2 else f"{len(pods)} pods"
    if action == "partition":
        return f"partition {who} from {result.get('from', 'store')}"
    if action == "storage-fault":
        parts = [f"{k.split('_')[0]} {result[k]:g}" for k in
                 ("error_rate", "disconnect_rate", "reply_loss_rate")
                 if _number(result.get(k))]
        if _number(result.get("latency_ms")):
            parts.append(f"+{result['latency_ms']:g} ms")
        return f"storage fault {who}" + (f" ({', '.join(parts)})" if parts else "")
    return f"{action} {who}"


def _ended(later: Iterable[dict[str, Any]], kind: str, pod: str, planned: float) -> float:
    """When ``pod``'s fault of ``kind`` ended: expired, healed or resumed, else ``planned``."""
    for r in later:
        ts = float(r["ts"])
        if ts >= planned:
            break
        action, target = r.get("action"), r.get("target")
        result = r.get("result") if isinstance(r.get("result"), dict) else {}
        assert isinstance(result, dict)
        if action == f"end-{kind}" and target == pod:
            return ts
        if action == "resume" and kind == "pause" and result.get("pod") == pod:
            return ts
        if action == "heal" and f"{kind}:{pod}" in (result.get("healed") or []):
            return ts
    return planned


def merge_windows(windows: Iterable[tuple[float, float]],
                  clip: tuple[float, float] | None = None) -> list[tuple[float, float]]:
    """The union of ``windows`` as sorted disjoint intervals, clipped to ``clip``."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(windows):
        if clip is not None:
            a, b = max(a, clip[0]), min(b, clip[1])
        if b <= a:
            continue
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def read_metrics(run_dir: Path | None,
                 span: tuple[float, float] | None = None) -> list[dict[str, Any]]:
    """The samples of ``run_dir``'s ``metrics.jsonl`` (within ``span`` padded by 2 s).

    Missing file: an empty list. Lines that are not objects with a numeric
    ``t`` and a ``kind`` are skipped (a torn last line, a future field).
    """
    if run_dir is None:
        return []
    samples = [r for r in _read_jsonl(run_dir / METRICS_FILE)
               if _number(r.get("t")) is not None and isinstance(r.get("kind"), str)]
    if span is not None:
        samples = [r for r in samples if span[0] - 2.0 <= float(r["t"]) <= span[1] + 2.0]
    return samples


def _peak(samples: Iterable[dict[str, Any]], kind: str) -> int | None:
    values = [v for r in samples if r["kind"] == kind
              if (v := _number(r.get("rss_bytes"))) is not None]
    return int(max(values)) if values else None


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def compute_figures(
    store: Store,
    run_dir: Path | None = None,
    *,
    history: HistoryFigures | None = None,
    windows: Sequence[FaultWindow] | None = None,
    metrics: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The figures of the run recorded in ``store`` (names: :data:`FIGURE_NAMES`).

    ``run_dir`` holds ``faults.jsonl`` and ``metrics.jsonl`` (both optional).
    Pass ``history``, ``windows`` or ``metrics`` when already read, to read
    them once. A figure that cannot be computed (no completion, no metrics)
    is None.
    """
    h = history if history is not None else history_figures(store)
    if windows is None:
        regs = registrations(store) if h.span is not None and run_dir is not None else []
        windows = fault_windows(run_dir, h.span, regs)
    samples = metrics if metrics is not None else read_metrics(run_dir, h.span)
    e2e = h.e2e or (None, None, None)
    wait = h.queue_wait or (None, None, None)
    figures: dict[str, Any] = {
        "e2e_p50_s": _round(e2e[0]), "e2e_p95_s": _round(e2e[1]), "e2e_p99_s": _round(e2e[2]),
        "queue_wait_p50_s": _round(wait[0]), "queue_wait_p95_s": _round(wait[1]),
        "queue_wait_p99_s": _round(wait[2]),
        "success_pct": (round(100.0 * h.completed / h.submitted, 3) if h.submitted else None),
    }
    rate = inside = outside = ratio = None
    if h.first_claim is not None and h.last_completion is not None:
        work = (h.first_claim, h.last_completion)
        total_s = work[1] - work[0]
        rate = h.completed / total_s if total_s > 0 else None
        faulted = merge_windows(((w.start, w.end) for w in windows), clip=work)
        in_s = sum(b - a for a, b in faulted)
        done_in = completions_within(store, faulted) if faulted else 0
        if in_s > 0:
            inside = done_in / in_s
        if total_s - in_s > 0:
            outside = (h.completed - done_in) / (total_s - in_s)
        if windows and inside is not None and outside:
            ratio = inside / outside
    figures.update(
        throughput_steps_per_s=_round(rate, 3),
        throughput_in_faults_steps_per_s=_round(inside, 3),
        throughput_outside_faults_steps_per_s=_round(outside, 3),
        throughput_in_faults_ratio=_round(ratio, 4),
        peak_rss_coordinator_bytes=_peak(samples, "coordinator"),
        peak_rss_pod_bytes=_peak(samples, "pod"),
    )
    return figures


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def figure_rows(figures: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures as (name, value) rows of a human table.

    Shows the checker's failover and orphan recovery figures too when
    ``figures`` holds them (``fleetsim run`` and ``check`` merge both).
    """
    f = figures
    rows = [
        ("end to end (submit → completion)", "p50 {}  p95 {}  p99 {}".format(
            *(_seconds(f.get(f"e2e_p{p}_s")) for p in (50, 95, 99)))),
        ("queue wait (submit → first claim)", "p50 {}  p95 {}  p99 {}".format(
            *(_seconds(f.get(f"queue_wait_p{p}_s")) for p in (50, 95, 99)))),
        ("success", "-" if f.get("success_pct") is None else f"{f['success_pct']:g} %"),
    ]
    inside, outside = (f.get("throughput_in_faults_steps_per_s"),
                       f.get("throughput_outside_faults_steps_per_s"))
    if inside is not None or f.get("throughput_in_faults_ratio") is not None:
        ratio = f.get("throughput_in_faults_ratio")
        rows.append(("throughput in / outside faults",
                     f"{inside if inside is not None else '-'} / "
                     f"{outside if outside is not None else '-'} steps/s"
                     + (f" (ratio {ratio:.2f})" if ratio is not None else "")))
    rows.append(("peak RSS coordinator / largest pod",
                 f"{_mib(f.get('peak_rss_coordinator_bytes'))} / "
                 f"{_mib(f.get('peak_rss_pod_bytes'))}"))
    for name, key in (("failover (median / max)", "failover"),
                      ("orphan recovery (median / max)", "orphan_recovery")):
        fig = f.get(key)
        if isinstance(fig, dict) and fig.get("count"):
            rows.append((name, f"{_seconds(fig.get('median_s'))} / {_seconds(fig.get('max_s'))}"
                               f" over {fig['count']}"))
    return rows
