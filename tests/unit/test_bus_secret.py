"""The per-fleet bus secret: every frame is signed, unsigned ones are refused and counted."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from fleetsim.bus import (
    ChaosRequest,
    ControlClient,
    DownRequest,
    Error,
    EventSubscriber,
    Hello,
    Metrics,
    Ok,
    PodBusClient,
    Shutdown,
    decode,
    encode,
)
from fleetsim.bus.messages import Unauthenticated
from fleetsim.bus.security import create_secret, load_secret
from fleetsim.bus.testing import FakeCoordinator
from fleetsim.bus_service import BusService
from fleetsim.errors import ConfigError
from tests.helpers import wait_until

SECRET = b"a" * 64
OTHER = b"b" * 64


def raw(
    endpoint: str, frame: bytes, *, kind: int = zmq.DEALER, reply: bool = True
) -> bytes | None:
    """Send one frame from a bare socket (any local process); the reply frame, if any."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 1000)
    try:
        socket.connect(endpoint)
        socket.send(frame)
        if not reply:
            return None
        assert socket.poll(5000), "no reply"
        return socket.recv()
    finally:
        socket.close()
        context.term()


@pytest.mark.timeout(10)
def test_signed_frames_round_trip_and_anything_else_is_refused() -> None:
    message = DownRequest(2.0, request_id=7)
    frame = encode(message, secret=SECRET)
    assert SECRET not in frame  # the secret itself never travels
    assert decode(frame, secret=SECRET) == message
    assert decode(frame) == message  # without a secret the mac is only stripped
    with pytest.raises(Unauthenticated, match="not signed"):
        decode(encode(message), secret=SECRET)
    with pytest.raises(Unauthenticated, match="another secret"):
        decode(frame, secret=OTHER)
    tampered = frame.replace(b'"grace_s":2.0', b'"grace_s":0.0')
    assert tampered != frame
    with pytest.raises(Unauthenticated):
        decode(tampered, secret=SECRET)
    # A mac anywhere but last is just an unknown field; a second one breaks the suffix.
    with pytest.raises(Unauthenticated):
        decode(frame[:-1] + b',"x":1}', secret=SECRET)


@pytest.fixture
def coordinator() -> Iterator[FakeCoordinator]:
    with FakeCoordinator(secret=SECRET) as fake:
        yield fake


@pytest.mark.timeout(20)
def test_unsigned_cli_requests_are_answered_unauthorized_and_counted(
    coordinator: FakeCoordinator,
) -> None:
    for frame in (encode(DownRequest(1.0, request_id=3)),
                  encode(DownRequest(1.0, request_id=3), secret=OTHER)):
        reply = decode(raw(coordinator.endpoints.cli, frame) or b"")
        assert isinstance(reply, Error) and reply.code == "unauthorized"
        assert reply.request_id == 3
    assert coordinator.bus.refused == 2
    assert coordinator.counts["cli"] == 0  # nothing reached the handler
    signed = decode(raw(coordinator.endpoints.cli, encode(DownRequest(1.0, request_id=4),
                                                         secret=SECRET)) or b"",
                    secret=SECRET)
    assert isinstance(signed, Ok)
    assert coordinator.counts["cli"] == 1


@pytest.mark.timeout(20)
def test_unsigned_metrics_and_forged_hellos_are_refused(coordinator: FakeCoordinator) -> None:
    raw(coordinator.endpoints.metrics, encode(Metrics("pod-x", 0, {}, {}, 0.0)),
        kind=zmq.PUSH, reply=False)
    reply = decode(raw(coordinator.endpoints.control,
                       encode(Hello("pod-1", 0, 1, "evil", request_id=1))) or b"")
    assert isinstance(reply, Error) and reply.code == "unauthorized"
    wait_until(lambda: coordinator.bus.refused == 2, 5, what="both refusals counted")
    assert coordinator.received() == []


@pytest.mark.timeout(20)
def test_control_client_signs_and_reports_a_wrong_secret(coordinator: FakeCoordinator) -> None:
    with ControlClient(coordinator.endpoints.cli, secret=SECRET) as client:
        assert isinstance(client.request(ChaosRequest("kill", "pod-1", {})), Ok)
    with ControlClient(coordinator.endpoints.cli, secret=OTHER) as client:
        reply = client.request(ChaosRequest("kill", "pod-1", {}))
        assert isinstance(reply, Error) and reply.code == "unauthorized"
    with ControlClient(coordinator.endpoints.cli) as client:
        reply = client.request(ChaosRequest("kill", "pod-1", {}))
        assert isinstance(reply, Error) and reply.code == "unauthorized"


