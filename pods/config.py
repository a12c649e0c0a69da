"""A pod's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from fleetsim.config import FleetTimings
from fleetsim.errors import ConfigError
from fleetsim.store import StoreConfig

_MAX_CONCURRENCY = 256
_MAX_BATCH = 1000


@dataclass(frozen=True)
class PodConfig:
    """Everything one pod process needs to run."""

    pod_id: str
    store: StoreConfig
    incarnation: int = 0
    queues: tuple[str, ...] = ("default",)
    workload: str = "noop"
    handlers: tuple[str, ...] = ()  # more module:function handlers steps may name
    concurrency: int = 1
    batch: int = 50
    seed: int = 0
    timings: FleetTimings = field(default_factory=FleetTimings)
    join: str | None = None  # the coordinator's control endpoint, if any

    def __post_init__(self) -> None:
        if not self.pod_id or len(self.pod_id) > 64:
            raise ConfigError("a pod id must be 1 to 64 characters")
        if not 1 <= self.concurrency <= _MAX_CONCURRENCY:
            raise ConfigError(f"concurrency must be between 1 and {_MAX_CONCURRENCY}")
        if not 1 <= self.batch <= _MAX_BATCH:
            raise ConfigError(f"batch must be between 1 and {_MAX_BATCH}")
        if not self.queues:
            raise ConfigError("a pod needs at least one queue")
        if self.incarnation < 0:
            raise ConfigError("incarnation must be >= 0")
