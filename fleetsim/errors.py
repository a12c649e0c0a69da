"""The fleetsim exception tree.

Every error a user can see is a :class:`FleetsimError`; its docstring is the
default message, and the CLI prints ``str(error)`` as one line (the cause
chain only with ``-v``)::

    FleetsimError
    ├── ConfigError            bad option, workload, scenario file, duration
    ├── StoreError             anything the store could not do
    │   ├── StoreUnavailable   cannot reach / authenticate to PostgreSQL
    │   │   └── InjectedFault  a chaos storage fault (error or disconnect)
    │   ├── SchemaMismatch     not a fleetsim store, or another schema version
    │   ├── QueueFull          submit beyond a queue's max length
    │   ├── ClaimInterrupted   a claim failed after some of its steps were committed
    │   ├── PodIdInUse         another live process is registered under this pod id
    │   ├── UnstorableValue    a result or payload PostgreSQL's jsonb cannot hold
    │   └── NotLeader          a fenced leader action by a non-holder
    ├── BusError               control-bus failures
    │   ├── BusTimeout         no reply in time (is the fleet running?)
    │   └── ProtocolError      malformed or unknown bus message
    └── FleetNotRunning        no run.json / coordinator in the run directory
"""

from __future__ import annotations

from typing import Any


class FleetsimError(Exception):
    """Unexpected fleetsim error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)


class ConfigError(FleetsimError):
    """Invalid configuration."""


class StoreError(FleetsimError):
    """The store could not complete the operation."""


class StoreUnavailable(StoreError):
    """Cannot connect to the PostgreSQL store."""


class SchemaMismatch(StoreError):
    """The database does not hold a fleetsim store of a supported version."""


class InjectedFault(StoreUnavailable):
    """A storage fault injected by chaos.

    Before a statement (it never reached the server), or, with
    ``took_effect``, after it: the statement ran and its reply was lost.
    """

    def __init__(
        self, message: str | None = None, *, disconnect: bool = False, took_effect: bool = False
    ) -> None:
        self.disconnect = disconnect
        self.took_effect = took_effect
        super().__init__(message)


class QueueFull(StoreError):
    """The queue is at its maximum length."""

    def __init__(self, queue: str, max_length: int, depth: int, adding: int) -> None:
        self.queue = queue
        self.max_length = max_length
        super().__init__(
            f"queue {queue!r} is full: max length {max_length}, "
            f"{depth} waiting, cannot add {adding} more"
        )


class ClaimInterrupted(StoreError):
    """A claim failed after some of its steps were already committed to the pod.

    ``steps`` are those steps: the caller now holds them and must run or
    release them. The claim may also have committed more than ``steps``
    (the failed statement's reply may have been lost), so the caller must
    treat itself as holding claims it does not know of.
    """

    def __init__(self, steps: list[Any], cause: StoreError) -> None:
        self.steps = steps
        super().__init__(f"claim interrupted after {len(steps)} steps: {cause}")


class PodIdInUse(StoreError):
    """Another live process is registered under this pod id."""


class UnstorableValue(StoreError):
    """A value the store cannot hold (jsonb refuses NaN, infinities, NUL and lone surrogates)."""


class NotLeader(StoreError):
    """This pod does not hold a valid leader lease."""


class BusError(FleetsimError):
    """Control bus error."""


class BusTimeout(BusError):
    """No reply from the coordinator in time."""


class ProtocolError(BusError):
    """Malformed or unsupported bus message."""


class FleetNotRunning(FleetsimError):
    """No running fleet found in the run directory (start one with `fleetsim up`)."""


__all__ = [
    "BusError",
    "BusTimeout",
    "ClaimInterrupted",
    "ConfigError",
    "FleetNotRunning",
    "FleetsimError",
    "InjectedFault",
    "NotLeader",
    "PodIdInUse",
    "ProtocolError",
    "QueueFull",
    "SchemaMismatch",
    "StoreError",
    "StoreUnavailable",
    "UnstorableValue",
]
