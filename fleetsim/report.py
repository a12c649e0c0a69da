"""The run report: five plots and one self-contained ``index.html``.

:func:`gather` reads what a report shows (the store's history, the run
directory's ``faults.jsonl`` and ``metrics.jsonl``) while the store is
reachable; :func:`write_report` draws and writes it, store or not. The
plots (matplotlib, Agg), each with the fault windows shaded and labelled:

1. ``throughput.png``  completed steps/s, fleet-wide and per pod
2. ``latency.png``     end-to-end latency p50/p95/p99 of the steps completed in each bin
3. ``timeline.png``    a swimlane per pod: alive, paused, partitioned,
   storage-faulted, dead, restarted, and leader tenure by term
4. ``queues.png``      queue depth (steps waiting) per queue
5. ``resources.png``   RSS and CPU per process (from ``metrics.jsonl``)

``index.html`` inlines the PNGs (data URIs), so it opens from disk with no
server and no network; the PNG files sit beside it for other uses.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleetsim.figures import (
    FaultWindow,
    compute_figures,
    fault_windows,
    figure_rows,
    read_metrics,
)
from fleetsim.store.figures import (
    HistoryFigures,
    HistorySeries,
    history_figures,
    history_series,
    registrations,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from fleetsim.store import Store

__all__ = ["PLOTS", "ReportData", "gather", "write_report"]

PLOTS = ("throughput", "latency", "timeline", "queues", "resources")

# Colours by fault kind (shading and swimlane), chosen apart from the series colours.
FAULT_COLOURS = {
    "kill": "#d62728", "kill-leader": "#d62728", "pause": "#ff7f0e",
    "partition": "#9467bd", "storage-fault": "#8c564b", "store-restart": "#7f7f7f",
    "hang": "#e377c2",
}
FAULT_NAMES = {
    "kill": "kill", "kill-leader": "kill", "pause": "pause", "partition": "partition",
    "storage-fault": "storage fault", "store-restart": "store restart", "hang": "hang",
}
_BIN_WIDTHS = (0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows, read while the store was reachable."""

    schema: str
    history: HistoryFigures
    series: HistorySeries | None  # None: the store holds no run yet
    windows: tuple[FaultWindow, ...]
    metrics: tuple[dict[str, Any], ...]
    figures: dict[str, Any]


def bin_width(span_s: float) -> float:
    """A round bin width giving about 60 bins over ``span_s`` (at least half a second)."""
    return next((w for w in _BIN_WIDTHS if w >= span_s / 60), _BIN_WIDTHS[-1])


def gather(store: Store, run_dir: Path | None, schema: str,
           checker_figures: dict[str, Any] | None = None, *, series: bool = True) -> ReportData:
    """Read the history, fault windows and metrics of the run in ``store``.

    ``checker_figures`` (failover, orphan recovery, ...) are merged into
    the figures. Without ``series`` only the figures are read (the plots'
    series are left out: cheaper). Raises SchemaMismatch if the database
    holds no fleetsim store.
    """
    h = history_figures(store)
    binned = None
    windows: list[FaultWindow] = []
    if h.span is not None:
        if series:
            binned = history_series(store, h.span[0], bin_width(h.span[1] - h.span[0]))
            regs = binned.registrations
        else:
            regs = registrations(store)
        windows = fault_windows(run_dir, h.span, regs)
    metrics = read_metrics(run_dir, h.span)
    figures = {**(checker_figures or {}),
               **compute_figures(store, run_dir, history=h, windows=windows, metrics=metrics)}
    return ReportData(schema, h, binned, tuple(windows), tuple(metrics), figures)


# -- plots ----------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _natural(pod: str) -> tuple[str, int]:
    m = re.match(r"(.*?)(\d+)$", pod)
    return (m.group(1), int(m.group(2))) if m else (pod, -1)


