"""A TCP fault proxy between one pod and PostgreSQL, in the spirit of Toxiproxy.

Each pod reaches the store through its own :class:`FaultProxy`, so the chaos
harness can partition or degrade one pod's database traffic without touching
the others. The coordinator is synchronous code; it drives all proxies
through :class:`FaultProxyServer`, which runs one asyncio event loop in a
daemon thread and offers blocking, thread-safe methods::

    with FaultProxyServer() as proxies:
        port = proxies.add("pod-1", "127.0.0.1", 5432)   # pod connects here
        proxies.set_fault("pod-1", ProxyFault.blackhole())
        ...
        proxies.heal("pod-1")

Faults (:class:`ProxyFault`):

``pass``
    Forward bytes both ways, optionally degraded by ``latency_ms`` (plus or
    minus ``jitter_ms``, per chunk and direction, byte order preserved) and a
    ``bandwidth_kbps`` limit per direction.
``blackhole``
    A network partition: existing and new connections stay open but every
    byte in either direction is dropped, and so are closes (a FIN or RST
    would not cross a partition either). The client sees a hang and must
    notice through its own timeouts. TCP keepalives do *not* detect it: the
    proxy's kernel still answers them, so only application-level deadlines
    do. New connections are not forwarded at all; the server never sees
    them.
``reset``
    Every existing connection is closed abruptly with a TCP RST
    (``SO_LINGER`` 0) on both sides, and new connections are reset as soon
    as they are accepted.

Healing a blackhole resets the connections that lived through it. A real
partition loses packets and TCP retransmits them once the network is back;
this proxy works above TCP and cannot replay what it dropped, so resuming
would hand both ends a stream with a hole in it (for PostgreSQL, a protocol
desync that looks like corruption). Resetting makes clients reconnect
cleanly, which is also what they do after a partition long enough for TCP
to give up.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from fleetsim.errors import ConfigError

__all__ = ["FaultProxy", "FaultProxyServer", "ProxyFault", "ProxyMode", "ProxyStats"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Read size per chunk; latency applies per chunk, so this is also the unit
#: of delay (PostgreSQL messages are usually far smaller).
_CHUNK = 64 * 1024
#: Chunks in flight per direction while latency delays them; past this the
#: reader stops reading and TCP flow control pushes back on the sender.
_QUEUE_CHUNKS = 64
#: How long shutting down waits for sockets it aborted to be released.
_CLOSE_WAIT = 2.0
_LINGER_RST = struct.pack("ii", 1, 0)


class ProxyMode(enum.StrEnum):
    """What a proxy does with traffic (see the module docstring)."""

    PASS = "pass"
    BLACKHOLE = "blackhole"
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class ProxyFault:
    """The fault a proxy applies: a mode plus, in ``pass`` mode, degradations.

    ``latency_ms`` is added to every chunk in each direction, varied
    uniformly by up to ``jitter_ms`` either way (never below zero);
    ``bandwidth_kbps`` caps each direction at that many kilobits (1000 bits)
    per second, 0 meaning unlimited. ``mode`` also accepts its string value,
    so scenario files can say ``mode = "blackhole"``.
    """

    mode: ProxyMode = ProxyMode.PASS
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_kbps: float = 0.0

    def __post_init__(self) -> None:
        try:
            mode = ProxyMode(self.mode)
        except ValueError:
            choices = ", ".join(m.value for m in ProxyMode)
            raise ConfigError(f"invalid proxy mode {self.mode!r}: use {choices}") from None
        # Frozen: normalise a string mode in place the only way dataclasses allow.
        object.__setattr__(self, "mode", mode)
        for field in ("latency_ms", "jitter_ms", "bandwidth_kbps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"invalid proxy {field} {value!r}: expected a number")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"invalid proxy {field} {value!r}: must be finite and >= 0")
        if mode is not ProxyMode.PASS and self.degraded:
            raise ConfigError(
                f"proxy {mode.value} cannot be combined with latency, jitter or bandwidth "
                "(those degrade pass mode)"
            )

    @classmethod
    def passthrough(cls) -> ProxyFault:
        """No fault: forward everything untouched (the healed state)."""
        return cls()

    @classmethod
    def blackhole(cls) -> ProxyFault:
        """A partition: keep connections open, drop every byte."""
        return cls(mode=ProxyMode.BLACKHOLE)

    @classmethod
    def reset(cls) -> ProxyFault:
        """Reset existing connections and every new one."""
        return cls(mode=ProxyMode.RESET)

    @property
    def degraded(self) -> bool:
        """Whether latency, jitter or a bandwidth limit is set."""
        return bool(self.latency_ms or self.jitter_ms or self.bandwidth_kbps)

    def __str__(self) -> str:
        parts = [self.mode.value]
        if self.latency_ms or self.jitter_ms:
            parts.append(f"latency={self.latency_ms:g}ms±{self.jitter_ms:g}ms")
        if self.bandwidth_kbps:
            parts.append(f"bandwidth={self.bandwidth_kbps:g}kbps")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """A snapshot of one proxy's counters (cumulative since it started)."""

    name: str
    port: int
    upstream: str
    fault: ProxyFault
    connections_accepted: int
    connections_active: int
    #: Connections this proxy reset: by a ``reset`` fault, on healing a
    #: blackhole, after an upstream refusal, or to pass on a peer's reset.
    connections_reset: int
    #: Connections whose upstream could not be reached (refused, timeout).
    upstream_failures: int
    bytes_to_upstream: int
    bytes_to_client: int
    #: Bytes read and thrown away (blackhole).
    bytes_dropped: int
    #: Unexpected exceptions in connection handling (bugs; logged).
    errors: int


