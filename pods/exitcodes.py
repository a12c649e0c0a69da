"""Named exit codes, so the coordinator can tell a chaos kill from a crash."""

from __future__ import annotations

import enum
import signal


class PodExit(enum.IntEnum):
    """How a pod process ended."""

    OK = 0  # graceful stop (SIGTERM, Ctrl-C, shutdown command)
    CRASHED = 1  # an unexpected error in the pod itself, or a handler called sys.exit
    BAD_CONFIG = 2  # invalid options, unknown workload, unimportable handler
    STORE_UNREACHABLE = 3  # could not reach the store at start
    SUPERSEDED = 4  # a newer incarnation of this pod id took over
    ID_IN_USE = 5  # another live process owns this pod id
    # Negative return codes are signals (subprocess convention): -9 is a
    # SIGKILL, which is how chaos kills a pod.


def describe_exit(returncode: int) -> str:
    """A short human description of a pod's return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return "killed" if -returncode == signal.SIGKILL else f"terminated by {name}"
    try:
        return PodExit(returncode).name.lower().replace("_", " ")
    except ValueError:
        return f"exit {returncode}"
