"""Every message that travels on the control bus, declared once.

A message is a frozen dataclass with a ``kind`` class attribute. On the wire
it is one compact UTF-8 JSON object::

    {"v": 3, "kind": "hello", "id": 7, "body": {"pod_id": "pod-1", ...}, "mac": "9f2c..."}

``mac`` signs the message with the fleet's bus secret (see
:mod:`fleetsim.bus.security`): the hex HMAC-SHA256, keyed with the secret,
of the exact bytes of the frame without it (the same JSON object ending at
``body``'s closing brace, then ``}``). It is always the last field, so the
receiver checks it on the bytes it received, before parsing anything else.
:func:`encode` adds it when given a ``secret``; :func:`decode` given a
``secret`` refuses (:class:`Unauthenticated`) a frame whose ``mac`` is
missing or wrong, compared with :func:`hmac.compare_digest`. The secret
itself never travels.

``id`` is the request id: a requester numbers its requests (1, 2, 3, ...)
and every reply (:class:`Ok` or :class:`Error`) carries the id of the
request it answers. Messages that are not requests (metrics, events) use 0.

Who sends what::

    pod → coordinator (control)    Hello, PodHeartbeat         → Ok | Error
    pod → coordinator (metrics)    Metrics                       (no reply)
    coordinator → pod (control)    Ping, Shutdown, SelfKill,
                                   SetStorageFault, ClearStorageFault,
                                   BusPartition, HangNextStep  → Ok | Error
    CLI → coordinator (cli)        Ping, StatusRequest, ChaosRequest,
                                   DownRequest                 → Ok | Error
    coordinator → observers (PUB)  Event

:func:`decode` is strict, because the bus is an attack surface and a
version-skewed peer should fail loudly rather than half-work: the frame size
is capped, the JSON must be a UTF-8 object without duplicate keys or
NaN/Infinity, the version and kind must be known, every body field must be
present with its annotated type, and **unknown envelope or body fields are
rejected** (adding a field is a protocol change: bump ``PROTOCOL_VERSION``).
Every violation raises :class:`~fleetsim.errors.ProtocolError` with a short
reason, and nothing else escapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from fleetsim.errors import ProtocolError

PROTOCOL_VERSION = 3
"""Version of the wire format; both ends must speak the same one (3: signed frames)."""

_MAC_SUFFIX = re.compile(rb',"mac":"([0-9a-f]{64})"\}')
_MAC_SUFFIX_LEN = len(b',"mac":""}') + 64


class Unauthenticated(ProtocolError):
    """A message not signed with this fleet's bus secret."""

MAX_FRAME_SIZE = 64 * 1024
"""Default largest frame :func:`decode` accepts and :func:`encode` produces."""

CHAOS_ACTIONS = (
    "kill",
    "kill-leader",
    "pause",
    "resume",
    "partition",
    "heal",
    "storage-fault",
    "store-restart",
    "hang",
    "run-scenario",
)
"""Actions a :class:`ChaosRequest` may ask for (extend here, in one place)."""


class ErrorCode(StrEnum):
    """Well-known :attr:`Error.code` values (the field itself is a free string)."""

    PROTOCOL = "protocol"
    """The request could not be decoded."""
    UNEXPECTED = "unexpected"
    """A valid message of a kind this endpoint does not accept."""
    UNKNOWN_POD = "unknown-pod"
    """The coordinator has no record of this pod: send Hello again."""
    BAD_REQUEST = "bad-request"
    """A well-formed request that cannot be carried out as asked."""
    UNSUPPORTED = "unsupported"
    """The receiver does not implement this command."""
    UNAUTHORIZED = "unauthorized"
    """The request was not signed with the fleet's bus secret."""
    INTERNAL = "internal"
    """The receiver failed while handling the request."""


