"""The store's own loop: ``Store.claim_steps`` + ``complete_many``, no pods, no coordinator.

Beside the reference (the same processes, batch and workload, in the same
run) it splits fleetsim's distance to a bare queue in two: what the store's
SQL costs (leases, fencing tokens, the attempt history) and what the pods
and the coordinator add on top (the fleet rows). Each process registers as
a pod and claims through the public store API, exactly as a pod's claim
loop does, minus heartbeats, leadership and the bus.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time

from fleetsim.bench import server
from fleetsim.bench.claimers import ClaimerResult, Clock, run_claimers, step_runner, step_work

QUEUE = "default"
_SUBMIT_CHUNK = 10_000


def store_loop(url: str, schema: str, app: str, index: int, batch: int, workload: str,
               clock: Clock) -> None:
    """One store claimer: a registered pod claiming and completing until the queue is empty."""
    from fleetsim.store import Store, StoreConfig

    work = step_work(workload)
    pod = f"bench-pod-{index}"
    store = Store(StoreConfig(url, schema=schema, application_name=app))
    try:
        store.register_pod(pod, pid=os.getpid())
        store.ping()  # the pooled connection is open before the clock starts
        clock.ready()
        done_at: list[float] = []
        while True:
            steps = store.claim_steps(pod, [QUEUE], batch)
            if not steps:
                break
            for _ in steps:
                work()
            accepted = store.complete_many([(s.id, s.claim_token, None) for s in steps])
            done_at.extend([time.monotonic()] * len(accepted))
        clock.done(done_at)
    finally:
        store.close()


def run_store_loop(url: str, procs: int, batch: int, steps: int,
                   workload: str = "noop") -> ClaimerResult:
    """Submit ``steps`` steps to a fresh store schema and drain them with ``procs`` processes.

    Filled like the reference (ANALYZE, CHECKPOINT if allowed); the schema
    is always dropped. Raises RuntimeError if a claimer fails.
    """
    from fleetsim.store import StepSpec, Store, StoreConfig

    step_runner(workload)
    schema = f"bench_store_{os.getpid()}_{secrets.token_hex(3)}"
    app = f"fleetsim-bench-{schema}"
    store = Store(StoreConfig(url, schema=schema, application_name=app))
    admin = None
    try:
        store.init_schema()
        for start in range(0, steps, _SUBMIT_CHUNK):
            store.submit_many([StepSpec(QUEUE)] * min(_SUBMIT_CHUNK, steps - start))
        store.analyze()
        store.close()  # its pooled backends would count as the claimers'
        admin = server.connect(url, app, schema)
        with contextlib.suppress(Exception):
            server.query(admin, "CHECKPOINT")
        return run_claimers("store", store_loop, url, schema, app, admin, procs, batch,
                            steps, workload)
    finally:
        if admin is not None:
            admin.close()
        store.close()
        with contextlib.suppress(Exception):
            server.drop_schema(url, schema)
