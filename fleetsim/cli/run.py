"""`fleetsim run` (one finite experiment, verified; or several seeds) and `fleetsim replay`."""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from fleetsim.cli.common import (
    DURATION,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    check_workload,
    cli,
    emit,
    fail,
    fleet_options,
    json_option,
    option,
    store_option,
)
from fleetsim.errors import ConfigError
from fleetsim.figures import figure_rows
from fleetsim.trends import trend_rows

# -- run ----------------------------------------------------------------------

#: Options an experiment's pod groups decide; giving one on the command line is an error.
_GROUP_OPTIONS = ("pods", "workload", "concurrency", "batch", "queues")


@cli.command()
@click.argument("experiment", required=False, metavar="[EXPERIMENT]")
@fleet_options
@option("--steps", type=click.IntRange(1, 10_000_000), default=10_000, help="Steps to run "
        "(drain mode: submit, then wait until every step ended).")
@option("--rate", type=click.FloatRange(0, None), default=0.0,
        help="Submit at this many steps per second (0: all at once).")
@option("--duration", type=DURATION, default=None,
        help="Open loop: submit at --rate steps/s for this long instead of --steps (e.g. "
        "30m); a run of a minute or more reports resource trends.")
@option("--schema", default=None, help="Schema for this run (default: a new run_<time> one, "
        "kept for `fleetsim check`).")
@option("--timeout", type=DURATION, default=600.0, env="FLEETSIM_RUN_TIMEOUT",
        help="Give up if not drained by then (after the load was submitted).")
@option("--chaos", "scenario", default=None, metavar="SCENARIO",
        help="Run this chaos scenario (a name from `chaos list`, or a .toml file) meanwhile.")
@option("--fault-proxy/--no-fault-proxy", default=None,
        help="Route each pod's store traffic through a fault proxy (default: only with "
        "faults).")
@option("--restart/--no-restart", default=None,
        help="Respawn pods that die (default: only with faults).")
@option("--repeat", type=click.IntRange(1, 1000), default=1,
        help="Run it N times with seeds seed..seed+N-1; print one row per seed, the "
        "fraction valid and the spread of each figure.")
@option("--report", "write_report", is_flag=True,
        help="At the end, write the run's report (plots, index.html) to "
        "RUN_DIR/reports/<schema>/ (see `fleetsim report`).")
@json_option
@click.pass_context
def run(ctx: click.Context, /, **params: Any) -> None:
    """One finite experiment: up, submit, wait until drained, verify, down.

    EXPERIMENT is a TOML file (or a shipped scenario's name, see `chaos
    list`) describing the fleet, queues, load, faults and thresholds; options
    given on the command line override it (docs/reference/experiments.md).
    Without it the options alone describe the run.

    The verdict is the checker's (`fleetsim check --final`): exit 0 only when
    the run is valid (every step completed or dead-lettered exactly as the
    invariants require, no duplicate or stale completion, no split brain)
    and every threshold passed. Each run leaves a replay record (`fleetsim
    replay`); a run that fails also leaves a failure bundle, whose path is
    printed.

    \b
    fleetsim run --pods 5 --steps 10000
    fleetsim run experiment.toml --seed 3 --json
    fleetsim run kill-leader-loop --repeat 5
    """
    from fleetsim.experiments import RunPlan, packaged_text

    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) not in (
            ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)

    if given("duration") and given("steps"):
        fail("--steps and --duration exclude each other: --steps drains a fixed number, "
             "--duration submits at --rate for that long", EXIT_USAGE)
    if params["experiment"] and params["scenario"]:
        fail("give an EXPERIMENT file or --chaos SCENARIO, not both (an experiment's faults "
             "are its [[fault]] sections)", EXIT_USAGE)
    experiment = None
    text = None
    resolved = dict(params)
    resolved["duration"] = None
    if params["experiment"]:
        from chaos.experiment import find_experiment

        experiment = find_experiment(params["experiment"])  # rejected before anything starts
        text = packaged_text(experiment.scenario.source)
        if experiment.groups and (clash := [n for n in _GROUP_OPTIONS if given(n)]):
            fail(f"--{clash[0].rstrip('s') if clash[0] == 'queues' else clash[0]} does not "
                 "apply: the experiment's [[fleet.group]] sections set each group's pods, "
                 "workload, concurrency, batch and queues", EXIT_USAGE)
        for name, value in experiment.settings.items():
            if not given(name):
                resolved[name] = value
        if given("steps"):
            resolved["duration"] = None  # --steps turns an open-loop load into drain mode
    if given("duration"):
        resolved["duration"] = params["duration"]
        if not resolved["rate"]:
            fail("--duration needs a rate (--rate, or the experiment's [load] rate): the load "
                 "submits rate steps/s for that long", EXIT_USAGE)
    elif params["scenario"]:
        from chaos.scenario import find_scenario

        find_scenario(params["scenario"])  # a bad file is rejected before anything starts
    _check_workloads(resolved, experiment)
    if params["repeat"] > 1 and params["schema"]:
        fail("--schema and --repeat exclude each other: each run gets a fresh schema",
             EXIT_USAGE)
    as_json = params["as_json"]

    def say(line: str) -> None:
        click.echo(line, err=True)

    results = []
    first_seed = int(resolved["seed"])
    for index in range(params["repeat"]):
        seed = first_seed + index
        schema = params["schema"] or (
            f"run_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:4]}")
        if params["repeat"] > 1:
            say(f"-- run {index + 1}/{params['repeat']}: seed {seed}")
        plan = RunPlan(run_dir=ctx.obj["run_dir"].path, params={**resolved, "seed": seed},
                       schema=schema, experiment=experiment, scenario=params["scenario"],
                       experiment_text=text, command=_as_run())
        results.append(_run_one(plan, say))
    if params["repeat"] == 1:
        result = results[0]
        emit(result, as_json, lambda: _print_run(result))
        _exit_for(result)
    summary = repeat_summary(results)
    emit(summary, as_json, lambda: _print_repeat(summary))
    sys.exit(EXIT_OK if all(r["passed"] for r in results) else EXIT_FAILURE)


