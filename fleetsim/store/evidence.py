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
_PURGED = """
SELECT DISTINCT step_id AS id, 'purged' AS status, CAST(NULL AS bigint) AS claim_token,
       CAST(NULL AS text) AS result
  FROM dlq_actions
 WHERE action = 'purge' AND step_id = ANY(CAST(:ids AS bigint[]))
"""


@dataclass
class StoreEvidence:
    """What the store recorded, indexed for the cross-examination."""

    # token -> [(step_id, pod_id, incarnation, outcome or None for open)]
    endings: dict[int, list[tuple[int, str, int, str | None]]] = field(default_factory=dict)
    # step id -> (status, claim_token, result as JSON text or None)
    steps: dict[int, tuple[str, int | None, str | None]] = field(default_factory=dict)
    max_token: int = 0


def store_evidence(store: Store, step_ids: Iterable[int]) -> StoreEvidence:
    """Every attempt's endings, and the rows of ``step_ids``, on one snapshot."""
    evidence = StoreEvidence()
    ids = sorted(set(step_ids))
    with _snapshot(store) as conn:
        for token, step_id, pod, incarnation, outcome in conn.execute(sa.text(_ENDINGS)):
            evidence.endings.setdefault(int(token), []).append(
                (int(step_id), str(pod), int(incarnation), outcome))
        purges = bool(conn.execute(sa.text("SELECT to_regclass('dlq_actions')")).scalar())
        for chunk in range(0, len(ids), 50_000):
            rows = list(conn.execute(sa.text(_STEPS), {"ids": ids[chunk:chunk + 50_000]}))
            if purges:
                rows += conn.execute(sa.text(_PURGED), {"ids": ids[chunk:chunk + 50_000]})
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
