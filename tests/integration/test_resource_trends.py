"""`fleetsim run` with a duration reports resource trends of every process (issue 15).

The long version is the soak test (tests/chaos/test_nightly.py); this one
runs a small real fleet just past the 30-second minimum, so the default
suite pays about 40 s for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetsim.store import StoreConfig
from fleetsim.trends import warmup_s
from tests.integration.test_cli import fleetsim
from tests.integration.test_cli_experiments import drop

# The file's own duration is overridden by --duration on the command line.
EXPERIMENT = """
name = "trends"

[fleet]
pods = 2
workload = "sleep:5"

[load]
duration = "5s"
rate = 20

[thresholds]
valid = true
rss_growth_pct_max = "< 50"
fds_growth_pct_max = "< 100"
steps_dead_tuples_end = ">= 0"
"""

MIB = 2**20


@pytest.fixture
def env(store_config: StoreConfig) -> dict[str, str]:
    # No FLEETSIM_SCHEMA: the run makes its own fresh schema (dropped at the end).
    return {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": ""}


@pytest.mark.timeout(150)
def test_a_run_of_half_a_minute_reports_trends_for_every_process_and_the_store(
        tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "trends.toml"
    path.write_text(EXPERIMENT)
    # 31 s of load: the series (fleet start to the end of the drain) spans more than 30 s.
    result = fleetsim(tmp_path / "run", "run", str(path), "--duration", "31s", "--json",
                      env=env, timeout=130)
    data = json.loads(result.stdout) if result.stdout else {}
    try:
        assert result.returncode == 0, result.stderr[-3000:]
        assert data["submitted"] == 31 * 20  # --duration won over the file's 5 s
        res = data["resources"]
        assert res is not None and "resources_skipped" not in data, data.get(
            "resources_skipped")
        assert res["run_s"] >= 30 and res["warmup_s"] == pytest.approx(
            warmup_s(res["run_s"]), abs=0.01)
        # One series per pod process, the coordinator and the pod-spawner the
        # pods were forked from: no restart in this run.
        assert set(res["processes"]) == {"coordinator", "pod-spawner", "pod-1#0", "pod-2#0"}
        for key, entry in res["processes"].items():
            rss, fds = entry["rss_bytes"], entry["open_fds"]
            assert 10 * MIB < rss["first"] <= rss["peak"] and rss["last"] > 10 * MIB, key
            assert rss["growth_pct"] is not None and rss["slope_per_min"] is not None, key
            assert 0 < fds["first"] <= fds["peak"] and fds["growth_pct"] is not None, key
            # The warm-up was left out; a sample a second remains (loose: a loaded machine).
            assert rss["samples"] >= 12, (key, rss)
        size, dead = res["store"]["steps_bytes"], res["store"]["steps_dead_tuples"]
        # 620 steps written while the run went on: the table grew.
        assert 8192 <= size["first"] < size["last"] and size["slope_per_min"] > 0
        assert dead is not None and dead["last"] >= 0
        figures = data["figures"]
        assert figures["rss_growth_pct_max"] == res["rss_growth_pct_max"] == max(
            e["rss_bytes"]["growth_pct"] for e in res["processes"].values())
        assert {t["name"]: t["passed"] for t in data["thresholds"]} == {
            "valid": True, "rss_growth_pct_max": True, "fds_growth_pct_max": True,
            "steps_dead_tuples_end": True}
    finally:
        if data.get("schema"):
            drop(env["FLEETSIM_STORE"], data["schema"])
