"""`fleetsim check` and `fleetsim history ...`: the recorded history."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fleetsim.cli.common import (
    EXIT_USAGE,
    cli,
    emit,
    fail,
    json_option,
    open_store,
    option,
    schema_option,
    store_option,
    warn_unserved,
)
from fleetsim.errors import (
    SchemaMismatch,
)

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
    from fleetsim.figures import compute_figures

    if client_history is not None and not client_history.is_dir():
        fail(f"no client history folder {client_history}", EXIT_USAGE)
    try:
        with open_store(ctx, store, schema) as s:
            folder = client_history or history_dir(ctx.obj["run_dir"].path,
                                                    s.config.schema or "fleetsim")
            report = check_history(s, final=final, client_histories=folder)
            figures = {**report.figures, **compute_figures(s, ctx.obj["run_dir"].path)}
            warn_unserved(ctx, s)  # e.g. why steps are still in flight
    except SchemaMismatch as exc:
        fail(str(exc), EXIT_UNKNOWN)
    emit({**report.as_dict(), "figures": figures}, as_json,
         lambda: click.echo(report.summary()))
    sys.exit(report.exit_code)

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
