"""Step handlers the workload allow-list tests start pods with (importable as tests.*)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def touch(payload: dict[str, Any]) -> dict[str, Any]:
    """Create the file ``payload["path"]``: proof that the handler ran."""
    Path(payload["path"]).touch()
    return {"touched": payload["path"]}


def ok(payload: dict[str, Any]) -> dict[str, Any]:
    """Succeed, echoing the payload's keys."""
    return {"keys": sorted(payload)}


def touch_other(payload: dict[str, Any]) -> dict[str, Any]:
    """The same, but never given to a pod at start: it must never run."""
    Path(payload["path"]).touch()
    return {"touched": payload["path"]}
