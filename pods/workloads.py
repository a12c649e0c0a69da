"""Step workloads: what a pod does with a step's payload.

A workload spec is one of ``noop``, ``sleep:<ms>``, ``cpu:<ms>``,
``fail:<probability>``, ``hang`` / ``hang:<ms>`` (a handler that hangs: it
sleeps an hour, or the time given, to exercise execution timeouts) or a user
handler ``module:function`` that takes the step's payload (a dict) and
returns a JSON-serialisable result.

A step may name its own workload in ``payload["workload"]``; otherwise the
pod's default runs. A payload only *selects* among what the pod allows: the
built-in workloads and the handlers the pod was started with (its
``--workload`` and every ``--handler``), imported once at start. A payload
naming any other ``module:function`` fails its step with
:class:`WorkloadNotAllowed` and nothing is imported: whoever can submit a
step must not be able to run code on the pods.
"""

from __future__ import annotations

import importlib
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetsim.errors import ConfigError

Handler = Callable[[dict[str, Any]], Any]

_BUILTIN = re.compile(r"^(noop|sleep|cpu|fail|hang)(?::(.*))?$")
#: How long ``hang`` without a value sleeps: far past any sane timeout.
HANG_DEFAULT_MS = 3_600_000.0
_HANDLER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_MAX_CACHED = 256


class StepFailed(Exception):
    """A workload's deliberate failure (the ``fail:`` workload)."""


class WorkloadNotAllowed(ConfigError):
    """A step named a handler this pod was not started with."""


@dataclass(frozen=True)
class Workload:
    """A parsed workload spec, ready to run a step."""

    spec: str
    kind: str
    amount: float = 0.0
    handler: Handler | None = None

    def run(self, payload: dict[str, Any], *, step_id: int, attempt: int, seed: int) -> Any:
        """Run one step; return its result or raise to fail it."""
        if self.kind == "noop":
            return None
        if self.kind in ("sleep", "hang"):
            time.sleep(self.amount / 1000.0)
            return None
        if self.kind == "cpu":
            deadline = time.perf_counter() + self.amount / 1000.0
            n = 0
            while time.perf_counter() < deadline:
                n += 1
            return None
        if self.kind == "fail":
            # Seeded per step and attempt, so whichever pod runs it the outcome
            # is the same and a run can be replayed.
            if random.Random(f"{seed}:{step_id}:{attempt}").random() < self.amount:
                raise StepFailed(f"fail:{self.amount:g} workload failed step {step_id}")
            return None
        assert self.handler is not None
        return self.handler(payload)


def is_handler(spec: str) -> bool:
    """Whether ``spec`` names a user handler (``module:function``), not a built-in."""
    return bool(_HANDLER.match(spec.strip()))


def parse_workload(spec: str, *, allowed: frozenset[str] | None = None) -> Workload:
    """Parse and validate a workload spec; raise ConfigError with a one-line reason.

    With ``allowed``, a handler outside it raises :class:`WorkloadNotAllowed`
    before anything is imported; built-ins are always allowed.
    """
    spec = spec.strip()
    match = _BUILTIN.match(spec)
    if match:
        kind, arg = match.group(1), match.group(2)
        if kind == "noop":
            if arg:
                raise ConfigError(f"invalid workload {spec!r}: noop takes no argument")
            return Workload(spec, kind)
        if kind == "hang" and not arg:
            return Workload(spec, kind, HANG_DEFAULT_MS)
        if not arg:
            raise ConfigError(f"invalid workload {spec!r}: {kind} needs a value, e.g. {kind}:"
                              + ("0.1" if kind == "fail" else "10"))
        try:
            amount = float(arg)
        except ValueError:
            raise ConfigError(f"invalid workload {spec!r}: {arg!r} is not a number") from None
        if kind == "fail" and not 0.0 <= amount <= 1.0:
            raise ConfigError(f"invalid workload {spec!r}: probability must be in [0, 1]")
        if kind != "fail" and not 0.0 <= amount <= 3_600_000:
            raise ConfigError(f"invalid workload {spec!r}: milliseconds must be in [0, 3600000]")
        return Workload(spec, kind, amount)
    if _HANDLER.match(spec):
        if allowed is not None and spec not in allowed:
            raise WorkloadNotAllowed(not_allowed_message(spec, allowed))
        return Workload(spec, "handler", handler=_import_handler(spec))
    raise ConfigError(
        f"unknown workload {spec!r}: use noop, sleep:<ms>, cpu:<ms>, fail:<p>, hang[:<ms>] "
        "or module:function"
    )


def _import_handler(spec: str) -> Handler:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"cannot import workload {spec!r}: {type(exc).__name__}: {exc}"
        ) from None
    handler = getattr(module, attr, None)
    if not callable(handler):
        raise ConfigError(f"cannot import workload {spec!r}: {module_name} has no function {attr}")
    return handler  # type: ignore[no-any-return]


def not_allowed_message(spec: str, allowed: frozenset[str]) -> str:
    """The one-line reason a step naming ``spec`` is refused."""
    started_with = ", ".join(sorted(allowed)) or "none"
    return (
        f"workload {spec!r} is not allowed on this pod: a step may name a built-in "
        f"(noop, sleep:<ms>, cpu:<ms>, fail:<p>, hang[:<ms>]) or a handler the pod was "
        f"started with (--workload/--handler; this pod's: {started_with})"
    )


class WorkloadCache:
    """The pod's allowed workloads; parses each distinct spec a step names once.

    ``handlers`` (besides ``default``) are imported here, at start, so a bad
    one stops the pod before it claims anything.
    """

    def __init__(self, default: Workload, handlers: tuple[str, ...] = ()) -> None:
        self.default = default
        self._cache: dict[str, Workload] = {default.spec: default}
        for spec in handlers:
            workload = parse_workload(spec)
            if workload.kind != "handler":
                raise ConfigError(f"--handler {spec!r}: give a module:function (built-in "
                                  "workloads are always allowed)")
            self._cache.setdefault(workload.spec, workload)
        self.allowed = frozenset(w.spec for w in self._cache.values() if w.kind == "handler")
        """The handlers (``module:function``) steps may name."""

    def for_payload(self, payload: dict[str, Any]) -> Workload:
        """The workload a step asks for, or the pod's default.

        Raises ConfigError (failing the step, spending an attempt) for a bad
        spec, WorkloadNotAllowed for a handler the pod was not started with.
        """
        spec = payload.get("workload") if isinstance(payload, dict) else None
        if not isinstance(spec, str):
            return self.default
        workload = self._cache.get(spec)
        if workload is None:
            workload = parse_workload(spec, allowed=self.allowed)
            if len(self._cache) < _MAX_CACHED:  # payloads choose specs: bound the memory
                self._cache[spec] = workload
        return workload
