"""Process entry points and small helpers for the store's integration tests.

Claimer processes are started with the spawn method, each builds its own
``Store`` from the parent's (picklable) ``StoreConfig``, registers a pod and
waits on a shared barrier so that they really race. Results come back over a
multiprocessing queue as plain tuples.
"""

from __future__ import annotations

import contextlib
import queue as queue_mod
import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import multiprocess as multiprocessing  # the design card's dill-based fork of the stdlib API
import psycopg2

from fleetsim.store import Store, StoreConfig

SPAWN = multiprocessing.get_context("spawn")
START_TIMEOUT_S = 60.0


def _connect(config: StoreConfig) -> Any:
    """An autocommit psycopg2 connection to the test's private schema."""
    options = f"-c search_path={config.schema}" if config.schema else ""
    conn = psycopg2.connect(config.url, connect_timeout=5, options=options)
    conn.autocommit = True
    return conn


def sql(config: StoreConfig, statement: str, params: dict[str, Any] | None = None) -> list[Any]:
    """Run one statement in the test's private schema; return all rows (if any)."""
    conn = _connect(config)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params or {})
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)  # a poll interval, not synchronisation


def wait_db_time_past(store: Store, instant: datetime, timeout_s: float = 10.0) -> datetime:
    """Poll the database clock until it is past ``instant``; return the time seen."""
    return wait_for(
        lambda: (now := store.db_now()) > instant and now, timeout_s, f"DB time > {instant}"
    )


@dataclass(frozen=True)
class Plan:
    """What one claimer process does after the start barrier.

    ``mode``:
    - ``once``: one claim of ``batch`` steps.
    - ``until_empty``: claim (and keep) until a claim returns nothing.
    - ``drain``: claim, then complete (or release / fail at the given rates),
      until the queue has nothing waiting or claimed.
    """

    pod_id: str
    queue: str = "default"
    mode: str = "once"
    batch: int = 1
    seed: int = 0
    release_rate: float = 0.0
    fail_rate: float = 0.0  # only applied to a step's first attempt
    watch: bool = False  # after each claim, note the queue's claimed count
    deadline_s: float = 100.0  # a safety net only: each test's own timeout is 120 s


@dataclass(frozen=True)
class Report:
    """What a claimer process saw."""

    pod_id: str
    claims: tuple[tuple[int, int], ...]  # (step id, claim token), in the order claimed
    completed: tuple[int, ...]
    max_claimed_seen: int  # max of the queue's claimed count seen right after a claim (watch)


def run_claimer(
    config: StoreConfig, plan: Plan, start: Any, results: Any
) -> None:
    """Process entry point: register, wait at the barrier, claim per ``plan``, report."""
    try:
        results.put(("ok", _claim(config, plan, start)))
    except BaseException:  # report everything: the parent fails the test with it
        results.put(("error", f"{plan.pod_id}:\n{traceback.format_exc()}"))


def _count(conn: Any, queue: str, statuses: tuple[str, ...]) -> int:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM steps WHERE queue = %s AND status = ANY(%s)",
            (queue, list(statuses)),
        )
        return int(cur.fetchone()[0])


def _claim(config: StoreConfig, plan: Plan, start: Any) -> Report:
    rng = random.Random(plan.seed)
    claims: list[tuple[int, int]] = []
    completed: list[int] = []
    max_seen = 0
    # A plain connection of our own for the checks, so they cost one indexed count.
    with Store(config) as store, contextlib.closing(_connect(config)) as conn:
        store.register_pod(plan.pod_id)
        start.wait(START_TIMEOUT_S)
        deadline = time.monotonic() + plan.deadline_s
        while time.monotonic() < deadline:
            got = store.claim_steps(plan.pod_id, [plan.queue], batch=plan.batch)
            claims += [(s.id, s.claim_token) for s in got]
            if plan.mode == "once":
                break
            if plan.mode == "until_empty":
                if not got:
                    break
                continue
            if not got:
                if _count(conn, plan.queue, ("queued", "failed", "claimed")) == 0:
                    break
                time.sleep(0.005)  # a poll interval while others hold the slots
                continue
            if plan.watch:
                max_seen = max(max_seen, _count(conn, plan.queue, ("claimed",)))
            for step in got:
                roll = rng.random()
                if roll < plan.release_rate:
                    store.release(step.id, step.claim_token)
                elif step.attempts == 0 and roll < plan.release_rate + plan.fail_rate:
                    store.fail(step.id, step.claim_token, "chosen to fail")
                else:
                    store.complete(step.id, step.claim_token, {"by": plan.pod_id})
                    completed.append(step.id)
        else:
            raise TimeoutError(f"{plan.pod_id} did not finish within {plan.deadline_s} s")
    return Report(plan.pod_id, tuple(claims), tuple(completed), max_seen)


def run_claimers(
    config: StoreConfig, plans: Sequence[Plan], timeout_s: float = 110.0
) -> dict[str, Report]:
    """Run one spawned process per plan, all released by one barrier; return their reports."""
    start = SPAWN.Barrier(len(plans))
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=run_claimer, args=(config, plan, start, results), daemon=True)
        for plan in plans
    ]
    for proc in procs:
        proc.start()
    reports: dict[str, Report] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(reports) + len(errors) < len(plans):
            remaining = deadline - time.monotonic()
            try:
                kind, value = results.get(timeout=max(remaining, 0.01))
            except queue_mod.Empty:
                raise AssertionError(
                    f"claimers timed out after {timeout_s} s:"
                    f" {len(reports)} of {len(plans)} reported"
                ) from None
            if kind == "ok":
                reports[value.pod_id] = value
            else:
                errors.append(value)
        for proc in procs:
            proc.join(timeout=10)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        results.close()
        results.join_thread()
    if errors:
        raise AssertionError("claimer process failed:\n" + "\n".join(errors))
    return reports
