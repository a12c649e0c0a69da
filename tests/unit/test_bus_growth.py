"""The coordinator's bus bookkeeping stays bounded over a long fleet (issue 10, suspected).

A pod started by hand (`fleetsim pod --join`) has the default id
``pod-<host>-<pid>``: every restart is a new id. The coordinator's bus
thread kept, per pod id, its routing identity, when it was last heard and
its latest metrics, and never forgot any; and a command whose pod never
answered stayed in its pending table after the caller gave up. Both grew
without bound. Real sockets, real pod bus clients, no mocks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from fleetsim.bus import Ok, PodBusClient, SetStorageFault
from fleetsim.bus_service import BusService
from fleetsim.errors import BusError, BusTimeout
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def service() -> Iterator[BusService]:
    bus = BusService(on_chaos=lambda _r: {}, on_status=dict, on_down=lambda: None,
                     forget_after_s=1.0)
    bus.start_and_wait()
    try:
        yield bus
    finally:
        bus.stop()


def join(service: BusService, pod_id: str, incarnation: int = 0) -> PodBusClient:
    assert service.endpoints is not None
    client = PodBusClient(service.endpoints, pod_id, incarnation, heartbeat_interval_s=0.1)
    client.start()
    client.send_metrics({"completed": 1.0}, {"claimed": 0.0})
    wait_until(lambda: pod_id in service.connected_pods(), 10, what=f"{pod_id} on the bus")
    return client


def test_pods_gone_for_long_are_forgotten_and_live_ones_kept(service: BusService) -> None:
    steady = join(service, "pod-steady")
    try:
        for n in range(40):  # 40 incarnations of hand-started pods, each a new id
            join(service, f"pod-host-{1000 + n}").close()
        wait_until(lambda: "pod-host-1039" in service.metrics, 10, what="the last metrics")

        def only_steady_left() -> bool:
            with service._lock:
                return (set(service.pods) == set(service.heard) == {"pod-steady"}
                        and set(service.metrics) <= {"pod-steady"})

        wait_until(only_steady_left, 15, what="the gone pods to be forgotten")
        # The live pod, heard all along, is still known and reachable.
        assert service.connected_pods() == ["pod-steady"]
    finally:
        steady.close()


def test_a_forgotten_pod_that_comes_back_is_known_again(service: BusService) -> None:
    client = join(service, "pod-away")
    try:
        client.partition(3.0)  # silent for longer than forget_after_s
        wait_until(lambda: "pod-away" not in service.pods, 10, what="pod-away forgotten")
        # Its next heartbeat is refused as unknown; it says Hello again.
        wait_until(lambda: "pod-away" in service.connected_pods(), 15,
                   what="pod-away back on the bus")
    finally:
        client.close()


def test_commands_nobody_answers_do_not_stay_pending() -> None:
    # Default settings: the pod stays known while deaf; only its requests expire.
    service = BusService(on_chaos=lambda _r: {}, on_status=dict, on_down=lambda: None)
    service.start_and_wait()
    client = join(service, "pod-deaf")
    try:
        client.partition(30.0)  # drops the commands: no reply will ever come
        fault = SetStorageFault(error_rate=0.0, latency_ms=0.0, disconnect_rate=0.0,
                                duration_s=1.0)
        for _ in range(25):
            with pytest.raises(BusTimeout):
                service.send_command("pod-deaf", fault, timeout_s=0.05)
        started = time.monotonic()
        wait_until(lambda: len(service._pending) == 0, 10,
                   what="the pending table to drop what timed out")
        assert time.monotonic() - started < 5
    finally:
        client.close()
        service.stop()


def test_a_command_sent_while_the_pod_reconnects_reaches_it(service: BusService) -> None:
    """A pod resumed after a pause reconnects its bus: for a moment the
    coordinator's socket has no peer under its identity. A command sent then
    must wait for it (within its deadline), not fail as "not connected".
    (Found in the image suite: `chaos storage-fault --all` right after
    `chaos pause pod-1 --for 1s` failed with "pod 'pod-1/0' is not connected".)
    """
    fault = SetStorageFault(error_rate=0.0, latency_ms=0.0, disconnect_rate=0.0,
                            duration_s=1.0)
    join(service, "pod-back").close()  # the old connection is gone; the pod is still known
    replies: list[object] = []
    sender = threading.Thread(
        target=lambda: replies.append(service.send_command("pod-back", fault, timeout_s=5.0)))
    sender.start()
    # The gap being tested: the command was tried while nobody was there,
    # and waits to be sent again.
    wait_until(lambda: bool(service._later), 5, interval=0.01,
               what="the command tried and queued to be sent again")
    assert service.endpoints is not None
    back = PodBusClient(service.endpoints, "pod-back", 0, heartbeat_interval_s=0.1,
                        handler=lambda _command: Ok({"back": True}))
    back.start()
    try:
        sender.join(10)
        assert not sender.is_alive()
        assert replies and isinstance(replies[0], Ok) and replies[0].data == {"back": True}
    finally:
        back.close()


def test_a_command_to_a_pod_that_never_comes_back_fails_at_its_deadline(
        service: BusService) -> None:
    fault = SetStorageFault(error_rate=0.0, latency_ms=0.0, disconnect_rate=0.0,
                            duration_s=1.0)
    join(service, "pod-gone").close()
    started = time.monotonic()
    with pytest.raises(BusError, match="pod-gone/0' is not connected"):
        service.send_command("pod-gone", fault, timeout_s=0.5)
    assert 0.3 < time.monotonic() - started < 3


_STOPPED_POD = """
import sys, time
from fleetsim.bus import Ok, PodBusClient
from fleetsim.bus.endpoints import BusEndpoints
endpoints = BusEndpoints(control=sys.argv[1], cli=sys.argv[2], events=sys.argv[3],
                         metrics=sys.argv[4])
