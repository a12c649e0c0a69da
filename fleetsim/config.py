"""Fleet-wide settings shared by the coordinator, the pods and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fleetsim.errors import ConfigError


@dataclass(frozen=True)
class FleetTimings:
    """The fleet's clocks, in seconds. All ages are measured in database time."""

    heartbeat_s: float = 0.5  # how often a pod heartbeats
    lease_s: float = 3.0  # leader lease length; also how long a pod may miss heartbeats
    renew_s: float = 1.0  # how often the leader renews
    dead_after_s: float = 3.0  # heartbeat age after which the leader declares a pod dead
    recovery_s: float = 0.5  # how often the leader runs recovery
    grace_s: float = 10.0  # how long a stopping pod lets in-flight steps finish

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise ConfigError(f"timing {name} must be positive, got {value}")
        if self.renew_s >= self.lease_s:
            raise ConfigError(
                f"the lease ({self.lease_s}s) must be longer than the renew period "
                f"({self.renew_s}s)"
            )
        if self.heartbeat_s >= self.dead_after_s:
            raise ConfigError(
                f"the dead threshold ({self.dead_after_s}s) must be longer than the "
                f"heartbeat period ({self.heartbeat_s}s)"
            )

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FleetTimings:
        """Inverse of to_dict (unknown keys are ignored)."""
        fields = cls.__dataclass_fields__
        return cls(**{k: float(v) for k, v in data.items() if k in fields})


@dataclass(frozen=True)
class PodGroup:
    """Pods that share a workload and the queues they serve (a heterogeneous fleet).

    A fleet of groups numbers its pods across them in order: groups of 2 and
    3 pods run pod-1, pod-2 (the first) and pod-3 .. pod-5 (the second), so
    chaos selectors such as ``pod-3`` or ``round-robin`` work unchanged.
    """

    name: str
    pods: int = 1
    workload: str = "noop"
    concurrency: int = 1
    batch: int = 50
    queues: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        if self.pods < 1:
            raise ConfigError(f"pod group {self.name!r}: pods must be at least 1")
        if self.concurrency < 1 or self.batch < 1:
            raise ConfigError(f"pod group {self.name!r}: concurrency and batch must be "
                              "at least 1")
        if not self.queues:
            raise ConfigError(f"pod group {self.name!r}: serves no queue")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "queues": list(self.queues)}
