"""Tests for chaos.proxy: real sockets, a local echo server and real PostgreSQL.

Nothing here sleeps to synchronise: conditions are polled with a deadline,
and hangs are observed through socket timeouts.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from chaos.proxy import FaultProxyServer, ProxyFault, ProxyMode
from fleetsim.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

#: How long a "hang" must last before we call it one.
HANG = 0.5


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll *condition* until it holds; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.005)


class EchoServer:
    """A threaded TCP server: echoes, or answers once and closes / resets."""

    def __init__(self, mode: str = "echo") -> None:
        self.mode = mode
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # so the accept loop notices close()
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._connections.add(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
                if self.mode == "close":
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(65536):
                        pass
                    return
                if self.mode == "rst":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    return
        except OSError:
            pass
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def close(self) -> None:
        self._stopping.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxies() -> Iterator[FaultProxyServer]:
    server = FaultProxyServer(call_timeout=10)
    yield server
    server.close()


@pytest.fixture
def port(proxies: FaultProxyServer, echo: EchoServer) -> int:
    return proxies.add("pod-1", "127.0.0.1", echo.port)


@contextlib.contextmanager
def connect(port: int, timeout: float = 5.0) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    received = 0
    while received < size:
        chunk = sock.recv(min(65536, size - received))
        if not chunk:
            raise EOFError(f"EOF after {received} of {size} bytes")
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


def round_trip(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def assert_reset(sock: socket.socket) -> None:
    """The connection was reset: recv raises a reset, or sees EOF."""
    sock.settimeout(5)
    try:
        data = sock.recv(1024)
    except (ConnectionResetError, BrokenPipeError):
        return
    assert data == b"", f"expected a reset, got {data!r}"


def assert_new_connection_reset(port: int, payload: bytes = b"") -> None:
    """A new connection is reset: already during connect, or right after."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except ConnectionResetError:
        return  # the proxy was quicker than our connect() call
    try:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(payload)
        assert_reset(sock)
    finally:
        sock.close()


def assert_hangs(sock: socket.socket) -> None:
    sock.settimeout(HANG)
    with pytest.raises(TimeoutError):
        sock.recv(1024)


# -- pass ------------------------------------------------------------------


def test_pass_forwards_both_ways_and_counts(proxies: FaultProxyServer, port: int) -> None:
    with connect(port) as sock:
        assert round_trip(sock, b"hello") == b"hello"
        assert round_trip(sock, b"x" * 1000) == b"x" * 1000
        stats = proxies.stats("pod-1")
        assert stats.fault.mode is ProxyMode.PASS
        assert stats.connections_accepted == 1
        assert stats.connections_active == 1
        assert stats.bytes_to_upstream == 1005
        assert stats.bytes_to_client == 1005
        assert stats.port == port
    wait_until(lambda: proxies.stats("pod-1").connections_active == 0, what="connection gone")
    stats = proxies.stats("pod-1")
    assert (stats.connections_reset, stats.errors, stats.bytes_dropped) == (0, 0, 0)


def test_pass_large_transfer_is_intact(port: int) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    with connect(port, timeout=30) as sock:
        # Send from a thread while reading here, or both socket buffers fill.
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = recv_exactly(sock, len(payload))
        sender.join(30)
    assert echoed == payload


def test_half_close_is_forwarded(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, 10) == b"last words"
        # The echo server sees our EOF through the proxy and closes in turn.
        assert sock.recv(1024) == b""


def test_upstream_closing_mid_stream(proxies: FaultProxyServer) -> None:
    server = EchoServer(mode="close")
    try:
        port = proxies.add("closer", "127.0.0.1", server.port)
        with connect(port) as sock:
            assert round_trip(sock, b"once") == b"once"
            assert sock.recv(1024) == b""
        wait_until(lambda: proxies.stats("closer").connections_active == 0)
        assert proxies.stats("closer").errors == 0
    finally:
        server.close()


