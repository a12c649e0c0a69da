"""Blind spots of a store-only checker, closed: each corruption of a real history is caught.

Every test takes a private copy of the real history that
``test_checker.build_history`` recorded through the Store API (claims,
completions, failures, releases, cancels, a leader that dies and is
recovered, a graceful handover), edits its tables with SQL the way an
adversary or a broken store would, and checks that ``check`` names the
specific violation. Where the store alone cannot see a corruption, a test
shows that too, so the limit in docs/reference/checker.md stays true.
"""

from __future__ import annotations

from typing import Any

import pytest

from fleetsim.checker import check
from tests.integration import test_checker as recorded
from tests.integration.test_checker import History, _single_attempt_completed, only

# The real history and each test's private copy of it (module fixtures).
template = recorded.template
history = recorded.history

pytestmark = pytest.mark.timeout(90)


def kinds(report: Any, invariant: str) -> set[str]:
    return {v.witness["kind"] for v in report.violations if v.invariant == invariant}


def integrity(history: History) -> list[dict[str, Any]]:
    """The history_integrity witnesses of a report that must have no other violation."""
    report = check(history.store)
    for v in report.violations:  # each rule has its own one-line message
        assert not v.message.startswith(f"{v.invariant} ("), v.message
    return only(report, "history_integrity")


def test_attempts_whose_step_was_deleted(history: History) -> None:
    step_id, token, pod = _single_attempt_completed(history.db)
    history.db.all("DELETE FROM steps WHERE id = %s", step_id)
    (w,) = integrity(history)
    assert (w["kind"], w["step_id"], w["claim_token"], w["pod"]) == (
        "orphan_attempt", step_id, token, pod
    )


def test_dead_lettered_step_deleted_with_its_attempts(history: History) -> None:
    db = history.db
    step_id = db.one("SELECT step_id FROM leader_actions WHERE action = 'dead_letter' LIMIT 1")
    db.all("DELETE FROM finished_attempts WHERE step_id = %s", step_id)
    db.all("DELETE FROM rejected_writes WHERE step_id = %s", step_id)
    db.all("DELETE FROM steps WHERE id = %s", step_id)
    found = integrity(history)
    assert {(w["kind"], w["step_id"]) for w in found} >= {("missing_step", step_id)}


def test_completed_step_deleted_with_its_attempts_leaves_a_gap(history: History) -> None:
    # Nothing else names a completed step: the store alone shows only a gap in
    # the step ids, which is not proof (rolled-back submits leave gaps too).
    db = history.db
    assert check(history.store).counts["step_id_gaps"] == 0
    step_id, _, _ = _single_attempt_completed(db)
    db.all("DELETE FROM finished_attempts WHERE step_id = %s", step_id)
    db.all("DELETE FROM steps WHERE id = %s", step_id)
    report = check(history.store)
    assert report.valid is True  # the documented limit: needs the client history
    assert report.counts["step_id_gaps"] == 1
    # The newest step too: the sequence remembers the id it handed out.
    db.all("DELETE FROM steps WHERE id = (SELECT max(id) FROM steps)")
    assert check(history.store).counts["step_id_gaps"] == 2


def test_completion_credited_to_a_pod_that_never_registered(history: History) -> None:
    step_id, token, _ = _single_attempt_completed(history.db)
    history.db.all("UPDATE finished_attempts SET pod_id = 'pod-x' WHERE claim_token = %s", token)
    history.db.all("UPDATE steps SET claimed_by = 'pod-x' WHERE id = %s", step_id)
    (w,) = integrity(history)
    assert (w["kind"], w["pod"]) == ("unknown_pod", "pod-x")


def test_completion_credited_to_an_incarnation_that_never_registered(history: History) -> None:
    step_id, token, pod = _single_attempt_completed(history.db)
    history.db.all("UPDATE finished_attempts SET incarnation = 7 WHERE claim_token = %s", token)
    history.db.all("UPDATE steps SET claim_incarnation = 7 WHERE id = %s", step_id)
    (w,) = integrity(history)
    assert (w["kind"], w["step_id"], w["pod"], w["incarnation"]) == (
        "unknown_incarnation", step_id, pod, 7
    )


