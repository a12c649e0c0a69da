"""The ``fleetsim`` command line.

Every option has an environment variable ``FLEETSIM_<NAME>`` (shown in
``--help``); commands that report take ``--json``; errors print one line
(the cause chain with ``-v``) and exit non-zero:

====  ======================================================
code  meaning
====  ======================================================
0     success
1     failure (an invalid run, a crashed command)
2     bad usage or configuration
3     the store is unreachable
4     no running fleet in the run directory
====  ======================================================
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from fleetsim import __version__
from fleetsim.config import FleetTimings
from fleetsim.durations import DurationType
from fleetsim.errors import (
    ConfigError,
    FleetNotRunning,
    FleetsimError,
    SchemaMismatch,
    StoreUnavailable,
)
from fleetsim.rundir import RunDir
from fleetsim.status import status_data, unserved_warning
from fleetsim.store import StepSpec, Store, StoreConfig, redact

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_STORE, EXIT_NOT_RUNNING = 0, 1, 2, 3, 4
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
DURATION = DurationType()
DEFAULTS = FleetTimings()


def option(*decls: str, env: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """A click option whose env var is FLEETSIM_<NAME> (or ``env``), shown in --help."""
    if env is None:
        longest = max((d.split("/")[0] for d in decls if d.startswith("--")), key=len)
        env = "FLEETSIM_" + longest.lstrip("-").replace("-", "_").upper()
    kwargs.setdefault("show_default", "default" in kwargs and not kwargs.get("is_flag"))
    return click.option(*decls, envvar=env, show_envvar=True, **kwargs)


def json_option(f: F) -> F:
    """The --json flag of reporting commands."""
    return option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def emit(data: Any, as_json: bool, text: Callable[[], None]) -> None:
    """Print ``data`` as JSON, or call ``text`` to print it for people."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        text()


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one error line and exit."""
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


def exit_code_for(exc: FleetsimError) -> int:
    """The exit code of an error class (see the module docstring)."""
    if isinstance(exc, ConfigError | SchemaMismatch):
        return EXIT_USAGE
    if isinstance(exc, StoreUnavailable):
        return EXIT_STORE
    if isinstance(exc, FleetNotRunning):
        return EXIT_NOT_RUNNING
    return EXIT_FAILURE


class FleetsimGroup(click.Group):
    """Turns fleetsim errors into one line and a named exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FleetsimError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            fail(str(exc), exit_code_for(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=FleetsimGroup, context_settings={"help_option_names": ["-h", "--help"]})
@option("-v", "--verbose", is_flag=True, help="Log more; show the cause chain of errors.")
@option(
    "--run-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".fleetsim"),
    help="Where the running fleet keeps run.json, logs and the embedded database.",
)
@click.version_option(__version__, prog_name="fleetsim")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, run_dir: Path) -> None:
    """fleetsim: a fleet of PostgreSQL-backed worker pods and the chaos harness that proves it.

    \b
    fleetsim up --pods 5        start a fleet on an embedded PostgreSQL
    fleetsim submit --count 100 submit steps to it (from another terminal)
    fleetsim status             who leads, which pods live, how many steps
    fleetsim down               stop everything `up` started
    fleetsim run --pods 5 --steps 10000   one finite experiment, verified
    """
    ctx.obj = {"verbose": verbose, "run_dir": RunDir(run_dir)}
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


# -- shared store resolution ------------------------------------------------

store_option = option(
    "--store", metavar="URL",
    help="PostgreSQL URL of the store (default: the running fleet's store).",
)
schema_option = option(
    "--schema", metavar="NAME",
    help="PostgreSQL schema holding the fleetsim tables (default: the running fleet's, "
    "else 'fleetsim').",
)


def open_store(ctx: click.Context, url: str | None, schema: str | None) -> Store:
    """A Store from --store/--schema, else from the running fleet's run.json."""
    run_dir: RunDir = ctx.obj["run_dir"]
    if not url and not run_dir.run_file.exists() and (run_dir.pgdata / "PG_VERSION").exists():
        # No fleet running, but an embedded store from an earlier `up`/`run` is here:
        # open it for this command only (e.g. `fleetsim check --schema run_...`).
        # Shared with any other command doing the same; the last one out stops it.
        from fleetsim.embedded_use import borrowed_embedded

        url = ctx.with_resource(borrowed_embedded(run_dir))
    if not url:
        data = run_dir.read()
        url = data.get("store_url")
        schema = schema or data.get("schema")
        if not url:
            raise FleetNotRunning(f"{run_dir.run_file} names no store")
    elif not schema:
        # The same store as the running fleet's: default to the fleet's schema too.
        try:
            data = run_dir.read()
        except FleetNotRunning:
            data = {}
        if data.get("store_url") == url:
            schema = data.get("schema")
    store = Store(StoreConfig(url, schema=schema or "fleetsim", application_name="fleetsim-cli"))
    store.ping()
    return store


def timing_options(f: F) -> F:
    """Options for the fleet's clocks."""
    for decl, name, default, text in reversed([
        ("--heartbeat", "heartbeat", DEFAULTS.heartbeat_s, "Pod heartbeat period."),
        ("--lease", "lease", DEFAULTS.lease_s, "Leader lease length."),
        ("--renew", "renew", DEFAULTS.renew_s, "Leader renew period."),
        ("--dead-after", "dead_after", DEFAULTS.dead_after_s,
         "Heartbeat age after which a pod is declared dead."),
        ("--recovery", "recovery", DEFAULTS.recovery_s, "Leader recovery period."),
        ("--grace", "grace", DEFAULTS.grace_s,
         "How long a stopping pod lets in-flight steps finish."),
    ]):
        f = option(decl, name, type=DURATION, default=default, help=text)(f)
    return f


def timings_from(params: dict[str, Any]) -> FleetTimings:
    """FleetTimings from the timing options."""
    return FleetTimings(
        heartbeat_s=params["heartbeat"], lease_s=params["lease"], renew_s=params["renew"],
        dead_after_s=params["dead_after"], recovery_s=params["recovery"],
        grace_s=params["grace"],
    )


def check_workload(spec: str, handlers: tuple[str, ...] = ()) -> None:
    """Validate a workload spec and handlers (importing them) before anything starts."""
    from pods.workloads import WorkloadCache, parse_workload  # the CLI is the glue

    WorkloadCache(parse_workload(spec), handlers)


handler_option = option(
    "--handler", "handlers", multiple=True, metavar="MODULE:FUNCTION",
    help="Another handler a step may name in its payload's `workload` (repeatable). Pods run "
    "only the built-ins, --workload and these; a step naming anything else fails.",
)


# -- init -------------------------------------------------------------------