client = PodBusClient(endpoints, "pod-stopped", 0, heartbeat_interval_s=0.1,
                      handler=lambda command: Ok({"answered": True}))
client.start()
print("started", flush=True)
time.sleep(60)
"""


def test_a_command_sent_while_the_pod_process_is_stopped_is_answered_after(
        service: BusService) -> None:
    """A stopped pod (SIGSTOP, a frozen container) must not mistake its own
    stop for the coordinator's silence when it resumes: reconnecting then
    dropped, with the old socket, the command sent to it meanwhile. (Found in
    CI: `chaos storage-fault --all` right after `chaos pause pod-1 --for 1s`
    timed out.) A real process, real signals."""
    endpoints = service.endpoints
    assert endpoints is not None
    pod = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_POD, endpoints.control, endpoints.cli,
         endpoints.events, endpoints.metrics], stdout=subprocess.PIPE, text=True)
    try:
        assert pod.stdout is not None and pod.stdout.readline().strip() == "started"
        wait_until(lambda: "pod-stopped" in service.connected_pods(), 10,
                   what="the pod on the bus")
        os.kill(pod.pid, signal.SIGSTOP)  # far longer than its silence limit (0.3 s)
        replies: list[object] = []
        fault = SetStorageFault(error_rate=0.0, latency_ms=0.0, disconnect_rate=0.0,
                                duration_s=1.0)
        sender = threading.Thread(target=lambda: replies.append(
            service.send_command("pod-stopped", fault, timeout_s=10.0)))
        sender.start()
        # Sent into the stopped pod's connection before it resumes.
        wait_until(lambda: bool(service._pending), 5, interval=0.01, what="the command sent")
        time.sleep(1.5)  # the stop being tested: nothing to poll while it lasts
        os.kill(pod.pid, signal.SIGCONT)
        sender.join(15)
        assert replies and isinstance(replies[0], Ok), replies
    finally:
        pod.kill()
        pod.wait(10)