def test_completion_credited_to_another_pod_than_the_step_shows(history: History) -> None:
    step_id, token, pod = _single_attempt_completed(history.db)
    other = "pod-3" if pod != "pod-3" else "pod-2"
    history.db.all("UPDATE finished_attempts SET pod_id = %s WHERE claim_token = %s", other, token)
    (w,) = integrity(history)
    assert (w["kind"], w["step_id"], w["attempt_pod"], w["step_pod"]) == (
        "attempt_mismatch", step_id, other, pod
    )


@pytest.mark.parametrize("when", ["hour_before_claim", "year_2100"])
def test_attempt_that_ends_before_it_starts_or_in_the_future(history: History, when: str) -> None:
    step_id, token, _ = _single_attempt_completed(history.db)
    value = (
        "claimed_at - interval '1 hour'" if when == "hour_before_claim"
        else "TIMESTAMPTZ '2100-01-01 00:00:00+00'"
    )
    history.db.all(f"UPDATE finished_attempts SET finished_at = {value} WHERE claim_token = %s",
                   token)
    history.db.all(f"UPDATE steps SET finished_at = {value} WHERE id = %s", step_id)
    found = integrity(history)
    kind = "ends_before_start" if when == "hour_before_claim" else "future_time"
    assert {w["kind"] for w in found} == {kind}
    assert {w["step_id"] for w in found} == {step_id}
    assert {w["what"] for w in found} == {"attempt", "step"}


@pytest.mark.parametrize("lease", ["kept", "reset"])
def test_all_leader_terms_and_actions_deleted(history: History, lease: str) -> None:
    db = history.db
    db.all("DELETE FROM leader_terms")
    db.all("DELETE FROM leader_actions")
    if lease == "reset":
        db.all("UPDATE leader_lease SET holder = NULL, term = 0, acquired_at = NULL")
    found = integrity(history)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for w in found:
        by_kind.setdefault(w["kind"], []).append(w)
    # pod-4 was marked dead and its claims revoked: someone led then.
    assert {w["pod"] for w in by_kind["unlogged_death"]} == {"pod-4"}
    assert {w["pod"] for w in by_kind["unlogged_revocation"]} == {"pod-4"}
    if lease == "kept":
        assert {w["term"] for w in by_kind["missing_term"]} == {1, 2, 3}
    else:
        assert "missing_term" not in by_kind


def test_revocation_with_no_leader_action(history: History) -> None:
    db = history.db
    token, step_id = db.one(
        "SELECT claim_token, step_id FROM leader_actions WHERE action = 'requeue' LIMIT 1"
    )
    db.all("DELETE FROM leader_actions WHERE claim_token = %s", token)
    (w,) = integrity(history)
    assert (w["kind"], w["claim_token"], w["step_id"]) == ("unlogged_revocation", token, step_id)


def test_revocation_in_a_term_its_holder_never_had(history: History) -> None:
    token = history.db.one(
        "SELECT claim_token FROM leader_actions WHERE action = 'requeue' LIMIT 1"
    )
    # Credited to pod-2, which held term 3, not term 2.
    history.db.all("UPDATE leader_actions SET pod_id = 'pod-2' WHERE claim_token = %s", token)
    (w,) = only(check(history.store), "split_brain")
    assert (w["claim_token"], w["pod"], w["term_pod"]) == (token, "pod-2", "pod-1")


def test_revocation_dated_before_its_claim(history: History) -> None:
    db = history.db
    token, step_id = db.one(
        "SELECT claim_token, step_id FROM leader_actions WHERE action = 'requeue' LIMIT 1"
    )
    # Both records of the revocation moved to a second before the claim (and
    # the term's start moved with them, so the action stays inside it).
    db.all(
        """WITH a AS (SELECT claimed_at - interval '1 s' AS t FROM finished_attempts
                       WHERE claim_token = %s)
           UPDATE leader_actions SET at = (SELECT t FROM a) WHERE claim_token = %s""",
        token, token,
    )
    db.all("UPDATE finished_attempts SET finished_at = claimed_at - interval '1 s'"
           " WHERE claim_token = %s", token)
    db.all("UPDATE leader_terms SET started_at = started_at - interval '10 s' WHERE term = 2")
    db.all("UPDATE leader_terms SET expires_at = expires_at - interval '10 s',"
           " ended_at = ended_at - interval '10 s' WHERE term = 1")
    db.all("UPDATE leader_terms SET started_at = started_at - interval '20 s',"
           " expires_at = expires_at - interval '10 s' WHERE term = 1")
    found = integrity(history)
    assert {(w["kind"], w["what"], w["step_id"]) for w in found} == {
        ("ends_before_start", "attempt", step_id),
        ("ends_before_start", "revocation", step_id),
    }


