"""A certain death (the supervisor reaped the pod): fenced fast failover, against PostgreSQL.

Store.record_exit terminates and waits out the dead process's connections,
then (if the pod's row is still that process's registration) ends the term
it holds and records the exit; the leader's next recovery marks it dead at
once. Every test also shows what an unfenced version would do wrong.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest

from fleetsim.checker import check
from fleetsim.store import StepSpec, Store, StoreConfig, pod_application_name
from fleetsim.store import queries as q
from fleetsim.store.store import _COMPLETE
from tests.integration.claimers import sql, wait_for
from tests.integration.test_store_leader import (
    assert_actions_inside_their_terms,
    assert_terms_never_overlap,
)

LONG = 30.0  # a lease and a dead threshold no test waits out


@contextmanager
def pod_connection(config: StoreConfig, pod_id: str, incarnation: int) -> Iterator[Any]:
    """A connection named as pod ``pod_id``'s process ``incarnation`` names its own."""
    conn = psycopg2.connect(
        config.url, connect_timeout=5,
        application_name=pod_application_name(pod_id, incarnation, config.schema),
        options=f"-c search_path={config.schema}",
    )
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


def late_statement(config: StoreConfig, conn: Any, statement: str,
                   params: dict[str, Any] | None = None) -> threading.Thread:
    """Send ``statement`` from ``conn`` in a thread, after a second of ``pg_sleep``.

    Returns while the sleep runs. The statement follows as a message of its
    own, as bytes held up on their way (in a proxy, a socket buffer) would.
    """
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(1.0)")
                cur.execute(statement, params)
            outcome["result"] = "ran"
        except psycopg2.Error as exc:
            outcome["result"] = type(exc).__name__

    thread = threading.Thread(target=send, daemon=True)
    thread.outcome = outcome  # type: ignore[attr-defined]
    backend = conn.get_backend_pid()
    thread.start()
    wait_for(lambda: sql(config, "SELECT state FROM pg_stat_activity WHERE pid = %(p)s",
                         {"p": backend}) == [("active",)], 5, "the statement to run")
    return thread


def register(store: Store, pod_id: str, incarnation: int, pid: int) -> None:
    store.register_pod(pod_id, incarnation=incarnation, pid=pid, host="h", live_within_s=LONG)


def pod_row(config: StoreConfig, pod_id: str) -> tuple[int, str]:
    return sql(config, "SELECT incarnation, status FROM pods WHERE id = %(p)s",
               {"p": pod_id})[0]


