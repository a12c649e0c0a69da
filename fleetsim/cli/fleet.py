"""Fleet commands: init, up, down, status, submit, pod, cancel."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from fleetsim.cli.common import (
    DURATION,
    EXIT_FAILURE,
    EXIT_STORE,
    EXIT_USAGE,
    T,
    check_workload,
    cli,
    emit,
    exit_code_for,
    fail,
    fleet_options,
    fleet_using,
    handler_option,
    json_option,
    metrics_port_option,
    open_store,
    option,
    schema_option,
    store_option,
    timing_options,
    timings_from,
    warn_unserved,
)
from fleetsim.errors import (
    ConfigError,
    FleetNotRunning,
    FleetsimError,
    StoreUnavailable,
)
from fleetsim.pod_spawner import SPAWN_MODES
from fleetsim.rundir import RunDir
from fleetsim.status import status_data, unserved_warning
from fleetsim.store import StepSpec, Store, StoreConfig, pod_application_name, redact

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
@option("--spawn", type=click.Choice(SPAWN_MODES), default="fork", show_default=True,
        help="fork: pods are forked from one process that loaded their code once (fast "
        "starts: 50 pods in seconds); exec: each pod is a fresh `python -m fleetsim pod`.")
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
        metrics=params["metrics"], metrics_port=params["metrics_port"],
        spawn=params["spawn"],
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
                 "rate", "heartbeat", "lease", "renew", "dead_after", "recovery", "grace",
                 "metrics_port"):
        argv += [f"--{name.replace('_', '-')}", str(params[name])]
    for queue in params["queues"]:
        argv += ["--queue", queue]
    for handler in params["handlers"]:
        argv += ["--handler", handler]
    argv.append("--restart" if params["restart"] else "--no-restart")
    argv.append("--fault-proxy" if params["fault_proxy"] else "--no-fault-proxy")
    argv.append("--metrics" if params["metrics"] else "--no-metrics")
    argv += ["--bus-host", params["bus_host"], "--spawn", params["spawn"]]
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
        fleet = fleet_using(ctx, s)
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
        warn_unserved(ctx, s, only=queue)
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
@metrics_port_option
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
            # Names this process's connections: a certain death (the
            # coordinator reaped it) terminates them (Store.record_exit).
            store=StoreConfig(url, schema=params["schema"],
                              application_name=pod_application_name(
                                  pod_id, params["incarnation"], params["schema"]),
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
    if params["metrics_port"]:
        from fleetsim.prometheus import serve
        from pods.metrics import pod_figures

        worker.enable_metrics()
        serve(lambda: pod_figures(worker), params["metrics_port"])
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


# -- cancel ---------------------------------------------------------------------


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
