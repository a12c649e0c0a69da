"""A claim is one unit for its caller: whatever fails after its first statement.

``claim_steps`` may run several statements (the fast path, the lookup of
limited and FIFO queues, a locked claim per such queue). A fault between any
two of them must not leave a step committed to the pod that the pod was
not handed: the pod stays alive, so recovery would never sweep it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fleetsim.errors import ClaimInterrupted, InjectedFault, StoreError
from fleetsim.store import QueueConfig, StepSpec, Store, StoreConfig
from tests.helpers import rows

POD = "pod-a"


class FailAt:
    """A statement hook that raises on the n-th statement it sees (1-based)."""

    def __init__(self, n: int, *, after: bool = False) -> None:
        self.n = n
        self.after = after
        self.seen = 0

    def __call__(self) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise InjectedFault(f"injected at statement {self.n}", disconnect=True,
                                took_effect=self.after)


@pytest.fixture
def faulty(store_config: StoreConfig) -> Iterator[Store]:
    with Store(store_config) as s:
        yield s


def _setup(store: Store) -> None:
    # One plain step (the fast path leaves the batch short), then two
    # special queues: each takes the locked path in its own transaction.
    store.configure_queue(QueueConfig("limited", concurrency_limit=5))
    store.configure_queue(QueueConfig("fifo", strict_fifo=True))
    store.submit_many([StepSpec("default", {})] + [StepSpec("limited", {})] * 2
                      + [StepSpec("fifo", {})] * 2)
    store.register_pod(POD)


def _held(store: Store) -> set[int]:
    return {r[0] for r in rows(store, "SELECT id FROM steps WHERE status = 'claimed'"
                                      " AND claimed_by = :p", p=POD)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", range(1, 7))
def test_a_fault_before_any_statement_of_a_claim_hands_over_every_committed_step(
    store: Store, faulty: Store, n: int
) -> None:
    _setup(store)
    hook = FailAt(n)
    faulty.add_statement_hook(hook)
    handed: list[int] = []
    try:
        handed = [s.id for s in faulty.claim_steps(POD, ["default", "limited", "fifo"], 10)]
    except ClaimInterrupted as exc:
        handed = [s.id for s in exc.steps]
    except StoreError:
        pass
    # Nothing reached the server after the fault: exactly what was handed over is held.
    assert _held(store) == set(handed), f"fault at statement {n} (of {hook.seen})"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n", range(1, 7))
def test_a_lost_reply_in_a_claim_never_looks_like_nothing_happened(
    store: Store, faulty: Store, n: int
) -> None:
    _setup(store)
    faulty.add_reply_hook(FailAt(n, after=True))
    handed: list[int] = []
    unknown = False
    try:
        handed = [s.id for s in faulty.claim_steps(POD, ["default", "limited", "fifo"], 10)]
    except ClaimInterrupted as exc:
        handed, unknown = [s.id for s in exc.steps], True
    except InjectedFault as exc:
        unknown = exc.took_effect
    except StoreError:
        unknown = True
    held = _held(store)
    assert set(handed) <= held
    # Steps held but not handed over are allowed only when the caller was told
    # its claim may have committed unseen (the pod then releases them).
    assert held == set(handed) or unknown, f"lost reply at statement {n}"
