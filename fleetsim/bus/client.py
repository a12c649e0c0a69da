"""The connecting ends of the bus: a pod's client, the CLI's client, an event observer.

:class:`PodBusClient` — a pod's DEALER (control) and PUSH (metrics), run by
one background thread so the pod's own threads never touch a zmq socket and
never block on the bus. Liveness follows the Paranoid Pirate pattern: the
pod sends a heartbeat every interval and the coordinator acks each one; if
nothing is heard for ``liveness`` intervals the DEALER is thrown away and
reconnected (with a growing silence window), and a Hello re-registers the
pod. Meanwhile the pod keeps working: the data plane does not depend on the
bus. Metrics go through a coalescing :class:`BoundedQueue` (latest snapshot
wins) and a PUSH socket with a small high-water mark and non-blocking sends,
so a slow coordinator costs dropped snapshots, never a stalled pod.

:class:`ControlClient` — the CLI's one-request-one-reply client (Lazy
Pirate): a DEALER, a deadline, and on timeout the socket is closed (linger 0)
and recreated on the next request, so a late reply can never be mistaken for
the answer to a later request.

:class:`EventSubscriber` — a SUB socket for observers of fleet events.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import socket as socket_module
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import zmq

from fleetsim.bus.backpressure import BoundedQueue, OverflowPolicy
from fleetsim.bus.endpoints import BusEndpoints
from fleetsim.bus.messages import (
    BusPartition,
    ChaosRequest,
    ClearStorageFault,
    DownRequest,
    Error,
    ErrorCode,
    Event,
    HangNextStep,
    Hello,
    Message,
    Metrics,
    Ok,
    Ping,
    PodHeartbeat,
    SelfKill,
    SetStorageFault,
    Shutdown,
    StatusRequest,
    Unauthenticated,
    decode,
    encode,
)
from fleetsim.bus.security import ClientKeys, configure_client_socket
from fleetsim.errors import BusError, BusTimeout, ProtocolError

log = logging.getLogger(__name__)

CommandHandler = Callable[
    [Shutdown | SelfKill | SetStorageFault | ClearStorageFault | HangNextStep], Ok | Error]
"""Handles a pod command in the bus thread; must return quickly (set a flag, hand over)."""

_COMMANDS = (Shutdown, SelfKill, SetStorageFault, ClearStorageFault, HangNextStep)
_REPLIES = (Ok, Error)


def unsupported_command(command: Message) -> Ok | Error:
    """The default :data:`CommandHandler`: refuse everything."""
    return Error(ErrorCode.UNSUPPORTED, f"this pod does not handle {command.kind!r}")


@dataclass(frozen=True)
class PodStatus:
    """What a pod's heartbeats report; set it with :meth:`PodBusClient.update_status`."""

    state: str = "starting"
    is_leader: bool = False
    term: int | None = None
    claimed: int = 0
    completed: int = 0
    failed: int = 0


@dataclass
class PodBusStats:
    """Counters kept by a :class:`PodBusClient` (read them from any thread)."""

    reconnects: int = 0
    heartbeats_sent: int = 0
    commands_handled: int = 0
    metrics_sent: int = 0
    metrics_dropped: int = 0
    """Snapshots lost to a full PUSH pipe (the coalescing queue counts its own)."""
    malformed: int = 0
    refused: int = 0
    """Inbound frames not signed with the bus secret (dropped unanswered)."""
    control_dropped: int = 0
    """Control messages not sent because the DEALER's queue was full."""


