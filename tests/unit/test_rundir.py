"""Process identity and the run directory's records, with real processes (no store)."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetsim.errors import ConfigError
from fleetsim.rundir import ProcessRecord, RunDir

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(SLEEP)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(20)
def test_a_record_matches_only_the_process_it_was_taken_of(
        sleeper: subprocess.Popen[bytes]) -> None:
    record = ProcessRecord.of("pod", "pod-1", sleeper.pid, SLEEP)
    assert record.is_running() and not record.is_gone()
    # The same pid with another start (a reused pid), or another command line.
    assert record.start_ticks is not None
    reused = dataclasses.replace(record, start_ticks=record.start_ticks - 1)
    assert not reused.is_running() and reused.is_gone()
    other = dataclasses.replace(record, cmdline=(sys.executable, "-c", "other"))
    assert not other.is_running() and not other.is_gone()
    assert not reused.signal(signal.SIGTERM) and not other.signal(signal.SIGTERM)
    assert sleeper.poll() is None
    # Without an identity nothing is ever signalled.
    assert not ProcessRecord("pod", "pod-1", sleeper.pid).signal(signal.SIGTERM)
    assert sleeper.poll() is None
    assert record.signal(signal.SIGTERM)
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    assert record.is_gone() and not record.is_running()


@pytest.mark.timeout(10)
def test_pid_1_never_matches() -> None:
    record = ProcessRecord.of("coordinator", "coordinator", 1)
    assert not record.is_running()
    assert not record.signal(0)  # signal 0: nothing would be sent even if this were wrong


@pytest.mark.timeout(20)
def test_children_file_keeps_live_records_and_drops_gone_ones(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    run_dir = RunDir(tmp_path / "run").ensure()
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = ProcessRecord.of("pod", "pod-1", sleeper.pid, SLEEP)
    dead = ProcessRecord("pod", "pod-2", gone.pid, 1.0, ("true",), start_ticks=1)
    store = ProcessRecord.store(tmp_path / "run" / "pgdata")
    for record in (store, dead, live):
        run_dir.record_child(record)
    assert oct(run_dir.children_file.stat().st_mode & 0o777) == "0o600"
    assert run_dir.children() == [store, live]  # the gone pod is dropped at the next write
    assert run_dir.live_children() == [live]  # the store is not running
    run_dir.forget_children([store])
    assert run_dir.children() == [live]
    sleeper.kill()
    sleeper.wait()
    run_dir.forget_children([])
    assert not run_dir.children_file.exists()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("content", ['{"kind": "pod"}', "[1]", "{}", "nope"])
def test_a_malformed_children_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    run_dir = RunDir(tmp_path).ensure()
    run_dir.children_file.write_text(content)
    with pytest.raises(ConfigError, match=r"children\.json"):
        run_dir.children()


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("data", "problem"), [
    ([], "expected an object, got a list"),
    (None, "expected an object, got null"),
    ({"coordinator_pid": -1}, "coordinator_pid must be a positive integer"),
    ({"coordinator_pid": True}, "coordinator_pid must be a positive integer"),
    ({"coordinator_pid": 5, "embedded": "yes"}, "embedded must be bool"),
    ({"coordinator_pid": 5, "pods": [{"id": "pod-1", "pid": 0}]}, "each pod"),
    ({"coordinator_pid": 5, "coordinator": {"kind": "pod", "name": "x", "pid": "1"}},
     "coordinator: pid must be a positive integer"),
])
def test_run_json_is_checked_when_read(tmp_path: Path, data: object, problem: str) -> None:
    run_dir = RunDir(tmp_path).ensure()
    run_dir.run_file.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=problem):
        run_dir.read()
