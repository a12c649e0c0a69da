"""Every shipped scenario, end to end with a fixed seed, judged by the checker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chaos.scenario import list_scenarios
from fleetsim.checker import check
from fleetsim.coordinator import Coordinator, FleetSpec
from fleetsim.store import StepSpec, StoreConfig
from tests.helpers import Trickle, wait_drained, wait_until

SEED = 7
SCENARIOS = {s.name: s for s in list_scenarios()}
# Every shipped scenario runs nightly (-m stress). The default run keeps the
# trickle under storage faults (the load shape that once lost steps) for the
# scenario machinery end to end; each kind of fault the others inject has its
# own shorter default test (tests/chaos/test_faults.py: kill-leader twice,
# pause and partition of the leader, brownout, lost replies, store restart).
# The whole CI (this suite on the host and in the image, side by side) must
# stay under 20 minutes on 2 cores, and these took 2.5 of them each time.
DEFAULT_RUN = {"trickle-storage-faults"}


def _params() -> list[object]:
    return [
        pytest.param(name, marks=[] if name in DEFAULT_RUN else [pytest.mark.stress])
        for name in sorted(SCENARIOS)
    ]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", _params())
def test_shipped_scenario_end_to_end(name: str, store_config: StoreConfig, pg_url: str,
                                     private_tmp: Path) -> None:
    scenario = SCENARIOS[name]
    needs_embedded = any(f.action == "store-restart" for f in scenario.faults)
    pods = scenario.workload.pods or 4
    fleet = Coordinator(FleetSpec(
        run_dir=private_tmp / "run", pods=pods, batch=5, restart=True, seed=SEED,
        store_url=None if needs_embedded else pg_url,
        schema=store_config.schema or "fleetsim",
    ))
    fleet.start()
    try:
        store = fleet.store
        assert store is not None
        rate = scenario.workload.rate
        submitter = None
        if rate:
            # A trickle: one step at a time at the scenario's rate, while it runs.
            workload = scenario.workload.workload or "sleep:5"
            total = int(rate * (scenario.duration_s - 2))
            submitter = Trickle(store_config, total, rate, workload)
        else:
            # Enough work to outlast the scenario: ~pods*40 steps/s at sleep:20.
            total = int(pods * 40 * scenario.duration_s * 0.8)
            store.submit_many([StepSpec("default", {"workload": "sleep:20"})] * total)
        started = fleet.run_scenario(name, SEED)
        if submitter is not None:
            submitter.start()
        assert started["seed"] == SEED
        assert fleet.scenario is not None

        def finished() -> bool:
            fleet.poll()
            return fleet.scenario.done.is_set()

        wait_until(finished, scenario.duration_s + 60, interval=0.2, what="the scenario")
        if submitter is not None:
            submitter.join(30)
            assert submitter.submitted == total

        wait_drained(fleet, store, total, 120)
        report = check(store, final=True)
        assert report.valid is True, report.summary()
    finally:
        fleet.stop(grace_s=5.0)
    log = [json.loads(line) for line in (private_tmp / "run" / "faults.jsonl").read_text()
           .splitlines()]
    assert log[0]["type"] == "start" and log[0]["seed"] == SEED
    applied = [r for r in log if r.get("type") == "fault" and r["outcome"] == "applied"]
    assert applied, "the scenario applied no fault"
    assert log[-1]["type"] == "note" and log[-1]["event"] == "end"
