"""What every ``fleetsim`` command shares: options, output, errors, the store.

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
import importlib
import json
import logging
import sys
import traceback
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
from fleetsim.status import unserved_warning
from fleetsim.store import Store, StoreConfig

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


#: Where each top-level command lives (a module of fleetsim.cli). A command's
#: module is imported when that command runs (or for --help), not at every
#: start: a pod process (`fleetsim pod`, 50 of them at once on 2 cores) or
#: `fleetsim status` should not pay for importing the bench, the report's
#: figures and every other command.
COMMAND_MODULES = {
    "init": "fleet", "up": "fleet", "down": "fleet", "status": "fleet", "submit": "fleet",
    "pod": "fleet", "cancel": "fleet",
    "run": "run", "replay": "run",
    "chaos": "chaos",
    "check": "history", "history": "history", "prune": "history",
    "selftest": "selftest",
    "queue": "queue", "dlq": "queue",
    "keys": "keys",
    "report": "report",
    "metrics": "metrics",
    "bench": "bench",
}


class FleetsimGroup(click.Group):
    """Turns fleetsim errors into one line and a named exit code; loads
    each command's module on first use (:data:`COMMAND_MODULES`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(COMMAND_MODULES))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            # Importing the module registers its commands on this group.
            importlib.import_module(f"fleetsim.cli.{COMMAND_MODULES[cmd_name]}")
        return super().get_command(ctx, cmd_name)

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
metrics_port_option = option(
    "--metrics-port", type=click.IntRange(0, 65535), default=0,
    help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: off).",
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
        option("--metrics/--no-metrics", default=True,
               help="Pods send metrics; the coordinator writes metrics.jsonl in the run "
               "directory (`fleetsim metrics`)."),
        metrics_port_option,
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def fleet_using(ctx: click.Context, store: Store) -> dict[str, Any] | None:
    """The running fleet's run.json, if that fleet uses ``store`` (URL and schema)."""
    try:
        data = ctx.obj["run_dir"].read()
    except FleetsimError:
        return None
    if (isinstance(data, dict) and data.get("store_url") == store.config.url
            and (data.get("schema") or "fleetsim") == (store.config.schema or "fleetsim")):
        return data
    return None


def warn_unserved(ctx: click.Context, store: Store, only: str | None = None) -> None:
    """Print a warning (stderr) for each queue with waiting steps that no live pod serves."""
    from fleetsim.status import unserved_queues

    fleet = fleet_using(ctx, store)
    try:
        unserved = unserved_queues(store, fleet)
    except FleetsimError:
        return  # a warning is not worth an error
    for name, waiting in unserved.items():
        if only is None or name == only:
            click.secho("warning: " + unserved_warning(name, waiting, fleet), fg="yellow",
                        err=True)


def fleet_bus_secret(run_dir: RunDir, data: dict[str, Any]) -> bytes:
    """The running fleet's bus secret (ConfigError if this user cannot read it)."""
    from fleetsim.bus.security import BUS_SECRET_FILE, load_secret

    path = data.get("bus_secret_file")
    return load_secret(path if isinstance(path, str) else run_dir.path / BUS_SECRET_FILE)



@contextlib.contextmanager
def scratch_store(url: str | None) -> Iterator[str]:
    """The given store URL, or an embedded PostgreSQL in a temporary folder."""
    if url:
        yield url
        return
    from fleetsim.store.embedded import temporary_embedded

    with temporary_embedded("fleetsim-scratch-pg-") as embedded_url:
        yield embedded_url


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="fleetsim")