def test_upstream_reset_is_passed_on(proxies: FaultProxyServer) -> None:
    server = EchoServer(mode="rst")
    try:
        port = proxies.add("rst", "127.0.0.1", server.port)
        with connect(port) as sock:
            sock.sendall(b"boom")
            # The echo may or may not arrive before the reset does.
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(1024):
                    pass
        wait_until(lambda: proxies.stats("rst").connections_active == 0)
        assert proxies.stats("rst").errors == 0
    finally:
        server.close()


def test_client_closing_mid_stream(proxies: FaultProxyServer, port: int) -> None:
    for _ in range(20):
        with connect(port) as sock:
            sock.sendall(os.urandom(256 * 1024))
            # Close with unread echoes pending: the kernel sends a RST.
    wait_until(lambda: proxies.stats("pod-1").connections_active == 0, what="all closed")
    assert proxies.stats("pod-1").errors == 0
    with connect(port) as sock:
        assert round_trip(sock) == b"ping"


def test_upstream_refusing_connections_closes_the_client(proxies: FaultProxyServer) -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]
    port = proxies.add("nowhere", "127.0.0.1", dead_port)
    for _ in range(3):
        assert_new_connection_reset(port, b"anyone?")
    wait_until(lambda: proxies.stats("nowhere").upstream_failures == 3)
    stats = proxies.stats("nowhere")
    assert stats.errors == 0
    assert stats.connections_reset == 3


