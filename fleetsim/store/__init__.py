"""The PostgreSQL step store. Only this package imports SQLAlchemy or psycopg2."""

from fleetsim.store.records import (
    ClaimedStep,
    ExitRecord,
    FailOutcome,
    Heartbeat,
    Lease,
    QueueConfig,
    QueueStats,
    Recovery,
    RetryPolicy,
    Step,
    StepSpec,
    WriteOutcome,
)
from fleetsim.store.schema import SCHEMA_VERSION, STEP_STATUSES
from fleetsim.store.store import LeaderTransaction, Store, StoreConfig, pod_application_name
from fleetsim.store.url import redact, redact_argv, validate_url
from fleetsim.store.values import check_storable, storable_text

__all__ = [
    "SCHEMA_VERSION",
    "STEP_STATUSES",
    "ClaimedStep",
    "ExitRecord",
    "FailOutcome",
    "Heartbeat",
    "LeaderTransaction",
    "Lease",
    "QueueConfig",
    "QueueStats",
    "Recovery",
    "RetryPolicy",
    "Step",
    "StepSpec",
    "Store",
    "StoreConfig",
    "WriteOutcome",
    "check_storable",
    "pod_application_name",
    "redact",
    "redact_argv",
    "storable_text",
    "validate_url",
]
