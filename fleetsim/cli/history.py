"""`fleetsim check`, `fleetsim history ...` and `fleetsim prune`: the recorded history."""

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


# -- prune -------------------------------------------------------------------------


@cli.command()
@option("--older-than", "older_than", metavar="DURATION", default=None,
        help="Prune terminal steps (completed, dead, cancelled) that finished more than "
             "this long ago in database time, e.g. 24h, 30m (required).")
# Its own env var: FLEETSIM_BATCH is the pods' claim batch (up, run, pod).
@option("--batch", "batch", metavar="N", default="5000", show_default=True,
        env="FLEETSIM_PRUNE_BATCH",
        help="Steps deleted per transaction (a short lock each; a live fleet runs on).")
@option("--dry-run", is_flag=True, help="Count what would be pruned; delete nothing.")
@store_option
@schema_option
@json_option
@click.pass_context
def prune(ctx: click.Context, older_than: str | None, batch: str, dry_run: bool,
          store: str | None, schema: str | None, as_json: bool) -> None:
    """Delete old finished steps and their history; `fleetsim check` stays consistent.

    Each batch is recorded in step_prunes (step ids and counts), so the
    checker adds the pruned steps to its totals instead of calling them lost.
    Steps not finished, or whose history is still being written, are kept.
    """
    from fleetsim.durations import format_duration, parse_duration
    from fleetsim.store.prune import PruneResult
    from fleetsim.store.prune import prune as prune_store

    if older_than is None:
        fail("give --older-than DURATION (e.g. 24h): how long ago a step must have"
             " finished to be pruned", EXIT_USAGE)
    seconds = parse_duration(older_than)  # ConfigError: one line, exit 2
    if not batch.strip().isdigit() or int(batch) < 1:
        fail(f"invalid --batch {batch!r}: a whole number of steps, at least 1", EXIT_USAGE)
    live = sys.stderr.isatty() and not as_json

    def progress(so_far: PruneResult) -> None:
        if live:
            click.echo(f"\rpruned {so_far.steps} steps in {so_far.batches} batches",
                       err=True, nl=False)

    with open_store(ctx, store, schema) as s:
        result = prune_store(s, seconds, batch=int(batch), dry_run=dry_run, progress=progress)
    if live and result.batches:
        click.echo("", err=True)

    def text() -> None:
        c = result.counts
        verb = "would prune" if dry_run else "pruned"
        click.echo(
            f"{verb} {result.steps} steps ({c['completed']} completed, {c['dead']} dead,"
            f" {c['cancelled']} cancelled) that finished before {result.watermark.isoformat()}"
            f" ({format_duration(seconds)} ago), with {c['attempts']} attempts,"
            f" {c['rejected_writes']} rejected writes and {c['leader_actions']} leader actions"
        )

    emit(result.to_dict(), as_json, text)
