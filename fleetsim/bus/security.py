"""The bus's two locks: the per-fleet secret (always) and CURVE (when keys are configured).

**The bus secret.** ``fleetsim up`` creates a fresh random secret for each
fleet, :func:`create_secret`, in ``RUN_DIR/bus.secret`` (mode 0600, so only
the user who started the fleet can read it). Every message on every channel
is signed with it (HMAC-SHA256, see :mod:`fleetsim.bus.messages`) and every
receiver refuses what it does not sign, so a local process of another user
(or of the same user without the file) cannot command the fleet. Remote pods
get it with ``fleetsim pod --bus-secret-file`` (:func:`load_secret`).

**CURVE** (below) adds encryption and key-based client admission, and is
required to bind beyond loopback.

``fleetsim keys generate`` calls :func:`generate_keys`, which writes::

    KEYS_DIR/                      (0700)
        server.key                 coordinator public key           (0600)
        server.key_secret          coordinator secret key           (0600)
        client.key                 pod/CLI public key               (0600)
        client.key_secret          pod/CLI secret key               (0600)
        authorized_clients/        public keys the coordinator admits
            client.key

The coordinator loads :class:`ServerKeys` and runs a :class:`ClientAuthenticator`
that admits only the public keys in ``authorized_clients/`` (add a key file
there and restart to admit another client). Pods and the CLI load
:class:`ClientKeys` (their keypair + the server's public key); for a remote
pod, copy ``server.key``, ``client.key`` and ``client.key_secret``.

A client without an admitted key never completes the handshake: its
messages are silently never delivered, so requests time out.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from fleetsim.errors import ConfigError

BUS_SECRET_FILE = "bus.secret"
"""The secret's file name in the run directory."""
_SECRET_MIN_LENGTH = 32

SERVER_NAME = "server"
CLIENT_NAME = "client"
AUTHORIZED_CLIENTS_DIR = "authorized_clients"


@dataclass(frozen=True)
class KeyFiles:
    """Paths of the key files :func:`generate_keys` wrote."""

    directory: Path
    server_public: Path
    server_secret: Path
    client_public: Path
    client_secret: Path
    authorized_clients: Path


@dataclass(frozen=True)
class ServerKeys:
    """What the coordinator needs: its keypair and where admitted client keys live."""

    public: bytes
    secret: bytes
    authorized_clients: Path


@dataclass(frozen=True)
class ClientKeys:
    """What a pod or the CLI needs: its keypair and the coordinator's public key."""

    public: bytes
    secret: bytes
    server_public: bytes


