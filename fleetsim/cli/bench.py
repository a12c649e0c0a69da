"""``fleetsim bench``: fleet throughput beside a raw SKIP LOCKED loop, and baselines.

Registered on the ``fleetsim`` group by one import at the end of
:mod:`fleetsim.cli`; the measuring lives in :mod:`fleetsim.bench`.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from fleetsim.bench import BenchPlan, BenchReport, run_bench
from fleetsim.bench.baseline import (
    baseline_of,
    compare,
    load_baseline,
    machine_facts,
    parse_tolerance,
)
from fleetsim.cli.common import EXIT_OK, cli, fail, option, store_option
from fleetsim.errors import ConfigError
from fleetsim.store.url import redact_argv

EXIT_INTERRUPTED = 130


def _ints(name: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--{name} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--{name} takes positive integers, got {text!r}")
    return values


def _on_off(name: str, text: str) -> tuple[bool, ...]:
    values = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not values or set(values) - {"on", "off"} or len(set(values)) < len(values):
        raise ConfigError(f"--{name} takes on, off or on,off, got {text!r}")
    return tuple(v == "on" for v in values)


@contextlib.contextmanager
def _store_url(ctx: click.Context, url: str | None) -> Iterator[str]:
    """The given server, else the run directory's embedded one for the bench's duration."""
    if url:
        yield url
        return
    from fleetsim.embedded_use import borrowed_embedded

    click.echo("store: the run directory's embedded PostgreSQL (--store for another)",
               err=True)
    run_dir = ctx.obj["run_dir"].ensure()
    with borrowed_embedded(run_dir) as embedded:
        yield embedded


@cli.command()
@option("--pods", default="5", metavar="N[,N...]", help="Fleet sizes to measure.")
@option("--concurrency", default="1", metavar="N[,N...]", help="Steps each pod runs at once.")
@option("--batch", default="50", metavar="N[,N...]", help="Steps claimed per round trip.")
@option("--workload", default="noop", metavar="SPEC[,SPEC...]",
        help="Workloads: noop, sleep:<ms>, cpu:<ms> (the reference runs these), or a "
        "module:function (no reference row, no ratio).")
@option("--steps", type=click.IntRange(1, 10_000_000), default=20_000,
        help="Steps per trial.")
@option("--repeat", type=click.IntRange(1, 100), default=3,
        help="Trials per configuration (medians and ranges are reported).")
@option("--reference-only", is_flag=True,
        help="Only the raw SKIP LOCKED loop: what a bare queue gets on this server.")
@option("--store-loop", is_flag=True,
        help="Also the store's own claim loop (Store.claim_steps + complete_many from one "
        "process per pod, no pods or coordinator): what the store's SQL costs beside the "
        "reference, and what the pods add on top.")
@option("--metrics", "metrics", default="on", metavar="on|off|on,off",
        env="FLEETSIM_BENCH_METRICS",
        help="Fleets with pod metrics on, off or both (what metrics cost).")
@option("--client-history", "client_history", default="on", metavar="on|off|on,off",
        env="FLEETSIM_BENCH_CLIENT_HISTORY",
        help="Fleets with client histories on, off or both (what they cost).")
@option("--checker", is_flag=True,
        help="Instead of throughput: time `check --final` on a synthetic valid history of "
        "--steps steps (generated in the server), --repeat times in a fresh process; its "
        "peak RSS and verdict.")
@option("--chaos", default=None, metavar="FAULT[,FAULT...]",
        help="Instead of throughput: failover and orphan re-claim figures (the checker's, "
        "and from the fault), and throughput during the fault, over --repeat trials of "
        "each fault: kill-leader, kill, pause-leader, partition-leader, "
        "storage-brownout.")
@option("--spawn", default="fork", metavar="fork|exec|fork,exec", env="FLEETSIM_BENCH_SPAWN",
        help="With --chaos: how the fleets start their pods (`up --spawn`); fork,exec runs "
        "both side by side, a row each.")
@option("--timeout", type=float, default=600.0, env="FLEETSIM_BENCH_TIMEOUT",
        help="Give up on a trial not drained after this many seconds.")
@option("--json", "json_file", default=None, metavar="FILE", env="FLEETSIM_BENCH_JSON",
        help="Write the full result (rows and every trial) as JSON to FILE ('-': stdout, "
        "instead of the table).")
@option("--save-baseline", type=click.Path(dir_okay=False, path_type=Path), default=None,
        metavar="FILE", help="Write the ratios measured, with the machine's facts, to FILE.")
@option("--baseline", type=click.Path(dir_okay=False, path_type=Path), default=None,
        metavar="FILE", help="Compare the ratios to this baseline; exit 1 naming each "
        "figure that regressed.")
@option("--max-regression", default="10%", metavar="PCT",
        help="How much worse than the baseline a figure may be.")
@store_option
@click.pass_context
def bench(ctx: click.Context, /, **params: Any) -> None:
    """Measure fleets beside the raw SKIP LOCKED reference loop.

    Each fleet configuration (every combination of --pods, --concurrency,
    --batch, --workload, --metrics and --client-history) drains --steps
    steps in a fresh schema, started and stopped like `fleetsim run`; the
    reference loop (one process per pod,
    the same batch and workload) drains the same number in the same run.
    Configurations are interleaved, the order reversed on every other repeat.
    One table: steps/s and the ratio to the reference (median and range over
    the repeats), latency from the start to each completion, peak RSS, CPU
    per step (pods + coordinator; the server's backends separately) and
    transactions per step. --store-loop adds the store's own claim loop
    beside the reference; --chaos and --checker measure failover and the
    checker instead.

    With --baseline, exits 1 if a ratio regressed beyond --max-regression.
    Ctrl-C stops the current trial cleanly and prints what was measured.
    """
    if params["chaos"] and params["checker"]:
        raise ConfigError("--chaos and --checker are separate benches: give one")
    if params["spawn"] != "fork" and not params["chaos"]:
        # The throughput rows measure the fleet once it runs: how its pods
        # started does not change them.
        raise ConfigError("--spawn is for --chaos (the throughput fleets always fork)")
    if params["chaos"]:
        _bench_chaos(ctx, params)
        return
    if params["checker"]:
        _bench_checker(ctx, params)
        return
    tolerance = parse_tolerance(params["max_regression"])
    baseline = load_baseline(params["baseline"]) if params["baseline"] else None
    plan = BenchPlan(
        pods=_ints("pods", params["pods"]),
        concurrency=_ints("concurrency", params["concurrency"]),
        batch=_ints("batch", params["batch"]),
        workloads=tuple(w.strip() for w in params["workload"].split(",") if w.strip()),
        steps=params["steps"], repeat=params["repeat"],
        fleet=not params["reference_only"], timeout_s=params["timeout"],
        store_loop=params["store_loop"], metrics=_on_off("metrics", params["metrics"]),
        client_history=_on_off("client-history", params["client_history"]),
    )
    if not plan.fleets() and not plan.references():
        raise ConfigError("nothing to measure: the reference runs only noop, sleep:<ms>, "
                          "cpu:<ms>")
    if not params["reference_only"]:
        from fleetsim.cli.common import check_workload

        for workload in plan.workloads:
            check_workload(workload)

    def say(line: str) -> None:
        click.echo(f"bench: {line}", err=True)

    with _store_url(ctx, params["store"]) as url:
        from fleetsim.bench import server

        try:
            conn = server.connect(url)
            pg_version = server.server_version(conn)
            conn.close()
        except Exception as exc:  # any driver error: one line
            from fleetsim.errors import StoreUnavailable

            raise StoreUnavailable(f"cannot reach the store: {str(exc).strip()}") from exc
        report = run_bench(plan, url, say)
    machine = machine_facts(pg_version)
    rows = report.rows()
    command = "fleetsim " + shlex.join(redact_argv(sys.argv[1:]))
    data = {**report.as_dict(), "machine": machine, "command": command}
    regressions, missing = ([], []) if baseline is None else compare(baseline, rows, tolerance)
    if baseline is not None:
        data["baseline"] = {"file": str(params["baseline"]), "tolerance": tolerance,
                            "regressions": [r.__dict__ for r in regressions],
                            "not_measured": missing}
    to_stdout = params["json_file"] == "-"
    if params["json_file"] and not to_stdout:
        Path(params["json_file"]).write_text(json.dumps(data, indent=2) + "\n")
    if to_stdout:
        click.echo(json.dumps(data, indent=2))
    else:
        print_table(report, machine)
    if params["save_baseline"] and rows and not report.interrupted:
        params["save_baseline"].write_text(
            json.dumps(baseline_of(rows, machine, command), indent=2) + "\n")
        say(f"baseline written to {params['save_baseline']}")
    if report.interrupted:
        sys.exit(EXIT_INTERRUPTED)
    failed = [row for row in rows if row["errors"]]
    for regression in regressions:
        click.secho(f"regressed: {regression.describe()}", fg="red", err=True)
    for key in missing:
        click.echo(f"bench: not measured, so not compared: {key}", err=True)
    if failed:
        fail(f"{len(failed)} configuration(s) had failed trials: "
             + "; ".join(f"{r['key']}: {r['errors'][0]}" for r in failed))
    if regressions:
        fail(f"{len(regressions)} figure(s) regressed beyond {tolerance:.0%}: "
             + ", ".join(f"{r.key} {r.figure}" for r in regressions))
    sys.exit(EXIT_OK)


def _bench_chaos(ctx: click.Context, params: dict[str, Any]) -> None:
    """`bench --chaos`: the chaos table (and JSON)."""
    from fleetsim.bench.chaos import chaos_table_lines, parse_faults, parse_spawns, run_chaos

    faults = parse_faults(params["chaos"])
    spawns = parse_spawns(params["spawn"])

    def say(line: str) -> None:
        click.echo(f"bench: {line}", err=True)

    with _store_url(ctx, params["store"]) as url:
        rows = run_chaos(url, faults, params["repeat"], say, spawns=spawns)
    data = {"chaos": rows, "repeat": params["repeat"],
            "command": "fleetsim " + shlex.join(redact_argv(sys.argv[1:]))}
    if params["json_file"] and params["json_file"] != "-":
        Path(params["json_file"]).write_text(json.dumps(data, indent=2) + "\n")
    if params["json_file"] == "-":
        click.echo(json.dumps(data, indent=2))
    else:
        for line in chaos_table_lines(rows) if rows else ["nothing was measured"]:
            click.echo(line)
        click.echo("\ndatabase time. From the checker: failover = the old leader's last sign "
                   "of life -> the next term; orphan re-claim = a dead pod's claim -> its "
                   "step claimed again. From the fault (the clock read just before the "
                   "injector acts): the next term's start; the next claim of each step the "
                   "victim held. Medians of the trials' medians, max of maxima. Throughput "
                   "during/before: completions per second in the fault's window (its 'for', "
                   "or the lease for a kill) / before it in the same trial, median [min-max].")
    invalid = [r["fault"] for r in rows if r["valid"] < r["trials"]]
    if invalid:
        fail(f"invalid or failed trials: {', '.join(invalid)}")
    sys.exit(EXIT_OK)


def _bench_checker(ctx: click.Context, params: dict[str, Any]) -> None:
    """`bench --checker`: the checker's time and memory on a synthetic history."""
    from fleetsim.bench.checker import checker_table_lines, run_checker_bench

    def say(line: str) -> None:
        click.echo(f"bench: {line}", err=True)

    with _store_url(ctx, params["store"]) as url:
        row = run_checker_bench(url, params["steps"], params["repeat"], say)
    data = {"checker": row, "command": "fleetsim " + shlex.join(redact_argv(sys.argv[1:]))}
    if params["json_file"] and params["json_file"] != "-":
        Path(params["json_file"]).write_text(json.dumps(data, indent=2, default=str) + "\n")
    if params["json_file"] == "-":
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        for line in checker_table_lines(row):
            click.echo(line)
    if row["verdict"] != "valid":
        fail(f"the synthetic history was judged {row['verdict']}, not valid: "
             f"{row['violations']}")
    sys.exit(EXIT_OK)


# -- the table --------------------------------------------------------------------

COLUMNS = ("config", "completed", "success %", "steps/s", "ratio to ref", "e2e p50",
           "p95", "p99", "RSS pod", "RSS coord", "CPU µs/step", "server µs/step",
           "xacts/step")


def _spread(value: dict[str, float] | None, spec: str) -> str:
    if not value:
        return "-"
    text = format(value["median"], spec)
    if value["n"] > 1:
        text += f" [{format(value['min'], spec)}-{format(value['max'], spec)}]"
    return text


def _num(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The result table, one line per configuration, columns aligned."""
    body = [[
        row["key"], f"{row['completed']}/{row['steps']}",
        _num(row["success_pct"], ".1f"), _spread(row["steps_s"], ",.0f"),
        _spread(row["ratio"], ".2f") if row["kind"] != "reference" else "1",
        _num(row["e2e_p50_s"], ".0f", 1000) + " ms", _num(row["e2e_p95_s"], ".0f", 1000),
        _num(row["e2e_p99_s"], ".0f", 1000),
        _num(row["rss_pod"], ".0f", 1 / 2**20) + " MB",
        _num(row["rss_coordinator"], ".0f", 1 / 2**20),
        _num(row["cpu_us_per_step"], ".1f"), _num(row["server_cpu_us_per_step"], ".1f"),
        _num(row["transactions_per_step"], ".3f"),
    ] for row in rows]
    widths = [max(len(COLUMNS[i]), *(len(r[i]) for r in body)) for i in range(len(COLUMNS))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return lines


def time_split_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Where each fleet's time goes, beside its reference: client and server CPU, round trips."""
    refs = {(r["key"].split(" ", 1)[1]): r for r in rows if r["kind"] == "reference"}
    lines = []
    for row in rows:
        if row["kind"] != "fleet":
            continue
        # "pods=N c=C batch=B WORKLOAD [option=off...]" -> "procs=N batch=B WORKLOAD"
        pods, _, batch, workload = row["key"].split()[:4]
        ref = refs.get(f"procs={pods.split('=')[1]} {batch} {workload}")
        if ref is None or row["cpu_us_per_step"] is None or ref["cpu_us_per_step"] is None:
            continue
        mine = row["cpu_us_per_step"] + (row["server_cpu_us_per_step"] or 0.0)
        theirs = ref["cpu_us_per_step"] + (ref["server_cpu_us_per_step"] or 0.0)
        lines.append(
            f"{row['key']}: client {_num(row['pods_cpu_us_per_step'], '.1f')} (pods) + "
            f"{_num(row['coordinator_cpu_us_per_step'], '.1f')} (coordinator) µs/step vs "
            f"{ref['cpu_us_per_step']:.1f}; server {_num(row['server_cpu_us_per_step'], '.1f')}"
            f" vs {_num(ref['server_cpu_us_per_step'], '.1f')}; xacts/step "
            f"{_num(row['transactions_per_step'], '.3f')} vs "
            f"{_num(ref['transactions_per_step'], '.3f')}: "
            f"{mine / theirs:.1f}x the reference's CPU per step" if theirs else "")
    return ["", "where the time goes:", *lines] if lines else []


def print_table(report: BenchReport, machine: dict[str, Any]) -> None:
    """The table for people, with what its columns mean."""
    rows = report.rows()
    if not rows:
        click.echo("nothing was measured")
        return
    for line in table_lines(rows):
        click.echo(line)
    click.echo(
        f"\n{report.plan.steps} steps per trial, {report.plan.repeat} repeat(s), medians "
        "[min-max]; ratio: steps/s ÷ the reference's of the same repeat. e2e: from the "
        "first claim to each completion (all steps queued at the start). CPU µs/step: "
        "pods + coordinator (reference, store loop: their claimers), user + system; "
        "server µs/step: the backends serving them (local server only); xacts/step: the "
        "database's commits per step (other clients count too).")
    for line in time_split_lines(rows):
        click.echo(line)
    click.echo(f"machine: {machine['cores']} cores, {machine['cpu_model']}, "
               f"{machine['postgresql']}, Python {machine['python']}, load "
               f"{machine['loadavg_1m']:.1f}")
    if report.interrupted:
        click.echo("INTERRUPTED: partial results")
