"""Changing some of a queue's settings, atomically (``fleetsim queue set``).

:meth:`Store.configure_queue` writes every setting. A caller that reads the
settings, changes one and writes them all back undoes any change another
caller made in between: two ``queue set`` commands run at once, one giving a
limit and one pausing, could leave the queue paused without its limit.
:func:`change_queue` writes only the settings it is given, in one
transaction that holds the queue's row, so concurrent changes of different
settings all land, and concurrent changes of the same setting end with one
of them.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

import sqlalchemy as sa

from fleetsim.errors import ConfigError, StoreError
from fleetsim.store import queries as q
from fleetsim.store.records import QueueConfig
from fleetsim.store.store import Store

__all__ = ["MAX_QUEUE_SETTING", "change_queue"]

#: Limits are 32-bit integers in the ``queues`` table.
MAX_QUEUE_SETTING: Final = 2**31 - 1



class _Unchanged(enum.Enum):
    """The default of a setting not given (None means "no limit")."""

    UNCHANGED = enum.auto()


_UNCHANGED: Final = _Unchanged.UNCHANGED
_Keep = Literal[_Unchanged.UNCHANGED]

# One statement, each column either given (its flag set) or kept as it is
# in the row's latest version: nothing read earlier is written back.
_CHANGE_QUEUE: Final = sa.text("""
UPDATE queues
   SET concurrency_limit = CASE WHEN :set_limit THEN CAST(:limit AS integer)
                                ELSE concurrency_limit END,
       max_length = CASE WHEN :set_max_length THEN CAST(:max_length AS integer)
                         ELSE max_length END,
       strict_fifo = CASE WHEN :set_fifo THEN CAST(:fifo AS boolean) ELSE strict_fifo END,
       paused = CASE WHEN :set_paused THEN CAST(:paused AS boolean) ELSE paused END
 WHERE name = :name
RETURNING name, concurrency_limit, max_length, strict_fifo, paused
""")


def _check_limit(what: str, value: object) -> None:
    if value is None or value is _UNCHANGED:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"a queue's {what} must be an integer")
    if not 1 <= value <= MAX_QUEUE_SETTING:
        raise ConfigError(f"a queue's {what} must be 1 to {MAX_QUEUE_SETTING} (or no limit)")


def change_queue(
    store: Store,
    name: str,
    *,
    concurrency_limit: int | _Keep | None = _UNCHANGED,
    max_length: int | _Keep | None = _UNCHANGED,
    strict_fifo: bool | _Keep = _UNCHANGED,
    paused: bool | _Keep = _UNCHANGED,
) -> QueueConfig:
    """Create queue ``name`` if new and change only the settings given; return them all.

    ``None`` for a limit removes it; a setting left out keeps its current
    value, even if another caller changes it meanwhile. Like
    :meth:`Store.configure_queue`, a queue that has (or gets) a concurrency
    limit or strict FIFO has its open claims flagged for the locked claim
    path. Raises ConfigError for an invalid setting, before the database.
    """
    if not name or len(name) > 200:
        raise ConfigError("a queue name must be 1 to 200 characters")
    _check_limit("concurrency limit", concurrency_limit)
    _check_limit("max length", max_length)
    for what, value in (("strict FIFO", strict_fifo), ("paused", paused)):
        if value is not _UNCHANGED and not isinstance(value, bool):
            raise ConfigError(f"a queue's {what} setting must be true or false")
    params = {
        "name": name,
        "set_limit": concurrency_limit is not _UNCHANGED,
        "limit": None if concurrency_limit is _UNCHANGED else concurrency_limit,
        "set_max_length": max_length is not _UNCHANGED,
        "max_length": None if max_length is _UNCHANGED else max_length,
        "set_fifo": strict_fifo is not _UNCHANGED,
        "fifo": None if strict_fifo is _UNCHANGED else strict_fifo,
        "set_paused": paused is not _UNCHANGED,
        "paused": None if paused is _UNCHANGED else paused,
    }
    with store._transaction() as conn:
        conn.execute(sa.text(q.ENSURE_QUEUES), {"names": [name]})
        # FOR UPDATE, as configure_queue: it waits for the fast-path claims in
        # flight on this queue (they hold the row FOR KEY SHARE, which the
        # UPDATE's own lock would not wait for), so the flagging below sees
        # them; and it makes concurrent changes take turns.
        conn.execute(sa.text(q.LOCK_QUEUE), {"queue": name})
        row = conn.execute(_CHANGE_QUEUE, params).first()
        if row is None:  # ENSURE_QUEUES made it; only a concurrent DROP could undo that
            raise StoreError(f"no queue named {name!r}")
        updated = QueueConfig(row[0], row[1], row[2], bool(row[3]), bool(row[4]))
        if updated.concurrency_limit is not None or updated.strict_fifo:
            conn.execute(sa.text(q.FLAG_OPEN_CLAIMS), {"queue": name})
    # Claims by this store object re-read which queues need the locked path.
    store._special_queues_at = float("-inf")
    return updated