def test_thousands_of_short_connections(
    proxies: FaultProxyServer, port: int, echo: EchoServer
) -> None:
    count = 0

    def client(n: int) -> None:
        nonlocal count
        for _ in range(n):
            with connect(port) as sock:
                assert round_trip(sock) == b"ping"
            with lock:
                count += 1

    lock = threading.Lock()
    threads = [threading.Thread(target=client, args=(250,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert count == 2000
    wait_until(lambda: proxies.stats("pod-1").connections_active == 0, what="all closed")
    stats = proxies.stats("pod-1")
    assert stats.connections_accepted == 2000
    assert stats.errors == 0
    assert stats.bytes_to_client == 2000 * 4
    assert echo.accepted == 2000


# -- blackhole ---------------------------------------------------------------


def test_blackhole_hangs_existing_and_new_connections(
    proxies: FaultProxyServer, port: int, echo: EchoServer
) -> None:
    with connect(port) as before:
        assert round_trip(before) == b"ping"
        proxies.set_fault("pod-1", ProxyFault.blackhole())

        before.sendall(b"lost")
        assert_hangs(before)

        with connect(port) as during:  # the connect itself succeeds
            during.sendall(b"hello?")
            assert_hangs(during)
            # Not forwarded: the upstream never saw the new connection.
            assert echo.accepted == 1
            wait_until(lambda: proxies.stats("pod-1").bytes_dropped >= 10, what="drops")

            proxies.heal("pod-1")
            # Connections that lived through the blackhole are reset, not resumed.
            assert_reset(before)
            assert_reset(during)

    with connect(port) as after:
        assert round_trip(after) == b"ping"
    stats = proxies.stats("pod-1")
    assert stats.connections_reset == 2
    assert stats.fault == ProxyFault()


def test_blackhole_drops_data_already_delayed(proxies: FaultProxyServer, port: int) -> None:
    proxies.set_fault("pod-1", ProxyFault(latency_ms=300))
    with connect(port) as sock:
        sock.sendall(b"in flight")
        # Still on its way through the latency queue when the partition starts.
        proxies.set_fault("pod-1", ProxyFault.blackhole())
        assert_hangs(sock)


def test_client_closing_during_blackhole_is_hidden_until_heal(
    proxies: FaultProxyServer, port: int, echo: EchoServer
) -> None:
    with connect(port) as sock:
        assert round_trip(sock) == b"ping"
        proxies.set_fault("pod-1", ProxyFault.blackhole())
    # A FIN cannot cross a partition: the upstream side stays open...
    assert proxies.stats("pod-1").connections_active == 1
    proxies.heal()
    # ...until the heal resets it.
    wait_until(lambda: proxies.stats("pod-1").connections_active == 0)
    assert proxies.stats("pod-1").errors == 0


# -- reset -------------------------------------------------------------------


def test_reset_kills_existing_and_new_connections(proxies: FaultProxyServer, port: int) -> None:
    with connect(port) as before:
        assert round_trip(before) == b"ping"
        proxies.set_fault("pod-1", ProxyFault.reset())
        assert_reset(before)
    for _ in range(3):
        assert_new_connection_reset(port)
    proxies.heal("pod-1")
    with connect(port) as after:
        assert round_trip(after) == b"ping"
    wait_until(lambda: proxies.stats("pod-1").connections_reset == 4)


# -- degradations ------------------------------------------------------------


def test_latency_is_added_each_way(proxies: FaultProxyServer, port: int) -> None:
    proxies.set_fault("pod-1", ProxyFault(latency_ms=150))
    with connect(port) as sock:
        started = time.monotonic()
        assert round_trip(sock) == b"ping"
        elapsed = time.monotonic() - started
    assert elapsed >= 2 * 0.150 - 0.005  # once up, once down (timer slack)


def test_jitter_keeps_byte_order(proxies: FaultProxyServer, port: int) -> None:
    proxies.set_fault("pod-1", ProxyFault(latency_ms=5, jitter_ms=5))
    messages = [f"<{i:04d}>".encode() for i in range(300)]
    with connect(port) as sock:
        for message in messages:
            sock.sendall(message)  # separate small writes: separate chunks
        echoed = recv_exactly(sock, sum(map(len, messages)))
    assert echoed == b"".join(messages)


def test_bandwidth_limit(proxies: FaultProxyServer, port: int) -> None:
    proxies.set_fault("pod-1", ProxyFault(bandwidth_kbps=400))  # 50 000 bytes/s
    payload = os.urandom(50_000)
    with connect(port, timeout=30) as sock:
        started = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        echoed = recv_exactly(sock, len(payload))
        elapsed = time.monotonic() - started
        sender.join(30)
    assert echoed == payload
    # Each direction sends in ~50 ms slices and pays for a slice after
    # sending it, so the last byte cannot leave before 0.95 s.
    assert elapsed >= 0.9


def test_heal_clears_degradation(proxies: FaultProxyServer, port: int) -> None:
    proxies.set_fault("pod-1", ProxyFault(latency_ms=100, bandwidth_kbps=100))
    with connect(port) as sock:
        assert round_trip(sock) == b"ping"
        proxies.heal("pod-1")
        assert proxies.fault("pod-1") == ProxyFault()
        # A degraded (not blackholed) connection survives the heal.
        assert round_trip(sock) == b"ping"
    assert proxies.stats("pod-1").connections_reset == 0


# -- the fault record ----------------------------------------------------------


def test_fault_values() -> None:
    assert ProxyFault() == ProxyFault.passthrough()
    assert ProxyFault(mode="blackhole") == ProxyFault.blackhole()  # type: ignore[arg-type]
    assert ProxyFault.reset().mode is ProxyMode.RESET
    assert not ProxyFault().degraded
    assert ProxyFault(jitter_ms=1).degraded
    assert str(ProxyFault(latency_ms=50, jitter_ms=10)) == "pass latency=50ms±10ms"
    assert str(ProxyFault(bandwidth_kbps=64)) == "pass bandwidth=64kbps"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "flaky"}, "invalid proxy mode 'flaky'"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"jitter_ms": float("nan")}, "jitter_ms"),
        ({"bandwidth_kbps": float("inf")}, "bandwidth_kbps"),
        ({"latency_ms": "5"}, "expected a number"),
        ({"mode": "blackhole", "latency_ms": 5}, "cannot be combined"),
        ({"mode": "reset", "bandwidth_kbps": 5}, "cannot be combined"),
    ],
)
def test_fault_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ProxyFault(**kwargs)


