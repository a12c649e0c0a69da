"""The store's side of the cross-examination: what it says of the claims clients saw.

Read on one snapshot, like the checker's own queries; the comparison with
the client histories is :mod:`fleetsim.crosscheck`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from fleetsim.store.checks import _snapshot
from fleetsim.store.store import Store

# Every ending of every attempt (a token may show more than one ending only
# if a fence broke), and every open claim (outcome NULL).
_ENDINGS = """
SELECT claim_token, step_id, pod_id, incarnation, outcome FROM finished_attempts
UNION ALL
SELECT claim_token, id, claimed_by, coalesce(claim_incarnation, 0), NULL FROM steps
 WHERE status = 'claimed'
"""

_STEPS = """
SELECT id, status, claim_token, CAST(result AS text) AS result FROM steps
 WHERE id = ANY(CAST(:ids AS bigint[]))
"""

# Dead steps deleted by `fleetsim dlq purge` (fleetsim.store.dlq): they
# existed, so a submitter was right to be given their ids.
_PURGED_STEPS = """
SELECT DISTINCT step_id AS id, 'purged' AS status, CAST(NULL AS bigint) AS claim_token,
       CAST(NULL AS text) AS result
  FROM dlq_actions
 WHERE action = 'purge' AND step_id = ANY(CAST(:ids AS bigint[]))
"""


# Steps deleted by `fleetsim prune` (fleetsim.store.prune), among the given
# ids: they existed and ended, so the clients' records of them are not
# judged against a store that no longer holds them.
_PRUNED = """
WITH u AS (SELECT range_agg(r) AS m FROM step_prunes p, unnest(p.step_ids) AS r)
SELECT i FROM unnest(CAST(:ids AS bigint[])) AS i, u WHERE i <@ u.m
"""


@dataclass
class StoreEvidence:
    """What the store recorded, indexed for the cross-examination."""

    # token -> [(step_id, pod_id, incarnation, outcome or None for open)]
    endings: dict[int, list[tuple[int, str, int, str | None]]] = field(default_factory=dict)
    # step id -> (status, claim_token, result as JSON text or None)
    steps: dict[int, tuple[str, int | None, str | None]] = field(default_factory=dict)
    max_token: int = 0
    # ids (of those asked about) of steps deleted by `fleetsim prune`
    pruned: set[int] = field(default_factory=set)


def store_evidence(store: Store, step_ids: Iterable[int],
                   pruned_candidates: Iterable[int] = ()) -> StoreEvidence:
    """Every attempt's endings, and the rows of ``step_ids``, on one snapshot.

    Of ``step_ids`` and ``pruned_candidates``, those of pruned steps are
    listed in ``pruned`` (read on the same snapshot).
    """
    evidence = StoreEvidence()
    ids = sorted(set(step_ids))
    with _snapshot(store) as conn:
        if conn.execute(sa.text("SELECT to_regclass('step_prunes')")).scalar():
            asked = sorted(set(ids) | set(pruned_candidates))
            for chunk in range(0, len(asked), 50_000):
                evidence.pruned.update(int(r[0]) for r in conn.execute(
                    sa.text(_PRUNED), {"ids": asked[chunk:chunk + 50_000]}))
        for token, step_id, pod, incarnation, outcome in conn.execute(sa.text(_ENDINGS)):
            evidence.endings.setdefault(int(token), []).append(
                (int(step_id), str(pod), int(incarnation), outcome))
        purges = bool(conn.execute(sa.text("SELECT to_regclass('dlq_actions')")).scalar())
        for chunk in range(0, len(ids), 50_000):
            rows = list(conn.execute(sa.text(_STEPS), {"ids": ids[chunk:chunk + 50_000]}))
            if purges:
                rows += conn.execute(sa.text(_PURGED_STEPS), {"ids": ids[chunk:chunk + 50_000]})
            for row in rows:
                evidence.steps[int(row.id)] = (
                    str(row.status),
                    int(row.claim_token) if row.claim_token is not None else None,
                    row.result,
                )
    evidence.max_token = max(evidence.endings, default=0)
    return evidence


def decode_result(text: str | None) -> Any:
    """A stored result (jsonb as text) as a Python value."""
    return None if text is None else json.loads(text)
