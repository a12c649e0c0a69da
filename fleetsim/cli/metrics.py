"""``fleetsim metrics``: the latest figures per pod and fleet-wide, from ``metrics.jsonl``.

Reads the time series the coordinator writes in the run directory (see
docs/reference/metrics.md), so it works while the fleet runs and after it
stopped. Registered on :data:`fleetsim.cli.cli` by the last line of that
module.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from fleetsim.cli.common import EXIT_FAILURE, cli, emit, fail, json_option, option
from fleetsim.errors import FleetNotRunning
from fleetsim.metrics import Latest, metrics_path, read_samples
from fleetsim.rundir import RunDir

# The columns of --csv, one row per pod and one for the fleet.
CSV_COLUMNS = ("scope", "pod", "incarnation", "t", "rss_bytes", "cpu_percent", "in_flight",
               "completed", "steps_per_s", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s")


@cli.command()
@json_option
@option("--csv", "as_csv", is_flag=True, help="Print CSV (one row per pod, one for the fleet).")
@option("--follow", "-f", is_flag=True,
        help="Keep printing as samples arrive, until the fleet stops (or Ctrl-C).")
@click.pass_context
def metrics(ctx: click.Context, as_json: bool, as_csv: bool, follow: bool) -> None:
    """The latest metrics of the fleet in the run directory, per pod and fleet-wide.

    \b
    Read from the run directory's metrics.jsonl (one sample a second, written
    by the coordinator of `fleetsim up` or `fleetsim run`), so it also works
    after the fleet stopped. Fleet-wide: steps/s, completed, end-to-end
    latency (submission to completion) p50/p95/p99 over the last second; per
    pod: RSS, CPU, steps in flight, completed, its own latency. With --follow,
    --json prints one JSON document per line.
    """
    if as_json and as_csv:
        fail("give --json or --csv, not both", 2)
    run_dir: RunDir = ctx.obj["run_dir"]
    path = metrics_path(run_dir.path)
    if not path.exists():
        raise FleetNotRunning(
            f"no metrics in {run_dir.path}: start a fleet there with `fleetsim up` or "
            "`fleetsim run` (without --no-metrics)")
    samples, offset = read_samples(path)
    latest = Latest().add(samples)
    if not follow:
        if latest.empty:
            fail(f"no metrics yet in {path}: the coordinator writes a sample every second",
                 EXIT_FAILURE)
        _print(latest, as_json, as_csv, header=True, running=_running(run_dir))
        return
    _follow(run_dir, path, latest, offset, as_json, as_csv)


def _follow(run_dir: RunDir, path: Path, latest: Latest, offset: int, as_json: bool,
            as_csv: bool) -> None:
    """Print whenever a new fleet sample arrives; return once the fleet is gone."""
    header = True
    shown_t = None
    try:
        while True:
            running = _running(run_dir)
            samples, offset = read_samples(path, offset)
            latest.add(samples)
            fleet_t = latest.fleet["t"] if latest.fleet else None
            if fleet_t is not None and fleet_t != shown_t:
                shown_t = fleet_t
                _print(latest, as_json, as_csv, header=header, running=running, compact=True)
                header = False
            if not running:
                return
            time.sleep(0.5)
    except KeyboardInterrupt:
        return


def _running(run_dir: RunDir) -> bool:
    try:
        run_dir.read()
    except FleetNotRunning:
        return False
    except Exception:  # an unreadable run file: say not running, show the figures anyway
        return False
    return True


def metrics_document(latest: Latest, running: bool) -> dict[str, Any]:
    """The --json document: ``{"fleet", "pods", "coordinator", "store", "running"}``."""
    return {**latest.as_dict(), "running": running}


def _print(latest: Latest, as_json: bool, as_csv: bool, *, header: bool, running: bool,
           compact: bool = False) -> None:
    doc = metrics_document(latest, running)
    if as_csv:
        _print_csv(doc, header)
        return
    if as_json and compact:
        click.echo(json.dumps(doc, separators=(",", ":")))
        return
    emit(doc, as_json, lambda: _print_table(doc))


def _print_csv(doc: dict[str, Any], header: bool) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(CSV_COLUMNS)
    rows = [("fleet", None, doc["fleet"])] if doc["fleet"] else []
    rows += [("pod", pod, sample) for pod, sample in doc["pods"].items()]
    for scope, pod, sample in rows:
        values = {**sample, "scope": scope, "pod": pod}
        writer.writerow(["" if values.get(c) is None else values[c] for c in CSV_COLUMNS])
    sys.stdout.write(out.getvalue())
    sys.stdout.flush()


def _figure(value: Any) -> float | None:
    """A sample's number, or None (absent, or not a number in a damaged file)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _ms(value: Any) -> str:
    number = _figure(value)
    return "-" if number is None else f"{number * 1000:.1f}"


def _mb(value: Any) -> str:
    number = _figure(value)
    return "-" if number is None else f"{number / 2**20:.0f}"


def _num(value: Any, spec: str = ".0f") -> str:
    number = _figure(value)
    return "-" if number is None else format(number, spec)


def _print_table(doc: dict[str, Any]) -> None:
    now = time.time()
    fleet, coordinator, store = doc["fleet"], doc["coordinator"], doc["store"]
    state = "running" if doc["running"] else "stopped"
    if fleet:
        # Nothing completed in the last second (an idle or finished fleet):
        # the whole run's percentiles say more than dashes.
        prefix, when = ("e2e", "last second") if fleet.get("e2e_p50_s") is not None else (
            "e2e_all", "whole run")
        p50, p95, p99 = (fleet.get(f"{prefix}_p{p}_s") for p in (50, 95, 99))
        click.echo(
            f"fleet ({state}, {now - fleet['t']:.0f}s ago): {_num(fleet.get('steps_per_s'))} "
            f"steps/s, completed {fleet.get('completed')}, e2e p50/p95/p99 "
            f"{_ms(p50)}/{_ms(p95)}/{_ms(p99)} ms ({when})")
    if coordinator:
        click.echo(f"coordinator: rss {_mb(coordinator.get('rss_bytes'))} MB, "
                   f"cpu {_num(coordinator.get('cpu_percent'))}%")
    if store:
        if "error" in store:
            click.echo(f"store: {store['error']}")
        else:
            depth = ", ".join(f"{q} {n}" for q, n in store.get("depth", {}).items()) or "-"
            click.echo(f"store: depth {depth}; dead tuples {store.get('steps_dead_tuples')}; "
                       f"connections {store.get('connections')}; leader {store.get('leader')} "
                       f"(term {store.get('term')})")
    if not doc["pods"]:
        return
    rows = [("POD", "INC", "RSS MB", "CPU %", "IN FLIGHT", "COMPLETED", "STEPS/S",
             "E2E P50 ms", "P95", "P99", "AGE s")]
    for pod, s in doc["pods"].items():
        rows.append((pod, str(s.get("incarnation")), _mb(s.get("rss_bytes")),
                     _num(s.get("cpu_percent")), _num(s.get("in_flight")),
                     str(s.get("completed")), _num(s.get("steps_per_s")), _ms(s.get("e2e_p50_s")),
                     _ms(s.get("e2e_p95_s")), _ms(s.get("e2e_p99_s")), f"{now - s['t']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths, strict=True))))


__all__ = ["CSV_COLUMNS", "metrics", "metrics_document"]