@dataclass(frozen=True)
class Message:
    """Base of every bus message.

    ``request_id`` is keyword-only so that subclasses keep their own fields
    positional: ``Shutdown(5.0, request_id=3)``.
    """

    kind: ClassVar[str] = ""
    request_id: int = field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        # Type-check (and normalise int -> float) at construction, so a
        # message that exists is a message that encodes and decodes.
        for name, hint in _field_hints(type(self)).items():
            value = _check_type(getattr(self, name), hint, name)
            object.__setattr__(self, name, value)
        if self.request_id < 0:
            raise ProtocolError("field 'id': must be >= 0")
        self._validate()

    def _validate(self) -> None:
        """Check value ranges; override in messages that have any."""


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise ProtocolError(reason)


def _non_negative(name: str, value: float | None) -> None:
    _require(value is None or value >= 0, f"field {name!r}: must be >= 0")


def _rate(name: str, value: float) -> None:
    _require(0.0 <= value <= 1.0, f"field {name!r}: must be between 0 and 1")


# --- pod -> coordinator ---------------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    """A pod (re)joins the bus; sent on connect and after every reconnect."""

    kind: ClassVar[str] = "hello"
    pod_id: str
    incarnation: int
    pid: int
    host: str

    def _validate(self) -> None:
        _require(bool(self.pod_id), "field 'pod_id': must not be empty")


@dataclass(frozen=True)
class PodHeartbeat(Message):
    """A pod's periodic liveness + status report (bus-level, not the store's)."""

    kind: ClassVar[str] = "pod_heartbeat"
    pod_id: str
    incarnation: int
    state: str
    is_leader: bool
    term: int | None
    claimed: int
    completed: int
    failed: int

    def _validate(self) -> None:
        _require(bool(self.pod_id), "field 'pod_id': must not be empty")


@dataclass(frozen=True)
class Metrics(Message):
    """A pod's metrics snapshot.

    Counters are cumulative totals since the incarnation started (never
    deltas), so dropping or coalescing a snapshot loses nothing: the next one
    carries everything. Gauges are point-in-time values.
    """

    kind: ClassVar[str] = "metrics"
    pod_id: str
    incarnation: int
    counters: dict[str, float]
    gauges: dict[str, float]
    ts: float

    def _validate(self) -> None:
        _require(bool(self.pod_id), "field 'pod_id': must not be empty")


# --- coordinator -> pod commands ---------------------------------------------


@dataclass(frozen=True)
class Ping(Message):
    """Liveness probe; the receiver answers ``Ok``."""

    kind: ClassVar[str] = "ping"


@dataclass(frozen=True)
class Shutdown(Message):
    """Stop gracefully: finish or release claimed steps within ``grace_s``."""

    kind: ClassVar[str] = "shutdown"
    grace_s: float

    def _validate(self) -> None:
        _non_negative("grace_s", self.grace_s)


@dataclass(frozen=True)
class SelfKill(Message):
    """SIGKILL yourself (how a remote pod is killed); usually no reply arrives."""

    kind: ClassVar[str] = "self_kill"


@dataclass(frozen=True)
class SetStorageFault(Message):
    """Degrade this pod's store connections (``duration_s=None``: until cleared)."""

    kind: ClassVar[str] = "set_storage_fault"
    error_rate: float
    latency_ms: float
    disconnect_rate: float
    duration_s: float | None
    reply_loss_rate: float = 0.0

    def _validate(self) -> None:
        _rate("error_rate", self.error_rate)
        _rate("disconnect_rate", self.disconnect_rate)
        _rate("reply_loss_rate", self.reply_loss_rate)
        _non_negative("latency_ms", self.latency_ms)
        _non_negative("duration_s", self.duration_s)


@dataclass(frozen=True)
class ClearStorageFault(Message):
    """Remove any storage fault from this pod."""

    kind: ClassVar[str] = "clear_storage_fault"


@dataclass(frozen=True)
class HangNextStep(Message):
    """Run the hang workload for this pod's next step (``hang_s=None``: an hour)."""

    kind: ClassVar[str] = "hang_next_step"
    hang_s: float | None = None

    def _validate(self) -> None:
        _non_negative("hang_s", self.hang_s)


