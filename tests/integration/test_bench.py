"""`fleetsim bench` for real: a tiny matrix, its table and its JSON (issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(90)


def bench(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`fleetsim bench ARGS` in a fresh process, with no FLEETSIM_* setting of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSIM_")}
    return subprocess.run(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(tmp_path / "run"), "bench", *args],
        capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def test_a_tiny_bench_prints_the_table_and_writes_the_json(
        pg_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = bench(tmp_path, "--pods", "1", "--steps", "300", "--repeat", "1", "--store", pg_url,
                 "--json", str(out), timeout=80)
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


def test_store_loop_and_fleet_options_in_one_tiny_bench(pg_url: str, tmp_path: Path) -> None:
    proc = bench(tmp_path, "--pods", "1", "--steps", "500", "--repeat", "1", "--store-loop",
                 "--metrics", "off", "--client-history", "off", "--store", pg_url,
                 "--json", "-", timeout=80)
    assert proc.returncode == 0, proc.stderr
    rows = {row["key"]: row for row in json.loads(proc.stdout)["rows"]}
    assert list(rows) == ["reference procs=1 batch=50 noop", "store procs=1 batch=50 noop",
                          "pods=1 c=1 batch=50 noop metrics=off client-history=off"]
    for row in rows.values():
        assert row["completed"] == 500 and not row["errors"], row
    store = rows["store procs=1 batch=50 noop"]
    assert store["kind"] == "store" and store["ratio"]["median"] > 0
    assert store["cpu_us_per_step"] > 0 and store["rss_pod"] > 0


def _failing_loop(url: str, schema: str, app: str, index: int, batch: int, workload: str,
                  clock: Any) -> None:
    raise ValueError(f"claimer {index} broke before the start")


def test_a_claimer_that_fails_fails_the_trial_with_its_error(pg_url: str) -> None:
    from fleetsim.bench import server
    from fleetsim.bench.claimers import run_claimers

    admin = server.connect(pg_url, "fleetsim-bench-failing")
    try:
        with pytest.raises(RuntimeError, match="store claimer failed: ValueError: claimer"):
            run_claimers("store", _failing_loop, pg_url, "public", "fleetsim-bench-failing",
                         admin, 2, 50, 10, "noop")
    finally:
        admin.close()


def test_bench_checker_times_a_valid_history_and_the_checker_sees_a_broken_one(
        pg_url: str, store_config: Any) -> None:
    from fleetsim.bench import server
    from fleetsim.bench.checker import generate, run_checker_bench, time_checks

    row = run_checker_bench(pg_url, 500, 1)
    assert row["verdict"] == "valid" and row["violations"] == {}
    assert row["generated"]["steps"] == 500 and row["generated"]["attempts"] > 500
    assert row["check_s"]["n"] == 1 and row["rss_peak_bytes"] > 0

    # The same history with one completed attempt removed: the bench must not
    # pass a history the checker rejects.
    schema = store_config.schema
    generate(pg_url, schema, 300)
    conn = server.connect(pg_url, schema=schema)
    try:
        server.query(conn, "DELETE FROM finished_attempts WHERE claim_token = (SELECT"
                           " max(claim_token) FROM finished_attempts WHERE outcome = 'completed')")
    finally:
        conn.close()
    broken = time_checks(pg_url, schema, 1)
    assert broken["verdict"] == "invalid"
    assert sum(broken["violations"].values()) >= 1


@pytest.mark.stress
@pytest.mark.timeout(180)
def test_bench_chaos_reports_the_failover_of_a_killed_leader(
        pg_url: str, tmp_path: Path) -> None:
    proc = bench(tmp_path, "--chaos", "kill-leader", "--repeat", "1", "--store", pg_url,
                 "--json", "-", timeout=170)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)["chaos"]
    assert row["fault"] == "kill-leader" and row["valid"] == row["trials"] == 1
    # A new term came, after the lease at most plus slack (3 s lease by default).
    assert 0 < row["failover"]["median_s"] < 10
    # Timed from the kill too (certain death: well under the lease, with slack),
    # and the fleet kept completing steps during the fault.
    assert 0 < row["new_term_from_fault"]["median_s"] < 10
    assert row["reclaim_from_fault"]["trials_with_it"] in (0, 1)
    assert row["throughput_fraction"]["median"] > 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", [
    (["--chaos", "kill", "--spawn", "vfork"], "--spawn takes fork, exec or fork,exec"),
    (["--spawn", "exec"], "--spawn is for --chaos"),
])
def test_bench_spawn_bad_input_is_one_line(tmp_path: Path, args: list[str],
                                           message: str) -> None:
    proc = bench(tmp_path, *args, "--store", "postgresql://nobody@127.0.0.1:1/none",
                 timeout=50)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


@pytest.mark.stress
@pytest.mark.timeout(240)
def test_bench_chaos_puts_forked_and_execd_pods_side_by_side(
        pg_url: str, tmp_path: Path) -> None:
    proc = bench(tmp_path, "--chaos", "kill-leader", "--spawn", "fork,exec", "--repeat", "1",
                 "--store", pg_url, "--json", "-", timeout=230)
    assert proc.returncode == 0, proc.stderr
    rows = {row["fault"]: row for row in json.loads(proc.stdout)["chaos"]}
    assert set(rows) == {"kill-leader (fork)", "kill-leader (exec)"}
    for row in rows.values():
        assert row["valid"] == row["trials"] == 1
        assert 0 < row["new_term_from_fault"]["median_s"] < 10
