"""A coordinator stand-in for tests of pods, the CLI and the bus itself.

:class:`FakeCoordinator` serves a real :class:`CoordinatorBus` from a
background thread: it acks every pod Hello/PodHeartbeat, answers CLI
requests with a handler, records everything it receives and lets a test
wait for a message with a deadline instead of sleeping.

:func:`flood_metrics` and :func:`serve_counting_coordinator` are process
entry points for a metrics flood against a coordinator in another process
(``tests/unit/test_bus_priority.py`` and ``scripts/bench_bus.py``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any

import zmq

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


__all__ = [
    "CliHandler",
    "FakeCoordinator",
    "answer_ok",
    "flood_metrics",
    "serve_counting_coordinator",
]
