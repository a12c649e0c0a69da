"""BoundedQueue: each overflow policy, bounds, counters and thread safety."""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import pytest

from fleetsim.bus.backpressure import BoundedQueue, OverflowPolicy

pytestmark = pytest.mark.timeout(30)


def test_fifo_below_the_bound_for_every_policy() -> None:
    for policy in OverflowPolicy:
        key = (lambda item: item) if policy is OverflowPolicy.COALESCE else None
        q: BoundedQueue[int] = BoundedQueue(3, policy, key=key)
        assert all(q.put(i) for i in range(3))
        assert len(q) == 3
        assert q.drain() == [0, 1, 2]
        assert (q.dropped, q.coalesced, len(q)) == (0, 0, 0)


def test_drop_discards_the_newest_when_full() -> None:
    q: BoundedQueue[int] = BoundedQueue(2, "drop")
    assert [q.put(i) for i in range(5)] == [True, True, False, False, False]
    assert q.drain() == [0, 1]
    assert (q.accepted, q.dropped) == (2, 3)


def test_latest_discards_the_oldest_when_full() -> None:
    q: BoundedQueue[int] = BoundedQueue(2, OverflowPolicy.LATEST)
    assert all(q.put(i) for i in range(5))
    assert q.drain() == [3, 4]
    assert (q.accepted, q.dropped) == (5, 3)


def test_coalesce_keeps_the_latest_per_key_in_first_arrival_order() -> None:
    q: BoundedQueue[tuple[str, int]] = BoundedQueue(
        10, OverflowPolicy.COALESCE, key=lambda item: item[0]
    )
    for value in range(100):
        for pod in ("pod-1", "pod-2", "pod-3"):
            q.put((pod, value))
    assert len(q) == 3
    assert q.drain() == [("pod-1", 99), ("pod-2", 99), ("pod-3", 99)]
    assert (q.coalesced, q.dropped) == (297, 0)


def test_coalesce_is_bounded_by_keys_and_evicts_the_oldest_key() -> None:
    q: BoundedQueue[tuple[str, int]] = BoundedQueue(
        2, OverflowPolicy.COALESCE, key=lambda item: item[0]
    )
    q.put(("a", 1))
    q.put(("b", 1))
    q.put(("a", 2))  # replaces a in place: a stays oldest
    q.put(("c", 1))  # full with a new key: evicts a
    assert q.drain() == [("b", 1), ("c", 1)]
    assert (q.coalesced, q.dropped) == (1, 1)


def test_block_times_out_and_drops_the_new_item() -> None:
    q: BoundedQueue[int] = BoundedQueue(1, OverflowPolicy.BLOCK)
    assert q.put(1)
    started = time.monotonic()
    assert not q.put(2, timeout=0.2)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 2
    assert not q.put(3, timeout=0)
    assert (q.get_nowait(), q.dropped) == (1, 2)


def test_block_waits_for_room() -> None:
    q: BoundedQueue[int] = BoundedQueue(1, OverflowPolicy.BLOCK)
    q.put(1)
    result: list[bool] = []
    producer = threading.Thread(target=lambda: result.append(q.put(2, timeout=10)))
    producer.start()
    assert q.get(timeout=5) == 1
    assert q.get(timeout=5) == 2  # the blocked put got in
    producer.join(5)
    assert result == [True]


def test_get_times_out_with_queue_empty() -> None:
    q: BoundedQueue[int] = BoundedQueue(1, OverflowPolicy.DROP)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get_nowait()


def test_drain_respects_limit() -> None:
    q: BoundedQueue[int] = BoundedQueue(10, OverflowPolicy.DROP)
    for i in range(5):
        q.put(i)
    assert q.drain(2) == [0, 1]
    assert q.drain() == [2, 3, 4]


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        BoundedQueue(0, OverflowPolicy.DROP)
    with pytest.raises(ValueError, match="key"):
        BoundedQueue(1, OverflowPolicy.COALESCE)
    with pytest.raises(ValueError, match="key"):
        BoundedQueue(1, OverflowPolicy.DROP, key=lambda item: item)
    with pytest.raises(ValueError):
        BoundedQueue(1, "sometimes")


@pytest.mark.parametrize("policy", list(OverflowPolicy))
def test_concurrent_producers_and_a_consumer_account_for_every_item(
    policy: OverflowPolicy,
) -> None:
    key = (lambda item: item % 7) if policy is OverflowPolicy.COALESCE else None
    q: BoundedQueue[int] = BoundedQueue(5, policy, key=key)
    producers, per_producer = 4, 2000
    taken: list[int] = []
    done = threading.Event()

    def produce(base: int) -> None:
        for i in range(per_producer):
            q.put(base + i, timeout=1.0)

    sizes: list[int] = []

    def consume() -> None:
        while not done.is_set() or len(q):
            sizes.append(len(q))
            with contextlib.suppress(queue.Empty):
                taken.append(q.get(timeout=0.01))

    consumer = threading.Thread(target=consume)
    consumer.start()
    threads = [threading.Thread(target=produce, args=(n * per_producer,)) for n in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    done.set()
    consumer.join(20)
    total = producers * per_producer
    assert q.accepted + (q.dropped if policy in ("drop", "block") else 0) == total
    assert q.accepted == len(taken) + q.coalesced + (
        q.dropped if policy in ("latest", "coalesce") else 0
    )
    assert len(set(taken)) == len(taken)
    assert max(sizes) <= 5
