"""Pod hooks: cross-cutting behaviour without branches in the worker loop.

Like dramatiq's middleware, each hook overrides only what it needs; the
defaults do nothing. Metrics are one hook; chaos plugs in the same way.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Collection, Sequence

from fleetsim.store import ClaimedStep


class PodHook:
    """Base class: every method is a no-op."""

    def on_claim_done(self, duration_s: float, count: int) -> None:
        """A claim returned ``count`` steps after ``duration_s`` (before on_claimed)."""

    def on_claimed(self, steps: Sequence[ClaimedStep]) -> None:
        """Steps were claimed."""

    def on_step_done(
        self, step: ClaimedStep, ok: bool, duration_s: float, error: str | None
    ) -> None:
        """A step's workload finished (ok) or raised (not ok)."""

    def on_write(self, kind: str, accepted: int, rejected: int) -> None:
        """A fenced write of ``kind`` (complete, fail, release) was accepted/refused."""

    def on_accepted(self, kind: str, step_ids: Collection[int]) -> None:
        """The store accepted the fenced write of ``kind`` for these steps."""

    def on_store_error(self, operation: str) -> None:
        """A store call (claim, a write, heartbeat) failed."""

    def on_leadership(self, term: int | None) -> None:
        """The pod became leader for ``term``, or lost leadership (None)."""

    def on_fenced(self, fenced: bool) -> None:
        """The pod fenced itself (lost the store or was declared dead), or resumed."""


class CountingHook(PodHook):
    """Counters of what the pod did; read by status and metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.term: int | None = None
        self.fenced = False

    def on_claimed(self, steps: Sequence[ClaimedStep]) -> None:
        with self._lock:
            self.counts["claimed"] += len(steps)

    def on_step_done(
        self, step: ClaimedStep, ok: bool, duration_s: float, error: str | None
    ) -> None:
        with self._lock:
            self.counts["steps_ok" if ok else "steps_raised"] += 1

    def on_write(self, kind: str, accepted: int, rejected: int) -> None:
        with self._lock:
            self.counts[f"{kind}d" if kind.endswith("e") else f"{kind}ed"] += accepted
            self.counts["lease_lost"] += rejected

    def on_store_error(self, operation: str) -> None:
        with self._lock:
            self.counts["store_errors"] += 1

    def on_leadership(self, term: int | None) -> None:
        with self._lock:
            self.term = term
            self.counts["terms_won" if term is not None else "terms_lost"] += 1

    def on_fenced(self, fenced: bool) -> None:
        with self._lock:
            self.fenced = fenced
            if fenced:
                self.counts["fenced"] += 1

    def snapshot(self) -> dict[str, int]:
        """A copy of the counters."""
        with self._lock:
            return dict(self.counts)
