"""Running the store through a connection pooler (PgBouncer) in transaction mode.

A pooler in transaction mode hands each transaction whichever server
connection is free, so nothing tied to a session survives between two of a
client's transactions: not a ``PREPARE``d statement, not a ``SET``. And
PgBouncer refuses the ``options`` startup parameter fleetsim uses for its
session settings. So when the store URL declares a pooler
(``?pooler=transaction``):

- no ``options`` are sent at connect time;
- the hot statements run unprepared (planned each time: the price of the pooler);
- each transaction starts with ``SET LOCAL`` of what ``options`` would have
  set (statement timeout, idle-in-transaction timeout, the schema as
  ``search_path``); an autocommitted statement carries them in front, in the
  same query, which PostgreSQL runs as one implicit transaction.

``SET LOCAL`` ends with its transaction, so nothing leaks to the pooler's
other clients through a shared server connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import event

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from fleetsim.store.store import StoreConfig

_SET = "fleetsim_pooler_set"

#: Part of the message when a pooler refuses fleetsim's startup options.
HINT = (
    "; a connection pooler (PgBouncer) is in the way: add ?pooler=transaction to the"
    " store URL (see docs/architecture.md, Connection poolers)"
)


def session_prefix(config: StoreConfig) -> str:
    """The statement (``SET LOCAL``s, as ``set_config``) that starts every transaction."""
    # One statement (set_config(..., true) is SET LOCAL): one result less to
    # forward for each setting. Every value is fleetsim's own: a number, or a
    # schema name that validate_schema_name() made a plain identifier.
    parts = [
        f"set_config('statement_timeout', '{int(config.statement_timeout_s * 1000)}', true)",
        # A client frozen mid-transaction (SIGSTOP) must not hold locks forever.
        "set_config('idle_in_transaction_session_timeout', '10000', true)",
    ]
    if config.schema:
        parts.append(f"set_config('search_path', '{config.schema}', true)")
    return "SELECT " + ", ".join(parts) + "; "


def install(engine: Engine, prefix: str) -> None:
    """Make every transaction on ``engine`` start with ``prefix``.

    An autocommitted statement is its own transaction: it always gets the
    prefix. In an explicit transaction only the first statement does, so a
    later ``SET LOCAL`` (the checker raises its statement timeout) holds.
    """

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.info[_SET] = False

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def _prefix(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> tuple[str, Any]:
        if cursor.connection.autocommit:
            return prefix + statement, parameters
        if not conn.info.get(_SET):
            conn.info[_SET] = True
            return prefix + statement, parameters
        return statement, parameters


def refused_options(detail: str) -> bool:
    """Whether a connection error says the server side refused the ``options`` parameter."""
    return "unsupported startup parameter" in detail
