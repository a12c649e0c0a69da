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
