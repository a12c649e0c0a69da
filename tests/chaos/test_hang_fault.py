"""`fleetsim chaos hang POD`: a real fleet, a pod's next step hangs, its timeout frees it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetsim.checker import check
from fleetsim.store import Store, StoreConfig
from tests.helpers import assert_no_processes, rows, wait_until
from tests.integration.test_cli import fleetsim


@pytest.mark.timeout(120)
def test_a_hung_step_of_a_live_fleet_times_out_and_completes_elsewhere(
    tmp_path: Path, store: Store, store_config: StoreConfig
) -> None:
    run_dir = tmp_path / "run"
    env = {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": store_config.schema or ""}
    up = fleetsim(run_dir, "up", "--pods", "2", "--detach", env=env)
    assert up.returncode == 0, up.stderr
    data = json.loads((run_dir / "run.json").read_text())
    try:
        hang = fleetsim(run_dir, "chaos", "hang", "pod-1", "--for", "6s", "--json")
        assert hang.returncode == 0, hang.stderr
        assert json.loads(hang.stdout)["pods"] == ["pod-1"]
        submitted = fleetsim(run_dir, "submit", "--count", "200", "--workload", "sleep:10",
                             "--timeout", "2s", "--json")
        assert submitted.returncode == 0, submitted.stderr
        wait_until(lambda: store.status_counts()["completed"] == 200, 60, what="every step")
        timed_out = rows(store, "SELECT id, attempts, error FROM steps WHERE error IS NOT NULL")
        assert len(timed_out) == 1, timed_out
        assert timed_out[0][1] == 1
        assert timed_out[0][2] == "TimeoutError: timed out after 2s"
        hung = rows(store, "SELECT pod_id, outcome, finished_at - claimed_at FROM "
                           "finished_attempts WHERE step_id = :id ORDER BY claim_token",
                    id=timed_out[0][0])
        assert (hung[0][0], hung[0][1]) == ("pod-1", "failed")
        assert hung[-1][1] == "completed"
        # Its late result (at 6 s) is dropped by pod-1, never written.
        log = run_dir / "logs" / "pod-1.log"
        wait_until(lambda: log.exists() and "late result dropped" in log.read_text(), 15,
                   what="pod-1's hung runner to return")
        assert rows(store, "SELECT count(*) FROM rejected_writes")[0][0] == 0
        report = check(store, final=True)
        assert report.valid, report.violations[:5]
    finally:
        pids = [p["pid"] for p in json.loads((run_dir / "run.json").read_text())["pods"]] \
            if (run_dir / "run.json").exists() else []
        down = fleetsim(run_dir, "down")
        assert down.returncode == 0, down.stderr
        assert_no_processes([data["coordinator_pid"], data["proxy_pid"], *pids])


@pytest.mark.timeout(120)
def test_a_pod_with_a_runner_hung_for_an_hour_still_stops(
    tmp_path: Path, store: Store, store_config: StoreConfig
) -> None:
    run_dir = tmp_path / "run"
    env = {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": store_config.schema or ""}
    up = fleetsim(run_dir, "up", "--pods", "1", "--detach", env=env)
    assert up.returncode == 0, up.stderr
    data = json.loads((run_dir / "run.json").read_text())
    pids = [p["pid"] for p in data["pods"]]
    try:
        hang = fleetsim(run_dir, "chaos", "hang", "random")
        assert hang.returncode == 0, hang.stderr
        submitted = fleetsim(run_dir, "submit", "--count", "3", "--timeout", "1s")
        assert submitted.returncode == 0, submitted.stderr
        wait_until(lambda: store.status_counts()["completed"] == 3, 30, what="every step")
    finally:
        down = fleetsim(run_dir, "down")
    # The hung runner (an hour) does not keep the pod from exiting: it stops
    # by itself, not killed at the end of the grace period.
    assert down.returncode == 0, down.stderr
    coordinator_log = (run_dir / "logs" / "coordinator.log").read_text()
    assert "did not stop within the grace period" not in coordinator_log
    assert_no_processes([data["coordinator_pid"], data["proxy_pid"], *pids])
    report = check(store, final=True)
    assert report.valid, report.violations[:5]
