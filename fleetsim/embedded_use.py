"""Commands that borrow the run directory's embedded server share it.

With no fleet running, a command such as `fleetsim check --schema run_...`
starts the run directory's embedded PostgreSQL for its own duration. Two
such commands at once must not stop the server under each other: each holds
a shared lock on ``embedded.lock`` while it uses the server, and whoever
leaves last (the one that can then take the lock exclusively) stops it, if
a command started it (``embedded.borrowed``) and no fleet has taken it over
(no ``run.json``). A server a fleet started is never stopped here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from fleetsim.rundir import RunDir
from fleetsim.store.embedded import EmbeddedPostgres

LOCK_FILE = "embedded.lock"
BORROWED_FILE = "embedded.borrowed"


@contextlib.contextmanager
def borrowed_embedded(run_dir: RunDir) -> Iterator[str]:
    """The URL of the run directory's embedded server, started if needed, for a while."""
    fd = os.open(run_dir.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    borrowed = run_dir.path / BORROWED_FILE
    server = EmbeddedPostgres(run_dir.pgdata)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not server.is_running():
            borrowed.touch(mode=0o600)  # before the start: a crash leaves it stoppable
        yield server.start()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another command still uses it: the last one out stops it
        else:
            if borrowed.exists() and not run_dir.run_file.exists():
                server.stop()
                borrowed.unlink(missing_ok=True)
        os.close(fd)
