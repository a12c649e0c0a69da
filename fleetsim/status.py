"""The fleet's status document (`fleetsim status --json`; its field names are an interface)."""

from __future__ import annotations

import socket
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
    here = socket.gethostname()
    return {
        "leader": leader,
        "pods": [
            {**{k: p[k] for k in ("id", "pid", "incarnation", "state", "heartbeat_age_s",
                                  "claimed", "completed")},
             "live": pod_is_live(p, here)}
            for p in pods
        ],
        "steps": store.status_counts(),
        "queues": {name: s.as_dict() for name, s in store.queue_stats().items()},
    }


def pod_is_live(pod: dict[str, Any], here: str | None = None) -> bool:
    """Whether a pod's process runs: the rule `status` and `chaos` share.

    A pod on this host is live while its process runs (a killed pod stops
    being live at once, though the store calls it ``alive`` until the leader
    declares it dead). A pod on another host is live while the store says
    ``alive``: its heartbeat is the only sign of it here.
    """
    if pod.get("state") == "stopped":
        return False
    pid = pod.get("pid")
    if pod.get("host") == (here or socket.gethostname()) and isinstance(pid, int):
        return _runs_fleetsim(pid)
    return bool(pod.get("state") == "alive")


def _runs_fleetsim(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) fleetsim process (pids get reused)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return "fleetsim" in " ".join(process.cmdline())
    except psutil.Error:
        return False
