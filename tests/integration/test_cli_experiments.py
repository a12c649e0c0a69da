"""`fleetsim run EXPERIMENT` and `fleetsim replay` as a user runs them (issue 14)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

from chaos.scenario import find_scenario, list_scenarios
from fleetsim.errors import FleetsimError
from fleetsim.store import Store, StoreConfig
from tests.integration.test_cli import fleetsim

# Two pod groups of different speeds, a strict-FIFO queue with a limit next to
# a plain one, a two-kind mix at a fixed rate, the leader killed every 4 s.
MIXED = """
name = "mixed-fleet"
description = "slow and fast pods; a limited strict-FIFO queue and a plain one"
duration = "8s"
seed = 3

[[fleet.group]]
name = "slow"
pods = 2
workload = "sleep:30"
queues = ["orders", "bulk"]

[[fleet.group]]
name = "fast"
pods = 2
workload = "sleep:5"
concurrency = 2
queues = ["orders", "bulk"]

[[queue]]
name = "orders"
concurrency_limit = 2
strict_fifo = true

[load]
duration = "6s"
rate = 25

[[load.mix]]
weight = 1
queue = "orders"
workload = "sleep:10"

[[load.mix]]
weight = 2
queue = "bulk"

[[fault]]
action = "kill-leader"
every = "4s"

[thresholds]
valid = true
lost = "== 0"
completed = ">= 100"
failover_max_s = "< 8.0"
"""

SMALL = """
name = "small"

[fleet]
pods = 2
workload = "sleep:2"

[load]
steps = 40

