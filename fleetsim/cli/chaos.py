"""`fleetsim chaos ...`: faults on the running fleet, scenarios, fuzzing."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fleetsim.cli.common import (
    DURATION,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    F,
    cli,
    emit,
    fail,
    fleet_bus_secret,
    json_option,
    option,
    scratch_store,
    store_option,
)
from fleetsim.errors import (
    FleetNotRunning,
    FleetsimError,
)

# -- chaos ----------------------------------------------------------------------


@cli.group()
def chaos() -> None:
    """Inject faults into the running fleet (through its coordinator).

    \b
    fleetsim chaos kill-leader
    fleetsim chaos pause leader --for 9s
    fleetsim chaos partition pod-2 --from store --mode blackhole --for 10s
    fleetsim chaos storage-fault --all --error-rate 0.2 --latency 50ms --for 8s
    fleetsim chaos heal
    """


def chaos_request(ctx: click.Context, action: str, target: str | None,
                  params: dict[str, Any], as_json: bool, timeout: float) -> dict[str, Any]:
    """Send one chaos action to the coordinator and print its reply."""
    from fleetsim.bus import ChaosRequest, ControlClient, Error

    data = ctx.obj["run_dir"].read_running()
    endpoint = (data.get("bus") or {}).get("cli")
    if not endpoint:
        raise FleetNotRunning("the running fleet has no control bus")
    client_keys = None
    if data.get("bus_keys"):
        from fleetsim.bus.security import load_client_keys

        client_keys = load_client_keys(data["bus_keys"])
    secret = fleet_bus_secret(ctx.obj["run_dir"], data)
    with ControlClient(endpoint, keys=client_keys, timeout_s=timeout, secret=secret) as client:
        reply = client.request(ChaosRequest(action, target, params), timeout_s=timeout)
    if isinstance(reply, Error):
        fail(reply.message, EXIT_USAGE if reply.code == "bad-request" else EXIT_FAILURE)
    result: dict[str, Any] = dict(reply.data)
    emit(result, as_json, lambda: click.echo(describe_chaos(result)))
    return result


def check_fault_duration(duration: float | None) -> None:
    """Refuse ``--for 0``: a fault lasts until healed only when --for is left out."""
    if duration is not None and duration <= 0:
        fail("--for must be longer than zero (leave --for out to last until "
             "`chaos heal`)", EXIT_USAGE)


def describe_chaos(result: dict[str, Any]) -> str:
    """One line saying what a chaos action did."""
    action = result.get("action", "?")
    details = ", ".join(f"{k} {v}" for k, v in result.items()
                        if k != "action" and v not in (None, [], {}))
    return f"{action}: {details}" if details else f"{action}: done"


def chaos_options(f: F) -> F:
    """--json and --timeout for chaos commands."""
    f = option("--timeout", type=DURATION, default=10.0, env="FLEETSIM_CHAOS_TIMEOUT",
               help="How long to wait for the coordinator's reply.")(f)
    return json_option(f)


@chaos.command("kill-leader")
@chaos_options
@click.pass_context
def chaos_kill_leader(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """SIGKILL the current leader; prints its pod, pid and term."""
    chaos_request(ctx, "kill-leader", None, {}, as_json, timeout)


@chaos.command("kill")
@click.argument("pod", required=False)
@option("--random", "pick_random", is_flag=True, help="Kill a random pod (seeded).")
@chaos_options
@click.pass_context
def chaos_kill(ctx: click.Context, pod: str | None, pick_random: bool, as_json: bool,
               timeout: float) -> None:
    """SIGKILL a pod: POD (an id, or `leader`) or --random."""
    if bool(pod) == pick_random:
        fail("name a POD or give --random", EXIT_USAGE)
    chaos_request(ctx, "kill", "random" if pick_random else pod, {}, as_json, timeout)


@chaos.command("pause")
@click.argument("pod")
@option("--for", "duration", type=DURATION, default=None,
              help="Resume (SIGCONT) after this long (must be longer than zero); without "
              "--for the pod stays paused until `chaos resume` or `chaos heal`.")
@chaos_options
@click.pass_context
def chaos_pause(ctx: click.Context, pod: str, duration: float | None, as_json: bool,
                timeout: float) -> None:
    """SIGSTOP a pod (an id, `leader` or `random`), e.g. to freeze a leader past its lease."""
    check_fault_duration(duration)
    chaos_request(ctx, "pause", pod, {"for": duration}, as_json, timeout)


@chaos.command("resume")
@click.argument("pod")
@chaos_options
@click.pass_context
def chaos_resume(ctx: click.Context, pod: str, as_json: bool, timeout: float) -> None:
    """SIGCONT a paused pod."""
    chaos_request(ctx, "resume", pod, {}, as_json, timeout)


@chaos.command("partition")
@click.argument("pod")
@option("--from", "where", type=click.Choice(["store", "bus", "all"]), default="store",
              show_default=True, help="Cut the pod off from the store, the bus, or both.")
@option("--mode", type=click.Choice(["blackhole", "reset"]), default="blackhole",
              show_default=True, help="blackhole: packets vanish; reset: connections refused.")
@option("--for", "duration", type=DURATION, default=None,
              help="Heal after this long (must be longer than zero); without --for the "
              "partition lasts until `chaos heal` (a bus partition lasts 10 s unless "
              "given, and ends by itself).")
@chaos_options
@click.pass_context
def chaos_partition(ctx: click.Context, pod: str, where: str, mode: str,
                    duration: float | None, as_json: bool, timeout: float) -> None:
    """Partition a pod (an id, `leader` or `random`) from the store and/or the bus."""
    check_fault_duration(duration)
    chaos_request(ctx, "partition", pod, {"from": where, "mode": mode, "for": duration},
                  as_json, timeout)


@chaos.command("heal")
@click.argument("pod", required=False)
@chaos_options
@click.pass_context
def chaos_heal(ctx: click.Context, pod: str | None, as_json: bool, timeout: float) -> None:
    """End partitions, pauses and storage faults (of POD, or all)."""
    chaos_request(ctx, "heal", pod, {}, as_json, timeout)


@chaos.command("storage-fault")
@click.argument("pod", required=False)
@option("--all", "all_pods", is_flag=True, help="Every pod.")
@option("--error-rate", type=click.FloatRange(0, 1), default=0.0,
              help="Share of statements that fail.")
@option("--latency", type=DURATION, default=0.0, help="Added to every statement.")
@option("--disconnect-rate", type=click.FloatRange(0, 1), default=0.0,
              help="Share of statements whose connection is dropped.")
@option("--reply-loss-rate", type=click.FloatRange(0, 1), default=0.0,
              help="Share of statements that take effect but whose reply is lost"
                   " (the connection drops after them).")
@option("--for", "duration", type=DURATION, default=None,
              help="End after this long (must be longer than zero); without --for the "
              "fault lasts until `chaos heal`.")
@chaos_options
@click.pass_context
def chaos_storage_fault(ctx: click.Context, pod: str | None, all_pods: bool, error_rate: float,
                        latency: float, disconnect_rate: float, reply_loss_rate: float,
                        duration: float | None, as_json: bool, timeout: float) -> None:
    """Errors, latency, disconnects and lost replies on a pod's store statements."""
    if bool(pod) == all_pods:
        fail("name a POD or give --all", EXIT_USAGE)
    check_fault_duration(duration)
    chaos_request(ctx, "storage-fault", "all" if all_pods else pod, {
        "error_rate": error_rate, "latency_ms": latency * 1000.0,
        "disconnect_rate": disconnect_rate, "reply_loss_rate": reply_loss_rate,
        "for": duration,
    }, as_json, timeout)


