"""Every queue is served by `up`'s pods unless --queue restricts them; unserved queues are
named by submit, status and check (issue 12, item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetsim.store import Store, StoreConfig
from tests.helpers import assert_no_processes, wait_until
from tests.integration.test_cli import fleetsim


def _up(run_dir: Path, store_config: StoreConfig, *args: str) -> dict[str, object]:
    env = {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": store_config.schema or ""}
    up = fleetsim(run_dir, "up", "--detach", *args, env=env)
    assert up.returncode == 0, up.stderr
    data: dict[str, object] = json.loads((run_dir / "run.json").read_text())
    return data


def _down(run_dir: Path, data: dict[str, object]) -> None:
    fleetsim(run_dir, "down")
    pods = data["pods"]
    assert isinstance(pods, list)
    assert_no_processes([data["coordinator_pid"], data["proxy_pid"],  # type: ignore[list-item]
                         *(p["pid"] for p in pods)])


@pytest.mark.timeout(120)
def test_pods_of_up_serve_a_queue_made_after_they_started(tmp_path: Path, store: Store,
                                                          store_config: StoreConfig) -> None:
    run_dir = tmp_path / "run"
    data = _up(run_dir, store_config, "--pods", "2")
    try:
        # The README's example, on a fleet started without --queue.
        made = fleetsim(run_dir, "queue", "set", "slow", "--concurrency-limit", "2",
                        "--strict-fifo")
        assert made.returncode == 0, made.stderr
        submitted = fleetsim(run_dir, "submit", "--queue", "slow", "--count", "10")
        assert submitted.returncode == 0, submitted.stderr
        assert "warning" not in submitted.stderr
        wait_until(lambda: store.queue_stats()["slow"].completed == 10, 20,
                   what="the 10 steps of queue slow completed")
        also = fleetsim(run_dir, "submit", "--queue", "brand-new", "--count", "5")
        assert also.returncode == 0 and "warning" not in also.stderr, also.stderr
        wait_until(lambda: store.queue_stats()["brand-new"].completed == 5, 20,
                   what="the 5 steps of a queue first named by submit completed")
    finally:
        _down(run_dir, data)


@pytest.mark.timeout(120)
def test_submit_status_and_check_name_a_queue_no_live_pod_serves(
        tmp_path: Path, store: Store, store_config: StoreConfig) -> None:
    run_dir = tmp_path / "run"
    data = _up(run_dir, store_config, "--pods", "1", "--queue", "default")
    try:
        fine = fleetsim(run_dir, "submit", "--queue", "default", "--count", "2")
        assert fine.returncode == 0 and "warning" not in fine.stderr, fine.stderr
        lonely = fleetsim(run_dir, "submit", "--queue", "slow", "--count", "10")
        assert lonely.returncode == 0, lonely.stderr
        warning = lonely.stderr.strip()
        assert warning.startswith("warning: no live pod serves queue 'slow'"), warning
        assert "--queue slow" in warning and len(warning.splitlines()) == 1, warning

        status = fleetsim(run_dir, "status")
        assert status.returncode == 0, status.stderr
        assert "no live pod serves queue 'slow' (10 steps waiting)" in status.stdout
        as_json = json.loads(fleetsim(run_dir, "status", "--json").stdout)
        assert as_json["unserved_queues"] == {"slow": 10}

        check = fleetsim(run_dir, "check")
        assert "no live pod serves queue 'slow' (10 steps waiting)" in check.stderr, check.stderr
    finally:
        _down(run_dir, data)
    # No pod is live any more: every queue with waiting steps is unserved.
    after = json.loads(fleetsim(run_dir, "status", "--json", "--store", store_config.url,
                                "--schema", store_config.schema or "").stdout)
    assert after["unserved_queues"] == {"slow": 10}


@pytest.mark.timeout(30)
def test_submit_refuses_the_queue_name_that_means_every_queue(
        tmp_path: Path, store: Store, store_config: StoreConfig) -> None:
    result = fleetsim(tmp_path / "run", "submit", "--queue", "*",
                      env={"FLEETSIM_STORE": store_config.url,
                           "FLEETSIM_SCHEMA": store_config.schema or ""})
    assert result.returncode == 2
    assert "every queue" in result.stderr and len(result.stderr.strip().splitlines()) == 1
