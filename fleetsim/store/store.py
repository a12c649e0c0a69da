"""The PostgreSQL step store: the only place that talks to the database.

Every operation is one parametrised statement on an autocommit connection
(one round trip) unless it needs a lock held across statements: submit to a
queue with a max length, and claims from a queue with a concurrency limit or
strict FIFO order. The SQL lives in :mod:`fleetsim.store.queries`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg2
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from fleetsim.errors import (
    ClaimInterrupted,
    ConfigError,
    InjectedFault,
    NotLeader,
    PodIdInUse,
    QueueFull,
    SchemaMismatch,
    StoreError,
    StoreUnavailable,
    UnstorableValue,
)
from fleetsim.store import pooler
from fleetsim.store import queries as q
from fleetsim.store.records import (
    ClaimedStep,
    ExitRecord,
    FailOutcome,
    Heartbeat,
    Lease,
    QueueConfig,
    QueueStats,
    Recovery,
    RetryPolicy,
    Step,
    StepSpec,
    WriteOutcome,
)
from fleetsim.store.schema import (
    CURRENT_COLUMNS,
    CURRENT_RELATIONS,
    DDL,
    MIGRATIONS,
    PRESENT_COLUMNS,
    PRESENT_RELATIONS,
    SCHEMA_VERSION,
    STEP_STATUSES,
)
from fleetsim.store.url import pooler_mode, redact, validate_schema_name, validate_url
from fleetsim.store.values import check_storable, storable_text

# How often, at least, a pod's claim serves its limited and strict-FIFO
# queues before its plain ones (see Store.claim_steps): often enough that
# they progress beside a plain queue that always fills the batch, rarely
# enough that their locked transactions stay off the hot path.
SPECIAL_QUEUES_EVERY_S = 0.25

# How long a cached list of "special" queues (limited or strict FIFO) is
# trusted. A stale list never breaks a limit: the fast path excludes those
# queues in SQL; staleness only delays their claims.
_SPECIAL_QUEUES_TTL_S = 1.0


@dataclass(frozen=True)
class StoreConfig:
    """Where the store is and how to talk to it."""

    url: str
    schema: str | None = None  # a PostgreSQL schema to hold the tables (tests use one each)
    connect_timeout_s: int = 5
    statement_timeout_s: float = 30.0
    pool_size: int = 4
    application_name: str = "fleetsim"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # TCP keepalive so a blackholed connection is noticed in a few seconds.
    keepalive_idle_s: int = 2
    keepalive_interval_s: int = 1
    keepalive_count: int = 3
    # A statement whose packets go unanswered this long (a blackholed link)
    # fails instead of waiting out TCP's retransmission backoff, which after
    # a few seconds of outage delays a pod's return by as long again.
    tcp_user_timeout_ms: int = 5000
    # A connection pooler's mode (?pooler=transaction in the URL): see pooler.py.
    pooler: str | None = None

    def __post_init__(self) -> None:
        validate_url(self.url)
        if self.pooler is None:
            object.__setattr__(self, "pooler", pooler_mode(self.url))
        if self.schema is not None:
            validate_schema_name(self.schema)
        if self.connect_timeout_s < 1:
            raise ConfigError("connect timeout must be at least 1 s")


def pod_application_name(pod_id: str, incarnation: int, schema: str | None) -> str:
    """The application_name a pod's connections carry: one pod process of one store.

    ``pod-3#1/fleetsim``: Store.record_exit finds a dead process's backends
    by it, so it names the incarnation (a restart must keep its own) and the
    schema (another fleet's pod-3 in the same database is not this one).
    PostgreSQL keeps 63 bytes of printable ASCII: a longer or other name is
    shortened and made unique again by a hash of the whole.
    """
    name = f"{pod_id}#{incarnation}/{schema or ''}"
    if len(name) <= 63 and name.isascii() and name.isprintable():
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    head = "".join(c if c.isascii() and c.isprintable() else "?" for c in pod_id)
    return f"{head[:63 - 18 - len(str(incarnation))]}#{incarnation}~{digest}"


def _to_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class Store:
    """A fleetsim step store on PostgreSQL.

    Thread-safe: each call checks a connection out of a small pool.
    """

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.url_for_display = redact(config.url)
        options = [
            f"-c statement_timeout={int(config.statement_timeout_s * 1000)}",
            # A client frozen mid-transaction (SIGSTOP) must not hold locks forever.
            "-c idle_in_transaction_session_timeout=10000",
        ]
        if config.schema:
            # validate_schema_name() made the name a plain identifier.
            options.append(f"-c search_path={config.schema}")
        connect_args = {
            "connect_timeout": config.connect_timeout_s,
            "application_name": config.application_name[:63],
            "keepalives": 1,
            "keepalives_idle": config.keepalive_idle_s,
            "keepalives_interval": config.keepalive_interval_s,
            "keepalives_count": config.keepalive_count,
            "tcp_user_timeout": config.tcp_user_timeout_ms,
        }
        if not config.pooler:  # a pooler refuses options: see pooler.py
            connect_args["options"] = " ".join(options)
        url = validate_url(config.url)
        common: dict[str, Any] = {
            "connect_args": connect_args,
            "pool_size": config.pool_size,
            "max_overflow": config.pool_size,
            "pool_timeout": config.connect_timeout_s + 5,
        }
        # Single statements run in autocommit (one round trip, no BEGIN/COMMIT);
        # multi-statement transactions use a second pool in READ COMMITTED.
        self._auto: Engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", **common)
        self._tx: Engine = sa.create_engine(url, **common)
        self._pooled = pooler.session_prefix(config) if config.pooler else ""
        if self._pooled:
            for engine in (self._auto, self._tx):
                pooler.install(engine, self._pooled)
        self._hooks: list[Callable[[], None]] = []
        self._reply_hooks: list[Callable[[], None]] = []
        # Connections the hot path keeps checked out between calls: a pool
        # checkout and return cost more than a claim's own client work.
        # list.append and list.pop are atomic, so no lock is needed.
        self._hot_idle: list[Any] = []
        self._special_queues: frozenset[str] = frozenset()
        self._special_queues_at = float("-inf")
        self._special_due = float("-inf")
        self._lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate driver errors into the fleetsim error tree, one line each."""
        try:
            yield
        except (StoreError, ConfigError):
            raise
        except sa_exc.DBAPIError as exc:
            detail = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            pgcode = getattr(exc.orig, "pgcode", None)
            if exc.connection_invalidated or (isinstance(
                exc, sa_exc.OperationalError | sa_exc.InterfaceError
            ) and pgcode is None):
                hint = pooler.HINT if pooler.refused_options(detail) else ""
                raise StoreUnavailable(
                    f"cannot reach the store at {self.url_for_display}: {detail}{hint}"
                ) from exc
            if pgcode in ("42P01", "3F000"):  # undefined table / schema
                raise SchemaMismatch(
                    f"{self.url_for_display} holds no fleetsim store"
                    f"{' in schema ' + self.config.schema if self.config.schema else ''}:"
                    " run `fleetsim init`"
                ) from exc
            if pgcode and pgcode[:2] in ("22", "54"):
                # A data exception or a limit: the server refused what the
                # statement carries. Writing it again cannot succeed.
                raise UnstorableValue(f"the store refused a value: {detail}") from exc
            if pgcode in ("57P01", "57P02", "57P03", "08006", "08003", "08000"):
                raise StoreUnavailable(
                    f"the store at {self.url_for_display} went away: {detail}"
                ) from exc
            raise StoreError(f"store error: {detail}") from exc
        except sa_exc.TimeoutError as exc:
            raise StoreUnavailable(
                f"no free connection to the store at {self.url_for_display}"
            ) from exc

    def _rows(self, sql: str, **params: Any) -> list[Any]:
        with self._errors(), self._auto.connect() as conn:
            return list(conn.execute(_text(sql), params))

    def _hot(self, statement: _Prepared, **params: Any) -> list[Any]:
        """Run a hot-path statement as a prepared statement on a pooled connection.

        Planning these CTEs costs more than running them, and SQLAlchemy's
        result machinery costs more than the driver: so each connection
        prepares the hot statements once (with generic plans) and runs them
        through the bare psycopg2 cursor. Statement hooks still apply.
        """
        with self._errors():
            try:
                raw = self._hot_idle.pop()
            except IndexError:
                try:
                    raw = self._auto.raw_connection()
                except psycopg2.Error as exc:  # the pool hands the driver's error through
                    raise sa_exc.DBAPIError.instance(
                        statement.execute_py, params, exc, psycopg2.Error
                    ) from exc
            healthy = False
            try:
                cursor = raw.cursor()
                try:
                    for hook in self._hooks:
                        hook()
                    if self._pooled:  # no session to prepare in: see pooler.py
                        cursor.execute(self._pooled + statement.direct_py, params)
                    else:
                        prepared = raw.info.setdefault("fleetsim_prepared", set())
                        if not prepared:
                            cursor.execute("SET plan_cache_mode = force_generic_plan")
                        for other in _HOT:
                            if other.name not in prepared:
                                cursor.execute(other.prepare)
                                prepared.add(other.name)
                        cursor.execute(statement.execute_py, params)
                    rows: list[Any] = cursor.fetchall()
                    for hook in self._reply_hooks:
                        hook()
                    healthy = True
                    return rows
                finally:
                    cursor.close()
            except InjectedFault as fault:
                if fault.disconnect:
                    raw.invalidate()
                raise
            except psycopg2.Error as exc:
                if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
                    raw.invalidate()
                raise sa_exc.DBAPIError.instance(
                    statement.execute_py, params, exc, psycopg2.Error
                ) from exc
            finally:
                # Only a connection that just worked is kept; any other goes
                # back to the pool, which resets (or drops) it.
                if healthy and len(self._hot_idle) < self.config.pool_size:
                    self._hot_idle.append(raw)
                else:
                    raw.close()

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        with self._errors():
            with self._tx.begin() as conn:
                yield conn
            # Committed: a reply hook may lose the transaction's outcome now.
            for hook in self._reply_hooks:
                hook()

    def add_statement_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` before every statement this store sends.

        This is the seam for storage faults: a hook may sleep (latency) or
        raise InjectedFault (an error; with ``disconnect=True`` the connection
        is also dropped, as if the server had gone away).
        """
        for engine in (self._auto, self._tx):
            event.listen(engine, "before_cursor_execute", _cursor_listener(hook))
        self._hooks.append(hook)  # the hot path runs hooks itself (see _hot)

    def add_reply_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after every statement or transaction that has taken effect.

        The seam for lost replies: a hook that raises InjectedFault with
        ``disconnect=True`` drops the connection after the work committed,
        so the caller sees an error for a write that happened (what a
        connection cut after COMMIT does). It runs after each autocommitted
        statement and after each transaction's COMMIT, never between the
        statements of a transaction (an error there rolls the work back,
        an ordinary failure).
        """
        event.listen(self._auto, "after_cursor_execute", _cursor_listener(hook))
        self._reply_hooks.append(hook)  # the hot path runs them itself (see _hot)

    def close(self) -> None:
        """Close every pooled connection."""
        while self._hot_idle:
            with suppress(Exception):
                self._hot_idle.pop().close()
        self._auto.dispose()
        self._tx.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ping(self) -> None:
        """Check the server answers; raises StoreUnavailable within the connect timeout."""
        self._rows("SELECT 1")

    def db_now(self) -> datetime:
        """The database's clock (the only clock fleetsim trusts)."""
        value: datetime = self._rows(q.DB_NOW)[0][0]
        return value

    # -- schema -----------------------------------------------------------

    def init_schema(self) -> None:
        """Create the schema if needed (idempotent, safe to run concurrently).

        A store already at ``SCHEMA_VERSION`` with every table, index, view
        and column of it is left alone: no DDL, so no lock that live pods'
        transactions would have to wait for.
        """
        with self._transaction() as conn:
            # Serialise concurrent inits: CREATE ... IF NOT EXISTS races otherwise.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7364001)"))
            if self.config.schema:
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self.config.schema}"'))
            version = 0
            if conn.execute(sa.text("SELECT to_regclass('fleetsim_schema')")).scalar():
                version = conn.execute(
                    sa.text("SELECT coalesce(max(version), 0) FROM fleetsim_schema")
                ).scalar_one()
            if version == SCHEMA_VERSION and _schema_complete(conn):
                # Already current: run no DDL. Beside a live fleet (a restarted
                # coordinator, pods joined from elsewhere) CREATE INDEX takes
                # SHARE on steps and CREATE OR REPLACE VIEW takes ACCESS
                # EXCLUSIVE on the views, even when nothing changes, so it
                # queued behind pods' claims and could deadlock with them.
                return
            # An existing store is brought up one version at a time.
            for step in range(max(version, 1), SCHEMA_VERSION) if version else ():
                for statement in MIGRATIONS[step]:
                    conn.execute(sa.text(statement))
            for statement in DDL:
                conn.execute(sa.text(statement))

    def check_schema(self) -> int:
        """Return the schema version; raise SchemaMismatch if absent or unsupported."""
        rows = self._rows("SELECT max(version) FROM fleetsim_schema")
        version = rows[0][0]
        if version != SCHEMA_VERSION:
            raise SchemaMismatch(
                f"{self.url_for_display} has fleetsim schema version {version},"
                f" this fleetsim needs {SCHEMA_VERSION}"
            )
        return int(version)

    def drop_schema(self) -> None:
        """Drop the store's private schema and everything in it (tests, `fleetsim reset`)."""
        if not self.config.schema:
            raise ConfigError("refusing to drop the tables of a store without its own schema")
        with self._transaction() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{self.config.schema}" CASCADE'))

    # -- queues -----------------------------------------------------------

    def configure_queue(self, config: QueueConfig) -> None:
        """Create or update a queue's settings."""
        _check_queue_name(config.name)
        if config.concurrency_limit is not None and config.concurrency_limit < 1:
            raise ConfigError("a queue's concurrency limit must be at least 1")
        if config.max_length is not None and config.max_length < 1:
            raise ConfigError("a queue's max length must be at least 1")
        _check_timeout(config.timeout_s)
        with self._transaction() as conn:
            # The row must exist before it is locked: a queue that a submit
            # creates meanwhile would escape the lock (the upsert's own lock,
            # FOR NO KEY UPDATE, does not wait for claims).
            conn.execute(_text(q.ENSURE_QUEUES), {"names": [config.name]})
            # Waits for the fast-path claims in flight on this queue (they hold
            # its row FOR KEY SHARE), so the flagging below sees them; claims
            # that start after it read the new settings.
            conn.execute(_text(q.LOCK_QUEUE), {"queue": config.name})
            conn.execute(
                _text(q.UPSERT_QUEUE),
                {
                    "name": config.name,
                    "concurrency_limit": config.concurrency_limit,
                    "max_length": config.max_length,
                    "strict_fifo": config.strict_fifo,
                    "paused": config.paused,
                    "timeout_s": config.timeout_s,
                },
            )
            if config.concurrency_limit is not None or config.strict_fifo:
                conn.execute(_text(q.FLAG_OPEN_CLAIMS), {"queue": config.name})
        self._special_queues_at = float("-inf")

    def set_queue_timeout(self, name: str, timeout_s: float | None) -> None:
        """Set (None: remove) the execution timeout of a queue's steps; creates the queue.

        A step's own timeout (``StepSpec.timeout_s``) wins over its queue's.
        Claims made from now on carry the new value; the leader's revocation
        of overdue claims reads it at each pass.
        """
        _check_queue_name(name)
        _check_timeout(timeout_s)
        with self._transaction() as conn:
            conn.execute(_text(q.SET_QUEUE_TIMEOUT), {"name": name, "timeout_s": timeout_s})

    def set_queue_paused(self, name: str, paused: bool) -> None:
        """Pause (no claims) or resume a queue."""
        if not self._rows(q.SET_PAUSED, name=name, paused=paused):
            raise StoreError(f"no queue named {name!r}")

    def queues(self) -> dict[str, QueueConfig]:
        """Every queue's settings, by name."""
        return {
            row[0]: QueueConfig(row[0], row[1], row[2], row[3], row[4], row[5])
            for row in self._rows(q.GET_QUEUES)
        }

    def queue_stats(self) -> dict[str, QueueStats]:
        """Counts by status for every queue, consistent with the rows of ``steps``."""
        return {row[0]: QueueStats(*row) for row in self._rows(q.QUEUE_STATS)}

    def status_counts(self) -> dict[str, int]:
        """Counts of all steps by status (every status present, zero if none)."""
        counts = dict.fromkeys(STEP_STATUSES, 0)
        counts.update({row[0]: int(row[1]) for row in self._rows(q.STATUS_COUNTS)})
        return counts

    def has_open_steps(self) -> bool:
        """Whether any step is queued, failed (waiting for a retry) or claimed.

        A cheap poll for "drained" (an index probe while steps wait), unlike
        :meth:`status_counts`, which reads every row.
        """
        return bool(self._rows(q.HAS_OPEN_STEPS)[0][0])

    # -- submit -----------------------------------------------------------

    def submit(
        self,
        queue: str = "default",
        payload: dict[str, Any] | None = None,
        *,
        priority: int = 0,
        max_attempts: int = 3,
        idempotency_key: str | None = None,
    ) -> int:
        """Submit one step; return its id (the first step's, for a repeated key)."""
        spec = StepSpec(queue, payload or {}, priority, max_attempts, idempotency_key)
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Sequence[StepSpec]) -> list[int]:
        """Submit steps in one round trip; return their ids in order.

        A step whose idempotency key exists already is not inserted again: its
        id is the existing step's. Raises QueueFull, writing nothing, if a
        queue with a max length would exceed it.
        """
        if not specs:
            return []
        for spec in specs:
            _check_spec(spec)
            check_storable(spec.payload, "a step's payload")
        if len(specs) >= _COPY_MIN_STEPS and not any(
                s.idempotency_key or s.timeout_s is not None for s in specs):
            copied = self._submit_by_copy(specs)
            if copied is not None:
                return copied
        items = _to_json([
            {
                "queue": s.queue,
                "priority": s.priority,
                "payload": s.payload,
                "max_attempts": s.max_attempts,
                "idempotency_key": s.idempotency_key,
                "timeout_s": s.timeout_s,
            }
            for s in specs
        ])
        rows = self._rows(q.SUBMIT_MANY, items=items)
        if len(rows) < len(specs) and not rows:
            names = sorted({s.queue for s in specs})
            if self._has_max_length(names):
                rows = self._submit_locked(specs, items, names)
        return self._ids_in_order(specs, rows)

    def _submit_by_copy(self, specs: Sequence[StepSpec]) -> list[int] | None:
        """Insert ``specs`` (no idempotency keys) with COPY; None if a queue has a max length.

        Twice as fast as the one-statement INSERT for large batches: no JSON
        document to parse on the server, no per-row conflict check, and no
        rows to return. The ids are drawn first, in submission order, so
        they are known without a RETURNING. All of it is one transaction.
        """
        names = sorted({s.queue for s in specs})
        with self._transaction() as conn:
            conn.execute(_text(q.ENSURE_QUEUES), {"names": names})
            if conn.execute(_text(q.ANY_MAX_LENGTH), {"names": names}).first():
                return None  # the locked path counts and may refuse
            queue_field = {name: _copy_field(name) for name in names}
            # The driver's connection: COPY is psycopg2's, not SQLAlchemy's.
            raw: Any = conn.connection.dbapi_connection
            try:
                with raw.cursor() as cursor:
                    cursor.execute(q.NEXT_STEP_IDS, {"n": len(specs)})
                    ids = [row[0] for row in cursor.fetchall()]
                    rows = (
                        f"{step_id}\t{queue_field[s.queue]}\t{s.priority}\t"
                        # json.dumps escapes control characters: only its
                        # backslashes need COPY's escaping.
                        f"{_to_json(s.payload).replace(chr(92), chr(92) * 2)}\t"
                        f"{s.max_attempts}\n"
                        for step_id, s in zip(ids, specs, strict=True)
                    )
                    # Made as the server reads them: formatting overlaps the
                    # server's inserting, on another core.
                    cursor.copy_expert(q.COPY_STEPS, _LinesReader(rows), size=_COPY_CHUNK)
            except psycopg2.Error as exc:
                raise sa_exc.DBAPIError.instance(
                    q.COPY_STEPS, None, exc, psycopg2.Error
                ) from exc
        return ids

    def _has_max_length(self, names: list[str]) -> bool:
        return bool(self._rows(q.ANY_MAX_LENGTH, names=names))

    def _submit_locked(
        self, specs: Sequence[StepSpec], items: str, names: list[str]
    ) -> list[Any]:
        with self._transaction() as conn:
            limited = list(conn.execute(_text(q.LOCK_LIMITED_QUEUES), {"names": names}))
            keys = [s.idempotency_key for s in specs if s.idempotency_key]
            existing = set()
            if keys:
                existing = {
                    row[1] for row in conn.execute(_text(q.STEPS_BY_KEY), {"keys": keys})
                }
            # Count what will really be inserted: a key already stored, or
            # repeated within this batch, adds one row at most.
            seen = set(existing)
            adding_by_queue: dict[str, int] = {}
            for spec in specs:
                if spec.idempotency_key is not None:
                    if spec.idempotency_key in seen:
                        continue
                    seen.add(spec.idempotency_key)
                adding_by_queue[spec.queue] = adding_by_queue.get(spec.queue, 0) + 1
            for name, max_length in limited:
                adding = adding_by_queue.get(name, 0)
                depth = conn.execute(_text(q.QUEUE_DEPTH), {"queue": name}).scalar_one()
                if depth + adding > max_length:
                    raise QueueFull(name, max_length, depth, adding)
            return list(conn.execute(_text(q.INSERT_STEPS), {"items": items}))

    def _ids_in_order(self, specs: Sequence[StepSpec], rows: list[Any]) -> list[int]:
        if len(rows) == len(specs):
            return [int(row[0]) for row in rows]
        by_key = {row[1]: int(row[0]) for row in rows if row[1] is not None}
        fresh = iter(int(row[0]) for row in rows if row[1] is None)
        missing = [s.idempotency_key for s in specs if s.idempotency_key not in by_key]
        missing_keys = [k for k in missing if k is not None]
        if missing_keys:
            for row in self._rows(q.STEPS_BY_KEY, keys=missing_keys):
                by_key[row[1]] = int(row[0])
        ids = []
        for spec in specs:
            if spec.idempotency_key is not None:
                if spec.idempotency_key not in by_key:
                    raise StoreError(f"step with key {spec.idempotency_key!r} vanished")
                ids.append(by_key[spec.idempotency_key])
            else:
                ids.append(next(fresh))
        return ids

    # -- claim ------------------------------------------------------------

    def claim_steps(
        self, pod_id: str, queues: Sequence[str] = ("default",), batch: int = 1,
        *, incarnation: int = 0,
    ) -> list[ClaimedStep]:
        """Claim up to ``batch`` steps for ``pod_id`` (which must be registered and alive).

        Ordered by priority (lower first), then id. Each claimed step gets a
        fresh claim token and a row in the ``step_attempts`` view (an open
        attempt, kept on the step; its ``finished_attempts`` row is written
        by the statement that ends it).

        Fair across queues: the plain queues fill the batch in one statement,
        and the limited and strict-FIFO ("special") queues, each claimed in a
        transaction of its own, are served before them at least every
        ``SPECIAL_QUEUES_EVERY_S`` (up to an equal share of the batch each),
        and after them whenever they leave the batch short. A plain queue
        that always fills the batch cannot starve a special one.

        A claim is one unit for its caller: if a statement fails after an
        earlier one committed steps to the pod, ClaimInterrupted carries
        those steps (the pod runs or releases them).
        """
        if batch < 1:
            raise ConfigError("batch must be at least 1")
        queue_list = list(queues)
        claimed: list[ClaimedStep] = []
        try:
            special = sorted(self._special(queue_list))
            now = time.monotonic()
            first = bool(special) and now >= self._special_due
            if first:
                self._special_due = now + SPECIAL_QUEUES_EVERY_S
                share = max(1, batch // (len(special) + 1))
                for name in special:
                    if len(claimed) >= batch:
                        break
                    claimed += self._claim_locked(
                        name, pod_id, min(share, batch - len(claimed)), incarnation)
            claimed += _claimed_steps(self._hot(
                _CLAIM, queues=queue_list, pod=pod_id, batch=batch - len(claimed),
                incarnation=incarnation,
            )) if len(claimed) < batch else []
            # The plain queues left the batch short: top it up from the special ones.
            for name in special:
                if len(claimed) >= batch:
                    break
                claimed += self._claim_locked(name, pod_id, batch - len(claimed), incarnation)
        except StoreError as exc:
            # The steps claimed so far are committed to this pod: they are
            # handed over with the error rather than dropped with it (nobody
            # would recover them while the pod stays alive).
            if claimed:
                raise ClaimInterrupted(claimed, exc) from exc
            raise
        return claimed

    def _special(self, names: list[str]) -> set[str]:
        now = time.monotonic()
        with self._lock:
            if now - self._special_queues_at > _SPECIAL_QUEUES_TTL_S:
                self._special_queues = frozenset(
                    row[0]
                    for row in self._rows(
                        "SELECT name FROM queues"
                        " WHERE concurrency_limit IS NOT NULL OR strict_fifo"
                    )
                )
                self._special_queues_at = now
            return set(self._special_queues.intersection(names))

    def _claim_locked(
        self, queue: str, pod_id: str, batch: int, incarnation: int
    ) -> list[ClaimedStep]:
        with self._transaction() as conn:
            config = conn.execute(_text(q.LOCK_QUEUE), {"queue": queue}).first()
            if config is None or config.paused:
                return []
            limit, fifo = config.concurrency_limit, config.strict_fifo
            if limit is not None:
                running = conn.execute(_text(q.COUNT_CLAIMED), {"queue": queue}).scalar_one()
                batch = min(batch, limit - running)
                if batch <= 0:
                    return []
            sql = q.CLAIM_FIFO if fifo else q.CLAIM_LIMITED
            rows = conn.execute(
                _text(sql),
                {"queue": queue, "pod": pod_id, "batch": batch, "incarnation": incarnation},
            )
            return _claimed_steps(rows.all())

    # -- fenced writes ----------------------------------------------------

    def complete(self, step_id: int, claim_token: int, result: Any = None) -> WriteOutcome:
        """Complete a claimed step, if ``claim_token`` is still its current claim."""
        accepted = self.complete_many([(step_id, claim_token, result)])
        return WriteOutcome.ACCEPTED if step_id in accepted else WriteOutcome.LEASE_LOST

    def complete_many(self, items: Iterable[tuple[int, int, Any]]) -> set[int]:
        """Complete several steps in one round trip; return the ids accepted.

        The others' tokens were superseded: nothing about them changed.
        """
        payload = [{"id": i, "token": t, "result": r} for i, t, r in items]
        if not payload:
            return set()
        for item in payload:
            check_storable(item["result"], f"step {item['id']}'s result")
        return {int(row[0]) for row in self._hot(_COMPLETE, items=_to_json(payload))}

    def fail(self, step_id: int, claim_token: int, error: str) -> FailOutcome:
        """Fail a claimed step: retry after backoff, or dead (DLQ) at max_attempts."""
        return self.fail_many([(step_id, claim_token, error)]).get(
            step_id, FailOutcome(WriteOutcome.LEASE_LOST)
        )

    def fail_many(self, items: Iterable[tuple[int, int, str]]) -> dict[int, FailOutcome]:
        """Fail several steps in one round trip; return the outcome of each accepted one."""
        payload = [{"id": i, "token": t, "error": storable_text(e[:4000])} for i, t, e in items]
        if not payload:
            return {}
        retry = self.config.retry
        rows = self._hot(
            _FAIL, items=_to_json(payload), retry_base=retry.base_s,
            retry_cap=retry.cap_s, retry_jitter=retry.jitter,
        )
        return {
            int(row[0]): FailOutcome(
                WriteOutcome.ACCEPTED, row[1], float(row[2]) if row[1] == "failed" else None
            )
            for row in rows
        }

    def release(self, step_id: int, claim_token: int) -> WriteOutcome:
        """Return a claimed step to its queue without spending an attempt."""
        accepted = self.release_many([(step_id, claim_token)])
        return WriteOutcome.ACCEPTED if step_id in accepted else WriteOutcome.LEASE_LOST

    def release_many(self, items: Iterable[tuple[int, int]]) -> set[int]:
        """Release several claimed steps; return the ids released."""
        payload = [{"id": i, "token": t} for i, t in items]
        if not payload:
            return set()
        return {int(row[0]) for row in self._hot(_RELEASE, items=_to_json(payload))}

    def release_claims_of(self, pod_id: str, incarnation: int = 0) -> list[int]:
        """Release every step ``pod_id``'s ``incarnation`` has claimed; return their ids.

        For a pod that may hold claims it does not know of: a claim whose
        reply was lost (the connection dropped after it committed), or
        writes it gave up on. Call it only while the pod runs no step, as its
        claim loop is between batches. It finds the claims by scanning
        ``steps`` (no index names a claim's pod), which is fine for a rare
        event. Like ``release_many``, it spends no attempt.
        """
        rows = self._rows(q.RELEASE_CLAIMS_OF, pod=pod_id, incarnation=incarnation)
        return [int(row[0]) for row in rows]

    # -- cancel -----------------------------------------------------------

    def cancel(self, step_id: int) -> str:
        """Cancel a step: at once if waiting, cooperatively if claimed.

        Returns ``"cancelled"``, ``"cancel_requested"`` (the pod sees it on its
        next heartbeat), or the step's final status if it had already ended.
        """
        rows = self._rows(q.CANCEL, id=step_id)
        if rows:
            return "cancel_requested" if rows[0][0] == "claimed" else "cancelled"
        current = self._rows(q.STEP_STATUS, id=step_id)
        if not current:
            raise StoreError(f"no step with id {step_id}")
        return str(current[0][0])

    def acknowledge_cancel(self, step_id: int, claim_token: int) -> WriteOutcome:
        """A pod confirms it stopped a step whose cancel was requested."""
        rows = self._rows(q.ACK_CANCEL, id=step_id, token=claim_token)
        return WriteOutcome.ACCEPTED if rows else WriteOutcome.LEASE_LOST

    def get_step(self, step_id: int) -> Step | None:
        """One step's row, or None."""
        rows = self._rows(q.GET_STEP, id=step_id)
        return Step(*rows[0]) if rows else None

    def run_summary(self) -> dict[str, Any]:
        """Counts and the throughput window of everything in this store.

        ``window_s`` runs from the first claim to the last completion (DB time);
        ``duplicate_completions`` counts steps with more than one accepted
        completion, ``completed_without_attempt`` completed steps with none.
        """
        row = self._rows(q.RUN_SUMMARY)[0]
        return {
            "submitted": int(row.submitted),
            "window_s": float(row.window_s) if row.window_s is not None else None,
            "duplicate_completions": int(row.duplicates),
            "completed_without_attempt": int(row.unbacked),
            "pods_with_work": int(row.pods_with_work),
            **self.status_counts(),
        }

    # -- pods -------------------------------------------------------------

    def register_pod(
        self, pod_id: str, *, incarnation: int = 0, pid: int | None = None,
        host: str | None = None, live_within_s: float = 3.0,
    ) -> int:
        """Register (or re-register) a pod as alive; return how many steps were requeued.

        Whatever the id still had claimed from before is requeued, spending an
        attempt: a (re)starting pod holds no work. Raises PodIdInUse if another
        process owns the id: its row is alive with a heartbeat younger than
        ``live_within_s`` (pass the fleet's dead-after) and it has the same or
        a higher incarnation. A higher incarnation takes the id over, fencing
        the old one (the restart of a pod its supervisor saw die).
        """
        retry = self.config.retry
        with self._transaction() as conn:
            row = conn.execute(_text(q.REGISTER_POD), {
                "pod": pod_id, "incarnation": incarnation, "pid": pid, "host": host,
                "live_within": live_within_s,
            }).one()
            if not row.registered:
                age = row.heartbeat_age_s
                raise PodIdInUse(
                    f"pod id {pod_id!r} is in use by a live process (incarnation "
                    f"{row.incarnation if row.incarnation is not None else '?'}, pid "
                    f"{row.pid or '?'} on {row.host or '?'}, heartbeat "
                    f"{f'{float(age):.1f}s ago' if age is not None else 'just now'}):"
                    f" choose another id, stop that process, or wait {live_within_s:g}s"
                    " after it died"
                )
            # A statement of its own, so a snapshot of its own: it sees every
            # claim the old incarnation committed before the upsert above got
            # the pod's row (claims hold it FOR SHARE, so the upsert waited
            # for them); later ones wait for this transaction, then find the
            # incarnation changed and claim nothing.
            requeued = conn.execute(_text(q.REQUEUE_LEFTOVERS), {
                "pod": pod_id, "retry_base": retry.base_s, "retry_cap": retry.cap_s,
                "retry_jitter": retry.jitter,
            }).scalar_one()
        return int(requeued)

    def heartbeat(self, pod_id: str, incarnation: int = 0) -> Heartbeat:
        """Record a heartbeat in database time; learn of cancel requests.

        ``alive`` is False when the pod was declared dead or another
        incarnation replaced it: the pod must stop working on its steps.
        """
        alive, known_incarnation, cancel_ids, cancel_tokens = self._hot(
            _HEARTBEAT, pod=pod_id, incarnation=incarnation
        )[0]
        return Heartbeat(
            alive=bool(alive),
            incarnation=known_incarnation,
            cancel_requested=tuple(zip(cancel_ids, cancel_tokens, strict=True)),
        )

    def record_exit(
        self, pod_id: str, incarnation: int, pid: int | None, *,
        returncode: int | None = None, wait_s: float = 5.0,
    ) -> ExitRecord:
        """Record that a pod process is certainly gone (its supervisor reaped it).

        First the store's connections of that process (found by
        :func:`pod_application_name`) are terminated and waited out: a
        statement it sent before dying may still be running, or on its way
        in a socket buffer; once its backends are gone nothing it sent can
        land. Then, in one transaction with the pod's row locked, and only if
        that row is still this process's registration (same incarnation and
        pid: a registration of the next incarnation fences this out), the
        leader term it holds is ended (its lease freed: a successor may
        acquire at once) and the exit is recorded: the leader's next recovery
        pass marks the pod dead and requeues its steps, without waiting for
        the dead threshold. Raises StoreError (and records nothing) if a
        backend outlives ``wait_s`` or cannot be terminated (a role without
        the right to), and ConfigError through a connection pooler, whose
        server connections are not the pod's: then the pod's death is found
        by its silence, as before.
        """
        if self.config.pooler:
            raise ConfigError("a certain death cannot be recorded through a connection pooler:"
                              " the pod's statements may sit in any server connection")
        app = pod_application_name(pod_id, incarnation, self.config.schema)
        pids = [row.pid for row in self._rows(q.TERMINATE_BACKENDS, app=app)]
        deadline = time.monotonic() + wait_s
        while self._rows(q.PROCESS_BACKENDS_LEFT, app=app, pids=pids)[0][0]:
            if time.monotonic() > deadline:
                raise StoreError(f"{pod_id}'s connections outlived {wait_s:g}s after "
                                 "pg_terminate_backend: its exit is not recorded")
            time.sleep(0.005)
        with self._transaction() as conn:
            row = conn.execute(_text(q.LOCK_EXITED_POD), {"pod": pod_id}).first()
            if row is None or row.incarnation != incarnation or (
                    pid is not None and row.pid is not None and row.pid != pid):
                return ExitRecord(False, None, len(pids))
            ended = conn.execute(_text(q.END_EXITED_TERM), {
                "pod": pod_id, "registered_at": row.started_at,
            }).scalar()
            recorded = conn.execute(_text(q.RECORD_EXIT), {
                "pod": pod_id, "incarnation": incarnation, "pid": pid,
                "registered_at": row.started_at, "returncode": returncode,
                "ended_term": ended,
            }).first()
        return ExitRecord(recorded is not None, None if ended is None else int(ended),
                          len(pids))

    def has_unmarked_exits(self) -> bool:
        """Whether some pod's exit was recorded (record_exit) but recovery has not marked it.

        Cheap (the pods, and pod_exits by primary key): the leader asks
        between its recovery passes, and runs one at once if so.
        """
        return bool(self._rows(q.UNMARKED_EXITS)[0][0])

    def stop_pod(self, pod_id: str, incarnation: int = 0) -> None:
        """Mark a pod stopped after a graceful shutdown."""
        self._rows(q.STOP_POD + " RETURNING id", pod=pod_id, incarnation=incarnation)

    def pod_counts(self) -> tuple[int, int]:
        """(alive pods, all pods): cheap, for status lines."""
        row = self._rows(q.POD_COUNTS)[0]
        return int(row[0]), int(row[1])

    def alive_pod_hosts(self) -> dict[str, str]:
        """The host name each alive pod registered, by pod id (cheap: no counts)."""
        return {row.id: row.host for row in self._rows(q.ALIVE_PODS) if row.host}

    def alive_registrations(self) -> dict[str, tuple[int, int | None]]:
        """(incarnation, pid) of every alive pod, by pod id (cheap: no counts)."""
        return {row.id: (int(row.incarnation), None if row.pid is None else int(row.pid))
                for row in self._rows(q.ALIVE_PODS)}

    def analyze(self) -> None:
        """Refresh the planner's statistics (after a large bulk submit)."""
        with self._errors(), self._auto.connect() as conn:
            conn.execute(sa.text("ANALYZE steps"))
            conn.execute(sa.text("ANALYZE finished_attempts"))

    def pods(self) -> list[dict[str, Any]]:
        """Every pod with its state, heartbeat age (DB time), claimed and completed counts."""
        return [
            {
                "id": row.id,
                "incarnation": row.incarnation,
                "pid": row.pid,
                "host": row.host,
                "state": row.status,
                "heartbeat_age_s": round(float(row.heartbeat_age_s), 3),
                "claimed": int(row.claimed),
                "completed": int(row.completed),
            }
            for row in self._rows(q.PODS)
        ]

    # -- leader lease -----------------------------------------------------

    def acquire_leadership(self, pod_id: str, ttl_s: float) -> Lease | None:
        """Take the lease if it is free or expired, with a new term; else None."""
        rows = self._rows(q.ACQUIRE_LEASE, pod=pod_id, ttl=ttl_s)
        return Lease(pod_id, int(rows[0][0]), float(rows[0][1])) if rows else None

    def renew_leadership(self, pod_id: str, term: int, ttl_s: float) -> Lease | None:
        """Extend our unexpired lease for ``term``; None if we lost it."""
        rows = self._rows(q.RENEW_LEASE, pod=pod_id, term=term, ttl=ttl_s)
        return Lease(pod_id, int(rows[0][0]), float(rows[0][1])) if rows else None

    def release_leadership(self, pod_id: str, term: int) -> bool:
        """Give the lease up (graceful shutdown); False if it was not ours."""
        return bool(self._rows(q.RELEASE_LEASE, pod=pod_id, term=term))

    def current_leader(self) -> Lease | None:
        """The holder of the unexpired lease, if any."""
        rows = self._rows(q.CURRENT_LEASE)
        return Lease(rows[0][0], int(rows[0][1]), float(rows[0][2])) if rows else None

    @contextmanager
    def leader_transaction(self, pod_id: str, term: int) -> Iterator[LeaderTransaction]:
        """Run leader actions in one transaction fenced by holder, term and expiry.

        Raises NotLeader (and does nothing) if ``pod_id`` does not hold an
        unexpired lease for ``term``. The lease row stays share-locked until
        the transaction ends, so no new term can start in the middle.
        """
        with self._transaction() as conn:
            held = conn.execute(sa.text(q.CHECK_LEASE), {"pod": pod_id, "term": term}).first()
            if held is None:
                raise NotLeader(f"{pod_id} does not hold the leader lease for term {term}")
            yield LeaderTransaction(conn, pod_id, term)

    def recover(self, pod_id: str, term: int, dead_after_s: float) -> Recovery:
        """One recovery pass by the leader, fenced by its term (one statement).

        Pods silent for longer than ``dead_after_s`` (DB time) are marked dead;
        steps claimed by any pod that is not alive are requeued with backoff,
        or dead-lettered once ``max_attempts`` is spent.
        """
        retry = self.config.retry
        row = self._rows(
            q.RECOVER, pod=pod_id, term=term, dead_after=dead_after_s,
            retry_base=retry.base_s, retry_cap=retry.cap_s, retry_jitter=retry.jitter,
        )[0]
        if not row.valid:
            raise NotLeader(f"{pod_id} does not hold the leader lease for term {term}")
        return Recovery(
            tuple(row.marked_dead), tuple(row.requeued), tuple(row.dead_lettered)
        )


class LeaderTransaction:
    """Leader-only operations inside a fenced transaction."""

    def __init__(self, conn: Connection, pod_id: str, term: int) -> None:
        self._conn = conn
        self.pod_id = pod_id
        self.term = term

    def mark_pod_dead(self, target: str) -> bool:
        """Declare a pod dead now (its steps are requeued by the next recovery).

        Fenced again in this very statement: time passes inside a transaction,
        and an action after the lease's expiry would land in the next term.
        Raises NotLeader if the lease expired meanwhile.
        """
        row = self._conn.execute(
            sa.text(q.MARK_POD_DEAD), {"target": target, "term": self.term, "pod": self.pod_id}
        ).one()
        if not row.valid:
            raise NotLeader(
                f"{self.pod_id}'s lease for term {self.term} expired during the transaction"
            )
        return bool(row.marked)


_BIND = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@dataclass(frozen=True)
class _Prepared:
    """A named statement as PREPARE text (binds as $n) and EXECUTE text (pyformat)."""

    name: str
    prepare: str
    execute_py: str
    direct_py: str  # the statement itself, binds as pyformat (through a pooler)


def _prepared(name: str, sql: str) -> _Prepared:
    order: list[str] = []

    def positional(match: re.Match[str]) -> str:
        if match.group(1) not in order:
            order.append(match.group(1))
        return f"${order.index(match.group(1)) + 1}"

    body = _BIND.sub(positional, sql)
    args = ", ".join(f"%({p})s" for p in order)
    direct = _BIND.sub(lambda m: f"%({m.group(1)})s", sql)
    return _Prepared(name, f"PREPARE {name} AS {body}", f"EXECUTE {name}({args})", direct)


_CLAIM = _prepared("fleetsim_claim", q.CLAIM)
_COMPLETE = _prepared("fleetsim_complete", q.COMPLETE)
_FAIL = _prepared("fleetsim_fail", q.FAIL)
_RELEASE = _prepared("fleetsim_release", q.RELEASE)
_HEARTBEAT = _prepared("fleetsim_heartbeat", q.HEARTBEAT)
_HOT = (_CLAIM, _COMPLETE, _FAIL, _RELEASE, _HEARTBEAT)


def _schema_complete(conn: sa.Connection) -> bool:
    """Whether the schema has every relation and column DDL would create (catalog reads only)."""
    relations = conn.execute(sa.text(PRESENT_RELATIONS), {"names": list(CURRENT_RELATIONS)})
    columns = conn.execute(sa.text(PRESENT_COLUMNS), {"names": list(CURRENT_COLUMNS)})
    return (len(relations.all()) == len(CURRENT_RELATIONS)
            and len(columns.all()) == len(CURRENT_COLUMNS))


@functools.lru_cache(maxsize=256)
def _text(sql: str) -> sa.TextClause:
    """text() parses its binds with a regex on every construction: build each once."""
    return sa.text(sql)


def _cursor_listener(hook: Callable[[], None]) -> Callable[..., None]:
    """A SQLAlchemy cursor event listener that calls ``hook``.

    An InjectedFault with ``disconnect=True`` also drops the connection.
    """

    def listener(conn: Any, *_: Any) -> None:
        try:
            hook()
        except InjectedFault as fault:
            if fault.disconnect:
                conn.invalidate()
            raise

    return listener


def _claimed_steps(rows: Sequence[Any]) -> list[ClaimedStep]:
    """The claim's rows (ClaimedStep's fields, in its order) as ClaimedSteps.

    The payloads come as JSON text and are decoded in one ``json.loads``
    over the whole batch: one call per row (the driver's jsonb decoding)
    cost 2.5 µs a step, a tenth of the client's work per step.
    """
    if not rows:
        return []
    payloads = json.loads("[" + ",".join([row[3] for row in rows]) + "]")
    return [
        ClaimedStep(row[0], row[1], row[2], payload, row[4], row[5], row[6], row[7],
                    row[8])
        for row, payload in zip(rows, payloads, strict=True)
    ]


# From this many steps on, submit_many copies (see Store._submit_by_copy):
# below it, its extra round trips cost more than the INSERT's parsing.
_COPY_MIN_STEPS = 1000

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


_COPY_CHUNK = 1 << 16


class _LinesReader:
    """A read-only file over lines made on demand (COPY ... FROM STDIN reads it)."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = iter(lines)
        self._pending = ""

    def read(self, size: int = -1) -> str:
        parts = [self._pending]
        length = len(self._pending)
        for line in self._lines:
            parts.append(line)
            length += len(line)
            if 0 <= size <= length:
                break
        text = "".join(parts)
        if size < 0:
            self._pending = ""
            return text
        self._pending = text[size:]
        return text[:size]


def _copy_field(value: str) -> str:
    """``value`` as a field of COPY's text format."""
    return value.translate(_COPY_ESCAPES)


def _check_queue_name(name: str) -> None:
    if not name or len(name) > 200:
        raise ConfigError("a queue name must be 1 to 200 characters")


#: The longest idempotency key, in bytes of UTF-8. The unique index on the
#: keys cannot hold an entry past about 2.7 kB (a third of a page); a fixed,
#: documented limit well below it fails the same way for every key.
MAX_IDEMPOTENCY_KEY_BYTES = 512


def _check_spec(spec: StepSpec) -> None:
    _check_queue_name(spec.queue)
    key = spec.idempotency_key
    if key is not None:
        if not isinstance(key, str):
            raise ConfigError("an idempotency key must be text")
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate (e.g. undecodable argv bytes)
            raise ConfigError("an idempotency key must be valid UTF-8 text") from None
        if size > MAX_IDEMPOTENCY_KEY_BYTES:
            raise ConfigError(
                f"idempotency key too long: {size} bytes of UTF-8, at most "
                f"{MAX_IDEMPOTENCY_KEY_BYTES} bytes"
            )
        if "\x00" in key:
            raise ConfigError("an idempotency key cannot contain a NUL character")
    if spec.max_attempts < 1:
        raise ConfigError("max_attempts must be at least 1")
    _check_timeout(spec.timeout_s)
    if not isinstance(spec.payload, dict):
        raise ConfigError("a step's payload must be a JSON object")
    if not -(2**31) <= spec.priority < 2**31:
        raise ConfigError("priority must fit in a 32-bit integer")


# An execution timeout: positive, finite, at most a week (a bigger one is a
# typo, and make_interval must hold it).
MAX_TIMEOUT_S = 7 * 24 * 3600.0


def _check_timeout(timeout_s: float | None) -> None:
    if timeout_s is None:
        return
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
        raise ConfigError("a timeout must be a number of seconds")
    if not 0 < timeout_s <= MAX_TIMEOUT_S:
        raise ConfigError(f"a timeout must be more than 0 s and at most {MAX_TIMEOUT_S:g} s "
                          "(a week)")