# -- the threaded server ---------------------------------------------------------


def test_server_manages_named_proxies(proxies: FaultProxyServer, echo: EchoServer) -> None:
    port_a = proxies.add("a", "127.0.0.1", echo.port)
    port_b = proxies.add("b", "127.0.0.1", echo.port, fault=ProxyFault.blackhole(), seed=7)
    assert port_a != port_b
    assert proxies.names() == ["a", "b"]
    assert proxies.port("b") == port_b
    assert proxies.fault("b") == ProxyFault.blackhole()
    with pytest.raises(ValueError, match="already exists"):
        proxies.add("a", "127.0.0.1", echo.port)
    for call in (proxies.stats, proxies.remove, proxies.heal, proxies.port, proxies.fault):
        with pytest.raises(KeyError, match="no fault proxy named 'nope'"):
            call("nope")

    with connect(port_a) as sock_a, connect(port_b) as sock_b:
        assert round_trip(sock_a) == b"ping"
        assert_hangs(sock_b)
        proxies.heal()  # all of them
        assert_reset(sock_b)
        assert round_trip(sock_a) == b"ping"  # a was never faulted

        proxies.remove("a")
        assert_reset(sock_a)  # closed (EOF) by the removal
    assert proxies.names() == ["b"]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port_a), timeout=5).close()


def test_close_is_prompt_with_open_connections(echo: EchoServer) -> None:
    server = FaultProxyServer()
    port_pass = server.add("pass", "127.0.0.1", echo.port)
    port_slow = server.add("slow", "127.0.0.1", echo.port, fault=ProxyFault(latency_ms=10_000))
    port_hole = server.add("hole", "127.0.0.1", echo.port)
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect(p)) for p in (port_pass, port_slow, port_hole)]
        assert round_trip(socks[0]) == b"ping"
        socks[1].sendall(b"stuck in the latency queue")
        assert round_trip(socks[2]) == b"ping"
        server.set_fault("hole", ProxyFault.blackhole())
        socks[2].sendall(b"dropped")
        wait_until(lambda: server.stats("hole").bytes_dropped == 7)

        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 5
        assert not server.running
        for sock in socks:
            assert_reset(sock)  # closed: EOF or reset, never a hang
    server.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        server.stats("pass")


def test_close_from_context_manager(echo: EchoServer) -> None:
    with FaultProxyServer() as server:
        port = server.add("pod", "127.0.0.1", echo.port)
        with connect(port) as sock:
            assert round_trip(sock) == b"ping"
    assert not server.running


# -- real PostgreSQL ---------------------------------------------------------------

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reachable(url: str) -> str | None:
    """None if *url* accepts a connection, else why not."""
    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.OperationalError as error:
        return str(error).strip()
    return None


@pytest.fixture(scope="module")
def database_url(request: pytest.FixtureRequest) -> str:
    """A reachable PostgreSQL URL; skip (fail in CI) if there is none.

    ``FLEETSIM_TEST_DATABASE_URL`` if set, else the local default server,
    else the suite's shared ``pg_url`` fixture (an embedded server), so CI
    without a local server still runs these tests.
    """
    url = os.environ.get("FLEETSIM_TEST_DATABASE_URL")
    problem = _reachable(url or DEFAULT_DATABASE_URL)
    if problem is None:
        return url or DEFAULT_DATABASE_URL
    if url is None:
        try:
            shared: str = request.getfixturevalue("pg_url")
        except pytest.FixtureLookupError:
            pass
        else:
            if _reachable(shared) is None:
                return shared
    message = f"PostgreSQL at {url or DEFAULT_DATABASE_URL} unreachable: {problem}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def pg_proxy(proxies: FaultProxyServer, database_url: str) -> Callable[..., str]:
    """Start a proxy to the test database; return a DSN factory pointing through it."""
    params = psycopg2.extensions.parse_dsn(database_url)
    port = proxies.add("pg", params.get("host", "127.0.0.1"), int(params.get("port", "5432")))

    def dsn(**extra: Any) -> str:
        options = {"connect_timeout": 5, **extra}
        text: str = psycopg2.extensions.make_dsn(
            database_url, host="127.0.0.1", port=port, **options
        )
        return text

    return dsn