class PodBusClient:
    """A pod's connection to the coordinator, run by one background thread.

    Create it in the pod process (it owns a zmq context), ``start()`` it,
    feed it status and metrics from any thread, ``close()`` it on the way out.
    """

    def __init__(
        self,
        endpoints: BusEndpoints,
        pod_id: str,
        incarnation: int,
        *,
        handler: CommandHandler = unsupported_command,
        keys: ClientKeys | None = None,
        heartbeat_interval_s: float = 1.0,
        liveness: int = 3,
        max_silence_s: float = 30.0,
        metrics_hwm: int = 4,
        host: str | None = None,
        pid: int | None = None,
        secret: bytes | None = None,
    ) -> None:
        """Prepare the client; no socket is opened until :meth:`start`.

        With ``secret`` (the fleet's bus secret) everything sent is signed and
        commands not signed with it are refused.

        ``liveness`` heartbeat intervals without hearing from the coordinator
        trigger a reconnect; each further silent reconnect doubles the window,
        up to ``max_silence_s``.
        """
        if heartbeat_interval_s <= 0 or liveness < 1:
            raise ValueError("heartbeat_interval_s must be > 0 and liveness >= 1")
        self.endpoints = endpoints
        self.pod_id = pod_id
        self.incarnation = incarnation
        self.identity = f"{pod_id}/{incarnation}".encode()
        """The DEALER's routing identity: what the coordinator's send_command takes."""
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.max_silence_s = max(max_silence_s, heartbeat_interval_s * liveness)
        self.stats = PodBusStats()
        self._handler = handler
        self._keys = keys
        self._secret = secret
        self._metrics_hwm = metrics_hwm
        self._host = host if host is not None else socket_module.gethostname()
        self._pid = pid if pid is not None else os.getpid()
        self._status = PodStatus()
        self._lock = threading.Lock()
        self._partition_until: float | None = None
        self._rejoin = threading.Event()  # set by heal(): say Hello again
        self._metrics: BoundedQueue[Metrics] = BoundedQueue(
            4, OverflowPolicy.COALESCE, key=lambda m: (m.pod_id, m.incarnation)
        )
        self._request_ids = itertools.count(1)
        self._heard_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._closed = False

    # --- API for the pod's threads -----------------------------------------------

    def start(self) -> None:
        """Connect and start the background thread (idempotent)."""
        if self._closed:
            raise BusError("the pod bus client is closed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"bus-{self.pod_id}", daemon=True
            )
            self._thread.start()

    def __enter__(self) -> PodBusClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def update_status(self, status: PodStatus) -> None:
        """Report ``status`` in the next heartbeats."""
        self._status = status  # one reference swap: atomic

    def send_metrics(
        self,
        counters: Mapping[str, float],
        gauges: Mapping[str, float],
        ts: float | None = None,
    ) -> None:
        """Queue a metrics snapshot (counters cumulative); replaces any unsent one. Never blocks."""
        snapshot = Metrics(
            self.pod_id,
            self.incarnation,
            dict(counters),
            dict(gauges),
            time.time() if ts is None else ts,
        )
        self._metrics.put(snapshot)

    @property
    def metrics_coalesced(self) -> int:
        """Snapshots replaced by a newer one before they could be sent."""
        return self._metrics.coalesced

    @property
    def connected(self) -> bool:
        """Whether the coordinator was heard from within the liveness window."""
        heard_at = self._heard_at
        window = self.heartbeat_interval_s * self.liveness
        return heard_at is not None and time.monotonic() - heard_at < window

    def partition(self, duration_s: float | None) -> None:
        """Drop all bus traffic, both ways, for ``duration_s`` (None: until :meth:`heal`)."""
        until = math.inf if duration_s is None else time.monotonic() + duration_s
        with self._lock:
            self._partition_until = until

    def heal(self) -> None:
        """End a bus partition now."""
        with self._lock:
            was_partitioned = self._partition_until is not None
            self._partition_until = None
        if was_partitioned:
            self._rejoin.set()

    @property
    def partitioned(self) -> bool:
        """Whether a bus partition is in force."""
        return self._partitioned(time.monotonic())

    def _partitioned(self, now: float) -> bool:
        with self._lock:
            until = self._partition_until
            if until is None:
                return False
            if now < until:
                return True
        self.heal()
        return False

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread, discard anything unsent and release the context."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                # A command handler is stuck; terminating would hang on its sockets.
                log.warning("bus thread of %s did not stop; leaving its context open", self.pod_id)
                return
        self._context.term()

    # --- the bus thread ------------------------------------------------------------

    def _run(self) -> None:
        push: zmq.Socket[bytes] | None = None
        control: zmq.Socket[bytes] | None = None
        try:
            push = self._new_socket(zmq.PUSH)
            push.setsockopt(zmq.SNDHWM, self._metrics_hwm)
            push.connect(self.endpoints.metrics)
            control = self._connect_control()
            poller = zmq.Poller()
            poller.register(control, zmq.POLLIN)
            silence_limit = self.heartbeat_interval_s * self.liveness
            last_heard = time.monotonic()
            next_heartbeat = last_heard + self.heartbeat_interval_s
            # Wake often enough to flush metrics and notice close() promptly.
            tick_s = min(0.05, self.heartbeat_interval_s)
            now = last_heard
            while not self._stop.is_set():
                before = now  # the end of the previous round
                ready = dict(poller.poll(_ms(min(next_heartbeat - time.monotonic(), tick_s))))
                now = time.monotonic()
                if now - before > silence_limit:
                    # This process was stopped (SIGSTOP, a frozen container),
                    # not the coordinator silent: what it sent meanwhile may
                    # still be on its way in. Reconnecting now would drop it
                    # with the socket; give the coordinator a fresh window.
                    last_heard = now
                partitioned = self._partitioned(now)
                if control in ready and self._receive(control, deaf=partitioned):
                    last_heard = now
                    silence_limit = self.heartbeat_interval_s * self.liveness
                if partitioned:
                    last_heard, next_heartbeat = now, now  # no reconnect while deaf
                    continue
                if self._rejoin.is_set():
                    self._rejoin.clear()
                    self._send(control, Hello(self.pod_id, self.incarnation, self._pid, self._host))
                self._flush_metrics(push)
                if now >= next_heartbeat:
                    self._send_heartbeat(control)
                    next_heartbeat = now + self.heartbeat_interval_s
                if now - last_heard > silence_limit:
                    log.info("no word from the coordinator in %.1fs: reconnecting", silence_limit)
                    poller.unregister(control)
                    control.close(linger=0)
                    control = self._connect_control()
                    poller.register(control, zmq.POLLIN)
                    self.stats.reconnects += 1
                    last_heard = now
                    silence_limit = min(silence_limit * 2, self.max_silence_s)
        except Exception:  # never take the pod down with the bus
            log.exception("bus thread of %s failed", self.pod_id)
        finally:
            for socket in (control, push):
                if socket is not None:
                    socket.close(linger=0)

    def _new_socket(self, kind: int) -> zmq.Socket[bytes]:
        socket: zmq.Socket[bytes] = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            configure_client_socket(socket, self._keys)
        return socket

    def _connect_control(self) -> zmq.Socket[bytes]:
        control = self._new_socket(zmq.DEALER)
        control.setsockopt(zmq.ROUTING_ID, self.identity)
        control.setsockopt(zmq.SNDHWM, 100)
        control.connect(self.endpoints.control)
        # Queued until the connection is up, so the coordinator hears it first.
        self._send(control, Hello(self.pod_id, self.incarnation, self._pid, self._host))
        return control

    def _send(self, control: zmq.Socket[bytes], message: Message) -> None:
        if message.request_id == 0 and not isinstance(message, _REPLIES):
            message = dataclasses.replace(message, request_id=next(self._request_ids))
        try:
            control.send(encode(message, secret=self._secret), zmq.NOBLOCK)
        except zmq.Again:
            self.stats.control_dropped += 1

    def _send_heartbeat(self, control: zmq.Socket[bytes]) -> None:
        status = self._status
        self._send(
            control,
            PodHeartbeat(
                self.pod_id,
                self.incarnation,
                status.state,
                status.is_leader,
                status.term,
                status.claimed,
                status.completed,
                status.failed,
            ),
        )
        self.stats.heartbeats_sent += 1

    def _flush_metrics(self, push: zmq.Socket[bytes]) -> None:
        for snapshot in self._metrics.drain():
            try:
                push.send(encode(snapshot, secret=self._secret), zmq.NOBLOCK)
            except zmq.Again:  # the coordinator is behind: the next snapshot supersedes this
                self.stats.metrics_dropped += 1
            else:
                self.stats.metrics_sent += 1

    def _receive(self, control: zmq.Socket[bytes], *, deaf: bool) -> bool:
        """Read everything pending; True if the coordinator was heard."""
        heard = False
        while True:
            try:
                frames = control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return heard
            if deaf:
                continue
            if len(frames) != 1:
                self.stats.malformed += 1
                continue
            try:
                message = decode(frames[0], secret=self._secret)
            except Unauthenticated as exc:
                # Not our coordinator (or another fleet's): not even a sign of life.
                self.stats.refused += 1
                if self.stats.refused == 1:
                    log.warning("refused a control message: %s", exc)
                continue
            except ProtocolError as exc:
                self.stats.malformed += 1
                log.debug("malformed control frame: %s", exc)
                continue
            heard = True
            self._heard_at = time.monotonic()
            self._dispatch(control, message)

    def _dispatch(self, control: zmq.Socket[bytes], message: Message) -> None:
        if isinstance(message, Error) and message.code == ErrorCode.UNKNOWN_POD:
            self._send(control, Hello(self.pod_id, self.incarnation, self._pid, self._host))
            return
        if isinstance(message, _REPLIES):
            return  # an ack of a hello or heartbeat: hearing it was the point
        reply: Ok | Error
        if isinstance(message, Ping):
            reply = Ok({"pod_id": self.pod_id, "incarnation": self.incarnation})
        elif isinstance(message, BusPartition):
            reply = Ok({})
        elif isinstance(message, _COMMANDS):
            self.stats.commands_handled += 1
            try:
                reply = self._handler(message)
            except Exception as exc:
                log.exception("command %r failed", message.kind)
                reply = Error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            if not isinstance(reply, _REPLIES):
                reply = Error(ErrorCode.INTERNAL, f"the {message.kind!r} handler gave no reply")
        else:
            reply = Error(ErrorCode.UNEXPECTED, f"a pod does not accept {message.kind!r}")
        self._send(control, dataclasses.replace(reply, request_id=message.request_id))
        if isinstance(message, BusPartition):
            self.partition(message.duration_s)  # after the Ok, so the coordinator knows


