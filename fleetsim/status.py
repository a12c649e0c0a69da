"""The fleet's status document (`fleetsim status --json`; its field names are an interface)."""

from __future__ import annotations

import socket
from typing import Any

from fleetsim.store import Store


def status_data(store: Store, fleet: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `status --json` document (field names are an interface).

    ``fleet`` is the running fleet's ``run.json`` when it uses this store:
    it says which queues the fleet's pods serve (see :func:`unserved_queues`).
    """
    pods = store.pods()
    lease = store.current_leader()
    leader = None
    if lease is not None:
        pid = next((p["pid"] for p in pods if p["id"] == lease.holder), None)
        leader = {"pod": lease.holder, "term": lease.term, "pid": pid}
    here = socket.gethostname()
    for p in pods:
        p["live"] = pod_is_live(p, here)
    return {
        "leader": leader,
        "pods": [
            {**{k: p[k] for k in ("id", "pid", "incarnation", "state", "heartbeat_age_s",
                                  "claimed", "completed")},
             "live": p["live"]}
            for p in pods
        ],
        "steps": store.status_counts(),
        "queues": {name: s.as_dict() for name, s in store.queue_stats().items()},
        "unserved_queues": unserved_queues(store, fleet, pods),
    }


def served_queues(pod_id: str, fleet: dict[str, Any] | None) -> list[str] | None:
    """The queues a pod claims from, if known: None means every queue (or unknown).

    Known for the pods the running fleet's coordinator started: ``queues``
    in its ``run.json`` (``*``: every queue). A pod started otherwise
    (`fleetsim pod`) is taken to serve every queue, its default.
    """
    if not fleet or pod_id not in {p.get("id") for p in fleet.get("pods") or []}:
        return None
    names = [str(q) for q in fleet.get("queues") or ["default"]]
    return None if "*" in names else names


def unserved_queues(store: Store, fleet: dict[str, Any] | None = None,
                    pods: list[dict[str, Any]] | None = None) -> dict[str, int]:
    """Queues whose waiting steps no live pod serves: {queue: steps waiting}.

    A queue is unserved when it has waiting (queued or failed) steps, is not
    paused, and no live pod (:func:`pod_is_live`) claims from it
    (:func:`served_queues`). With no live pod, every such queue is.
    """
    if pods is None:
        pods = store.pods()
    served: set[str] = set()
    for pod in pods:
        live = pod["live"] if "live" in pod else pod_is_live(pod)
        if not live:
            continue
        names = served_queues(pod["id"], fleet)
        if names is None:
            return {}
        served.update(names)
    paused = {name for name, config in store.queues().items() if config.paused}
    return {
        name: stats.depth for name, stats in sorted(store.queue_stats().items())
        if stats.depth > 0 and name not in served and name not in paused
    }


def unserved_warning(queue: str, waiting: int, fleet: dict[str, Any] | None) -> str:
    """One line saying that ``queue`` is served by no live pod, and what to do."""
    line = (f"no live pod serves queue {queue!r} ({waiting} step"
            f"{'s' if waiting != 1 else ''} waiting)")
    names = fleet.get("queues") if fleet else None
    if isinstance(names, list) and names and "*" not in names:
        return (line + f": the fleet's pods claim from {', '.join(map(str, names))} only; "
                f"restart it without --queue (every queue) or with --queue {queue} added")
    return line + (f": its steps wait until one does (`fleetsim up`, or `fleetsim pod "
                   f"--queue {queue}`)")


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