@dataclass(frozen=True)
class BusPartition(Message):
    """Drop all bus traffic for ``duration_s`` (``None``: until healed locally)."""

    kind: ClassVar[str] = "bus_partition"
    duration_s: float | None
    #: What `fleetsim chaos partition --from bus` asks for without ``--for``
    #: (a pod cut off the bus cannot be told to heal).
    DEFAULT_S: ClassVar[float] = 10.0

    def _validate(self) -> None:
        _non_negative("duration_s", self.duration_s)


# --- CLI -> coordinator ------------------------------------------------------


@dataclass(frozen=True)
class StatusRequest(Message):
    """Ask for the fleet status (``fleetsim status``)."""

    kind: ClassVar[str] = "status_request"


@dataclass(frozen=True)
class ChaosRequest(Message):
    """Apply a fault (``fleetsim chaos ACTION [TARGET]``); see :data:`CHAOS_ACTIONS`."""

    kind: ClassVar[str] = "chaos_request"
    action: str
    target: str | None
    params: dict[str, Any]

    def _validate(self) -> None:
        _require(
            self.action in CHAOS_ACTIONS,
            f"field 'action': unknown chaos action {self.action!r}",
        )


@dataclass(frozen=True)
class DownRequest(Message):
    """Stop the fleet (``fleetsim down``), giving pods ``grace_s`` to finish."""

    kind: ClassVar[str] = "down_request"
    grace_s: float

    def _validate(self) -> None:
        _non_negative("grace_s", self.grace_s)


# --- replies -----------------------------------------------------------------


@dataclass(frozen=True)
class Ok(Message):
    """Success reply; ``data`` is the request-specific result."""

    kind: ClassVar[str] = "ok"
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Error(Message):
    """Failure reply; ``code`` is machine-readable (see :class:`ErrorCode`)."""

    kind: ClassVar[str] = "error"
    code: str
    message: str


# --- events ------------------------------------------------------------------


@dataclass(frozen=True)
class Event(Message):
    """Something happened in the fleet (published on the events channel).

    Topics are dotted, e.g. ``pod.started``, ``pod.died``, ``fault.applied``,
    ``leader.changed``; subscribers filter by topic prefix.
    """

    kind: ClassVar[str] = "event"
    topic: str
    ts: float
    data: dict[str, Any] = field(default_factory=dict)

    def _validate(self) -> None:
        _require(bool(self.topic), "field 'topic': must not be empty")


PodReport = Hello | PodHeartbeat
"""Requests a pod sends on the control channel."""
Command = (Ping | Shutdown | SelfKill | SetStorageFault | ClearStorageFault | BusPartition
           | HangNextStep)
"""Requests the coordinator sends to a pod."""
CliRequest = Ping | StatusRequest | ChaosRequest | DownRequest
"""Requests the CLI sends to the coordinator."""
Reply = Ok | Error
"""The answer to every request: exactly one of these."""

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.kind: cls
    for cls in (
        Hello,
        PodHeartbeat,
        Metrics,
        Ping,
        Shutdown,
        SelfKill,
        SetStorageFault,
        ClearStorageFault,
        BusPartition,
        HangNextStep,
        StatusRequest,
        ChaosRequest,
        DownRequest,
        Ok,
        Error,
        Event,
    )
}
"""Every message class by its ``kind``."""

_ENVELOPE_KEYS = frozenset({"v", "kind", "id", "body"})


def sign(frame: bytes, secret: bytes) -> bytes:
    """``frame`` (an unsigned encoded message) with its ``mac`` field appended."""
    mac = hmac.new(secret, frame, hashlib.sha256).hexdigest().encode()
    return frame[:-1] + b',"mac":"' + mac + b'"}'


