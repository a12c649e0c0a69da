"""A Prometheus endpoint (``--metrics-port``) for the coordinator or one pod.

A custom collector renders, at each scrape, the latest figures it is given
(:class:`Figures`): the coordinator's come from the pods' snapshots on the
bus and its store sampler, a pod's from its own hooks. Nothing is computed
on the data path. The names follow the Prometheus conventions (base units,
``_total`` counters, ``_seconds`` histograms); see docs/reference/metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fleetsim.errors import ConfigError, FleetsimError
from fleetsim.metrics import BUCKETS_S, HISTOGRAMS, Histogram

# Counters of a pod, by Prometheus name (without _total) and help.
_COUNTERS = {
    "claimed": ("fleetsim_steps_claimed", "Steps claimed."),
    "completed": ("fleetsim_steps_completed", "Steps completed (completion accepted)."),
    "failed": ("fleetsim_steps_failed", "Steps failed (failure accepted)."),
    "released": ("fleetsim_steps_released", "Steps released unstarted."),
    "stale_writes_refused": ("fleetsim_stale_writes_refused",
                             "Writes refused because the claim was superseded."),
    "store_errors": ("fleetsim_store_errors", "Store calls that failed."),
    "terms_won": ("fleetsim_terms_won", "Leader terms won."),
}
_GAUGES = {
    "rss_bytes": ("fleetsim_pod_rss_bytes", "Resident memory of the pod process."),
    "cpu_percent": ("fleetsim_pod_cpu_percent", "CPU use of the pod process (100 = a core)."),
    "open_fds": ("fleetsim_pod_open_fds", "Open file descriptors of the pod process."),
    "threads": ("fleetsim_pod_threads", "Threads of the pod process."),
    "in_flight": ("fleetsim_pod_in_flight_steps", "Steps claimed and not yet written back."),
}
_HISTOGRAMS = {
    "e2e_s": ("fleetsim_step_e2e_seconds", "Submission to accepted completion."),
    "exec_s": ("fleetsim_step_execution_seconds", "Execution of a step by its workload."),
    "claim_s": ("fleetsim_claim_seconds", "Claim round trip (one batch)."),
}
assert set(_HISTOGRAMS) == set(HISTOGRAMS)


@dataclass(frozen=True)
class PodFigures:
    """One pod's latest counters (histograms included, wire form) and gauges."""

    pod: str
    incarnation: int
    counters: Mapping[str, float]
    gauges: Mapping[str, float]


@dataclass(frozen=True)
class Figures:
    """Everything an endpoint shows at one scrape."""

    pods: list[PodFigures] = field(default_factory=list)
    leader_term: int | None = None  # the current term (None: no valid lease known)
    depth: Mapping[str, int] = field(default_factory=dict)  # queue -> waiting steps


class FleetCollector(Collector):
    """Renders :class:`Figures` as Prometheus metric families."""

    def __init__(self, figures: Callable[[], Figures]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        figures = self._figures()
        counters = {key: CounterMetricFamily(name, text, labels=["pod"])
                    for key, (name, text) in _COUNTERS.items()}
        gauges = {key: GaugeMetricFamily(name, text, labels=["pod"])
                  for key, (name, text) in _GAUGES.items()}
        histograms = {key: HistogramMetricFamily(name, text, labels=["pod"])
                      for key, (name, text) in _HISTOGRAMS.items()}
        incarnation = GaugeMetricFamily("fleetsim_pod_incarnation",
                                        "Incarnation of the pod's latest series.", labels=["pod"])
        for pod in figures.pods:
            labels = [pod.pod]
            incarnation.add_metric(labels, pod.incarnation)
            for key, family in counters.items():
                family.add_metric(labels, pod.counters.get(key, 0.0))
            for key, gauge in gauges.items():
                if key in pod.gauges:
                    gauge.add_metric(labels, pod.gauges[key])
            for key, histogram in histograms.items():
                try:
                    h = Histogram.from_counters(pod.counters, key)
                except FleetsimError:
                    continue
                histogram.add_metric(labels, buckets=_cumulative(h), sum_value=h.total)
        yield from counters.values()
        yield from gauges.values()
        yield from histograms.values()
        yield incarnation
        term = GaugeMetricFamily("fleetsim_leader_term",
                                 "Term of the current leader lease (0: none known).")
        term.add_metric([], float(figures.leader_term or 0))
        yield term
        depth = GaugeMetricFamily("fleetsim_queue_depth",
                                  "Steps waiting in a queue (queued or waiting for a retry).",
                                  labels=["queue"])
        for queue, n in sorted(figures.depth.items()):
            depth.add_metric([queue], n)
        yield depth


def _cumulative(h: Histogram) -> list[tuple[str, float]]:
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(BUCKETS_S, h.counts, strict=False):
        running += count
        buckets.append((f"{bound:.6g}", float(running)))
    buckets.append(("+Inf", float(h.count)))
    return buckets


def serve(figures: Callable[[], Figures], port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; return the server.

    ConfigError if the port cannot be bound.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(figures))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    return server


__all__ = ["Figures", "FleetCollector", "PodFigures", "serve"]
