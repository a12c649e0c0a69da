"""The fleet's status document (`fleetsim status --json`; its field names are an interface)."""

from __future__ import annotations

from typing import Any

from fleetsim.store import Store


def status_data(store: Store) -> dict[str, Any]:
    """The `status --json` document (field names are an interface)."""
    pods = store.pods()
    lease = store.current_leader()
    leader = None
    if lease is not None:
        pid = next((p["pid"] for p in pods if p["id"] == lease.holder), None)
        leader = {"pod": lease.holder, "term": lease.term, "pid": pid}
    return {
        "leader": leader,
        "pods": [
            {k: p[k] for k in ("id", "pid", "incarnation", "state", "heartbeat_age_s",
                               "claimed", "completed")}
            for p in pods
        ],
        "steps": store.status_counts(),
        "queues": {name: s.as_dict() for name, s in store.queue_stats().items()},
    }
