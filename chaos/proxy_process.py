"""The fault proxies as a process of their own.

Pods reach the store through their proxies, so the proxies are in the data
path; they live in this separate process (not in the coordinator) so that the
fleet keeps working if the coordinator dies. The coordinator drives it over a
loopback ZeroMQ REQ/REP socket with small JSON requests::

    {"op": "add", "name": "pod-1", "host": "127.0.0.1", "port": 5432} -> {"ok": true, "port": 40123}
    {"op": "set_fault", "name": "pod-1", "mode": "blackhole"}           -> {"ok": true}
    {"op": "heal", "name": "pod-1"}  (name null: all)                    -> {"ok": true}
    {"op": "stats"}                                   -> {"ok": true, "stats": {...}}
    {"op": "shutdown"}                                                   -> {"ok": true}

A malformed request gets ``{"ok": false, "error": "..."}``; nothing crashes
the process.

Run: ``python -m chaos.proxy_process --ready-file PATH`` (it writes its
control endpoint and pid there once listening).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import zmq

from chaos.proxy import FaultProxyServer, ProxyFault
from fleetsim.errors import BusTimeout, ConfigError, FleetsimError

log = logging.getLogger("fleetsim.proxy")
_MAX_REQUEST = 4096


def handle(server: FaultProxyServer, raw: bytes) -> dict[str, Any]:
    """Apply one control request; always return a reply document."""
    try:
        if len(raw) > _MAX_REQUEST:
            raise ConfigError("request too large")
        request = json.loads(raw)
        if not isinstance(request, dict):
            raise ConfigError("request must be a JSON object")
        op = request.get("op")
        if op == "add":
            name, host, port = request["name"], request["host"], request["port"]
            if not (isinstance(name, str) and isinstance(host, str) and isinstance(port, int)):
                raise ConfigError("add needs name (str), host (str), port (int)")
            if name in server.names():
                return {"ok": True, "port": server.port(name)}
            return {"ok": True, "port": server.add(name, host, port)}
        if op == "set_fault":
            fault = ProxyFault(
                mode=request.get("mode", "pass"),
                latency_ms=float(request.get("latency_ms", 0.0)),
                jitter_ms=float(request.get("jitter_ms", 0.0)),
                bandwidth_kbps=float(request.get("bandwidth_kbps", 0.0)),
            )
            server.set_fault(str(request["name"]), fault)
            return {"ok": True}
        if op == "heal":
            name = request.get("name")
            server.heal(None if name is None else str(name))
            return {"ok": True}
        if op == "stats":
            return {"ok": True, "stats": {
                n: {k: str(v) if k == "fault" else v
                    for k, v in dataclasses.asdict(server.stats(n)).items()}
                for n in server.names()
            }}
        if op == "shutdown":
            return {"ok": True, "shutdown": True}
        raise ConfigError(f"unknown op {op!r}")
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def serve(ready_file: Path) -> int:
    """Listen for control requests until shut down."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socket = context.socket(zmq.REP)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, _MAX_REQUEST * 2)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tmp = ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"endpoint": f"tcp://127.0.0.1:{port}", "pid": os.getpid()}))
    os.replace(tmp, ready_file)
    with FaultProxyServer() as server:
        while not stopping:
            if not socket.poll(200):
                continue
            raw = socket.recv()
            reply = handle(server, raw)
            socket.send(json.dumps(reply).encode())
            if reply.get("shutdown"):
                break
    socket.close()
    context.term()
    return 0


class ProxyControl:
    """The coordinator's client of the proxy process.

    Thread-safe: faults end on timer threads, several at once when several
    pods were partitioned together, and a ZeroMQ REQ socket used by two
    threads at once fails ("Operation cannot be accomplished in current
    state"): the heal was lost and the pod stayed cut off for ever.
    """

    def __init__(self, endpoint: str, timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket: zmq.Socket[bytes] | None = None
        self._lock = threading.Lock()

    def request(self, **request: Any) -> dict[str, Any]:
        """Send one request; raise ConfigError on an error reply, BusTimeout on silence."""
        with self._lock:
            return self._request(request)

    def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._socket is None:
            self._socket = self._context.socket(zmq.REQ)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(self.endpoint)
        self._socket.send(json.dumps(request).encode())
        if not self._socket.poll(int(self.timeout_s * 1000)):
            # Lazy pirate: a REQ socket that missed its reply is unusable.
            self._socket.close()
            self._socket = None
            raise BusTimeout(f"the fault proxy at {self.endpoint} did not answer")
        reply: dict[str, Any] = json.loads(self._socket.recv())
        if not reply.get("ok"):
            raise ConfigError(f"fault proxy: {reply.get('error')}")
        return reply

    def close(self) -> None:
        """Close the socket and context."""
        if self._socket is not None:
            self._socket.close()
        self._context.term()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the proxy process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s proxy %(levelname)s %(message)s")
    try:
        return serve(args.ready_file)
    except FleetsimError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
