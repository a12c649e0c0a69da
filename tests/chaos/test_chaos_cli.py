"""Chaos from another terminal: the CLI against a detached fleet's coordinator."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
from pathlib import Path

import pytest
import zmq

from fleetsim.store import Store, StoreConfig
from tests.helpers import assert_no_processes, newer_leader, wait_until
from tests.integration.test_cli import fleetsim


@pytest.fixture
def detached(tmp_path: Path, store: Store, store_config: StoreConfig):  # type: ignore[no-untyped-def]
    run_dir = tmp_path / "run"
    env = {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": store_config.schema or ""}
    up = fleetsim(run_dir, "up", "--pods", "3", "--detach", "--restart", env=env)
    assert up.returncode == 0, up.stderr
    data = json.loads((run_dir / "run.json").read_text())
    try:
        yield run_dir, data
    finally:
        pids = [p["pid"] for p in json.loads((run_dir / "run.json").read_text())["pods"]] \
            if (run_dir / "run.json").exists() else []
        fleetsim(run_dir, "down")
        assert_no_processes([data["coordinator_pid"], data["proxy_pid"], *pids])


@pytest.mark.timeout(180)
def test_chaos_commands_from_the_cli(detached, store: Store) -> None:  # type: ignore[no-untyped-def]
    run_dir, _ = detached
    submitted = fleetsim(run_dir, "submit", "--count", "800", "--workload", "sleep:10")
    assert submitted.returncode == 0, submitted.stderr

    lease = wait_until(store.current_leader, 10, what="a leader")
    killed = fleetsim(run_dir, "chaos", "kill-leader", "--json")
    assert killed.returncode == 0, killed.stderr
    reply = json.loads(killed.stdout)
    assert reply["pod"] == lease.holder and reply["term"] == lease.term and reply["pid"] > 0
    wait_until(lambda: newer_leader(store, lease.term), 10, what="a new leader")

    paused = fleetsim(run_dir, "chaos", "pause", "pod-1", "--for", "1s")
    assert paused.returncode == 0 and "pause" in paused.stdout
    part = fleetsim(run_dir, "chaos", "partition", "pod-2", "--from", "store", "--for", "2s",
                    "--json")
    assert part.returncode == 0, part.stderr
    assert json.loads(part.stdout)["from"] == "store"
    brown = fleetsim(run_dir, "chaos", "storage-fault", "--all", "--error-rate", "0.2",
                     "--latency", "20ms", "--for", "2s", "--json")
    assert brown.returncode == 0, brown.stderr
    healed = fleetsim(run_dir, "chaos", "heal")
    assert healed.returncode == 0

    missing = fleetsim(run_dir, "chaos", "kill", "pod-42")
    assert missing.returncode == 2
    assert "no pod named 'pod-42'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    wait_until(lambda: store.status_counts()["completed"] == 800, 90, what="drain")
    checked = fleetsim(run_dir, "check", "--json")
    assert checked.returncode == 0, checked.stdout
    assert json.loads(checked.stdout)["valid"] is True
    faults = (run_dir / "faults.jsonl").read_text().splitlines()
    assert any(json.loads(line).get("action") == "kill-leader" for line in faults)


@pytest.mark.timeout(120)
def test_junk_on_every_bus_endpoint_does_not_break_the_coordinator(detached) -> None:  # type: ignore[no-untyped-def]
    run_dir, data = detached
    rng = random.Random(1234)
    context = zmq.Context()
    try:
        for name, endpoint in data["bus"].items():
            host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
            for _ in range(20):  # raw TCP junk
                with socket.create_connection((host, int(port)), timeout=2) as raw:
                    raw.sendall(rng.randbytes(rng.randint(1, 2048)))
            if name in ("control", "cli"):
                dealer = context.socket(zmq.DEALER)
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.connect(endpoint)
                for _ in range(50):  # well-framed garbage
                    dealer.send_multipart([rng.randbytes(rng.randint(0, 300))
                                           for _ in range(rng.randint(1, 3))])
                dealer.close()
    finally:
        context.term()
    # The coordinator still obeys commands and pods are still there.
    killed = fleetsim(run_dir, "chaos", "kill", "pod-3", "--json")
    assert killed.returncode == 0, killed.stderr
    status = fleetsim(run_dir, "status", "--json")
    assert status.returncode == 0
    assert os.path.exists(run_dir / "run.json")


@pytest.mark.timeout(120)
def test_pods_keep_working_when_the_coordinator_dies(detached, store: Store) -> None:  # type: ignore[no-untyped-def]
    run_dir, data = detached
    os.kill(data["coordinator_pid"], signal.SIGKILL)
    result = fleetsim(run_dir, "submit", "--count", "300")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: store.status_counts()["completed"] == 300, 60,
               what="pods to drain without their coordinator")
    # `down` cleans up after a dead coordinator: pods and the fault proxy.
    down = fleetsim(run_dir, "down")
    assert down.returncode == 0, down.stderr


@pytest.mark.timeout(120)
def test_a_pod_joining_from_elsewhere_takes_work_and_chaos(detached, store: Store,  # type: ignore[no-untyped-def]
                                                          store_config: StoreConfig) -> None:
    import subprocess
    import sys

    run_dir, data = detached
    env = {**os.environ, "FLEETSIM_STORE": store_config.url}
    remote = subprocess.Popen(
        [sys.executable, "-m", "fleetsim", "pod", "--id", "remote-1",
         "--schema", store_config.schema or "fleetsim", "--join", data["bus"]["control"],
         "--metrics-endpoint", data["bus"]["metrics"], "--batch", "5",
         "--bus-secret-file", data["bus_secret_file"]],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: any(p["id"] == "remote-1" and p["state"] == "alive"
                               for p in store.pods()), 30, what="remote-1 registered")
        submitted = fleetsim(run_dir, "submit", "--count", "400", "--workload", "sleep:20")
        assert submitted.returncode == 0, submitted.stderr
        wait_until(lambda: store.status_counts()["completed"] == 400, 60, what="drain")
        workers = {p["id"] for p in store.pods() if p["completed"] > 0}
        assert "remote-1" in workers

        def killed() -> bool:
            result = fleetsim(run_dir, "chaos", "kill", "remote-1", "--json")
            return result.returncode == 0

        wait_until(killed, 20, interval=0.5, what="the coordinator to know remote-1")
        assert remote.wait(timeout=10) == -signal.SIGKILL
    finally:
        if remote.poll() is None:
            remote.kill()
            remote.wait()
