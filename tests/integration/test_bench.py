"""`fleetsim bench` for real: a tiny matrix, its table and its JSON (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(90)


def test_a_tiny_bench_prints_the_table_and_writes_the_json(
        pg_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSIM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(tmp_path / "run"), "bench",
         "--pods", "1", "--steps", "300", "--repeat", "1", "--store", pg_url,
         "--json", str(out)],
        capture_output=True, text=True, timeout=80, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    for column in ("config", "completed", "success %", "steps/s", "ratio to ref", "e2e p50",
                   "p95", "p99", "RSS pod", "RSS coord", "CPU µs/step"):
        assert column in header
    assert "bench: [1/1]" in proc.stderr  # progress goes to stderr

    data = json.loads(out.read_text())
    rows = {row["key"]: row for row in data["rows"]}
    assert set(rows) == {"reference procs=1 batch=50 noop", "pods=1 c=1 batch=50 noop"}
    fleet = rows["pods=1 c=1 batch=50 noop"]
    assert fleet["completed"] == 300 and fleet["success_pct"] == 100.0
    assert fleet["ratio"]["median"] > 0 and fleet["steps_s"]["median"] > 0
    assert fleet["rss_pod"] > 0 and fleet["rss_coordinator"] > 0
    assert fleet["cpu_us_per_step"] > 0
    assert fleet["e2e_p50_s"] <= fleet["e2e_p95_s"] <= fleet["e2e_p99_s"]
    assert {"cores", "cpu_model", "postgresql", "python"} <= set(data["machine"])
    assert all("error" not in t for t in data["trials"])


@pytest.mark.stress
@pytest.mark.timeout(180)
def test_bench_chaos_reports_the_failover_of_a_killed_leader(
        pg_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSIM_")}
    proc = subprocess.run(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(tmp_path / "run"), "bench",
         "--chaos", "kill-leader", "--repeat", "1", "--store", pg_url, "--json", "-"],
        capture_output=True, text=True, timeout=170, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)["chaos"]
    assert row["fault"] == "kill-leader" and row["valid"] == row["trials"] == 1
    # A new term came, after the lease at most plus slack (3 s lease by default).
    assert 0 < row["failover"]["median_s"] < 10
