"""Store URLs: validation and redaction.

A store URL may carry a password; nothing fleetsim prints or logs may show
it, so every message that names a URL goes through :func:`redact`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fleetsim.errors import ConfigError

_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


_QUERY_PASSWORD = re.compile(r"(?i)(^|&)(password=)[^&]*")


def redact(url: str) -> str:
    """Return ``url`` with any password (in the user part or the query) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[-1]}"
    query = _QUERY_PASSWORD.sub(r"\1\2***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    # Rebuild by hand: urlunsplit drops '//' when the host part is empty.
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        rebuilt += f"?{query}"
    return rebuilt + (f"#{parts.fragment}" if parts.fragment else "")


def redact_argv(args: Iterable[str]) -> list[str]:
    """A command line with the password of every URL in it redacted.

    Handles a bare URL argument and the ``--option=URL`` form: command lines
    end up in replay records, failure bundles and benchmark baselines.
    """
    redacted = []
    for arg in args:
        if "://" not in arg:
            redacted.append(arg)
        elif arg.startswith("-") and "=" in arg:
            name, _, value = arg.partition("=")
            redacted.append(f"{name}={redact(value)}")
        else:
            redacted.append(redact(arg))
    return redacted


def validate_url(url: str) -> str:
    """Check that ``url`` looks like a PostgreSQL URL; return the SQLAlchemy form.

    Raises ConfigError with a one-line message (password redacted) otherwise.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"invalid store URL {redact(url)!r}: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"invalid store URL {redact(url)!r}: expected postgresql://user@host:port/db"
        )
    if not parts.hostname and "host=" not in parts.query:
        raise ConfigError(f"invalid store URL {redact(url)!r}: no host")
    pooler_mode(url)  # raises on a bad value
    # Keep the rest verbatim: urlunsplit would drop '//' before an empty host
    # (libpq's socket form, postgresql:///db?host=/run/postgresql).
    rest = url[len(parts.scheme):]
    if _POOLER.search(parts.query):
        # fleetsim's own parameter: libpq would refuse it.
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                           if k != "pooler"])
        rest = rest.split("?", 1)[0] + (f"?{query}" if query else "")
        if parts.fragment:
            rest += f"#{parts.fragment}"
    return "postgresql+psycopg2" + rest


#: What ``?pooler=`` may say: the pool mode of a connection pooler (PgBouncer)
#: between fleetsim and PostgreSQL. See docs/architecture.md, "Connection poolers".
POOLER_MODES = ("transaction", "session")
_POOLER = re.compile(r"(^|&)pooler=")


def pooler_mode(url: str) -> str | None:
    """The pooler a store URL declares with ``?pooler=MODE``, or None.

    Raises ConfigError for a mode fleetsim cannot run under (statement
    pooling allows no multi-statement transaction) or an unknown one.
    """
    try:
        query = urlsplit(url).query
    except ValueError:
        return None  # validate_url reports it
    values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "pooler"]
    if not values:
        return None
    mode = values[-1].strip().lower()
    if mode == "statement":
        raise ConfigError(
            "pooler=statement cannot work: fleetsim needs multi-statement transactions;"
            " set pool_mode = transaction in the pooler and use ?pooler=transaction"
        )
    if mode not in POOLER_MODES:
        raise ConfigError(
            f"invalid store URL parameter pooler={values[-1]!r}: use pooler=transaction"
            " (or pooler=session)"
        )
    return mode


def validate_schema_name(name: str) -> str:
    """Check a PostgreSQL schema name fleetsim may create (lower-case identifier)."""
    if not _SCHEMA_NAME.match(name):
        raise ConfigError(
            f"invalid schema name {name!r}: use lower-case letters, digits and _ (max 63)"
        )
    return name


def host_port(url: str) -> tuple[str, int] | None:
    """The TCP (host, port) a URL connects to, or None for a unix socket."""
    parts = urlsplit(url)
    if not parts.hostname or parts.hostname.startswith("/"):
        return None
    return parts.hostname, parts.port or 5432


def with_host_port(url: str, host: str, port: int) -> str:
    """The same URL pointed at ``host:port`` (for a pod's fault proxy)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{userinfo}{host}:{port}"))