def test_revocation_action_dated_apart_from_the_attempt_it_ended(history: History) -> None:
    db = history.db
    token, step_id = db.one(
        "SELECT claim_token, step_id FROM leader_actions WHERE action = 'requeue' LIMIT 1"
    )
    db.all("UPDATE leader_actions SET at = at - interval '1 ms' WHERE claim_token = %s", token)
    (w,) = integrity(history)
    assert (w["kind"], w["step_id"], w["claim_token"]) == ("revocation_mismatch", step_id, token)


def test_revoked_attempt_overlapping_the_next_claim(history: History) -> None:
    db = history.db
    token, step_id, next_token = db.one(
        """SELECT a.claim_token, a.step_id, min(b.claim_token)
             FROM finished_attempts a JOIN finished_attempts b
               ON b.step_id = a.step_id AND b.claim_token > a.claim_token
            WHERE a.outcome = 'lease_lost'
            GROUP BY a.claim_token, a.step_id ORDER BY a.claim_token LIMIT 1"""
    )
    # The next claim moved to halfway through the revoked one (on the step's
    # row too, if it is the step's last claim).
    db.all(
        """UPDATE finished_attempts b
              SET claimed_at = a.claimed_at + (a.finished_at - a.claimed_at) / 2
             FROM finished_attempts a
            WHERE a.claim_token = %s AND b.claim_token = %s""",
        token, next_token,
    )
    db.all(
        """UPDATE steps s SET claimed_at = b.claimed_at FROM finished_attempts b
            WHERE b.claim_token = %s AND s.claim_token = b.claim_token""",
        next_token,
    )
    report = check(history.store)
    (w,) = only(report, "exclusive_claims")
    assert (w["step_id"], w["claim_token"], w["next_claim_token"]) == (step_id, token, next_token)
    assert f"token {token}" in report.violations[0].message


def test_open_claim_overlapping_a_later_attempt(history: History) -> None:
    # A step shown as still claimed by its first token after a later attempt ran.
    db = history.db
    step_id, first, first_claimed, first_pod = db.one(
        """SELECT a.step_id, a.claim_token, a.claimed_at, a.pod_id FROM finished_attempts a
            WHERE a.outcome = 'released'
              AND EXISTS (SELECT 1 FROM finished_attempts b WHERE b.step_id = a.step_id
                             AND b.claim_token > a.claim_token)
            ORDER BY a.claim_token LIMIT 1"""
    )
    db.all("DELETE FROM finished_attempts WHERE claim_token = %s", first)
    db.all(
        """UPDATE steps SET status = 'claimed', claim_token = %s, claimed_at = %s,
                            claimed_by = %s, finished_at = NULL WHERE id = %s""",
        first, first_claimed, first_pod, step_id,
    )
    report = check(history.store)
    witnesses = [v.witness for v in report.violations if v.invariant == "exclusive_claims"]
    assert [(w["step_id"], w["claim_token"]) for w in witnesses] == [(step_id, first)]


def test_failed_attempt_erased_and_attempts_decremented(history: History) -> None:
    db = history.db
    step_id, token = db.one(
        """SELECT s.id, a.claim_token FROM steps s JOIN finished_attempts a ON a.step_id = s.id
            WHERE s.status = 'completed' AND s.attempts = 1 AND a.outcome = 'failed'
            ORDER BY s.id LIMIT 1"""
    )
    db.all("DELETE FROM finished_attempts WHERE claim_token = %s", token)
    db.all("UPDATE steps SET attempts = attempts - 1 WHERE id = %s", step_id)
    (w,) = integrity(history)
    assert (w["kind"], w["step_id"]) == ("erased_failure", step_id)
    # Also wiping the step's last error leaves nothing in the store to see:
    # the documented limit (the client history will show the accepted fail).
    db.all("UPDATE steps SET error = NULL WHERE id = %s", step_id)
    assert check(history.store).valid is True


