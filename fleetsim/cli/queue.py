"""`fleetsim queue ...` and `fleetsim dlq ...`: queue settings and dead letters."""

from __future__ import annotations

import sys
from typing import Any

import click

from fleetsim.cli.common import (
    DURATION,
    EXIT_USAGE,
    cli,
    emit,
    fail,
    json_option,
    open_store,
    option,
    schema_option,
    store_option,
)

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


# -- queues ---------------------------------------------------------------------


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