def _as_run() -> tuple[str, ...]:
    """This command line as a user would type it (for the replay record)."""
    return ("fleetsim", *sys.argv[1:])


def _run_one(plan: Any, say: Callable[[str], None]) -> dict[str, Any]:
    from fleetsim.experiments import run_experiment

    return run_experiment(plan, say)


def _check_workloads(params: dict[str, Any], experiment: Any) -> None:
    """Every workload the run names, importable and valid, before anything starts."""
    handlers = tuple(params["handlers"])
    check_workload(params["workload"], handlers)
    if experiment is None:
        return
    for group in experiment.groups:
        check_workload(group.workload, handlers)
    for entry in experiment.load.mix:
        if entry.workload:
            check_workload(entry.workload, handlers)
    # A step in a queue no pod serves would never run: the run could only time out.
    served = {q for g in experiment.groups for q in g.queues} if experiment.groups else set(
        params["queues"])
    for index, entry in enumerate(experiment.load.mix):
        if entry.queue and "*" not in served and entry.queue not in served:
            raise ConfigError(f"{experiment.scenario.source}: load.mix[{index}].queue: no pod "
                              f"serves queue {entry.queue!r} (the pods serve "
                              f"{', '.join(sorted(served))})")


def _exit_for(result: dict[str, Any]) -> None:
    """Name each failed threshold (one line each) and exit 0 only if the run passed."""
    for row in result["thresholds"]:
        if not row["passed"]:
            shown = "not measured" if row["value"] is None else row["value"]
            click.secho(f"error: threshold {row['name']} {row['condition']} failed: {shown}",
                        fg="red", err=True)
    if result.get("timed_out"):
        click.secho(f"error: {result['timed_out']}", fg="red", err=True)
    if result.get("bundle"):
        click.echo(f"failure bundle: {result['bundle']}", err=True)
    sys.exit(EXIT_OK if result["passed"] else EXIT_FAILURE)


def _print_run(result: dict[str, Any]) -> None:
    rows = [
        ("experiment", result.get("experiment") or "-"),
        ("pods", result["pods"]), ("workload", result["workload"]),
        ("seed", result["seed"]),
        ("submitted", result["submitted"] if not result["rejected"]
         else f"{result['submitted']} ({result['rejected']} rejected: queue full)"),
        ("completed", result["completed"]),
        ("dead (DLQ)", result["dead"]), ("elapsed (first claim → last completion)",
                                         f"{result['elapsed_s']} s"),
        ("throughput", f"{result['steps_per_s']} steps/s"),
        *figure_rows(result.get("figures") or {}),
        *trend_rows(result.get("resources"), result.get("resources_skipped")),
        ("history kept in schema", result["schema"]),
        ("verdict", "VALID" if result["valid"] else "INVALID"),
    ]
    rows += [(f"threshold {t['name']} {t['condition']}",
              f"{'not measured' if t['value'] is None else t['value']} "
              f"{'ok' if t['passed'] else 'FAILED'}") for t in result["thresholds"]]
    rows.append(("replay record", result["record"]))
    if result.get("report"):
        rows.append(("report", result["report"]))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