@pytest.mark.timeout(20)
def test_pods_with_the_secret_join_and_obey_others_are_refused_without_a_loop(
    coordinator: FakeCoordinator,
) -> None:
    commands: list[str] = []

    def handler(command: object) -> Ok:
        commands.append(type(command).__name__)
        return Ok()

    good = PodBusClient(coordinator.endpoints, "pod-good", 0, secret=SECRET, handler=handler,
                        heartbeat_interval_s=0.05)
    bad = PodBusClient(coordinator.endpoints, "pod-bad", 0, secret=OTHER,
                       heartbeat_interval_s=0.1)
    with good, bad:
        hello = coordinator.wait_for(lambda i: isinstance(i.message, Hello))
        assert hello.message.pod_id == "pod-good"  # type: ignore[attr-defined]
        coordinator.send_command(hello.identity, Shutdown(1.0))
        wait_until(lambda: commands == ["Shutdown"], 5, what="the signed command to run")
        wait_until(lambda: bad.stats.refused >= 1, 5, what="the pod to refuse a refusal")
        # A ping-pong of refusals would run at thousands a second; heartbeats
        # and hellos at 0.1 s make a few.
        before = coordinator.bus.refused
        time.sleep(0.5)
        assert coordinator.bus.refused - before < 30, "refusals bounce between the ends"
        assert not bad.connected and good.connected
    assert all(getattr(i.message, "pod_id", "") != "pod-bad" for i in coordinator.received())


@pytest.mark.timeout(20)
def test_a_pod_refuses_commands_not_signed_with_its_secret() -> None:
    with FakeCoordinator(secret=OTHER) as impostor:
        commands: list[str] = []
        def handler(command: object) -> Ok:
            commands.append(type(command).__name__)
            return Ok()

        pod = PodBusClient(impostor.endpoints, "pod-1", 0, secret=SECRET, handler=handler,
                           heartbeat_interval_s=0.05)
        with pod:
            wait_until(lambda: pod.stats.refused, 5, what="the pod to hear the impostor")
            impostor.send_command(pod.identity, Shutdown(0.0))
            wait_until(lambda: pod.stats.refused >= 2, 5, what="the command refused")
        assert commands == []


@pytest.mark.timeout(20)
def test_events_are_signed(coordinator: FakeCoordinator) -> None:
    from fleetsim.bus import Event

    with EventSubscriber(coordinator.endpoints.events, secret=SECRET) as subscriber:
        def published() -> bool:
            coordinator.publish(Event("pod.started", 1.0, {}))
            return subscriber.receive(0.1) is not None

        wait_until(published, 5, what="a signed event")


@pytest.mark.timeout(20)
def test_bus_service_refuses_a_forged_hello_and_counts_it() -> None:
    service = BusService(on_chaos=lambda r: {}, on_status=dict, on_down=lambda: None,
                         secret=SECRET)
    endpoints = service.start_and_wait()
    try:
        reply = decode(raw(endpoints.control, encode(Hello("pod-1", 0, 1, "x", request_id=1)))
                       or b"")
        assert isinstance(reply, Error) and reply.code == "unauthorized"
        assert "pod-1" not in service.pods
        wait_until(lambda: service.refused == 1, 5, what="the refusal counted")
        ok = decode(raw(endpoints.control, encode(Hello("pod-1", 0, 1, "x", request_id=2),
                                                  secret=SECRET)) or b"", secret=SECRET)
        assert isinstance(ok, Ok) and "pod-1" in service.pods
    finally:
        service.stop()


@pytest.mark.timeout(10)
def test_secret_files(tmp_path: Path) -> None:
    path = tmp_path / "bus.secret"
    secret = create_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(path) == secret and len(secret) == 64
    assert create_secret(path) != secret  # a fresh one per fleet
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="accessible to other users"):
        load_secret(path)
    with pytest.raises(ConfigError, match="cannot read the bus secret"):
        load_secret(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="is not a bus secret"):
        load_secret(short)