def _shade(ax: Axes, windows: Sequence[FaultWindow], t0: float, *, labels: bool = True) -> None:
    """Shade each fault window, with a short label along its left edge.

    With labels, the y axis gets headroom so the labels sit above the data,
    and labels of windows that start close together are set side by side.
    """
    left, right = ax.get_xlim()
    near = 0.015 * max(right - left, 1e-9)
    if labels and windows:
        # Every plotted quantity is >= 0: the data take the lower 60%.
        ax.set_ylim(0, ax.get_ylim()[1] * 1.6)
    last_x, level = -math.inf, 0
    for w in sorted(windows, key=lambda w: w.start):
        colour = FAULT_COLOURS.get(w.action, "#bcbd22")
        a, b = w.start - t0, w.end - t0
        ax.axvspan(a, max(b, a + 0.05), color=colour, alpha=0.13, lw=0)
        ax.axvline(a, color=colour, lw=1.0, alpha=0.8)
        if labels:
            level = level + 1 if a - last_x < near else 0
            last_x = a
            ax.annotate(_short(w), xy=(a, 0.98), xycoords=ax.get_xaxis_transform(),
                        xytext=(9 * level, 0), textcoords="offset points", rotation=90,
                        va="top", ha="right", fontsize=7, color=colour, annotation_clip=True)


def _short(w: FaultWindow) -> str:
    """The label of a window without its parameters (the fault table has them)."""
    return w.label.split(" (error")[0].split(" (+")[0].split(" (disconnect")[0]


def _fault_legend(windows: Sequence[FaultWindow]) -> list[Any]:
    from matplotlib.patches import Patch

    kinds = dict.fromkeys(FAULT_NAMES.get(w.action, w.action) for w in windows)
    colour = {FAULT_NAMES.get(a, a): c for a, c in FAULT_COLOURS.items()}
    return [Patch(color=colour.get(k, "#bcbd22"), alpha=0.35, label=f"fault: {k}")
            for k in kinds]


def _finish(fig: Any, ax: Axes, data: ReportData, title: str, path: Path,
            extra: Sequence[Any] = (), windows: Sequence[FaultWindow] | None = None) -> None:
    span = data.history.span
    if span is not None:
        ax.set_xlim(0, span[1] - span[0])
    ax.set_title(title, fontsize=11, loc="left")
    ax.grid(True, alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    shaded = data.windows if windows is None else windows
    handles = [*handles, *extra, *_fault_legend(shaded)]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    _pyplot().close(fig)


def _set_span(ax: Axes, data: ReportData) -> None:
    span = data.history.span
    if span is not None:
        ax.set_xlim(0, span[1] - span[0])


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=12,
            color="#555555", zorder=5,
            bbox={"facecolor": "white", "edgecolor": "#cccccc", "boxstyle": "round"})
    ax.set_yticks([])


def _plot_throughput(data: ReportData, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.2))
    _set_span(ax, data)
    s = data.series
    if s is None or not s.throughput:
        _empty(ax, "no completed steps")
    else:
        last = max(b for per in s.throughput.values() for b in per)
        bins = range(0, last + 1)
        x = [(b + 0.5) * s.width for b in bins]
        pods = sorted(s.throughput, key=_natural)
        per_pod = [[s.throughput[p].get(b, 0) / s.width for b in bins] for p in pods]
        # Stacked: each pod's band is its share; the top edge is the fleet.
        ax.stackplot(x, per_pod, labels=pods, alpha=0.75, lw=0)
        ax.plot(x, [sum(col) for col in zip(*per_pod, strict=True)], color="black", lw=1.8,
                label="fleet")
    _shade(ax, data.windows, s.t0 if s else 0.0)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("completed steps / s")
    ax.set_ylim(bottom=0)
    width = f" (bins of {s.width:g} s; pods stacked)" if s else ""
    _finish(fig, ax, data, f"Throughput: completed steps per second{width}", path)


def _plot_latency(data: ReportData, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.2))
    _set_span(ax, data)
    s = data.series
    if s is None or not s.latency:
        _empty(ax, "no completed steps")
    else:
        x = [(row[0] + 0.5) * s.width for row in s.latency]
        for i, (name, colour, dash) in enumerate((("p50", "#1f77b4", "-"),
                                                  ("p95", "#ff7f0e", "--"),
                                                  ("p99", "#d62728", ":"))):
            ax.plot(x, [row[2 + i] for row in s.latency], marker=".", ms=4, lw=1.6,
                    color=colour, ls=dash, label=name)
    _shade(ax, data.windows, s.t0 if s else 0.0)
    ax.set_xlabel("seconds since the run started (by completion time)")
    ax.set_ylabel("submit → completion (s)")
    ax.set_ylim(bottom=0)
    _finish(fig, ax, data, "End-to-end latency of the steps completed in each bin", path)


