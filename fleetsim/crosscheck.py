"""Cross-examination: the store's history against the clients' own.

The store records what its statements did; a bug in the store (a fence
removed, a row edited) can make that record self-consistent and wrong.
Each pod and submitter also keeps a client history
(:mod:`fleetsim.client_history`). The two cannot both be forged by one bug,
so :func:`cross_examine` proves, from both:

=========================== =================================================
``acknowledged_submit``     every step id a submitter was given exists
``phantom_claim``           every token a pod was handed is a claim the store
                            recorded, for that step, pod and incarnation
``acknowledged_write``      every write a pod was told was accepted shows in
                            the store as that ending of that token, and as
                            its only ending (a write accepted from a token the
                            store had superseded shows as a second ending); a
                            step a pod was told it completed is completed with
                            that token and that result; a completion a pod was
                            told was refused did not land
``double_acknowledgement``  no two claims of one step were told "completed"
``unclaimed_write``         every completion or failure the store credits to
                            a pod incarnation is of a token that incarnation
                            was handed
=========================== =================================================

A SIGKILLed client loses at most its last unflushed half second of history.
Each process keeps its own file. Claim tokens only grow, so a pod process's
history is judged complete between the lowest and the highest token it
shows, and an incarnation's histories are judged whole when they all ended
with a clean ``close``.

Steps deleted by ``fleetsim prune`` are gone from the store with their
history, on record (``step_prunes``): the clients' records of them are not
judged. A step deleted without that record is judged like any other, so its
submit and its pod's accepted writes show up as violations.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetsim.client_history import (
    ClientLog,
    accepted_ids,
    read_histories,
    result_digest,
    sent_digests,
)
from fleetsim.store import Store
from fleetsim.store.evidence import StoreEvidence, decode_result, store_evidence

CLIENT_INVARIANTS = (
    "acknowledged_submit",
    "phantom_claim",
    "acknowledged_write",
    "double_acknowledgement",
    "unclaimed_write",
)

# The ending an accepted write gives its token.
_ENDING = {"complete": "completed", "fail": "failed", "release": "released",
           "cancel": "cancelled"}


@dataclass(frozen=True)
class ClientFinding:
    """One violation that the client histories prove, with its evidence."""

    invariant: str  # one of CLIENT_INVARIANTS
    message: str
    witness: dict[str, Any]


@dataclass
class CrossExamination:
    """The outcome of :func:`cross_examine`."""

    findings: list[ClientFinding] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLIENT_INVARIANTS, 0))
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # checks not run, and why
    notes: list[str] = field(default_factory=list)

    def add(self, invariant: str, limit: int, message: str, **witness: Any) -> None:
        """Count a violation; keep its witness while under ``limit``."""
        self.totals[invariant] += 1
        if self.totals[invariant] <= limit:
            self.findings.append(ClientFinding(invariant, message, witness))


@dataclass
class _Pod:
    """One pod process's history (a file; an id and incarnation may have several)."""

    log: ClientLog
    claimed: dict[int, int] = field(default_factory=dict)  # token -> step
    min_token: int | None = None
    max_token: int = 0


