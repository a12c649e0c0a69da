"""Client histories: what each pod and submitter invoked and was told, in its own words.

The store records what it did; a bug in the store can forge that record.
Each client therefore keeps its own, Jepsen-style, outside the store: one
JSON-lines file per pod incarnation (``pod-<id>.<incarnation>.jsonl``) and
one per submitting process (``submit-<host>-<pid>.jsonl``), in the run
directory's ``history/<schema>/`` folder. The checker cross-examines the two
(:mod:`fleetsim.crosscheck`).

Records are appended to a list by the working thread (no I/O, no JSON
encoding there) and written by a flusher thread at least every
``FLUSH_S`` seconds and at close: a SIGKILLed client loses at most its
last unflushed half second, which the checker tolerates (claim tokens only
grow, so "missing" is judged only below the highest token a file shows).

Record types (``t`` is the client's wall clock, for people; the checker
never compares it with database time):

=========== ===============================================================
``open``    ``role`` (pod or submit), ``pod``, ``incarnation``, ``pid``, ``host``
``claim``   ``ids``, ``tokens``: the steps handed to the pod and their claim tokens
``claim?``  a claim failed and may have committed unseen
``ran``     ``start``, ``end``, ``ok``, ``failed``: one batch's run and its counts
``write``   ``op`` (complete, fail, release, cancel, release_all), ``ids`` and
            ``tokens`` sent (complete: also ``digests`` of the results sent),
            ``reply``: ``accepted`` with ``accepted`` (the ids accepted; the
            others were refused) or ``unknown`` (an error: it may or may not
            have landed)
``submit``  ``queue``, ``ids``: the step ids a submit was told
``close``   the client stopped cleanly: the file is complete
=========== ===============================================================
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fleetsim.errors import ConfigError

log = logging.getLogger("fleetsim.history")

FLUSH_S = 0.5
FORMAT_VERSION = 1


def history_dir(run_dir: Path, schema: str) -> Path:
    """Where the client histories of ``schema``'s fleet live in a run directory."""
    return run_dir / "history" / schema