# Swimlane bands, as (colour, top, height) within a lane of height 1 centred
# on the pod's row (the axis is inverted: top is the smaller value).
_LANE = {
    "alive": ("#2ca02c", -0.28, 0.38), "dead": ("#d62728", -0.28, 0.38),
    "paused": (FAULT_COLOURS["pause"], 0.13, 0.09),
    "partitioned": (FAULT_COLOURS["partition"], 0.24, 0.09),
    "storage-faulted": (FAULT_COLOURS["storage-fault"], 0.35, 0.09),
}
_LEADER_BAND = (-0.46, 0.14)


def pod_states(data: ReportData) -> dict[str, list[tuple[str, float, float]]]:
    """Per pod, (state, start, end) intervals in unix seconds for the swimlane.

    Alive from each registration to the next, or to the pod's death: a kill
    in ``faults.jsonl``, else the leader marking it dead, else (last
    incarnation) its stop or, if it died, its last heartbeat. Dead from then
    to its next registration (or the end of the run).
    """
    s, span = data.series, data.history.span
    if s is None or span is None:
        return {}
    end_of_run = span[1]
    kills: dict[str, list[float]] = {}
    for w in data.windows:
        if w.action in ("kill", "kill-leader"):
            for pod in w.pods:
                kills.setdefault(pod, []).append(w.start)
    marked: dict[str, list[float]] = {}
    for m in s.marked_dead:
        marked.setdefault(m["pod"], []).append(float(m["at"]))
    rows = {p["pod"]: p for p in s.pods}
    regs: dict[str, list[float]] = {}
    for r in s.registrations:
        regs.setdefault(r["pod"], []).append(float(r["at"]))
    states: dict[str, list[tuple[str, float, float]]] = {}
    for pod in set(regs) | set(rows):
        starts = sorted(regs.get(pod, []))
        if not starts and pod in rows:
            starts = [span[0]]
        lane: list[tuple[str, float, float]] = []
        for i, start in enumerate(starts):
            nxt = starts[i + 1] if i + 1 < len(starts) else None
            limit = nxt if nxt is not None else end_of_run
            death = min((k for k in kills.get(pod, []) if start <= k < limit), default=None)
            if death is None:
                death = min((m for m in marked.get(pod, []) if start <= m < limit), default=None)
            if death is None and nxt is None and pod in rows:
                row = rows[pod]
                if row["status"] == "stopped" and row["died_at"] is not None:
                    death = float(row["died_at"])
                    lane.append(("alive", start, death))
                    continue
                if row["status"] == "dead":
                    death = float(row["heartbeat_at"])
            if death is None:
                lane.append(("alive", start, limit))
            else:
                lane.append(("alive", start, death))
                lane.append(("dead", death, limit))
        for w in data.windows:
            state = {"pause": "paused", "partition": "partitioned",
                     "storage-fault": "storage-faulted"}.get(w.action)
            if state and pod in w.pods:
                lane.append((state, w.start, w.end))
        states[pod] = lane
    return states


def _shifted(band: tuple[float, float], y: float) -> tuple[float, float]:
    return (y + band[0], band[1])


