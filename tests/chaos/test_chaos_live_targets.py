"""Chaos targets are live pods only: a killed pod is never picked again (issue 12, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetsim.store import Store, StoreConfig
from tests.helpers import assert_no_processes
from tests.integration.test_cli import fleetsim


@pytest.fixture
def five_pods(tmp_path: Path, store: Store, store_config: StoreConfig):  # type: ignore[no-untyped-def]
    run_dir = tmp_path / "run"
    env = {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": store_config.schema or ""}
    # A long dead-after: the store goes on calling killed pods alive for the
    # whole test, so only the processes say which pods are live.
    up = fleetsim(run_dir, "up", "--pods", "5", "--detach", "--no-restart",
                  "--dead-after", "60s", env=env)
    assert up.returncode == 0, up.stderr
    data = json.loads((run_dir / "run.json").read_text())
    try:
        yield run_dir, data
    finally:
        fleetsim(run_dir, "down")
        assert_no_processes([data["coordinator_pid"], data["proxy_pid"],
                             *(p["pid"] for p in data["pods"])])


@pytest.mark.timeout(120)
def test_random_kills_in_quick_succession_pick_live_pods(five_pods) -> None:  # type: ignore[no-untyped-def]
    run_dir, _ = five_pods
    killed = []
    # The seeded picker (seed 0) would draw the same index twice among five.
    for _ in range(4):
        done = fleetsim(run_dir, "chaos", "kill", "--random", "--json")
        assert done.returncode == 0, done.stderr
        killed.append(json.loads(done.stdout)["pod"])
    assert len(set(killed)) == 4, killed

    # Naming a dead pod says so in plain words.
    again = fleetsim(run_dir, "chaos", "kill", killed[0])
    assert again.returncode == 2
    assert f"{killed[0]} is not running" in again.stderr, again.stderr
    assert "connected" not in again.stderr

    # status agrees with chaos: one live pod, the one not killed.
    status = fleetsim(run_dir, "status", "--json")
    assert status.returncode == 0, status.stderr
    live = sorted(p["id"] for p in json.loads(status.stdout)["pods"] if p["live"])
    assert live == sorted({f"pod-{i}" for i in range(1, 6)} - set(killed))
    text = fleetsim(run_dir, "status")
    for pod in killed:
        line = next(row for row in text.stdout.splitlines() if row.startswith(pod + " "))
        # "exited" until the store declares it dead; a certain death (the
        # coordinator reaped it) is declared at once.
        assert "exited" in line or " dead " in line, text.stdout

    last = fleetsim(run_dir, "chaos", "kill", "--random", "--json")
    assert last.returncode == 0, last.stderr
    none_left = fleetsim(run_dir, "chaos", "kill", "--random")
    assert none_left.returncode == 2
    assert "no live pods" in none_left.stderr, none_left.stderr
