"""Bad input against a real PostgreSQL: clear one-line errors, never a password."""

from __future__ import annotations

import re
import threading
import time
import traceback
import uuid
from urllib.parse import unquote, urlencode, urlsplit

import pytest

from fleetsim.errors import ConfigError, InjectedFault, SchemaMismatch, StoreUnavailable
from fleetsim.store import (
    SCHEMA_VERSION,
    QueueConfig,
    StepSpec,
    Store,
    StoreConfig,
    WriteOutcome,
)
from tests.integration.claimers import _connect, sql

SECRET = "s3cret"


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


def full_text(exc: BaseException) -> str:
    """Everything `-v` could print: the message and the whole cause chain."""
    return "".join(traceback.format_exception(exc))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:1/test",
        f"postgresql://u:{SECRET}@127.0.0.1:1/x",
        f"postgresql://u:{SECRET}@127.0.0.1:1/x?sslmode=disable",
    ],
)
def test_an_unreachable_store_fails_fast_with_one_clear_line(url: str) -> None:
    started = time.monotonic()
    with Store(StoreConfig(url)) as store, pytest.raises(StoreUnavailable) as raised:
        store.ping()

    assert time.monotonic() - started < 10
    message = one_line(raised.value)
    assert "127.0.0.1:1" in message
    assert SECRET not in full_text(raised.value)


@pytest.mark.timeout(30)
def test_every_operation_on_an_unreachable_store_raises_store_unavailable() -> None:
    with Store(StoreConfig(f"postgresql://u:{SECRET}@127.0.0.1:1/x")) as store:
        for call in (store.db_now, store.check_schema, store.queue_stats,
                     lambda: store.submit("default", {}), lambda: store.claim_steps("pod-a")):
            with pytest.raises(StoreUnavailable) as raised:
                call()
            assert SECRET not in one_line(raised.value)


@pytest.mark.timeout(30)
def test_a_password_given_as_a_query_parameter_is_never_shown() -> None:
    url = f"postgresql://u@127.0.0.1:1/x?password={SECRET}"  # libpq accepts this form
    with Store(StoreConfig(url)) as store, pytest.raises(StoreUnavailable) as raised:
        store.ping()

    assert SECRET not in full_text(raised.value)


@pytest.mark.timeout(30)
def test_a_url_with_the_host_in_the_query_reaches_the_store(pg_url: str) -> None:
    # libpq's form for Unix sockets (postgresql:///db?host=/run/postgresql): the
    # validator accepts it, so the store must be able to connect with it.
    # Everything of the URL the tests were given moves into the query, the
    # password too: the server may not trust local users.
    parts = urlsplit(pg_url)
    query = {"host": parts.hostname, "port": parts.port or 5432,
             "user": unquote(parts.username or ""), "password": unquote(parts.password or "")}
    url = f"postgresql://{parts.path}?{urlencode({k: v for k, v in query.items() if v})}"
    assert url.startswith("postgresql:///")

    with Store(StoreConfig(url, connect_timeout_s=3)) as store:
        store.ping()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "url",
    [
        f"mysql://u:{SECRET}@127.0.0.1:3306/x",
        f"http://u:{SECRET}@example.com/",
        "sqlite:///tmp/fleetsim.db",
        "not a url",
        "",
        f"postgresql://u:{SECRET}@/x",  # no host
        f"postgresql://u:{SECRET}@127.0.0.1:99999/x",  # bad port
        f"postgresql://u@/x?password={SECRET}",  # no host, password in the query
    ],
)
def test_a_url_that_is_not_postgres_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        StoreConfig(url)

    assert SECRET not in one_line(raised.value)


@pytest.mark.timeout(30)
def test_a_database_without_the_schema_is_a_schema_mismatch(pg_url: str) -> None:
    config = StoreConfig(pg_url, schema=f"t_missing_{uuid.uuid4().hex[:12]}")
    with Store(config) as store:
        with pytest.raises(SchemaMismatch) as raised:
            store.check_schema()
        assert "fleetsim init" in one_line(raised.value)
        with pytest.raises(SchemaMismatch):
            store.submit("default", {"n": 1})
        with pytest.raises(SchemaMismatch):
            store.claim_steps("pod-a")


