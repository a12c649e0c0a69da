"""The compose tier (`pytest -m compose`): the fleet of docker-compose.yml on a real engine.

Builds the image and starts `docker compose up --scale pod=3 fleet pod` under
a project name of its own, with docker-compose.engine.yml, so the fleet's
coordinator reaches the engine. Then, under load, one case each:

1. `fleetsim chaos kill|pause|partition` on the joined pod containers: the
   coordinator acts on the containers through the engine's API;
2. the `fleet` container (coordinator and its five pods) killed and started
   again while the joined pods go on;
3. the `postgres` container killed and started again.

Each case ends with every step completed exactly once (the counts, and
`fleetsim check`, which refutes duplicates and losses) and `check` valid;
the first also asks that the joined pods did work.

Without a Docker engine it skips with the reason; with CI=true it fails.
Out of the default run (pyproject.toml addopts); .ci/run runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SOCKET = Path("/var/run/docker.sock")
SPAWNED = re.compile(r"pod-\d+")

pytestmark = [pytest.mark.compose, pytest.mark.timeout(600)]


def engine_missing() -> str | None:
    """Why the engine cannot be used here, or None."""
    if shutil.which("docker") is None:
        return "no `docker` on PATH"
    for probe in (["docker", "info"], ["docker", "compose", "version"]):
        result = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            return f"`{' '.join(probe)}` failed: {result.stderr.strip()[-200:]}"
    if not SOCKET.exists():
        return f"no engine socket at {SOCKET} (docker-compose.engine.yml mounts it)"
    return None


class Compose:
    """`docker compose` for one project, with the engine override."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.base = ["docker", "compose", "-p", project, "-f", "docker-compose.yml",
                     "-f", "docker-compose.engine.yml"]
        self.env = {**os.environ, "DOCKER_GID": str(SOCKET.stat().st_gid)}

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        result = subprocess.run([*self.base, *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL, check=False,
                                env=self.env)
        if check:
            assert result.returncode == 0, \
                f"{args}: {result.stderr[-2000:]}{result.stdout[-2000:]}"
        return result.stdout

    def fleetsim_json(self, *args: str) -> Any:
        """`fleetsim ARGS --json` in the fleet container, parsed."""
        return json.loads(self("exec", "-T", "fleet", "fleetsim", *args, "--json"))

    def status(self) -> dict[str, Any]:
        """`fleetsim status` from the host, through the published store port:
        it answers while the fleet container is down."""
        port = self("port", "postgres", "5432").strip().rsplit(":", 1)[1]
        out = subprocess.run(
            [sys.executable, "-m", "fleetsim", "status", "--json", "--store",
             f"postgresql://postgres:fleetsim@127.0.0.1:{port}/test"],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "FLEETSIM_RUN_DIR": str(ROOT / ".fleetsim-compose-tier")})
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def container(self, service: str) -> str:
        (name,) = self("ps", "-a", "-q", service).split()
        return name


def docker(*args: str) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, f"docker {args}: {result.stderr}"
    return result.stdout.strip()


@pytest.fixture(scope="module")
def compose() -> Iterator[Compose]:
    reason = engine_missing()
    if reason:
        if IN_CI:
            pytest.fail(f"the compose tier needs a Docker engine in CI: {reason}")
        pytest.skip(f"no Docker engine: {reason}")
    runner = Compose(f"fleetsim-tier-{uuid.uuid4().hex[:8]}")
    try:
        runner("build", "-q", timeout=600)
        runner("up", "-d", "--scale", "pod=3", "fleet", "pod", timeout=300)
        wait_until(lambda: len(joined(runner.fleetsim_json("status"))) == 3, 120,
                   interval=1, what="3 joined pods")
        yield runner
    finally:
        subprocess.run([*runner.base, "down", "-v", "--rmi", "local", "--remove-orphans",
                        "-t", "5"], cwd=ROOT, env=runner.env,
                       capture_output=True, timeout=120, check=False)


def joined(status: dict[str, Any], alive: bool = True) -> list[dict[str, Any]]:
    """The pods that joined from their own containers (not the fleet's pod-N)."""
    return [p for p in status["pods"] if not SPAWNED.fullmatch(p["id"])
            and (p["state"] == "alive" or not alive)]


