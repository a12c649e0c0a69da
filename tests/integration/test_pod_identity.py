"""One live process per pod id: registration, takeover and the incarnation fence."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fleetsim.errors import PodIdInUse
from fleetsim.store import StepSpec, Store, StoreConfig
from pods.exitcodes import PodExit
from pods.identity import default_pod_id
from tests.helpers import rows, wait_until


@pytest.mark.timeout(30)
def test_a_second_process_cannot_register_a_live_pod_id(store: Store) -> None:
    store.register_pod("pod-1", incarnation=0, pid=100, host="a")
    with pytest.raises(PodIdInUse, match=r"pod-1.*pid 100 on a"):
        store.register_pod("pod-1", incarnation=0, pid=200, host="b")
    # Nothing of the first owner changed.
    assert rows(store, "SELECT pid, host FROM pods")[0] == (100, "a")


@pytest.mark.timeout(30)
def test_a_retried_registration_of_the_same_process_is_accepted(store: Store) -> None:
    store.register_pod("pod-1", incarnation=3, pid=100, host="a")
    store.register_pod("pod-1", incarnation=3, pid=100, host="a")  # its reply was lost
    assert rows(store, "SELECT count(*) FROM pod_registrations")[0][0] == 2


@pytest.mark.timeout(30)
def test_a_stale_owner_can_be_replaced(store: Store) -> None:
    store.register_pod("pod-1", incarnation=0, pid=100, host="a")
    wait_until(lambda: _registers(store, live_within_s=0.2), 5,
               what="the first owner's heartbeat to go stale")


def _registers(store: Store, live_within_s: float) -> bool:
    try:
        store.register_pod("pod-1", incarnation=0, pid=200, host="b",
                           live_within_s=live_within_s)
    except PodIdInUse:
        return False
    return True


@pytest.mark.timeout(30)
def test_a_newer_incarnation_takes_over_and_fences_the_old_one(store: Store) -> None:
    store.submit_many([StepSpec("default", {})] * 4)
    store.register_pod("pod-1", incarnation=0, pid=100, host="a")
    [held] = store.claim_steps("pod-1", batch=1, incarnation=0)
    store.register_pod("pod-1", incarnation=1, pid=101, host="a")
    # The old incarnation can neither claim nor heartbeat, and its claim was revoked.
    assert store.claim_steps("pod-1", batch=4, incarnation=0) == []
    beat = store.heartbeat("pod-1", incarnation=0)
    assert not beat.alive and beat.incarnation == 1
    assert store.get_step(held.id).status == "queued"  # type: ignore[union-attr]
    assert store.complete(held.id, held.claim_token).name == "LEASE_LOST"
    history = rows(store, "SELECT incarnation, replaced_incarnation FROM pod_registrations"
                          " ORDER BY registered_at, incarnation")
    assert history == [(0, None), (1, 0)]
    # An older incarnation cannot come back over the newer live one.
    with pytest.raises(PodIdInUse):
        store.register_pod("pod-1", incarnation=0, pid=100, host="a")


@pytest.mark.timeout(30)
def test_only_the_registered_incarnation_claims(store: Store) -> None:
    store.submit_many([StepSpec("default", {})] * 2)
    store.register_pod("pod-1", incarnation=2)
    assert store.claim_steps("pod-1", batch=2, incarnation=1) == []
    assert len(store.claim_steps("pod-1", batch=2, incarnation=2)) == 2


def test_default_pod_ids_differ_for_long_host_names_sharing_a_prefix() -> None:
    a = "c" * 40 + "-replica-1"
    b = "c" * 40 + "-replica-2"
    assert default_pod_id(a, 1) != default_pod_id(b, 1)
    assert len(default_pod_id(a, 4_194_304)) <= 64
    assert default_pod_id("host", 7) == "pod-host-7"


@pytest.mark.timeout(60)
def test_a_second_fleetsim_pod_under_a_live_id_exits_with_a_clear_error(
    store_config: StoreConfig,
) -> None:
    cmd = [sys.executable, "-m", "fleetsim", "pod", "--id", "twin", "--store", store_config.url,
           "--schema", str(store_config.schema)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        with Store(store_config) as store:
            wait_until(lambda: rows(store, "SELECT 1 FROM pods WHERE id = 'twin'"
                                           " AND status = 'alive'"), 20,
                       what="the first pod to register")
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert second.returncode == PodExit.ID_IN_USE
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith("error: pod id 'twin' is in use by a live process")
        assert "Traceback" not in second.stderr
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(timeout=20)


@pytest.mark.timeout(30)
def test_a_claim_credited_to_an_earlier_incarnation_that_never_registered_is_caught(
    store: Store,
) -> None:
    from fleetsim.checker import check

    store.submit_many([StepSpec("default", {})])
    store.register_pod("pod-1", incarnation=0, pid=1, host="a")
    [step] = store.claim_steps("pod-1", incarnation=0)
    store.complete(step.id, step.claim_token)
    store.register_pod("pod-1", incarnation=1, pid=2, host="a")  # takes the id over
    assert check(store, final=True).valid is True
    rows(store, "UPDATE finished_attempts SET incarnation = 5 RETURNING 1")
    rows(store, "UPDATE steps SET claim_incarnation = 5 RETURNING 1")
    report = check(store, final=True)
    assert {v.witness.get("kind") for v in report.violations} == {"unknown_incarnation"}
