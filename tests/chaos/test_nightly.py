"""Nightly tiers: `pytest -m stress` (biggest cases) and `pytest -m soak` (long runs).

They are out of the default run (see pyproject.toml addopts); CI nightly runs
them with the same fixtures against a real PostgreSQL.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from fleetsim.checker import check
from fleetsim.coordinator import Coordinator, FleetSpec
from fleetsim.metrics import metrics_path, read_samples
from fleetsim.store import StepSpec, Store, StoreConfig
from fleetsim.trends import resource_trends
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
    """Scenarios one after another for FLEETSIM_SOAK_SECONDS (default 600) under load.

    Then the resource trends of the metrics series: after the warm-up, no
    process's RSS grew by 10% or more (fleetsim.trends: median of the last
    window against the first); every series' slopes are printed (`-s`).
    """
    budget = float(os.environ.get("FLEETSIM_SOAK_SECONDS", "600"))
    run_dir = private_tmp / "run"
    fleet = Coordinator(FleetSpec(run_dir=run_dir, pods=5, batch=5, restart=True,
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
        trends = resource_trends(read_samples(metrics_path(run_dir))[0])
    finally:
        fleet.stop(grace_s=5.0)
    table = _trend_table(trends)
    print(table)
    measured = [key for key, entry in trends["processes"].items()
                if entry["rss_bytes"] and entry["rss_bytes"]["growth_pct"] is not None]
    # Killed incarnations may be too short to judge; the coordinator and a pod never are.
    assert "coordinator" in measured and any(k.startswith("pod-") for k in measured), table
    assert trends["leaking"] == [], f"RSS grew >= 10% after warm-up:\n{table}"


def _trend_table(trends: dict[str, Any]) -> str:
    """One line per process series: RSS first/last, growth and slope; fds slope; the store."""
    lines = [f"resource trends over {trends['run_s']:.0f} s "
             f"(warm-up {trends['warmup_s']:.0f} s):"]
    for key, entry in trends["processes"].items():
        rss, fds = entry["rss_bytes"] or {}, entry["open_fds"] or {}
        growth, slope, fds_slope = (rss.get("growth_pct"), rss.get("slope_per_min"),
                                    fds.get("slope_per_min"))
        lines.append(
            f"  {key:<14} rss {rss.get('first', 0) / 2**20:7.1f} -> "
            f"{rss.get('last', 0) / 2**20:7.1f} MiB  growth "
            f"{'-' if growth is None else f'{growth:+.2f} %':>9}  slope "
            f"{'-' if slope is None else f'{slope / 2**10:+.1f}':>8} KiB/min  fds slope "
            f"{'-' if fds_slope is None else f'{fds_slope:+.2f}'}/min"
            + (f"  ({rss['note']})" if rss.get("note") else ""))
    for name, figure in trends["store"].items():
        if figure:
            lines.append(f"  store {name}: {figure['first']:.0f} -> {figure['last']:.0f}, "
                         f"slope {figure['slope_per_min'] or 0:+.0f}/min")
    return "\n".join(lines)
