"""What `fleetsim status` and `fleetsim up` print where a container's logs go."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleetsim.store import Store, StoreConfig
from tests.helpers import wait_until


def cli_env(store_config: StoreConfig) -> dict[str, str]:
    return {**os.environ, "FLEETSIM_STORE": store_config.url,
            "FLEETSIM_SCHEMA": store_config.schema or ""}


def right_edges(line: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\S+", line)]


@pytest.mark.timeout(60)
def test_status_lays_out_long_pod_ids(store: Store, store_config: StoreConfig,
                                      tmp_path: Path) -> None:
    # A pod joined from a container is pod-<container hostname>-<pid>.
    for pod_id in ("pod-0", "pod-752051f692eb-1"):
        store.register_pod(pod_id, pid=4242)

    result = subprocess.run(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(tmp_path / "run"), "status"],
        capture_output=True, text=True, timeout=50, env=cli_env(store_config), check=False,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("pod "))
    rows = [line for line in lines if line.startswith("pod-")]
    assert len(rows) == 2, result.stdout
    # Right-aligned columns (pid, inc) end where their headings end, in every row.
    pid_end, inc_end = right_edges(header)[1:3]
    for row in rows:
        assert right_edges(row)[1:3] == [pid_end, inc_end], result.stdout


@pytest.mark.timeout(90)
def test_up_prints_no_terminal_codes_when_output_is_not_a_terminal(
        store_config: StoreConfig, tmp_path: Path) -> None:
    # `docker compose up fleet`: stdout is a pipe even with --status-line.
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "fleetsim", "--run-dir", str(tmp_path / "run"), "up",
             "--pods", "1", "--status-line", "--steps", "20"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=cli_env(store_config),
        )
    try:
        wait_until(lambda: "fleet ready" in log.read_text(), 60, what="fleet ready")
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=30)
    text = log.read_bytes()
    assert b"fleet stopped" in text, text
    assert b"\x1b" not in text and b"\r" not in text, text
