"""`fleetsim up` in a terminal: events above the status line, next steps (issue 12, items 3, 6).

`up` runs under a real pseudo-terminal; a small screen model applies what
it wrote (carriage returns, erase-line, newlines) and the test reads the
screen's lines, as a person would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fleetsim.store import Store, StoreConfig
from tests.helpers import assert_no_processes, wait_until
from tests.integration.test_cli import fleetsim

FAST = ["--heartbeat", "0.25s", "--lease", "1.5s", "--renew", "0.5s", "--dead-after", "1.5s",
        "--recovery", "0.25s", "--grace", "1s"]


def screen_lines(output: str) -> list[str]:
    """The lines a terminal shows after ``output``: \\r, ESC[K and \\n applied."""
    lines = [""]
    column = 0
    i = 0
    while i < len(output):
        char = output[i]
        if output.startswith("\x1b[K", i):
            lines[-1] = lines[-1][:column]
            i += 3
            continue
        if char == "\x1b":  # another escape sequence (colours): skip it
            match = re.match(r"\x1b\[[0-9;]*[A-Za-z]", output[i:])
            i += len(match.group(0)) if match else 1
            continue
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("")
            column = 0
        else:
            line = lines[-1]
            lines[-1] = line[:column] + char + line[column + 1:]
            column += 1
        i += 1
    return lines


class Terminal:
    """A process whose standard streams are a pseudo-terminal; collects what it writes."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = os.openpty()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                        env=env, start_new_session=True)
        os.close(slave)
        self.master = master
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.chunks.append(data)

    @property
    def output(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        return wait_until(lambda: re.search(pattern, self.output), timeout=timeout,
                          what=f"{pattern!r} on the terminal")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.reader.join(timeout=5)
        os.close(self.master)


def _env(store_config: StoreConfig) -> dict[str, str]:
    return {**os.environ, "FLEETSIM_STORE": store_config.url,
            "FLEETSIM_SCHEMA": store_config.schema or "", "COLUMNS": "200"}


@pytest.mark.timeout(120)
def test_events_go_above_the_status_line_in_a_terminal(tmp_path: Path, store: Store,
                                                      store_config: StoreConfig) -> None:
    run_dir = tmp_path / "run"
    term = Terminal([sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), "up",
                     "--pods", "3", "--workload", "sleep:200", *FAST], _env(store_config))
    pids: list[int] = []
    try:
        term.wait_for(r"fleet ready")
        pids = [p["pid"] for p in json.loads((run_dir / "run.json").read_text())["pods"]]
        # Item 6: what to try next, once, after start-up.
        term.wait_for(r"fleetsim .*submit --count")
        term.wait_for(r"steps/s")
        assert fleetsim(run_dir, "submit", "--count", "300").returncode == 0
        lease = wait_until(store.current_leader, 10, what="a leader")
        wait_until(lambda: any(p["id"] == lease.holder and p["claimed"] > 0
                               for p in store.pods()), 10, what="the leader holding steps")
        killed = fleetsim(run_dir, "chaos", "kill-leader", "--json")
        assert killed.returncode == 0, killed.stderr
        victim = json.loads(killed.stdout)["pod"]
        term.wait_for(re.escape(f"{victim}: killed (SIGKILL)"))
        term.wait_for(r"leader: pod-\d+ \(term \d+\) after \d+\.\d s without a leader")
        term.wait_for(r"recovered \d+ steps? of " + re.escape(victim))
        # One more status line after the events: it is redrawn below them.
        shown = len(term.output)
        wait_until(lambda: "steps/s" in term.output[shown:], 10, what="a redrawn status line")
    finally:
        term.stop()
        assert_no_processes(pids)
    lines = screen_lines(term.output)
    events = [line for line in lines if "killed (SIGKILL)" in line or line.startswith(
        ("leader:", "recovered "))]
    assert f"{victim}: killed (SIGKILL)" in lines, "\n".join(lines)
    for line in events:
        assert "steps/s" not in line, f"an event ran into the status line: {line!r}"
    assert any(re.fullmatch(r"leader: pod-\d+ \(term \d+\) after \d+\.\d s without a leader",
                            line) for line in lines), "\n".join(lines)
    assert any(re.fullmatch(rf"recovered \d+ steps? of {re.escape(victim)}", line)
               for line in lines), "\n".join(lines)
    # Status lines are never left mixed with other text.
    for line in lines:
        if "steps/s" in line:
            assert re.fullmatch(r"\s*\d+ steps/s \|.*alive", line), line


@pytest.mark.timeout(120)
def test_no_terminal_codes_and_no_hints_when_not_a_terminal(tmp_path: Path, store: Store,
                                                           store_config: StoreConfig) -> None:
    run_dir = tmp_path / "run"
    out_path = tmp_path / "up.out"
    with open(out_path, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), "up", "--pods", "2",
             *FAST], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=_env(store_config), start_new_session=True)
    pids: list[int] = []
    try:
        wait_until(lambda: "fleet ready" in out_path.read_text(), 30, what="fleet ready")
        pids = [p["pid"] for p in json.loads((run_dir / "run.json").read_text())["pods"]]
        killed = fleetsim(run_dir, "chaos", "kill", "pod-1")
        assert killed.returncode == 0, killed.stderr
        wait_until(lambda: "pod-1: killed (SIGKILL)" in out_path.read_text(), 10,
                   what="the kill event")
    finally:
        os.kill(process.pid, signal.SIGINT)
        process.wait(timeout=30)
        assert_no_processes(pids)
    text = out_path.read_text()
    assert "\x1b" not in text and "\r" not in text, repr(text)
    assert "pod-1: killed (SIGKILL)\n" in text
    assert "submit --count" not in text  # the hints are for people at a terminal
