"""The coordinator's end of the bus: four bound sockets behind one poll loop.

=========  ======  ==========================================================
channel    socket  traffic
=========  ======  ==========================================================
control    ROUTER  pods' Hello/PodHeartbeat (answered), commands to pods and
                   their Ok/Error replies
cli        ROUTER  one request, one reply, from ``fleetsim`` commands
                   (DEALER clients, or REQ: the empty delimiter is kept)
metrics    PULL    pods' Metrics snapshots
events     PUB     fleet events
=========  ======  ==========================================================

Each :meth:`CoordinatorBus.poll` drains cli and control first and then at
most ``max_metrics_per_poll`` metrics, so a metrics flood delays a command by
at most one bounded batch. Bad input never raises: an undecodable request is
answered with ``Error(code="protocol")`` when it has a reply address, and
every malformed frame is counted in :attr:`CoordinatorBus.malformed`.

With a ``secret`` (the fleet's bus secret; ``fleetsim up`` always gives
one), every inbound frame must be signed with it: one that is not is
refused before it is parsed, counted in :attr:`CoordinatorBus.refused`, and
answered with ``Error(code="unauthorized")`` when it has a reply address.
Everything the coordinator sends is signed too.

Pods judge the coordinator's liveness by its answers: reply ``Ok`` to every
Hello and PodHeartbeat (or ``Error(code="unknown-pod")`` to a heartbeat from
a pod you have no record of, which makes it say Hello again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import zmq

from fleetsim.bus.endpoints import LOOPBACK_HOST, BusEndpoints, bind_to_port
from fleetsim.bus.messages import (
    MAX_FRAME_SIZE,
    ChaosRequest,
    Command,
    DownRequest,
    Error,
    ErrorCode,
    Event,
    Hello,
    Message,
    Metrics,
    Ok,
    Ping,
    PodHeartbeat,
    StatusRequest,
    Unauthenticated,
    decode,
    encode,
    peek_kind,
    peek_request_id,
)
from fleetsim.bus.security import ClientAuthenticator, ServerKeys, configure_server_socket
from fleetsim.errors import BusError, ProtocolError

log = logging.getLogger(__name__)

Channel = Literal["control", "cli", "metrics"]

# What each inbound channel accepts; anything else is answered "unexpected".
_ACCEPTS: dict[Channel, tuple[type[Message], ...]] = {
    "control": (Hello, PodHeartbeat, Ok, Error),
    "cli": (Ping, StatusRequest, ChaosRequest, DownRequest),
    "metrics": (Metrics,),
}
_REPLIES = (Ok, Error)


@dataclass(frozen=True)
class Inbound:
    """One decoded message the coordinator received.

    ``route`` holds the routing frames needed to answer it (empty for
    metrics); pass the whole Inbound to :meth:`CoordinatorBus.reply`.
    """

    channel: Channel
    message: Message
    route: tuple[bytes, ...] = ()

    @property
    def identity(self) -> bytes:
        """The sender's routing identity (for a pod: what ``send_command`` takes)."""
        return self.route[0] if self.route else b""


