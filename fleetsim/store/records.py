"""Frozen records the store returns and accepts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple


@dataclass(frozen=True)
class StepSpec:
    """One step to submit."""

    queue: str = "default"
    payload: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 3
    idempotency_key: str | None = None
    # Execution timeout in seconds; None: the queue's (if any).
    timeout_s: float | None = None


class ClaimedStep(NamedTuple):
    """A step a pod has claimed; ``claim_token`` fences every write about it.

    A named tuple rather than a frozen dataclass: pods build one per claimed
    step on the hot path, and a tuple is several times cheaper to make.
    """

    id: int
    queue: str
    priority: int
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    claim_token: int
    # The effective execution timeout (the step's, else its queue's); None: none.
    timeout_s: float | None = None
    # Seconds from its submission to this claim, in database time (None: unknown).
    waited_s: float | None = None


@dataclass(frozen=True)
class Step:
    """A full row of ``steps``."""

    id: int
    queue: str
    status: str
    priority: int
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    idempotency_key: str | None
    claimed_by: str | None
    claim_token: int | None
    cancel_requested: bool
    result: Any
    error: str | None


class WriteOutcome(enum.Enum):
    """What a fenced write (complete, fail, release, cancel ack) did."""

    ACCEPTED = "accepted"
    # The caller's claim token is no longer the step's current one: the step
    # was requeued (its pod was declared dead) or finished by someone else.
    LEASE_LOST = "lease_lost"


@dataclass(frozen=True)
class FailOutcome:
    """Result of failing a step: where it went."""

    outcome: WriteOutcome
    status: str | None = None  # 'failed' (retry scheduled) or 'dead' (DLQ)
    retry_in_s: float | None = None


@dataclass(frozen=True)
class QueueConfig:
    """A queue's settings; ``None`` means unlimited."""

    name: str
    concurrency_limit: int | None = None
    max_length: int | None = None
    strict_fifo: bool = False
    paused: bool = False
    timeout_s: float | None = None  # execution timeout of its steps; None: none


@dataclass(frozen=True)
class QueueStats:
    """Counts of a queue's steps by status (``depth`` = queued + failed)."""

    queue: str
    depth: int
    queued: int
    claimed: int
    completed: int
    failed: int
    dead: int
    cancelled: int

    def as_dict(self) -> dict[str, int]:
        """The counts as a JSON-ready dict (without the queue name)."""
        return {
            "depth": self.depth,
            "queued": self.queued,
            "claimed": self.claimed,
            "completed": self.completed,
            "failed": self.failed,
            "dead": self.dead,
            "cancelled": self.cancelled,
        }


@dataclass(frozen=True)
class Heartbeat:
    """What a pod learns from its heartbeat."""

    alive: bool  # False: the pod was declared dead or replaced; it must fence itself
    incarnation: int | None  # the incarnation the store knows for this pod id
    cancel_requested: tuple[tuple[int, int], ...] = ()  # (step id, claim token)


@dataclass(frozen=True)
class Lease:
    """A leader lease held by ``holder`` for ``term``."""

    holder: str
    term: int
    expires_in_s: float


@dataclass(frozen=True)
class ExitRecord:
    """What Store.record_exit did for a pod process known to be gone.

    ``recorded``: the exit of the pod's current registration was recorded
    (recovery marks it dead at its next pass); False if the id belongs to
    another process now, or the exit was already recorded. ``ended_term``:
    the leader term it held, ended. ``backends``: its connections the store
    still had, terminated and waited out first.
    """

    recorded: bool
    ended_term: int | None = None
    backends: int = 0


@dataclass(frozen=True)
class Recovery:
    """What one recovery pass of the leader did."""

    marked_dead: tuple[str, ...] = ()
    requeued: tuple[int, ...] = ()
    dead_lettered: tuple[int, ...] = ()


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, computed in database time.

    The delay before retry n (n = attempts already spent) is
    ``min(cap_s, base_s * 2**n) * (1 - jitter * random())``.
    """

    base_s: float = 0.2
    cap_s: float = 30.0
    jitter: float = 0.5
