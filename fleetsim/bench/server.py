"""Read-only probes of the PostgreSQL server a bench runs against.

The bench observes the server from outside the store (which is what it
measures): the server's version, the CPU its backends spent (local server
only, from /proc), the transactions committed (``pg_stat_database``: a round
trip per statement for autocommitted statements) and the completion times of
a fleet's steps. These are the only bench statements that touch the driver
directly, besides the reference loop itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import psycopg2

from fleetsim.bench.measure import percentile

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def libpq_dsn(url: str) -> str:
    """The URL as libpq wants it (SQLAlchemy's ``+psycopg2`` suffix removed)."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


def connect(url: str, app: str = "fleetsim-bench", schema: str | None = None) -> Any:
    """An autocommit psycopg2 connection (search_path set to ``schema`` if given)."""
    options = f"-c search_path={schema}" if schema else ""
    conn = psycopg2.connect(libpq_dsn(url), application_name=app[:63], options=options,
                            connect_timeout=10)
    conn.autocommit = True
    return conn


def query(conn: Any, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement; its rows (none for a statement without a result).

    Without ``params`` the text is sent as it is (a ``%`` needs no escaping).
    """
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []


def server_version(conn: Any) -> str:
    """``PostgreSQL 15.4`` and the like."""
    (version,) = query(conn, "SHOW server_version")[0]
    return f"PostgreSQL {version}"


def transactions(conn: Any) -> int | None:
    """Transactions committed or rolled back in this database so far (every client's).

    Each autocommitted statement is one, so the delta over a trial is a count
    of round trips that changed or read data. Statistics reach the view with
    a delay of up to a second: read it after the clients went quiet.
    """
    try:
        query(conn, "SELECT pg_stat_clear_snapshot()")
        (count,) = query(conn, "SELECT xact_commit + xact_rollback FROM pg_stat_database"
                               " WHERE datname = current_database()")[0]
    except psycopg2.Error:
        return None
    return int(count)


def backends_of_ports(conn: Any, ports: Iterable[int]) -> list[int]:
    """Server pids of the backends whose client connected from one of ``ports``."""
    wanted = sorted(set(ports))
    if not wanted:
        return []
    rows = query(conn, "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)",
                 (wanted,))
    return [int(r[0]) for r in rows]


def backends_named(conn: Any, app: str) -> list[int]:
    """Server pids of the backends whose application_name is ``app``."""
    rows = query(conn, "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                       " AND pid <> pg_backend_pid()", (app[:63],))
    return [int(r[0]) for r in rows]


def backend_cpu(pids: Iterable[int]) -> dict[int, float] | None:
    """CPU seconds of each local PostgreSQL backend; None if one cannot be seen.

    A remote server's backend pid may name an unrelated local process: only a
    process called ``postgres`` counts.
    """
    out: dict[int, float] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "postgres":
                    return None
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        except (OSError, IndexError, ValueError):
            continue  # it ended meanwhile
    return out


def drain_window(conn: Any, schema: str) -> tuple[int, float]:
    """(completed steps, seconds from the first claim to the last completion) of a fleet.

    Read from ``finished_attempts`` alone (every attempt is finished once the
    queue is drained): the checker's full summary costs far more.
    """
    rows = query(conn, f"""
        SELECT (SELECT count(*) FROM "{schema}".steps WHERE status = 'completed'),
               extract(epoch FROM max(finished_at) FILTER (WHERE outcome = 'completed')
                                  - min(claimed_at))
          FROM "{schema}".finished_attempts""")  # noqa: S608 - our own schema's name
    completed, window = rows[0]
    return int(completed), float(window or 0.0)


def completion_percentiles(conn: Any, schema: str) -> tuple[float, float, float] | None:
    """p50/p95/p99 seconds from the first claim of a fleet's run to each completion."""
    rows = query(conn, f"""
        SELECT extract(epoch FROM finished_at - (SELECT min(claimed_at)
                                                   FROM "{schema}".finished_attempts))
          FROM "{schema}".finished_attempts WHERE outcome = 'completed'""")  # noqa: S608 - our own schema's name
    values = [float(r[0]) for r in rows if r[0] is not None]
    if not values:
        return None
    p50, p95, p99 = (percentile(values, q) or 0.0 for q in (0.5, 0.95, 0.99))
    return p50, p95, p99


def drop_schema(url: str, schema: str) -> None:
    """DROP SCHEMA ... CASCADE, ending this bench's leftover backends on it first."""
    conn = connect(url)
    try:
        query(conn, "SET lock_timeout = '10s'")
        query(conn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        conn.close()