@chaos.command("hang")
@click.argument("pod")
@option("--for", "duration", type=DURATION, default=None,
        help="How long the step hangs (default: an hour).")
@chaos_options
@click.pass_context
def chaos_hang(ctx: click.Context, pod: str, duration: float | None, as_json: bool,
               timeout: float) -> None:
    """Make a pod's next step hang (an id, `leader` or `random`): try execution timeouts."""
    check_fault_duration(duration)
    chaos_request(ctx, "hang", pod, {"for": duration}, as_json, timeout)


@chaos.command("store-restart")
@chaos_options
@click.pass_context
def chaos_store_restart(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """Restart the embedded PostgreSQL server mid-run."""
    chaos_request(ctx, "store-restart", None, {}, as_json, max(timeout, 60.0))


@chaos.command("list")
@json_option
def chaos_list(as_json: bool) -> None:
    """The shipped scenarios (chaos/scenarios/*.toml)."""
    from chaos.scenario import list_scenarios

    scenarios = list_scenarios()

    def text() -> None:
        for s in scenarios:
            click.echo(f"{s.name:<30} {s.duration_s:>5g}s  {s.description}")

    emit([s.as_dict() for s in scenarios], as_json, text)


@chaos.command("run")
@click.argument("scenario")
@option("--seed", type=int, default=None, env="FLEETSIM_CHAOS_SEED",
        help="Seed of the schedule (default: the file's, else the fleet's).")
@option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the faults until the scenario ends.")
@chaos_options
@click.pass_context
def chaos_run(ctx: click.Context, scenario: str, seed: int | None, wait: bool, as_json: bool,
              timeout: float) -> None:
    """Run a scenario (a name from `chaos list`, or a .toml file) against the fleet."""
    from chaos.scenario import find_scenario

    found = find_scenario(scenario)  # a bad file is rejected before anything runs
    spec = found.source if Path(found.source).is_file() else found.name
    log_path = ctx.obj["run_dir"].path / "faults.jsonl"
    offset = log_path.stat().st_size if log_path.exists() else 0
    params: dict[str, Any] = {} if seed is None else {"seed": seed}
    started = chaos_request(ctx, "run-scenario", str(Path(spec).resolve())
                            if Path(spec).is_file() else spec, params, as_json, timeout)
    if not wait:
        return
    deadline = time.monotonic() + float(started.get("duration_s", 0)) + 60
    while time.monotonic() < deadline:
        lines, offset = _new_lines(log_path, offset)
        for line in lines:
            if not as_json and line.get("type") == "fault":
                click.echo(f"  t+{line.get('offset_s', 0):6.1f}s {line.get('action')} "
                           f"{','.join(line.get('targets') or []) or '-'}: {line.get('outcome')}")
            if line.get("type") == "note" and line.get("event") == "end":
                if as_json:
                    click.echo(json.dumps(line))
                else:
                    click.echo(f"scenario over: {line.get('applied')} faults applied, "
                               f"{line.get('failed')} failed; log {log_path}")
                return
        time.sleep(0.2)
    fail(f"the scenario did not finish in time; see {log_path}")


@chaos.command("fuzz")
@option("--seed", type=int, default=0, help="The campaign's seed: case N is drawn from it.")
@option("--runs", type=click.IntRange(1, 100_000), default=5, help="How many cases.")
@option("--duration", type=DURATION, default=12.0,
        help="Length of each case's fault window (the load drains after it).")
@option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Where failing cases go (default: <run dir>/fuzz).")
@option("--shrink/--no-shrink", default=True, help="Shrink a failing case (re-runs it).")
@option("--store-restart/--no-store-restart", default=None,
        help="Include store restarts (default: only on the embedded store).")
@option("--replay", type=click.Path(dir_okay=False, exists=True, path_type=Path),
        default=None, help="Run one case file written by an earlier campaign.")
@store_option
@json_option
@click.pass_context
def chaos_fuzz(ctx: click.Context, seed: int, runs: int, duration: float, out: Path | None,
               shrink: bool, store_restart: bool | None, replay: Path | None,
               store: str | None, as_json: bool) -> None:
    """Random fault schedules crossed with random loads, each judged by `check --final`.

    Faults: kill, kill-leader, pause, partition from the store or the bus,
    storage errors, latency, disconnects, lost replies, store restarts.
    Loads: bulk, trickle below capacity, bursts, limited and strict-FIFO
    queues, cancels, resubmits with idempotency keys, failing steps. Each
    case runs a fresh fleet in a fresh schema. A failing case is written
    (JSON to replay it exactly, TOML as a scenario), shrunk to the fewest
    faults and load features that still fail, and the command exits 1.
    Without --store, an embedded PostgreSQL runs in a temporary folder.
    """
    from chaos.fuzz import FuzzReport, describe, fuzz, load_case
    from chaos.trial import run_trial

    say: Callable[[str], None] = (
        (lambda _: None) if as_json else (lambda line: click.echo(line, err=True)))
    folder = out or ctx.obj["run_dir"].path / "fuzz"
    with scratch_store(store) as url:
        if replay is not None:
            try:
                trial = load_case(replay)
            except (ValueError, TypeError, KeyError, FleetsimError) as exc:
                fail(f"{replay} is not a fuzz case file: {exc}", EXIT_USAGE)
            say(f"replay: {describe(trial)}")
            report = FuzzReport(seed, [run_trial(url, trial, name=str(replay), seed=seed,
                                                 say=say)])
            if report.runs[0].verdict != "valid":
                report.failed.append({"case": str(replay),
                                      "violations": report.runs[0].violations})
        else:
            report = fuzz(url, seed=seed, runs=runs, duration_s=duration, out_dir=folder,
                          store_restart=(store is None) if store_restart is None
                          else store_restart, shrink=shrink, say=say)

    def summary() -> None:
        valid = sum(1 for r in report.runs if r.verdict == "valid")
        click.echo(f"{valid}/{len(report.runs)} cases valid (seed {seed})")
        for failure in report.failed:
            click.echo(f"  case {failure['case']}: {failure.get('violations')}")
            for line in failure.get("witnesses", [])[:3]:
                click.echo(f"    {line}")
            if "shrunk" in failure:
                click.echo(f"    shrunk: {failure['shrunk']['trial']}")
                click.echo(f"    files: {failure['shrunk']['files']['case']}, "
                           f"{failure['shrunk']['files']['scenario']}")

    emit(report.as_dict(), as_json, summary)
    sys.exit(EXIT_OK if report.passed else EXIT_FAILURE)


def _new_lines(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    try:
        with open(path) as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], offset
    complete = chunk[: chunk.rfind("\n") + 1]
    lines = []
    for raw in complete.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines, offset + len(complete.encode())
