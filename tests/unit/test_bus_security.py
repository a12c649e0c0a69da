"""CURVE: key generation, admitted clients get answers, everyone else times out."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from fleetsim.bus import (
    ClientKeys,
    ControlClient,
    CoordinatorBus,
    Hello,
    Metrics,
    Ok,
    PodBusClient,
    StatusRequest,
    generate_keys,
    load_client_keys,
    load_server_keys,
)
from fleetsim.bus.testing import FakeCoordinator
from fleetsim.errors import BusTimeout, ConfigError

pytestmark = pytest.mark.timeout(30)

OK_STATUS = Ok({"kind": "status_request"}, request_id=1)


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    generate_keys(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def coordinator(keys_dir: Path) -> Iterator[FakeCoordinator]:
    with FakeCoordinator(keys=load_server_keys(keys_dir)) as fake:
        yield fake


def test_generate_keys_writes_private_files(tmp_path: Path) -> None:
    files = generate_keys(tmp_path / "keys")
    assert stat.S_IMODE(files.directory.stat().st_mode) == 0o700
    written = [
        files.server_public,
        files.server_secret,
        files.client_public,
        files.client_secret,
        files.authorized_clients / "client.key",
    ]
    for path in written:
        assert path.is_file()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert "secret-key" not in files.server_public.read_text()
    assert "secret-key" in files.server_secret.read_text()
    server, client = load_server_keys(files.directory), load_client_keys(files.directory)
    assert client.server_public == server.public
    assert len(server.public) == len(client.public) == 40  # z85 of 32 bytes


def test_generate_keys_refuses_to_overwrite(keys_dir: Path) -> None:
    before = load_server_keys(keys_dir)
    with pytest.raises(ConfigError, match="already exist"):
        generate_keys(keys_dir)
    generate_keys(keys_dir, overwrite=True)
    assert load_server_keys(keys_dir).public != before.public


def test_loading_missing_keys_says_how_to_make_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fleetsim keys generate"):
        load_server_keys(tmp_path)
    with pytest.raises(ConfigError, match="fleetsim keys generate"):
        load_client_keys(tmp_path)


def test_admitted_client_gets_replies(coordinator: FakeCoordinator, keys_dir: Path) -> None:
    with ControlClient(coordinator.endpoints.cli, keys=load_client_keys(keys_dir)) as client:
        assert client.request(StatusRequest(), timeout_s=5) == OK_STATUS


def test_admitted_pod_registers_and_pushes_metrics(
    coordinator: FakeCoordinator, keys_dir: Path
) -> None:
    pod = PodBusClient(
        coordinator.endpoints,
        "pod-1",
        1,
        keys=load_client_keys(keys_dir),
        heartbeat_interval_s=0.05,
    )
    pod.start()
    try:
        pod.send_metrics({"completed": 1.0}, {})
        coordinator.wait_for(lambda item: isinstance(item.message, Hello))
        coordinator.wait_for(lambda item: isinstance(item.message, Metrics))
    finally:
        pod.close()


def test_client_without_keys_times_out(coordinator: FakeCoordinator) -> None:
    with (
        ControlClient(coordinator.endpoints.cli) as client,
        pytest.raises(BusTimeout, match="no reply from the coordinator"),
    ):
        client.request(StatusRequest(), timeout_s=0.5)
    assert coordinator.received() == []


def test_client_with_unknown_keys_is_refused(
    coordinator: FakeCoordinator, keys_dir: Path, tmp_path: Path
) -> None:
    # It knows the server's public key, but its own key was never admitted.
    stranger = load_client_keys(generate_keys(tmp_path / "other").directory)
    impostor = dataclasses.replace(stranger, server_public=load_client_keys(keys_dir).server_public)
    with (
        ControlClient(coordinator.endpoints.cli, keys=impostor) as client,
        pytest.raises(BusTimeout),
    ):
        client.request(StatusRequest(), timeout_s=0.5)
    with (
        ControlClient(coordinator.endpoints.cli, keys=stranger) as client,
        pytest.raises(BusTimeout),
    ):
        client.request(StatusRequest(), timeout_s=0.5)  # wrong server key too
    assert coordinator.received() == []


def test_plain_zmq_peer_cannot_push_metrics(coordinator: FakeCoordinator) -> None:
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.setsockopt(zmq.LINGER, 0)
        push.connect(coordinator.endpoints.metrics)
        # Refused at once (EAGAIN: the handshake never gave it a peer) or
        # sent and dropped by the coordinator: either way nothing arrives.
        with contextlib.suppress(zmq.Again):
            push.send(b"anything", zmq.NOBLOCK)
        with ControlClient(coordinator.endpoints.cli) as client, pytest.raises(BusTimeout):
            client.request(StatusRequest(), timeout_s=0.3)  # time for the push to arrive
    assert coordinator.malformed == 0
    assert coordinator.received() == []


def test_non_loopback_bind_needs_keys_and_works_with_them(keys_dir: Path) -> None:
    with pytest.raises(ConfigError, match="requires CURVE keys"):
        CoordinatorBus("0.0.0.0")
    with FakeCoordinator(host="0.0.0.0", keys=load_server_keys(keys_dir)) as coordinator:
        assert coordinator.endpoints.cli.startswith("tcp://0.0.0.0:")
        local = coordinator.endpoints.cli.replace("0.0.0.0", "127.0.0.1")
        keys: ClientKeys = load_client_keys(keys_dir)
        with ControlClient(local, keys=keys) as client:
            assert client.request(StatusRequest(), timeout_s=5) == OK_STATUS


def test_dropping_a_public_key_in_authorized_clients_admits_that_client(
    keys_dir: Path, tmp_path: Path
) -> None:
    # The refusal above comes from the authenticator, not from a key mismatch.
    other = generate_keys(tmp_path / "other")
    shutil.copyfile(other.client_public, keys_dir / "authorized_clients" / "other.key")
    admitted = dataclasses.replace(
        load_client_keys(other.directory), server_public=load_client_keys(keys_dir).server_public
    )
    with (
        FakeCoordinator(keys=load_server_keys(keys_dir)) as coordinator,
        ControlClient(coordinator.endpoints.cli, keys=admitted) as client,
    ):
        assert client.request(StatusRequest(), timeout_s=5) == OK_STATUS
