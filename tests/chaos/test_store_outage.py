"""A store outage longer than the dead threshold is not the death of every pod.

When every pod loses the store at once (a network cut, a store restart), no
heartbeat lands, so once the store is back every pod's heartbeat looks older
than the dead threshold. A leader that declared them all dead at that
moment would revoke every claim in flight and spend an attempt on each
step, for a fault that killed no pod.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetsim.checker import check
from fleetsim.store import Store, StoreConfig
from tests.helpers import rows, running_fleet, submit_steps, wait_drained, wait_until

OUTAGE_S = 6.0  # twice the default dead threshold


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stagger", [
    pytest.param(0.0, id="together", marks=pytest.mark.stress),  # nightly: the easy case
    pytest.param(1.5, id="staggered"),
])
def test_a_store_outage_of_every_pod_declares_no_pod_dead(
    store: Store, store_config: StoreConfig, tmp_path: Path, stagger: float
) -> None:
    """Staggered: half the pods get the store back 1.5 s after the others (links
    recover unevenly); the first back must not declare the rest dead."""
    submit_steps(store, 3000, "sleep:20")
    with running_fleet(store_config, tmp_path, pods=4, batch=5) as fleet:
        wait_until(lambda: store.status_counts()["completed"] > 50, 30, what="progress")
        before = rows(store, "SELECT count(*) FROM leader_actions WHERE action = 'mark_dead'")
        for index, pod in enumerate(sorted(fleet.pod_pids())):
            fleet.injector.apply("partition", pod, {"from": "store", "mode": "blackhole",
                                                    "for": OUTAGE_S + stagger * (index % 2)})
        completed = store.status_counts()["completed"]
        # Back, and working again.
        wait_until(lambda: store.status_counts()["completed"] > completed + 100,
                   OUTAGE_S + stagger + 30, what="the fleet to work again after the outage")
        wait_drained(fleet, store, 3000, 120)
    after = rows(store, "SELECT count(*) FROM leader_actions WHERE action = 'mark_dead'")
    assert after == before, "pods declared dead for an outage of the store"
    spent = rows(store, "SELECT count(*) FROM finished_attempts WHERE outcome = 'lease_lost'")
    assert spent[0][0] == 0
    report = check(store, final=True)
    assert report.valid is True, report.summary()
