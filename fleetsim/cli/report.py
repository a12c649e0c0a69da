"""``fleetsim report``: a run's plots and ``index.html``; and the report of ``run --report``.

Registered on the ``fleetsim`` group by importing this module (the last
line of :mod:`fleetsim.cli`).
"""

from __future__ import annotations

from pathlib import Path

import click

from fleetsim.cli.common import cli, emit, fail, json_option, open_store, option, schema_option
from fleetsim.errors import ConfigError, FleetNotRunning, SchemaMismatch
from fleetsim.report import gather, write_report
from fleetsim.rundir import RunDir

REPORTS_FOLDER = "reports"


def default_out(run_dir: Path, schema: str) -> Path:
    """Where a run's report goes by default: ``<run dir>/reports/<schema>/``."""
    return run_dir / REPORTS_FOLDER / schema


def _running(run_dir: RunDir, schema: str) -> bool:
    """Whether the run directory's fleet is up and works on ``schema``."""
    try:
        return bool(run_dir.read_running().get("schema") == schema)
    except (FleetNotRunning, ConfigError):
        return False


@cli.command("report")
@click.argument("run_dir", metavar="[RUN_DIR]", required=False,
                type=click.Path(file_okay=False, path_type=Path))
@option("--store", metavar="URL",
        help="PostgreSQL URL of the run's store (default: the run directory's fleet or "
             "embedded store).")
@schema_option
@option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Folder to write index.html and the PNGs to (created; its parent must exist). "
             "Default: RUN_DIR/reports/<schema>/.")
@option("--final/--not-final", default=None,
        help="Judge the run as over: steps not finished count as lost (as `check --final`). "
             "Default: final unless the run directory's fleet is still running this schema.")
@json_option
@click.pass_context
def report(ctx: click.Context, run_dir: Path | None, store: str | None, schema: str | None,
           out: Path | None, final: bool | None, as_json: bool) -> None:
    """Write a run's report: five plots and one index.html that opens from disk.

    \b
    RUN_DIR (default: --run-dir, i.e. .fleetsim) holds the run's faults.jsonl
    and metrics.jsonl; the history comes from the store (--store/--schema,
    default: the run directory's fleet, else its embedded store and the
    schema 'fleetsim'; `fleetsim run` prints its run_... schema).

    \b
    Plots (PNG, fault windows shaded): throughput.png, latency.png,
    timeline.png (a swimlane per pod, leader terms), queues.png,
    resources.png (RSS and CPU, from metrics.jsonl). index.html inlines
    them, then the checker's verdict and witnesses, the run's figures and
    the fault schedule.
    """
    from fleetsim.checker import check as check_history
    from fleetsim.client_history import history_dir

    if run_dir is not None:
        if not run_dir.is_dir():
            fail(f"no run directory {run_dir}", 2)
        ctx.obj["run_dir"] = RunDir(run_dir)
    folder: Path = ctx.obj["run_dir"].path
    if out is not None and not out.parent.is_dir():
        fail(f"cannot write the report to {out}: folder {out.parent} does not exist", 2)
    try:
        with open_store(ctx, store, schema) as s:
            name = s.config.schema or "fleetsim"
            if final is None:
                final = not _running(ctx.obj["run_dir"], name)
            verdict = check_history(s, final=final,
                                    client_histories=history_dir(folder, name))
            data = gather(s, folder, name, verdict.figures)
    except SchemaMismatch as exc:
        fail(str(exc), 2)
    except FleetNotRunning:
        fail(f"no store to report on: {folder} has no fleet and no embedded store; "
             "pass --store URL --schema NAME", 4)
    target = out if out is not None else default_out(folder, name)
    try:
        written = write_report(data, target, verdict.as_dict())
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {target}: {exc.strerror or exc}") from None
    result = {**written, "schema": name, "verdict": verdict.verdict, "figures": data.figures}

    def text() -> None:
        click.echo(f"report of {name} ({verdict.verdict}): {written['index']}")
        for plot in written["plots"]:
            click.echo(f"  {plot}")

    emit(result, as_json, text)
