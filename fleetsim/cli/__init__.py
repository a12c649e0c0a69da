"""The ``fleetsim`` command line, one module per command group.

====================  ==================================================
module                commands
====================  ==================================================
:mod:`.common`        the group, shared options, output, errors, stores
:mod:`.fleet`         init, up, down, status, submit, pod, cancel
:mod:`.run`           run
:mod:`.chaos`         chaos ... (faults, scenarios, fuzz)
:mod:`.history`       check, history export, prune
:mod:`.selftest`      selftest
:mod:`.queue`         queue ..., dlq ...
:mod:`.keys`          keys generate
:mod:`.report`        report
:mod:`.metrics`       metrics
:mod:`.bench`         bench
====================  ==================================================

Exit codes and the option conventions are in :mod:`.common`. Command
modules register themselves on :data:`cli` when imported, and are imported
only when one of their commands runs (``COMMAND_MODULES`` in :mod:`.common`
says which module holds which command: add a new one there). The shared
helpers are re-exported here, so ``from fleetsim.cli import option, emit,
fail, open_store`` works.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fleetsim.cli.common import (
    COMMAND_MODULES,
    DEFAULTS,
    DURATION,
    EXIT_FAILURE,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_STORE,
    EXIT_USAGE,
    FleetsimGroup,
    check_workload,
    cli,
    emit,
    exit_code_for,
    fail,
    fleet_bus_secret,
    fleet_options,
    fleet_using,
    handler_option,
    json_option,
    main,
    open_store,
    option,
    schema_option,
    scratch_store,
    store_option,
    timing_options,
    timings_from,
    warn_unserved,
)

__all__ = [
    "COMMAND_MODULES", "DEFAULTS", "DURATION", "EXIT_FAILURE", "EXIT_NOT_RUNNING", "EXIT_OK",
    "EXIT_STORE", "EXIT_USAGE", "FleetsimGroup", "check_workload", "cli", "emit",
    "exit_code_for", "fail", "fleet_bus_secret", "fleet_options", "fleet_using",
    "handler_option", "json_option", "main", "open_store", "option", "schema_option",
    "scratch_store", "store_option", "timing_options", "timings_from", "warn_unserved",
]


def __getattr__(name: str) -> ModuleType:
    """``fleetsim.cli.bench`` and the other command modules, imported on first use."""
    if name in set(COMMAND_MODULES.values()):
        return importlib.import_module(f"fleetsim.cli.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
