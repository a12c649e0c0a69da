"""History export: the recorded history as Jepsen-style operation records.

One JSON object per line, in database-time order::

    {"type": "invoke", "f": "claim", "process": "pod-1#0",
     "value": {"step": 17, "queue": "default", "token": 42},
     "time": "2026-11-22T10:00:00.123456+00:00", "index": 0}

``f`` is ``claim`` (invoke, then ok, at the claim), ``complete``, ``fail``,
``release`` or ``cancel`` (ok: the fenced write was accepted), ``elect`` (a
leader term began) or ``recover`` (a leader action). A claim revoked by
recovery ends with ``{"type": "info", "f": "complete", "value": {...,
"outcome": "lease_lost"}}``: from its pod's point of view the step's fate is
unknown. A late write refused because its token had been superseded is
``{"type": "fail", "f": "complete", "value": {..., "outcome": "superseded"}}``.
``process`` is ``<pod>#<incarnation>`` (just ``<pod>`` for leader records
whose incarnation the history no longer holds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from fleetsim.errors import ConfigError
from fleetsim.store import Store
from fleetsim.store.checks import iter_history

__all__ = ["FORMATS", "check_output", "export_history", "open_output"]

FORMATS = ("jsonl",)


def export_history(store: Store, out: TextIO, format: str = "jsonl") -> int:
    """Write ``store``'s history to ``out`` as operation records; return how many.

    Streams from a server-side cursor: memory does not grow with the history.
    Raises SchemaMismatch if the database holds no fleetsim store.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown history format {format!r}: use one of {', '.join(FORMATS)}")
    index = 0
    for record in iter_history(store):
        record["index"] = index
        out.write(json.dumps(record, separators=(",", ":")))
        out.write("\n")
        index += 1
    return index



def check_output(path: Path) -> None:
    """Raise ConfigError (one line) if ``path``'s folder is missing or not a folder.

    The folder is not created: a missing one is more often a typo than a
    wish, and a typo should not leave folders behind.
    """
    folder = path.parent
    if not folder.exists():
        raise ConfigError(f"cannot write {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise ConfigError(f"cannot write {path}: {folder} is not a folder")


def open_output(path: Path) -> TextIO:
    """Open ``path`` to write an export to, or raise ConfigError in one line."""
    check_output(path)
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