def _abort(writer: asyncio.StreamWriter, *, rst: bool) -> None:
    """Close *writer*'s socket now, with a TCP RST if *rst*."""
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # Linger 0 makes close() send RST instead of FIN: the abrupt
            # failure a crashed peer or a middlebox produces.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


async def _wait_closed(writers: list[asyncio.StreamWriter], timeout: float) -> None:
    """Wait until the sockets of *writers* are really closed, at most *timeout*."""

    async def one(writer: asyncio.StreamWriter) -> None:
        # A reset peer makes wait_closed raise; closed is closed.
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    if writers:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(one(w) for w in writers)), timeout)


class _Connection:
    """One client connection and (unless blackholed at accept) its upstream."""

    def __init__(
        self,
        proxy: FaultProxy,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
    ) -> None:
        self.proxy = proxy
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.upstream_reader: asyncio.StreamReader | None = None
        self.upstream_writer: asyncio.StreamWriter | None = None
        #: Set when a blackhole covered this connection; it drops all
        #: traffic from then on and is reset on heal.
        self.blackholed = False
        self.closed = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def writers(self) -> list[asyncio.StreamWriter]:
        """Both ends' writers (the upstream one once connected)."""
        if self.upstream_writer is None:
            return [self.client_writer]
        return [self.client_writer, self.upstream_writer]

    def reset(self) -> bool:
        """Abort both ends with RST; return False if already closed."""
        if self.closed:
            return False
        self.closed = True
        for writer in self.writers:
            _abort(writer, rst=True)
        for task in self._tasks:
            task.cancel()
        return True

    def abort(self) -> None:
        """Close both ends at once without a RST (shutdown, not a fault)."""
        if self.closed:
            return
        self.closed = True
        for writer in self.writers:
            _abort(writer, rst=False)
        for task in self._tasks:
            task.cancel()

    async def close(self) -> None:
        """Close both ends gracefully (flushing what is buffered) after a normal end."""
        if not self.closed:
            self.closed = True
            for writer in self.writers:
                writer.close()
        await _wait_closed(self.writers, _CLOSE_WAIT)
        # Whatever did not flush in time (a peer that stopped reading) goes.
        for writer in self.writers:
            writer.transport.abort()

    async def run(self) -> None:
        """Move bytes until both directions end, or abort on the first error."""
        client, upstream = self.client_reader, self.upstream_reader
        if upstream is None or self.upstream_writer is None:
            # Accepted during a blackhole: there is no upstream, only a
            # client whose bytes vanish.
            self._tasks = [asyncio.create_task(self._drop_all(client))]
        else:
            to_upstream: asyncio.Queue[tuple[float, bytes] | None]
            to_client: asyncio.Queue[tuple[float, bytes] | None]
            to_upstream = asyncio.Queue(_QUEUE_CHUNKS)
            to_client = asyncio.Queue(_QUEUE_CHUNKS)
            self._tasks = [
                asyncio.create_task(self._read_side(client, to_upstream)),
                asyncio.create_task(self._write_side(to_upstream, self.upstream_writer, True)),
                asyncio.create_task(self._read_side(upstream, to_client)),
                asyncio.create_task(self._write_side(to_client, self.client_writer, False)),
            ]
        if self.closed:  # reset while the tasks were being created
            for task in self._tasks:
                task.cancel()
        try:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            failure: BaseException | None = None
            for task in self._tasks:
                if failure is None and task.done() and not task.cancelled():
                    failure = task.exception()
            if failure is not None and not self.closed:
                # One side failed (usually a peer's RST): fail the other side
                # just as abruptly, as a real network path would.
                log.debug("proxy %s: connection failed: %r", self.proxy.name, failure)
                if self.reset():
                    self.proxy.connections_reset += 1
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _drop_all(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                self.proxy.bytes_dropped += len(data)

    async def _read_side(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes] | None]
    ) -> None:
        loop = asyncio.get_running_loop()
        last_due = 0.0
        while True:
            try:
                data = await reader.read(_CHUNK)
            except OSError:
                if self.blackholed:
                    return  # a reset cannot cross a partition either
                raise
            if not data:
                if not self.blackholed:
                    await queue.put(None)
                # Under a blackhole the close is lost like any packet; the
                # other end learns when the blackhole heals and resets it.
                return
            if self.blackholed:
                self.proxy.bytes_dropped += len(data)
                continue
            # Jitter must not reorder bytes: a chunk is never due before the
            # one read ahead of it.
            last_due = max(loop.time() + self.proxy.chunk_delay(), last_due)
            await queue.put((last_due, data))

    async def _write_side(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
        to_upstream: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        next_free = 0.0  # when the bandwidth limit allows the next byte out
        while True:
            item = await queue.get()
            if item is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            due, data = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            rate = self.proxy.fault.bandwidth_kbps * 125  # bytes per second
            # Pace in slices of ~50 ms so a large chunk trickles out evenly
            # rather than in one burst followed by a long silence.
            step = max(1, int(rate / 20)) if rate else len(data)
            for start in range(0, len(data), step):
                piece = data[start : start + step]
                if self.blackholed:  # in flight when the partition began
                    self.proxy.bytes_dropped += len(piece)
                    continue
                writer.write(piece)
                await writer.drain()
                if to_upstream:
                    self.proxy.bytes_to_upstream += len(piece)
                else:
                    self.proxy.bytes_to_client += len(piece)
                if rate:
                    # Pay for the bytes after sending them, so N bytes take at
                    # least N / rate seconds, the last slice included.
                    next_free = max(next_free, loop.time()) + len(piece) / rate
                    await asyncio.sleep(next_free - loop.time())


class FaultProxy:
    """A fault-injecting TCP proxy to one upstream; lives on one event loop.

    All methods must be called on the loop the proxy was started on; from
    other threads use :class:`FaultProxyServer`.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        name: str = "proxy",
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        connect_timeout: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.connect_timeout = connect_timeout
        self._rng = rng or random.Random()
        self._fault = ProxyFault()
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._upstream_was_down = False
        # Counters, only touched on the loop thread (so no lock).
        self.connections_accepted = 0
        self.connections_reset = 0
        self.upstream_failures = 0
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0
        self.bytes_dropped = 0
        self.errors = 0

    @property
    def port(self) -> int:
        """The port clients connect to (known once started)."""
        if self._port is None:
            raise RuntimeError(f"proxy {self.name} is not started")
        return self._port

    @property
    def fault(self) -> ProxyFault:
        """The fault currently applied."""
        return self._fault

    async def start(self) -> int:
        """Start listening and return the port (a free one if listen_port is 0)."""
        if self._server is not None:
            raise RuntimeError(f"proxy {self.name} is already started")
        # A large backlog: pods may reconnect in bursts after a reset.
        self._server = await asyncio.start_server(
            self._handle, self.listen_host, self.listen_port, backlog=1024
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "proxy %s: %s:%d -> %s:%d",
            self.name,
            self.listen_host,
            self._port,
            self.upstream_host,
            self.upstream_port,
        )
        return self._port

    async def set_fault(self, fault: ProxyFault) -> None:
        """Apply *fault* to existing and future connections.

        Returns once connections that the change resets are closed, so a
        caller can rely on the fault having taken effect.
        """
        previous, self._fault = self._fault, fault
        if fault != previous:
            log.info("proxy %s: %s -> %s", self.name, previous, fault)
        if fault.mode is ProxyMode.BLACKHOLE:
            for connection in self._connections:
                connection.blackholed = True
            return
        if fault.mode is ProxyMode.RESET:
            doomed = list(self._connections)
        else:
            doomed = [c for c in self._connections if c.blackholed]
        await self._reset(doomed)

    async def heal(self) -> None:
        """Return to plain pass mode (resetting connections a blackhole covered)."""
        await self.set_fault(ProxyFault())

    def chunk_delay(self) -> float:
        """The delay in seconds for the next chunk under the current fault."""
        fault = self._fault
        if not (fault.latency_ms or fault.jitter_ms):
            return 0.0
        jitter = self._rng.uniform(-fault.jitter_ms, fault.jitter_ms) if fault.jitter_ms else 0.0
        return max(0.0, fault.latency_ms + jitter) / 1000

    def stats(self) -> ProxyStats:
        """Return a snapshot of the counters."""
        return ProxyStats(
            name=self.name,
            port=self._port or 0,
            upstream=f"{self.upstream_host}:{self.upstream_port}",
            fault=self._fault,
            connections_accepted=self.connections_accepted,
            connections_active=len(self._connections),
            connections_reset=self.connections_reset,
            upstream_failures=self.upstream_failures,
            bytes_to_upstream=self.bytes_to_upstream,
            bytes_to_client=self.bytes_to_client,
            bytes_dropped=self.bytes_dropped,
            errors=self.errors,
        )

    async def close(self) -> None:
        """Stop listening and close every connection; idempotent."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.abort()
        handlers = list(self._handlers)
        for handler in handlers:
            handler.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=_CLOSE_WAIT)
        await _wait_closed([w for c in connections for w in c.writers], _CLOSE_WAIT)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), _CLOSE_WAIT)

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _reset(self, connections: list[_Connection]) -> None:
        reset = [c for c in connections if c.reset()]
        self.connections_reset += len(reset)
        await _wait_closed([w for c in reset for w in c.writers], _CLOSE_WAIT)

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        # Everything is caught here: an exception escaping a connection
        # handler would only be logged at garbage collection, and a bug in
        # one connection must never take the proxy down.
        connection = _Connection(self, client_reader, client_writer)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        self._connections.add(connection)
        self.connections_accepted += 1
        try:
            if self._closing:
                connection.abort()
            elif self._fault.mode is ProxyMode.RESET:
                await self._reset([connection])
            else:
                connection.blackholed = self._fault.mode is ProxyMode.BLACKHOLE
                if connection.blackholed or await self._connect_upstream(connection):
                    await connection.run()
        except asyncio.CancelledError:
            pass  # close() cancels handlers; nothing to clean up beyond finally
        except Exception:
            self.errors += 1
            log.exception("proxy %s: unexpected error in a connection", self.name)
            if connection.reset():
                self.connections_reset += 1
        finally:
            self._connections.discard(connection)
            if handler is not None:
                self._handlers.discard(handler)
            # Let the transports release their sockets before the task ends.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await connection.close()

    async def _connect_upstream(self, connection: _Connection) -> bool:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.upstream_host, self.upstream_port),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as error:
            self.upstream_failures += 1
            # Warn once per outage, not once per connection attempt.
            level = logging.DEBUG if self._upstream_was_down else logging.WARNING
            self._upstream_was_down = True
            log.log(
                level,
                "proxy %s: cannot reach upstream %s:%d: %r",
                self.name,
                self.upstream_host,
                self.upstream_port,
                error,
            )
            # Resetting the client is the nearest thing to passing on the
            # refusal: the client fails at once instead of waiting.
            if connection.reset():
                self.connections_reset += 1
            return False
        if self._upstream_was_down:
            log.info("proxy %s: upstream reachable again", self.name)
            self._upstream_was_down = False
        connection.upstream_reader, connection.upstream_writer = reader, writer
        if connection.closed:
            # Reset (fault or shutdown) while connecting: drop the new socket too.
            _abort(writer, rst=True)
            await _wait_closed([writer], _CLOSE_WAIT)
            return False
        return True