class CoordinatorBus:
    """The coordinator's bound bus sockets (not thread-safe: use from one thread).

    The zmq context is created here, so construct this in the process that
    uses it, after any fork or spawn.
    """

    def __init__(
        self,
        host: str = LOOPBACK_HOST,
        *,
        keys: ServerKeys | None = None,
        ports: Mapping[str, int] | None = None,
        max_requests_per_poll: int = 256,
        max_metrics_per_poll: int = 64,
        max_frame_size: int = MAX_FRAME_SIZE,
        receive_hwm: int = 1000,
        secret: bytes | None = None,
    ) -> None:
        """Bind all four sockets on ``host`` (free ports unless ``ports`` names some).

        A non-loopback ``host`` requires ``keys`` (ConfigError otherwise).
        With ``secret``, only frames signed with it are accepted.
        """
        self._secret = secret
        self.refused = 0
        """Frames refused because they were not signed with the bus secret."""
        self.max_requests_per_poll = max_requests_per_poll
        self.max_metrics_per_poll = max_metrics_per_poll
        self.max_frame_size = max_frame_size
        self.malformed = 0
        """Frames dropped or refused because they were not valid for their channel."""
        self.unroutable = 0
        """Replies dropped because their peer had gone or was not reading."""
        self.received = 0
        """Valid messages received on all channels."""
        self._command_ids = itertools.count(1)
        self._closed = False
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._authenticator: ClientAuthenticator | None = None
        self._sockets: list[zmq.Socket[bytes]] = []
        try:
            if keys is not None:
                self._authenticator = ClientAuthenticator(self._context, keys)
                self._authenticator.start()
            self._control = self._socket(zmq.ROUTER, keys, receive_hwm)
            self._control.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # A reconnecting pod reuses its identity; let the new pipe take over.
            self._control.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._cli = self._socket(zmq.ROUTER, keys, receive_hwm)
            self._cli.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._metrics = self._socket(zmq.PULL, keys, receive_hwm)
            self._events = self._socket(zmq.PUB, keys, receive_hwm)
            wanted = dict(ports or {})
            curve = keys is not None
            self.endpoints = BusEndpoints(
                control=bind_to_port(self._control, host, wanted.get("control", 0), curve=curve),
                cli=bind_to_port(self._cli, host, wanted.get("cli", 0), curve=curve),
                metrics=bind_to_port(self._metrics, host, wanted.get("metrics", 0), curve=curve),
                events=bind_to_port(self._events, host, wanted.get("events", 0), curve=curve),
            )
        except BaseException:
            self.close()
            raise
        self._poller = zmq.Poller()
        for socket in (self._cli, self._control, self._metrics):
            self._poller.register(socket, zmq.POLLIN)

    def _socket(self, kind: int, keys: ServerKeys | None, hwm: int) -> zmq.Socket[bytes]:
        socket: zmq.Socket[bytes] = self._context.socket(kind)
        self._sockets.append(socket)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, hwm)
        # libzmq drops a peer that sends a bigger frame before we ever see it.
        socket.setsockopt(zmq.MAXMSGSIZE, self.max_frame_size)
        if keys is not None:
            configure_server_socket(socket, keys)
        return socket

    def __enter__(self) -> CoordinatorBus:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- inbound ---------------------------------------------------------------

    def poll(self, timeout_ms: int = 0) -> list[Inbound]:
        """Wait up to ``timeout_ms`` for traffic and return what arrived, requests first.

        Never raises on bad input: malformed frames are counted and dropped
        (or answered with an Error when the sender can be answered).
        """
        if self._closed:
            raise BusError("the coordinator bus is closed")
        ready = dict(self._poller.poll(timeout_ms))
        inbound: list[Inbound] = []
        if self._cli in ready:
            self._drain(self._cli, "cli", self.max_requests_per_poll, inbound)
        if self._control in ready:
            self._drain(self._control, "control", self.max_requests_per_poll, inbound)
        if self._metrics in ready:
            self._drain(self._metrics, "metrics", self.max_metrics_per_poll, inbound)
        return inbound

    def _drain(
        self, socket: zmq.Socket[bytes], channel: Channel, limit: int, out: list[Inbound]
    ) -> None:
        for _ in range(limit):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            item = self._accept(channel, frames)
            if item is not None:
                self.received += 1
                out.append(item)

    def _accept(self, channel: Channel, frames: list[bytes]) -> Inbound | None:
        route, payload = _split_route(channel, frames)
        if payload is None:
            self.malformed += 1
            return None
        try:
            message = decode(payload, max_size=self.max_frame_size, secret=self._secret)
        except Unauthenticated as exc:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("refused %d unsigned %s message(s): %s", self.refused, channel, exc)
            # Never answer a reply: two ends with different secrets would
            # refuse each other's refusals for ever.
            if route and peek_kind(payload) not in (Ok.kind, Error.kind):
                self._send_reply(
                    channel,
                    route,
                    Error(ErrorCode.UNAUTHORIZED, f"refused: {exc}",
                          request_id=peek_request_id(payload)),
                )
            return None
        except ProtocolError as exc:
            self.malformed += 1
            log.debug("malformed %s frame: %s", channel, exc)
            if route:
                self._send_reply(
                    channel,
                    route,
                    Error(ErrorCode.PROTOCOL, str(exc), request_id=peek_request_id(payload)),
                )
            return None
        if not isinstance(message, _ACCEPTS[channel]):
            self.malformed += 1
            if route and not isinstance(message, _REPLIES):
                self._send_reply(
                    channel,
                    route,
                    Error(
                        ErrorCode.UNEXPECTED,
                        f"{message.kind!r} is not accepted on the {channel} channel",
                        request_id=message.request_id,
                    ),
                )
            return None
        return Inbound(channel, message, route)

    # --- outbound --------------------------------------------------------------

    def reply(self, request: Inbound, reply: Ok | Error) -> bool:
        """Answer ``request`` (its request id is copied in); False if its sender is gone."""
        if not request.route:
            raise BusError(f"a {request.channel} message cannot be answered")
        reply = dataclasses.replace(reply, request_id=request.message.request_id)
        return self._send_reply(request.channel, request.route, reply)

    def _send_reply(self, channel: Channel, route: tuple[bytes, ...], reply: Message) -> bool:
        socket = self._cli if channel == "cli" else self._control
        try:
            socket.send_multipart([*route, encode(reply, secret=self._secret)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN (not reading)
            self.unroutable += 1
            log.debug("reply to %r dropped: %s", route[0], exc)
            return False
        return True

    def send_command(self, pod: bytes, command: Command) -> int:
        """Send ``command`` to the pod with routing identity ``pod``; return its request id.

        The pod's Ok/Error comes back through :meth:`poll` with that id.
        Raises BusError if the pod is not connected or not reading.
        """
        request_id = next(self._command_ids)
        frame = encode(dataclasses.replace(command, request_id=request_id), secret=self._secret)
        try:
            self._control.send_multipart([pod, frame], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            reason = (
                "is not reading its commands" if exc.errno == zmq.EAGAIN else "is not connected"
            )
            raise BusError(f"pod {pod.decode(errors='replace')!r} {reason}") from exc
        return request_id

    def publish(self, event: Event) -> None:
        """Publish ``event`` to subscribers of its topic (never blocks; slow ones lose it)."""
        with contextlib.suppress(zmq.Again):
            self._events.send_multipart(
                [event.topic.encode(), encode(event, secret=self._secret)], zmq.NOBLOCK
            )

    def close(self) -> None:
        """Close every socket at once (pending messages are discarded) and the context."""
        if self._closed:
            return
        self._closed = True
        for socket in self._sockets:
            socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
        self._context.term()


def _split_route(channel: Channel, frames: list[bytes]) -> tuple[tuple[bytes, ...], bytes | None]:
    """Split ROUTER frames into (route, payload); payload None if the shape is wrong."""
    if channel == "metrics":
        return (), frames[0] if len(frames) == 1 else None
    # ROUTER prepends the identity; a DEALER sends [payload], a REQ [b"", payload].
    if len(frames) == 2:
        return (frames[0],), frames[1]
    if len(frames) == 3 and channel == "cli" and frames[1] == b"":
        return (frames[0], b""), frames[2]
    return (), None


__all__ = ["Channel", "CoordinatorBus", "Inbound"]