def _plot_timeline(data: ReportData, path: Path) -> None:
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    states = pod_states(data)
    pods = sorted(states, key=_natural)
    fig, ax = plt.subplots(figsize=(12, 1.6 + 0.85 * max(1, len(pods))))
    _set_span(ax, data)
    s = data.series
    t0 = s.t0 if s else 0.0
    if not pods:
        _empty(ax, "no pods registered")
    for y, pod in enumerate(pods):
        for state, a, b in states[pod]:
            colour, top, height = _LANE[state]
            ax.broken_barh([(a - t0, max(b - a, 0.02))], (y + top, height),
                           color=colour, alpha=0.85 if state in ("alive", "dead") else 0.95)
    seen: dict[str, int] = {}
    for r in (s.registrations if s else []):
        pod, incarnation = r["pod"], r["incarnation"]
        before = seen.get(pod)
        seen[pod] = incarnation
        if pod not in pods or (before is None and not incarnation):
            continue
        # A new incarnation is a restart; the same one again, a pod that was
        # declared dead and registered again (it rejoined).
        rejoined = before is not None and before == incarnation
        x, y = float(r["at"]) - t0, pods.index(pod)
        ax.plot([x], [y + 0.10], marker="^", ms=8, color="black",
                markerfacecolor="white" if rejoined else "black")
        ax.text(x, y + 0.02, f" inc {incarnation}" + (" rejoined" if rejoined else ""),
                fontsize=7, va="bottom", fontweight="bold")
    for term in (s.terms if s else []):
        if term["pod"] not in pods:
            continue
        y = pods.index(term["pod"])
        a, b = float(term["start"]) - t0, float(term["end"]) - t0
        ax.broken_barh([(a, max(b - a, 0.02))], _shifted(_LEADER_BAND, y), color="#f5c400",
                       edgecolor="black", lw=0.5)
        ax.text(a, y + _LEADER_BAND[0] + _LEADER_BAND[1] / 2, f" T{term['term']}", fontsize=7,
                va="center", ha="left", fontweight="bold", clip_on=True)
    # Kills and store restarts concern everyone: shaded across; the rest are lane bands.
    shaded = [w for w in data.windows if w.action in ("kill", "kill-leader", "store-restart",
                                                      "hang")]
    _shade(ax, shaded, t0, labels=False)
    ax.set_yticks(range(len(pods)), pods)
    ax.set_ylim(-0.55, len(pods) - 0.45)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the run started")
    legend: list[Any] = [Patch(color=_LANE[k][0], label=k) for k in _LANE]
    legend += [Line2D([], [], marker="^", color="black", ls="",
                      label="restarted (new incarnation)"),
               Line2D([], [], marker="^", color="black", markerfacecolor="white", ls="",
                      label="registered again (same incarnation)"),
               Patch(facecolor="#f5c400", edgecolor="black", label="leader (term T<n>)")]
    _finish(fig, ax, data, "Pods: state, restarts and leader tenure", path, legend, shaded)


def _plot_queues(data: ReportData, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.2))
    _set_span(ax, data)
    s = data.series
    if s is None or not s.depth_changes:
        _empty(ax, "no steps submitted")
    else:
        last = max(b for per in s.depth_changes.values() for b in per)
        for queue in sorted(s.depth_changes):
            per, depth = s.depth_changes[queue], 0
            xs, ys = [0.0], [0]
            for b in range(min(per), last + 1):
                depth += per.get(b, 0)
                xs.append((b + 1) * s.width)
                ys.append(depth)
            ax.step(xs, ys, where="post", lw=1.6, label=queue)
    _shade(ax, data.windows, s.t0 if s else 0.0)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("steps waiting (queued or retrying)")
    ax.set_ylim(bottom=0)
    _finish(fig, ax, data, "Queue depth per queue (at the end of each bin)", path)


def _plot_resources(data: ReportData, path: Path) -> None:
    plt = _pyplot()
    fig, (rss, cpu) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    _set_span(rss, data)
    s, span = data.series, data.history.span
    t0 = s.t0 if s else (span[0] if span else 0.0)
    series: dict[str, list[dict[str, Any]]] = {}
    for r in data.metrics:
        if r["kind"] == "pod":
            key = f"{r.get('pod')}#{r.get('incarnation', 0)}"
        elif r["kind"] == "coordinator":
            key = "coordinator"
        else:
            continue
        series.setdefault(key, []).append(r)
    if not series:
        _empty(rss, "no metrics recorded (no metrics.jsonl in the run directory)")
        _empty(cpu, "no metrics recorded")
    for key in sorted(series, key=lambda k: (k == "coordinator", _natural(k.split("#")[0]), k)):
        samples = sorted(series[key], key=lambda r: float(r["t"]))
        style = {"color": "black", "lw": 2.0} if key == "coordinator" else {"lw": 1.1}
        for ax, field, scale in ((rss, "rss_bytes", 2**20), (cpu, "cpu_percent", 1.0)):
            pts = [(float(r["t"]) - t0, float(r[field]) / scale) for r in samples
                   if isinstance(r.get(field), int | float)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, **style)
    for ax in (rss, cpu):
        _shade(ax, data.windows, t0, labels=ax is rss)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    rss.set_ylabel("RSS (MiB)")
    cpu.set_ylabel("CPU (%)")
    cpu.set_xlabel("seconds since the run started")
    if span is not None:
        cpu.set_xlim(0, span[1] - span[0])
    cpu.set_title("CPU per process", fontsize=10, loc="left")
    _finish(fig, rss, data, "Memory (RSS) and CPU per process (pod#incarnation)", path)


_DRAW = {"throughput": _plot_throughput, "latency": _plot_latency, "timeline": _plot_timeline,
         "queues": _plot_queues, "resources": _plot_resources}