def verify(frame: bytes, secret: bytes | None) -> bytes:
    """The unsigned frame inside ``frame``; Unauthenticated if ``secret`` does not sign it.

    With ``secret`` None nothing is checked: a ``mac`` is only stripped.
    """
    match = _MAC_SUFFIX.fullmatch(frame[-_MAC_SUFFIX_LEN:]) if isinstance(frame, bytes) else None
    if match is None:
        if secret is not None:
            raise Unauthenticated("message is not signed with the fleet's bus secret")
        return frame
    unsigned = frame[:-_MAC_SUFFIX_LEN] + b"}"
    if secret is not None:
        expected = hmac.new(secret, unsigned, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(expected, match.group(1)):
            raise Unauthenticated("message is signed with another secret than the fleet's")
    return unsigned


def encode(
    msg: Message, *, max_size: int = MAX_FRAME_SIZE, secret: bytes | None = None
) -> bytes:
    """Serialise ``msg`` to one frame (signed with ``secret`` if given).

    ProtocolError if it is not JSON-safe or too big.
    """
    body = {f.name: getattr(msg, f.name) for f in _body_fields(type(msg))}
    envelope = {"v": PROTOCOL_VERSION, "kind": msg.kind, "id": msg.request_id, "body": body}
    try:
        text = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        frame = text.encode("utf-8")  # fails on lone surrogates
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"cannot encode {msg.kind!r}: {exc}") from exc
    if secret is not None:
        frame = sign(frame, secret)
    if len(frame) > max_size:
        raise ProtocolError(f"{msg.kind!r} message is {len(frame)} bytes, over {max_size}")
    return frame


def decode(
    frame: bytes, *, max_size: int = MAX_FRAME_SIZE, secret: bytes | None = None
) -> Message:
    """Parse and validate one frame; raise ProtocolError (only) if it is not a valid message.

    With ``secret``, a frame it does not sign raises :class:`Unauthenticated`
    (a ProtocolError) before anything in it is parsed.
    """
    _require(isinstance(frame, bytes | bytearray | memoryview), "frame is not bytes")
    _require(len(frame) <= max_size, f"frame of {len(frame)} bytes is over {max_size}")
    envelope = _parse_object(verify(bytes(frame), secret), max_size)
    extra = envelope.keys() - _ENVELOPE_KEYS
    if extra:
        raise ProtocolError(f"unknown envelope field {min(extra)!r}")
    version = envelope.get("v")
    _require(
        type(version) is int and version == PROTOCOL_VERSION,
        f"unsupported protocol version {version!r} (this end speaks {PROTOCOL_VERSION})",
    )
    kind = envelope.get("kind")
    _require(isinstance(kind, str), "missing or non-string 'kind'")
    cls = MESSAGE_TYPES.get(kind)  # type: ignore[arg-type]
    _require(cls is not None, f"unknown message kind {kind!r}")
    assert cls is not None
    request_id = envelope.get("id")
    if type(request_id) is not int:
        raise ProtocolError("missing or non-integer 'id'")
    body = envelope.get("body")
    _require(isinstance(body, dict), "missing or non-object 'body'")
    assert isinstance(body, dict)
    names = {f.name for f in _body_fields(cls)}
    extra = body.keys() - names
    if extra:
        raise ProtocolError(f"{kind}: unknown field {min(extra)!r}")
    missing = names - body.keys()
    if missing:
        raise ProtocolError(f"{kind}: missing field {min(missing)!r}")
    try:
        return cls(**body, request_id=request_id)
    except (TypeError, ValueError) as exc:  # defensive: __post_init__ raises ProtocolError
        raise ProtocolError(f"{kind}: {exc}") from exc


def peek_request_id(frame: bytes, *, max_size: int = MAX_FRAME_SIZE) -> int:
    """Best-effort request id of a frame that may not decode (0 if unknown).

    Lets a receiver address its ``Error`` reply to the request it rejects.
    """
    try:
        request_id = _parse_object(frame, max_size).get("id")
    except ProtocolError:
        return 0
    return request_id if type(request_id) is int and request_id >= 0 else 0