def cross_examine(store: Store, directory: Path | None, *, limit: int = 20) -> CrossExamination:
    """Cross-examine ``store``'s history with the client histories in ``directory``."""
    result = CrossExamination()
    logs = read_histories(directory) if directory is not None else []
    if not logs:
        where = f" in {directory}" if directory is not None else ""
        result.skipped = [f"{name} (no client histories{where})" for name in CLIENT_INVARIANTS]
        return result

    pods: dict[tuple[str, int], list[_Pod]] = {}
    submitted: list[tuple[int, str]] = []  # (step id, history file)
    writes: list[tuple[_Pod, dict[str, Any]]] = []
    for log in logs:
        result.counts["bad_lines"] = result.counts.get("bad_lines", 0) + log.bad_lines
        if log.role == "pod" and log.pod is not None and log.incarnation is not None:
            pod = _Pod(log)
            pods.setdefault((log.pod, int(log.incarnation)), []).append(pod)
            for record in log.records:
                kind = record.get("type")
                if kind == "claim":
                    for step_id, token in zip(record.get("ids", ()), record.get("tokens", ()),
                                              strict=False):
                        pod.claimed[int(token)] = int(step_id)
                        pod.max_token = max(pod.max_token, int(token))
                        pod.min_token = int(token) if pod.min_token is None \
                            else min(pod.min_token, int(token))
                elif kind == "write":
                    writes.append((pod, record))
        elif log.role == "submit":
            submitted += [(int(i), log.path.name) for r in log.records
                          if r.get("type") == "submit" for i in r.get("ids", ())]
    completed_acks = {
        i for _, w in writes if w.get("op") == "complete" and w.get("reply") == "accepted"
        for i in accepted_ids(w)
    }
    named = {i for ps in pods.values() for p in ps for i in p.claimed.values()}
    named |= {int(i) for _, w in writes for i in w.get("ids", ())}
    evidence = store_evidence(store, [i for i, _ in submitted] + sorted(completed_acks),
                              pruned_candidates=named)
    result.counts.update({
        "client_histories": len(logs),
        "pod_histories": sum(1 for log in logs if log.role == "pod"),
        "submit_histories": sum(1 for log in logs if log.role == "submit"),
        "killed_clients": sum(1 for log in logs if not log.complete),
        "client_claims": sum(len(p.claimed) for ps in pods.values() for p in ps),
        "client_writes": len(writes),
        "client_submits": len(submitted),
    })
    if result.counts["killed_clients"]:
        result.notes.append(
            f"{result.counts['killed_clients']} client histories end without a clean close"
            " (killed): each may miss its last half second, judged above its highest token")

    _check_submits(result, evidence, submitted, limit)
    _check_claims(result, evidence, pods, limit)
    _check_writes(result, evidence, writes, limit)
    _check_credits(result, evidence, pods, limit)
    return result


def _check_submits(result: CrossExamination, evidence: StoreEvidence,
                   submitted: list[tuple[int, str]], limit: int) -> None:
    for step_id, source in submitted:
        if step_id not in evidence.steps and step_id not in evidence.pruned:
            result.add("acknowledged_submit", limit,
                       f"step {step_id} was acknowledged to a submitter ({source})"
                       " but the store has no such step",
                       step_id=step_id, history=source)


def _check_claims(result: CrossExamination, evidence: StoreEvidence,
                  pods: dict[tuple[str, int], list[_Pod]], limit: int) -> None:
    for (pod_id, incarnation), processes in pods.items():
        for token, step_id in (t for p in processes for t in p.claimed.items()):
            if step_id in evidence.pruned:
                continue  # gone with its history, on record (fleetsim prune)
            endings = evidence.endings.get(token, [])
            if any(e[0] == step_id and e[1] == pod_id and e[2] == incarnation
                   for e in endings):
                continue
            recorded = [{"step_id": e[0], "pod": e[1], "incarnation": e[2], "outcome": e[3]}
                        for e in endings]
            result.add("phantom_claim", limit,
                       f"{pod_id}/{incarnation} was handed step {step_id} with token {token},"
                       " but the store recorded " + (
                           f"that token for {_who(endings)}" if endings else "no such claim"),
                       pod=pod_id, incarnation=incarnation, step_id=step_id,
                       claim_token=token, store_recorded=recorded)