def result_digest(result: Any) -> str:
    """A short digest of a step result, the same for a value and its trip through jsonb.

    jsonb keeps numbers as ``numeric``: ``1e16`` comes back as
    ``10000000000000000`` and ``-0.0`` as ``0``, so integral floats are
    digested as integers.
    """
    text = json.dumps(_canonical(result), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canonical(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


class ClientHistory:
    """An append-only JSON-lines history of one client, written in the background."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # "x": a history is one process's; two never share a file.
            self._file: IO[str] = open(path, "x", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"cannot write the client history {path}: {exc.strerror}") from None
        self._pending: deque[dict[str, Any]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self.append({"type": "open", "v": FORMAT_VERSION, **header})
        self._flusher = threading.Thread(target=self._flush_loop, name="history", daemon=True)
        self._flusher.start()

    @classmethod
    def for_pod(cls, directory: Path, pod_id: str, incarnation: int) -> ClientHistory:
        """The history of one pod process (one file each, never shared)."""
        name = f"pod-{_safe(pod_id)}.{incarnation}.{_process_tag()}.jsonl"
        return cls(directory / name, {
            "role": "pod", "pod": pod_id, "incarnation": incarnation,
            "pid": os.getpid(), "host": socket.gethostname(),
        })

    @classmethod
    def for_submitter(cls, directory: Path) -> ClientHistory:
        """The history of this process's submits."""
        host = socket.gethostname()
        return cls(directory / f"submit-{_safe(host)}.{_process_tag()}.jsonl", {
            "role": "submit", "pid": os.getpid(), "host": host,
        })

    def append(self, record: dict[str, Any]) -> None:
        """Queue ``record`` (stamped with the wall clock); never blocks on I/O."""
        record["t"] = time.time()
        # deque.append and popleft are thread-safe: no lock on the hot path.
        self._pending.append(record)

    # -- what clients record ----------------------------------------------

    def claimed(self, steps: Sequence[Any]) -> None:
        """Steps (ClaimedStep) handed to the pod by a claim."""
        self.append({"type": "claim", "ids": [s.id for s in steps],
                     "tokens": [s.claim_token for s in steps]})

    def claim_unknown(self) -> None:
        """A claim failed in a way that may have committed steps unseen."""
        self.append({"type": "claim?"})

    def ran(self, start: float, end: float, ok: int, failed: int) -> None:
        """A batch ran: how many steps' workloads returned and how many raised."""
        self.append({"type": "ran", "start": start, "end": end, "ok": ok, "failed": failed})

    def wrote(self, op: str, sent: list[Any], accepted: Iterable[int] | None) -> None:
        """A fenced write of ``sent`` items ``(id, token, ...)`` and its reply (None: unknown)."""
        ids = [i[0] for i in sent]
        record: dict[str, Any] = {"type": "write", "op": op, "ids": ids,
                                  "tokens": [i[1] for i in sent]}
        if op == "complete":
            # Digested now, as sent: a handler may change its result object
            # later. "null": every result was null (most workloads'), spelt once.
            results = [i[2] for i in sent]
            record["digests"] = "null" if all(r is None for r in results) else [
                _NULL_DIGEST if r is None else _safe_digest(r) for r in results]
        if accepted is None:
            record["reply"] = "unknown"
        else:
            record["reply"] = "accepted"
            accepted = list(accepted)
            # "all": every item sent was accepted (the usual case), spelt once.
            record["accepted"] = "all" if len(accepted) == len(ids) else accepted
        self.append(record)

    def submitted(self, queue: str, ids: Sequence[int]) -> None:
        """A submit that was told these step ids."""
        self.append({"type": "submit", "queue": queue, "ids": list(ids)})

    # -- writing ------------------------------------------------------------

    def flush(self) -> None:
        """Write what is queued."""
        with self._lock:
            pending = []
            while True:
                try:
                    pending.append(self._pending.popleft())
                except IndexError:
                    break
            if not pending or self._file.closed:
                return
            lines = [json.dumps(r, separators=(",", ":"), default=str) for r in pending]
            try:
                self._file.write("\n".join(lines) + "\n")
                self._file.flush()
            except (OSError, ValueError):
                pass  # evidence is best effort: a full disk must not stop the pod

    def close(self) -> None:
        """Record a clean stop, flush and close (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.append({"type": "close"})
        self._stop.set()
        self._flusher.join(timeout=2 * FLUSH_S)
        self.flush()
        with self._lock:
            self._file.close()

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_S):
            try:
                self.flush()
            except Exception:  # evidence is best effort: never kill the flusher
                log.exception("client history %s: a flush failed", self.path)


_NULL_DIGEST = hashlib.sha256(b"null").hexdigest()[:16]


def sent_digests(record: dict[str, Any]) -> list[str | None]:
    """The digests of a complete record's results, one per id sent."""
    digests = record.get("digests")
    if digests == "null":
        return [_NULL_DIGEST] * len(record.get("ids", ()))
    return list(digests) if isinstance(digests, list) else [None] * len(record.get("ids", ()))


def accepted_ids(record: dict[str, Any]) -> set[int]:
    """The ids a write record says were accepted."""
    accepted = record.get("accepted", ())
    if accepted == "all":
        return {int(i) for i in record.get("ids", ())}
    return {int(i) for i in accepted}


def _safe_digest(result: Any) -> str | None:
    try:
        return result_digest(result)
    except (TypeError, ValueError, RecursionError):
        return None


def _safe(name: str) -> str:
    """``name`` as part of a file name, with a digest so that no two names collide."""
    plain = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:80]
    return f"{plain}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def _process_tag() -> str:
    """This process, uniquely: its pid and a random nonce (pids are reused)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


# -- reading ------------------------------------------------------------------


@dataclass
class ClientLog:
    """One client's history as read back."""

    path: Path
    role: str
    pod: str | None = None
    incarnation: int | None = None
    complete: bool = False  # ends with a close record
    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0  # unreadable lines (a torn last line after a SIGKILL)


def read_histories(directory: Path) -> list[ClientLog]:
    """Every client history in ``directory`` (none if it does not exist)."""
    if not directory.is_dir():
        return []
    return [_read(path) for path in sorted(directory.glob("*.jsonl"))]


def _read(path: Path) -> ClientLog:
    log = ClientLog(path, role="unknown")
    for record in _records(path, log):
        if record.get("type") == "open":
            log.role = str(record.get("role", "unknown"))
            log.pod = record.get("pod")
            log.incarnation = record.get("incarnation")
        elif record.get("type") == "close":
            log.complete = True
        else:
            log.records.append(record)
    return log


def _records(path: Path, log: ClientLog) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                log.bad_lines += 1
                continue
            if isinstance(record, dict):
                yield record
            else:
                log.bad_lines += 1


class NullHistory(ClientHistory):
    """A client that keeps no history (an external fleet, a benchmark's reference)."""

    def __init__(self) -> None:  # no file, no flusher
        self.path = Path(os.devnull)

    def append(self, record: dict[str, Any]) -> None:
        """Drop ``record``."""

    def claimed(self, steps: Sequence[Any]) -> None:
        """Nothing to record."""

    def ran(self, start: float, end: float, ok: int, failed: int) -> None:
        """Nothing to record."""

    def wrote(self, op: str, sent: list[Any], accepted: Iterable[int] | None) -> None:
        """Nothing to record."""

    def flush(self) -> None:
        """Nothing to write."""

    def close(self) -> None:
        """Nothing to close."""
