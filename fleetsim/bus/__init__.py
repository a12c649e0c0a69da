"""The ZeroMQ control bus between the coordinator, its pods, the CLI and observers.

- :mod:`~fleetsim.bus.messages` — every message type, ``encode``/``decode``.
- :mod:`~fleetsim.bus.backpressure` — bounded queues with an overflow policy.
- :mod:`~fleetsim.bus.endpoints` — the four endpoints and safe binding.
- :mod:`~fleetsim.bus.security` — CURVE keys and client authentication.
- :mod:`~fleetsim.bus.server` — :class:`CoordinatorBus`, the bound side.
- :mod:`~fleetsim.bus.client` — :class:`PodBusClient`, :class:`ControlClient`,
  :class:`EventSubscriber`, the connecting side.

Create every bus object in the process that uses it (each owns a zmq
context), never before a fork.
"""

from fleetsim.bus.backpressure import BoundedQueue, OverflowPolicy
from fleetsim.bus.client import (
    CommandHandler,
    ControlClient,
    EventSubscriber,
    PodBusClient,
    PodBusStats,
    PodStatus,
    unsupported_command,
)
from fleetsim.bus.endpoints import (
    LOOPBACK_HOST,
    BusEndpoints,
    bind_to_port,
    bind_to_random_port,
    check_bind_host,
    is_loopback,
)
from fleetsim.bus.messages import (
    CHAOS_ACTIONS,
    MAX_FRAME_SIZE,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    BusPartition,
    ChaosRequest,
    ClearStorageFault,
    CliRequest,
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
    PodReport,
    Reply,
    SelfKill,
    SetStorageFault,
    Shutdown,
    StatusRequest,
    decode,
    encode,
    peek_request_id,
)
from fleetsim.bus.security import (
    ClientAuthenticator,
    ClientKeys,
    KeyFiles,
    ServerKeys,
    configure_client_socket,
    configure_server_socket,
    generate_keys,
    key_files,
    load_client_keys,
    load_server_keys,
)
from fleetsim.bus.server import Channel, CoordinatorBus, Inbound

__all__ = [
    "CHAOS_ACTIONS",
    "LOOPBACK_HOST",
    "MAX_FRAME_SIZE",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "BoundedQueue",
    "BusEndpoints",
    "BusPartition",
    "Channel",
    "ChaosRequest",
    "ClearStorageFault",
    "CliRequest",
    "ClientAuthenticator",
    "ClientKeys",
    "Command",
    "CommandHandler",
    "ControlClient",
    "CoordinatorBus",
    "DownRequest",
    "Error",
    "ErrorCode",
    "Event",
    "EventSubscriber",
    "Hello",
    "Inbound",
    "KeyFiles",
    "Message",
    "Metrics",
    "Ok",
    "OverflowPolicy",
    "Ping",
    "PodBusClient",
    "PodBusStats",
    "PodHeartbeat",
    "PodReport",
    "PodStatus",
    "Reply",
    "SelfKill",
    "ServerKeys",
    "SetStorageFault",
    "Shutdown",
    "StatusRequest",
    "bind_to_port",
    "bind_to_random_port",
    "check_bind_host",
    "configure_client_socket",
    "configure_server_socket",
    "decode",
    "encode",
    "generate_keys",
    "is_loopback",
    "key_files",
    "load_client_keys",
    "load_server_keys",
    "peek_request_id",
    "unsupported_command",
]