@pytest.mark.timeout(60)
def test_exit_of_the_leader_ends_its_term_and_recovery_marks_it_at_once(
    store: Store, store_config: StoreConfig
) -> None:
    register(store, "a", 0, 100)
    register(store, "b", 0, 200)
    store.submit_many([StepSpec("default", {})] * 6)
    lease = store.acquire_leadership("a", LONG)
    assert lease is not None
    claimed = store.claim_steps("a", ["default"], 4)
    assert len(claimed) == 4
    assert store.acquire_leadership("b", LONG) is None  # a's lease has 30 s to run
    with pod_connection(store_config, "a", 0) as conn:
        # A claim of a's in flight: its transaction holds a's row FOR SHARE.
        with conn.cursor() as cur:
            cur.execute("BEGIN; SELECT 1 FROM pods WHERE id = 'a' FOR SHARE")
        record = store.record_exit("a", 0, 100, returncode=-9)
        assert record.recorded and record.ended_term == lease.term and record.backends == 1
        with pytest.raises(psycopg2.Error), conn.cursor() as cur:  # terminated, rolled back
            cur.execute("SELECT 1")
    successor = store.acquire_leadership("b", LONG)
    assert successor is not None and successor.term == lease.term + 1
    recovery = store.recover("b", successor.term, LONG)  # no pod silent for 30 s
    assert recovery.marked_dead == ("a",)
    assert sorted(recovery.requeued) == sorted(s.id for s in claimed)
    assert pod_row(store_config, "b") == (0, "alive")
    assert_terms_never_overlap(store_config)
    assert_actions_inside_their_terms(store_config)
    # The dead holder's term ended when its exit was recorded, before b's began.
    ended, exited = sql(store_config, "SELECT t.ended_at, e.exited_at FROM leader_terms t"
                                      " JOIN pod_exits e ON e.ended_term = t.term")[0]
    assert ended <= exited
    report = check(store)
    assert not any(report.counts["violations"].values()), report.summary()
    # Recorded once: a second notice of the same exit changes nothing.
    assert store.record_exit("a", 0, 100) == type(record)(False, None, 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("terminate", [True, False], ids=["fenced", "unfenced-mutant"])
def test_a_statement_the_dead_process_sent_cannot_land_after_its_exit(
    store: Store, store_config: StoreConfig, monkeypatch: pytest.MonkeyPatch, terminate: bool
) -> None:
    """A completion sent just before the kill, still on its way: it must not land afterwards.

    The mutant records the exit without terminating the process's backends:
    the late completion lands after the exit, and the checker says so.
    """
    if not terminate:
        monkeypatch.setattr(q, "TERMINATE_BACKENDS",
                            "SELECT 0 AS pid WHERE CAST(:app AS text) IS NULL")
        monkeypatch.setattr(q, "PROCESS_BACKENDS_LEFT",
                            "SELECT 0 WHERE CAST(:app AS text) IS NULL"
                            " OR CAST(:pids AS integer[]) IS NOT NULL")
    register(store, "a", 0, 100)
    (step_id,) = store.submit_many([StepSpec("default", {})])
    (claimed,) = store.claim_steps("a", ["default"], 1)
    items = json.dumps([{"id": step_id, "token": claimed.claim_token, "result": None}])
    with pod_connection(store_config, "a", 0) as conn:
        late = late_statement(store_config, conn,
                              _COMPLETE.direct_py, {"items": items})
        assert store.record_exit("a", 0, 100).recorded
        late.join(10)
    report = check(store)
    after_exit = [v for v in report.violations if "after that process's exit" in v.message]
    status = store.get_step(step_id).status  # type: ignore[union-attr]
    if terminate:
        assert late.outcome["result"] != "ran"  # type: ignore[attr-defined]
        assert status == "claimed"  # the leader's recovery requeues it
        assert not after_exit and report.counts["violations"]["history_integrity"] == 0
    else:
        assert late.outcome["result"] == "ran"  # type: ignore[attr-defined]
        assert status == "completed"  # after the exit: what the fence prevents
        assert after_exit, report.summary()


@pytest.mark.timeout(60)
def test_the_exit_of_incarnation_n_never_touches_incarnation_n_plus_1(
    store: Store, store_config: StoreConfig
) -> None:
    """The coordinator's notice of n's death arrives after n + 1 registered (and led)."""
    register(store, "a", 0, 100)
    register(store, "b", 0, 200)
    old = store.acquire_leadership("a", LONG)
    assert old is not None
    register(store, "a", 1, 101)  # the restart takes the id over
    assert store.release_leadership("a", old.term)  # (n's term, for the test to move on)
    newer = store.acquire_leadership("a", LONG)  # incarnation 1 leads now
    assert newer is not None
    record = store.record_exit("a", 0, 100)
    assert not record.recorded and record.ended_term is None
    lease = store.current_leader()
    assert lease is not None and (lease.holder, lease.term) == ("a", newer.term)
    assert store.recover("a", newer.term, LONG).marked_dead == ()
    assert pod_row(store_config, "a") == (1, "alive")
    # The same incarnation number registered again by another process (pid)
    # is not the one that died either, nor is a process that never registered.
    assert not store.record_exit("a", 1, 999).recorded
    assert not store.record_exit("nobody", 0, 1).recorded
    assert store.recover("a", newer.term, LONG).marked_dead == ()


@pytest.mark.timeout(90)
def test_a_restart_racing_the_exit_notice_is_never_marked_dead(
    store: Store, store_config: StoreConfig
) -> None:
    """Registration of n + 1 and the exit notice of n, started together, in either order."""
    register(store, "b", 0, 200)
    leader = store.acquire_leadership("b", LONG)
    assert leader is not None
    with Store(store_config) as other:
        for n in range(8):
            register(store, "a", n, 100 + n)
            barrier = threading.Barrier(2)
            errors: list[BaseException] = []

            def restart(n: int = n, barrier: threading.Barrier = barrier,
                        errors: list[BaseException] = errors) -> None:
                try:
                    barrier.wait(5)
                    register(other, "a", n + 1, 101 + n)
                except BaseException as exc:  # reported below
                    errors.append(exc)

            thread = threading.Thread(target=restart)
            thread.start()
            barrier.wait(5)
            store.record_exit("a", n, 100 + n)
            thread.join(10)
            assert not errors
            assert store.recover("b", leader.term, LONG).marked_dead == ()
            assert pod_row(store_config, "a") == (n + 1, "alive")


@pytest.mark.timeout(60)
def test_a_term_taken_before_the_registration_is_left_to_expire(
    store: Store, store_config: StoreConfig
) -> None:
    """Only a term acquired since the exited registration is ended (conservative)."""
    register(store, "a", 0, 100)
    lease = store.acquire_leadership("a", LONG)
    assert lease is not None
    # The same process registers again (it was declared dead and rejoined):
    # its row's registration is now younger than its term.
    sql(store_config, "UPDATE pods SET status = 'dead' WHERE id = 'a'")
    register(store, "a", 0, 100)
    record = store.record_exit("a", 0, 100)
    assert record.recorded and record.ended_term is None
    assert store.current_leader() is not None  # it runs out with its lease, as before


@pytest.mark.timeout(30)
def test_application_names_are_per_process_and_fit() -> None:
    names = {pod_application_name(p, i, s) for p in ("pod-1", "pod-10") for i in (0, 1)
             for s in ("fleetsim", "other")}
    assert len(names) == 8
    assert pod_application_name("pod-1", 0, "fleetsim") == "pod-1#0/fleetsim"
    long_id = "x" * 80
    a, b = pod_application_name(long_id, 0, "s"), pod_application_name(long_id + "y", 0, "s")
    assert a != b and len(a) <= 63 and len(b) <= 63 and a.isascii()
    assert pod_application_name("pöd", 0, "s").isascii()


@pytest.mark.timeout(60)
def test_the_checker_reads_a_store_initialised_before_pod_exits(
    store: Store, store_config: StoreConfig
) -> None:
    register(store, "a", 0, 100)
    store.submit_many([StepSpec("default", {})] * 2)
    store.claim_steps("a", ["default"], 2)
    sql(store_config, "DROP TABLE pod_exits")
    report = check(store)
    assert not any(report.counts["violations"].values()), report.summary()
    assert report.figures["orphan_recovery"]["count"] == 0
