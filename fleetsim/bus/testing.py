"""A coordinator stand-in for tests of pods, the CLI and the bus itself.

:class:`FakeCoordinator` serves a real :class:`CoordinatorBus` from a
background thread: it acks every pod Hello/PodHeartbeat, answers CLI
requests with a handler, records everything it receives and lets a test
wait for a message with a deadline instead of sleeping.

:class:`CoordinatorUnderFlood` runs a FakeCoordinator in a process of its
own and floods its metrics socket from another on demand, as a fleet does
(``tests/unit/test_bus_priority.py`` and ``scripts/bench_bus.py``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

import zmq

from fleetsim.bus.endpoints import BusEndpoints
from fleetsim.bus.messages import Command, Error, Event, Hello, Metrics, Ok, PodHeartbeat, encode
from fleetsim.bus.server import CoordinatorBus, Inbound
from fleetsim.errors import BusTimeout

CliHandler = Callable[[Inbound], Ok | Error]


def answer_ok(request: Inbound) -> Ok | Error:
    """The default CLI handler: ``Ok({"kind": <request kind>})``."""
    return Ok({"kind": request.message.kind})


class FakeCoordinator:
    """A CoordinatorBus in a thread that acks pods and answers the CLI."""

    def __init__(
        self,
        *,
        cli_handler: CliHandler = answer_ok,
        keep: Callable[[Inbound], bool] = lambda item: True,
        poll_ms: int = 20,
        **bus_options: Any,
    ) -> None:
        """Bind the bus (``bus_options`` go to CoordinatorBus) and start serving it.

        Every message is counted per channel in :attr:`counts`; only those
        ``keep`` accepts are recorded (a metrics flood need not be).
        """
        self.bus = CoordinatorBus(**bus_options)
        self.endpoints = self.bus.endpoints
        self.counts: Counter[str] = Counter()
        self._cli_handler = cli_handler
        self._keep = keep
        self._poll_ms = poll_ms
        self._received: list[Inbound] = []
        self._arrived = threading.Condition()
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-coordinator", daemon=True)
        self._thread.start()

    def __enter__(self) -> FakeCoordinator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def malformed(self) -> int:
        """The bus's malformed-frame counter."""
        return self.bus.malformed

    def received(self) -> list[Inbound]:
        """A copy of everything received so far, in arrival order."""
        with self._arrived:
            return list(self._received)

    def wait_for(
        self, predicate: Callable[[Inbound], bool], timeout_s: float = 5.0, *, after: int = 0
    ) -> Inbound:
        """The first recorded message from index ``after`` on matching ``predicate``.

        Raises BusTimeout if none arrives within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while True:
                for item in self._received[after:]:
                    if predicate(item):
                        return item
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BusTimeout(f"no matching message within {timeout_s:g}s")
                self._arrived.wait(remaining)

    def send_command(self, pod: bytes, command: Command) -> int:
        """Send ``command`` from the serving thread; its request id."""
        result: int = self._call(lambda: self.bus.send_command(pod, command))
        return result

    def publish(self, event: Event) -> None:
        """Publish ``event`` from the serving thread."""
        self._call(lambda: self.bus.publish(event))

    def _call(self, function: Callable[[], Any]) -> Any:
        future: Future[Any] = Future()
        self._calls.put((function, future))
        return future.result(timeout=10)

    def _serve(self) -> None:
        while not self._stop.is_set():
            while not self._calls.empty():
                function, future = self._calls.get()
                try:
                    future.set_result(function())
                except Exception as exc:
                    future.set_exception(exc)
            for item in self.bus.poll(self._poll_ms):
                # Record first, so a test that got the reply also finds the request.
                self.counts[item.channel] += 1
                if self._keep(item):
                    with self._arrived:
                        self._received.append(item)
                        self._arrived.notify_all()
                if item.channel == "cli":
                    self.bus.reply(item, self._cli_handler(item))
                elif isinstance(item.message, Hello | PodHeartbeat):
                    self.bus.reply(item, Ok())

    def close(self) -> None:
        """Stop serving and close the bus."""
        self._stop.set()
        self._thread.join()
        self.bus.close()


def serve_counting_coordinator(connection: Connection) -> None:
    """Process entry point: a FakeCoordinator that sends its endpoints down ``connection``.

    Then it answers each ``"count"`` received with the number of metrics
    taken so far, until anything else arrives.
    """
    with FakeCoordinator(keep=lambda item: item.channel != "metrics") as coordinator:
        connection.send(coordinator.endpoints.to_dict())
        while connection.recv() == "count":
            connection.send(coordinator.counts["metrics"])


def flood_metrics(endpoint: str, senders: int, stop: ProcessEvent) -> None:
    """Process entry point: ``senders`` PUSH sockets (a thread each) flood ``endpoint``.

    Each pushes Metrics as fast as the coordinator takes them, until ``stop``.
    """
    frame = encode(
        Metrics("flood", 1, {f"counter_{i}": float(i) for i in range(10)}, {"rss_mb": 1.0}, 1.0)
    )
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stopping = threading.Event()

    def push_until_stopped() -> None:
        push = context.socket(zmq.PUSH)
        try:
            push.setsockopt(zmq.LINGER, 0)
            push.setsockopt(zmq.SNDTIMEO, 100)  # blocked at the high-water mark: recheck stop
            push.connect(endpoint)
            while not stopping.is_set():
                with contextlib.suppress(zmq.Again):
                    push.send(frame)
        finally:
            push.close(linger=0)

    threads = [threading.Thread(target=push_until_stopped) for _ in range(senders)]
    for thread in threads:
        thread.start()
    stop.wait(3600)
    stopping.set()
    for thread in threads:
        thread.join()
    context.term()


class CoordinatorUnderFlood:
    """A FakeCoordinator in a spawned process, flooded with metrics on demand.

    Use it as a context manager: :attr:`endpoints` reach the coordinator,
    :meth:`start_flood` starts the flooding process, and leaving the block
    stops both (killing a process that does not stop within 10 s).
    """

    def __init__(self, start_timeout_s: float = 20.0) -> None:
        """Start the coordinator process; BusTimeout if it does not answer in time."""
        self._spawn = multiprocessing.get_context("spawn")
        self._control, self._child_end = self._spawn.Pipe()
        self._stop = self._spawn.Event()
        self._flooder: BaseProcess | None = None
        self._coordinator = self._spawn.Process(
            target=serve_counting_coordinator, args=(self._child_end,)
        )
        self._coordinator.start()
        try:
            if not self._control.poll(start_timeout_s):
                raise BusTimeout("the coordinator process did not start")
            self.endpoints = BusEndpoints.from_dict(self._control.recv())
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> CoordinatorUnderFlood:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def metrics_received(self) -> int:
        """How many metrics the coordinator has taken so far."""
        self._control.send("count")
        count: int = self._control.recv()
        return count

    def start_flood(self, senders: int, *, warm_up: int = 5_000, timeout_s: float = 20.0) -> None:
        """Flood from ``senders`` sockets; return once ``warm_up`` metrics have arrived."""
        self._flooder = self._spawn.Process(
            target=flood_metrics, args=(self.endpoints.metrics, senders, self._stop)
        )
        self._flooder.start()
        deadline = time.monotonic() + timeout_s
        while self.metrics_received() < warm_up:
            if time.monotonic() > deadline:
                raise BusTimeout("the metrics flood never started")
            time.sleep(0.01)  # a poll interval

    def close(self) -> None:
        """Stop the flood and the coordinator."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._control.send("stop")
        for process in (self._flooder, self._coordinator):
            if process is not None and process.pid is not None:
                process.join(10)
                if process.is_alive():
                    process.kill()
                    process.join()
        self._control.close()
        self._child_end.close()


__all__ = [
    "CliHandler",
    "CoordinatorUnderFlood",
    "FakeCoordinator",
    "answer_ok",
    "flood_metrics",
    "serve_counting_coordinator",
]