def peek_kind(frame: bytes, *, max_size: int = MAX_FRAME_SIZE) -> str:
    """Best-effort ``kind`` of a frame that may not decode ("" if unknown)."""
    try:
        kind = _parse_object(frame, max_size).get("kind")
    except ProtocolError:
        return ""
    return kind if isinstance(kind, str) else ""


def _parse_object(frame: bytes, max_size: int) -> dict[str, Any]:
    _require(isinstance(frame, bytes | bytearray | memoryview), "frame is not bytes")
    _require(len(frame) <= max_size, f"frame of {len(frame)} bytes is over {max_size}")
    _require(len(frame) > 0, "empty frame")
    try:
        text = bytes(frame).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("frame is not valid UTF-8") from exc
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("frame is not valid JSON") from exc
    _require(isinstance(value, dict), "frame is not a JSON object")
    return value  # type: ignore[no-any-return]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    _require(len(result) == len(pairs), "duplicate key in JSON object")
    return result


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not allowed")


_HINTS: dict[type[Message], dict[str, Any]] = {}


def _body_fields(cls: type[Message]) -> tuple[dataclasses.Field[Any], ...]:
    return tuple(f for f in dataclasses.fields(cls) if f.name != "request_id")


def _field_hints(cls: type[Message]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        resolved = get_type_hints(cls)
        hints = {f.name: resolved[f.name] for f in _body_fields(cls)}
        hints["request_id"] = int
        _HINTS[cls] = hints
    return hints


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "")


def _check_type(value: Any, hint: Any, path: str) -> Any:
    """Return ``value`` (ints widened to float where a float is expected) or raise."""
    checker = _SCALARS.get(hint)
    if checker is not None:
        ok, converted = checker(value)
        if ok:
            return converted
    elif hint is Any:
        return value
    else:
        origin = get_origin(hint)
        args = get_args(hint)
        if origin is types.UnionType or origin is Union:
            for option in args:
                try:
                    return _check_type(value, option, path)
                except ProtocolError:
                    continue
        elif origin is dict and isinstance(value, dict):
            key_hint, value_hint = args
            return {
                _check_type(k, key_hint, f"{path} key"): _check_type(v, value_hint, f"{path}.{k}")
                for k, v in value.items()
            }
        elif origin is list and isinstance(value, list):
            return [_check_type(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    raise ProtocolError(f"field {path!r}: expected {_type_name(hint)}, got {type(value).__name__}")


def _check_float(value: Any) -> tuple[bool, Any]:
    if type(value) not in (int, float):
        return False, None
    try:
        converted = float(value)
    except OverflowError:  # an int beyond float range
        return False, None
    return math.isfinite(converted), converted


_SCALARS: dict[Any, Callable[[Any], tuple[bool, Any]]] = {
    # `type(v) is int` rather than isinstance: a bool is not an int here.
    int: lambda v: (type(v) is int, v),
    bool: lambda v: (type(v) is bool, v),
    # A str subclass (an ErrorCode member) becomes the plain str it stands for.
    str: lambda v: (isinstance(v, str), str(v) if isinstance(v, str) else v),
    float: _check_float,
    type(None): lambda v: (v is None, v),
}


__all__ = [
    "CHAOS_ACTIONS",
    "MAX_FRAME_SIZE",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "BusPartition",
    "ChaosRequest",
    "ClearStorageFault",
    "CliRequest",
    "Command",
    "DownRequest",
    "Error",
    "ErrorCode",
    "Event",
    "HangNextStep",
    "Hello",
    "Message",
    "Metrics",
    "Ok",
    "Ping",
    "PodHeartbeat",
    "PodReport",
    "Reply",
    "SelfKill",
    "SetStorageFault",
    "Shutdown",
    "StatusRequest",
    "Unauthenticated",
    "decode",
    "encode",
    "peek_kind",
    "peek_request_id",
    "sign",
    "verify",
]
