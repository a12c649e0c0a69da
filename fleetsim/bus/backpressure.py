"""A bounded, thread-safe outbound queue with an explicit overflow policy.

Whatever sits between a producer that must not stall (a pod's claim loop)
and a consumer that may (a slow coordinator) needs a bound, and a decision
about what happens at the bound. The decision is the :class:`OverflowPolicy`:

========== ==============================================================
``block``  ``put`` waits up to its timeout for room; on timeout the new
           item is dropped and ``put`` returns False.
``drop``   a full queue drops the *new* item (``put`` returns False).
``latest`` a full queue drops the *oldest* item to make room.
``coalesce`` items carry a key (``key=`` function); a new item replaces
           the pending one with the same key in place (latest value wins,
           its place in line is kept). A new key in a full queue drops the
           oldest pending item. So memory is bounded by ``maxsize`` keys.
========== ==============================================================

Pod metrics use ``coalesce`` keyed by pod: counters are cumulative, so only
the newest snapshot matters and a slow coordinator never blocks a pod.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from enum import StrEnum
from typing import Generic, TypeVar

T = TypeVar("T")


class OverflowPolicy(StrEnum):
    """What a full :class:`BoundedQueue` does with one more item."""

    BLOCK = "block"
    DROP = "drop"
    LATEST = "latest"
    COALESCE = "coalesce"


class BoundedQueue(Generic[T]):
    """A FIFO of at most ``maxsize`` items that applies ``policy`` when full.

    ``dropped`` counts items discarded (the new one under ``drop`` and on a
    ``block`` timeout, the oldest under ``latest``/``coalesce``);
    ``coalesced`` counts pending items replaced by a newer one with the same
    key. All methods are safe to call from any thread.
    """

    def __init__(
        self,
        maxsize: int,
        policy: OverflowPolicy | str = OverflowPolicy.BLOCK,
        *,
        key: Callable[[T], Hashable] | None = None,
    ) -> None:
        """Create an empty queue; ``key`` is required for (and only for) ``coalesce``."""
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.policy = OverflowPolicy(policy)
        if (self.policy is OverflowPolicy.COALESCE) != (key is not None):
            raise ValueError("a key function is required by, and only by, the coalesce policy")
        self.maxsize = maxsize
        self._key = key
        # coalesce keeps key -> item in arrival order; the others a plain deque.
        self._keyed: OrderedDict[Hashable, T] = OrderedDict()
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self.accepted = 0
        self.dropped = 0
        self.coalesced = 0

    def __len__(self) -> int:
        """Number of pending items."""
        with self._lock:
            return self._size()

    def _size(self) -> int:
        return len(self._keyed) if self._key is not None else len(self._items)

    def put(self, item: T, timeout: float | None = None) -> bool:
        """Enqueue ``item`` under the policy; True if it is now pending, False if dropped.

        Only ``block`` ever waits: ``timeout=None`` waits forever, ``0`` not at all.
        """
        with self._lock:
            if self._key is not None:
                self._put_coalesced(item, self._key(item))
            elif self._size() < self.maxsize:
                self._items.append(item)
            elif self.policy is OverflowPolicy.LATEST:
                self._items.popleft()
                self.dropped += 1
                self._items.append(item)
            elif self.policy is OverflowPolicy.BLOCK and self._wait_for_room(timeout):
                self._items.append(item)
            else:
                self.dropped += 1
                return False
            self.accepted += 1
            self._not_empty.notify()
            return True

    def _put_coalesced(self, item: T, key: Hashable) -> None:
        if key in self._keyed:
            self._keyed[key] = item  # keeps its place in line
            self.coalesced += 1
            return
        if len(self._keyed) >= self.maxsize:
            self._keyed.popitem(last=False)
            self.dropped += 1
        self._keyed[key] = item

    def _wait_for_room(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._size() >= self.maxsize:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._not_full.wait(remaining)
        return True

    def get(self, timeout: float | None = None) -> T:
        """Remove and return the oldest item, waiting up to ``timeout``; queue.Empty if none."""
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._size():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                self._not_empty.wait(remaining)
            return self._pop()

    def get_nowait(self) -> T:
        """Remove and return the oldest item; queue.Empty if there is none."""
        return self.get(timeout=0)

    def drain(self, limit: int | None = None) -> list[T]:
        """Remove and return up to ``limit`` pending items (all if None), oldest first."""
        with self._lock:
            count = self._size() if limit is None else min(limit, self._size())
            return [self._pop() for _ in range(count)]

    def _pop(self) -> T:
        if self._key is not None:
            _, item = self._keyed.popitem(last=False)
        else:
            item = self._items.popleft()
        self._not_full.notify()
        return item


__all__ = ["BoundedQueue", "OverflowPolicy"]
