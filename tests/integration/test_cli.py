"""The CLI as a user runs it: separate processes, a real store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from fleetsim.store import Store, StoreConfig
from tests.helpers import assert_no_processes, wait_until


def fleetsim(run_dir: Path, *args: str, env: dict[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["cmdline", "pid"]):
        try:
            if any(text in part for part in proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except psutil.Error:
            pass
    return found


@pytest.fixture
def cli_env(store_config: StoreConfig) -> dict[str, str]:
    return {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": store_config.schema or ""}


@pytest.mark.timeout(180)
def test_detach_status_submit_restart_down(tmp_path: Path, store: Store,
                                           cli_env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    up = fleetsim(run_dir, "up", "--pods", "3", "--detach", "--restart", env=cli_env)
    assert up.returncode == 0, up.stderr
    assert "fleet ready" in up.stdout
    assert up.stdout.count("pod-") >= 3
    run_json = json.loads((run_dir / "run.json").read_text())
    assert oct((run_dir / "run.json").stat().st_mode & 0o777) == "0o600"
    coordinator_pid = run_json["coordinator_pid"]

    submitted = fleetsim(run_dir, "submit", "--count", "300", "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["count"] == 300
    wait_until(lambda: store.status_counts()["completed"] == 300, 60, what="drain")

    status = fleetsim(run_dir, "status", "--json")
    assert status.returncode == 0, status.stderr
    data: dict[str, Any] = json.loads(status.stdout)
    assert set(data) >= {"leader", "pods", "steps", "queues"}
    assert data["leader"] is not None and set(data["leader"]) == {"pod", "term", "pid"}
    assert {p["id"] for p in data["pods"]} == {"pod-1", "pod-2", "pod-3"}
    assert set(data["pods"][0]) == {"id", "pid", "incarnation", "state", "heartbeat_age_s",
                                     "claimed", "completed", "live"}
    assert all(p["live"] for p in data["pods"]) and data["unserved_queues"] == {}
    assert data["steps"]["completed"] == 300

    # --restart: a killed pod comes back with incarnation + 1.
    victim = next(p for p in run_json["pods"] if p["id"] == "pod-2")
    os.kill(victim["pid"], signal.SIGKILL)

    def restarted() -> bool:
        pods = {p["id"]: p for p in store.pods()}
        p = pods.get("pod-2")
        return bool(p and p["incarnation"] == 1 and p["state"] == "alive"
                    and p["pid"] != victim["pid"])

    wait_until(restarted, 30, what="pod-2 restarted as incarnation 1")
    pids = [p["pid"] for p in json.loads((run_dir / "run.json").read_text())["pods"]]

    down = fleetsim(run_dir, "down")
    assert down.returncode == 0, down.stderr
    assert_no_processes([coordinator_pid, *pids])
    assert not (run_dir / "run.json").exists()
    assert processes_mentioning(str(run_dir)) == []


@pytest.mark.timeout(60)
def test_status_without_a_fleet_is_a_clear_error(tmp_path: Path) -> None:
    result = fleetsim(tmp_path, "status")
    assert result.returncode == 4
    assert result.stderr.strip().startswith("error: no fleet in")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["up", "--pods", "0"], "--pods must be between 1 and 200"),
        (["up", "--pods", "2", "--workload", "bogus"], "unknown workload 'bogus'"),
        (["up", "--pods", "2", "--workload", "no_such_module_xyz:handler"],
         "cannot import workload 'no_such_module_xyz:handler'"),
        (["run", "--pods", "1", "--steps", "1", "--workload", "fail:2"],
         "probability must be in [0, 1]"),
        (["up", "--pods", "2", "--lease", "soon"], "invalid duration 'soon'"),
        (["submit", "--store", "mysql://x@127.0.0.1/db"], "invalid store URL"),
    ],
)
def test_bad_input_one_line_error_nothing_running(tmp_path: Path, args: list[str],
                                                   expected: str) -> None:
    result = fleetsim(tmp_path / "run", *args, env={"FLEETSIM_STORE": ""})
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert processes_mentioning(str(tmp_path / "run")) == []


@pytest.mark.timeout(60)
def test_refused_store_url_fails_fast_without_password(tmp_path: Path) -> None:
    url = "postgresql://alice:s3cret-pw@127.0.0.1:1/db"
    result = fleetsim(tmp_path / "run", "up", "--pods", "2", "--store", url, timeout=30)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the store")
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert processes_mentioning(str(tmp_path / "run")) == []


@pytest.mark.timeout(120)
def test_run_json_reports_a_valid_experiment(tmp_path: Path, cli_env: dict[str, str]) -> None:
    result = fleetsim(tmp_path / "run", "run", "--pods", "2", "--steps", "500", "--json",
                      env={**cli_env, "FLEETSIM_SCHEMA": ""}, timeout=100)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"submitted", "completed", "dead", "elapsed_s", "steps_per_s", "valid"} <= set(data)
    assert data["submitted"] == data["completed"] == 500 and data["valid"] is True
    with Store(StoreConfig(cli_env["FLEETSIM_STORE"], schema=data["schema"])) as s:
        s.drop_schema()


@pytest.mark.timeout(60)
def test_queue_settings_and_cancel_from_the_cli(tmp_path: Path, store: Store,
                                                cli_env: dict[str, str]) -> None:
    run_dir = tmp_path / "run"
    env = {**cli_env}
    result = fleetsim(run_dir, "queue", "set", "orders", "--concurrency-limit", "2",
                      "--max-length", "3", "--strict-fifo", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["concurrency_limit"] == 2
    ok = fleetsim(run_dir, "submit", "--queue", "orders", "--count", "3", "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    ids = json.loads(ok.stdout)["ids"]
    full = fleetsim(run_dir, "submit", "--queue", "orders", env=env)
    assert full.returncode == 1
    assert "queue 'orders' is full: max length 3" in full.stderr
    cancelled = fleetsim(run_dir, "cancel", str(ids[0]), "--json", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == {str(ids[0]): "cancelled"}
    listed = fleetsim(run_dir, "queue", "list", "--json", env=env)
    row = json.loads(listed.stdout)["orders"]
    assert row["strict_fifo"] is True and row["depth"] == 2 and row["cancelled"] == 1
    paused = fleetsim(run_dir, "queue", "set", "orders", "--pause", "--json", env=env)
    assert json.loads(paused.stdout)["paused"] is True
    assert json.loads(paused.stdout)["max_length"] == 3  # unchanged settings are kept
