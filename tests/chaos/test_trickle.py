"""Trickle load under storage faults: the load shape that lost steps.

With steps arriving below the fleet's capacity, every claim comes back
short of its batch and goes on to look for limited and FIFO queues: a
claim of several statements, where a fault between two of them once
orphaned the steps the first had committed. Bulk submits never take that
path, so each fault kind runs here under a trickle, judged by the checker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleetsim.checker import check
from fleetsim.store import QueueConfig, Store, StoreConfig
from tests.helpers import Trickle, running_fleet, wait_drained

FAULTS: dict[str, dict[str, Any]] = {
    "errors": {"error_rate": 0.3},
    "disconnects": {"disconnect_rate": 0.2},
    "lost-replies": {"reply_loss_rate": 0.15},
    "latency-and-errors": {"error_rate": 0.2, "latency_ms": 20.0},
}
NIGHTLY = {"disconnects", "latency-and-errors"}
RATE = 40
SECONDS = 6


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", [
    pytest.param(name, marks=[pytest.mark.stress] if name in NIGHTLY else [])
    for name in FAULTS
])
def test_trickle_load_under_storage_faults_loses_nothing(
    fault: str, store: Store, store_config: StoreConfig, tmp_path: Path
) -> None:
    # A limited queue makes every short claim take the locked path too.
    store.configure_queue(QueueConfig("limited", concurrency_limit=2))
    total = RATE * SECONDS
    with running_fleet(store_config, tmp_path, pods=2, batch=10, fault_proxy=False,
                       queues=("default", "limited")) as fleet:
        fleet.injector.apply("storage-fault", "all", {**FAULTS[fault], "for": SECONDS + 1.0})
        trickle = Trickle(store_config, total, RATE, "sleep:5")
        trickle.start()
        trickle.join(SECONDS * 3)
        assert trickle.submitted == total
        wait_drained(fleet, store, total, 90)
    report = check(store, final=True)
    assert report.valid is True, report.summary()
    assert report.counts["steps"] == total
