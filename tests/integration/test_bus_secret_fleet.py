"""A real fleet's bus refuses every message not signed with the fleet's secret.

A raw ZeroMQ client (any local process) sends what the CLI and pods send:
without the secret (or with a wrong one) it cannot stop the fleet, kill a
pod or register a forged pod; the refusals are answered and counted. With
the secret the same requests work.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import zmq

from fleetsim.bus import ChaosRequest, DownRequest, Hello, Message, decode, encode
from fleetsim.store import StoreConfig
from tests.helpers import running_fleet, wait_until


def raw_request(endpoint: str, message: Message, **encode_options: Any) -> Message:
    """One request from a bare DEALER, as any local process could send it."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        socket.send(encode(message, **encode_options))
        assert socket.poll(10_000), "no reply: a refusal must be answered"
        frame = socket.recv()
        return decode(frame)  # replies are readable without the secret
    finally:
        socket.close()
        context.term()


def refused(reply: Message) -> bool:
    return reply.kind == "error" and getattr(reply, "code", None) == "unauthorized"


@pytest.mark.timeout(120)
def test_raw_client_without_the_secret_cannot_stop_the_fleet_or_kill_a_pod(
    store_config: StoreConfig, tmp_path: Path
) -> None:
    with running_fleet(store_config, tmp_path / "run", pods=2, fault_proxy=False) as fleet:
        endpoints = fleet.bus.endpoints
        victim = fleet.pods["pod-1"].process
        kill = ChaosRequest("kill", "pod-1", {}, request_id=1)
        down = DownRequest(1.0, request_id=2)

        assert refused(raw_request(endpoints.cli, kill))
        assert refused(raw_request(endpoints.cli, down))
        assert refused(raw_request(endpoints.cli, kill, secret=b"0" * 64))
        forged = raw_request(endpoints.control, Hello("pod-9", 0, 1, "evil", request_id=1))
        assert refused(forged)
        assert "pod-9" not in fleet.bus.pods
        assert fleet.bus.refused == 4
        assert fleet.status()["coordinator"]["refused_messages"] == 4
        assert victim.poll() is None, "an unsigned kill killed the pod"
        assert not fleet.stopping.is_set(), "an unsigned down stopped the fleet"

        secret_file = tmp_path / "run" / "bus.secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_bytes().strip()
        assert raw_request(endpoints.cli, kill, secret=secret).kind == "ok"
        wait_until(lambda: victim.poll() is not None, 10, what="pod-1 killed")
        assert raw_request(endpoints.cli, down, secret=secret).kind == "ok"
        wait_until(fleet.stopping.is_set, 5, what="the fleet to stop")
