"""`fleetsim selftest`: prove the checker against store mutants."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from fleetsim.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    cli,
    emit,
    fail,
    json_option,
    option,
    scratch_store,
    store_option,
)
from fleetsim.errors import (
    ConfigError,
)


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
    with scratch_store(store) as url:
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
    with scratch_store(store) as url:
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
