"""`fleetsim bench --baseline`: a regressed ratio fails the run and is named (no store)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import fleetsim.cli.bench as cli_bench
from fleetsim.bench import BenchPlan, BenchReport
from fleetsim.bench.baseline import baseline_of, compare, parse_tolerance
from fleetsim.cli import cli
from fleetsim.errors import ConfigError

pytestmark = pytest.mark.timeout(20)

KEY = "pods=5 c=1 batch=50 noop"


def _report(ratios: list[float], cpu_ratio: float = 4.0) -> BenchReport:
    """A finished bench of one fleet configuration with these per-repeat ratios."""
    report = BenchReport(BenchPlan(repeat=len(ratios), steps=1000))
    for repeat, ratio in enumerate(ratios):
        common = {"repeat": repeat, "steps": 1000, "completed": 1000, "seconds": 0.1,
                  "e2e_p50_s": 0.05, "e2e_p95_s": 0.09, "e2e_p99_s": 0.1,
                  "server_cpu_us_per_step": 30.0, "transactions_per_step": 0.05}
        report.trials.append({**common, "key": "reference procs=5 batch=50 noop",
                              "kind": "reference", "steps_s": 10_000.0, "rss_pod": 1 << 25,
                              "rss_coordinator": None, "cpu_us_per_step": 7.0})
        report.trials.append({**common, "key": KEY, "kind": "fleet", "pods": 5,
                              "concurrency": 1, "batch": 50, "workload": "noop",
                              "steps_s": 10_000.0 * ratio, "ratio": ratio,
                              "cpu_ratio": cpu_ratio, "rss_pod": 1 << 26,
                              "rss_coordinator": 1 << 26, "cpu_us_per_step": 7.0 * cpu_ratio})
    return report


def _baseline(tmp_path: Path, ratio: float = 0.8) -> Path:
    path = tmp_path / "baseline.json"
    doc = baseline_of(_report([ratio] * 3).rows(), {"cores": 2}, "fleetsim bench")
    path.write_text(json.dumps(doc))
    return path


def test_a_ratio_below_the_tolerance_is_a_named_regression() -> None:
    baseline = baseline_of(_report([0.8, 0.8, 0.8]).rows(), {}, "x")
    regressions, missing = compare(baseline, _report([0.6, 0.7, 0.65]).rows(), 0.10)
    assert [(r.key, r.figure) for r in regressions] == [(KEY, "ratio")]
    assert "ratio 0.650 vs baseline 0.800" in regressions[0].describe()
    assert missing == []
    # Within the tolerance (0.75 >= 0.8 * 0.9): no regression.
    assert compare(baseline, _report([0.75] * 3).rows(), 0.10)[0] == []
    # More CPU per step than the reference, beyond the tolerance: regressed too.
    worse_cpu = compare(baseline, _report([0.8] * 3, cpu_ratio=5.0).rows(), 0.10)[0]
    assert [(r.key, r.figure) for r in worse_cpu] == [(KEY, "cpu_ratio")]


def test_tolerances_parse_and_bad_ones_are_refused() -> None:
    assert parse_tolerance("10%") == pytest.approx(0.1)
    assert parse_tolerance("0.25") == pytest.approx(0.25)
    for bad in ("ten", "100%", "-5%"):
        with pytest.raises(ConfigError):
            parse_tolerance(bad)


def _run_cli(monkeypatch: pytest.MonkeyPatch, report: BenchReport, *args: str) -> Any:
    """`fleetsim bench ARGS` with the measuring replaced by ``report``."""
    monkeypatch.setattr(cli_bench, "run_bench", lambda plan, url, say: report)

    class _Conn:
        def close(self) -> None:
            pass

    monkeypatch.setattr("fleetsim.bench.server.connect", lambda url, *a, **k: _Conn())
    monkeypatch.setattr("fleetsim.bench.server.server_version", lambda conn: "PostgreSQL 15")
    return CliRunner().invoke(cli, ["bench", "--store", "postgresql://nowhere/db", *args])


def test_the_command_exits_1_naming_the_regressed_figure(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    baseline = _baseline(tmp_path)
    result = _run_cli(monkeypatch, _report([0.5, 0.55, 0.6]), "--baseline", str(baseline))
    assert result.exit_code == 1, result.output
    assert f"{KEY} ratio" in result.output
    assert "regressed" in result.output

    ok = _run_cli(monkeypatch, _report([0.8, 0.79, 0.81]), "--baseline", str(baseline))
    assert ok.exit_code == 0, ok.output
    assert "ratio to ref" in ok.output  # the table was printed


def test_save_baseline_records_the_machine_and_the_ratios(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "saved.json"
    result = _run_cli(monkeypatch, _report([0.7, 0.8, 0.9]), "--save-baseline", str(path))
    assert result.exit_code == 0, result.output
    saved = json.loads(path.read_text())
    assert saved["figures"][KEY]["ratio"]["median"] == pytest.approx(0.8)
    assert {"cores", "cpu_model", "postgresql", "python"} <= set(saved["machine"])
    assert saved["machine"]["postgresql"] == "PostgreSQL 15"


def test_bad_input_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    for args in (["--pods", "0"], ["--batch", "x"], ["--max-regression", "lots"],
                 ["--baseline", str(tmp_path / "missing.json")]):
        result = _run_cli(monkeypatch, _report([0.8]), *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.count("error:") == 1


def test_chaos_faults_are_checked_and_tabled() -> None:
    from fleetsim.bench.chaos import chaos_table_lines, parse_faults

    assert parse_faults("kill-leader, pause-leader") == ("kill-leader", "pause-leader")
    with pytest.raises(ConfigError):
        parse_faults("kill-everyone")
    row = {"fault": "kill-leader", "trials": 2, "valid": 2,
           "failover": {"median_s": 2.4, "max_s": 2.9},
           "orphan_recovery": {"median_s": None, "max_s": None}}
    header, _, line = chaos_table_lines([row])
    assert "failover median" in header and "2.40 s" in line and "2/2" in line


def test_a_baseline_nothing_of_which_was_measured_fails_instead_of_passing() -> None:
    baseline = {"format": 1, "figures": {"pods=50 batch=50": {"ratio": 0.7}}}
    with pytest.raises(ConfigError, match="nothing of the baseline was measured"):
        compare(baseline, [], 0.1)