def repeat_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """`run --repeat`'s document: every run, the fractions valid and passed, the spread."""
    numbers: dict[str, list[float]] = {}
    for result in results:
        values = {k: v for k, v in result.items() if k in ("elapsed_s", "steps_per_s", "lost")}
        values.update({k: v for k, v in result["figures"].items() if not isinstance(v, dict)})
        values.update({t["name"]: t["value"] for t in result["thresholds"]})
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                numbers.setdefault(name, []).append(float(value))
    spread = {name: {"min": min(v), "median": statistics.median(v), "max": max(v),
                     "runs": len(v)} for name, v in sorted(numbers.items())}
    count = len(results)
    return {
        "runs": results,
        "seeds": [r["seed"] for r in results],
        "valid_fraction": sum(1 for r in results if r["valid"]) / count,
        "passed_fraction": sum(1 for r in results if r["passed"]) / count,
        "spread": spread,
    }


def _print_repeat(summary: dict[str, Any]) -> None:
    click.echo(f"{'seed':>6}  {'verdict':<8} {'passed':<6} {'completed':>9} {'steps/s':>8}  "
               "failed thresholds")
    for r in summary["runs"]:
        failed = ", ".join(f"{t['name']} {t['condition']} ({t['value']})"
                           for t in r["thresholds"] if not t["passed"])
        click.echo(f"{r['seed']:>6}  {'valid' if r['valid'] else 'INVALID':<8} "
                   f"{'yes' if r['passed'] else 'NO':<6} {r['completed']:>9} "
                   f"{r['steps_per_s'] or '-':>8}  {failed or '-'}")
        if r.get("bundle"):
            click.echo(f"        failure bundle: {r['bundle']}")
    runs = len(summary["runs"])
    valid = round(summary["valid_fraction"] * runs)
    passed = round(summary["passed_fraction"] * runs)
    click.echo(f"valid {valid}/{runs}, passed {passed}/{runs}")
    for name, s in summary["spread"].items():
        click.echo(f"  {name:<28} min {s['min']:g}  median {s['median']:g}  max {s['max']:g}")


# -- replay -------------------------------------------------------------------


@cli.command()
@click.argument("run_ref", metavar="RUN_DIR_OR_SCHEMA")
@store_option
@json_option
@click.pass_context
def replay(ctx: click.Context, run_ref: str, store: str | None, as_json: bool) -> None:
    """Run a recorded run again: same experiment, settings, seed and fault schedule.

    RUN_DIR_OR_SCHEMA is a run's record folder (`runs/<schema>` in the run
    directory, or a failure bundle `failures/<schema>`) or just its schema.
    Faults hit the pods the original run's picks resolved to (`leader`
    stays whoever leads at the time). Exit 0 if the verdict and every
    threshold's pass/fail came out the same as recorded, else 1.
    """
    from fleetsim.experiments import RunPlan, find_record, replayed_schedule

    path, record = find_record(run_ref, ctx.obj["run_dir"].path)
    experiment = None
    if record.get("experiment_text"):
        from chaos.experiment import parse_experiment

        experiment = parse_experiment(record["experiment_text"],
                                      record.get("source") or str(path))
    elif record.get("experiment"):
        raise ConfigError(f"{path}: the record does not hold the experiment's text")
    params = dict(record["params"])
    params["store"] = store
    params["handlers"] = tuple(params.get("handlers") or ())
    params["queues"] = tuple(params.get("queues") or ("*",))
    _check_workloads(params, experiment)
    schema = f"replay_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:4]}"
    plan = RunPlan(run_dir=ctx.obj["run_dir"].path, params=params, schema=schema,
                   experiment=experiment, scenario=record.get("scenario"),
                   experiment_text=record.get("experiment_text"),
                   schedule=replayed_schedule(record) if record.get("faults") else None,
                   command=_as_run())

    def say(line: str) -> None:
        click.echo(line, err=True)

    say(f"replaying {path} (seed {record['seed']}, {len(record.get('faults', []))} faults)")
    result = _run_one(plan, say)
    before = {t["name"]: t["passed"] for t in record.get("thresholds", [])}
    after = {t["name"]: t["passed"] for t in result["thresholds"]}
    same = record["valid"] == result["valid"] and before == after
    data = {"same": same, "replayed": str(path),
            "original": {"valid": record["valid"], "passed": record.get("passed"),
                         "thresholds": record.get("thresholds", [])},
            "result": result}

    def text() -> None:
        _print_run(result)
        click.echo(f"original: {'VALID' if record['valid'] else 'INVALID'}, "
                   f"thresholds {before or '-'}")
        click.echo("replay came out the same" if same else "replay came out DIFFERENT")

    emit(data, as_json, text)
    sys.exit(EXIT_OK if same else EXIT_FAILURE)
