"""Which queues a pod claims from: the names it was given, or every queue (``*``).

A pod started with ``--queue '*'`` (the default of ``fleetsim up``, ``run``
and ``pod``) serves every queue in the store, re-reading the list every
:data:`REFRESH_S` seconds, so a queue made after the pod started (by
``queue set`` or by the first ``submit`` to it) is claimed from within
about a second. A pod given queue names serves exactly those.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence

from fleetsim.errors import StoreError
from fleetsim.store import Store

__all__ = ["ALL_QUEUES", "REFRESH_S", "ServedQueues", "serves_every_queue"]

#: The queue "name" meaning every queue.
ALL_QUEUES = "*"
#: How often a pod serving every queue re-reads the store's queues.
REFRESH_S = 1.0


def serves_every_queue(names: Sequence[str]) -> bool:
    """Whether a pod given ``names`` serves every queue."""
    return ALL_QUEUES in names


class ServedQueues:
    """The queue names a pod claims from now."""

    def __init__(self, names: Sequence[str], store: Store, refresh_s: float = REFRESH_S) -> None:
        self.every = serves_every_queue(names)
        self._names = ["default"] if self.every else list(names)
        self._store = store
        self._refresh_s = refresh_s
        self._next = float("-inf")
        self._lock = threading.Lock()

    def current(self) -> list[str]:
        """The names to claim from (a store error keeps the last list)."""
        if not self.every:
            return self._names
        now = time.monotonic()
        with self._lock:
            if now >= self._next:
                self._next = now + self._refresh_s
                # On a store error the claim that follows reports the trouble.
                with contextlib.suppress(StoreError):
                    self._names = sorted(self._store.queues()) or ["default"]
            return self._names