def _check_writes(result: CrossExamination, evidence: StoreEvidence,
                  writes: list[tuple[_Pod, dict[str, Any]]], limit: int) -> None:
    acked_tokens: dict[int, set[int]] = defaultdict(set)
    for pod, write in writes:
        op = str(write.get("op"))
        ending = _ENDING.get(op)
        if ending is None or write.get("reply") != "accepted":
            continue
        accepted = accepted_ids(write)
        who = f"{pod.log.pod}/{pod.log.incarnation}"
        digests = sent_digests(write)
        for step_id, token, digest in zip(write.get("ids", ()), write.get("tokens", ()),
                                          digests, strict=False):
            step_id, token = int(step_id), int(token)
            outcomes = [e[3] for e in evidence.endings.get(token, []) if e[0] == step_id]
            base = {"pod": pod.log.pod, "incarnation": pod.log.incarnation, "op": op,
                    "step_id": step_id, "claim_token": token, "store_endings": outcomes}
            if step_id not in accepted:
                if op == "complete" and "completed" in outcomes:
                    result.add("acknowledged_write", limit,
                               f"{who} was told its completion of step {step_id} (token"
                               f" {token}) was refused, but the store completed it", **base)
                continue
            if op == "complete":
                acked_tokens[step_id].add(token)  # the clients' word alone: judged always
            if step_id in evidence.pruned:
                continue  # gone with its history, on record (fleetsim prune)
            if ending not in outcomes:
                result.add("acknowledged_write", limit,
                           f"{who} was told its {op} of step {step_id} (token {token}) was"
                           f" accepted, but the store shows "
                           f"{', '.join(str(o) for o in outcomes) or 'no ending'} for it",
                           **base)
            elif len(outcomes) > 1:
                result.add("acknowledged_write", limit,
                           f"{who}'s {op} of step {step_id} was accepted with token {token},"
                           f" which the store also ended as "
                           f"{', '.join(str(o) for o in outcomes if o != ending)}:"
                           " a write from a superseded claim", **base)
            elif op == "complete":
                _check_completed(result, evidence, who, base, digest, limit)
    for step_id, tokens in acked_tokens.items():
        if len(tokens) > 1:
            result.add("double_acknowledgement", limit,
                       f"step {step_id} was acknowledged as completed to"
                       f" {len(tokens)} claims (tokens {sorted(tokens)})",
                       step_id=step_id, claim_tokens=sorted(tokens))


def _check_completed(result: CrossExamination, evidence: StoreEvidence, who: str,
                     base: dict[str, Any], digest: str | None, limit: int) -> None:
    step_id, token = base["step_id"], base["claim_token"]
    status, step_token, stored = evidence.steps.get(step_id, ("missing", None, None))
    if status != "completed" or step_token != token:
        result.add("acknowledged_write", limit,
                   f"{who} was told step {step_id} was completed with token {token}, but the"
                   f" step is {status} with token {step_token}",
                   **base, step_status=status, step_claim_token=step_token)
    elif digest is not None and result_digest(decode_result(stored)) != digest:
        result.add("acknowledged_write", limit,
                   f"step {step_id} is completed with a result other than the one {who}"
                   f" sent with token {token}", **base, step_result=stored)


def _check_credits(result: CrossExamination, evidence: StoreEvidence,
                   pods: dict[tuple[str, int], list[_Pod]], limit: int) -> None:
    for token, endings in evidence.endings.items():
        for step_id, pod_id, incarnation, outcome in endings:
            if outcome not in ("completed", "failed"):
                continue
            processes = pods.get((pod_id, incarnation), [])
            if any(token in p.claimed for p in processes):
                continue
            # A process claims in token order: a token inside the range of a
            # process's claims that it never received is not its claim (and
            # two live processes under one incarnation is a violation too).
            # Above its highest token a history may just have lost its tail
            # (a SIGKILL), or the claim was another process's.
            ranged = [p for p in processes if p.min_token is not None]
            inside = any(p.min_token is not None and p.min_token <= token < p.max_token
                         for p in ranged)
            # Histories that all ended cleanly hold every claim of their
            # incarnation (a process under the same id and incarnation that
            # kept no history would break this: see the limits).
            whole = bool(processes) and all(p.log.complete for p in processes)
            if inside or whole:
                result.add("unclaimed_write", limit,
                           f"the store credits {pod_id}/{incarnation} with a {outcome} write"
                           f" of step {step_id} under token {token}, a claim its history"
                           " never received",
                           pod=pod_id, incarnation=incarnation, step_id=step_id,
                           claim_token=token, outcome=outcome)


def _who(endings: list[tuple[int, str, int, str | None]]) -> str:
    return ", ".join(f"step {e[0]} by {e[1]}/{e[2]}" for e in endings)
