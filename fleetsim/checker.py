"""The checker: does a recorded history keep fleetsim's invariants?

:func:`check` reads the history a store recorded (steps, their attempts,
pods, leader terms and leader actions) and verifies, in SQL on one snapshot:

====================== ==================================================
``lost_step``          every step ended completed, dead or cancelled
``duplicate_completion`` each completed step has exactly one accepted completion
``stale_write``        no write was accepted with a superseded claim token
``split_brain``        leader terms never overlap; every leader action lies
                       inside its term and was taken by its holder
``fifo_order``         strict-FIFO queues start steps in submission order
``concurrency_limit``  a queue's concurrency limit was never exceeded
``dlq``                exactly the steps that spent ``max_attempts`` are dead
``exclusive_claims``   the attempts of one step never overlap in time
``history_integrity``  the history is whole and consistent with itself: no
                       attempt without its step, no unknown pod, no instant
                       out of order or in the future, no revocation, death or
                       term missing where other records prove one; no
                       step both present and recorded as pruned
====================== ==================================================

Steps deleted by ``fleetsim prune`` (:mod:`fleetsim.store.prune`) are gone
with their history, on purpose and on record: ``counts["pruned"]`` holds
their totals, and the checks judge what remains.

The verdict is ``True`` (valid), ``False`` (at least one violation) or
``None`` (no violation, but steps are still in flight, so "no lost step" is
not proven yet; ``final=True`` counts them as lost instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetsim.crosscheck import CLIENT_INVARIANTS, cross_examine
from fleetsim.store import Store
from fleetsim.store.checks import INVARIANTS, Finding, check_history

__all__ = [
    "CLIENT_INVARIANTS",
    "EXIT_INVALID",
    "EXIT_UNKNOWN",
    "EXIT_VALID",
    "INVARIANTS",
    "CheckReport",
    "Violation",
    "check",
]

#: Exit codes of ``fleetsim check``.
EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_UNKNOWN = 2  # steps in flight, or not a fleetsim store

#: Witnesses kept per invariant; the total count of each is always exact.
DEFAULT_MAX_WITNESSES = 20


@dataclass(frozen=True)
class Violation:
    """One broken invariant, with the minimal rows that prove it."""

    invariant: str  # one of INVARIANTS
    message: str
    witness: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"invariant": self.invariant, "message": self.message, "witness": self.witness}


@dataclass(frozen=True)
class CheckReport:
    """The checker's verdict on one history."""

    valid: bool | None
    violations: list[Violation] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 valid, 1 invalid, 2 unknown (steps still in flight)."""
        if self.valid is None:
            return EXIT_UNKNOWN
        return EXIT_VALID if self.valid else EXIT_INVALID

    @property
    def verdict(self) -> str:
        """``valid``, ``invalid`` or ``unknown``."""
        return {True: "valid", False: "invalid", None: "unknown"}[self.valid]

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return {
            "valid": self.valid,
            "verdict": self.verdict,
            "violations": [v.as_dict() for v in self.violations],
            "counts": self.counts,
            "figures": self.figures,
        }

    def to_json(self, indent: int | None = None) -> str:
        """The report as JSON text (``{"valid": true|false|null, "violations": ...}``)."""
        return json.dumps(self.as_dict(), indent=indent, sort_keys=False)

    def summary(self) -> str:
        """A few human-readable lines: verdict, per-invariant totals, first witnesses."""
        totals: dict[str, int] = self.counts.get("violations", {})
        lines = [
            f"{self.verdict}: {self.counts.get('steps', 0)} steps, "
            f"{self.counts.get('attempts', 0)} attempts, {self.counts.get('terms', 0)} terms"
        ]
        pruned = self.counts.get("pruned") or {}
        if pruned.get("steps"):
            lines.append(
                f"  + {pruned['steps']} steps pruned ({pruned['completed']} completed,"
                f" {pruned['dead']} dead, {pruned['cancelled']} cancelled; finished before"
                f" {pruned['watermark']}), with {pruned['attempts']} attempts"
            )
        if self.valid is None:
            lines.append(f"  {self.counts.get('in_flight', 0)} steps still in flight")
        for name in (*INVARIANTS, *CLIENT_INVARIANTS):
            if name not in totals and name in CLIENT_INVARIANTS:
                continue  # skipped: no client histories
            n = totals.get(name, 0)
            lines.append(f"  {name:<24} {'ok' if n == 0 else f'{n} violation(s)'}")
        if self.counts.get("skipped_checks"):
            lines.append("  skipped (no client histories): "
                         + ", ".join(CLIENT_INVARIANTS))
        lines.extend(f"  note: {note}" for note in self.counts.get("notes", []))
        lines.extend(f"  - {v.message}" for v in self.violations)
        return "\n".join(lines)


def check(
    store: Store, *, final: bool = False, max_witnesses: int = DEFAULT_MAX_WITNESSES,
    client_histories: Path | None = None,
) -> CheckReport:
    """Check the history recorded in ``store`` against every invariant.

    With ``final=True`` the run is over, so steps not yet finished are
    violations (lost steps) rather than an unknown verdict. At most
    ``max_witnesses`` violations are listed per invariant; ``counts``
    ["violations"] has the exact totals. Raises SchemaMismatch if the
    database holds no fleetsim store.
    """
    facts = check_history(store, final=final, limit=max(1, max_witnesses))
    violations = [Violation(f.invariant, _message(f), f.witness) for f in facts.findings]
    # The clients' own histories, where there are any: evidence from outside the store.
    exam = cross_examine(store, client_histories, limit=max(1, max_witnesses))
    violations += [Violation(f.invariant, f.message, f.witness) for f in exam.findings]
    facts.counts["violations"].update(exam.totals if not exam.skipped else {})
    facts.counts["clients"] = exam.counts
    facts.counts["skipped_checks"] = exam.skipped
    facts.counts["notes"] = exam.notes
    valid: bool | None
    if violations:
        valid = False
    elif facts.counts["in_flight"] and not final:
        valid = None
    else:
        valid = True
    return CheckReport(valid, violations, facts.counts, facts.figures)


def _message(f: Finding) -> str:
    w = f.witness
    step = f"step {w.get('step_id')}"
    match f.invariant, f.kind:
        case "lost_step", "completion_lost":
            c = w["completions"][0] if w["completions"] else {}
            return (
                f"{step} is {w['status']} although its completion with token "
                f"{c.get('claim_token')} by {c.get('pod')} was accepted at {c.get('finished_at')}"
            )
        case "lost_step", _:
            return f"{step} of queue {w['queue']!r} never finished: it is still {w['status']}"
        case "duplicate_completion", "several":
            tokens = ", ".join(f"{c['claim_token']} by {c['pod']}" for c in w["completions"])
            return f"{step} has {len(w['completions'])} accepted completions: tokens {tokens}"
        case "duplicate_completion", _:
            return f"{step} is completed but no attempt of it recorded an accepted completion"
        case "stale_write", kind:
            head = (
                f"{step}: {w['outcome']} write with token {w['claim_token']} by {w['pod']}"
                f" accepted at {w['written_at']}"
            )
            if kind == "superseded":
                return (
                    f"{head} after token {w['newer_claim_token']} ({w['newer_pod']})"
                    f" had claimed the step at {w['newer_claimed_at']}"
                )
            if kind == "revoked":
                return (
                    f"{head} although the leader of term {w['revoked_in_term']} had"
                    f" revoked that claim at {w['revoked_at']}"
                )
            return f"{head}, but the step's latest claim is token {w['step_claim_token']}"
        case "split_brain", "overlap":
            return (
                f"leader term {w['term']} ({w['pod']}) started at {w['started_at']} while"
                f" term {w['other_term']} ({w['other_pod']}) lasted until {w['other_ended_at']}"
            )
        case "split_brain", "unknown_term":
            return (
                f"leader action {w['action_id']} ({w['action']}) by {w['pod']} names"
                f" term {w['term']}, which was never granted"
            )
        case "split_brain", "not_holder":
            return (
                f"leader action {w['action_id']} ({w['action']}) at {w['at']} was taken by"
                f" {w['pod']} under term {w['term']}, which {w['term_pod']} held"
            )
        case "split_brain", _:
            return (
                f"leader action {w['action_id']} ({w['action']}) by {w['pod']} at {w['at']}"
                f" lies outside term {w['term']} held by {w['term_pod']} from"
                f" {w['term_started_at']} to {w['term_ended_at']}"
            )
        case "fifo_order", _:
            return (
                f"{step} of strict-FIFO queue {w['queue']!r} was first claimed at"
                f" {w['claimed_at']} (token {w['claim_token']}) while earlier step"
                f" {w['earlier_step_id']} was still waiting"
            )
        case "concurrency_limit", _:
            return (
                f"queue {w['queue']!r} had {w['running']} steps claimed at {w['at']}, over"
                f" its limit of {w['limit']} (steps {w['open_step_ids']})"
            )
        case "dlq", _:
            should = "be dead" if w["spent_attempts"] >= w["max_attempts"] else "not be dead"
            return (
                f"{step} is {w['status']} with attempts={w['attempts']},"
                f" {w['spent_attempts']} spent attempts recorded, max_attempts="
                f"{w['max_attempts']}: it should {should}"
                + ("" if w["attempts"] == w["spent_attempts"] else " and counters disagree")
            )
        case "exclusive_claims", _:
            state = (
                f"was still open (outcome {w['outcome']})" if w.get("outcome") is None
                else f"ended only at {w['finished_at']} ({w['outcome']})"
            )
            return (
                f"{step}: claim with token {w['claim_token']} by {w['pod']} {state} when"
                f" token {w['next_claim_token']} ({w['next_pod']}) claimed it at"
                f" {w['next_claimed_at']}"
            )
        case "history_integrity", kind:
            return _integrity_message(kind, w)
    return f"{f.invariant} ({f.kind}): {w}"


def _integrity_message(kind: str, w: dict[str, Any]) -> str:
    step = f"step {w.get('step_id')}"
    token = f"token {w.get('claim_token')}"
    match kind:
        case "orphan_attempt":
            return f"{step} does not exist, but its attempt with {token} by {w.get('pod')} does"
        case "missing_step":
            return (
                f"{step} does not exist, nor any attempt of it, but leader action"
                f" {w.get('action')} in term {w.get('term')} names it ({token})"
            )
        case "duplicate_token":
            return f"{token} is recorded for more than one attempt (steps {w.get('step_ids')})"
        case "unknown_pod":
            return (
                f"pod {w.get('pod')!r} never registered, but {w.get('rows')} {w.get('named_by')}"
                " row(s) name it"
            )
        case "unknown_incarnation":
            return (
                f"{step}: {token} was claimed by {w.get('pod')} incarnation"
                f" {w.get('incarnation')} at {w.get('claimed_at')}, after incarnation"
                f" {w.get('registered_incarnation')} registered at {w.get('registered_at')}"
            )
        case "attempt_mismatch":
            return (
                f"{step} was completed with {token}, which the step shows claimed by"
                f" {w.get('step_pod')} but the attempt credits to {w.get('attempt_pod')}"
            )
        case "ends_before_start":
            what = w.get("what")
            return (
                f"{what} ({step}, {token}, term {w.get('term')}) ends at {w.get('ended_at')},"
                f" before it starts at {w.get('started_at')}"
            )
        case "future_time":
            return (
                f"{w.get('what')} ({step}, {token}, term {w.get('term')}) is dated"
                f" {w.get('at')}, after the check's own database time {w.get('db_now')}"
            )
        case "missing_term":
            return (
                f"leader term {w.get('term')} is missing from leader_terms (the lease is at term"
                f" {w.get('lease_term')}, {w.get('recorded_terms')} terms recorded)"
            )
        case "activity_after_exit":
            return (
                f"{step}: {w.get('what')} with {token} by {w.get('pod')} incarnation"
                f" {w.get('incarnation')} at {w.get('at')}, after that process's exit was"
                f" recorded at {w.get('exited_at')}"
            )
        case "unlogged_death":
            return (
                f"pod {w.get('pod')} was marked dead at {w.get('died_at')}, but no leader"
                " action marked it"
            )
        case "unlogged_revocation":
            return (
                f"{step}: claim with {token} by {w.get('pod')} was revoked at"
                f" {w.get('revoked_at')}, but no leader action revoked it and its pod did not"
                " register again then"
            )
        case "revocation_mismatch":
            return (
                f"{step}: leader action {w.get('action_id')} ({w.get('action')}) at {w.get('at')}"
                f" revoked {token} of {w.get('target_pod')}, but the attempt with that token"
                f" shows step {w.get('attempt_step_id')}, pod {w.get('attempt_pod')}, outcome"
                f" {w.get('attempt_outcome')}, ended {w.get('attempt_finished_at')}"
            )
        case "pruned_but_present":
            return (
                f"{step} ({w.get('status')}) is recorded as pruned at {w.get('pruned_at')}"
                f" (prune {w.get('prune_id')}), but it still exists"
            )
        case "erased_failure":
            return (
                f"{step} is {w.get('status')} and records the error {w.get('error')!r}, but no"
                " failed or revoked attempt of it"
            )
    return f"history_integrity ({kind}): {w}"