def test_failed_attempt_erased_without_fixing_the_counter(history: History) -> None:
    db = history.db
    step_id, token = db.one(
        """SELECT s.id, a.claim_token FROM steps s JOIN finished_attempts a ON a.step_id = s.id
            WHERE s.status = 'completed' AND s.attempts = 1 AND a.outcome = 'failed'
            ORDER BY s.id LIMIT 1"""
    )
    db.all("DELETE FROM finished_attempts WHERE claim_token = %s", token)
    report = check(history.store)
    assert ("dlq", step_id) in {(v.invariant, v.witness.get("step_id"))
                                for v in report.violations}


def test_duplicate_claim_token(history: History) -> None:
    db = history.db
    _, token, _ = _single_attempt_completed(db)
    other = db.one("SELECT id FROM steps WHERE status = 'cancelled' AND attempts = 0"
                   " ORDER BY id LIMIT 1")
    db.all(
        """INSERT INTO finished_attempts (claim_token, step_id, pod_id, claimed_at,
                                          finished_at, outcome)
           SELECT claim_token, %s, pod_id, claimed_at, claimed_at, 'released'
             FROM finished_attempts WHERE claim_token = %s""",
        other, token,
    )
    found = integrity(history)
    assert ("duplicate_token", token) in {(w["kind"], w["claim_token"]) for w in found}


@pytest.mark.parametrize(
    ("what", "sql"),
    [
        ("claim_before_submit",
         "UPDATE steps SET created_at = finished_at + interval '1 ms' WHERE id = %(step)s"),
        ("term", "UPDATE leader_terms SET ended_at = started_at - interval '1 s',"
                 " expires_at = started_at - interval '1 s' WHERE term = 3"),
        ("pod", "UPDATE pods SET heartbeat_at = started_at - interval '1 s'"
                " WHERE id = %(pod)s"),
    ],
)
def test_other_instants_out_of_order(history: History, what: str, sql: str) -> None:
    step_id, _, pod = _single_attempt_completed(history.db)
    history.db.conn.cursor().execute(sql, {"step": step_id, "pod": pod})
    report = check(history.store)
    found = [v.witness for v in report.violations if v.invariant == "history_integrity"]
    assert what in {w["what"] for w in found if w["kind"] == "ends_before_start"}, (
        report.summary()
    )


@pytest.mark.parametrize(
    ("what", "sql"),
    [
        ("term", "UPDATE leader_terms SET ended_at = TIMESTAMPTZ '2100-01-01Z' WHERE term = 3"),
        ("leader_action", "UPDATE leader_actions SET at = TIMESTAMPTZ '2100-01-01Z'"
                          " WHERE id = (SELECT min(id) FROM leader_actions)"),
        ("pod", "UPDATE pods SET heartbeat_at = TIMESTAMPTZ '2100-01-01Z' WHERE id = 'pod-1'"),
        ("rejected_write", "UPDATE rejected_writes SET at = TIMESTAMPTZ '2100-01-01Z'"),
        ("step", "UPDATE steps SET created_at = TIMESTAMPTZ '2100-01-01Z'"
                 " WHERE id = (SELECT min(id) FROM steps WHERE status = 'cancelled')"),
    ],
)
def test_other_instants_in_the_future(history: History, what: str, sql: str) -> None:
    history.db.all(sql)
    report = check(history.store)
    found = [v.witness for v in report.violations if v.invariant == "history_integrity"]
    assert what in {w["what"] for w in found if w["kind"] == "future_time"}, report.summary()


def test_completed_step_without_any_accepted_completion(history: History) -> None:
    step_id, token, _ = _single_attempt_completed(history.db)
    history.db.all("UPDATE finished_attempts SET outcome = 'released' WHERE claim_token = %s",
                   token)
    report = check(history.store)
    (w,) = only(report, "duplicate_completion")
    assert w["step_id"] == step_id and w["claim_token"] == token
    assert "no attempt of it recorded an accepted completion" in report.violations[0].message


def test_only_completion_is_not_the_latest_claim(history: History) -> None:
    # A completed step whose row shows a newer claim than the one that completed it.
    db = history.db
    step_id, token, _ = _single_attempt_completed(db)
    later = db.one("SELECT max(claim_token) + 1000 FROM finished_attempts")
    db.all("UPDATE steps SET claim_token = %s WHERE id = %s", later, step_id)
    report = check(history.store)
    stale = [v for v in report.violations if v.invariant == "stale_write"]
    assert [(v.witness["step_id"], v.witness["claim_token"]) for v in stale] == [(step_id, token)]
    assert "latest claim is token" in stale[0].message
