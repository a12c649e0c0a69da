"""Nightly tiers: `pytest -m stress` (biggest cases) and `pytest -m soak` (long runs).

They are out of the default run (see pyproject.toml addopts); CI nightly runs
them with the same fixtures against a real PostgreSQL.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fleetsim.checker import check
from fleetsim.coordinator import Coordinator, FleetSpec
from fleetsim.store import StepSpec, Store, StoreConfig
from tests.helpers import running_fleet, wait_drained, wait_until


@pytest.mark.stress
@pytest.mark.timeout(900)
def test_ten_pods_drain_100k_steps_valid(store: Store, store_config: StoreConfig,
                                         tmp_path: Path) -> None:
    for _ in range(10):
        store.submit_many([StepSpec("default")] * 10_000)
    with running_fleet(store_config, tmp_path, pods=10, batch=50):
        wait_until(lambda: store.status_counts()["completed"] == 100_000, 600, interval=0.5,
                   what="100,000 steps drained")
    report = check(store, final=True)
    assert report.valid is True, report.summary()


@pytest.mark.soak
@pytest.mark.timeout(7200)
def test_soak_scenarios_back_to_back(store_config: StoreConfig, private_tmp: Path) -> None:
    """Scenarios one after another for FLEETSIM_SOAK_SECONDS (default 600) under load."""
    budget = float(os.environ.get("FLEETSIM_SOAK_SECONDS", "600"))
    fleet = Coordinator(FleetSpec(run_dir=private_tmp / "run", pods=5, batch=5, restart=True,
                                  seed=11))
    fleet.start()
    try:
        store = fleet.store
        assert store is not None
        ends = time.monotonic() + budget
        rounds = 0
        total = 0
        while time.monotonic() < ends:
            for name in ("mixed", "kill-leader-loop", "storage-brownout", "lost-replies",
                         "store-restart"):
                store.submit_many([StepSpec("default", {"workload": "sleep:20"})] * 3000)
                total += 3000
                fleet.run_scenario(name, seed=rounds)
                wait_until(lambda: fleet.poll() is not None and fleet.scenario.done.is_set(),
                           120, interval=0.5, what=f"scenario {name}")
                rounds += 1

        wait_drained(fleet, store, total, 300)
        report = check(store, final=True)
        assert report.valid is True, report.summary()
    finally:
        fleet.stop(grace_s=5.0)
