"""`up` and `down` signal only what fleetsim started, and `down` leaves nothing behind.

Real processes, a real store, real signals: the coordinator is SIGKILLed at
several points of its start-up and `down` must still find every child; a
run.json naming some other process must never get that process signalled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fleetsim.store import Store, StoreConfig
from tests.helpers import wait_until
from tests.integration.test_cli import fleetsim

# A process that records any SIGTERM it gets instead of dying from it.
_PROBE = """
import signal, sys, time
path = sys.argv[1]
def got(signum, frame):
    open(path, "a").write(f"{signum}\\n")
signal.signal(signal.SIGTERM, got)
signal.signal(signal.SIGINT, got)
open(path + ".ready", "w").close()
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def probe(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """An unrelated, harmless live process and the file where it logs signals."""
    signals = tmp_path / "probe-signals"
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, str(signals)])
    wait_until(lambda: Path(f"{signals}.ready").exists(), 10, what="probe started")
    try:
        yield proc, signals
    finally:
        proc.kill()
        proc.wait()


def signals_received(signals: Path) -> list[str]:
    return signals.read_text().split() if signals.exists() else []


def processes_matching(*parts: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains every one of ``parts``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if all(part in cmdline for part in parts):
            found.append(proc.info["pid"])
    return found


def pod_processes(schema: str) -> list[int]:
    """Live `fleetsim pod` processes of ``schema``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            args = proc.info["cmdline"] or []
        except psutil.Error:
            continue
        if args[1:4] == ["-m", "fleetsim", "pod"] and schema in args:
            found.append(proc.info["pid"])
    return found


def _describe(pids: list[int]) -> list[str]:
    described = []
    for pid in pids:
        try:
            described.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:200]}")
        except psutil.Error:
            described.append(f"{pid}: (gone)")
    return described


def wait_nothing_left(run_dir: Path, schema: str, timeout: float = 20) -> None:
    """No coordinator, pod, proxy or embedded server of this fleet survives (polled)."""
    def left() -> list[int]:
        return processes_matching(str(run_dir)) + pod_processes(schema)

    deadline = time.monotonic() + timeout
    while (remaining := left()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not remaining, f"processes left behind: {_describe(remaining)}"


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- item 5: down never signals a process it did not start ----------------------


@pytest.mark.timeout(60)
def test_down_does_not_signal_an_unrelated_coordinator_pid(
        tmp_path: Path, probe: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, signals = probe
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({
        "version": 1, "state": "ready", "coordinator_pid": proc.pid, "pods": [],
        "proxy_pid": None, "store_url": None, "schema": "fleetsim", "embedded": False,
    }))
    down = fleetsim(run_dir, "down", "--timeout", "3s")
    time.sleep(0.5)  # give a (wrongly) sent signal time to arrive before we look
    assert signals_received(signals) == [], "down signalled an unrelated process"
    assert proc.poll() is None
    assert down.returncode == 0, down.stderr
    assert "stale" in down.stdout and "nothing was signalled" in down.stdout, down.stdout
    assert not (run_dir / "run.json").exists()


@pytest.mark.timeout(120)
def test_up_treats_a_foreign_coordinator_pid_as_stale(
        tmp_path: Path, store_config: StoreConfig,
        probe: tuple[subprocess.Popen[bytes], Path]) -> None:
    """`up` must not advise `fleetsim down` for a pid that is not its coordinator."""
    proc, signals = probe
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"version": 1, "coordinator_pid": proc.pid,
                                                  "state": "ready", "pods": []}))
    env = {"FLEETSIM_STORE": store_config.url}
    up = fleetsim(run_dir, "up", "--detach", "--pods", "1", "--no-fault-proxy",
                  "--schema", store_config.schema or "", env=env, timeout=100)
    assert up.returncode == 0, up.stderr
    down = fleetsim(run_dir, "down")
    assert down.returncode == 0, down.stderr
    wait_nothing_left(run_dir, store_config.schema or "")
    assert signals_received(signals) == []
    assert proc.poll() is None


# -- item 10 (part): a malformed run.json is a one-line error -----------------------


MALFORMED_RUN_JSON = [
    "[]", "null", '"text"',
    '{"coordinator_pid": -1}',
    '{"coordinator_pid": "12"}',
    '{"coordinator_pid": true}',
    '{"coordinator_pid": DEAD, "pods": "pod-1"}',
    '{"coordinator_pid": DEAD, "pods": [{"id": 3, "pid": "x"}]}',
    '{"coordinator_pid": DEAD, "store_url": 5}',
    '{"coordinator_pid": DEAD, "bus": []}',
    '{"coordinator_pid": DEAD, "proxy_pid": -4}',
]


def _write_malformed(tmp_path: Path, content: str) -> Path:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs (never pid 1: nothing here may signal it)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(content.replace("DEAD", str(gone.pid)))
    return run_dir


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content", MALFORMED_RUN_JSON)
def test_malformed_run_json_is_a_one_line_error(tmp_path: Path, content: str) -> None:
    run_dir = _write_malformed(tmp_path, content)
    for args in (["status"], ["chaos", "kill", "pod-1"], ["submit", "--count", "1"]):
        line = one_line_error(fleetsim(run_dir, *args))
        assert "run.json" in line, line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content", MALFORMED_RUN_JSON)
def test_down_with_a_malformed_run_json_signals_nothing(tmp_path: Path, content: str) -> None:
    run_dir = _write_malformed(tmp_path, content)
    line = one_line_error(fleetsim(run_dir, "down"))
    assert "run.json" in line and "nothing was signalled" in line, line


# -- item 6: down finds every child, whenever the coordinator died ------------------


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _coordinator_pods(coordinator: psutil.Process) -> int:
    try:
        return sum(1 for c in coordinator.children(recursive=True) if "pod" in c.cmdline())
    except psutil.Error:
        return 0


@pytest.mark.timeout(240)
@pytest.mark.parametrize("point", ["server", "pods", "ready"])
def test_down_after_the_coordinator_died_during_start_up(tmp_path: Path, point: str) -> None:
    """SIGKILL the coordinator after the embedded server started, after some pods
    were spawned, or once ready: `down` stops the server, the proxy and every pod."""
    run_dir = tmp_path / "run"
    schema = f"t_{uuid.uuid4().hex[:12]}"
    env = {**os.environ}
    for key in [k for k in env if k.startswith("FLEETSIM_")]:
        env.pop(key)
    argv = [sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), "up", "--detach",
            "--pods", "4", "--schema", schema]
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)
    try:
        def coordinator() -> psutil.Process | None:
            for child in psutil.Process(up.pid).children():
                if "up" in child.cmdline():
                    return child
            return None

        coord = wait_until(coordinator, 30, interval=0.01, what="coordinator spawned")
        if point == "server":
            from fleetsim.store.embedded import EmbeddedPostgres

            server = EmbeddedPostgres(run_dir / "pgdata")
            wait_until(lambda: "ready" in _read(run_dir / "pgdata" / "postmaster.pid")
                       and server.is_running(), 90, interval=0.01,
                       what="embedded server started")
        elif point == "pods":
            wait_until(lambda: _coordinator_pods(coord) >= 2, 120, interval=0.01,
                       what="two pods spawned")
        else:
            def ready() -> bool:
                try:
                    return bool(json.loads((run_dir / "run.json").read_text())["state"]
                                == "ready")
                except (OSError, ValueError, KeyError):
                    return False

            wait_until(ready, 120, interval=0.05, what="fleet ready")
        coord.kill()
        up.communicate(timeout=150)
    finally:
        if up.poll() is None:
            up.kill()
            up.communicate()
    children = _read(run_dir / "children.json")
    down = fleetsim(run_dir, "-v", "down", timeout=120)
    print(children, down.stdout, down.stderr)
    assert down.returncode == 0, down.stderr
    assert "Traceback" not in down.stderr
    # The proxy is not a pod.
    assert "fault-proxy" not in down.stdout.split("pods:")[-1].split(")")[0], down.stdout
    wait_nothing_left(run_dir, schema)
    assert not (run_dir / "run.json").exists()


# -- item 3 (part): up refuses where a live fleet runs ----------------------------


@pytest.mark.timeout(180)
def test_up_after_a_killed_coordinator_refuses_instead_of_duplicating_pods(
        tmp_path: Path, store_config: StoreConfig) -> None:
    run_dir = tmp_path / "run"
    schema = store_config.schema or ""
    env = {"FLEETSIM_STORE": store_config.url}
    up = fleetsim(run_dir, "up", "--detach", "--pods", "2", "--no-fault-proxy",
                  "--schema", schema, env=env, timeout=100)
    assert up.returncode == 0, up.stderr
    data = json.loads((run_dir / "run.json").read_text())
    os.kill(data["coordinator_pid"], signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(data["coordinator_pid"])
               or psutil.Process(data["coordinator_pid"]).status() == psutil.STATUS_ZOMBIE,
               10, what="coordinator gone")
    pods_before = sorted(pod_processes(schema))
    assert len(pods_before) == 2

    again = fleetsim(run_dir, "up", "--detach", "--pods", "2", "--no-fault-proxy",
                     "--schema", schema, env=env, timeout=100)
    line = one_line_error(again)
    assert "fleetsim down" in line, line
    assert sorted(pod_processes(schema)) == pods_before

    down = fleetsim(run_dir, "down", timeout=90)
    assert down.returncode == 0, down.stderr
    wait_nothing_left(run_dir, schema)


@pytest.mark.timeout(180)
def test_up_refuses_a_schema_a_live_fleet_uses(tmp_path: Path, store: Store,
                                                store_config: StoreConfig) -> None:
    schema = store_config.schema or ""
    env = {"FLEETSIM_STORE": store_config.url}
    first, second = tmp_path / "first", tmp_path / "second"
    up = fleetsim(first, "up", "--detach", "--pods", "2", "--no-fault-proxy",
                  "--schema", schema, env=env, timeout=100)
    assert up.returncode == 0, up.stderr
    try:
        again = fleetsim(second, "up", "--detach", "--pods", "2", "--no-fault-proxy",
                         "--schema", schema, env=env, timeout=100)
        line = one_line_error(again)
        assert "--schema" in line and "fleetsim down" in line, line
        assert len(pod_processes(schema)) == 2
        assert {p["id"] for p in store.pods()} == {"pod-1", "pod-2"}
    finally:
        for run_dir in (first, second):
            fleetsim(run_dir, "down", timeout=90)
    wait_nothing_left(first, schema)
    wait_nothing_left(second, schema)


@pytest.mark.timeout(120)
def test_up_starts_beside_pods_that_joined_the_schema(tmp_path: Path, store: Store,
                                                      store_config: StoreConfig) -> None:
    """A coordinator that restarts (the compose `fleet` container killed and
    started again) finds the pods that joined from elsewhere still working in
    its schema: they are not another fleet, so `up` starts."""
    schema = store_config.schema or ""
    env = {**os.environ, "FLEETSIM_STORE": store_config.url}
    joined = subprocess.Popen(
        [sys.executable, "-m", "fleetsim", "pod", "--schema", schema, "--id", "pod-elsewhere-7"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir = tmp_path / "fleet"
    try:
        wait_until(lambda: any(p["id"] == "pod-elsewhere-7" and p["state"] == "alive"
                               for p in store.pods()), 30, what="the joined pod registered")
        up = fleetsim(run_dir, "up", "--detach", "--pods", "2", "--no-fault-proxy",
                      "--schema", schema, env={"FLEETSIM_STORE": store_config.url},
                      timeout=100)
        assert up.returncode == 0, up.stderr
        assert {"pod-1", "pod-2", "pod-elsewhere-7"} <= {p["id"] for p in store.pods()}
    finally:
        fleetsim(run_dir, "down", timeout=90)
        joined.terminate()
        joined.wait(timeout=30)
    wait_nothing_left(run_dir, schema)
