"""`fleetsim prune`: old terminal steps go, on record, and the checker still adds up (issue 15).

Real PostgreSQL, real pods for the live case. Each guarantee has its broken
case: a prune done wrong (a step deleted without its record, a record
without its delete, attempts left behind) is something `check` reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetsim.checker import check
from fleetsim.client_history import history_dir, read_histories
from fleetsim.config import FleetTimings
from fleetsim.store import StepSpec, Store, StoreConfig, WriteOutcome
from fleetsim.store.prune import prune
from tests.helpers import rows, running_fleet, wait_until

FAST = FleetTimings(heartbeat_s=0.2, lease_s=1.5, renew_s=0.5, dead_after_s=1.0,
                    recovery_s=0.2, grace_s=2.0)


def fleetsim(run_dir: Path, store_config: StoreConfig, *args: str,
             schema: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEETSIM_STORE": store_config.url,
           "FLEETSIM_SCHEMA": schema if schema is not None else store_config.schema or ""}
    return subprocess.run(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), *args],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def snapshot(store: Store, ids: list[int]) -> dict[int, tuple[Any, ...]]:
    """The rows of ``ids`` as they are, to prove a prune left them alone."""
    return {int(r[0]): tuple(r) for r in rows(
        store, "SELECT id, status, attempts, claim_token, claimed_by, finished_at"
        " FROM steps WHERE id = ANY(CAST(:ids AS bigint[]))", ids=ids)}


def db_seconds_since(store: Store, instant: Any) -> float:
    return float(rows(store, "SELECT extract(epoch FROM statement_timestamp() - :t)",
                      t=instant)[0][0])


def mixed_store(store: Store) -> dict[str, list[int]]:
    """Steps of every status: completed, dead, cancelled, claimed, queued, failed."""
    ids = store.submit_many([StepSpec("default", {"n": i}) for i in range(20)])
    doomed = store.submit_many([StepSpec("doomed", {}, max_attempts=1)] * 3)
    retried = store.submit_many([StepSpec("retried", {}, max_attempts=3)] * 2)
    store.register_pod("p1")
    claimed = store.claim_steps("p1", ["default"], batch=14)
    for c in claimed[:10]:
        assert store.complete(c.id, c.claim_token, {"ok": c.id}) is WriteOutcome.ACCEPTED
    for c in store.claim_steps("p1", ["doomed"], batch=3):
        store.fail(c.id, c.claim_token, "boom")
    for c in store.claim_steps("p1", ["retried"], batch=2):
        store.fail(c.id, c.claim_token, "once")  # failed: waiting for a retry
    queued = [i for i in ids if i not in {c.id for c in claimed}]
    for i in queued[:2]:
        assert store.cancel(i) == "cancelled"
    return {
        "completed": [c.id for c in claimed[:10]], "dead": doomed,
        "cancelled": queued[:2], "claimed": [c.id for c in claimed[10:]],
        "queued": queued[2:], "failed": retried,
    }


@pytest.mark.timeout(90)
def test_prune_takes_only_old_terminal_steps_and_check_still_adds_up(store: Store) -> None:
    steps = mixed_store(store)
    total = sum(len(v) for v in steps.values())
    assert {s: store.get_step(steps[s][0]).status for s in steps} == {  # type: ignore[union-attr]
        s: s for s in steps}
    open_ids = steps["claimed"] + steps["queued"] + steps["failed"]
    before = snapshot(store, open_ids)

    # Nothing finished an hour ago: nothing goes.
    assert prune(store, 3600).steps == 0
    dry = prune(store, 0, dry_run=True)
    assert dry.counts["completed"] == 10 and dry.counts["dead"] == 3
    assert dry.counts["cancelled"] == 2 and dry.counts["attempts"] == 13
    assert store.status_counts()["completed"] == 10  # a dry run deletes nothing

    done = prune(store, 0, batch=4)  # several batches
    assert (done.counts["completed"], done.counts["dead"], done.counts["cancelled"]) == (10, 3, 2)
    assert done.counts["attempts"] == 13 and done.batches == 4
    assert snapshot(store, open_ids) == before  # the open steps are untouched
    assert not rows(store, "SELECT 1 FROM finished_attempts WHERE step_id = ANY(CAST(:i AS"
                    " bigint[]))", i=steps["completed"] + steps["dead"])
    # The retried step's failed attempt is still there: its step is open.
    assert rows(store, "SELECT count(*) FROM finished_attempts WHERE step_id = ANY(CAST(:i AS"
                " bigint[]))", i=steps["failed"])[0][0] == 2

    report = check(store, final=False)
    assert report.violations == [] and report.valid is None  # steps still open
    pruned = report.counts["pruned"]
    assert (pruned["steps"], pruned["completed"], pruned["dead"], pruned["cancelled"]) == (
        15, 10, 3, 2)
    assert report.counts["steps"] + pruned["steps"] == total
    assert report.counts["step_id_gaps"] == 0  # pruned ids are not gaps

    # Finish the rest: the whole history is valid, and every step accounted for.
    def finish() -> bool:
        for c in store.claim_steps("p1", ["default", "retried"], batch=20):
            store.complete(c.id, c.claim_token, "late")
        return all(store.get_step(i).status == "completed"  # type: ignore[union-attr]
                   for i in open_ids)

    for i in steps["claimed"]:
        step = store.get_step(i)
        assert step is not None and step.claim_token is not None
        store.complete(i, step.claim_token, "late")
    wait_until(finish, 20, what="every open step completed")
    final = check(store, final=True)
    assert final.valid is True, final.summary()
    assert final.counts["steps"] + final.counts["pruned"]["steps"] == total


@pytest.mark.timeout(60)
def test_a_step_named_by_an_open_leader_term_is_kept_until_the_term_ends(store: Store) -> None:
    ids = store.submit_many([StepSpec("default", {})] * 2)
    store.register_pod("p1")
    claimed = store.claim_steps("p1", ["default"], batch=2)
    for c in claimed:
        store.complete(c.id, c.claim_token, None)
    # A leader action about the first step under a term still open: whether
    # it lay inside its term is not decided until the term ends.
    rows(store, "INSERT INTO leader_terms (term, pod_id, started_at, expires_at)"
         " VALUES (1, 'p1', statement_timestamp(), statement_timestamp() + interval '1 h')"
         " RETURNING term")
    rows(store, "INSERT INTO leader_actions (term, pod_id, action, target_pod, step_id,"
         " claim_token, at) VALUES (1, 'p1', 'requeue', 'p1', :s, 0, statement_timestamp())"
         " RETURNING id", s=ids[0])
    first = prune(store, 0)
    assert first.steps == 1 and store.get_step(ids[0]) is not None
    assert store.get_step(ids[1]) is None

    rows(store, "UPDATE leader_terms SET ended_at = statement_timestamp() RETURNING term")
    second = prune(store, 0)
    assert second.steps == 1 and second.counts["leader_actions"] == 1
    assert store.get_step(ids[0]) is None


@pytest.mark.timeout(60)
def test_a_step_whose_history_is_still_written_is_kept(store: Store) -> None:
    ids = store.submit_many([StepSpec("default", {})] * 3)
    store.register_pod("p1")
    for c in store.claim_steps("p1", ["default"], batch=3):
        store.complete(c.id, c.claim_token, None)
    # All three finished an hour ago (as the step rows say) ...
    rows(store, "UPDATE steps SET created_at = created_at - interval '1 h',"
         " claimed_at = claimed_at - interval '1 h', finished_at = finished_at - interval '1 h'"
         " RETURNING id")
    rows(store, "UPDATE finished_attempts SET claimed_at = claimed_at - interval '1 h',"
         " finished_at = finished_at - interval '1 h' WHERE step_id <> :i RETURNING 1",
         i=ids[1])
    # ... but a refused write of the first landed just now, and the second's
    # attempt ended just now: their history is still being written.
    rows(store, "INSERT INTO rejected_writes (claim_token, step_id, at)"
         " VALUES (0, :i, statement_timestamp()) RETURNING 1", i=ids[0])
    dry = prune(store, 60, dry_run=True)
    done = prune(store, 60)
    assert dry.steps == done.steps == 1
    assert [store.get_step(i) is not None for i in ids] == [True, True, False]


@pytest.mark.timeout(60)
def test_a_prune_skips_a_locked_step_and_never_waits_for_it(store: Store) -> None:
    import sqlalchemy as sa

    ids = store.submit_many([StepSpec("default", {})] * 3)
    store.register_pod("p1")
    for c in store.claim_steps("p1", ["default"], batch=3):
        store.complete(c.id, c.claim_token, None)
    with store._tx.begin() as held:  # another client holds the second step's row
        held.execute(sa.text("SELECT id FROM steps WHERE id = :i FOR UPDATE"), {"i": ids[1]})
        first = prune(store, 0)  # returns although the row stays locked
        assert first.steps == 2
    assert store.get_step(ids[1]) is not None
    assert prune(store, 0).steps == 1 and store.get_step(ids[1]) is None
    assert check(store, final=True).valid is True


@pytest.mark.timeout(240)
def test_pruning_while_a_fleet_drains_loses_nothing(store_config: StoreConfig, store: Store,
                                                    tmp_path: Path) -> None:
    total = 400
    rounds: list[int] = []
    with running_fleet(store_config, tmp_path, pods=3, batch=10, steps=total, rate=200.0,
                       workload="sleep:5", timings=FAST) as fleet:

        def drained() -> bool:
            fleet.poll()
            rounds.append(prune(store, 0.05, batch=25).steps)
            counts = store.status_counts()
            pruned = check_pruned(store)
            return counts["completed"] + counts["dead"] + pruned == total

        wait_until(drained, 150, interval=0.1, what=f"{total} steps finished or pruned")
        # A few more through the CLI, left unpruned: the broken case below needs them.
        more = fleetsim(tmp_path, store_config, "submit", "--count", "5")
        assert more.returncode == 0, more.stderr

        def finished() -> bool:
            fleet.poll()
            return store.status_counts()["completed"] + check_pruned(store) == total + 5

        wait_until(finished, 60, interval=0.1, what="5 more steps completed")
    assert sum(rounds) > 0 and sum(1 for n in rounds if n) >= 2, rounds  # pruned while live
    total += 5

    folder = history_dir(tmp_path, store_config.schema or "fleetsim")
    report = check(store, final=True, client_histories=folder)
    assert report.valid is True, report.summary()
    assert report.counts["steps"] + report.counts["pruned"]["steps"] == total
    assert report.counts["clients"]["client_submits"] == total  # the clients were judged

    # Every step a submitter was given is either in the store or on record as pruned.
    submitted = sorted(int(i) for log in read_histories(folder) if log.role == "submit"
                       for r in log.records if r.get("type") == "submit"
                       for i in r.get("ids", ()))
    assert len(submitted) == total
    present = {int(r[0]) for r in rows(store, "SELECT id FROM steps")}
    recorded = {int(r[0]) for r in rows(
        store, "SELECT i FROM unnest(CAST(:ids AS bigint[])) i, step_prunes p"
        " WHERE i <@ p.step_ids", ids=submitted)}
    assert present | recorded == set(submitted) and not present & recorded

    # The broken case: a step deleted with its history but no record is lost,
    # and check says so (the clients saw it submitted and completed).
    victim = submitted[-1]
    assert victim in present
    rows(store, "WITH a AS (DELETE FROM finished_attempts WHERE step_id = :i RETURNING 1),"
         " s AS (DELETE FROM steps WHERE id = :i RETURNING 1) SELECT count(*) FROM s", i=victim)
    broken = check(store, final=True, client_histories=folder)
    assert broken.valid is False
    lost = [v for v in broken.violations if v.witness.get("step_id") == victim]
    assert {v.invariant for v in lost} >= {"acknowledged_submit", "acknowledged_write"}, \
        broken.summary()
    # Unaccounted for, unlike the pruned ones.
    assert broken.counts["step_id_gaps"] == report.counts["step_id_gaps"] + 1
    assert all(v.witness.get("step_id") == victim for v in broken.violations), broken.summary()


def check_pruned(store: Store) -> int:
    return int(rows(store, "SELECT coalesce(sum(completed + dead + cancelled), 0)"
                    " FROM step_prunes")[0][0])


@pytest.mark.timeout(60)
def test_a_prune_done_wrong_is_caught_by_check(store: Store) -> None:
    steps = mixed_store(store)
    done = steps["completed"]
    prune(store, 3600)  # creates step_prunes; prunes nothing
    assert check(store, final=False).violations == []

    # A step deleted but its attempts left behind: orphan attempts.
    rows(store, "DELETE FROM steps WHERE id = :i RETURNING id", i=done[0])
    report = check(store, final=False)
    assert [(v.invariant, v.witness.get("kind")) for v in report.violations] == [
        ("history_integrity", "orphan_attempt")]

    # A step recorded as pruned that is still there: counted twice.
    rows(store, "INSERT INTO step_prunes (prune_id, at, cutoff, older_than_s, step_ids,"
         " completed, dead, cancelled, attempts, rejected_writes, leader_actions)"
         " VALUES (gen_random_uuid(), now(), now(), 0, int8multirange(int8range(:i, :i, '[]')),"
         " 1, 0, 0, 1, 0, 0) RETURNING id", i=done[1])
    report = check(store, final=False)
    kinds = sorted(str(v.witness.get("kind")) for v in report.violations)
    assert kinds == ["orphan_attempt", "pruned_but_present"], report.summary()
    assert any("recorded as pruned" in v.message for v in report.violations)


@pytest.mark.timeout(60)
def test_a_store_never_pruned_is_checked_and_pruned(store: Store) -> None:
    mixed_store(store)
    assert not rows(store, "SELECT to_regclass('step_prunes')")[0][0]  # init makes none
    report = check(store, final=False)
    assert report.violations == [] and report.counts["pruned"]["steps"] == 0
    assert prune(store, 0, dry_run=True).steps == 15
    assert not rows(store, "SELECT to_regclass('step_prunes')")[0][0]  # a dry run neither
    assert prune(store, 0).steps == 15  # creates the table on the way
    assert check(store, final=False).counts["pruned"]["steps"] == 15


# -- the command line ---------------------------------------------------------------


@pytest.mark.timeout(90)
def test_prune_cli_json_and_dry_run(store: Store, store_config: StoreConfig,
                                    tmp_path: Path) -> None:
    mixed_store(store)
    dry = fleetsim(tmp_path, store_config, "prune", "--older-than", "0s", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] is True and doc["pruned"]["steps"] == 15
    assert store.status_counts()["completed"] == 10

    real = fleetsim(tmp_path, store_config, "prune", "--older-than", "0", "--batch", "7",
                    "--json")
    assert real.returncode == 0, real.stderr
    doc = json.loads(real.stdout)
    assert doc["pruned"] == {"steps": 15, "completed": 10, "dead": 3, "cancelled": 2,
                             "attempts": 13, "rejected_writes": 0, "leader_actions": 0}
    assert doc["older_than_s"] == 0 and doc["watermark"] and doc["batches"] == 3

    text = fleetsim(tmp_path, store_config, "prune", "--older-than", "1h")
    assert text.returncode == 0 and text.stdout.startswith("pruned 0 steps"), text.stdout
    checked = fleetsim(tmp_path, store_config, "check", "--json")
    assert checked.returncode == 2  # steps still open: unknown, but no violation
    report = json.loads(checked.stdout)
    assert report["violations"] == [] and report["counts"]["pruned"]["steps"] == 15


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("args", "needle"), [
    (["--older-than", "soon"], "invalid duration 'soon'"),
    (["--older-than", "-5m"], "cannot be negative"),
    (["--older-than", "7d"], "invalid duration '7d'"),
    ([], "give --older-than"),
    (["--older-than", "1h", "--batch", "0"], "invalid --batch '0'"),
])
def test_prune_cli_refuses_bad_input_in_one_line(store: Store, store_config: StoreConfig,
                                                 tmp_path: Path, args: list[str],
                                                 needle: str) -> None:
    store.submit("default")
    result = fleetsim(tmp_path, store_config, "prune", *args)
    assert result.returncode == 2
    assert needle in one_line_error(result)


@pytest.mark.timeout(60)
def test_prune_cli_refuses_a_schema_that_does_not_exist(store_config: StoreConfig,
                                                        tmp_path: Path) -> None:
    result = fleetsim(tmp_path, store_config, "prune", "--older-than", "1h",
                      schema="no_such_schema_here")
    assert result.returncode == 2
    assert "holds no fleetsim store" in one_line_error(result)
    probe = Store(StoreConfig(store_config.url))
    try:
        assert not rows(probe, "SELECT 1 FROM pg_namespace WHERE nspname = 'no_such_schema_here'")
    finally:
        probe.close()