@pytest.mark.timeout(30)
def test_another_schema_version_is_a_schema_mismatch(
    store: Store, store_config: StoreConfig
) -> None:
    assert store.check_schema() == SCHEMA_VERSION
    sql(store_config, "INSERT INTO fleetsim_schema (version) VALUES (%(v)s)",
        {"v": SCHEMA_VERSION + 98})

    with pytest.raises(SchemaMismatch) as raised:
        store.check_schema()

    message = one_line(raised.value)
    assert str(SCHEMA_VERSION + 98) in message and str(SCHEMA_VERSION) in message


@pytest.mark.timeout(60)
def test_init_schema_is_idempotent_and_safe_to_run_concurrently(pg_url: str) -> None:
    config = StoreConfig(pg_url, schema=f"t_init_{uuid.uuid4().hex[:12]}")
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def init() -> None:
        try:
            with Store(config) as own:
                own.ping()
                start.wait(20)
                own.init_schema()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    with Store(config) as store:
        try:
            threads = [threading.Thread(target=init) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert errors == []
            store.init_schema()  # and once more, over a complete schema
            assert store.check_schema() == SCHEMA_VERSION
        finally:
            store.drop_schema()


@pytest.mark.timeout(30)
def test_bad_arguments_are_config_errors_and_write_nothing(
    store: Store, store_config: StoreConfig
) -> None:
    store.register_pod("pod-a")
    bad_calls = [
        lambda: store.claim_steps("pod-a", batch=0),
        lambda: store.submit("default", {}, max_attempts=0),
        lambda: store.submit("", {}),
        lambda: store.submit("default", {}, priority=2**31),
        lambda: store.submit_many([StepSpec(), StepSpec(payload=[1, 2])]),  # type: ignore[arg-type]
        lambda: store.configure_queue(QueueConfig("q", concurrency_limit=0)),
        lambda: store.configure_queue(QueueConfig("q", max_length=0)),
        lambda: StoreConfig(store_config.url, schema="Bad-Name"),
        lambda: StoreConfig(store_config.url, connect_timeout_s=0),
    ]
    for call in bad_calls:
        with pytest.raises(ConfigError) as raised:
            call()
        one_line(raised.value)

    assert sql(store_config, "SELECT count(*) FROM steps") == [(0,)]
    assert sql(store_config, "SELECT count(*) FROM queues") == [(0,)]


@pytest.mark.timeout(30)
def test_analyze_refreshes_statistics(store) -> None:  # type: ignore[no-untyped-def]
    from fleetsim.store import StepSpec

    store.submit_many([StepSpec()] * 50)
    store.analyze()
    assert sql_rows_estimate(store) > 0


def sql_rows_estimate(store) -> int:  # type: ignore[no-untyped-def]
    return int(store._rows("SELECT reltuples FROM pg_class WHERE relname = 'steps'"
                           " AND relnamespace = to_regnamespace(current_schema())")[0][0])


@pytest.mark.timeout(30)
def test_a_terminated_backend_is_store_unavailable_then_recovers(store_config) -> None:  # type: ignore[no-untyped-def]
    import psycopg2

    from fleetsim.errors import StoreUnavailable
    from fleetsim.store import Store, StoreConfig

    with Store(StoreConfig(store_config.url, schema=store_config.schema, pool_size=1)) as s:
        pid = s._rows("SELECT pg_backend_pid()")[0][0]
        admin = psycopg2.connect(store_config.url)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        admin.close()
        with pytest.raises(StoreUnavailable) as caught:
            s.status_counts()
        assert "\n" not in str(caught.value)
        assert s.status_counts()["queued"] == 0  # a fresh connection from the pool


@pytest.mark.timeout(30)
def test_a_missing_schema_is_schema_mismatch_on_any_operation(pg_url: str) -> None:
    from fleetsim.errors import SchemaMismatch
    from fleetsim.store import Store, StoreConfig

    with Store(StoreConfig(pg_url, schema="no_such_schema_here")) as s:
        with pytest.raises(SchemaMismatch, match="run `fleetsim init`"):
            s.status_counts()
        with pytest.raises(SchemaMismatch):
            s.claim_steps("pod-x")


def test_url_helpers_never_leak_and_know_sockets() -> None:
    from fleetsim.store.url import host_port, redact, with_host_port

    assert redact("postgresql://u:pw@[::1") == "<unparseable URL>"
    assert host_port("postgresql:///db?host=/run/postgresql") is None
    assert host_port("postgresql://u@db.example:6543/x") == ("db.example", 6543)
    moved = with_host_port("postgresql://u:pw@db:5432/x?sslmode=disable", "127.0.0.1", 40000)
    assert moved == "postgresql://u:pw@127.0.0.1:40000/x?sslmode=disable"


# The v1 attempt table: written at the claim, updated at the end.
_V1_STEP_ATTEMPTS = """
CREATE TABLE step_attempts (
    claim_token bigint PRIMARY KEY, step_id bigint NOT NULL, pod_id text NOT NULL,
    incarnation integer NOT NULL DEFAULT 0, claimed_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz, outcome text, rejected_at timestamptz);
CREATE INDEX step_attempts_step ON step_attempts (step_id)
"""


def migrate(store: Store) -> None:
    """An older store is refused until ``init`` brings it to this version."""
    with pytest.raises(SchemaMismatch):
        store.check_schema()
    store.init_schema()
    assert store.check_schema() == SCHEMA_VERSION


@pytest.mark.timeout(60)
def test_init_migrates_a_version_1_store_keeping_its_history(
    store: Store, store_config: StoreConfig
) -> None:
    store.register_pod("pod-a", incarnation=4)
    done, held = store.submit_many([StepSpec(payload={"n": 1}), StepSpec(payload={"n": 2})])
    # Turn this fresh store into a version-1 one holding one completed
    # attempt and one open claim (incarnation 4), as v1 recorded them.
    sql(store_config, """
        DROP VIEW step_attempts; DROP TABLE finished_attempts; DROP TABLE rejected_writes;
        ALTER TABLE steps DROP COLUMN claim_incarnation;
        DELETE FROM fleetsim_schema; INSERT INTO fleetsim_schema (version) VALUES (1);
    """ + _V1_STEP_ATTEMPTS + """;
        UPDATE steps SET status = 'completed', claimed_by = 'pod-a', claim_token = 1,
                         claimed_at = now(), finished_at = now() WHERE id = %(done)s;
        UPDATE steps SET status = 'claimed', claimed_by = 'pod-a', claim_token = 2,
                         claimed_at = now() WHERE id = %(held)s;
        INSERT INTO step_attempts (claim_token, step_id, pod_id, incarnation, finished_at,
                                   outcome, rejected_at)
        VALUES (1, %(done)s, 'pod-a', 4, now(), 'completed', NULL),
               (2, %(held)s, 'pod-a', 4, NULL, NULL, NULL),
               (3, %(done)s, 'pod-b', 0, now(), 'lease_lost', '2026-01-01Z');
        SELECT setval('claim_token_seq', 3);
    """, {"done": done, "held": held})
    migrate(store)
    attempts = sql(store_config, "SELECT claim_token, step_id, pod_id, incarnation, outcome,"
                   " rejected_at IS NOT NULL FROM step_attempts ORDER BY claim_token")
    assert [tuple(a) for a in attempts] == [
        (1, done, "pod-a", 4, "completed", False), (2, held, "pod-a", 4, None, False),
        (3, done, "pod-b", 0, "lease_lost", True)]
    # The migrated open claim is still fenced by its token and can finish.
    assert store.complete_many([(held, 2, None)]) == {held}
    outcomes = sql(store_config, "SELECT outcome FROM finished_attempts ORDER BY claim_token")
    assert [o[0] for o in outcomes] == ["completed", "completed", "lease_lost"]


@pytest.mark.timeout(60)
def test_init_migrates_a_version_2_store_keeping_refused_writes(
    store: Store, store_config: StoreConfig
) -> None:
    (step,) = store.submit_many([StepSpec(payload={"n": 1})])
    # Turn this fresh store into a version-2 one: finished_attempts indexed,
    # refused writes stamped on it, and a superseded attempt that was.
    sql(store_config, """
        DROP VIEW step_attempts; DROP TABLE rejected_writes;
        ALTER TABLE finished_attempts ADD PRIMARY KEY (claim_token),
                                      ADD COLUMN rejected_at timestamptz;
        CREATE INDEX finished_attempts_step ON finished_attempts (step_id);
        CREATE VIEW step_attempts AS
        SELECT claim_token, step_id, pod_id, incarnation, claimed_at, finished_at, outcome,
               rejected_at FROM finished_attempts;
        DELETE FROM fleetsim_schema; INSERT INTO fleetsim_schema (version) VALUES (2);
        INSERT INTO finished_attempts (claim_token, step_id, pod_id, claimed_at, finished_at,
                                       outcome, rejected_at)
        VALUES (1, %(step)s, 'pod-a', now(), now(), 'lease_lost', '2026-01-01Z'),
               (2, %(step)s, 'pod-b', now(), now(), 'released', NULL);
    """, {"step": step})
    migrate(store)
    attempts = sql(store_config, "SELECT claim_token, outcome, rejected_at"
                   " FROM step_attempts ORDER BY claim_token")
    assert [(a[0], a[1], a[2] is not None) for a in attempts] == [
        (1, "lease_lost", True), (2, "released", False)]
    assert attempts[0][2].year == 2026
    indexes = sql(store_config, "SELECT indexname FROM pg_indexes"
                  " WHERE tablename = 'finished_attempts' AND schemaname = current_schema()")
    assert indexes == []


@pytest.mark.timeout(30)
def test_no_index_on_steps_mentions_a_column_a_completion_writes(
    store: Store, store_config: StoreConfig
) -> None:
    """Completions are HOT updates only while no index (key or predicate) names
    the columns they change; see "A completion that touches no index" in schema.py.
    """
    definitions = [
        row[0]
        for row in sql(store_config, "SELECT pg_get_indexdef(indexrelid) FROM pg_index"
                                     " WHERE indrelid = 'steps'::regclass")
    ]
    assert any("steps_claimable" in d for d in definitions), definitions
    for definition in definitions:
        for column in ("status", "finished_at", "result"):
            assert not re.search(rf"\b{column}\b", definition), definition


class LoseReplies:
    """A reply hook: after ``skip`` more replies, lose the next ``count``."""

    def __init__(self) -> None:
        self.count = 0
        self.skip = 0

    def __call__(self) -> None:
        if self.skip > 0:
            self.skip -= 1
        elif self.count > 0:
            self.count -= 1
            raise InjectedFault("reply lost (test)", disconnect=True, took_effect=True)


def test_a_claim_whose_reply_is_lost_is_found_and_released_by_its_pod(
    store_config: StoreConfig,
) -> None:
    lose = LoseReplies()
    with Store(store_config) as store:
        store.add_reply_hook(lose)
        ids = store.submit_many([StepSpec(payload={"n": n}) for n in range(4)])
        store.register_pod("pod-1")
        store.register_pod("pod-2", incarnation=0)
        (other,) = store.claim_steps("pod-2", batch=1)

        lose.count = 1
        with pytest.raises(StoreUnavailable):
            store.claim_steps("pod-1", batch=2)
        # The claim took effect: pod-1 holds two steps it never saw.
        held = [r[0] for r in sql(store_config, "SELECT id FROM steps WHERE claimed_by = 'pod-1'"
                                                " AND status = 'claimed' ORDER BY id")]
        assert held == ids[1:3]

        assert store.release_claims_of("pod-1", 0) == held
        assert store.release_claims_of("pod-1", 0) == []
        # Back in the queue without spending an attempt; pod-2's claim untouched.
        assert [store.get_step(i).status for i in ids] == ["claimed", "queued", "queued", "queued"]
        assert [store.get_step(i).attempts for i in ids] == [0, 0, 0, 0]
        assert other.id == ids[0]
        assert sql(store_config, "SELECT step_id, outcome FROM step_attempts"
                                 " WHERE pod_id = 'pod-1' ORDER BY step_id") == [
            (held[0], "released"), (held[1], "released")]


def test_a_write_whose_reply_is_lost_took_effect_and_its_retry_changes_nothing(
    store_config: StoreConfig,
) -> None:
    lose = LoseReplies()
    with Store(store_config) as store:
        store.add_reply_hook(lose)
        first, second, third = store.submit_many([StepSpec(payload={}) for _ in range(3)])
        store.register_pod("pod-1")
        claimed = {s.id: s for s in store.claim_steps("pod-1", batch=2)}

        lose.count = 1
        with pytest.raises(StoreUnavailable):
            store.complete(first, claimed[first].claim_token, {"ok": 1})
        assert store.complete(first, claimed[first].claim_token, {"ok": 1}) == WriteOutcome.ACCEPTED
        assert sql(store_config, "SELECT count(*) FROM step_attempts WHERE step_id = %(id)s"
                                 " AND outcome = 'completed'", {"id": first}) == [(1,)]

        lose.count = 1
        with pytest.raises(StoreUnavailable):
            store.release(second, claimed[second].claim_token)
        assert store.get_step(second).status == "queued"

        # A single statement outside the hot path (cancel) loses its reply too.
        lose.count = 1
        with pytest.raises(StoreUnavailable):
            store.cancel(third)
        assert store.get_step(third).status == "cancelled"


def test_a_transaction_whose_reply_is_lost_committed(store_config: StoreConfig) -> None:
    lose = LoseReplies()
    with Store(store_config) as store:
        store.add_reply_hook(lose)
        lose.count = 1
        # configure_queue is one transaction: its only reply hook runs after COMMIT.
        with pytest.raises(StoreUnavailable):
            store.configure_queue(QueueConfig("slow", concurrency_limit=1))
        assert store.queues()["slow"].concurrency_limit == 1


@pytest.mark.timeout(60)
def test_init_schema_on_a_current_store_waits_for_no_live_transaction(
    store: Store, store_config: StoreConfig
) -> None:
    """`up` beside a live fleet (a restarted coordinator, pods joined from
    elsewhere) runs ``init_schema`` while pods hold their usual locks: a
    claim's ROW EXCLUSIVE on ``steps``, a status read's ACCESS SHARE on the
    views. On a store already at this version it must not queue behind them:
    its DDL did (CREATE INDEX takes SHARE on ``steps``, CREATE OR REPLACE VIEW
    ACCESS EXCLUSIVE), and a pod that then needed a lock it held deadlocked
    (`up` failed with "deadlock detected" in CI)."""
    pod = _connect(store_config)
    pod.autocommit = False
    finished = threading.Event()
    errors: list[BaseException] = []

    def init() -> None:
        try:
            store.init_schema()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finished.set()

    try:
        with pod.cursor() as cur:  # a transaction left open, as a pod's is mid-claim
            cur.execute("LOCK TABLE steps IN ROW EXCLUSIVE MODE")
            cur.execute("LOCK TABLE queue_stats, step_attempts IN ACCESS SHARE MODE")
        worker = threading.Thread(target=init, daemon=True)
        worker.start()
        assert finished.wait(10), "init_schema waited for a pod's open transaction"
        assert errors == []
    finally:
        pod.rollback()  # lets a blocked init_schema finish before the schema is dropped
        pod.close()
        finished.wait(20)
    assert store.check_schema() == SCHEMA_VERSION


@pytest.mark.timeout(60)
def test_init_schema_still_repairs_a_current_store_missing_an_object(
    store: Store, store_config: StoreConfig
) -> None:
    """Skipping DDL on a current store must not skip a store that lacks part
    of it: each relation and column DDL creates, dropped, comes back."""
    from fleetsim.store.schema import CURRENT_COLUMNS, CURRENT_RELATIONS

    assert "steps_claimable" in CURRENT_RELATIONS and "queue_stats" in CURRENT_RELATIONS
    assert "steps.timeout_s" in CURRENT_COLUMNS
    for drop, present in [
        ("DROP INDEX steps_claimable", "SELECT to_regclass('steps_claimable')"),
        ("DROP VIEW queue_stats", "SELECT to_regclass('queue_stats')"),
        ("DROP TABLE pod_exits", "SELECT to_regclass('pod_exits')"),
    ]:
        sql(store_config, drop)
        assert sql(store_config, present) == [(None,)]
        store.init_schema()
        assert sql(store_config, present) != [(None,)], drop
