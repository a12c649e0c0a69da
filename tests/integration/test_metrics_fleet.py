"""Metrics of a real fleet: metrics.jsonl, `fleetsim metrics`, the Prometheus endpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetsim.metrics import iter_samples
from fleetsim.store import Store, StoreConfig
from tests.helpers import running_fleet, submit_steps, wait_drained, wait_until

POD_FIELDS = {"t", "kind", "pod", "incarnation", "rss_bytes", "cpu_percent", "completed",
              "in_flight", "claimed", "failed", "released", "stale_writes_refused",
              "store_errors", "terms_won", "open_fds", "threads", "steps_per_s",
              "e2e_p50_s", "e2e_p95_s", "e2e_p99_s"}
FLEET_FIELDS = {"t", "kind", "steps_per_s", "completed", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fleetsim(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), *args],
                          capture_output=True, text=True, timeout=60)


def samples(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [s for s in iter_samples(run_dir / "metrics.jsonl") if s["kind"] == kind]


@pytest.mark.timeout(120)
def test_fleet_metrics_series_cli_and_prometheus(tmp_path: Path, store: Store,
                                                 store_config: StoreConfig) -> None:
    run_dir, port = tmp_path / "run", free_port()
    with running_fleet(store_config, run_dir, pods=2, workload="sleep:2", concurrency=2,
                       batch=10, restart=True, metrics_port=port) as fleet:
        submit_steps(store, 600)
        wait_drained(fleet, store, 600, timeout=60)
        # The counters agree with the store once the last snapshots are in.
        wait_until(lambda: (samples(run_dir, "fleet") or [{}])[-1].get("completed") == 600, 10,
                   what="fleet completed == 600")
        pods = samples(run_dir, "pod")
        assert {p["pod"] for p in pods} == {"pod-1", "pod-2"}
        for line in pods:
            assert set(line) >= POD_FIELDS, POD_FIELDS - set(line)
            assert line["rss_bytes"] > 10_000_000 and line["threads"] >= 1
        assert sum(max(p["completed"] for p in pods if p["pod"] == pod)
                   for pod in ("pod-1", "pod-2")) == 600
        fleet_lines = samples(run_dir, "fleet")
        assert all(set(line) >= FLEET_FIELDS for line in fleet_lines)
        busy = [line for line in fleet_lines if line["e2e_p50_s"] is not None]
        assert busy and all(0 < line["e2e_p50_s"] <= line["e2e_p99_s"] < 30 for line in busy)
        drained = wait_until(lambda: [s for s in samples(run_dir, "store")
                                      if s.get("depth") == {"default": 0}], 10,
                             what="a store sample with the queue empty")
        assert {"steps_dead_tuples", "steps_bytes", "connections", "term"} <= set(drained[-1])
        assert drained[-1]["steps_dead_tuples"] >= 0 and drained[-1]["connections"] >= 3
        # 600 rows and their indexes: more than the empty table's few pages.
        assert drained[-1]["steps_bytes"] > 8192
        assert samples(run_dir, "coordinator")[-1]["rss_bytes"] > 10_000_000

        shown = fleetsim(run_dir, "metrics", "--json")
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert {"steps_per_s", "completed", "e2e_p50_s", "e2e_p95_s",
                "e2e_p99_s"} <= set(doc["fleet"]) and doc["running"] is True
        assert set(doc["pods"]) == {"pod-1", "pod-2"}
        assert all(p["rss_bytes"] > 0 and p["completed"] > 0 and "cpu_percent" in p
                   for p in doc["pods"].values())

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            families = {f.name: f for f in text_string_to_metric_families(reply.read().decode())}
        done = {s.labels["pod"]: s.value for s in families["fleetsim_steps_completed"].samples}
        assert sum(done.values()) == 600
        assert any(s.name == "fleetsim_step_e2e_seconds_bucket"
                   for s in families["fleetsim_step_e2e_seconds"].samples)
        assert all(s.value > 0 for s in families["fleetsim_pod_rss_bytes"].samples)
        assert families["fleetsim_leader_term"].samples[0].value >= 1

        # A killed pod's series ends; its restarted incarnation is a new one.
        victim = fleet.pods["pod-2"]
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.time()

        def restarted() -> bool:
            fleet.poll()  # reaps the victim and respawns it
            return any(p["pod"] == "pod-2" and p["incarnation"] == 1
                       for p in samples(run_dir, "pod"))

        wait_until(restarted, 30, interval=0.2, what="pod-2's new incarnation in metrics.jsonl")
    old = [p for p in samples(run_dir, "pod") if p["pod"] == "pod-2" and p["incarnation"] == 0]
    assert old and max(p["sampled_t"] for p in old) <= killed_at
    after = fleetsim(run_dir, "metrics", "--json")
    assert after.returncode == 0, after.stderr
    doc = json.loads(after.stdout)
    assert doc["running"] is False and doc["pods"]["pod-2"]["incarnation"] == 1
    # --follow on a stopped fleet prints what there is and returns.
    followed = fleetsim(run_dir, "metrics", "--follow", "--csv")
    assert followed.returncode == 0, followed.stderr
    rows = followed.stdout.splitlines()
    assert rows[0].startswith("scope,pod,incarnation,t,rss_bytes,cpu_percent")
    assert {row.split(",")[1] for row in rows[1:]} == {"", "pod-1", "pod-2"}


def test_metrics_without_a_fleet_says_so(tmp_path: Path) -> None:
    result = fleetsim(tmp_path / "nothing", "metrics", "--json")
    assert result.returncode == 4
    assert result.stderr.startswith("error: no metrics in") and result.stderr.count("\n") == 1
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    result = fleetsim(tmp_path / "empty", "metrics")
    assert result.returncode == 1 and "no metrics yet" in result.stderr
    assert fleetsim(tmp_path / "empty", "metrics", "--json", "--csv").returncode == 2
