"""Where the bus lives: the coordinator's four endpoints, and binding them safely.

The coordinator binds every socket to a free port chosen by the OS and
writes the real endpoints to ``run.json`` (:meth:`BusEndpoints.to_dict`);
pods and the CLI read them back (:meth:`BusEndpoints.from_dict`).

Sockets bind to loopback unless CURVE keys are configured: an
unauthenticated control bus on a routable address would let anyone on the
network kill pods.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, fields

import zmq

from fleetsim.errors import ConfigError

LOOPBACK_HOST = "127.0.0.1"


@dataclass(frozen=True)
class BusEndpoints:
    """The coordinator's bus endpoints, as ``tcp://HOST:PORT`` strings."""

    control: str
    """ROUTER: commands to pods, hello/heartbeats from pods."""
    cli: str
    """ROUTER: one request, one reply, from ``fleetsim`` commands."""
    metrics: str
    """PULL: metrics snapshots pushed by pods."""
    events: str
    """PUB: fleet events for observers."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not value.startswith("tcp://"):
                raise ConfigError(
                    f"bus endpoint {f.name!r} must be a tcp:// address, got {value!r}"
                )

    def to_dict(self) -> dict[str, str]:
        """A JSON-ready mapping (the ``bus`` section of ``run.json``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> BusEndpoints:
        """Read endpoints written by :meth:`to_dict`; ConfigError if any is missing or bad."""
        names = [f.name for f in fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ConfigError(f"bus endpoints are missing {', '.join(missing)}")
        values = {name: data[name] for name in names}
        return cls(**values)  # type: ignore[arg-type]  # __post_init__ checks the types


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal or ``localhost``) only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname or wildcard ("*", "eth0"): assume reachable


def check_bind_host(host: str, *, curve: bool) -> None:
    """Refuse to bind a non-loopback ``host`` without CURVE (ConfigError)."""
    if not curve and not is_loopback(host):
        raise ConfigError(
            f"binding the control bus to {host} requires CURVE keys: run `fleetsim keys generate`"
        )


def bind_to_random_port(
    socket: zmq.Socket[bytes], host: str = LOOPBACK_HOST, *, curve: bool = False
) -> str:
    """Bind ``socket`` to a free TCP port on ``host`` and return the real endpoint.

    ``curve`` says whether the socket is already configured as a CURVE
    server; without it only loopback hosts are allowed.
    """
    return bind_to_port(socket, host, 0, curve=curve)


def bind_to_port(socket: zmq.Socket[bytes], host: str, port: int, *, curve: bool = False) -> str:
    """Bind ``socket`` to ``host:port`` (0: a free port) and return the real endpoint."""
    check_bind_host(host, curve=curve)
    bare = host.strip("[]")
    if ":" in bare:  # an IPv6 literal
        socket.setsockopt(zmq.IPV6, 1)
        address = f"[{bare}]"
    else:
        address = bare
    try:
        socket.bind(f"tcp://{address}:{port or '*'}")
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot bind the bus to {host}:{port or '*'}: {exc}") from exc
    endpoint = socket.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    return endpoint.decode()


__all__ = [
    "LOOPBACK_HOST",
    "BusEndpoints",
    "bind_to_port",
    "bind_to_random_port",
    "check_bind_host",
    "is_loopback",
]
