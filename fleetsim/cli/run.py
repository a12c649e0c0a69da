"""`fleetsim run`: one finite experiment, verified."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import click

from fleetsim.cli.common import (
    DURATION,
    EXIT_FAILURE,
    EXIT_OK,
    T,
    check_workload,
    cli,
    emit,
    fleet_options,
    json_option,
    option,
    timings_from,
)
from fleetsim.errors import (
    ConfigError,
    FleetsimError,
    StoreUnavailable,
)
from fleetsim.store import StepSpec, Store

# -- run ----------------------------------------------------------------------


@cli.command()
@fleet_options
@option("--steps", type=click.IntRange(1, 10_000_000), default=10_000, help="Steps to run.")
@option("--schema", default=None, help="Schema for this run (default: a new run_<time> one, "
        "kept for `fleetsim check`).")
@option("--timeout", type=DURATION, default=600.0, env="FLEETSIM_RUN_TIMEOUT",
        help="Give up if not drained by then.")
@option("--chaos", "scenario", default=None, metavar="SCENARIO",
        help="Run this chaos scenario (a name from `chaos list`, or a .toml file) meanwhile.")
@option("--fault-proxy/--no-fault-proxy", default=None,
        help="Route each pod's store traffic through a fault proxy (default: only with "
        "--chaos).")
@json_option
@click.pass_context
def run(ctx: click.Context, /, **params: Any) -> None:
    """One finite experiment: up, submit, wait until drained, verify, down.

    The verdict is the checker's (`fleetsim check --final`): exit 0 only when
    the run is valid: every step completed or dead-lettered exactly as the
    invariants require, no duplicate or stale completion, no split brain.
    """
    from fleetsim.coordinator import Coordinator, FleetSpec

    as_json = params["as_json"]

    def say(line: str) -> None:
        click.echo(line, err=True)

    check_workload(params["workload"], tuple(params["handlers"]))
    schema = params["schema"] or f"run_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:4]}"
    scenario = params["scenario"]
    if scenario:
        from chaos.scenario import find_scenario

        find_scenario(scenario)  # a bad file is rejected before anything starts
    fault_proxy = params["fault_proxy"]
    spec = FleetSpec(
        run_dir=ctx.obj["run_dir"].path, pods=params["pods"],
        concurrency=params["concurrency"], batch=params["batch"],
        workload=params["workload"], queues=tuple(params["queues"]),
        store_url=params["store"], schema=schema, seed=params["seed"],
        restart=bool(scenario), timings=timings_from(params),
        fault_proxy=bool(scenario) if fault_proxy is None else fault_proxy,
        handlers=tuple(params["handlers"]),
    )
    coordinator = Coordinator(spec, echo=say)
    coordinator.install_signal_handlers()
    coordinator.start()
    try:
        store = coordinator.store
        assert store is not None
        if sum(store.status_counts().values()):
            raise ConfigError(f"schema {schema!r} already holds steps: `run` needs a fresh one "
                              "(leave --schema out to get a new run_<time> schema)")
        steps = params["steps"]
        say(f"submitting {steps} steps")
        for start in range(0, steps, 10_000):
            store.submit_many([StepSpec(spec.submit_queue)] * min(10_000, steps - start))
        store.analyze()  # a fresh schema has no statistics: plan claims on real numbers
        if scenario:
            started = coordinator.run_scenario(scenario, params["seed"])
            say(f"chaos: scenario {started['scenario']} (seed {started['seed']}, "
                f"{started['faults']} faults over {started['duration_s']:g}s)")
        _wait_drained(store, steps, params["timeout"], coordinator, say)
        if coordinator.scenario is not None:
            while not coordinator.scenario.done.wait(0.2):
                if coordinator.stopping.is_set():
                    raise KeyboardInterrupt
                coordinator.poll()
            _wait_drained(store, steps, params["timeout"], coordinator, say)
        summary = _with_store_retry(store.run_summary)
        from fleetsim.checker import check as check_history

        report = _with_store_retry(lambda: check_history(
            store, final=True, client_histories=coordinator.client_history_dir))
    finally:
        coordinator.stop()
    result = _run_result(summary, steps, spec, schema)
    result["valid"] = bool(result["valid"] and report.valid)
    result["violations"] = [v.as_dict() for v in report.violations]
    result["figures"] = report.figures
    if scenario:
        result["scenario"] = coordinator.scenario.scenario.name
        result["faults_applied"] = coordinator.scenario.applied
    emit(result, as_json, lambda: _print_run_table(result))
    sys.exit(EXIT_OK if result["valid"] else EXIT_FAILURE)


def _with_store_retry(call: Callable[[], T], timeout_s: float = 30.0) -> T:
    """Retry a read while the store restarts (chaos may have just restarted it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _wait_drained(store: Store, steps: int, timeout_s: float, coordinator: Any,
                  say: Callable[[str], None]) -> None:
    deadline = time.monotonic() + timeout_s
    next_report = time.monotonic() + 2.0
    while True:
        if coordinator.stopping.is_set():
            raise KeyboardInterrupt
        try:
            counts = store.status_counts()
        except StoreUnavailable:
            time.sleep(0.5)
            continue
        waiting = counts["queued"] + counts["claimed"] + counts["failed"]
        if waiting == 0:
            return
        if time.monotonic() > deadline:
            raise FleetsimError(f"not drained after {timeout_s:.0f}s: {waiting} steps left")
        if time.monotonic() >= next_report:
            say(f"  {steps - waiting}/{steps} done")
            next_report = time.monotonic() + 2.0
        coordinator.poll()
        time.sleep(0.05)


def _run_result(summary: dict[str, Any], steps: int, spec: Any, schema: str) -> dict[str, Any]:
    window = summary["window_s"] or 0.0
    # Every step accounted for; the checker adds the invariants (see `run`).
    valid = (
        summary["submitted"] == steps
        and summary["completed"] + summary["dead"] + summary["cancelled"] == steps
        and summary["duplicate_completions"] == 0
        and summary["completed_without_attempt"] == 0
    )
    return {
        "submitted": summary["submitted"],
        "completed": summary["completed"],
        "dead": summary["dead"],
        "cancelled": summary["cancelled"],
        "elapsed_s": round(window, 3),
        "steps_per_s": round(summary["completed"] / window, 1) if window > 0 else None,
        "valid": valid,
        "pods": spec.pods,
        "pods_with_work": summary["pods_with_work"],
        "workload": spec.workload,
        "schema": schema,
        "duplicate_completions": summary["duplicate_completions"],
    }


def _print_run_table(result: dict[str, Any]) -> None:
    rows = [
        ("pods", result["pods"]), ("workload", result["workload"]),
        ("submitted", result["submitted"]), ("completed", result["completed"]),
        ("dead (DLQ)", result["dead"]), ("elapsed (first claim → last completion)",
                                         f"{result['elapsed_s']} s"),
        ("throughput", f"{result['steps_per_s']} steps/s"),
        ("history kept in schema", result["schema"]),
        ("verdict", "VALID" if result["valid"] else "INVALID"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")