@cli.command()
@store_option
@schema_option
@json_option
@click.pass_context
def init(ctx: click.Context, store: str | None, schema: str | None, as_json: bool) -> None:
    """Create the store's tables (idempotent)."""
    embedded = None
    if not store:
        try:
            data = ctx.obj["run_dir"].read()
            store = data.get("store_url")
            schema = schema or data.get("schema")
            if not store:
                raise FleetNotRunning(f"{ctx.obj['run_dir'].run_file} names no store_url")
        except FleetNotRunning:
            from fleetsim.store.embedded import EmbeddedPostgres

            embedded = EmbeddedPostgres(ctx.obj["run_dir"].ensure().pgdata)
            store = embedded.start()
    try:
        with Store(StoreConfig(store, schema=schema or "fleetsim")) as s:
            s.init_schema()
            version = s.check_schema()
            shown = s.url_for_display
    finally:
        if embedded is not None:
            embedded.stop()
    emit({"store": shown, "schema": schema or "fleetsim", "version": version}, as_json,
         lambda: click.echo(f"store ready: {shown} (schema {schema or 'fleetsim'}, "
                            f"version {version})"))


# -- up / down ----------------------------------------------------------------


def fleet_options(f: F) -> F:
    """Options shared by `up` and `run`."""
    decorators = [
        option("--pods", type=int, default=5, help="Number of pods."),
        option("--concurrency", type=int, default=1, help="Steps a pod runs at once."),
        option("--batch", type=int, default=50, help="Steps a pod claims per round trip."),
        option("--workload", default="noop",
               help="noop, sleep:<ms>, cpu:<ms>, fail:<probability> or module:function."),
        handler_option,
        option("--queue", "queues", multiple=True, default=("*",),
               help="Queue(s) the pods claim from (repeatable); '*': every queue in the "
               "store, including queues made later."),
        store_option,
        option("--seed", type=int, default=0, help="Seed for seeded workloads and chaos."),
        timing_options,
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


@cli.command()
@fleet_options
@option("--schema", default="fleetsim", help="PostgreSQL schema for the fleet's tables.")
@option("--steps", type=int, default=0, help="Steps to submit once the fleet is ready.")
@option("--rate", type=float, default=0.0, help="Submit --steps at this many per second "
        "(0: all at once).")
@option("--restart/--no-restart", default=False, help="Respawn pods that die (new incarnation).")
@option("--detach", is_flag=True, help="Return once the fleet is ready; leave it running.")
@option("--fault-proxy/--no-fault-proxy", default=True,
        help="Route each pod's store traffic through its own fault proxy (needed for "
        "`chaos partition --from store`).")
@option("--bus-host", default="127.0.0.1",
        help="Address the control bus binds to; anything but loopback needs --bus-keys.")
@option("--bus-keys", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="CURVE key directory from `fleetsim keys generate`.")
@option("--status-line/--no-status-line", default=True, help="Live status line in the "
        "foreground.")
@click.pass_context
def up(ctx: click.Context, /, **params: Any) -> None:
    """Start a fleet: the store (embedded by default), the schema and the pods.

    In the foreground a status line shows steps/s, queue depth, the leader and
    live pods; Ctrl-C stops everything gracefully. With --detach the command
    returns once the fleet is ready; stop it with `fleetsim down`.
    """
    from fleetsim.coordinator import Coordinator, FleetSpec

    check_workload(params["workload"], tuple(params["handlers"]))
    spec = FleetSpec(
        run_dir=ctx.obj["run_dir"].path, pods=params["pods"],
        concurrency=params["concurrency"], batch=params["batch"],
        workload=params["workload"], queues=tuple(params["queues"]),
        store_url=params["store"], schema=params["schema"], seed=params["seed"],
        restart=params["restart"], timings=timings_from(params), steps=params["steps"],
        rate=params["rate"], fault_proxy=params["fault_proxy"],
        bus_host=params["bus_host"], bus_keys=params["bus_keys"],
        handlers=tuple(params["handlers"]),
    )
    if params["detach"]:
        _up_detached(ctx, params)
        return
    # Events (pod exits, leader changes, recoveries) go through the ticker:
    # in a terminal they are printed above the status line, which is redrawn.
    ticker = StatusTicker(None, enabled=params["status_line"])
    coordinator = Coordinator(spec, echo=ticker.event)
    coordinator.install_signal_handlers()
    coordinator.start()
    leader = _wait_for_leader(coordinator.store)
    click.echo(
        f"fleet ready: {spec.pods} pods, leader {leader}, run dir {spec.run_dir}"
        " (Ctrl-C to stop)"
    )
    if sys.stdout.isatty():
        _print_next_steps(ctx.obj["run_dir"].path)
    ticker.store = coordinator.store
    try:
        coordinator.run_forever(on_tick=ticker.tick)
    finally:
        ticker.close()
        click.echo("stopping: pods finish in-flight steps (up to the grace period)...")
        coordinator.stop()
        click.echo("fleet stopped")


def _print_next_steps(run_dir: Path) -> None:
    """What a newcomer can try next, from another terminal (`up` in a terminal only)."""
    prefix = "fleetsim" if run_dir == Path(".fleetsim") else f"fleetsim --run-dir {run_dir}"
    rows = [
        (f"{prefix} submit --count 1000", "submit steps; watch the status line"),
        (f"{prefix} chaos kill-leader", "kill the leader; a new one takes over"),
        (f"{prefix} check", "verify nothing was lost or run twice"),
    ]
    width = max(len(command) for command, _ in rows)
    click.echo("try, in another terminal:")
    for command, what in rows:
        click.echo(f"  {command:<{width}}  {what}")


def _wait_for_leader(store: Store | None, timeout_s: float = 5.0) -> str:
    deadline = time.monotonic() + timeout_s
    while store is not None and time.monotonic() < deadline:
        lease = store.current_leader()
        if lease is not None:
            return f"{lease.holder} (term {lease.term})"
        time.sleep(0.05)
    return "(electing)"


class StatusTicker:
    """The foreground status line (steps/s, depth, leader, pods alive) and the events above it.

    In a terminal the status line is rewritten in place; an event clears it,
    is printed on its own line, and the status line is redrawn below it.
    Elsewhere (a pipe, a log file) both are plain lines, without terminal
    codes, the status every 10 s.
    """

    def __init__(self, store: Store | None, period_s: float = 1.0, *,
                 enabled: bool = True) -> None:
        self.store = store
        self.enabled = enabled
        self.tty = sys.stdout.isatty()
        self.period_s = period_s if self.tty else 10.0
        self._last: tuple[float, int] | None = None
        self._next = time.monotonic() + self.period_s
        self._shown = ""  # the status line on the screen now (terminal only)
        self._lock = threading.Lock()

    def event(self, line: str) -> None:
        """Print an event on its own line, above the status line."""
        with self._lock:
            if self.tty and self._shown:
                click.echo(f"\r\033[K{line}\n{self._shown}", nl=False)
            else:
                click.echo(line)

    def tick(self) -> None:
        """Print the status line if it is time."""
        now = time.monotonic()
        if not self.enabled or self.store is None or now < self._next:
            return
        self._next = now + self.period_s
        try:
            counts = self.store.status_counts()
            alive, known = self.store.pod_counts()
            lease = self.store.current_leader()
        except FleetsimError as exc:
            line = f"store unavailable: {exc}"
        else:
            done = counts["completed"] + counts["dead"]
            rate = 0.0
            if self._last is not None:
                rate = (done - self._last[1]) / max(1e-6, now - self._last[0])
            self._last = (now, done)
            leader = f"{lease.holder} (term {lease.term})" if lease else "none"
            line = (
                f"{rate:8.0f} steps/s | depth {counts['queued'] + counts['failed']} | "
                f"claimed {counts['claimed']} | done {done} | leader {leader} | "
                f"pods {alive}/{known} alive"
            )
        with self._lock:
            if self.tty:
                # Cut to the terminal's width: a wrapped line could not be
                # rewritten in place.
                import shutil

                line = line[: max(20, shutil.get_terminal_size().columns - 1)]
                click.echo(f"\r\033[K{line}", nl=False)
                self._shown = line
            else:
                click.echo(line)

    def close(self) -> None:
        """End the status line."""
        with self._lock:
            if self.tty and self._shown:
                click.echo()
            self._shown = ""


def _up_detached(ctx: click.Context, params: dict[str, Any]) -> None:
    """Run `up` in a background coordinator process and wait until it is ready."""
    run_dir: RunDir = ctx.obj["run_dir"].ensure()
    argv = [sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir.path)]
    if ctx.obj["verbose"]:
        argv.append("-v")
    argv += ["up", "--no-status-line"]
    for name in ("pods", "concurrency", "batch", "workload", "schema", "seed", "steps",
                 "rate", "heartbeat", "lease", "renew", "dead_after", "recovery", "grace"):
        argv += [f"--{name.replace('_', '-')}", str(params[name])]
    for queue in params["queues"]:
        argv += ["--queue", queue]
    for handler in params["handlers"]:
        argv += ["--handler", handler]
    argv.append("--restart" if params["restart"] else "--no-restart")
    argv.append("--fault-proxy" if params["fault_proxy"] else "--no-fault-proxy")
    argv += ["--bus-host", params["bus_host"]]
    if params["bus_keys"]:
        argv += ["--bus-keys", str(Path(params["bus_keys"]).resolve())]
    env = dict(os.environ)
    if params["store"]:
        env["FLEETSIM_STORE"] = params["store"]  # not on the command line (ps shows it)
    else:
        env.pop("FLEETSIM_STORE", None)
    # Options given as FLEETSIM_* variables are already in argv; drop them so
    # they cannot conflict.
    for key in list(env):
        if key.startswith("FLEETSIM_") and key not in ("FLEETSIM_STORE",):
            env.pop(key)
    log_path = run_dir.logs / "coordinator.log"
    with open(log_path, "ab") as out:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
    from fleetsim.rundir import ProcessRecord

    run_dir.record_child(ProcessRecord.of("coordinator", "coordinator", child.pid, argv))
    deadline = time.monotonic() + 120
    while True:
        code = child.poll()
        if code is not None:
            from fleetsim.coordinator import last_line

            fail(f"the fleet did not start: {last_line(log_path).removeprefix('error: ')}",
                 code if code in (EXIT_USAGE, EXIT_STORE) else EXIT_FAILURE)
        try:
            data = run_dir.read()
        except (FleetNotRunning, ConfigError):
            data = {}  # not written yet (or a stale one the coordinator replaces)
        if data.get("state") == "ready" and data.get("coordinator_pid") == child.pid:
            break
        if time.monotonic() > deadline:
            child.terminate()
            fail(f"the fleet was not ready within 120 s; see {log_path}")
        time.sleep(0.1)
    for pod in data["pods"]:
        click.echo(f"{pod['id']}: pid {pod['pid']}, incarnation {pod['incarnation']}")
    click.echo(
        f"fleet ready: {len(data['pods'])} pods, coordinator pid {child.pid}, "
        f"run dir {run_dir.path} (stop with `fleetsim down`)"
    )