# -- the page ----------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.valid { color: #1a7f37; } .invalid { color: #c62828; } .unknown { color: #a15c00; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0 1.5em; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 12px; }
.muted { color: #666; }
"""


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
            for row in rows]
    out.append("</table>")
    return "\n".join(out)


def _verdict_html(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return "<p class='muted'>The checker was not run.</p>"
    name = str(verdict.get("verdict", "unknown"))
    counts = verdict.get("counts", {})
    parts = [f"<p><b class='{html.escape(name)}'>{html.escape(name.upper())}</b> "
             f"({counts.get('steps', 0)} steps, {counts.get('attempts', 0)} attempts, "
             f"{counts.get('terms', 0)} leader terms)</p>"]
    totals = counts.get("violations", {})
    if totals:
        parts.append(_table(("invariant", "violations"),
                            [(k, v if v else "ok") for k, v in totals.items()]))
    violations = verdict.get("violations", [])
    for v in violations[:30]:
        parts.append(f"<p><b>{html.escape(str(v.get('invariant')))}</b>: "
                     f"{html.escape(str(v.get('message')))}</p>")
        parts.append(f"<pre>{html.escape(json.dumps(v.get('witness'), indent=2))}</pre>")
    if len(violations) > 30:
        parts.append(f"<p class='muted'>... and {len(violations) - 30} more witnesses.</p>")
    return "\n".join(parts)


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def write_report(data: ReportData, out: Path,
                 verdict: dict[str, Any] | None = None) -> dict[str, Any]:
    """Draw the five plots into ``out`` and write ``out/index.html``; say what was written.

    ``verdict`` is the checker's report as a dict (``CheckReport.as_dict()``).
    ``out`` is created if missing. Returns ``{"index", "plots"}`` (paths as strings).
    """
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    for name in PLOTS:
        path = out / f"{name}.png"
        _DRAW[name](data, path)
        plots[name] = path
    h = data.history
    t0 = data.series.t0 if data.series else (h.span[0] if h.span else 0.0)
    run_rows: list[tuple[str, Any]] = [
        ("schema", data.schema), ("started", _when(h.span[0] if h.span else None)),
        ("lasted", f"{h.span[1] - h.span[0]:.1f} s" if h.span else "-"),
        ("submitted", h.submitted), ("completed", h.completed),
        ("throughput", "-" if data.figures.get("throughput_steps_per_s") is None
         else f"{data.figures['throughput_steps_per_s']} steps/s (first claim → last completion)"),
        *figure_rows(data.figures),
    ]
    faults = [(f"{w.start - t0:.1f}", f"{w.duration_s:.1f}", w.action, ", ".join(w.pods) or "-",
               w.label) for w in data.windows]
    captions = {
        "throughput": "Throughput over time",
        "latency": "End-to-end latency over time",
        "timeline": "Pods over time",
        "queues": "Queue depth over time",
        "resources": "RSS and CPU per process",
    }
    images = []
    for name, path in plots.items():
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        images.append(f"<h3>{html.escape(captions[name])}</h3>\n"
                      f"<img alt='{name}' src='data:image/png;base64,{encoded}'>")
    if not data.metrics:
        images.append("<p class='muted'>No metrics recorded (no metrics.jsonl in the run "
                      "directory): the RSS and CPU plot is empty and the peak RSS figures "
                      "are null.</p>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>fleetsim report: {html.escape(data.schema)}</title>
<style>{_CSS}</style></head>
<body>
<h1>fleetsim report: {html.escape(data.schema)}</h1>
<p class="muted">Written {_when(datetime.now(UTC).timestamp())}. Times on the plots are seconds
since the run's first pod registered or step was submitted ({_when(t0)}). Shaded: fault windows
from faults.jsonl.</p>
<h2>Verdict</h2>
{_verdict_html(verdict)}
<h2>Run</h2>
{_table(("figure", "value"), run_rows)}
<h2>Plots</h2>
{chr(10).join(images)}
<h2>Fault schedule</h2>
{_table(("start (s)", "lasted (s)", "action", "pods", "fault"), faults) if faults
 else "<p class='muted'>No faults recorded.</p>"}
<h2>Figures (JSON)</h2>
<pre>{html.escape(json.dumps(data.figures, indent=2))}</pre>
</body></html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return {"index": str(index), "plots": [str(p) for p in plots.values()]}
