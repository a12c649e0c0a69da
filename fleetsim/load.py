"""The load of an experiment: a seeded mix of steps, all at once or at a fixed rate.

Open loop: step ``k`` is due ``k / rate`` seconds after the start whatever
the fleet does (a slow fleet sees its queues grow, as real arrivals would),
submitted in small batches every tick. Each step's kind is drawn from the
mix by weight with a RNG seeded by the run's seed, so a seed gives the same
sequence of kinds. Every submit is recorded in a client history, like any
submitter's, for the checker to cross-examine. A submit a full queue
refuses (its ``max_length``) is counted as rejected, not retried.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetsim.client_history import ClientHistory, NullHistory
from fleetsim.errors import FleetsimError, QueueFull
from fleetsim.store import StepSpec, Store

log = logging.getLogger(__name__)

__all__ = ["LoadGenerator", "StepKind"]

_TICK_S = 0.1
_CHUNK = 10_000


@dataclass(frozen=True)
class StepKind:
    """One kind of step in the mix, resolved: where it goes and what it runs."""

    weight: float
    queue: str
    workload: str | None  # None: the pods' own
    priority: int = 0
    max_attempts: int = 3

    def spec(self) -> StepSpec:
        """The StepSpec of one step of this kind."""
        payload: dict[str, Any] = {"workload": self.workload} if self.workload else {}
        return StepSpec(self.queue, payload, self.priority, self.max_attempts)


class LoadGenerator(threading.Thread):
    """Submits ``count`` steps of a mix, at ``rate`` per second (0: at once)."""

    def __init__(self, store: Store, kinds: Sequence[StepKind], count: int, rate: float,
                 seed: int, history_dir: Path | None = None,
                 stopping: threading.Event | None = None) -> None:
        super().__init__(name="experiment-load", daemon=True)
        if not kinds:
            raise ValueError("a load needs at least one kind of step")
        self.store, self.kinds, self.count, self.rate = store, list(kinds), count, rate
        self.rng = random.Random(f"fleetsim-load:{seed}")
        self.history_dir = history_dir
        self.stopping = stopping or threading.Event()
        self.submitted: Counter[str] = Counter()  # accepted steps per queue
        self.rejected: Counter[str] = Counter()  # refused by a full queue, per queue
        # Steps of submits whose reply was lost (the store went away
        # mid-call) and that were sent again: each may be in the store twice.
        self.indeterminate = 0
        self.error: str | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._cumulative = list(itertools.accumulate(k.weight for k in self.kinds))

    @property
    def accepted(self) -> int:
        """Steps the store accepted so far."""
        return sum(self.submitted.values())

    def draw(self) -> StepKind:
        """The kind of the next step (seeded, by weight)."""
        point = self.rng.random() * self._cumulative[-1]
        return self.kinds[bisect.bisect_right(self._cumulative, point)]

    def run(self) -> None:
        history: Any = NullHistory()
        if self.history_dir is not None:
            history = ClientHistory.for_submitter(self.history_dir)
        self.started_at = time.monotonic()
        try:
            due = 0
            while due < self.count and not self.stopping.is_set():
                if self.rate > 0:
                    elapsed = time.monotonic() - self.started_at
                    target = min(self.count, int(elapsed * self.rate) + 1)
                else:
                    target = min(self.count, due + _CHUNK)
                batch = [self.draw() for _ in range(target - due)]
                self._submit(batch, history)
                due = target
                if self.rate > 0 and due < self.count:
                    next_at = self.started_at + due / self.rate
                    self.stopping.wait(max(0.0, min(_TICK_S, next_at - time.monotonic())))
        except FleetsimError as exc:
            self.error = str(exc)
            log.warning("load stopped: %s", exc)
        except Exception as exc:  # anything else must not pass for a finished load
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("load stopped")
        finally:
            self.finished_at = time.monotonic()
            history.close()

    def _submit(self, batch: list[StepKind], history: Any) -> None:
        by_kind: dict[StepKind, int] = {}
        for kind in batch:
            by_kind[kind] = by_kind.get(kind, 0) + 1
        for kind, n in by_kind.items():
            try:
                ids = self._with_retry(lambda k=kind, n=n: self.store.submit_many(
                    [k.spec()] * n), n)
            except QueueFull:
                self.rejected[kind.queue] += n
                continue
            history.submitted(kind.queue, ids)
            self.submitted[kind.queue] += len(ids)

    def _with_retry(self, call: Any, steps: int) -> list[int]:
        """Retry while the store is unavailable (a fault may be restarting it).

        A failed call may have committed before its reply was lost, so each
        retry counts ``steps`` as indeterminate: the run then allows that
        many more steps in the store than were acknowledged.
        """
        from fleetsim.errors import StoreUnavailable

        deadline = time.monotonic() + 30.0
        while True:
            try:
                result: list[int] = call()
                return result
            except StoreUnavailable:
                if time.monotonic() > deadline or self.stopping.is_set():
                    raise
                self.indeterminate += steps
                self.stopping.wait(0.5)
