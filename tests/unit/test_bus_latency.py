"""Control traffic is never queued behind metrics: CLI round trips under a metrics flood.

Coordinator, metrics flood (five PUSH sockets, one thread each) and CLI run
in three processes, as they do for real: in one interpreter the flooding
threads and the coordinator starve the client of the GIL and add tens of
milliseconds that no deployment has, so the numbers would measure the test
harness rather than the bus.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as ProcessEvent

import pytest
import zmq

from fleetsim.bus import BusEndpoints, ControlClient, Metrics, StatusRequest, encode
from fleetsim.bus.testing import FakeCoordinator

pytestmark = pytest.mark.timeout(30)

FLOODERS = 5
REQUESTS = 200
P99_BUDGET_S = 0.050


def flood(context: zmq.Context[zmq.Socket[bytes]], endpoint: str, stop: threading.Event) -> None:
    """Push metrics from one socket as fast as the coordinator takes them."""
    frame = encode(
        Metrics("flood", 1, {f"counter_{i}": float(i) for i in range(10)}, {"rss_mb": 1.0}, 1.0)
    )
    push = context.socket(zmq.PUSH)
    try:
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 100)  # blocked at the high-water mark: recheck stop
        push.connect(endpoint)
        while not stop.is_set():
            with contextlib.suppress(zmq.Again):
                push.send(frame)
    finally:
        push.close(linger=0)


def flood_from_threads(endpoint: str, threads: int, stop: ProcessEvent) -> None:
    """Child-process entry point: ``threads`` flooding PUSH sockets until ``stop``."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stopping = threading.Event()
    workers = [
        threading.Thread(target=flood, args=(context, endpoint, stopping)) for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    stop.wait(60)
    stopping.set()
    for worker in workers:
        worker.join()
    context.term()


def serve_coordinator(connection: Connection) -> None:
    """Child-process entry point: a coordinator answering the CLI, counting metrics."""
    with FakeCoordinator(keep=lambda item: item.channel != "metrics") as coordinator:
        connection.send(coordinator.endpoints.to_dict())
        while connection.recv() == "count":
            connection.send(coordinator.counts["metrics"])


def test_cli_round_trip_p99_under_a_metrics_flood() -> None:
    spawn = multiprocessing.get_context("spawn")
    control, child_end = spawn.Pipe()
    coordinator = spawn.Process(target=serve_coordinator, args=(child_end,))
    coordinator.start()
    stop = spawn.Event()
    flooder: BaseProcess | None = None

    def metrics_received() -> int:
        control.send("count")
        count: int = control.recv()
        return count

    try:
        assert control.poll(20), "the coordinator process did not start"
        endpoints = BusEndpoints.from_dict(control.recv())
        flooder = spawn.Process(target=flood_from_threads, args=(endpoints.metrics, FLOODERS, stop))
        flooder.start()
        deadline = time.monotonic() + 20
        while metrics_received() < 5_000:
            assert time.monotonic() < deadline, "the metrics flood never started"
            time.sleep(0.01)
        metrics_before = metrics_received()
        started = time.monotonic()
        with ControlClient(endpoints.cli) as client:
            client.request(StatusRequest(), timeout_s=5)  # connect outside the timing
            round_trips = []
            for _ in range(REQUESTS):
                sent = time.perf_counter()
                client.request(StatusRequest(), timeout_s=5)
                round_trips.append(time.perf_counter() - sent)
        metrics_rate = (metrics_received() - metrics_before) / (time.monotonic() - started)
    finally:
        stop.set()
        control.send("stop")
        for process in (flooder, coordinator):
            if process is not None:
                process.join(10)
                if process.is_alive():
                    process.kill()
                    process.join()
        control.close()
        child_end.close()
    p50 = statistics.median(round_trips)
    p99 = statistics.quantiles(round_trips, n=100)[98]
    print(
        f"\nCLI round trip under {FLOODERS} metrics flooders ({metrics_rate:,.0f} metrics/s"
        f" received): p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms,"
        f" max {max(round_trips) * 1000:.2f} ms"
    )
    assert metrics_rate > 1_000, "the flood stopped: the measurement is meaningless"
    assert p99 < P99_BUDGET_S
