"""The coordinator's metrics.jsonl: series per incarnation, fleet totals; the Prometheus page."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fleetsim.metrics import Histogram, Latest, iter_samples
from fleetsim.metrics_recorder import MetricsRecorder
from fleetsim.prometheus import Figures, PodFigures, serve


def snapshot(incarnation: int, completed: int, ts: float, e2e: list[float]) -> dict[str, Any]:
    h = Histogram()
    h.observe_many(e2e)
    return {"incarnation": incarnation, "ts": ts,
            "counters": {"completed": float(completed), **h.to_counters("e2e_s")},
            "gauges": {"rss_bytes": 5e7, "cpu_percent": 12.5, "in_flight": 3.0}}


def test_series_per_incarnation_and_fleet_totals(tmp_path: Path) -> None:
    bus: dict[str, dict[str, Any]] = {
        "pod-1": snapshot(0, 10, 1.0, [0.01] * 10),
        "pod-2": snapshot(0, 20, 1.0, [0.02] * 20),
    }
    recorder = MetricsRecorder(tmp_path / "metrics.jsonl", lambda: bus, period_s=3600)
    recorder.start()
    try:
        recorder.sample()
        # pod-2 is killed: its snapshot stays on the bus, unchanged, then a new
        # incarnation reports from zero; pod-1 goes on.
        bus["pod-1"] = snapshot(0, 30, 2.0, [0.01] * 30)
        recorder.sample()
        bus["pod-2"] = snapshot(1, 5, 3.0, [0.5] * 5)
        recorder.sample()
        recorder.sample()  # nothing new from anyone: no pod line
    finally:
        recorder.stop()
    lines = list(iter_samples(tmp_path / "metrics.jsonl"))
    pods = [(s["pod"], s["incarnation"], s["completed"]) for s in lines if s["kind"] == "pod"]
    assert pods == [("pod-1", 0, 10), ("pod-2", 0, 20), ("pod-1", 0, 30), ("pod-2", 1, 5)]
    fleet = [s for s in lines if s["kind"] == "fleet"]
    # The killed incarnation's last count stays in the fleet's total.
    assert [s["completed"] for s in fleet] == [30, 50, 55, 55, 55]
    assert fleet[2]["e2e_count"] == 55
    # The third window holds only the new incarnation's five 0.5 s steps.
    assert fleet[2]["e2e_p50_s"] is not None and 0.4 <= fleet[2]["e2e_p50_s"] <= 0.5
    assert fleet[3]["e2e_p50_s"] is None  # nothing completed in that window
    assert all(s["kind"] in ("pod", "fleet", "coordinator") for s in lines)
    assert all(s["rss_bytes"] > 0 for s in lines if s["kind"] == "coordinator")
    latest = Latest().add(lines).as_dict()
    assert latest["pods"]["pod-2"]["incarnation"] == 1 and latest["fleet"]["completed"] == 55
    assert "e2e_hist" not in latest["fleet"]
    # Prometheus shows each pod's latest incarnation.
    figures = recorder.figures()
    assert {(p.pod, p.incarnation) for p in figures.pods} == {("pod-1", 0), ("pod-2", 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_a_series_that_counts_from_zero_again_keeps_the_fleet_window_short(
        tmp_path: Path) -> None:
    """A pod that rejoins with the same incarnation reports from zero: the
    fleet's last-second percentiles are its new steps and the others' new
    ones, never the whole run (found by review: they fell back to it)."""
    bus: dict[str, dict[str, Any]] = {
        "pod-1": snapshot(0, 100, 1.0, [0.02] * 100),
        "pod-2": snapshot(0, 10, 1.0, [5.0] * 10),  # slow steps, long ago
    }
    recorder = MetricsRecorder(tmp_path / "metrics.jsonl", lambda: bus, period_s=3600)
    recorder.start()
    try:
        recorder.sample()
        bus["pod-1"] = snapshot(0, 3, 2.0, [0.02] * 3)  # counts from zero again
        bus["pod-2"] = snapshot(0, 12, 2.0, [5.0] * 10 + [0.01] * 2)
        recorder.sample()
    finally:
        recorder.stop()
    fleet = [s for s in iter_samples(tmp_path / "metrics.jsonl") if s["kind"] == "fleet"]
    # The window: pod-1's 3 new steps at 0.02 s and pod-2's 2 new at 0.01 s.
    assert fleet[1]["e2e_p99_s"] is not None and fleet[1]["e2e_p99_s"] < 0.1, fleet[1]


def test_prometheus_page_parses() -> None:
    h = Histogram()
    h.observe_many([0.01, 0.02, 2.0])
    figures = Figures(
        pods=[PodFigures("pod-1", 2, {"completed": 3.0, **h.to_counters("e2e_s")},
                         {"rss_bytes": 123456.0})],
        leader_term=7, depth={"default": 42})
    port = free_port()
    server = serve(lambda: figures, port)
    try:
        families = scrape(port)
    finally:
        server.shutdown()
        server.server_close()
    completed = families["fleetsim_steps_completed"].samples
    assert [(s.name, s.labels, s.value) for s in completed] == [
        ("fleetsim_steps_completed_total", {"pod": "pod-1"}, 3.0)]
    e2e = {(s.name, s.labels.get("le")): s.value
           for s in families["fleetsim_step_e2e_seconds"].samples}
    assert e2e[("fleetsim_step_e2e_seconds_count", None)] == 3.0
    assert e2e[("fleetsim_step_e2e_seconds_bucket", "+Inf")] == 3.0
    assert families["fleetsim_pod_rss_bytes"].samples[0].value == 123456.0
    assert families["fleetsim_leader_term"].samples[0].value == 7.0
    assert families["fleetsim_queue_depth"].samples[0].labels == {"queue": "default"}
    assert json.dumps([f.type for f in families.values()])  # every family has a type


def test_helper_processes_get_a_line_each_while_they_live(tmp_path: Path) -> None:
    import subprocess
    import sys

    # The child says it is up before it is sampled: sampled between fork and
    # the interpreter's start its RSS is a few hundred kB (failed in CI).
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "up"
    helpers = {"fault-proxy": child.pid}
    recorder = MetricsRecorder(tmp_path / "metrics.jsonl", dict, period_s=3600,
                               helpers=lambda: helpers)
    recorder.start()
    try:
        recorder.sample()
        child.kill()
        child.wait()
        recorder.sample()  # gone: no line, no error
        helpers["other"] = 2**22 + 7  # never existed (above the default pid_max)
        recorder.sample()
        assert child.pid in recorder._helper_processes
        del helpers["fault-proxy"]  # no longer a helper (replaced, restarted)
        recorder.sample()
        assert child.pid not in recorder._helper_processes  # forgotten, not kept for ever
    finally:
        recorder.stop()
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    lines = [s for s in iter_samples(tmp_path / "metrics.jsonl") if s["kind"] == "process"]
    assert len(lines) == 1, lines
    assert lines[0]["name"] == "fault-proxy" and lines[0]["pid"] == child.pid
    assert lines[0]["rss_bytes"] > 1_000_000 and lines[0]["open_fds"] >= 3