def create_secret(path: str | os.PathLike[str]) -> bytes:
    """Write a fresh random bus secret to ``path`` (mode 0600, atomically) and return it."""
    target = Path(path)
    secret = secrets.token_hex(32).encode()
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".bus-", suffix=".secret")
    except OSError as exc:
        raise ConfigError(f"cannot write the bus secret in {target.parent}: "
                          f"{exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:  # mkstemp created it 0600
            out.write(secret + b"\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return secret


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read a bus secret (ConfigError, one line, if missing, unreadable, too short or shared).

    A file that other users may read is refused, as ssh refuses such a key.
    """
    source = Path(path)
    try:
        mode = source.stat().st_mode
        secret = source.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the bus secret {source}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the bus secret {source} is accessible to other users "
                          f"(mode {stat.S_IMODE(mode):04o}): chmod 600 it")
    if len(secret) < _SECRET_MIN_LENGTH or b"\n" in secret:
        raise ConfigError(f"{source} is not a bus secret (one line of at least "
                          f"{_SECRET_MIN_LENGTH} characters)")
    return secret


def key_files(directory: str | os.PathLike[str]) -> KeyFiles:
    """The standard key file paths inside ``directory`` (they may not exist yet)."""
    root = Path(directory)
    return KeyFiles(
        directory=root,
        server_public=root / f"{SERVER_NAME}.key",
        server_secret=root / f"{SERVER_NAME}.key_secret",
        client_public=root / f"{CLIENT_NAME}.key",
        client_secret=root / f"{CLIENT_NAME}.key_secret",
        authorized_clients=root / AUTHORIZED_CLIENTS_DIR,
    )


def generate_keys(directory: str | os.PathLike[str], *, overwrite: bool = False) -> KeyFiles:
    """Create server and client keypairs in ``directory`` (ConfigError if keys exist).

    The directory is created 0700 before any secret is written, so no secret
    is ever readable by other users, and every file ends up 0600.
    """
    _require_curve()
    paths = key_files(directory)
    if paths.server_secret.exists() and not overwrite:
        raise ConfigError(f"CURVE keys already exist in {paths.directory} (use --overwrite)")
    paths.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.directory.chmod(0o700)
    paths.authorized_clients.mkdir(mode=0o700, exist_ok=True)
    for name in (SERVER_NAME, CLIENT_NAME):
        zmq.auth.create_certificates(paths.directory, name)
    shutil.copyfile(paths.client_public, paths.authorized_clients / paths.client_public.name)
    for path in (
        paths.server_public,
        paths.server_secret,
        paths.client_public,
        paths.client_secret,
        paths.authorized_clients / paths.client_public.name,
    ):
        path.chmod(0o600)
    return paths


def load_server_keys(directory: str | os.PathLike[str]) -> ServerKeys:
    """Load the coordinator's keys from ``directory`` (ConfigError if absent)."""
    paths = key_files(directory)
    public, secret = _load_keypair(paths.server_secret)
    if not paths.authorized_clients.is_dir():
        raise ConfigError(f"no {AUTHORIZED_CLIENTS_DIR}/ in {paths.directory}")
    return ServerKeys(public=public, secret=secret, authorized_clients=paths.authorized_clients)


def load_client_keys(directory: str | os.PathLike[str]) -> ClientKeys:
    """Load a pod's or the CLI's keys from ``directory`` (ConfigError if absent)."""
    paths = key_files(directory)
    public, secret = _load_keypair(paths.client_secret)
    server_public, _ = _load_certificate(paths.server_public)
    return ClientKeys(public=public, secret=secret, server_public=server_public)


def _load_keypair(path: Path) -> tuple[bytes, bytes]:
    public, secret = _load_certificate(path)
    if secret is None:
        raise ConfigError(f"{path} holds no secret key")
    return public, secret


def _load_certificate(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read CURVE key {path}: {exc} (run `fleetsim keys generate`)"
        ) from exc


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise ConfigError("this libzmq was built without CURVE support")


def configure_server_socket(socket: zmq.Socket[bytes], keys: ServerKeys) -> None:
    """Make ``socket`` a CURVE server (call before bind)."""
    _require_curve()
    socket.setsockopt(zmq.CURVE_SERVER, 1)
    socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def configure_client_socket(socket: zmq.Socket[bytes], keys: ClientKeys) -> None:
    """Make ``socket`` a CURVE client of the coordinator (call before connect)."""
    _require_curve()
    socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)


class ClientAuthenticator:
    """ZAP handler admitting only the public keys in ``keys.authorized_clients``.

    Start it before binding the server sockets (a handshake that happens
    while no handler runs is not checked) and stop it before terminating
    the context.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], keys: ServerKeys) -> None:
        """Prepare (not start) an authenticator on ``context``."""
        self._authenticator = ThreadAuthenticator(context)
        self._keys = keys

    def start(self) -> None:
        """Run the ZAP handler thread and load the admitted keys."""
        self._authenticator.configure_curve(domain="*", location=str(self._keys.authorized_clients))
        self._authenticator.start()

    def stop(self) -> None:
        """Stop the handler thread and close its sockets."""
        self._authenticator.stop()


__all__ = [
    "AUTHORIZED_CLIENTS_DIR",
    "BUS_SECRET_FILE",
    "ClientAuthenticator",
    "ClientKeys",
    "KeyFiles",
    "ServerKeys",
    "configure_client_socket",
    "configure_server_socket",
    "create_secret",
    "generate_keys",
    "key_files",
    "load_client_keys",
    "load_secret",
    "load_server_keys",
]
