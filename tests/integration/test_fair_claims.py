"""Fair claims: a busy plain queue does not starve a pod's limited or FIFO queues."""

from __future__ import annotations

import time

import pytest

from fleetsim.store import QueueConfig, StepSpec, Store


@pytest.mark.timeout(60)
@pytest.mark.parametrize("special", ["limited", "fifo"])
def test_a_plain_queue_that_always_fills_the_batch_does_not_starve_a_special_one(
    store: Store, special: str
) -> None:
    config = (QueueConfig(special, concurrency_limit=2) if special == "limited"
              else QueueConfig(special, strict_fifo=True))
    store.configure_queue(config)
    store.submit_many([StepSpec("default", {})] * 50_000)
    store.submit_many([StepSpec(special, {})] * 20)
    store.register_pod("pod-a")
    served: dict[str, int] = {"default": 0, special: 0}
    deadline = time.monotonic() + 1.5
    # The plain queue always fills the batch; claim and complete for a while.
    while time.monotonic() < deadline:
        steps = store.claim_steps("pod-a", ["default", special], batch=10)
        for step in steps:
            served[step.queue] += 1
        store.complete_many([(s.id, s.claim_token, None) for s in steps])
    assert store.status_counts()["queued"] > 0, "the plain queue ran dry: nothing proven"
    assert served[special] >= 4, f"the {special} queue starved: {served}"
    assert served["default"] > served[special], served


@pytest.mark.timeout(30)
def test_a_claim_never_returns_more_than_its_batch(store: Store) -> None:
    store.configure_queue(QueueConfig("limited", concurrency_limit=5))
    store.configure_queue(QueueConfig("fifo", strict_fifo=True))
    store.submit_many([StepSpec(q, {}) for q in ("default", "limited", "fifo") for _ in range(3)])
    store.register_pod("pod-a")
    for _ in range(9):
        assert len(store.claim_steps("pod-a", ["default", "limited", "fifo"], batch=1)) <= 1