class FaultProxyServer:
    """Hosts any number of named :class:`FaultProxy` on a background event loop.

    Every method is blocking and thread-safe: it runs the work on the loop's
    daemon thread and waits at most ``call_timeout`` seconds for it.
    Usable as a context manager; :meth:`close` never hangs.
    """

    def __init__(self, *, call_timeout: float = 10.0, thread_name: str = "fault-proxy") -> None:
        self.call_timeout = call_timeout
        self._loop = asyncio.new_event_loop()
        self._proxies: dict[str, FaultProxy] = {}  # only touched on the loop thread
        self._lock = threading.Lock()
        self._closed = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()
        if not self._ready.wait(call_timeout):
            raise RuntimeError("fault proxy event loop did not start")

    @property
    def running(self) -> bool:
        """Whether the event loop thread is still alive."""
        return self._thread.is_alive()

    def add(
        self,
        name: str,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        fault: ProxyFault | None = None,
        seed: int | None = None,
    ) -> int:
        """Start a proxy *name* to ``upstream_host:upstream_port``; return its port.

        *seed* makes the jitter reproducible (scenario runs are seeded).
        Raises :class:`ValueError` if *name* is taken.
        """
        proxy = FaultProxy(
            upstream_host,
            upstream_port,
            name=name,
            listen_host=listen_host,
            listen_port=listen_port,
            rng=random.Random(seed),
        )

        async def add() -> int:
            if name in self._proxies:
                raise ValueError(f"a fault proxy named {name!r} already exists")
            self._proxies[name] = proxy
            try:
                if fault is not None:
                    await proxy.set_fault(fault)
                return await proxy.start()
            except BaseException:
                del self._proxies[name]
                raise

        return self._call(add())

    def set_fault(self, name: str, fault: ProxyFault) -> None:
        """Apply *fault* to proxy *name* (returns once it has taken effect)."""

        async def set_fault() -> None:
            await self._proxy(name).set_fault(fault)

        self._call(set_fault())

    def heal(self, name: str | None = None) -> None:
        """Return proxy *name*, or every proxy if None, to plain pass mode."""

        async def heal() -> None:
            proxies = list(self._proxies.values()) if name is None else [self._proxy(name)]
            await asyncio.gather(*(proxy.heal() for proxy in proxies))

        self._call(heal())

    def fault(self, name: str) -> ProxyFault:
        """The fault proxy *name* currently applies."""

        async def fault() -> ProxyFault:
            return self._proxy(name).fault

        return self._call(fault())

    def port(self, name: str) -> int:
        """The port proxy *name* listens on."""

        async def port() -> int:
            return self._proxy(name).port

        return self._call(port())

    def stats(self, name: str) -> ProxyStats:
        """A snapshot of proxy *name*'s counters."""

        async def stats() -> ProxyStats:
            return self._proxy(name).stats()

        return self._call(stats())

    def names(self) -> list[str]:
        """The names of the running proxies, sorted."""

        async def names() -> list[str]:
            return sorted(self._proxies)

        return self._call(names())

    def remove(self, name: str) -> None:
        """Stop proxy *name* and close its connections."""

        async def remove() -> None:
            await self._proxy(name).close()
            del self._proxies[name]

        self._call(remove())

    def close(self, timeout: float = 5.0) -> None:
        """Close every proxy and stop the thread, waiting at most about *timeout*.

        Idempotent. If the loop is wedged the daemon thread is abandoned (and
        logged) rather than blocking the caller.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True

        async def close_all() -> None:
            proxies = list(self._proxies.values())
            self._proxies.clear()
            await asyncio.gather(*(proxy.close() for proxy in proxies), return_exceptions=True)

        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(close_all(), self._loop)
            try:
                future.result(timeout)
            except Exception as error:
                future.cancel()
                log.warning("fault proxies did not close cleanly: %r", error)
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("fault proxy thread did not stop within %.1fs", timeout)

    def __enter__(self) -> FaultProxyServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _proxy(self, name: str) -> FaultProxy:
        try:
            return self._proxies[name]
        except KeyError:
            raise KeyError(f"no fault proxy named {name!r}") from None

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if self._closed:
            coroutine.close()
            raise RuntimeError("the fault proxy server is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self.call_timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"the fault proxy loop did not answer within {self.call_timeout}s"
            ) from None

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                # Anything still running was abandoned by a timed-out close;
                # cancel it so the loop closes without pending-task noise.
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=_CLOSE_WAIT))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
