"""Control traffic is never queued behind metrics.

The promise is an order, so it is tested as one, without a clock: with a
metrics backlog waiting, the poll that takes a CLI request hands it out
first and takes at most ``max_metrics_per_poll`` metrics with it. What the
order is worth in milliseconds is measured by ``scripts/bench_bus.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from fleetsim.bus import (
    ControlClient,
    CoordinatorBus,
    Inbound,
    Metrics,
    StatusRequest,
    encode,
)
from fleetsim.bus.testing import CoordinatorUnderFlood

pytestmark = pytest.mark.timeout(60)

BACKLOG = 20_000
METRICS_PER_POLL = 64


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    # Every socket of it discards what it has not sent when closed. The
    # tests' sockets are locals: a socket garbage-collected at the end of a
    # test is closed with the default linger (for ever), before destroy()
    # can set 0, and term() then waited for a metrics backlog nobody would
    # read again (the image suite hung here once under load).
    context.setsockopt(zmq.LINGER, 0)
    yield context
    context.destroy(linger=0)


def poll_until(
    bus: CoordinatorBus, wanted: Callable[[list[Inbound]], bool], timeout_s: float = 10
) -> tuple[list[Inbound], int]:
    """Poll until a batch satisfies ``wanted``: (that batch, metrics taken before it)."""
    deadline = time.monotonic() + timeout_s
    before = 0
    while time.monotonic() < deadline:
        batch = bus.poll(100)
        if wanted(batch):
            return batch, before
        before += sum(item.channel == "metrics" for item in batch)
    raise AssertionError(f"no wanted batch within {timeout_s:g}s")


def has_cli(batch: list[Inbound]) -> bool:
    return any(item.channel == "cli" for item in batch)


def has_metrics(batch: list[Inbound]) -> bool:
    return any(item.channel == "metrics" for item in batch)


def test_a_cli_request_is_taken_ahead_of_a_metrics_backlog(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    with CoordinatorBus(max_metrics_per_poll=METRICS_PER_POLL) as bus:
        cli = context.socket(zmq.DEALER)
        cli.connect(bus.endpoints.cli)
        # A first request proves the CLI connection is up before the backlog.
        cli.send(encode(StatusRequest(request_id=1)))
        poll_until(bus, has_cli)
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)  # the whole backlog queues at once
        push.connect(bus.endpoints.metrics)
        frame = encode(Metrics("flood", 1, {"steps": 1.0}, {"rss_mb": 1.0}, 1.0))
        for _ in range(BACKLOG):
            push.send(frame)
        poll_until(bus, has_metrics)

        cli.send(encode(StatusRequest(request_id=2)))
        batch, metrics_before = poll_until(bus, has_cli)

        assert batch[0].channel == "cli" and batch[0].message.request_id == 2
        assert sum(item.channel == "metrics" for item in batch) <= METRICS_PER_POLL
        assert metrics_before < BACKLOG // 2, "the request waited for the backlog"
        assert has_metrics(bus.poll(100)), "the backlog was gone: nothing was proven"


def test_the_cli_is_answered_while_another_process_floods_metrics() -> None:
    """End to end, in three processes: every request is answered and the flood goes on."""
    with CoordinatorUnderFlood() as coordinator:
        coordinator.start_flood(senders=5)
        before = coordinator.metrics_received()
        with ControlClient(coordinator.endpoints.cli) as client:
            replies = [client.request(StatusRequest(), timeout_s=5) for _ in range(50)]
        after = coordinator.metrics_received()
    assert [reply.data for reply in replies] == [{"kind": "status_request"}] * 50
    assert after > before, "the flood stopped while the CLI was served"
