"""A pod's default id: unique per host and process, and short enough to read."""

from __future__ import annotations

import hashlib

# Pod ids are at most 64 characters (PodConfig); a host name is cut to this
# many, and a cut name keeps a digest of the whole so two long names that
# share a prefix (container names often do) still give different ids.
_HOST_CHARS = 40


def default_pod_id(hostname: str, pid: int) -> str:
    """``pod-<hostname>-<pid>``, with a long host name shortened by a digest of it."""
    host = hostname
    if len(host) > _HOST_CHARS:
        digest = hashlib.sha256(host.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        host = f"{host[: _HOST_CHARS - 9]}-{digest}"
    return f"pod-{host}-{pid}"