def submitted_and_drained(compose: Compose, count: int, then: Any) -> None:
    """Submit ``count`` steps, let ``then()`` inject its faults once a tenth
    is done, and wait until every step ever submitted is finished."""
    before = compose.status()["steps"]
    total = sum(before[k] for k in ("queued", "claimed", "failed", "completed", "dead")) + count
    compose("exec", "-T", "fleet", "fleetsim", "submit", "--count", str(count),
            "--workload", "sleep:20")
    wait_until(lambda: compose.status()["steps"]["completed"]
               >= before["completed"] + count // 10, 120, interval=1,
               what="the fleet under load")
    then()

    def drained() -> bool:
        steps = compose.status()["steps"]
        return bool(steps["completed"] + steps["dead"] == total
                    and steps["queued"] + steps["claimed"] + steps["failed"] == 0)

    wait_until(drained, 300, interval=2, what=f"{total} steps drained")
    steps = compose.status()["steps"]
    assert steps["completed"] == total and steps["dead"] == 0, steps
    # `check` exits 1 when the history is invalid (a step lost, completed
    # twice, a stale leader's decision): Compose then fails the call.
    report = compose.fleetsim_json("check")
    assert report["valid"] is True, report


def test_fleetsim_chaos_kills_pauses_and_cuts_off_pod_containers(compose: Compose) -> None:
    victims = [p["id"] for p in joined(compose.fleetsim_json("status"))]
    assert len(victims) == 3
    done_before = {p["id"]: p["completed"] for p in compose.status()["pods"]}

    def faults() -> None:
        killed = compose.fleetsim_json("chaos", "kill", victims[0])
        paused = compose.fleetsim_json("chaos", "pause", victims[1], "--for", "5s")
        cut = compose.fleetsim_json("chaos", "partition", victims[2], "--for", "5s")
        for result in (killed, paused, cut):
            assert result["via"] == "engine", result
        # The engine did it for real, not a proxy or a signal of ours.
        assert docker("inspect", "-f", "{{.State.Status}}", paused["container"]) == "paused"
        assert docker("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                      cut["container"]) == "{}"
        assert docker("inspect", "-f", "{{.State.Status}}", killed["container"]) == "exited"
        # The engine saw it stop: a certain death, recorded in the store at
        # once (its backends terminated, its lease freed), not left to the
        # dead threshold.
        assert killed["exit_recorded"] is True, killed
        # Healed when the duration ends: thawed, and back on its network.
        wait_until(lambda: docker("inspect", "-f", "{{.State.Status}}",
                                  paused["container"]) == "running", 30, interval=0.5,
                   what="the paused container thawed")
        wait_until(lambda: docker("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                  cut["container"]) != "{}", 30, interval=0.5,
                   what="the cut-off container reconnected")

    submitted_and_drained(compose, 6000, faults)
    status = compose.status()
    after = {p["id"]: p["completed"] for p in status["pods"]}
    assert any(after[p] > done_before.get(p, 0) for p in victims[1:]), status["pods"]

    # The cut-off pod comes back on its new address: its store connections
    # from the old one fail within tcp_user_timeout, it reconnects, and it
    # heartbeats again (as a new incarnation if it was declared dead).
    def back(pod: str) -> bool:
        mine = [p for p in compose.status()["pods"] if p["id"] == pod]
        return bool(mine and mine[0]["state"] == "alive" and mine[0]["heartbeat_age_s"] < 3)

    wait_until(lambda: back(victims[2]), 90, interval=1, what=f"{victims[2]} back")
    # Every fault is in the fleet's history, with its end.
    log = compose("exec", "-T", "fleet", "cat", "/var/lib/fleetsim/faults.jsonl")
    actions = [json.loads(line) for line in log.splitlines() if line.strip()]
    names = [a["action"] for a in actions]
    for expected in ("kill", "pause", "partition", "end-pause", "end-partition-network"):
        assert expected in names, names


def test_the_coordinator_container_killed_and_started_again(compose: Compose) -> None:
    fleet = compose.container("fleet")

    def crash_coordinator() -> None:
        docker("kill", fleet)
        # The joined pods go on without it, and recover its pods' steps.
        done = compose.status()["steps"]["completed"]
        wait_until(lambda: compose.status()["steps"]["completed"] > done + 100, 120,
                   interval=1, what="joined pods working without the coordinator")
        compose("start", "fleet", timeout=120)
        wait_until(lambda: _answers(compose), 120, interval=1,
                   what="the fleet container's coordinator back")

    submitted_and_drained(compose, 2000, crash_coordinator)


def test_the_store_container_killed_and_started_again(compose: Compose) -> None:
    postgres = compose.container("postgres")

    def crash_store() -> None:
        docker("kill", postgres)
        compose("start", "postgres", timeout=120)
        wait_until(lambda: _answers(compose), 120, interval=1, what="the store back")

    submitted_and_drained(compose, 2000, crash_store)


def _answers(compose: Compose) -> bool:
    result = subprocess.run([*compose.base, "exec", "-T", "fleet", "fleetsim", "status",
                             "--json"], cwd=ROOT, env=compose.env, capture_output=True,
                            timeout=60, check=False, stdin=subprocess.DEVNULL)
    return result.returncode == 0
