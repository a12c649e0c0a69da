"""The CLI with the security fixes: a signed chaos command works, refusals are one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fleetsim.store import Store, StoreConfig
from tests.helpers import wait_until
from tests.integration.test_cli import fleetsim

REPO = Path(__file__).resolve().parents[2]
HANDLER = "tests.workload_handlers:touch"
OK = "tests.workload_handlers:ok"


@pytest.mark.timeout(180)
def test_detached_fleet_secret_handlers_and_refusals(
    tmp_path: Path, store: Store, store_config: StoreConfig
) -> None:
    run_dir = tmp_path / "run"
    env = {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": store_config.schema or "",
           "PYTHONPATH": str(REPO)}
    up = fleetsim(run_dir, "up", "--pods", "2", "--detach", "--no-fault-proxy",
                  "--handler", HANDLER, "--handler", OK, env=env, timeout=120)
    assert up.returncode == 0, up.stderr
    try:
        data = json.loads((run_dir / "run.json").read_text())
        assert data["handlers"] == [HANDLER, OK]
        secret_file = Path(data["bus_secret_file"])
        assert secret_file == (run_dir / "bus.secret").resolve()
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600

        # submit: a handler the pods were started with is accepted, another refused.
        ok = fleetsim(run_dir, "submit", "--workload", OK, "--max-attempts", "1", "--json",
                      env=env)
        assert ok.returncode == 0, ok.stderr
        step_id = json.loads(ok.stdout)["first_id"]

        def finished() -> str | None:
            step = store.get_step(step_id)
            return step.status if step and step.status in ("completed", "dead") else None

        # The spawned pods were started with both handlers: the step runs.
        assert wait_until(finished, 30, what="the handler step") == "completed"
        refused = fleetsim(run_dir, "submit", "--workload", "subprocess:call", env=env)
        assert refused.returncode == 2
        assert "not allowed" in refused.stderr and "--handler subprocess:call" in refused.stderr
        assert "Traceback" not in refused.stderr

        # Without a run.json for the store, submit cannot tell: it warns.
        unknown = fleetsim(tmp_path / "no-fleet", "submit", "--workload", OK, "--store",
                           store_config.url, "--schema", store_config.schema or "", env=env)
        assert unknown.returncode == 0, unknown.stderr
        assert "warning: pods run" in unknown.stderr

        # The CLI signs with the run directory's secret: chaos works.
        victim = next(p for p in data["pods"] if p["id"] == "pod-1")
        kill = fleetsim(run_dir, "chaos", "kill", "pod-1", "--json", env=env)
        assert kill.returncode == 0, kill.stderr
        wait_until(lambda: not _alive(victim["pid"]), 10, what="pod-1 killed")

        # A wrong secret: one clear line, nothing done.
        secret_file.write_bytes(b"f" * 64 + b"\n")
        wrong = fleetsim(run_dir, "chaos", "kill", "pod-2", env=env)
        assert wrong.returncode == 1 and "refused" in wrong.stderr, wrong.stderr
        assert "Traceback" not in wrong.stderr
        pod2 = next(p for p in data["pods"] if p["id"] == "pod-2")
        assert _alive(pod2["pid"])

        # A remote pod without the secret is told what to give.
        elsewhere = tmp_path / "elsewhere"
        joined = fleetsim(elsewhere, "pod", "--join", data["bus"]["control"], env=env)
        assert joined.returncode == 2
        assert "--bus-secret-file" in joined.stderr and "Traceback" not in joined.stderr
    finally:
        down = fleetsim(run_dir, "down", env=env, timeout=120)
        assert down.returncode == 0, down.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
