"""The run directory (``.fleetsim/``): how separate commands find a running fleet.

It holds ``run.json`` (store URL, bus endpoints, coordinator and pod pids),
pod logs, the embedded database and exported histories. It is readable by
its owner only, since the store URL may carry a password.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from fleetsim.errors import ConfigError, FleetNotRunning

RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunDir:
    """A run directory on disk."""

    path: Path

    @property
    def run_file(self) -> Path:
        """``run.json``: the running fleet's description."""
        return self.path / RUN_FILE

    @property
    def logs(self) -> Path:
        """Pod and coordinator logs."""
        return self.path / "logs"

    @property
    def pgdata(self) -> Path:
        """The embedded PostgreSQL's data directory."""
        return self.path / "pgdata"

    def ensure(self) -> RunDir:
        """Create the directory (mode 0700) and its logs folder."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
            self.logs.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use run directory {self.path}: {exc.strerror}") from None
        return self

    def write(self, data: dict[str, Any]) -> None:
        """Atomically replace ``run.json`` (mode 0600)."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".run-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, indent=2, sort_keys=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.run_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self) -> dict[str, Any]:
        """The contents of ``run.json``; FleetNotRunning if there is none."""
        try:
            data: dict[str, Any] = json.loads(self.run_file.read_text())
        except FileNotFoundError:
            raise FleetNotRunning(
                f"no fleet in {self.path} (start one with `fleetsim up`)"
            ) from None
        except (OSError, ValueError) as exc:
            raise FleetNotRunning(f"unreadable {self.run_file}: {exc}") from None
        return data

    def read_running(self) -> dict[str, Any]:
        """``run.json`` of a fleet whose coordinator is alive."""
        data = self.read()
        pid = data.get("coordinator_pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            raise FleetNotRunning(
                f"the fleet in {self.path} is not running (coordinator pid {pid} is gone);"
                " start one with `fleetsim up`"
            )
        return data

    def remove_run_file(self) -> None:
        """Forget the fleet (after a clean shutdown)."""
        self.run_file.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