@cli.command()
@json_option
@option("--timeout", type=DURATION, default=60.0, env="FLEETSIM_DOWN_TIMEOUT",
        help="How long to wait for a clean stop.")
@click.pass_context
def down(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """Stop the fleet that `up` started, embedded store included.

    Also stops what a coordinator that died left behind (pods, the fault
    proxy, the embedded server), found in the run directory's record of
    every process the fleet spawned. Signals only processes whose pid,
    create time and command line still match that record.
    """
    from fleetsim.coordinator import stop_detached_fleet

    result = stop_detached_fleet(ctx.obj["run_dir"], timeout_s=timeout)
    emit({"stopped": True, **result}, as_json, lambda: click.echo(describe_down(result)))


def describe_down(result: dict[str, Any]) -> str:
    """The one-line summary of `down`."""
    leftovers = []
    if result["killed"]:
        leftovers.append(f"leftover pods: {', '.join(result['killed'])}")
    if result["proxy_stopped"]:
        leftovers.append("leftover fault proxy")
    if result["store_stopped"] and result["coordinator"] not in ("stopped", "killed"):
        leftovers.append("leftover embedded PostgreSQL")
    if result["coordinator"] in ("stopped", "killed") or leftovers:
        line = "fleet stopped" + (f" (stopped {'; '.join(leftovers)})" if leftovers else "")
    else:
        line = "no fleet process was running; forgot the run file"
    if result["stale_run_file"]:
        line = f"{result['stale_run_file']}\n{line}"
    return line


# -- status / submit ------------------------------------------------------------


@cli.command()
@store_option
@schema_option
@json_option
@click.pass_context
def status(ctx: click.Context, store: str | None, schema: str | None, as_json: bool) -> None:
    """Show the leader, the pods and the steps."""
    with open_store(ctx, store, schema) as s:
        fleet = _fleet_using(ctx, s)
        data = status_data(s, fleet)

    def text() -> None:
        leader = data["leader"]
        click.echo("leader: " + (f"{leader['pod']} (term {leader['term']}, pid {leader['pid']})"
                                 if leader else "none"))
        # The pod column fits the longest id (joined pods: pod-<hostname>-<pid>).
        w = max([10, *(len(p["id"]) for p in data["pods"])])
        click.echo(f"{'pod':<{w}} {'pid':>7} {'inc':>4} {'state':<8} {'heartbeat':>10} "
                   f"{'claimed':>8} {'completed':>10}")
        for p in data["pods"]:
            # A pod whose process is gone but not yet declared dead: "exited".
            state = "exited" if p["state"] == "alive" and not p["live"] else p["state"]
            click.echo(f"{p['id']:<{w}} {p['pid'] or '-':>7} {p['incarnation']:>4} "
                       f"{state:<8} {p['heartbeat_age_s']:>9.1f}s {p['claimed']:>8} "
                       f"{p['completed']:>10}")
        click.echo("steps: " + ", ".join(f"{k} {v}" for k, v in data["steps"].items()))
        for name, waiting in data["unserved_queues"].items():
            click.echo("warning: " + unserved_warning(name, waiting, fleet))

    emit(data, as_json, text)


def _fleet_using(ctx: click.Context, store: Store) -> dict[str, Any] | None:
    """The running fleet's run.json, if that fleet uses ``store`` (URL and schema)."""
    try:
        data = ctx.obj["run_dir"].read()
    except FleetsimError:
        return None
    if (isinstance(data, dict) and data.get("store_url") == store.config.url
            and (data.get("schema") or "fleetsim") == (store.config.schema or "fleetsim")):
        return data
    return None


def _warn_unserved(ctx: click.Context, store: Store, only: str | None = None) -> None:
    """Print a warning (stderr) for each queue with waiting steps that no live pod serves."""
    from fleetsim.status import unserved_queues

    fleet = _fleet_using(ctx, store)
    try:
        unserved = unserved_queues(store, fleet)
    except FleetsimError:
        return  # a warning is not worth an error
    for name, waiting in unserved.items():
        if only is None or name == only:
            click.secho("warning: " + unserved_warning(name, waiting, fleet), fg="yellow",
                        err=True)


@cli.command()
@option("--count", type=click.IntRange(1, 10_000_000), default=1, help="How many steps.")
@option("--queue", default="default", help="Queue to submit to.")
@option("--workload", default=None, help="Workload for these steps (default: the pods'); "
        "sets the `workload` key of every payload.")
@option("--payload", default=None, metavar="JSON",
        help="The payload of every step: a JSON object, e.g. '{\"order\": 17}'.")
@option("--payload-file", default=None, metavar="FILE",
        help="JSON lines, one payload (a JSON object) per line and one step each, read and "
        "submitted in chunks of 10,000 ('-': standard input); blank lines are skipped. "
        "Not with --count or --payload.")
@option("--priority", type=int, default=0, help="Lower runs first.")
@option("--max-attempts", type=click.IntRange(1, 1000), default=3,
        help="Attempts before a step goes to the DLQ.")
@option("--key", default=None, help="Idempotency key (with --count N or --payload-file: "
        "KEY-0 ... KEY-N-1).")
@option("--timeout", type=DURATION, default=None,
        help="Execution timeout of each step (e.g. 2s, 5m): an attempt running longer "
        "fails (retried, or dead at max attempts). Default: the queue's (`queue set "
        "--timeout`), else none.")
@store_option
@schema_option
@json_option
@click.pass_context
def submit(ctx: click.Context, count: int, queue: str, workload: str | None,
           payload: str | None, payload_file: str | None, priority: int,
           max_attempts: int, key: str | None, timeout: float | None, store: str | None,
           schema: str | None, as_json: bool) -> None:
    """Submit steps to the fleet's store.

    \b
    fleetsim submit --count 100 --workload sleep:20
    fleetsim submit --payload '{"order": 17}' --key order-17
    fleetsim submit --payload-file orders.jsonl --queue orders
    """
    from click.core import ParameterSource

    if queue == "*":
        fail("'*' is not a queue name: it means every queue for pods (`--queue '*'`)",
             EXIT_USAGE)
    if payload is not None and payload_file is not None:
        fail("give --payload or --payload-file, not both", EXIT_USAGE)
    if timeout is not None:
        from fleetsim.store.store import MAX_TIMEOUT_S

        if not 0 < timeout <= MAX_TIMEOUT_S:
            fail(f"--timeout must be more than 0 and at most {MAX_TIMEOUT_S:g}s (a week)",
                 EXIT_USAGE)
    if payload_file is not None and ctx.get_parameter_source("count") not in (
            ParameterSource.DEFAULT, None):
        fail("--count and --payload-file exclude each other: the file has one step a line",
             EXIT_USAGE)
    if workload:
        _check_fleet_allows(ctx, workload, store)  # before importing anything it names
        check_workload(workload)
    base: dict[str, Any] = {}
    if payload is not None:
        base = _parse_payload(payload, "--payload")
    named: set[str] = set()

    def step_payload(value: dict[str, Any], where: str) -> dict[str, Any]:
        if workload:
            return {**value, "workload": workload}
        own = value.get("workload")
        if isinstance(own, str) and own not in named:
            # A step naming a handler: refused here as with --workload.
            try:
                _check_fleet_allows(ctx, own, store)
                check_workload(own)
            except FleetsimError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            named.add(own)
        return value

    def specs() -> Iterator[StepSpec]:
        if payload_file is None:
            value = step_payload(base, "--payload")
            for i in range(count):
                yield StepSpec(queue, value, priority, max_attempts,
                               (key if count == 1 else f"{key}-{i}") if key else None,
                               timeout)
            return
        for i, (where, value) in enumerate(_payload_lines(payload_file)):
            yield StepSpec(queue, step_payload(value, where), priority, max_attempts,
                           f"{key}-{i}" if key else None, timeout)

    head: list[int] = []  # the first 1001 ids: all of them, if that many or fewer
    last_id = 0
    submitted = 0
    chunks = _chunks(specs(), 10_000)
    try:
        first = next(chunks)  # a bad first chunk fails before the store is opened
    except StopIteration:
        fail(f"no steps: {_file_name(payload_file)} has no payload lines", EXIT_USAGE)
    with open_store(ctx, store, schema) as s:
        recorder = _submit_history(ctx, s)
        try:
            chunk: list[StepSpec] | None = first
            while chunk:
                done = s.submit_many(chunk)
                recorder.submitted(queue, done)
                submitted += len(done)
                head += done[: 1001 - len(head)]
                last_id = done[-1]
                try:
                    chunk = next(chunks, None)
                except ConfigError as exc:  # a bad line after some chunks went in
                    raise ConfigError(f"{exc} ({submitted} steps before it were submitted, "
                                      f"ids {head[0]}..{last_id})") from None
        finally:
            recorder.close()
        _warn_unserved(ctx, s, only=queue)
    first_id = head[0]
    data = {"queue": queue, "count": submitted, "first_id": first_id, "last_id": last_id,
            "ids": head if submitted <= 1000 else None}
    emit(data, as_json, lambda: click.echo(
        f"submitted {submitted} step{'s' if submitted != 1 else ''} to queue {queue!r} "
        f"(ids {first_id}..{last_id})" if submitted > 1 else
        f"submitted step {first_id} to queue {queue!r}"))


def _parse_payload(text: str, where: str) -> dict[str, Any]:
    """A payload from JSON text: a JSON object jsonb can hold, else ConfigError naming ``where``."""
    from fleetsim.store import check_storable

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except ValueError as exc:  # json.JSONDecodeError too
        raise ConfigError(f"{where}: invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number",
                 float: "a number", type(None): "null"}
        raise ConfigError(f"{where}: a payload must be a JSON object, got "
                          f"{kinds.get(type(value), type(value).__name__)}")
    try:
        check_storable(value, "the payload")
    except FleetsimError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return value


def _file_name(path: str | None) -> str:
    return "standard input" if path == "-" else str(path)


def _payload_lines(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, payload) for each non-blank line of a JSON-lines file, read as it goes."""
    name = _file_name(path)
    try:
        handle = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"cannot read --payload-file {path}: {exc.strerror}") from None
    try:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                where = f"{name} line {number}"
                yield where, _parse_payload(line, where)
    except UnicodeDecodeError:
        raise ConfigError(f"{name} is not UTF-8 text") from None
    finally:
        if handle is not sys.stdin:
            handle.close()


def _chunks(items: Iterator[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), read as needed."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _submit_history(ctx: click.Context, store: Store) -> Any:
    """The client history of this submit: in the run directory while a fleet runs there."""
    from fleetsim.client_history import ClientHistory, NullHistory, history_dir

    run_dir = ctx.obj["run_dir"]
    if not run_dir.run_file.exists():
        return NullHistory()
    try:
        return ClientHistory.for_submitter(
            history_dir(run_dir.path, store.config.schema or "fleetsim"))
    except ConfigError:
        return NullHistory()


def _check_fleet_allows(ctx: click.Context, workload: str, store: str | None) -> None:
    """Refuse a handler the running fleet's pods were not started with (when we can tell)."""
    from pods.workloads import WorkloadNotAllowed, is_handler, not_allowed_message

    if not is_handler(workload):
        return  # built-ins run everywhere
    try:
        data = ctx.obj["run_dir"].read()
    except FleetNotRunning:
        data = {}
    handlers = data.get("handlers") if isinstance(data, dict) else None
    fleet_store = data.get("store_url") if isinstance(data, dict) else None
    if isinstance(handlers, list) and (not store or store == fleet_store):
        allowed = frozenset([str(data.get("workload")), *map(str, handlers)])
        if workload.strip() not in allowed:
            raise WorkloadNotAllowed(not_allowed_message(workload.strip(), allowed)
                                     .replace("this pod", "this fleet's pods")
                                     + "; restart the fleet with --handler " + workload.strip())
        return
    click.echo(f"warning: pods run {workload} only if they were started with "
               f"--workload/--handler {workload}; elsewhere its steps fail", err=True)


# -- pod ----------------------------------------------------------------------


@cli.command()
@option("--id", "pod_id", default=None, help="Pod id (default: pod-<hostname>-<pid>).")
@option("--incarnation", type=int, default=0, help="Incarnation number (restarts count up).")
@option("--join", metavar="ENDPOINT", default=None,
        help="The coordinator's control endpoint (tcp://host:port, `bus.control` in "
        "run.json), to take chaos commands.")
@option("--metrics-endpoint", metavar="ENDPOINT", default=None,
        help="The coordinator's metrics endpoint (`bus.metrics` in run.json).")
@option("--bus-keys", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="CURVE key directory, when the coordinator's bus requires keys.")
@option("--bus-secret-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
        help="The fleet's bus secret (`bus.secret` in its run directory, mode 0600); needed "
        "with --join (default: the run directory's).")
@store_option
@option("--schema", default="fleetsim", help="PostgreSQL schema of the fleet's tables.")
@option("--workload", default="noop",
        help="noop, sleep:<ms>, cpu:<ms>, fail:<probability> or module:function.")
@handler_option
@option("--concurrency", type=int, default=1, help="Steps this pod runs at once.")
@option("--batch", type=int, default=50, help="Steps claimed per round trip.")
@option("--queue", "queues", multiple=True, default=("*",),
        help="Queue(s) to claim (repeatable); '*': every queue in the store, re-read every "
        "second.")
@option("--seed", type=int, default=0, help="Seed for seeded workloads.")
@option("--client-history", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Folder for this pod's client history (what it invoked and was told; "
             "`fleetsim check` cross-examines it with the store's).")
@timing_options
@click.pass_context
def pod(ctx: click.Context, /, **params: Any) -> None:
    """Run one pod in the foreground (how pods on other hosts join a fleet)."""
    from pods.config import PodConfig
    from pods.exitcodes import PodExit
    from pods.identity import default_pod_id
    from pods.pod import Pod

    url = params["store"]
    if not url:
        try:
            url = ctx.obj["run_dir"].read().get("store_url")
        except FleetNotRunning:
            url = None
        if not url:
            fail("no store: give --store URL (or FLEETSIM_STORE)", EXIT_USAGE)
    # Unique across containers too (every container's pod is pid 1).
    pod_id = params["pod_id"] or default_pod_id(socket.gethostname(), os.getpid())
    logging.getLogger().handlers.clear()
    logging.basicConfig(
        level=logging.DEBUG if ctx.obj["verbose"] else logging.INFO,
        format=f"%(asctime)s {pod_id} %(levelname)s %(message)s", force=True,
    )
    try:
        config = PodConfig(
            pod_id=pod_id,
            store=StoreConfig(url, schema=params["schema"], application_name=pod_id,
                              pool_size=params["concurrency"] + 3),
            incarnation=params["incarnation"], queues=tuple(params["queues"]),
            workload=params["workload"], handlers=tuple(params["handlers"]),
            concurrency=params["concurrency"],
            batch=params["batch"], seed=params["seed"], timings=timings_from(params),
            join=params["join"],
        )
        check_workload(config.workload, config.handlers)
    except ConfigError as exc:
        fail(str(exc), PodExit.BAD_CONFIG)
    from chaos.storage_faults import StorageFaultInjector

    store = Store(config.store)
    worker = Pod(config, store)
    if params["client_history"] is not None:
        from fleetsim.client_history import ClientHistory

        try:
            worker.history = ClientHistory.for_pod(params["client_history"], pod_id,
                                                   config.incarnation)
        except ConfigError as exc:
            fail(str(exc), PodExit.BAD_CONFIG)
    # Storage faults plug in as statement hooks: idle until the coordinator asks.
    worker.storage_faults = StorageFaultInjector(seed=config.seed)
    store.add_statement_hook(worker.storage_faults)
    store.add_reply_hook(worker.storage_faults.after_statement)
    if config.join:
        from fleetsim.bus import BusEndpoints, PodBusClient

        metrics = params["metrics_endpoint"] or config.join
        endpoints = BusEndpoints(control=config.join, cli=config.join, metrics=metrics,
                                 events=config.join)
        client_keys = None
        if params["bus_keys"]:
            from fleetsim.bus.security import load_client_keys

            client_keys = load_client_keys(params["bus_keys"])
        secret = _pod_bus_secret(ctx, params["bus_secret_file"])
        worker.metrics_enabled = bool(params["metrics_endpoint"])
        worker.bus = PodBusClient(endpoints, pod_id, config.incarnation,
                                  handler=worker.handle_command, keys=client_keys,
                                  secret=secret,
                                  heartbeat_interval_s=config.timings.heartbeat_s * 2)
    worker.install_signal_handlers()
    code = worker.run()
    store.close()
    if code == PodExit.STORE_UNREACHABLE:
        fail(f"cannot reach the store at {redact(url)}", code)
    if code == PodExit.ID_IN_USE:
        fail(worker.id_in_use or f"pod id {pod_id!r} is in use", code)
    if worker.hung_runners:
        # A runner thread left behind on a step past its timeout may run for
        # hours, and the interpreter joins every pool thread at exit: leave now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))
    sys.exit(int(code))


def _pod_bus_secret(ctx: click.Context, path: Path | None) -> bytes:
    """The bus secret a joining pod signs with: --bus-secret-file, else the run directory's."""
    from fleetsim.bus.security import BUS_SECRET_FILE, load_secret

    if path is None:
        path = ctx.obj["run_dir"].path / BUS_SECRET_FILE
        if not path.exists():
            fail("--join needs the fleet's bus secret: give --bus-secret-file (the fleet's "
                 f"{BUS_SECRET_FILE}, or FLEETSIM_BUS_SECRET_FILE)", EXIT_USAGE)
    return load_secret(path)


def fleet_bus_secret(run_dir: RunDir, data: dict[str, Any]) -> bytes:
    """The running fleet's bus secret (ConfigError if this user cannot read it)."""
    from fleetsim.bus.security import BUS_SECRET_FILE, load_secret

    path = data.get("bus_secret_file")
    return load_secret(path if isinstance(path, str) else run_dir.path / BUS_SECRET_FILE)


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


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fleetsim")


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
    with _scratch_store(store) as url:
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


# -- check / history ---------------------------------------------------------------


@cli.command()
@store_option
@schema_option
@option("--final", is_flag=True,
        help="The run is over: steps not finished count as lost (not unknown).")
@option("--client-history", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Folder of client histories to cross-examine the store with (default: the "
             "run directory's history/<schema>, if there is one).")
@json_option
@click.pass_context
def check(ctx: click.Context, store: str | None, schema: str | None, final: bool,
          client_history: Path | None, as_json: bool) -> None:
    """Prove or refute the fleet's invariants from the recorded history.

    Exit 0 valid, 1 invalid, 2 unknown (steps still in flight, or not a
    fleetsim store).
    """
    from fleetsim.checker import EXIT_UNKNOWN
    from fleetsim.checker import check as check_history
    from fleetsim.client_history import history_dir

    if client_history is not None and not client_history.is_dir():
        fail(f"no client history folder {client_history}", EXIT_USAGE)
    try:
        with open_store(ctx, store, schema) as s:
            folder = client_history or history_dir(ctx.obj["run_dir"].path,
                                                    s.config.schema or "fleetsim")
            report = check_history(s, final=final, client_histories=folder)
            _warn_unserved(ctx, s)  # e.g. why steps are still in flight
    except SchemaMismatch as exc:
        fail(str(exc), EXIT_UNKNOWN)
    emit(report.as_dict(), as_json, lambda: click.echo(report.summary()))
    sys.exit(report.exit_code)


@cli.command()
@option("--mutants", default="all", metavar="all|NAME,...",
        help="Which store mutants to run (`fleetsim selftest --list` names them).")
@option("--controls/--no-controls", default=True,
        help="Also run each mutant's trial on the real store: it must come out valid "
             "(else a kill may be a false verdict of the checker).")
@option("--list", "list_only", is_flag=True, help="List the mutants and their trials.")
@option("--fuzz", "fuzz_runs", type=click.IntRange(1, 1000), default=None, metavar="RUNS",
        help="Instead of each mutant's own trial, run RUNS generated chaos cases on it "
             "(`chaos fuzz`, shrinking the first failure); it must fail.")
@store_option
@option("--seed", type=int, default=0, help="Seed for the trials' random targets.")
@json_option
@click.pass_context
def selftest(ctx: click.Context, mutants: str, controls: bool, list_only: bool,
             fuzz_runs: int | None, store: str | None, seed: int, as_json: bool) -> None:
    """Prove the checker: run broken stores (mutants) under chaos; each must be caught.

    Each mutant is one hot statement with one guard removed. Its trial is a
    real fleet whose pods run the broken statement, under the load and
    faults that should expose it, judged by `fleetsim check --final` with
    the pods' client histories. Exit 0 iff every mutant is killed (or
    documented as equivalent) and every control is valid. Without --store,
    an embedded PostgreSQL runs in a temporary folder.
    """
    from fleetsim.selftest.mutants import MUTANTS, parse_mutants
    from fleetsim.selftest.runner import TRIALS, run_selftest

    try:
        chosen = parse_mutants(mutants)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    if list_only:
        listing = [{"mutant": m.name, "statement": m.statement, "breaks": m.description,
                    "trial": TRIALS[m.name].description, "equivalent": m.equivalent}
                   for m in MUTANTS.values()]
        def lines() -> None:
            for m in listing:
                click.echo(f"{m['mutant']:<24} {m['statement']:<12} {m['breaks']}")

        emit(listing, as_json, lines)
        return
    say: Callable[[str], None] = (
        (lambda _: None) if as_json else (lambda line: click.echo(line, err=True)))
    if fuzz_runs is not None:
        _selftest_fuzz(ctx, store, chosen, fuzz_runs, seed, as_json, say)
        return
    with _scratch_store(store) as url:
        results = run_selftest(url, chosen, controls=controls, seed=seed, say=say)
    bad = [r for r in results if (r.killed is False and not r.note)
           or (r.killed is None and r.verdict != "valid")]
    data = {"results": [r.as_dict() for r in results], "passed": not bad}

    def table() -> None:
        click.echo(f"{'mutant':<24} {'verdict':<8} {'result':<10} {'secs':>5}  caught by")
        for r in results:
            outcome = ("control" if r.killed is None else "killed" if r.killed
                       else "equivalent" if r.note else "SURVIVED")
            caught = ", ".join(f"{k} {v}" for k, v in r.violations.items()) or r.note[:60]
            click.echo(f"{r.name:<24} {r.verdict:<8} {outcome:<10} {r.seconds:>5g}  {caught}")
        killed = sum(1 for r in results if r.killed)
        mutated = sum(1 for r in results if r.killed is not None)
        click.echo(f"{killed}/{mutated} mutants killed" + ("" if not bad else
                   f"; {len(bad)} row(s) failed the self-test"))

    emit(data, as_json, table)
    sys.exit(EXIT_FAILURE if bad else EXIT_OK)


def _selftest_fuzz(ctx: click.Context, store: str | None, chosen: list[Any], runs: int,
                   seed: int, as_json: bool, say: Callable[[str], None]) -> None:
    """Fuzz each mutant until a case fails; every mutant must be caught."""
    from chaos.fuzz import fuzz
    from fleetsim.selftest.runner import mutant_factory

    rows = []
    with _scratch_store(store) as url:
        for mutant in chosen:
            say(f"fuzzing mutant {mutant.name}: {mutant.description}")
            report = fuzz(url, seed=seed, runs=runs, duration_s=8.0, stop_at_failure=True,
                          out_dir=ctx.obj["run_dir"].path / "fuzz" / mutant.name,
                          store_restart=False, factory=mutant_factory(mutant.name), say=say)
            # Caught only by an invalid verdict: an error is not the checker's catch.
            caught = any(r.verdict == "invalid" for r in report.runs)
            rows.append({"mutant": mutant.name, "caught": caught,
                         "cases": len(report.runs), "failed": report.failed})
    missed = [r["mutant"] for r in rows if not r["caught"]]

    def text() -> None:
        for r in rows:
            click.echo(f"{r['mutant']:<24} " + (
                f"caught after {r['cases']} case(s); shrunk: "
                f"{r['failed'][0].get('shrunk', {}).get('trial', '-')}"
                if r["caught"] else f"not caught in {r['cases']} cases"))

    emit({"results": rows, "passed": not missed}, as_json, text)
    sys.exit(EXIT_FAILURE if missed else EXIT_OK)


@contextlib.contextmanager
def _scratch_store(url: str | None) -> Iterator[str]:
    """The given store URL, or an embedded PostgreSQL in a temporary folder."""
    if url:
        yield url
        return
    from fleetsim.store.embedded import temporary_embedded

    with temporary_embedded("fleetsim-scratch-pg-") as embedded_url:
        yield embedded_url


@cli.group()
def history() -> None:
    """The recorded history of a store."""


@history.command("export")
@store_option
@schema_option
@option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl",
              show_default=True, help="Jepsen-style invoke/ok/fail/info records, one a line.")
@option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write here instead of standard output (its folder must exist).")
@click.pass_context
def history_export(ctx: click.Context, store: str | None, schema: str | None, fmt: str,
                   output: Path | None) -> None:
    """Export the history (process = pod incarnation; f = claim/complete/fail/elect/...)."""
    from fleetsim.history import check_output, export_history, open_output

    if output is not None:
        check_output(output)  # before the store: a typo in -o fails at once
    with open_store(ctx, store, schema) as s:
        if output is None:
            count = export_history(s, sys.stdout, format=fmt)
        else:
            # Opened (truncated) only once the store answered.
            with open_output(output) as out:
                count = export_history(s, out, format=fmt)
    click.echo(f"{count} records", err=True)


# -- keys -----------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """CURVE keys for a control bus bound beyond loopback."""


@keys.command("generate")
@option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Where to write the keys (default: <run dir>/keys).")
@option("--force", is_flag=True, help="Replace existing keys.")
@json_option
@click.pass_context
def keys_generate(ctx: click.Context, directory: Path | None, force: bool,
                  as_json: bool) -> None:
    """Create the coordinator's and the clients' keypairs (files 0600).

    Then `fleetsim up --bus-host 0.0.0.0 --bus-keys DIR`; pods and CLI commands
    on other hosts need a copy of DIR (the client keys and the server's public key).
    """
    from fleetsim.bus.security import generate_keys, key_files

    target = directory or ctx.obj["run_dir"].ensure().path / "keys"
    if key_files(target).server_secret.exists() and not force:
        # Checked here so the advice names this command's option.
        fail(f"CURVE keys already exist in {target} (use --force to replace them)", EXIT_USAGE)
    files = generate_keys(target, overwrite=force)
    emit({"directory": str(files.directory)}, as_json,
         lambda: click.echo(f"keys written to {files.directory}"))


# -- dlq ------------------------------------------------------------------------


@cli.group()
def dlq() -> None:
    """The dead-letter queue: steps that spent their attempts.

    \b
    fleetsim dlq list                   what died, where, and why
    fleetsim dlq redrive 12 15          back to queued with a fresh attempt budget
    fleetsim dlq redrive --all --queue Q
    fleetsim dlq purge --queue Q --yes  delete them (recorded in dlq_actions)
    """


@dlq.command("list")
@option("--queue", "queue_name", metavar="Q", default=None, env="FLEETSIM_DLQ_QUEUE",
        help="Only this queue's dead steps.")
@option("--limit", type=click.IntRange(1, 1_000_000), default=1000, env="FLEETSIM_DLQ_LIMIT",
        help="Show at most this many (oldest death first).")
@store_option
@schema_option
@json_option
@click.pass_context
def dlq_list(ctx: click.Context, queue_name: str | None, limit: int, store: str | None,
             schema: str | None, as_json: bool) -> None:
    """Dead steps: id, queue, attempts, last error, when it died."""
    from fleetsim.store.dlq import count_dead, dead_steps

    with open_store(ctx, store, schema) as s:
        steps = dead_steps(s, queue_name, limit)
        total = count_dead(s, queue_name) if len(steps) == limit else len(steps)
    data = {"total": total, "steps": [d.to_dict() for d in steps]}

    def text() -> None:
        if not steps:
            click.echo("the dead-letter queue is empty"
                       + (f" for queue {queue_name}" if queue_name else ""))
            return
        for d in steps:
            when = d.died_at.strftime("%Y-%m-%d %H:%M:%S") if d.died_at else "?"
            error = (d.error or "-").splitlines()[0][:120] if d.error else "-"
            click.echo(f"step {d.id}  queue {d.queue}  attempts {d.attempts}/"
                       f"{d.max_attempts}  died {when}  error: {error}")
        if total > len(steps):
            click.echo(f"... and {total - len(steps)} more (--limit)")

    emit(data, as_json, text)


@dlq.command("redrive")
@click.argument("step_ids", nargs=-1, type=click.IntRange(1, 2**63 - 1))
@option("--all", "all_dead", is_flag=True, env="FLEETSIM_DLQ_ALL",
        help="Every dead step (of --queue, if given).")
@option("--queue", "queue_name", metavar="Q", default=None, env="FLEETSIM_DLQ_QUEUE",
        help="Only this queue's dead steps.")
@store_option
@schema_option
@json_option
@click.pass_context
def dlq_redrive(ctx: click.Context, step_ids: tuple[int, ...], all_dead: bool,
                queue_name: str | None, store: str | None, schema: str | None,
                as_json: bool) -> None:
    """Requeue dead steps with a fresh attempt budget (recorded in the history).

    Each redriven step may run as many more attempts as it was first
    submitted with: max_attempts becomes attempts spent + that budget.
    Exit 1 if a named id is not a dead step.
    """
    from fleetsim.store.dlq import redrive

    if bool(step_ids) == all_dead:
        fail("name the STEP_IDS to redrive, or give --all", EXIT_USAGE)
    with open_store(ctx, store, schema) as s:
        outcome = redrive(s, step_ids, all_dead=all_dead, queue=queue_name)
    data = {"redriven": list(outcome.redriven),
            "not_dead": {str(k): v for k, v in outcome.not_dead.items()}}
    emit(data, as_json, lambda: click.echo(
        f"redrove {len(outcome.redriven)} step{'' if len(outcome.redriven) == 1 else 's'}"
        + (f": {', '.join(map(str, outcome.redriven))}"
           if 0 < len(outcome.redriven) <= 20 else "")))
    if outcome.not_dead:
        fail("not in the dead-letter queue: " + ", ".join(
            f"step {k} ({'no such step' if v == 'missing' else v})"
            for k, v in outcome.not_dead.items()))


@dlq.command("purge")
@option("--queue", "queue_name", metavar="Q", default=None, env="FLEETSIM_DLQ_QUEUE",
        help="Only this queue's dead steps.")
@option("--yes", is_flag=True, env="FLEETSIM_YES", help="Do not ask for confirmation.")
@store_option
@schema_option
@json_option
@click.pass_context
def dlq_purge(ctx: click.Context, queue_name: str | None, yes: bool, store: str | None,
              schema: str | None, as_json: bool) -> None:
    """Delete dead steps; their attempts stay in the history, each is recorded in dlq_actions."""
    from fleetsim.store.dlq import count_dead, purge

    with open_store(ctx, store, schema) as s:
        if not yes:
            count = count_dead(s, queue_name)
            where = f" of queue {queue_name}" if queue_name else ""
            if count == 0:
                emit({"purged": []}, as_json,
                     lambda: click.echo(f"no dead steps{where} to purge"))
                return
            if not sys.stdin.isatty():
                fail(f"{count} dead steps{where} would be deleted: give --yes to confirm",
                     EXIT_USAGE)
            click.confirm(f"delete {count} dead steps{where}?", abort=True, err=True)
        purged = purge(s, queue_name)
    emit({"purged": purged}, as_json,
         lambda: click.echo(f"purged {len(purged)} dead step{'' if len(purged) == 1 else 's'}"))


# -- cancel / queues ------------------------------------------------------------


@cli.command()
@click.argument("step_ids", nargs=-1, type=int, required=True)
@store_option
@schema_option
@json_option
@click.pass_context
def cancel(ctx: click.Context, step_ids: tuple[int, ...], store: str | None,
           schema: str | None, as_json: bool) -> None:
    """Cancel steps: at once if waiting, cooperatively if claimed (the pod sees it).

    Every id is processed and reported: cancelled, cancel_requested, unknown,
    or the status of a step that had already ended. Exit 1 if any id is unknown.
    """
    results: dict[int, str] = {}
    error: FleetsimError | None = None
    with open_store(ctx, store, schema) as s:
        for step_id in step_ids:
            try:
                results[step_id] = _cancel_one(s, step_id)
            except FleetsimError as exc:  # e.g. the store went away: say what was done
                error = exc
                break
    for step_id in step_ids:
        results.setdefault(step_id, "not_attempted")
    unknown = [str(step_id) for step_id, outcome in results.items() if outcome == "unknown"]

    def text() -> None:
        for step_id, outcome in results.items():
            shown = {"unknown": "unknown (no such step)", "cancelled": "cancelled",
                     "cancel_requested": "cancel_requested",
                     "not_attempted": "not attempted"}.get(outcome, f"already {outcome}")
            click.echo(f"step {step_id}: {shown}")

    emit({str(k): v for k, v in results.items()}, as_json, text)
    if error is not None:
        fail(str(error), exit_code_for(error))
    if unknown:
        fail(f"no step with id{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")


def _cancel_one(store: Store, step_id: int) -> str:
    """One id's outcome: the store's, or ``unknown`` if no step has that id."""
    from fleetsim.errors import StoreError

    if not 1 <= step_id < 2**63:  # ids are positive bigints
        return "unknown"
    try:
        return store.cancel(step_id)
    except StoreUnavailable:
        raise
    except StoreError:
        if store.get_step(step_id) is None:
            return "unknown"
        raise


@cli.group()
def queue() -> None:
    """Queue settings: concurrency limit, max length, strict FIFO, pause."""


@queue.command("list")
@store_option
@schema_option
@json_option
@click.pass_context
def queue_list(ctx: click.Context, store: str | None, schema: str | None,
               as_json: bool) -> None:
    """Every queue with its settings and counts."""
    from dataclasses import asdict

    with open_store(ctx, store, schema) as s:
        configs = s.queues()
        stats = s.queue_stats()
    data = {name: {**asdict(cfg), **(stats[name].as_dict() if name in stats else {})}
            for name, cfg in configs.items()}

    def text() -> None:
        for name, row in data.items():
            timeout = f"{row['timeout_s']:g}s" if row.get("timeout_s") else "-"
            click.echo(f"{name}: limit {row['concurrency_limit'] or '-'}, max length "
                       f"{row['max_length'] or '-'}, fifo {row['strict_fifo']}, paused "
                       f"{row['paused']}, timeout {timeout}; depth {row.get('depth', 0)}, "
                       f"claimed {row.get('claimed', 0)}")

    emit(data, as_json, text)


@queue.command("set")
@click.argument("name")
@option("--concurrency-limit", type=click.IntRange(0, 2**31 - 1), default=None,
        help="At most this many claimed at once across the fleet (0: no limit).")
@option("--max-length", type=click.IntRange(0, 2**31 - 1), default=None,
        help="Reject submits beyond this many waiting steps (0: no limit).")
@option("--strict-fifo/--no-strict-fifo", default=None, help="Claim in submission order.")
@option("--pause/--resume", "paused", default=None, help="Stop or restart claims.")
@option("--timeout", type=DURATION, default=None,
        help="Execution timeout of the queue's steps that set none (e.g. 30s; 0: none).")
@store_option
@schema_option
@json_option
@click.pass_context
def queue_set(ctx: click.Context, name: str, concurrency_limit: int | None,
              max_length: int | None, strict_fifo: bool | None, paused: bool | None,
              timeout: float | None, store: str | None, schema: str | None,
              as_json: bool) -> None:
    """Create or change a queue's settings (unchanged unless given).

    Only the settings given are written, in one transaction: a concurrent
    `queue set` of other settings is never undone.
    """
    from dataclasses import asdict

    from fleetsim.store.queue_settings import change_queue

    changes: dict[str, Any] = {}
    if concurrency_limit is not None:
        changes["concurrency_limit"] = concurrency_limit or None
    if max_length is not None:
        changes["max_length"] = max_length or None
    if strict_fifo is not None:
        changes["strict_fifo"] = strict_fifo
    if paused is not None:
        changes["paused"] = paused
    with open_store(ctx, store, schema) as s:
        updated = change_queue(s, name, **changes)
        if timeout is not None:
            s.set_queue_timeout(name, timeout or None)
        current = s.queues().get(name)
        queue_timeout = current.timeout_s if current else None
    data = {**asdict(updated), "timeout_s": queue_timeout}
    emit(data, as_json, lambda: click.echo(
        f"queue {name}: limit {updated.concurrency_limit or '-'}, max length "
        f"{updated.max_length or '-'}, strict fifo {updated.strict_fifo}, "
        f"paused {updated.paused}, timeout "
        + (f"{queue_timeout:g}s" if queue_timeout else "-")))


import fleetsim.cli_bench  # noqa: E402,F401  (registers `fleetsim bench`)