def _ms(seconds: float) -> int:
    """A poll timeout in whole milliseconds, rounded up so a wait is never cut short."""
    return max(0, math.ceil(seconds * 1000))


class ControlClient:
    """The CLI's request/reply client for the coordinator's cli endpoint.

    One request at a time; not thread-safe. Requests are not retried,
    because chaos actions are not idempotent: a timeout is reported.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        keys: ClientKeys | None = None,
        timeout_s: float = 5.0,
        secret: bytes | None = None,
    ) -> None:
        """Prepare a client of ``endpoint`` (a BusEndpoints.cli string); connects lazily.

        With ``secret`` (the fleet's bus secret) requests are signed and only
        signed replies are believed (an unsigned refusal is passed on as is).
        """
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._keys = keys
        self._secret = secret
        self._request_ids = itertools.count(1)
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None
        self._closed = False

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(
        self,
        message: Ping | StatusRequest | ChaosRequest | DownRequest,
        timeout_s: float | None = None,
    ) -> Ok | Error:
        """Send ``message`` and return the coordinator's Ok or Error.

        Raises BusTimeout if no reply arrives within ``timeout_s`` (default:
        the client's), ProtocolError if the reply is not a valid reply.
        """
        if self._closed:
            raise BusError("the control client is closed")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request_id = next(self._request_ids)
        socket = self._connected_socket()
        frame = encode(dataclasses.replace(message, request_id=request_id), secret=self._secret)
        deadline = time.monotonic() + timeout
        # The send waits for a connection to queue on, within the same
        # deadline: a DEALER has none while its peer is away or refused its
        # CURVE handshake, and says so with EAGAIN, not with a timeout.
        while True:
            try:
                socket.send(frame, zmq.NOBLOCK)
                break
            except zmq.Again:
                if not self._wait(socket, zmq.POLLOUT, deadline):
                    raise self._no_reply(timeout) from None
        while True:
            if not self._wait(socket, zmq.POLLIN, deadline):
                raise self._no_reply(timeout)
            frames = socket.recv_multipart()
            if len(frames) != 1:
                continue
            try:
                reply = self._decode_reply(frames[0])
                if not isinstance(reply, _REPLIES):
                    raise ProtocolError(f"the coordinator answered {reply.kind!r}, not a reply")
            except ProtocolError:
                self._reset()
                raise
            # An Error with id 0 answers a request the coordinator could not parse.
            if reply.request_id == request_id or (
                isinstance(reply, Error) and reply.request_id == 0
            ):
                return reply

    def _decode_reply(self, frame: bytes) -> Message:
        try:
            return decode(frame, secret=self._secret)
        except Unauthenticated:
            # A coordinator with another secret can only tell us it refused:
            # believing that much is harmless, and says what went wrong.
            reply = decode(frame)
            if isinstance(reply, Error) and reply.code == ErrorCode.UNAUTHORIZED:
                return reply
            raise ProtocolError(
                "the coordinator's reply is not signed with this client's bus secret"
                " (is the secret file this fleet's?)"
            ) from None

    @staticmethod
    def _wait(socket: zmq.Socket[bytes], event: int, deadline: float) -> bool:
        """Whether ``socket`` is ready for ``event`` before ``deadline``."""
        remaining = deadline - time.monotonic()
        return remaining > 0 and bool(socket.poll(_ms(remaining), event))

    def _no_reply(self, timeout: float) -> BusTimeout:
        self._reset()
        return BusTimeout(f"no reply from the coordinator at {self.endpoint} within {timeout:g}s"
                          " — is `fleetsim up` running?")

    def _connected_socket(self) -> zmq.Socket[bytes]:
        if self._socket is None:
            socket: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
            socket.setsockopt(zmq.LINGER, 0)
            if self._keys is not None:
                configure_client_socket(socket, self._keys)
            socket.connect(self.endpoint)
            self._socket = socket
        return self._socket

    def _reset(self) -> None:
        # Lazy Pirate: drop the socket with its queued request and any late reply.
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        """Close the socket (dropping anything pending) and the context."""
        if not self._closed:
            self._closed = True
            self._reset()
            self._context.term()


class EventSubscriber:
    """Receives fleet events whose topic starts with one of ``topics`` ("" = all).

    PUB/SUB is lossy by design: events published before the subscription
    reached the coordinator, or while this subscriber lagged, are missed.
    """

    def __init__(
        self,
        endpoint: str,
        topics: Iterable[str] = ("",),
        *,
        keys: ClientKeys | None = None,
        secret: bytes | None = None,
    ) -> None:
        """Connect to ``endpoint`` (a BusEndpoints.events string) and subscribe.

        With ``secret``, events not signed with it are dropped (and counted
        in :attr:`malformed`).
        """
        self.endpoint = endpoint
        self.malformed = 0
        self._secret = secret
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket: zmq.Socket[bytes] = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            configure_client_socket(self._socket, keys)
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._socket.connect(endpoint)
        self._closed = False

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def receive(self, timeout_s: float) -> Event | None:
        """The next event, or None if none arrives within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._socket.poll(_ms(remaining), zmq.POLLIN):
                return None
            frames = self._socket.recv_multipart()
            try:
                event = decode(frames[-1], secret=self._secret) if len(frames) == 2 else None
            except ProtocolError:
                event = None
            if isinstance(event, Event):
                return event
            self.malformed += 1

    def close(self) -> None:
        """Close the socket and the context."""
        if not self._closed:
            self._closed = True
            self._socket.close(linger=0)
            self._context.term()


__all__ = [
    "CommandHandler",
    "ControlClient",
    "EventSubscriber",
    "PodBusClient",
    "PodBusStats",
    "PodStatus",
    "unsupported_command",
]
