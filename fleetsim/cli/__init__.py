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
modules register themselves on :data:`cli` when imported; a new one is
imported at the end of this file. The shared helpers are re-exported here,
so ``from fleetsim.cli import option, emit, fail, open_store`` works.
"""

from __future__ import annotations

# Imported for their side effect: each registers its commands on `cli`.
from fleetsim.cli import (
    bench,
    chaos,
    fleet,
    history,
    keys,
    metrics,
    queue,
    report,
    run,
    selftest,
)
from fleetsim.cli.common import (
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
    "DEFAULTS", "DURATION", "EXIT_FAILURE", "EXIT_NOT_RUNNING", "EXIT_OK", "EXIT_STORE",
    "EXIT_USAGE", "FleetsimGroup", "bench", "chaos", "check_workload", "cli", "emit",
    "exit_code_for",
    "fail", "fleet", "fleet_bus_secret", "fleet_options", "fleet_using", "handler_option",
    "history", "json_option", "keys", "main", "metrics", "open_store", "option", "queue",
    "report", "run",
    "schema_option", "scratch_store", "selftest", "store_option", "timing_options",
    "timings_from", "warn_unserved",
]
