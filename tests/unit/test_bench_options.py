"""`fleetsim bench`'s fleet options, --store-loop pairing and --checker's verdict (no store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fleetsim.bench import BenchPlan, BenchReport
from fleetsim.bench.fleet import FleetConfig
from fleetsim.bench.matrix import _pair
from fleetsim.cli import cli
from fleetsim.errors import ConfigError

pytestmark = pytest.mark.timeout(20)


def test_fleet_options_name_the_row_and_reach_the_fleet_spec(tmp_path: Path) -> None:
    plain = FleetConfig(5, 1, 50, "noop")
    # Defaults are not named: a baseline from before the options still matches.
    assert plain.key == "pods=5 c=1 batch=50 noop"
    bare = FleetConfig(5, 1, 50, "noop", metrics=False, client_history=False)
    assert bare.key == "pods=5 c=1 batch=50 noop metrics=off client-history=off"
    spec = bare.spec("postgresql://h/db", "s", tmp_path)
    assert (spec.metrics, spec.client_history, spec.fault_proxy) == (False, False, False)
    assert plain.spec("postgresql://h/db", "s", tmp_path).metrics is True


def test_the_plan_crosses_metrics_and_client_history() -> None:
    plan = BenchPlan(pods=(1,), metrics=(True, False), client_history=(False,))
    assert [f.key for f in plan.fleets()] == [
        "pods=1 c=1 batch=50 noop client-history=off",
        "pods=1 c=1 batch=50 noop metrics=off client-history=off"]
    with pytest.raises(ConfigError):
        BenchPlan(metrics=())


def test_a_store_loop_trial_is_paired_with_its_reference() -> None:
    report = BenchReport(BenchPlan(pods=(2,), store_loop=True, repeat=1))
    ref = {"key": "reference procs=2 batch=50 noop", "kind": "reference", "repeat": 0,
           "steps_s": 10_000.0, "cpu_us_per_step": 5.0, "server_cpu_us_per_step": 40.0}
    store = {"key": "store procs=2 batch=50 noop", "kind": "store", "repeat": 0, "procs": 2,
             "batch": 50, "workload": "noop", "steps_s": 4_000.0, "cpu_us_per_step": 20.0,
             "server_cpu_us_per_step": 60.0}
    report.trials += [ref, store]
    _pair(report, {ref["key"]: ref, store["key"]: store}, 0)
    assert store["ratio"] == pytest.approx(0.4)
    assert store["cpu_ratio"] == pytest.approx(4.0)
    assert "ratio" not in ref
    # A failed reference leaves the store loop without a ratio, not with a wrong one.
    store2 = {**store, "repeat": 1}
    del store2["ratio"]
    report.trials.append(store2)
    _pair(report, {ref["key"]: {**ref, "error": "boom"}, store["key"]: store2}, 1)
    assert "ratio" not in store2


@pytest.mark.parametrize("bad", ["maybe", "on,on", ""])
def test_on_off_options_refuse_anything_else(bad: str) -> None:
    result = CliRunner().invoke(cli, ["bench", "--store", "postgresql://nowhere/db",
                                      "--metrics", bad])
    assert result.exit_code != 0 and "--metrics takes on, off or on,off" in result.output


def _checker_row(verdict: str) -> dict[str, Any]:
    return {"steps": 500, "verdict": verdict, "violations": {} if verdict == "valid" else
            {"duplicate_completion": 1},
            "check_s": {"median": 0.05, "min": 0.05, "max": 0.05, "n": 1},
            "generated": {"attempts": 588, "leader_actions": 56, "bytes": 1 << 20},
            "rss_peak_bytes": 1 << 26, "rss_before_check_bytes": 1 << 26}


@pytest.mark.parametrize("verdict,code", [("valid", 0), ("invalid", 1)])
def test_bench_checker_fails_unless_the_history_is_judged_valid(
        monkeypatch: pytest.MonkeyPatch, verdict: str, code: int) -> None:
    monkeypatch.setattr("fleetsim.bench.checker.run_checker_bench",
                        lambda url, steps, repeat, say: _checker_row(verdict))
    result = CliRunner().invoke(cli, ["bench", "--checker", "--steps", "500", "--repeat", "1",
                                      "--store", "postgresql://nowhere/db"])
    assert result.exit_code == code, result.output
    assert "check --final" in result.output
    if code:
        assert "judged invalid" in result.output


def test_chaos_and_checker_are_not_combined() -> None:
    result = CliRunner().invoke(cli, ["bench", "--checker", "--chaos", "kill",
                                      "--store", "postgresql://nowhere/db"])
    assert result.exit_code != 0 and "separate benches" in result.output


class _Run:
    def __init__(self, verdict: str, failover: float | None) -> None:
        self.verdict, self.note = verdict, ""
        self.figures = ({"failover": {"median_s": failover, "max_s": failover}}
                        if failover is not None else {})


def test_chaos_rows_summarise_the_checker_and_the_fault_clock() -> None:
    from fleetsim.bench.chaos import _row, chaos_table_lines

    runs = [(_Run("valid", 2.0), {"new_term_s": 0.2, "reclaim_median_s": 0.3,
                                  "reclaim_max_s": 0.5, "throughput_fraction": 0.8}),
            (_Run("valid", 3.0), {"new_term_s": 0.4, "reclaim_median_s": 0.1,
                                  "reclaim_max_s": 0.9, "throughput_fraction": 0.6}),
            # A trial the clock could not measure (an error): counted, not averaged in.
            (_Run("error", None), {})]
    row = _row("kill-leader", runs)
    assert (row["trials"], row["valid"]) == (3, 2)
    assert row["failover"] == {"median_s": 2.5, "max_s": 3.0, "trials_with_it": 2}
    assert row["new_term_from_fault"] == {"median_s": pytest.approx(0.3), "max_s": 0.4,
                                          "trials_with_it": 2}
    # Re-claim: the median of the trials' medians, the largest of their maxima.
    assert row["reclaim_from_fault"]["median_s"] == pytest.approx(0.2)
    assert row["reclaim_from_fault"]["max_s"] == 0.9
    assert row["throughput_fraction"]["median"] == pytest.approx(0.7)
    header, _, line = chaos_table_lines([row])
    assert "new term from fault median" in header and "throughput during/before" in header
    assert "0.30 s" in line and "0.70 [0.60-0.80]" in line
    # Nothing measured: dashes, not zeros.
    empty = _row("kill", [(_Run("error", None), {})])
    assert empty["throughput_fraction"] is None
    assert chaos_table_lines([empty])[2].count(" - ") >= 8
