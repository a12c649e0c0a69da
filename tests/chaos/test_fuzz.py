"""Generated chaos: reproducible cases, valid on the real store; a mutant is caught and shrunk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.fuzz import generate, load_case, to_scenario, write_case
from chaos.scenario import parse_scenario

SEED = 11


def test_a_case_is_drawn_from_its_seed_and_number_alone() -> None:
    assert generate(SEED, 3, 10.0, store_restart=False) == generate(
        SEED, 3, 10.0, store_restart=False)
    assert generate(SEED, 3, 10.0, store_restart=False) != generate(
        SEED, 4, 10.0, store_restart=False)


def test_cases_cover_every_fault_kind_and_load_feature() -> None:
    cases = [generate(SEED, n, 12.0, store_restart=True) for n in range(200)]
    actions = {f[1] for c in cases for f in c.faults}
    assert actions == {"kill", "kill-leader", "pause", "partition", "storage-fault",
                       "store-restart"}
    features = {f for c in cases if c.load for f in c.load.features()}
    assert features == {"rate", "bursts", "limited", "fifo", "cancels", "resubmits",
                        "failing"}


def test_a_written_case_replays_exactly_and_its_scenario_parses(tmp_path: Path) -> None:
    for number in range(30):
        case = generate(SEED, number, 10.0, store_restart=True)
        files = write_case(tmp_path, f"c{number}", case)
        assert load_case(Path(files["case"])) == case
        scenario = parse_scenario(to_scenario(f"c{number}", case))
        assert len(scenario.faults) == len(case.faults)


def _fleetsim(*args: str, run_dir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.stress  # nightly; the default run replays a generated case below
@pytest.mark.timeout(240)
def test_a_short_campaign_passes_on_the_real_store(pg_url: str, tmp_path: Path) -> None:
    out = _fleetsim("chaos", "fuzz", "--runs", "2", "--duration", "6", "--seed", str(SEED),
                    "--store", pg_url, "--json", run_dir=tmp_path, timeout=230)
    report = json.loads(out.stdout)
    assert out.returncode == 0, (report["failed"], out.stderr[-2000:])
    assert [r["verdict"] for r in report["runs"]] == ["valid", "valid"]


@pytest.mark.timeout(300)
def test_a_broken_store_fails_the_fuzzer_with_a_shrunk_case(pg_url: str, tmp_path: Path) -> None:
    out = _fleetsim("selftest", "--fuzz", "2", "--mutants", "claim-without-lock", "--seed",
                    str(SEED), "--store", pg_url, "--json", run_dir=tmp_path, timeout=290)
    assert out.returncode == 0, out.stderr[-2000:]
    [row] = json.loads(out.stdout)["results"]
    assert row["caught"] is True
    shrunk = row["failed"][0]["shrunk"]
    assert "no faults" in shrunk["trial"]
    assert Path(shrunk["files"]["scenario"]).is_file()
    replay = _fleetsim("chaos", "fuzz", "--replay", shrunk["files"]["case"], "--store", pg_url,
                       "--json", run_dir=tmp_path, timeout=120)
    # The shrunk case passes on the real store: the failure was the mutant's.
    assert replay.returncode == 0, replay.stdout[-2000:]


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_twenty_generated_cases_pass(pg_url: str, tmp_path: Path) -> None:
    out = _fleetsim("chaos", "fuzz", "--runs", "20", "--seed", str(SEED), "--store", pg_url,
                    "--json", run_dir=tmp_path, timeout=3500)
    assert out.returncode == 0, json.loads(out.stdout)["failed"]
