"""Bad input that must end in one clear line, never a traceback (issue 10, item 10).

These need no database: every check runs before the store is opened (a
store URL that nothing listens on proves it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner

from chaos.injector import FaultInjector
from chaos.scenario import load_scenario, parse_scenario
from fleetsim.cli import cli
from fleetsim.errors import ConfigError
from fleetsim.store import StepSpec, Store, StoreConfig

pytestmark = pytest.mark.timeout(30)

# Nothing listens on port 1: a command that reaches the store fails with exit 3.
NO_STORE = "postgresql://postgres@127.0.0.1:1/nothing"
HEADER = 'name = "deep"\nduration = "30s"\n'
# The documented maximum length of an idempotency key (docs/reference/cli.md).
MAX_IDEMPOTENCY_KEY_BYTES = 512


def invoke(*args: str, run_dir: Path | None = None) -> Any:
    """Run the CLI in-process; the result has exit_code, stdout, stderr."""
    runner = CliRunner()
    prefix = ["--run-dir", str(run_dir)] if run_dir else []
    return runner.invoke(cli, [*prefix, *args], env={"FLEETSIM_STORE": ""},
                         catch_exceptions=True)


def assert_one_line_error(result: Any, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    # click.testing keeps exceptions it caught: a traceback would have been one.
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith("error: ") or error.startswith("Error: "), error
    for fragment in fragments:
        assert fragment in error, error
    return error


# -- scenarios nested too deeply -------------------------------------------------


@pytest.mark.parametrize("nested", [
    "[" * 5000 + "]" * 5000,            # arrays
    "{a = " * 5000 + "1" + "}" * 5000,  # inline tables
])
def test_a_scenario_nested_5000_deep_is_a_one_line_error(tmp_path: Path, nested: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(HEADER + f"workload = {nested}\n")
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ") and "nested too deeply" in message, message


def test_a_scenario_nested_past_the_limit_but_parseable_is_refused() -> None:
    # 100 levels parse fine in tomllib, but nothing in a scenario needs them.
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_scenario(HEADER + "workload = " + "[" * 100 + "]" * 100 + "\n")


def test_chaos_run_of_a_deeply_nested_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(HEADER + "[[fault]]\naction = " + "[" * 5000 + "]" * 5000 + "\n")
    result = invoke("chaos", "run", str(path), run_dir=tmp_path / "run")
    assert_one_line_error(result, 2, "nested too deeply")


# -- idempotency keys ------------------------------------------------------------


def unreachable_store() -> Store:
    return Store(StoreConfig(NO_STORE, schema="nothing", connect_timeout_s=1))


@pytest.mark.parametrize("key", [
    "k" * (MAX_IDEMPOTENCY_KEY_BYTES + 1),
    "é" * (MAX_IDEMPOTENCY_KEY_BYTES // 2 + 1),  # 2 bytes each in UTF-8
    "x" * 3000,
])
def test_an_idempotency_key_over_the_limit_is_refused_before_the_database(key: str) -> None:
    store = unreachable_store()
    try:
        with pytest.raises(ConfigError) as info:
            store.submit("default", {}, idempotency_key=key)
    finally:
        store.close()
    message = str(info.value)
    assert f"at most {MAX_IDEMPOTENCY_KEY_BYTES} bytes" in message and "\n" not in message


def test_an_idempotency_key_with_a_nul_character_is_refused_before_the_database() -> None:
    store = unreachable_store()
    try:
        with pytest.raises(ConfigError, match="NUL"):
            store.submit_many([StepSpec("default", {}, 0, 3, "a\x00b")])
    finally:
        store.close()


def test_the_store_enforces_the_documented_key_limit() -> None:
    from fleetsim.store import store

    assert store.MAX_IDEMPOTENCY_KEY_BYTES == MAX_IDEMPOTENCY_KEY_BYTES


# -- chaos durations of zero -----------------------------------------------------


@pytest.mark.parametrize("args", [
    ["pause", "pod-1", "--for", "0s"],
    ["pause", "pod-1", "--for", "0"],
    ["partition", "pod-1", "--for", "0ms"],
    ["storage-fault", "--all", "--error-rate", "0.5", "--for", "0s"],
])
def test_chaos_for_zero_is_refused_before_contacting_the_fleet(tmp_path: Path,
                                                               args: list[str]) -> None:
    result = invoke("chaos", *args, run_dir=tmp_path / "run")
    assert_one_line_error(result, 2, "--for", "longer than zero")


@pytest.mark.parametrize("command", ["pause", "partition", "storage-fault"])
def test_chaos_help_says_leaving_out_for_lasts_until_healed(command: str) -> None:
    result = CliRunner().invoke(cli, ["chaos", command, "--help"])
    assert result.exit_code == 0
    flat = " ".join(result.output.split())
    assert "until `chaos" in flat and "must be longer than zero" in flat, flat


class _OneProcessFleet:
    """The injector's view of a fleet with one real process as pod-1."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.commands: list[Any] = []
        self.proxy_faults: list[tuple[str, str | None]] = []

    def pod_pids(self) -> dict[str, int]:
        return {"pod-1": self.pid}

    def remote_pods(self) -> list[str]:
        return []

    def leader(self) -> tuple[str, int] | None:
        return None

    def send_command(self, pod_id: str, command: Any) -> Any:
        self.commands.append(command)
        raise AssertionError("no command may be sent for a refused fault")

    def set_proxy_fault(self, pod_id: str, mode: str | None) -> None:
        self.proxy_faults.append((pod_id, mode))

    def restart_store(self) -> dict[str, Any]:
        raise AssertionError("not used")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield child
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()


@pytest.mark.parametrize(("action", "params"), [
    ("pause", {"for": 0}),
    ("pause", {"for": "0s"}),
    ("partition", {"from": "store", "for": 0.0}),
    ("storage-fault", {"error_rate": 1.0, "for": 0}),
])
def test_the_injector_refuses_a_zero_duration_instead_of_faulting_for_ever(
    sleeper: subprocess.Popen[bytes], action: str, params: dict[str, Any]
) -> None:
    fleet = _OneProcessFleet(sleeper.pid)
    injector = FaultInjector(fleet)
    with pytest.raises(ConfigError, match="longer than zero"):
        injector.apply(action, "pod-1", params)
    assert psutil.Process(sleeper.pid).status() != psutil.STATUS_STOPPED
    assert fleet.proxy_faults == [] and fleet.commands == []
    assert injector.heal(None, {})["healed"] == []


# -- keys generate ---------------------------------------------------------------


def test_keys_generate_twice_names_the_real_option(tmp_path: Path) -> None:
    pytest.importorskip("zmq.auth")
    first = invoke("keys", "generate", "--dir", str(tmp_path / "keys"))
    assert first.exit_code == 0, first.output
    again = invoke("keys", "generate", "--dir", str(tmp_path / "keys"))
    error = assert_one_line_error(again, 2, "--force")
    assert "--overwrite" not in error
    forced = invoke("keys", "generate", "--dir", str(tmp_path / "keys"), "--force")
    assert forced.exit_code == 0, forced.output


# -- history export into a missing folder ----------------------------------------


def test_history_export_into_a_missing_folder_fails_before_the_store(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "history.jsonl"
    result = invoke("history", "export", "--store", NO_STORE, "-o", str(target))
    assert_one_line_error(result, 2, str(target.parent), "does not exist")
    assert not (tmp_path / "no").exists()
