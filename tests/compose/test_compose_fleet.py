"""The compose tier (`pytest -m compose`): the fleet of docker-compose.yml on a real engine.

Builds the image, starts `docker compose up --scale pod=3 fleet pod` under its
own project name, and under load kills, pauses and cuts off pod containers with
the engine's own commands. Ends with every step completed exactly once, the
joined pods having done work, and `fleetsim check` valid.

Without a Docker engine it skips with the reason; with CI=true it fails.
Out of the default run (pyproject.toml addopts); .ci/run runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = pytest.mark.compose


def engine_missing() -> str | None:
    """Why the engine cannot be used here, or None."""
    if shutil.which("docker") is None:
        return "no `docker` on PATH"
    for probe in (["docker", "info"], ["docker", "compose", "version"]):
        result = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            return f"`{' '.join(probe)}` failed: {result.stderr.strip()[-200:]}"
    return None


class Compose:
    def __init__(self, project: str) -> None:
        self.base = ["docker", "compose", "-p", project]

    def __call__(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run([*self.base, *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        assert result.returncode == 0, f"{args}: {result.stderr[-2000:]}{result.stdout[-2000:]}"
        return result.stdout

    def fleetsim_json(self, *args: str) -> Any:
        return json.loads(self("exec", "-T", "fleet", "fleetsim", *args, "--json"))


@pytest.fixture
def compose() -> Iterator[Compose]:
    reason = engine_missing()
    if reason:
        if IN_CI:
            pytest.fail(f"the compose tier needs a Docker engine in CI: {reason}")
        pytest.skip(f"no Docker engine: {reason}")
    runner = Compose(f"fleetsim-tier-{uuid.uuid4().hex[:8]}")
    try:
        runner("build", "-q", timeout=600)
        yield runner
    finally:
        subprocess.run([*runner.base, "down", "-v", "--rmi", "local", "--remove-orphans",
                        "-t", "5"], cwd=ROOT,
                       capture_output=True, timeout=120, check=False)


@pytest.mark.timeout(900)
def test_joined_pod_containers_killed_paused_cut_off_every_step_once(
        compose: Compose) -> None:
    compose("up", "-d", "--scale", "pod=3", "fleet", "pod", timeout=300)
    pods = compose("ps", "-q", "pod").split()
    assert len(pods) == 3
    wait_until(lambda: sum(not re.fullmatch(r"pod-\d+", p["id"])
                           for p in compose.fleetsim_json("status")["pods"]) == 3,
               120, interval=1, what="3 joined pods")
    total = 4000
    compose("exec", "-T", "fleet", "fleetsim", "submit", "--count", str(total),
            "--workload", "sleep:20")
    wait_until(lambda: compose.fleetsim_json("status")["steps"]["completed"] >= 400,
               120, interval=1, what="the fleet under load")

    network = f"{compose.base[3]}_default"
    subprocess.run(["docker", "kill", pods[0]], check=True, capture_output=True, timeout=30)
    subprocess.run(["docker", "pause", pods[1]], check=True, capture_output=True, timeout=30)
    subprocess.run(["docker", "network", "disconnect", network, pods[2]], check=True,
                   capture_output=True, timeout=30)
    time.sleep(5)  # the faults' duration, not a synchronisation
    subprocess.run(["docker", "unpause", pods[1]], check=True, capture_output=True, timeout=30)
    subprocess.run(["docker", "network", "connect", network, pods[2]], check=True,
                   capture_output=True, timeout=30)

    def drained() -> bool:
        steps = compose.fleetsim_json("status")["steps"]
        return bool(steps["completed"] + steps["dead"] == total
                    and steps["queued"] + steps["claimed"] + steps["failed"] == 0)

    wait_until(drained, 300, interval=2, what=f"{total} steps drained")
    status = compose.fleetsim_json("status")
    assert status["steps"]["completed"] == total and status["steps"]["dead"] == 0
    joined = [p for p in status["pods"] if not re.fullmatch(r"pod-\d+", p["id"])]
    assert sum(p["completed"] for p in joined) > 0, status["pods"]
    # `check` exits 1 when the history is invalid: Compose then fails the call.
    report = compose.fleetsim_json("check")
    assert report["valid"] is True, report