def wait_async(conn: Any, timeout: float) -> None:
    """Drive an async psycopg2 connection; TimeoutError at the client-side deadline."""
    deadline = time.monotonic() + timeout
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no answer within {timeout}s")
        if state == psycopg2.extensions.POLL_READ:
            select.select([conn.fileno()], [], [], remaining)
        elif state == psycopg2.extensions.POLL_WRITE:
            select.select([], [conn.fileno()], [], remaining)
        else:
            raise AssertionError(f"unexpected poll state {state}")


def backend_state(url: str, pid: int) -> tuple[str, str] | None:
    """The (state, last query) of backend *pid*, seen over a direct connection."""
    conn = psycopg2.connect(url, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT state, query FROM pg_stat_activity WHERE pid = %s", (pid,))
            row = cur.fetchone()
    finally:
        conn.close()
    return None if row is None else (row[0], row[1])


def test_postgres_through_the_proxy(
    proxies: FaultProxyServer, pg_proxy: Callable[..., str]
) -> None:
    conn = psycopg2.connect(pg_proxy())
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()
    stats = proxies.stats("pg")
    assert stats.bytes_to_upstream > 0
    assert stats.bytes_to_client > 0


def test_postgres_connect_times_out_in_blackhole(
    proxies: FaultProxyServer, pg_proxy: Callable[..., str]
) -> None:
    proxies.set_fault("pg", ProxyFault.blackhole())
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="timeout expired"):
        psycopg2.connect(pg_proxy(connect_timeout=1))
    assert time.monotonic() - started < 3.5
    proxies.heal("pg")
    psycopg2.connect(pg_proxy()).close()


def test_postgres_existing_connection_in_blackhole(
    proxies: FaultProxyServer, pg_proxy: Callable[..., str], database_url: str
) -> None:
    # Keepalives are set as a pod would set them, but they cannot detect this
    # partition: the proxy's kernel answers the probes. The client-side
    # deadline (the async poll below) is what notices.
    keepalive = {"keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1}
    conn = psycopg2.connect(pg_proxy(keepalives_count=2, **keepalive), async_=True)
    idle = psycopg2.connect(pg_proxy())
    try:
        wait_async(conn, 10)
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()")
        wait_async(conn, 10)
        row = cur.fetchone()
        assert row is not None
        pid = row[0]

        proxies.set_fault("pg", ProxyFault.blackhole())
        cur.execute("SELECT 'sent during the blackhole'")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            wait_async(conn, 1.5)
        assert time.monotonic() - started >= 1.5
        # The server never saw the query: its backend is idle after the last one.
        assert backend_state(database_url, pid) == ("idle", "SELECT pg_backend_pid()")

        proxies.heal("pg")
        # Healing resets connections that lived through the blackhole, so
        # the server ends that backend and an idle client learns on next use.
        wait_until(lambda: backend_state(database_url, pid) is None, what="backend ended")
        with pytest.raises(psycopg2.OperationalError), idle.cursor() as idle_cur:
            idle_cur.execute("SELECT 1")
    finally:
        conn.close()
        idle.close()
    fresh = psycopg2.connect(pg_proxy())
    try:
        with fresh.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        fresh.close()


def test_postgres_reset(proxies: FaultProxyServer, pg_proxy: Callable[..., str]) -> None:
    conn = psycopg2.connect(pg_proxy())
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        proxies.set_fault("pg", ProxyFault.reset())
        with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        conn.close()
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(pg_proxy())
    assert time.monotonic() - started < 3
    proxies.heal("pg")
    psycopg2.connect(pg_proxy()).close()
