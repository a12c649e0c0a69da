"""The coordinator's bus thread: owns the bound sockets, answers pods and CLIs.

ZeroMQ sockets are not thread-safe, so one thread owns them all. Other
threads talk to it through thread-safe methods: :meth:`BusService.send_command`
(waits for the pod's reply) and :meth:`BusService.publish`. Requests from the
CLI that take time (chaos actions) run on a small worker pool, so a slow
action never stalls heartbeats or other commands.

Given the fleet's bus ``secret``, the bus accepts only messages signed with
it (CLI requests, pod hellos and heartbeats, metrics); the rest are refused
and counted in :attr:`BusService.refused`.

Its bookkeeping stays bounded over a fleet that runs for weeks: a pod not
heard from for ``forget_after_s`` is forgotten (pods started by hand get a
new id at every restart), and a command whose caller stopped waiting is
dropped from the pending table. A forgotten pod that comes back is refused
once as unknown and says Hello again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fleetsim.bus import (
    ChaosRequest,
    CoordinatorBus,
    DownRequest,
    Error,
    ErrorCode,
    Event,
    Hello,
    Inbound,
    Metrics,
    Ok,
    Ping,
    PodHeartbeat,
    StatusRequest,
)
from fleetsim.bus.endpoints import BusEndpoints
from fleetsim.errors import BusError, BusTimeout, FleetsimError

log = logging.getLogger("fleetsim.bus_service")

ChaosHandler = Callable[[ChaosRequest], dict[str, Any]]
StatusHandler = Callable[[], dict[str, Any]]

#: How often the bus thread sweeps its tables.
_SWEEP_EVERY_S = 0.5

#: How soon a command is sent again to a pod that is between connections.
_RESEND_EVERY_S = 0.05


class BusService(threading.Thread):
    """Runs the coordinator's side of the bus until :meth:`stop`."""

    def __init__(
        self,
        *,
        on_chaos: ChaosHandler,
        on_status: StatusHandler,
        on_down: Callable[[], None],
        host: str = "127.0.0.1",
        keys: Any = None,
        secret: bytes | None = None,
        forget_after_s: float = 600.0,
    ) -> None:
        super().__init__(name="bus", daemon=True)
        self._on_chaos = on_chaos
        self._on_status = on_status
        self._on_down = on_down
        self._host = host
        self._keys = keys
        self._secret = secret
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._outbox: queue.SimpleQueue[Callable[[CoordinatorBus], None]] = queue.SimpleQueue()
        # Sends to try again later (bus thread only): (when, action).
        self._later: list[tuple[float, Callable[[CoordinatorBus], None]]] = []
        # request id -> (the caller's future, when the caller stops waiting)
        self._pending: dict[int, tuple[Future[Ok | Error], float]] = {}
        self._forget_after_s = forget_after_s
        self._seen: dict[str, float] = {}  # pod id -> last message of any kind (monotonic)
        self._lock = threading.Lock()
        self._workers = ThreadPoolExecutor(2, thread_name_prefix="chaos")
        self.endpoints: BusEndpoints | None = None
        self.pods: dict[str, bytes] = {}  # pod id -> routing identity of its latest Hello
        self.heard: dict[str, float] = {}  # pod id -> when we last heard from it (monotonic)
        self.metrics: dict[str, dict[str, Any]] = {}  # pod id -> latest snapshot
        self._bus: CoordinatorBus | None = None  # the sockets, once the thread made them

    # Read from the sockets' own counters, not copied after each poll round:
    # a refusal is answered inside the round, and whoever got the answer
    # must find it counted.
    @property
    def malformed(self) -> int:
        """Frames dropped or refused as not valid for their channel."""
        return self._bus.malformed if self._bus is not None else 0

    @property
    def refused(self) -> int:
        """Messages refused as not signed with the bus secret."""
        return self._bus.refused if self._bus is not None else 0

    def start_and_wait(self, timeout_s: float = 10.0) -> BusEndpoints:
        """Start the thread; return the bound endpoints once listening."""
        self.start()
        if not self._ready.wait(timeout_s) or self.endpoints is None:
            raise BusError(f"the control bus did not start: {self._error}")
        return self.endpoints

    def stop(self) -> None:
        """Stop the thread and close the sockets (LINGER 0: returns promptly)."""
        self._stopping.set()
        self.join(timeout=5.0)
        self._workers.shutdown(wait=False, cancel_futures=True)

    # -- thread-safe API ----------------------------------------------------

    def send_command(self, pod_id: str, command: Any, timeout_s: float = 5.0) -> Ok | Error:
        """Send a command to a pod and wait for its reply.

        A pod between connections (it reconnects after a pause or a partition)
        is sent the command again until ``timeout_s``; only then is it "not
        connected".
        """
        with self._lock:
            identity = self.pods.get(pod_id)
        if identity is None:
            raise BusError(f"{pod_id} is not connected to the control bus")
        future: Future[Ok | Error] = Future()
        give_up_at = time.monotonic() + timeout_s

        def send(bus: CoordinatorBus) -> None:
            if future.done():  # the caller gave up before it was sent
                return
            try:
                request_id = bus.send_command(identity, command)
            except BusError as exc:
                # A pod that is reconnecting (after a pause, say) is briefly not
                # connected, and a paused one is not reading: both may be back
                # within the caller's deadline, so try again until then.
                retry_at = time.monotonic() + _RESEND_EVERY_S
                if retry_at < give_up_at:
                    self._later.append((retry_at, send))
                else:
                    future.set_exception(exc)
                return
            with self._lock:
                self._pending[request_id] = (future, give_up_at)

        self._outbox.put(send)
        try:
            return future.result(timeout=timeout_s)
        except TimeoutError:
            future.cancel()  # the sweep drops it from the pending table
            raise BusTimeout(f"{pod_id} did not answer {command.kind!r} within "
                             f"{timeout_s:g}s") from None

    def connected_pods(self, max_silence_s: float = 5.0) -> list[str]:
        """Pods heard from on the bus within ``max_silence_s``."""
        now = time.monotonic()
        with self._lock:
            return sorted(p for p, t in self.heard.items() if now - t <= max_silence_s)

    def publish(self, topic: str, **data: Any) -> None:
        """Publish an event to every subscriber."""
        event = Event(topic, time.time(), data)
        self._outbox.put(lambda bus: bus.publish(event))

    # -- the thread ---------------------------------------------------------

    def run(self) -> None:
        try:
            bus = CoordinatorBus(self._host, keys=self._keys, secret=self._secret)
        except BaseException as exc:  # reported by start_and_wait
            self._error = exc
            self._ready.set()
            return
        self._bus = bus
        self.endpoints = bus.endpoints
        self._ready.set()
        next_sweep = time.monotonic() + _SWEEP_EVERY_S
        try:
            while not self._stopping.is_set():
                for inbound in bus.poll(50):
                    self._handle(bus, inbound)
                if time.monotonic() >= next_sweep:
                    self._sweep(time.monotonic())
                    next_sweep = time.monotonic() + _SWEEP_EVERY_S
                if self._later:
                    now = time.monotonic()
                    due = [action for when, action in self._later if when <= now]
                    self._later = [(when, a) for when, a in self._later if when > now]
                    for action in due:
                        action(bus)
                while True:
                    try:
                        action = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    action(bus)
        finally:
            bus.close()

    def _sweep(self, now: float) -> None:
        """Forget pods silent for ``forget_after_s`` and requests nobody waits for."""
        with self._lock:
            gone = [p for p, t in self._seen.items() if now - t > self._forget_after_s]
            for pod_id in gone:
                for table in (self._seen, self.pods, self.heard, self.metrics):
                    table.pop(pod_id, None)
            # A reply may still come a little after the caller's deadline; it is
            # then dropped as unmatched, as any late reply is.
            expired = [rid for rid, (future, give_up_at) in self._pending.items()
                       if future.done() or now > give_up_at + 1.0]
            for request_id in expired:
                future, _ = self._pending.pop(request_id)
                future.cancel()
        if gone:
            log.info("forgot %d pod(s) silent for over %gs", len(gone), self._forget_after_s)

    def _handle(self, bus: CoordinatorBus, inbound: Inbound) -> None:
        message = inbound.message
        if isinstance(message, Hello | PodHeartbeat | Metrics):
            with self._lock:
                self._seen[message.pod_id] = time.monotonic()
        if inbound.channel == "metrics":
            if isinstance(message, Metrics):
                self.metrics[message.pod_id] = {
                    "incarnation": message.incarnation, "counters": message.counters,
                    "gauges": message.gauges, "ts": message.ts,
                }
            return
        if inbound.channel == "control":
            if isinstance(message, Hello):
                with self._lock:
                    self.pods[message.pod_id] = inbound.identity
                    self.heard[message.pod_id] = time.monotonic()
                bus.reply(inbound, Ok({}))
            elif isinstance(message, PodHeartbeat):
                with self._lock:
                    known = self.pods.get(message.pod_id) == inbound.identity
                    if known:
                        self.heard[message.pod_id] = time.monotonic()
                bus.reply(inbound, Ok({}) if known else Error(
                    ErrorCode.UNKNOWN_POD, "say hello first"))
            elif isinstance(message, Ok | Error):
                with self._lock:
                    entry = self._pending.pop(message.request_id, None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(message)
            return
        # The CLI channel.
        if isinstance(message, Ping):
            bus.reply(inbound, Ok({"coordinator": True}))
        elif isinstance(message, StatusRequest):
            self._answer_later(inbound, lambda: self._on_status())
        elif isinstance(message, ChaosRequest):
            self._answer_later(inbound, lambda: self._on_chaos(message))
        elif isinstance(message, DownRequest):
            bus.reply(inbound, Ok({"stopping": True}))
            self._on_down()

    def _answer_later(self, inbound: Inbound, work: Callable[[], dict[str, Any]]) -> None:
        def run() -> None:
            reply: Ok | Error
            try:
                reply = Ok(work())
            except FleetsimError as exc:
                reply = Error(ErrorCode.BAD_REQUEST, str(exc))
            except Exception as exc:
                log.exception("request failed")
                reply = Error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            def send(bus: CoordinatorBus) -> None:
                bus.reply(inbound, reply)

            self._outbox.put(send)

        self._workers.submit(run)
