"""The coordinator's metrics time series: ``metrics.jsonl`` in the run directory.

Two daemon threads, so the coordinator's loop never waits on them:

- the recorder, once a second, takes the pods' latest snapshots (as the bus
  received them), writes one ``pod`` line per series that sent something
  new (a series is a pod's incarnation: a killed pod's series just ends, its
  last line stays; a restarted one starts a new series), one ``fleet`` line
  (totals over every series ever seen, throughput, end-to-end percentiles
  from the merged histograms), one ``coordinator`` line (its own process),
  one ``process`` line per helper process the coordinator started (the
  fault proxy), and the store sampler's latest ``store`` line, if new;
- the store sampler reads the store's figures (depth per queue, dead
  tuples, connections, leader term) through a connection of its own: a
  store that hangs or restarts delays only the ``store`` lines.

The format is documented in docs/reference/metrics.md; it is a contract
(reports and `fleetsim metrics` read it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from fleetsim.errors import FleetsimError
from fleetsim.metrics import HISTOGRAMS, Histogram, merge_all, process_gauges

log = logging.getLogger("fleetsim.metrics")

# Pod fields copied from a snapshot's gauges and counters (missing ones are omitted).
POD_GAUGES = ("rss_bytes", "cpu_percent", "open_fds", "threads", "in_flight", "leader_term")
POD_COUNTERS = ("claimed", "completed", "failed", "released", "stale_writes_refused",
                "store_errors", "terms_won")


@dataclass
class _Series:
    """The latest snapshot of one pod incarnation, and the one before the last line."""

    pod: str
    incarnation: int
    counters: Mapping[str, float]
    gauges: Mapping[str, float]
    ts: float
    written_ts: float = float("-inf")
    written_counters: Mapping[str, float] | None = None

    def histogram(self, name: str, counters: Mapping[str, float] | None = None) -> Histogram:
        try:
            return Histogram.from_counters(self.counters if counters is None else counters, name)
        except FleetsimError:
            return Histogram()  # a malformed snapshot: counted as nothing


class MetricsRecorder:
    """Writes ``path`` once every ``period_s`` until :meth:`stop` (a final sample then).

    ``pod_snapshots`` returns the latest snapshot of each pod as the bus
    holds them: ``{pod: {"incarnation", "counters", "gauges", "ts"}}``.
    ``open_store`` returns a Store for the sampler (None: no store lines).
    ``helpers`` returns the coordinator's other processes, ``{name: pid}``
    (the fault proxy): each gets a ``process`` line while it lives.
    """

    def __init__(self, path: Path, pod_snapshots: Callable[[], Mapping[str, Mapping[str, Any]]],
                 open_store: Callable[[], Any] | None = None, period_s: float = 1.0,
                 helpers: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.path = path
        self.period_s = period_s
        self._pod_snapshots = pod_snapshots
        self._open_store = open_store
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._series: dict[tuple[str, int], _Series] = {}
        self._fleet_prev: tuple[float, float] | None = None
        # Each series' e2e histogram at the last fleet line: the fleet's
        # window is the sum of the series' own windows.
        self._fleet_prev_e2e: dict[tuple[str, int], Histogram] = {}
        self._store_sample: dict[str, Any] | None = None
        self._store_written: dict[str, Any] | None = None
        self._process = psutil.Process(os.getpid())
        self._process.cpu_percent(None)
        self._helpers = helpers
        # One psutil.Process per helper pid: cpu_percent is since its previous call.
        self._helper_processes: dict[int, psutil.Process] = {}
        self._out: IO[str] | None = None
        self._threads: list[threading.Thread] = []
        self.latest_fleet: dict[str, Any] | None = None

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        """Start afresh (the file of an earlier fleet is replaced) and sample from now on."""
        self._out = self.path.open("w", encoding="utf-8")
        self._threads = [threading.Thread(target=self._record_loop, name="metrics", daemon=True)]
        if self._open_store is not None:
            self._threads.append(
                threading.Thread(target=self._store_loop, name="metrics-store", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the threads, write a last sample and close the file."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5.0)
        if self._out is not None:
            with contextlib.suppress(Exception):
                self.sample()
            self._out.close()
            self._out = None

    def _record_loop(self) -> None:
        next_at = time.monotonic() + self.period_s
        while not self._stopping.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.period_s
            try:
                self.sample()
            except Exception:  # a bad sample must not end the series
                log.exception("metrics sample failed")

    def _store_loop(self) -> None:
        from fleetsim.store.gauges import store_gauges

        store = None
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                if store is None:
                    assert self._open_store is not None
                    store = self._open_store()
                sample: dict[str, Any] = {"t": round(time.time(), 3), "kind": "store",
                                          **store_gauges(store)}
            except FleetsimError as exc:
                sample = {"t": round(time.time(), 3), "kind": "store", "error": str(exc)}
            except Exception as exc:  # keep sampling; say why this one failed
                log.exception("store sample failed")
                sample = {"t": round(time.time(), 3), "kind": "store",
                          "error": f"{type(exc).__name__}: {exc}"}
            with self._lock:
                self._store_sample = sample
            self._stopping.wait(max(0.0, self.period_s - (time.monotonic() - started)))
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    # -- one sample -----------------------------------------------------------

    def sample(self) -> list[dict[str, Any]]:
        """Write one sample of every kind now; return the lines written."""
        now = time.time()
        lines = []
        with self._lock:
            for pod, snap in dict(self._pod_snapshots()).items():
                key = (pod, int(snap.get("incarnation", 0)))
                series = self._series.get(key)
                if series is None:
                    series = self._series[key] = _Series(pod, key[1], {}, {}, float("-inf"))
                ts = float(snap.get("ts", 0.0))
                if ts > series.ts:
                    series.counters, series.gauges, series.ts = (
                        dict(snap.get("counters", {})), dict(snap.get("gauges", {})), ts)
            for series in self._series.values():
                if series.ts > series.written_ts:
                    lines.append(self._pod_line(now, series))
            lines.append(self._fleet_line(now))
            lines.append(self._coordinator_line(now))
            lines.extend(self._helper_lines(now))
            if self._store_sample is not None and self._store_sample is not self._store_written:
                lines.append(self._store_sample)
                self._store_written = self._store_sample
            out = self._out
            if out is not None:
                out.write("".join(json.dumps(line, separators=(",", ":")) + "\n"
                                  for line in lines))
                out.flush()
        return lines

    def _pod_line(self, now: float, series: _Series) -> dict[str, Any]:
        line: dict[str, Any] = {"t": round(now, 3), "kind": "pod", "pod": series.pod,
                                "incarnation": series.incarnation,
                                "sampled_t": round(series.ts, 3)}
        line.update({name: series.gauges[name] for name in POD_GAUGES if name in series.gauges})
        line.update({name: int(series.counters.get(name, 0)) for name in POD_COUNTERS})
        before = series.written_counters
        elapsed = series.ts - series.written_ts
        if before is not None and elapsed > 0:
            line["steps_per_s"] = round(
                (series.counters.get("completed", 0) - before.get("completed", 0)) / elapsed, 3)
        else:
            line["steps_per_s"] = None
        for name in HISTOGRAMS:
            window = series.histogram(name)
            if before is not None:
                # Not an earlier snapshot: the whole histogram is the window.
                with contextlib.suppress(FleetsimError):
                    window = window.minus(series.histogram(name, before))
            line.update(window.percentiles(name.removesuffix("_s")))
        series.written_ts, series.written_counters = series.ts, series.counters
        return line

    def _fleet_line(self, now: float) -> dict[str, Any]:
        series = list(self._series.values())
        completed = sum(s.counters.get("completed", 0) for s in series)
        e2e = merge_all(s.histogram("e2e_s") for s in series)
        line: dict[str, Any] = {
            "t": round(now, 3), "kind": "fleet",
            "completed": int(completed),
            "claimed": int(sum(s.counters.get("claimed", 0) for s in series)),
            "failed": int(sum(s.counters.get("failed", 0) for s in series)),
            "pods_reporting": sum(1 for s in series if now - s.ts <= 3 * self.period_s),
            "steps_per_s": None,
        }
        now_e2e = {key: s.histogram("e2e_s") for key, s in self._series.items()}
        window = e2e
        if self._fleet_prev is not None:
            prev_t, prev_completed = self._fleet_prev
            if now > prev_t:
                line["steps_per_s"] = round(max(0.0, completed - prev_completed) / (now - prev_t),
                                            3)
            # Series by series: a series whose counts went down (a pod that
            # rejoined with the same incarnation counts from zero again) is
            # all new since then, and must not turn the fleet's window into
            # the whole run.
            windows = []
            for key, h in now_e2e.items():
                before = self._fleet_prev_e2e.get(key)
                if before is not None:
                    with contextlib.suppress(FleetsimError):
                        h = h.minus(before)
                windows.append(h)
            window = merge_all(windows)
        line.update(window.percentiles("e2e"))
        line.update(e2e.percentiles("e2e_all"))
        line["e2e_count"] = e2e.count
        line["e2e_hist"] = {k.removeprefix("h.e2e_s."): v
                            for k, v in e2e.to_counters("e2e_s").items()}
        self._fleet_prev = (now, completed)
        self._fleet_prev_e2e = now_e2e
        self.latest_fleet = line
        return line

    def _coordinator_line(self, now: float) -> dict[str, Any]:
        return {"t": round(now, 3), "kind": "coordinator", "pid": self._process.pid,
                **process_gauges(self._process)}

    def _helper_lines(self, now: float) -> list[dict[str, Any]]:
        if self._helpers is None:
            return []
        lines = []
        helpers = dict(self._helpers())
        # Forget the helpers that are no longer named (a spawner replaced, a
        # proxy restarted): one entry per pid ever seen would only grow.
        for pid in set(self._helper_processes) - set(helpers.values()):
            del self._helper_processes[pid]
        for name, pid in sorted(helpers.items()):
            process = self._helper_processes.get(pid)
            if process is None:
                try:
                    process = self._helper_processes[pid] = psutil.Process(pid)
                except psutil.Error:
                    continue  # gone already
            gauges = process_gauges(process)
            if "rss_bytes" in gauges:  # an exited (zombie) process has none: no line
                lines.append({"t": round(now, 3), "kind": "process", "name": name, "pid": pid,
                              **gauges})
        return lines

    # -- for the Prometheus endpoint --------------------------------------------

    def figures(self) -> Any:
        """What the Prometheus endpoint shows: each pod's latest series, the store's figures."""
        from fleetsim.prometheus import Figures, PodFigures

        with self._lock:
            latest: dict[str, _Series] = {}
            for series in self._series.values():
                shown = latest.get(series.pod)
                if shown is None or series.incarnation >= shown.incarnation:
                    latest[series.pod] = series
            store = self._store_sample or {}
            pods = [PodFigures(s.pod, s.incarnation, dict(s.counters), dict(s.gauges))
                    for s in latest.values()]
        return Figures(pods=pods, leader_term=store.get("term"),
                       depth=dict(store.get("depth") or {}))


__all__ = ["POD_COUNTERS", "POD_GAUGES", "MetricsRecorder"]
