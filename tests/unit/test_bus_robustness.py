"""Garbage at every bound endpoint never breaks the coordinator's bus."""

from __future__ import annotations

import json
import random
import socket
import struct
import time
from collections.abc import Iterator

import pytest
import zmq

from fleetsim.bus import (
    MAX_FRAME_SIZE,
    ControlClient,
    Error,
    Hello,
    Metrics,
    Ok,
    PodBusClient,
    StatusRequest,
    decode,
    encode,
)
from fleetsim.bus.testing import FakeCoordinator

pytestmark = pytest.mark.timeout(30)

SEED = 20240611


def garbage_frames(rng: random.Random) -> list[list[bytes]]:
    """Multipart messages of every bad shape we could think of."""
    valid = encode(StatusRequest(request_id=3))
    envelope = json.loads(valid)
    frames: list[list[bytes]] = [
        [b""],
        [b"", b""],
        [b"", b"", b""],
        [b"\x00" * 10],
        [b"{}"],
        [b"null"],
        [b"[" * 5000],
        [b'{"v": 3, "kind": "status_request", "id": 1, "body": {}, "x": 1}'],
        [json.dumps({**envelope, "v": 99}).encode()],
        [json.dumps({**envelope, "kind": "rm -rf"}).encode()],
        [b"x" * (MAX_FRAME_SIZE - 1)],  # under zmq's limit, still not JSON
        [valid, valid],  # multipart where one frame is expected
        [b"", valid, b""],
        [b"\xff\xfe\xfd"],
    ]
    for _ in range(40):
        parts = rng.randint(1, 4)
        frames.append([rng.randbytes(rng.randint(0, 300)) for _ in range(parts)])
    return frames


def zmtp_greeting(mechanism: bytes = b"NULL") -> bytes:
    """A well-formed ZMTP 3.0 greeting, so the junk after it reaches the framing layer."""
    return (
        b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\x00") + b"\x00" * 32
    )


def raw_tcp_junk(endpoint: str, rng: random.Random) -> None:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    payloads = [
        rng.randbytes(1),
        rng.randbytes(64),
        rng.randbytes(5000),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        zmtp_greeting() + rng.randbytes(200),
        # a READY command announcing a ROUTER, then a frame claiming 2^62 bytes
        zmtp_greeting()
        + b"\x04\x19\x05READY\x0bSocket-Type\x00\x00\x00\x06ROUTER"
        + b"\x02"
        + struct.pack(">Q", 2**62),
        zmtp_greeting(b"CURVE") + rng.randbytes(100),
    ]
    for payload in payloads:
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            try:
                raw.sendall(payload)
                raw.settimeout(0.05)
                raw.recv(1024)
            except OSError:
                pass  # the peer may reset us: that is the point


@pytest.fixture
def coordinator() -> Iterator[FakeCoordinator]:
    with FakeCoordinator() as fake:
        yield fake


def test_garbage_everywhere_then_business_as_usual(coordinator: FakeCoordinator) -> None:
    rng = random.Random(SEED)
    endpoints = coordinator.endpoints
    context = zmq.Context()
    sockets = []
    try:

        def connect(kind: int, endpoint: str) -> zmq.Socket[bytes]:
            sock: zmq.Socket[bytes] = context.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            sockets.append(sock)
            return sock

        control = connect(zmq.DEALER, endpoints.control)
        cli = connect(zmq.DEALER, endpoints.cli)
        metrics = connect(zmq.PUSH, endpoints.metrics)
        events = connect(zmq.XSUB, endpoints.events)
        req = connect(zmq.REQ, endpoints.cli)
        # Wrong socket types fail the handshake.
        for endpoint in endpoints.to_dict().values():
            connect(zmq.PUSH, endpoint).send(b"wrong type", zmq.NOBLOCK)
            connect(zmq.PAIR, endpoint).send(b"wrong type", zmq.NOBLOCK)
        connect(zmq.ROUTER, endpoints.cli)

        sent = 0
        for frames in garbage_frames(rng):
            for sock in (control, cli, metrics, events):
                sock.send_multipart(frames)
                sent += 1
        req.send(b"\x00 not a request")
        # A frame over the size limit: libzmq disconnects that peer.
        connect(zmq.DEALER, endpoints.cli).send(b"x" * (MAX_FRAME_SIZE + 10))
        connect(zmq.PUSH, endpoints.metrics).send(b"x" * (MAX_FRAME_SIZE + 10))
        # Valid messages on the wrong channel.
        metrics.send(encode(Hello("pod-1", 1, 1, "h")))
        cli.send(encode(Metrics("pod-1", 1, {}, {}, 1.0)))
        for endpoint in endpoints.to_dict().values():
            raw_tcp_junk(endpoint, rng)

        # Every undecodable request on the cli channel was answered with an Error.
        assert req.poll(5000)
        reply = decode(req.recv())
        assert isinstance(reply, Error)
        assert reply.code == "protocol"

        deadline = time.monotonic() + 10
        while coordinator.malformed < 100:
            assert time.monotonic() < deadline, f"only {coordinator.malformed} counted"
            time.sleep(0.01)

        answers = 0
        while cli.poll(200):
            answer = decode(cli.recv_multipart()[-1])
            assert isinstance(answer, Error)
            assert answer.code in ("protocol", "unexpected")
            answers += 1
        assert answers > 10

        # The bus still works for everybody.
        with ControlClient(endpoints.cli) as client:
            for request_id in (1, 2, 3):
                reply = client.request(StatusRequest(), timeout_s=5)
                assert reply == Ok({"kind": "status_request"}, request_id=request_id)
        pod = PodBusClient(endpoints, "pod-ok", 1, heartbeat_interval_s=0.05)
        pod.start()
        try:
            pod.send_metrics({"completed": 1.0}, {})
            coordinator.wait_for(lambda item: isinstance(item.message, Hello))
            coordinator.wait_for(lambda item: isinstance(item.message, Metrics))
        finally:
            pod.close()
        # Nothing that was garbage was ever handed to the coordinator's logic.
        assert {item.message.kind for item in coordinator.received()} <= {
            "status_request",
            "hello",
            "pod_heartbeat",
            "metrics",
        }
        assert all(
            item.message.pod_id == "pod-ok"  # type: ignore[attr-defined]
            for item in coordinator.received()
            if item.channel != "cli"
        )
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()


def test_raw_tcp_junk_alone_does_not_break_requests(coordinator: FakeCoordinator) -> None:
    rng = random.Random(SEED + 1)
    for _ in range(3):
        for endpoint in coordinator.endpoints.to_dict().values():
            raw_tcp_junk(endpoint, rng)
    with ControlClient(coordinator.endpoints.cli) as client:
        assert client.request(StatusRequest(), timeout_s=5).request_id == 1
