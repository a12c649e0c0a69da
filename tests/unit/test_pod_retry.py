"""The pod's write retries: one plain attempt first, then tenacity within one lease."""

from __future__ import annotations

import itertools
import time

import pytest

from fleetsim.config import FleetTimings
from fleetsim.errors import StoreError, StoreUnavailable
from fleetsim.store import Store, StoreConfig
from pods.config import PodConfig
from pods.pod import Pod

pytestmark = pytest.mark.timeout(20)

FAST = FleetTimings(heartbeat_s=0.2, lease_s=1.0, renew_s=0.5, dead_after_s=1.0,
                    recovery_s=0.2, grace_s=2.0)
NOWHERE = StoreConfig("postgresql://nobody@127.0.0.1:1/none", connect_timeout_s=1)


def pod() -> Pod:
    return Pod(PodConfig("p1", NOWHERE, timings=FAST), Store(NOWHERE))


def test_a_write_that_works_runs_once() -> None:
    calls: list[float] = []
    assert pod()._retry(lambda: calls.append(time.monotonic()) or "ok") == "ok"
    assert len(calls) == 1


def test_an_unavailable_store_is_retried_with_growing_waits_then_succeeds() -> None:
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise StoreUnavailable("down")
        return "ok"

    assert pod()._retry(flaky) == "ok"
    waits = [b - a for a, b in itertools.pairwise(calls)]
    # 0.05, 0.1, 0.2 s (+ up to 0.05 s of jitter each): the old schedule.
    for wait, base in zip(waits, (0.05, 0.1, 0.2), strict=True):
        assert base <= wait < base + 0.05 + 0.1


def test_it_gives_up_after_a_lease_and_other_errors_are_not_retried() -> None:
    calls: list[float] = []

    def down() -> None:
        calls.append(time.monotonic())
        raise StoreUnavailable("down")

    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        pod()._retry(down)
    assert 1.0 <= time.monotonic() - started < 1.0 + 0.5 + 0.3  # the lease, one wait more
    assert len(calls) > 3

    refused: list[int] = []

    def bad() -> None:
        refused.append(1)
        raise StoreError("refused")

    with pytest.raises(StoreError):
        pod()._retry(bad)
    assert refused == [1]
