"""The checker cross-examines the store with the clients' own histories.

A real fleet runs with client histories; the verdict is valid and every
client check ran. Then the store's history is corrupted the ways a broken
store would write it, each one after the other, and each must be caught by
the client evidence (the store's own record stays self-consistent).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetsim.checker import CLIENT_INVARIANTS, check
from fleetsim.client_history import history_dir, read_histories
from fleetsim.store import Store, StoreConfig
from tests.helpers import rows, running_fleet, wait_drained

STEPS = 300


def _totals(store: Store, folder: Path) -> dict[str, int]:
    report = check(store, final=True, client_histories=folder)
    totals: dict[str, int] = report.counts["violations"]
    return {name: totals[name] for name in CLIENT_INVARIANTS}


@pytest.mark.timeout(120)
def test_client_histories_catch_what_the_store_history_cannot(
    store: Store, store_config: StoreConfig, tmp_path: Path
) -> None:
    with running_fleet(store_config, tmp_path, pods=2, batch=10, steps=STEPS,
                       workload="fail:0.3") as fleet:
        wait_drained(fleet, store, STEPS, 60)
    folder = history_dir(tmp_path, store_config.schema or "fleetsim")
    logs = read_histories(folder)
    assert {log.role for log in logs} == {"pod", "submit"}
    assert all(log.complete for log in logs), "a clean stop closes every history"

    report = check(store, final=True, client_histories=folder)
    assert report.valid is True, report.summary()
    assert report.counts["skipped_checks"] == []
    assert report.counts["clients"]["client_claims"] >= STEPS
    clean = _totals(store, folder)
    assert set(clean.values()) == {0}

    def caught(invariant: str, sql: str) -> None:
        before = _totals(store, folder)[invariant]
        rows(store, sql + " RETURNING 1")
        after = _totals(store, folder)
        assert after[invariant] > before, f"{invariant} missed: {sql}"

    # An erased failure: the attempt's row removed (the step's counter too).
    caught("acknowledged_write", """
        WITH gone AS (
            DELETE FROM finished_attempts WHERE ctid = (
                SELECT ctid FROM finished_attempts WHERE outcome = 'failed' LIMIT 1)
            RETURNING step_id)
        UPDATE steps SET attempts = attempts - 1 WHERE id IN (SELECT step_id FROM gone)""")
    # A completed step whose stored result is not the one its pod sent.
    caught("acknowledged_write", """
        UPDATE steps SET result = '{"forged": true}' WHERE id = (
            SELECT min(id) FROM steps WHERE status = 'completed')""")
    # A completion credited to the other pod: a claim it never received.
    caught("unclaimed_write", """
        UPDATE finished_attempts SET pod_id = CASE pod_id WHEN 'pod-1' THEN 'pod-2'
                                                          ELSE 'pod-1' END
         WHERE ctid = (SELECT ctid FROM finished_attempts WHERE outcome = 'completed'
                        ORDER BY claim_token DESC LIMIT 1 OFFSET 5)""")
    # A token a pod was handed that the store has no record of.
    caught("phantom_claim", """
        DELETE FROM finished_attempts WHERE ctid = (
            SELECT ctid FROM finished_attempts WHERE outcome = 'released'
             UNION ALL SELECT ctid FROM finished_attempts WHERE outcome = 'completed'
             LIMIT 1)""")
    # An acknowledged submit whose step is gone, history and all.
    caught("acknowledged_submit", """
        WITH victim AS (SELECT max(id) AS id FROM steps),
             attempts AS (DELETE FROM finished_attempts
                           WHERE step_id = (SELECT id FROM victim))
        DELETE FROM steps WHERE id = (SELECT id FROM victim)""")


@pytest.mark.timeout(60)
def test_a_write_acknowledged_twice_and_a_refused_one_that_landed_are_caught(
    store: Store, tmp_path: Path
) -> None:
    """Client histories written by hand against a real store history."""
    from fleetsim.store import StepSpec

    [step] = store.submit_many([StepSpec("default", {})])
    store.register_pod("pod-a")
    [claim] = store.claim_steps("pod-a")
    assert store.complete(claim.id, claim.claim_token, {"r": 1}).name == "ACCEPTED"
    folder = tmp_path / "h"
    folder.mkdir()

    def write(name: str, records: list[dict[str, object]]) -> None:
        lines = [{"type": "open", "role": "pod", "pod": name, "incarnation": 0}, *records,
                 {"type": "close"}]
        (folder / f"pod-{name}.0.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in lines))

    write("pod-a", [{"type": "claim", "ids": [step], "tokens": [claim.claim_token]},
                    {"type": "write", "op": "complete", "reply": "accepted", "accepted": [step],
                     "ids": [step], "tokens": [claim.claim_token]}])
    assert set(_totals(store, folder).values()) == {0}
    # Another pod says it too was told "completed", with a token the store never issued.
    write("pod-b", [{"type": "claim", "ids": [step], "tokens": [claim.claim_token + 100]},
                    {"type": "write", "op": "complete", "reply": "accepted", "accepted": [step],
                     "ids": [step], "tokens": [claim.claim_token + 100]}])
    totals = _totals(store, folder)
    assert totals["double_acknowledgement"] == 1
    assert totals["phantom_claim"] == 1
    assert totals["acknowledged_write"] == 1
    # pod-a was told its completion was refused, yet the store completed it.
    (folder / "pod-pod-b.0.jsonl").unlink()
    write("pod-a", [{"type": "claim", "ids": [step], "tokens": [claim.claim_token]},
                    {"type": "write", "op": "complete", "reply": "accepted", "accepted": [],
                     "ids": [step], "tokens": [claim.claim_token]}])
    assert _totals(store, folder)["acknowledged_write"] == 1


@pytest.mark.timeout(30)
def test_without_client_histories_the_client_checks_are_skipped_and_said(
    store: Store, tmp_path: Path
) -> None:
    report = check(store, final=True, client_histories=tmp_path / "none")
    assert report.valid is True
    assert len(report.counts["skipped_checks"]) == len(CLIENT_INVARIANTS)
    assert "skipped (no client histories)" in report.summary()


def _history_file(folder: Path, name: str, pod: str, records: list[dict[str, object]],
                  *, closed: bool) -> None:
    lines = [{"type": "open", "role": "pod", "pod": pod, "incarnation": 0}, *records]
    if closed:
        lines.append({"type": "close"})
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.mark.timeout(60)
def test_two_processes_under_one_incarnation_and_a_lost_tail_are_no_violation(
    store: Store, tmp_path: Path
) -> None:
    """A second run reuses pod-a/0; its process is killed before its last claim was flushed."""
    from fleetsim.store import StepSpec

    store.submit_many([StepSpec("default", {})] * 6)
    runs = []
    for pid in (1, 2):
        store.register_pod("pod-a", pid=pid, host="h")
        steps = store.claim_steps("pod-a", batch=3)
        store.complete_many([(s.id, s.claim_token, None) for s in steps])
        store.stop_pod("pod-a")
        runs.append(steps)
    folder = tmp_path / "h"
    folder.mkdir()
    first, second = runs
    _history_file(folder, "pod-a.0.1.jsonl", "pod-a", [
        {"type": "claim", "ids": [s.id for s in first], "tokens": [s.claim_token for s in first]},
    ], closed=True)
    # Killed: the second run's file lost its last claim record.
    _history_file(folder, "pod-a.0.2.jsonl", "pod-a", [
        {"type": "claim", "ids": [s.id for s in second[:2]],
         "tokens": [s.claim_token for s in second[:2]]},
    ], closed=False)
    report = check(store, final=True, client_histories=folder)
    assert report.valid is True, report.summary()
    assert report.counts["clients"]["killed_clients"] == 1


@pytest.mark.timeout(60)
def test_results_are_compared_as_jsonb_keeps_them(store: Store, tmp_path: Path) -> None:
    """jsonb stores numbers as numeric: 1e16 comes back as an integer, -0.0 as 0."""
    from fleetsim.client_history import result_digest
    from fleetsim.store import StepSpec

    [step_id] = store.submit_many([StepSpec("default", {})])
    store.register_pod("pod-a")
    [claim] = store.claim_steps("pod-a")
    result = {"big": 1e16, "zero": -0.0, "half": 0.5, "list": [2.0, "s"]}
    store.complete(claim.id, claim.claim_token, result)
    folder = tmp_path / "h"
    folder.mkdir()
    _history_file(folder, "pod-a.0.1.jsonl", "pod-a", [
        {"type": "claim", "ids": [step_id], "tokens": [claim.claim_token]},
        {"type": "write", "op": "complete", "ids": [step_id], "tokens": [claim.claim_token],
         "digests": [result_digest(result)], "reply": "accepted", "accepted": [step_id]},
    ], closed=True)
    assert _totals(store, folder)["acknowledged_write"] == 0
