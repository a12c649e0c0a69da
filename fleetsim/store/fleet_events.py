"""Reading what the leaders did, for the coordinator's event lines (`fleetsim up`).

Read-only: the leader's recovery actions (``leader_actions``) after a given
id, grouped by the pod whose steps were recovered. The coordinator polls it
to print ``recovered 50 steps of pod-3``; nothing here is evidence for the
checker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from fleetsim.store.store import Store

__all__ = ["RecoveredSteps", "last_leader_action", "recoveries_after"]

_LAST_ACTION: Final = "SELECT coalesce(max(id), 0) FROM leader_actions"

# Only the rows after :after (its primary key): cheap to poll.
_RECOVERIES_AFTER: Final = """
SELECT max(id) AS last_id, target_pod, term, pod_id,
       count(*) FILTER (WHERE action = 'requeue') AS requeued,
       count(*) FILTER (WHERE action = 'dead_letter') AS dead_lettered
  FROM leader_actions
 WHERE id > :after AND action IN ('requeue', 'dead_letter')
 GROUP BY target_pod, term, pod_id
 ORDER BY max(id)
"""


@dataclass(frozen=True)
class RecoveredSteps:
    """Steps of one pod that one leader term requeued or dead-lettered."""

    last_id: int  # the latest leader_actions id counted here
    pod: str | None  # whose steps (the pod declared dead)
    term: int
    leader: str
    requeued: int
    dead_lettered: int

    @property
    def steps(self) -> int:
        """Requeued and dead-lettered together."""
        return self.requeued + self.dead_lettered


def last_leader_action(store: Store) -> int:
    """The id of the latest leader action (0 if none): where to start polling."""
    return int(store._rows(_LAST_ACTION)[0][0])


def recoveries_after(store: Store, after: int) -> list[RecoveredSteps]:
    """Recoveries recorded after leader action ``after``, oldest first."""
    return [
        RecoveredSteps(int(row.last_id), row.target_pod, int(row.term), row.pod_id,
                       int(row.requeued), int(row.dead_lettered))
        for row in store._rows(_RECOVERIES_AFTER, after=after)
    ]