[thresholds]
valid = true
claim_to_completion_p99_s = "< {bound}"
"""


@pytest.fixture
def env(store_config: StoreConfig) -> dict[str, str]:
    # No FLEETSIM_SCHEMA: each run makes its own fresh schema (dropped below).
    return {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": ""}


def drop(url: str, *schemas: str) -> None:
    for schema in schemas:
        with Store(StoreConfig(url, schema=schema)) as s, contextlib.suppress(FleetsimError):
            s.drop_schema()


@pytest.mark.timeout(150)
def test_a_mixed_experiment_passes_with_both_queues_progressing_and_replays_the_same(
        tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "mixed.toml"
    path.write_text(MIXED)
    run_dir = tmp_path / "run"
    result = fleetsim(run_dir, "run", str(path), "--json", env=env, timeout=120)
    data = json.loads(result.stdout) if result.stdout else {}
    replayed: dict[str, Any] = {}
    try:
        assert result.returncode == 0, result.stderr
        assert data["valid"] is True and data["passed"] is True
        assert [(t["name"], t["condition"], t["passed"]) for t in data["thresholds"]] == [
            ("valid", "== true", True), ("lost", "== 0", True),
            ("completed", ">= 100", True), ("failover_max_s", "< 8.0", True)]
        assert all("value" in t for t in data["thresholds"])
        # Both kinds went in, and both queues drained: the limited strict-FIFO
        # queue did not starve the plain one, nor the other way round.
        queues = data["queues"]
        assert queues["orders"]["completed"] == queues["orders"]["submitted"] > 10
        assert queues["bulk"]["completed"] == queues["bulk"]["submitted"] > 10
        assert data["pods"] == 4 and [g["name"] for g in data["groups"]] == ["slow", "fast"]
        assert data["faults_applied"] >= 1
        record = json.loads((Path(data["record"]) / "replay.json").read_text())
        assert record["seed"] == 3 and record["faults"] and record["experiment_text"] == MIXED
        assert "bundle" not in data  # a passing run leaves none

        again = fleetsim(run_dir, "replay", data["schema"], "--json", env=env, timeout=120)
        replayed = json.loads(again.stdout) if again.stdout else {}
        assert again.returncode == 0, again.stderr
        assert replayed["same"] is True and replayed["result"]["seed"] == 3
    finally:
        drop(env["FLEETSIM_STORE"], *(d["schema"] for d in (data, replayed.get("result"))
                                      if d))


@pytest.mark.timeout(60)
def test_a_failed_threshold_exits_1_naming_it_and_leaves_a_failure_bundle(
        tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "small.toml"
    path.write_text(SMALL.format(bound="0.000001"))
    run_dir = tmp_path / "run"
    result = fleetsim(run_dir, "run", str(path), env=env, timeout=50)
    bundle = next((run_dir / "failures").iterdir(), None)
    try:
        assert result.returncode == 1, result.stderr
        assert "VALID" in result.stdout  # the run is valid: the threshold alone fails it
        failed = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(failed) == 1 and failed[0].startswith(
            "error: threshold claim_to_completion_p99_s < 0.000001 failed: ")
        assert bundle is not None and f"failure bundle: {bundle}" in result.stderr
        names = {p.name for p in bundle.iterdir()}
        assert {"README.txt", "replay.json", "history.jsonl", "witnesses.json", "check.txt",
                "coordinator.log", "faults.jsonl", "experiment.toml", "logs"} <= names
        assert "replay" in (bundle / "README.txt").read_text()
        assert (bundle / "history.jsonl").read_text().count("\n") > 40
    finally:
        if bundle is not None:
            drop(env["FLEETSIM_STORE"], bundle.name)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("text", "error"), [
    ('[load]\nsteps = 5\n[thresholds]\ne2e_p99 = "< 2"\n',
     "thresholds.e2e_p99: unknown figure (did you mean 'e2e_p99_s'?)"),
    ('[fleet]\nqueues = ["a"]\n[load]\nsteps = 5\n[[load.mix]]\nqueue = "b"\n',
     "load.mix[0].queue: no pod serves queue 'b' (the pods serve a)"),
])
def test_a_bad_experiment_is_refused_before_anything_starts(
        tmp_path: Path, env: dict[str, str], text: str, error: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n' + text)
    result = fleetsim(tmp_path / "run", "run", str(path), env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: {error}"
    assert not (tmp_path / "run" / "logs").exists()  # no fleet was started


@pytest.mark.timeout(90)
def test_repeat_runs_one_seed_after_another_and_summarises(tmp_path: Path,
                                                           env: dict[str, str]) -> None:
    path = tmp_path / "small.toml"
    path.write_text(SMALL.format(bound="60"))
    result = fleetsim(tmp_path / "run", "run", str(path), "--repeat", "2", "--seed", "5",
                      "--json", env=env, timeout=80)
    data = json.loads(result.stdout) if result.stdout else {"runs": []}
    try:
        assert result.returncode == 0, result.stderr
        assert [r["seed"] for r in data["runs"]] == data["seeds"] == [5, 6]
        assert data["valid_fraction"] == 1.0 and data["passed_fraction"] == 1.0
        assert data["spread"]["claim_to_completion_p99_s"]["runs"] == 2
        # A run of seconds has no resource trends, and says why.
        assert all(r["resources"] is None and "need at least 30 s" in r["resources_skipped"]
                   and r["figures"]["rss_growth_pct_max"] is None for r in data["runs"])
    finally:
        drop(env["FLEETSIM_STORE"], *(r["schema"] for r in data["runs"]))


@pytest.mark.stress
@pytest.mark.timeout(240)
def test_the_documented_example_passes(tmp_path: Path, env: dict[str, str]) -> None:
    """Issue 14's bar: two speeds, a limited strict-FIFO queue, a mix at 40/s for 30 s,
    the leader killed every 5 s, four thresholds; and with e2e_p99_s < 0.000001 it fails."""
    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "two-speed-fleet.toml"
    result = fleetsim(tmp_path / "run", "run", str(example), "--json", env=env, timeout=200)
    data = json.loads(result.stdout) if result.stdout else {}
    try:
        assert result.returncode == 0, result.stderr
        assert [t["passed"] for t in data["thresholds"]] == [True] * 4
        assert all(q["completed"] == q["submitted"] > 0 for q in data["queues"].values())
    finally:
        if data:
            drop(env["FLEETSIM_STORE"], data["schema"])
    broken = tmp_path / "broken.toml"
    broken.write_text(example.read_text() + 'e2e_p99_s = "< 0.000001"\n')
    failed = fleetsim(tmp_path / "run", "run", str(broken), env=env, timeout=200)
    bundle = next((tmp_path / "run" / "failures").iterdir(), None)
    try:
        assert failed.returncode == 1
        assert "error: threshold e2e_p99_s < 0.000001 failed: " in failed.stderr
    finally:
        if bundle is not None:
            drop(env["FLEETSIM_STORE"], bundle.name)


@pytest.mark.stress
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", [s.name for s in list_scenarios()])
def test_every_shipped_scenario_runs_as_an_experiment(name: str, private_tmp: Path,
                                                      env: dict[str, str]) -> None:
    restarts = any(f.action == "store-restart" for f in find_scenario(name).faults)
    if restarts:  # only the embedded store can be restarted (the test store is shared)
        env = {k: v for k, v in env.items() if k != "FLEETSIM_STORE"}
    result = fleetsim(private_tmp / "run", "run", name, "--json", env=env, timeout=170)
    data = json.loads(result.stdout) if result.stdout else {}
    try:
        assert result.returncode == 0, result.stderr
        hints = find_scenario(name).workload
        assert data["pods"] == hints.pods and data["completed"] > 0
        if hints.steps is not None:
            assert data["submitted"] == hints.steps
        assert data["workload"] == hints.workload and data["scenario"] == name
    finally:
        if data and not restarts:
            drop(env["FLEETSIM_STORE"], data["schema"])
