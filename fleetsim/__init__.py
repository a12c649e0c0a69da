"""fleetsim: a PostgreSQL-backed fleet of worker pods and the chaos harness that proves it."""

from fleetsim.errors import (
    BusError,
    BusTimeout,
    ConfigError,
    FleetNotRunning,
    FleetsimError,
    NotLeader,
    ProtocolError,
    QueueFull,
    SchemaMismatch,
    StoreError,
    StoreUnavailable,
)

__version__ = "0.1.0"

__all__ = [
    "BusError",
    "BusTimeout",
    "ConfigError",
    "FleetNotRunning",
    "FleetsimError",
    "NotLeader",
    "ProtocolError",
    "QueueFull",
    "SchemaMismatch",
    "StoreError",
    "StoreUnavailable",
    "__version__",
]
