"""`fleetsim queue set` run twice at once: neither change of a setting is lost.

The suspected bug (issue 10): `queue set` read every setting, changed the
given ones and wrote them all back, so of two concurrent commands changing
different settings, the later write undid the earlier one.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import psycopg2
import pytest

from fleetsim.errors import ConfigError
from fleetsim.store import StepSpec, Store, StoreConfig
from fleetsim.store.queue_settings import change_queue
from tests.helpers import wait_until


def fleetsim(run_dir: Path, *args: str, env: dict[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start(run_dir: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env},
    )


@pytest.fixture
def cli_env(store_config: StoreConfig) -> dict[str, str]:
    return {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": store_config.schema or ""}


def waiting_on_a_lock(config: StoreConfig) -> int:
    """How many CLI sessions wait on a lock while holding one on this test's queues table.

    The table's oid is this schema's own: sessions of other tests on the same
    server (CLI sessions share the application name) are not counted.
    """
    conn = psycopg2.connect(config.url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(DISTINCT a.pid) FROM pg_stat_activity a"
                "  JOIN pg_locks l ON l.pid = a.pid"
                " WHERE a.application_name = 'fleetsim-cli' AND a.wait_event_type = 'Lock'"
                "   AND l.relation = to_regclass(%s)",
                (f"{config.schema}.queues",),
            )
            return int(cur.fetchone()[0])
    finally:
        conn.close()


@pytest.mark.timeout(90)
def test_concurrent_queue_set_of_different_settings_loses_neither(
    tmp_path: Path, store: Store, store_config: StoreConfig, cli_env: dict[str, str]
) -> None:
    first = fleetsim(tmp_path / "run", "queue", "set", "orders", env=cli_env)
    assert first.returncode == 0, first.stderr
    # Hold the queue's row so that both commands are in flight at once (each
    # has started its change and waits); then let them go together.
    holder = psycopg2.connect(store_config.url,
                              options=f"-c search_path={store_config.schema}")
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM queues WHERE name = 'orders' FOR UPDATE")
        limit = start(tmp_path / "run", "queue", "set", "orders", "--concurrency-limit", "4",
                      env=cli_env)
        pause = start(tmp_path / "run", "queue", "set", "orders", "--pause", env=cli_env)
        wait_until(lambda: waiting_on_a_lock(store_config) == 2, 30,
                   what="both queue set commands waiting on the queue's row")
    finally:
        holder.rollback()
        holder.close()
    for proc in (limit, pause):
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    settings = store.queues()["orders"]
    assert settings.concurrency_limit == 4 and settings.paused is True, settings


@pytest.mark.timeout(60)
def test_queue_set_of_a_limit_beyond_32_bits_is_one_line(tmp_path: Path, store: Store,
                                                         cli_env: dict[str, str]) -> None:
    result = fleetsim(tmp_path / "run", "queue", "set", "orders", "--max-length",
                      str(2**31), env=cli_env)
    assert result.returncode == 2  # a usage error: click names the option and its range
    assert "Traceback" not in result.stderr and "--max-length" in result.stderr
    assert "orders" not in store.queues()


# -- change_queue, the store function behind it -----------------------------------------


@pytest.mark.timeout(60)
def test_change_queue_writes_only_the_settings_given(store: Store) -> None:
    created = change_queue(store, "q", max_length=10)
    assert (created.concurrency_limit, created.max_length, created.strict_fifo,
            created.paused) == (None, 10, False, False)
    change_queue(store, "q", paused=True)
    change_queue(store, "q", strict_fifo=True, concurrency_limit=3)
    assert store.queues()["q"] == change_queue(store, "q")  # nothing given: nothing changes
    settings = change_queue(store, "q", max_length=None)
    assert (settings.concurrency_limit, settings.max_length, settings.strict_fifo,
            settings.paused) == (3, None, True, True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", [
    {"concurrency_limit": 0}, {"max_length": -1}, {"max_length": 2**31},
    {"concurrency_limit": True}, {"paused": "yes"},
])
def test_change_queue_refuses_bad_settings_before_the_database(
    store: Store, bad: dict[str, object]
) -> None:
    with pytest.raises(ConfigError):
        change_queue(store, "q", **bad)  # type: ignore[arg-type]
    assert "q" not in store.queues()


@pytest.mark.timeout(60)
def test_change_queue_flags_open_claims_when_a_limit_comes(store: Store,
                                                           store_config: StoreConfig) -> None:
    store.submit_many([StepSpec("busy", {"n": i}) for i in range(4)])
    store.register_pod("pod-1")
    assert len(store.claim_steps("pod-1", ["busy"], 2)) == 2
    change_queue(store, "busy", concurrency_limit=2)
    assert store.claim_steps("pod-1", ["busy"], 2) == []  # both open claims count
    with Store(store_config) as other:
        assert other.claim_steps("pod-1", ["busy"], 2) == []


@pytest.mark.timeout(60)
def test_concurrent_change_queue_calls_all_land(store: Store, store_config: StoreConfig) -> None:
    change_queue(store, "orders")
    holder = psycopg2.connect(store_config.url,
                              options=f"-c search_path={store_config.schema}")
    app = f"race-{store_config.schema}"
    changes: list[dict[str, object]] = [
        {"concurrency_limit": 4}, {"paused": True}, {"max_length": 9}, {"strict_fifo": True},
    ]
    errors: list[BaseException] = []

    def change(kwargs: dict[str, object]) -> None:
        try:
            with Store(dataclasses.replace(store_config, application_name=app)) as own:
                change_queue(own, "orders", **kwargs)  # type: ignore[arg-type]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=change, args=(c,)) for c in changes]
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM queues WHERE name = 'orders' FOR UPDATE")
        for thread in threads:
            thread.start()
        wait_until(lambda: waiting(store_config, app) == len(changes), 30,
                   what="every change waiting on the queue's row")
    finally:
        holder.rollback()
        holder.close()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    settings = store.queues()["orders"]
    assert (settings.concurrency_limit, settings.max_length, settings.strict_fifo,
            settings.paused) == (4, 9, True, True)


def waiting(config: StoreConfig, application_name: str) -> int:
    conn = psycopg2.connect(config.url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity"
                        " WHERE application_name = %s AND wait_event_type = 'Lock'",
                        (application_name,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()
