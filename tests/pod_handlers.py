"""Step handlers the pod tests start pods with (``--handler tests.pod_handlers:NAME``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def fail_while_gate(payload: dict[str, Any]) -> dict[str, Any]:
    """Fail while the file ``payload["gate"]`` exists; succeed once it is gone."""
    if Path(payload["gate"]).exists():
        raise RuntimeError(f"gate {payload['gate']} is closed")
    return {"passed": True}


def raises(payload: dict[str, Any]) -> Any:
    """Raise an ordinary exception."""
    raise ValueError(f"handler raised for {payload.get('n')}")


def not_json(payload: dict[str, Any]) -> Any:
    """Return something JSON cannot hold (a set and an object)."""
    return {"a set": {1, 2}, "object": object()}


def calls_sys_exit(payload: dict[str, Any]) -> Any:
    """sys.exit from inside a step (SystemExit, a BaseException)."""
    if Path(payload["gate"]).exists():
        os.unlink(payload["gate"])  # once: the retry succeeds
        sys.exit(7)
    return {"exited": False}


def calls_os_exit(payload: dict[str, Any]) -> Any:
    """os._exit from inside a step: the pod process ends at once, no cleanup."""
    if Path(payload["gate"]).exists():
        os.unlink(payload["gate"])  # once: the retry elsewhere succeeds
        os._exit(9)
    return {"exited": False}


def square(payload: dict[str, Any]) -> dict[str, Any]:
    """A user handler with a real result."""
    n = int(payload["n"])
    return {"n": n, "square": n * n}


def hang_once(payload: dict[str, Any]) -> Any:
    """Hang (sleep ``hang_s``) the first time, while the file ``gate`` exists; then succeed."""
    import time

    gate = Path(payload["gate"])
    if gate.exists():
        gate.unlink()
        time.sleep(float(payload["hang_s"]))
        return {"late": True}
    return {"late": False}
