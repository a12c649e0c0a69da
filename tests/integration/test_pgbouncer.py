"""fleetsim through a real PgBouncer in transaction mode.

The test starts Debian's ``pgbouncer`` itself, on a free loopback port, in
front of the tests' PostgreSQL. In CI (``CI=true``) a missing pgbouncer is a
failure; elsewhere the tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from fleetsim.checker import check
from fleetsim.errors import ConfigError, StoreUnavailable
from fleetsim.store import StepSpec, Store, StoreConfig
from fleetsim.store.url import host_port
from tests.helpers import running_fleet, wait_until


def _pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None)
    if found is None:
        reason = "pgbouncer is not installed (apt-get install -y pgbouncer)"
        # A pooler is a host tool: an environment that says it has none (the
        # image of docker-compose.yml's tests service; the host run of .ci/run
        # installs it and runs these tests) skips them even in CI.
        provided = os.environ.get("FLEETSIM_TEST_PGBOUNCER", "required") != "absent"
        if provided and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}: CI must run the PgBouncer tests")
        pytest.skip(reason)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pgbouncer(pg_url: str) -> Iterator[str]:
    """The tests' PostgreSQL URL, but through a PgBouncer in transaction mode."""
    binary = _pgbouncer_binary()
    target = host_port(pg_url)
    if target is None:
        pytest.skip("the tests' PostgreSQL listens on a unix socket only")
    parts = urlsplit(pg_url)
    user = parts.username or "postgres"
    base = Path(tempfile.mkdtemp(prefix="fleetsim-pgbouncer-"))
    os.chmod(base, 0o755)  # pgbouncer refuses to run as root: it drops to nobody
    port = _free_port()
    (base / "userlist.txt").write_text(f'"{user}" ""\n')
    (base / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={target[0]} port={target[1]}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {base / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        "max_client_conn = 500\ndefault_pool_size = 20\n"
        "server_reset_query =\n"
    )
    for name in ("userlist.txt", "pgbouncer.ini"):
        os.chmod(base / name, 0o644)
    command = [binary]
    if os.geteuid() == 0:
        command += ["-u", "nobody"]
    log = (base / "pgbouncer.log").open("wb")
    proc = subprocess.Popen([*command, str(base / "pgbouncer.ini")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("pgbouncer did not start: "
                                + (base / "pgbouncer.log").read_text()[-2000:])
                time.sleep(0.05)
        netloc = f"{parts.netloc.rsplit('@', 1)[0]}@" if "@" in parts.netloc else ""
        yield f"{parts.scheme}://{netloc}127.0.0.1:{port}{parts.path}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(60)
def test_undeclared_pooler_gets_a_one_line_error_naming_the_fix(
    pgbouncer: str, store_config: StoreConfig
) -> None:
    store = Store(StoreConfig(pgbouncer, schema=store_config.schema, connect_timeout_s=3))
    try:
        with pytest.raises(StoreUnavailable) as caught:
            store.ping()
    finally:
        store.close()
    message = str(caught.value)
    assert "\n" not in message
    assert "?pooler=transaction" in message


@pytest.mark.timeout(60)
def test_store_operations_through_transaction_pooling(
    pgbouncer: str, store_config: StoreConfig
) -> None:
    url = pgbouncer + "?pooler=transaction"
    config = StoreConfig(url, schema=store_config.schema)
    assert config.pooler == "transaction"
    # More threads than PgBouncer's server connections are shared between:
    # every statement must find its schema and no prepared statement.
    with Store(config) as store:
        store.ping()
        ids = store.submit_many(
            [StepSpec("default", {"i": i}) for i in range(1500)])  # the COPY path
        assert len(ids) == 1500
        store.register_pod("p1")
        store.register_pod("p2")
        done = 0
        for _ in range(40):
            for pod in ("p1", "p2"):
                claimed = store.claim_steps(pod, batch=50)
                done += len(store.complete_many((c.id, c.claim_token, {"i": c.id})
                                                for c in claimed))
            store.heartbeat("p1")
            store.heartbeat("p2")
        assert done == 1500
        report = check(store, final=True)
        assert report.valid, report.violations


def test_pooler_url_parameter() -> None:
    config = StoreConfig("postgresql://u@h:6432/db?pooler=transaction&sslmode=disable")
    assert config.pooler == "transaction"
    assert StoreConfig("postgresql://u@h/db").pooler is None
    with pytest.raises(ConfigError, match="pooler=statement"):
        StoreConfig("postgresql://u@h/db?pooler=statement")
    with pytest.raises(ConfigError, match="pooler"):
        StoreConfig("postgresql://u@h/db?pooler=bogus")


@pytest.mark.timeout(180)
def test_a_fleet_through_pgbouncer_is_valid(
    pgbouncer: str, store_config: StoreConfig, tmp_path: Path
) -> None:
    pooled = StoreConfig(pgbouncer + "?pooler=transaction", schema=store_config.schema)
    with Store(store_config) as direct, running_fleet(pooled, tmp_path / "run", pods=2,
                                                      workload="fail:0.2", batch=5):
        # Sleeping steps keep both pods busy; the others fail a fifth of their attempts.
        direct.submit_many([StepSpec("default", {"i": i, "workload": "sleep:20"} if i % 3 == 0
                                     else {"i": i}) for i in range(300)])
        wait_until(lambda: direct.status_counts()["completed"]
                   + direct.status_counts()["dead"] == 300, 90, what="300 steps finished")
        pods = direct.pods()
        assert len(pods) == 2 and all(p["completed"] > 0 for p in pods), pods
        assert direct.current_leader() is not None
    # The checker through the pooler too (a read-only REPEATABLE READ snapshot),
    # and writes after it: nothing of its session may stay on a server connection.
    with Store(pooled) as store:
        report = check(store, final=True)
        assert report.valid, report.violations
        assert report.counts["by_status"]["dead"] > 0  # fail:0.2 with 3 attempts
        for i in range(30):
            store.submit(payload={"after": i})
    with Store(store_config) as direct:
        assert direct.status_counts()["queued"] == 30


@pytest.mark.timeout(60)
def test_session_settings_hold_per_transaction_and_do_not_leak(
    pgbouncer: str, store_config: StoreConfig
) -> None:
    from fleetsim.errors import StoreError
    from fleetsim.store.checks import _snapshot

    url = pgbouncer + "?pooler=transaction"
    quick = StoreConfig(url, schema=store_config.schema, statement_timeout_s=0.3)
    with Store(quick) as store, Store(StoreConfig(url)) as plain:
        with pytest.raises(StoreError, match="statement timeout"):
            store._rows("SELECT pg_sleep(2)")
        assert store._rows("SELECT current_schema()")[0][0] == store_config.schema
        # The checker's snapshot raises its own timeout after the prefix's.
        with _snapshot(store) as conn:
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "10min"
            assert conn.exec_driver_sql("SHOW transaction_read_only").scalar() == "on"
        # A client without a schema, sharing the pooler's server connections,
        # sees none of it: SET LOCAL ended with each transaction.
        for _ in range(20):
            row = plain._rows("SELECT current_schema(), current_setting('statement_timeout'),"
                              " current_setting('transaction_read_only')")[0]
            assert tuple(row) == ("public", "30s", "off")


@pytest.mark.timeout(60)
def test_the_pooled_mode_straight_to_postgresql(store_config: StoreConfig) -> None:
    """The pooled code path needs no pooler to run: it is tested without one too."""
    pooled = StoreConfig(store_config.url + "?pooler=transaction", schema=store_config.schema)
    with Store(pooled) as store:
        assert store._rows("SHOW statement_timeout")[0][0] == "30s"
        store.submit_many([StepSpec("default", {"i": i}) for i in range(20)])
        store.register_pod("p1")
        claimed = store.claim_steps("p1", batch=20)
        store.fail(claimed[0].id, claimed[0].claim_token, "once")
        store.release_many([(claimed[1].id, claimed[1].claim_token)])
        assert len(store.complete_many((c.id, c.claim_token, None) for c in claimed[2:])) == 18
        assert store.heartbeat("p1").alive
        lease = store.acquire_leadership("p1", 5)
        assert lease is not None
        store.recover("p1", lease.term, 3.0)

        def drained() -> bool:
            for c in store.claim_steps("p1", batch=5):  # the failed one, after its backoff
                store.complete(c.id, c.claim_token)
            return store.status_counts()["completed"] == 20

        wait_until(drained, 10, what="all completed")
        report = check(store, final=True)
        assert report.valid, report.violations


@pytest.mark.timeout(60)
def test_cli_through_an_undeclared_pooler_says_what_to_change(
    pgbouncer: str, store_config: StoreConfig, tmp_path: Path
) -> None:
    import sys

    env = {**os.environ, "FLEETSIM_STORE": pgbouncer,
           "FLEETSIM_SCHEMA": store_config.schema or ""}
    run = subprocess.run([sys.executable, "-m", "fleetsim", "--run-dir", str(tmp_path), "status"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert run.returncode == 3, run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "add ?pooler=transaction to the store URL" in run.stderr
    declared = subprocess.run(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(tmp_path), "status", "--json"],
        capture_output=True, text=True, timeout=30,
        env={**env, "FLEETSIM_STORE": pgbouncer + "?pooler=transaction"})
    assert declared.returncode == 0, declared.stderr


@pytest.mark.timeout(10)
def test_a_missing_pgbouncer_fails_in_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run"):
        _pgbouncer_binary()
    monkeypatch.setenv("FLEETSIM_TEST_PGBOUNCER", "absent")
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y pgbouncer"):
        _pgbouncer_binary()
    monkeypatch.delenv("FLEETSIM_TEST_PGBOUNCER")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y pgbouncer"):
        _pgbouncer_binary()
