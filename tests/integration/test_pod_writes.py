"""The pod's write-back under bad results and failed releases (a real store, real threads)."""

from __future__ import annotations

import threading

import pytest

from fleetsim.config import FleetTimings
from fleetsim.errors import InjectedFault
from fleetsim.store import StepSpec, Store, StoreConfig
from pods.config import PodConfig
from pods.pod import Pod
from tests.helpers import rows, running_pod, wait_until

FAST = FleetTimings(heartbeat_s=0.05, lease_s=1.0, renew_s=0.2, dead_after_s=0.5,
                    recovery_s=0.1, grace_s=1.0)



@pytest.mark.timeout(60)
def test_one_unstorable_result_fails_alone_and_its_batch_mates_complete(
    store: Store, store_config: StoreConfig
) -> None:
    kinds = ["nan", "inf", "nul", "surrogate", "nul-error"]
    ids = store.submit_many(
        [StepSpec("default", {"kind": k}, max_attempts=2) for k in kinds]
        + [StepSpec("default", {"kind": "ok"})] * 10
    )
    bad, good = ids[: len(kinds)], ids[len(kinds):]
    config = PodConfig("pod-w", store_config, workload="tests.handlers:bad_results",
                       batch=15, timings=FAST)
    with Store(store_config) as pod_store, running_pod(Pod(config, pod_store)):
        def finished() -> bool:
            counts = store.status_counts()
            return counts["completed"] + counts["dead"] == len(ids)

        wait_until(finished, 20, what="every step to end")
    statuses = dict(rows(store, "SELECT id, status FROM steps"))
    assert all(statuses[i] == "completed" for i in good)
    assert all(statuses[i] == "dead" for i in bad)
    errors = [r[0] for r in rows(store, "SELECT error FROM steps WHERE id = ANY(:ids)",
                                 ids=bad)]
    assert sum("cannot be stored" in e for e in errors) == 4, errors
    # Each bad step spent its two attempts, nothing looped.
    attempts = rows(store, "SELECT count(*) FROM finished_attempts")[0][0]
    assert attempts == len(good) + 2 * len(bad)


class FailNth:
    """Raises an injected error on the n-th statement after it is armed."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.armed = False
        self.seen = 0

    def __call__(self) -> None:
        if not self.armed:
            return
        self.seen += 1
        if self.seen == self.n:
            raise InjectedFault("injected release failure")


@pytest.mark.timeout(60)
def test_a_fenced_pod_keeps_the_tokens_of_a_release_that_failed(
    store: Store, store_config: StoreConfig
) -> None:
    store.submit_many([StepSpec("default", {})] * 3)
    config = PodConfig("pod-f", store_config, timings=FAST)
    with Store(store_config) as pod_store:
        pod = Pod(config, pod_store)
        pod.register()
        held = pod_store.claim_steps("pod-f", batch=3)
        assert len(held) == 3
        # The pod fenced itself (say its heartbeats timed out) with these
        # steps' outcomes dropped: the heartbeat loop releases them, and its
        # first release fails.
        pod._abandoned = [(s.id, s.claim_token) for s in held]
        pod.fenced.set()
        hook = FailNth(2)  # 1: the heartbeat, 2: the release
        pod_store.add_statement_hook(hook)
        hook.armed = True
        loop = threading.Thread(target=pod._heartbeat_loop, daemon=True)
        loop.start()
        try:
            wait_until(lambda: not pod.fenced.is_set(), 10, what="the pod to unfence")
            still_held = rows(store, "SELECT count(*) FROM steps WHERE status = 'claimed'"
                                     " AND claimed_by = 'pod-f'")[0][0]
            known = len(pod._abandoned) > 0 or pod._holds_unknown_claims.is_set()
            assert still_held == 0 or known, (
                f"{still_held} steps held by an unfenced pod that forgot them")
        finally:
            pod.stopping.set()
            loop.join(timeout=5)
        assert hook.seen >= 2
