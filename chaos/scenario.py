"""Chaos scenarios: TOML files that describe a seeded schedule of faults.

This module is pure: it parses and validates scenario files, expands them
into a concrete, time-ordered schedule for a seed, resolves target selectors
against the live pod list, and writes the log of what was applied. The
coordinator executes the schedule; nothing here touches the store or the bus.

A scenario file::

    name = "kill-leader-loop"
    description = "Kill the leader every 5 s; a new one must take over each time."
    duration = "30s"          # faults stop after this; then heal all, then drain
    seed = 7                  # optional; `fleetsim chaos run --seed` overrides

    [workload]                # optional hints for `chaos run` and the tests
    pods = 5
    steps = 200
    workload = "sleep:20"

    [[fault]]
    action = "kill-leader"
    every = "5s"              # or `at = "12s"`; `every` takes start, until, count
    jitter = "1s"             # each occurrence shifted by uniform [0, jitter)

Actions (and their parameters):

=================  =====================================================
``kill``           SIGKILL the target pods
``kill-leader``    SIGKILL the leader (no ``target``)
``pause``          SIGSTOP, SIGCONT after ``for``
``resume``         SIGCONT now
``partition``      cut the pods off ``from`` store|bus|all (default store),
                   ``mode`` blackhole|reset (default blackhole), for ``for``
``heal``           end partitions and storage faults now
``storage-fault``  ``error_rate``, ``latency``, ``disconnect_rate``,
                   ``reply_loss_rate`` on the pods' store connections, for
                   ``for``
``store-restart``  restart the PostgreSQL server (no ``target``)
=================  =====================================================

Targets: ``leader``, ``random`` (one pod), ``all``, ``round-robin`` (the next
pod in id order each time, cycling), ``fraction:0.4`` (that share of the pods,
rounded, at least one), or a pod id: ``pod-3``, or ``pod:<any id>`` for ids
not of the ``pod-…`` form. Pods are known only at run time, so the schedule
holds the selector and a seeded :class:`TargetPicker` resolves it.

Every error is a :class:`~fleetsim.errors.ConfigError` on one line naming the
file, the field and the reason::

    chaos/scenarios/x.toml: fault[2].for: invalid duration '5x': use a number ...
"""

from __future__ import annotations

import difflib
import importlib.resources
import json
import math
import os
import random
import re
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from fleetsim.bus.messages import CHAOS_ACTIONS
from fleetsim.durations import format_duration, parse_duration
from fleetsim.errors import ConfigError

__all__ = [
    "ACTIONS",
    "EXPERIMENT_KEYS",
    "MAX_EVENTS",
    "FaultLog",
    "FaultSpec",
    "PlannedFault",
    "Scenario",
    "TargetPicker",
    "Targets",
    "WorkloadHints",
    "find_scenario",
    "list_scenarios",
    "load_scenario",
    "parse_scenario",
    "read_fault_log",
]

#: The fault vocabulary, in the order error messages list it: the bus's chaos
#: actions (declared once, in fleetsim.bus.messages) less running a scenario.
ACTIONS: Final = tuple(a for a in CHAOS_ACTIONS if a != "run-scenario")

#: Actions whose effect lasts ``for`` a while (and is undone at its end).
_LASTING: Final = frozenset({"pause", "partition", "storage-fault"})
#: Actions aimed at something other than a chosen pod: no ``target`` key.
_NO_TARGET: Final = {
    "kill-leader": 'kill-leader always targets the leader (use action = "kill" to choose)',
    "store-restart": "store-restart restarts the store, not a pod",
}
#: Default target per action (None: the action takes no target).
_DEFAULT_TARGET: Final[dict[str, str | None]] = {
    "kill": "random",
    "kill-leader": "leader",
    "pause": "random",
    "resume": "all",
    "partition": "random",
    "heal": "all",
    "storage-fault": "all",
    "store-restart": None,
    "hang": "random",
}
#: Parameter keys per action.
_PARAMS: Final[dict[str, tuple[str, ...]]] = {
    "partition": ("from", "mode"),
    "storage-fault": ("error_rate", "latency", "disconnect_rate", "reply_loss_rate"),
}
_TIMING_KEYS: Final = ("at", "every", "start", "until", "count", "for", "jitter")
_FAULT_KEYS: Final = ("action", "target", *_TIMING_KEYS)
_ALL_PARAM_KEYS: Final = tuple(sorted({k for keys in _PARAMS.values() for k in keys}))
#: The sections an experiment adds (parsed by chaos.experiment; kept raw here).
EXPERIMENT_KEYS: Final = ("fleet", "queue", "load", "thresholds")
_TOP_KEYS: Final = ("name", "description", "duration", "seed", "workload", "fault",
                    *EXPERIMENT_KEYS)
_WORKLOAD_KEYS: Final = ("pods", "steps", "workload", "rate")
_PARTITION_FROM: Final = ("store", "bus", "all")
_PARTITION_MODE: Final = ("blackhole", "reset")
#: Mirrors chaos.storage_faults.StorageFault, so a schedule never fails there.
_MAX_LATENCY_MS: Final = 60_000.0

_SELECTORS: Final = ("leader", "random", "all", "round-robin")
_FRACTION_RE: Final = re.compile(r"fraction:(.*)")
_POD_RE: Final = re.compile(r"pod-[A-Za-z0-9][\w.-]{0,59}")
_POD_ANY_RE: Final = re.compile(r"pod:([A-Za-z0-9][\w.-]{0,63})")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][\w.-]{0,63}")
_TARGET_HINT: Final = (
    "expected leader, random, all, round-robin, fraction:<0..1>, "
    "or a pod id such as pod-3 or pod:<id>"
)

#: Upper bound on a schedule's length: a typo such as every = "1ms" over an
#: hour would otherwise plan millions of faults.
MAX_EVENTS: Final = 10_000
#: Arrays and tables nested deeper than this are refused. A valid scenario
#: nests three levels ([[fault]] in the file); deep nesting is only ever a
#: mistake or an attack, and Python's TOML parser recurses once per level.
MAX_NESTING: Final = 16

_US = 1_000_000  # schedules are computed in integer microseconds: no float drift


def _us(seconds: float) -> int:
    return round(seconds * _US)


def _fmt_us(micros: int) -> str:
    return format_duration(micros / _US)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class WorkloadHints:
    """Optional ``[workload]`` defaults for ``chaos run`` and the test harness."""

    pods: int | None = None
    steps: int | None = None
    workload: str | None = None
    # Steps per second, submitted steadily for the scenario's duration (a
    # trickle below the fleet's capacity: claims then come back short of a
    # full batch, a path bulk submits never take).
    rate: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The hints that are set, JSON-ready."""
        return {
            k: v
            for k, v in (("pods", self.pods), ("steps", self.steps), ("workload", self.workload),
                         ("rate", self.rate))
            if v is not None
        }


@dataclass(frozen=True)
class FaultSpec:
    """One validated ``[[fault]]`` entry of a scenario, durations in seconds.

    Exactly one of ``at_s`` and ``every_s`` is set. ``target`` is the selector
    (None for actions that take none). ``params`` holds the action's
    parameters with defaults filled in, in the coordinator's units:
    partition ``{"from", "mode"}``; storage-fault ``{"error_rate",
    "latency_ms", "disconnect_rate", "reply_loss_rate"}`` (the fields of
    :class:`chaos.storage_faults.StorageFault`).
    """

    index: int
    action: str
    target: str | None
    params: Mapping[str, str | float]
    at_s: float | None = None
    every_s: float | None = None
    start_s: float | None = None
    until_s: float | None = None
    count: int | None = None
    for_s: float | None = None
    jitter_s: float = 0.0
    #: Nominal offsets of every occurrence, before jitter (computed at parse time).
    nominal_us: tuple[int, ...] = field(default=(), repr=False)

    def describe(self) -> str:
        """A short human description, e.g. ``kill-leader every 5s (+<1s jitter)``."""
        words = [self.action]
        if self.target is not None and self.action != "kill-leader":
            words.append(self.target)
        words += [f"{k}={v}" for k, v in self.params.items()]
        if self.at_s is not None:
            words.append(f"at {format_duration(self.at_s)}")
        else:
            assert self.every_s is not None
            words.append(f"every {format_duration(self.every_s)}")
            words.append(f"x{len(self.nominal_us)}")
        if self.for_s is not None:
            words.append(f"for {format_duration(self.for_s)}")
        if self.jitter_s:
            words.append(f"(+<{format_duration(self.jitter_s)} jitter)")
        return " ".join(words)


@dataclass(frozen=True)
class PlannedFault:
    """One concrete fault application of a schedule.

    ``offset_s`` is from scenario start; ``duration_s`` is how long the fault
    lasts (None for instantaneous actions; the coordinator undoes a lasting
    fault at ``offset_s + duration_s``); ``fault`` is the index of the
    ``[[fault]]`` entry and ``occurrence`` its repetition number.
    """

    offset_s: float
    action: str
    target: str | None
    params: Mapping[str, str | float]
    duration_s: float | None
    fault: int
    occurrence: int

    @property
    def end_s(self) -> float:
        """When the fault's effect ends (its offset, if instantaneous)."""
        return self.offset_s + (self.duration_s or 0.0)

    def as_dict(self) -> dict[str, Any]:
        """The fault as a JSON-ready dict."""
        return {
            "offset_s": self.offset_s,
            "action": self.action,
            "target": self.target,
            "params": dict(self.params),
            "duration_s": self.duration_s,
            "fault": self.fault,
            "occurrence": self.occurrence,
        }

    def to_json(self) -> str:
        """One compact line of JSON, stable for a given fault (sorted keys)."""
        return json.dumps(self.as_dict(), separators=(",", ":"), sort_keys=True, allow_nan=False)


@dataclass(frozen=True)
class Scenario:
    """A validated chaos scenario; :meth:`schedule` expands it for a seed."""

    name: str
    description: str
    duration_s: float
    faults: tuple[FaultSpec, ...]
    seed: int | None = None
    workload: WorkloadHints = WorkloadHints()
    source: str = "<string>"
    #: The experiment sections ([fleet], [[queue]], [load], [thresholds]) as
    #: read, unvalidated: chaos.experiment parses them; `chaos run` ignores them.
    experiment: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def effective_seed(self, override: int | None = None) -> int:
        """The seed to run with: ``override`` (the CLI's --seed), else the file's, else 0."""
        if override is not None:
            return override
        return self.seed if self.seed is not None else 0

    def schedule(self, seed: int) -> list[PlannedFault]:
        """The concrete, time-ordered fault applications for ``seed``.

        Deterministic: the same seed gives the same list (and the same JSON).
        Each ``[[fault]]`` entry draws its jitter from its own RNG seeded by
        ``(seed, index)``, so adding an entry does not move the others. Ties
        are ordered by entry, then occurrence. Every offset is before the
        scenario's duration and every lasting fault ends by it.
        """
        planned: list[tuple[int, int, int, PlannedFault]] = []
        for spec in self.faults:
            rng = random.Random(f"fleetsim-chaos:{seed}:{spec.index}")
            jitter_us = _us(spec.jitter_s)
            for occurrence, nominal in enumerate(spec.nominal_us):
                offset = nominal + (rng.randrange(jitter_us) if jitter_us else 0)
                fault = PlannedFault(
                    offset_s=offset / _US,
                    action=spec.action,
                    target=spec.target,
                    params=dict(spec.params),
                    duration_s=spec.for_s,
                    fault=spec.index,
                    occurrence=occurrence,
                )
                planned.append((offset, spec.index, occurrence, fault))
        planned.sort(key=lambda item: item[:3])
        return [item[3] for item in planned]

    def schedule_json(self, seed: int) -> str:
        """The schedule for ``seed`` as JSON lines (byte-identical for the same seed)."""
        return "".join(fault.to_json() + "\n" for fault in self.schedule(seed))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (for ``fleetsim chaos list --json``)."""
        return {
            "name": self.name,
            "description": self.description,
            "duration_s": self.duration_s,
            "seed": self.seed,
            "workload": self.workload.as_dict(),
            "faults": [spec.describe() for spec in self.faults],
            "source": self.source,
        }


# --------------------------------------------------------------------------- parsing


class _Fields:
    """Reads typed values out of one TOML table, failing with file + field path."""

    def __init__(self, source: str, prefix: str, table: Mapping[str, Any]) -> None:
        self.source = source
        self.prefix = prefix
        self.table = table

    def path(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str | None, reason: str) -> ConfigError:
        where = self.prefix if key is None else self.path(key)
        # One line, always: a reason quoting user text could hold a newline.
        text = f"{self.source}: {where}: {reason}" if where else f"{self.source}: {reason}"
        return ConfigError(" ".join(text.splitlines()))

    def reject_unknown(
        self, allowed: Iterable[str], elsewhere: Mapping[str, str] | None = None
    ) -> None:
        """Typo protection: fail on the first key not in ``allowed``."""
        allowed = tuple(allowed)
        for key in self.table:
            if key in allowed:
                continue
            if elsewhere and key in elsewhere:
                raise self.error(key, elsewhere[key])
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = (
                f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(allowed)}"
            )
            raise self.error(key, f"unknown key ({hint})")

    def has(self, key: str) -> bool:
        return key in self.table

    def string(self, key: str, required: bool = False) -> str | None:
        if key not in self.table:
            if required:
                raise self.error(key, "missing")
            return None
        value = self.table[key]
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_toml_type(value)}")
        return value

    def choice(
        self, key: str, choices: Sequence[str], default: str | None = None, what: str = "value"
    ) -> str:
        value = self.string(key, required=default is None)
        if value is None:
            assert default is not None
            return default
        if value not in choices:
            expected = ", ".join(choices)
            raise self.error(key, f"unknown {what} {value!r} (expected one of {expected})")
        return value

    def integer(self, key: str, minimum: int | None = None) -> int | None:
        if key not in self.table:
            return None
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_toml_type(value)}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def rate(self, key: str) -> float:
        if key not in self.table:
            return 0.0
        value = self.table[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number in [0, 1], got {_toml_type(value)}")
        if not 0.0 <= value <= 1.0:
            raise self.error(key, f"{value!r} is out of range: a rate must be in [0, 1]")
        return float(value)

    def duration(self, key: str, required: bool = False, positive: bool = False) -> float | None:
        if key not in self.table:
            if required:
                raise self.error(key, "missing (a duration such as 30s)")
            return None
        value = self.table[key]
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise self.error(key, f'expected a duration such as "5s", got {_toml_type(value)}')
        try:
            seconds = parse_duration(value)
        except ConfigError as exc:
            raise self.error(key, str(exc)) from None
        if positive and _us(seconds) <= 0:
            raise self.error(key, f"must be longer than zero, got {value!r}")
        return seconds


def _toml_type(value: object) -> str:
    names = {
        bool: "a boolean",
        str: "a string",
        int: "an integer",
        float: "a float",
        list: "an array",
        dict: "a table",
    }
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


def parse_scenario(text: str, source: str = "<string>") -> Scenario:
    """Parse and validate a scenario from TOML ``text``.

    ``source`` names the file in error messages. Raises
    :class:`~fleetsim.errors.ConfigError` with one line ``source: field:
    reason`` for anything wrong: TOML syntax (with its line number), unknown
    keys, bad values, missing or meaningless ``for``, both or neither of
    ``at`` and ``every``, and any fault that could start or last past the
    scenario's ``duration``.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:
        # tomllib recurses per nested array or inline table; thousands of
        # levels exhaust the stack before anything could check them.
        raise ConfigError(
            f"{source}: invalid scenario: nested too deeply (at most {MAX_NESTING} levels)"
        ) from None
    if _nesting(data) > MAX_NESTING:
        raise ConfigError(
            f"{source}: invalid scenario: nested too deeply (at most {MAX_NESTING} levels)"
        )
    top = _Fields(source, "", data)
    top.reject_unknown(_TOP_KEYS, {"faults": "unknown key (did you mean [[fault]]?)"})

    name = top.string("name", required=True)
    assert name is not None
    if not _NAME_RE.fullmatch(name):
        raise top.error(
            "name", f"invalid name {name!r}: use letters, digits, '-', '_' or '.' (at most 64)"
        )
    description = top.string("description") or ""
    raw_faults = data.get("fault", [])
    if not isinstance(raw_faults, list) or not all(isinstance(f, dict) for f in raw_faults):
        raise top.error("fault", "expected an array of tables ([[fault]] sections)")
    # An experiment without faults needs no fault window; a scenario always has one.
    is_experiment = any(key in data for key in EXPERIMENT_KEYS)
    duration_s = top.duration("duration", required=bool(raw_faults) or not is_experiment,
                              positive=True)
    if duration_s is None:
        duration_s = 0.0
    seed = top.integer("seed")
    workload = _parse_workload(source, data.get("workload"))
    faults = tuple(
        _parse_fault(_Fields(source, f"fault[{index}]", entry), index, _us(duration_s))
        for index, entry in enumerate(raw_faults)
    )
    total = sum(len(spec.nominal_us) for spec in faults)
    if total > MAX_EVENTS:
        raise top.error("fault", f"{total} fault occurrences in all, more than {MAX_EVENTS}")
    return Scenario(
        name=name,
        description=description,
        duration_s=duration_s,
        faults=faults,
        seed=seed,
        workload=workload,
        source=source,
        experiment={key: data[key] for key in EXPERIMENT_KEYS if key in data},
    )


def _nesting(value: object) -> int:
    """How deeply arrays and tables nest in ``value`` (iterative: no recursion limit)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_NESTING:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse_workload(source: str, raw: object) -> WorkloadHints:
    if raw is None:
        return WorkloadHints()
    if not isinstance(raw, dict):
        raise _Fields(source, "", {}).error("workload", "expected a table ([workload])")
    fields = _Fields(source, "workload", raw)
    fields.reject_unknown(_WORKLOAD_KEYS)
    workload = fields.string("workload")
    if workload is not None and not workload.strip():
        raise fields.error("workload", "must not be empty")
    return WorkloadHints(
        pods=fields.integer("pods", minimum=1),
        steps=fields.integer("steps", minimum=0),
        workload=workload,
        rate=fields.integer("rate", minimum=1),
    )


def _parse_fault(fields: _Fields, index: int, duration_us: int) -> FaultSpec:
    if not fields.has("action"):
        raise fields.error("action", f"missing (expected one of {', '.join(ACTIONS)})")
    action = fields.choice("action", ACTIONS, what="action")

    # Keys first, so a typo is reported as a typo rather than as its consequence.
    own_params = _PARAMS.get(action, ())
    takes = f"{action} takes {', '.join(own_params)}" if own_params else f"{action} takes none"
    elsewhere = {
        key: f"not a parameter of {action} ({takes})"
        for key in _ALL_PARAM_KEYS
        if key not in own_params
    }
    fields.reject_unknown((*_FAULT_KEYS, *own_params), elsewhere)

    target = _parse_target(fields, action)
    params = _parse_params(fields, action)
    timing = _parse_timing(fields, action, duration_us)
    return FaultSpec(index=index, action=action, target=target, params=params, **timing)


def _parse_target(fields: _Fields, action: str) -> str | None:
    if action in _NO_TARGET:
        if fields.has("target"):
            raise fields.error("target", _NO_TARGET[action])
        return _DEFAULT_TARGET[action]
    value = fields.string("target")
    if value is None:
        return _DEFAULT_TARGET[action]
    if value in _SELECTORS or _POD_RE.fullmatch(value) or _POD_ANY_RE.fullmatch(value):
        return value
    match = _FRACTION_RE.fullmatch(value)
    if match:
        try:
            share = float(match[1])
        except ValueError:
            raise fields.error(
                "target", f"invalid fraction {value!r}: expected fraction:<number in (0, 1]>"
            ) from None
        if not 0.0 < share <= 1.0:
            raise fields.error(
                "target", f"fraction {match[1]} is out of range: it must be in (0, 1]"
            )
        return f"fraction:{share!r}"
    close = difflib.get_close_matches(value, _SELECTORS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise fields.error("target", f"unknown target {value!r} ({hint}{_TARGET_HINT})")


def _parse_params(fields: _Fields, action: str) -> dict[str, str | float]:
    if action == "partition":
        return {
            "from": fields.choice("from", _PARTITION_FROM, default="store", what="side"),
            "mode": fields.choice("mode", _PARTITION_MODE, default="blackhole", what="mode"),
        }
    if action == "storage-fault":
        error_rate = fields.rate("error_rate")
        disconnect_rate = fields.rate("disconnect_rate")
        if error_rate + disconnect_rate > 1.0:
            raise fields.error("disconnect_rate", "error_rate + disconnect_rate must not exceed 1")
        latency_s = fields.duration("latency") or 0.0
        latency_ms = _us(latency_s) / 1000.0
        if latency_ms > _MAX_LATENCY_MS:
            raise fields.error(
                "latency",
                f"{format_duration(latency_s)} is too long "
                f"(at most {format_duration(_MAX_LATENCY_MS / 1000)})",
            )
        reply_loss_rate = fields.rate("reply_loss_rate")
        if not (error_rate or disconnect_rate or latency_ms or reply_loss_rate):
            raise fields.error(
                None, "storage-fault does nothing: set error_rate, latency, disconnect_rate"
                " or reply_loss_rate"
            )
        return {
            "error_rate": error_rate,
            "latency_ms": latency_ms,
            "disconnect_rate": disconnect_rate,
            "reply_loss_rate": reply_loss_rate,
        }
    return {}


def _parse_timing(fields: _Fields, action: str, duration_us: int) -> dict[str, Any]:
    has_at, has_every = fields.has("at"), fields.has("every")
    if has_at == has_every:
        which = "both" if has_at else "neither"
        raise fields.error(
            "at" if has_at else None, f"{which} of 'at' and 'every' given: set exactly one"
        )
    for_s = fields.duration("for", positive=True)
    if action in _LASTING and for_s is None:
        raise fields.error(
            "for", f'missing: {action} needs to know how long it lasts (e.g. for = "9s")'
        )
    if action not in _LASTING and for_s is not None:
        undo = {"heal": "heals now", "resume": "resumes now"}.get(action, "is instantaneous")
        raise fields.error("for", f"not meaningful for {action}, which {undo}")
    jitter_s = fields.duration("jitter") or 0.0
    for_us, jitter_us = _us(for_s or 0.0), _us(jitter_s)
    # The latest nominal offset whose occurrence starts before the end and,
    # with the worst jitter, ends by it.
    last_us = duration_us - for_us - jitter_us if for_us or jitter_us else duration_us - 1

    def past(key: str, nominal: int, occurrence: str = "a fault") -> ConfigError:
        if not (for_us or jitter_us):
            if nominal > duration_us:
                return fields.error(
                    key,
                    f"{occurrence} at {_fmt_us(nominal)} is past duration {_fmt_us(duration_us)}",
                )
            return fields.error(
                key,
                f"{occurrence} at {_fmt_us(nominal)} is not before the end "
                f"of the scenario (duration {_fmt_us(duration_us)})",
            )
        extra = []
        if jitter_us:
            extra.append(f"+ up to {_fmt_us(jitter_us)} jitter")
        if for_us:
            extra.append(f"lasting {_fmt_us(for_us)}")
        return fields.error(
            key,
            f"{occurrence} at {_fmt_us(nominal)} ({', '.join(extra)}) "
            f"could end at {_fmt_us(nominal + jitter_us + for_us)}, "
            f"past duration {_fmt_us(duration_us)}",
        )

    if has_at:
        for key in ("start", "until", "count"):
            if fields.has(key):
                raise fields.error(key, "only meaningful with 'every', not with 'at'")
        at_s = fields.duration("at")
        assert at_s is not None
        at_us = _us(at_s)
        if at_us > last_us:
            raise past("at", at_us)
        return {"at_s": at_s, "for_s": for_s, "jitter_s": jitter_s, "nominal_us": (at_us,)}

    every_s = fields.duration("every", positive=True)
    assert every_s is not None
    every_us = _us(every_s)
    start_s = fields.duration("start")
    start_us = every_us if start_s is None else _us(start_s)
    until_s = fields.duration("until")
    count = fields.integer("count", minimum=1)
    if until_s is not None:
        until_us = _us(until_s)
        if until_us < start_us:
            raise fields.error(
                "until",
                f"{_fmt_us(until_us)} is before the first occurrence at {_fmt_us(start_us)}",
            )
        if until_us > duration_us:
            raise fields.error(
                "until", f"{_fmt_us(until_us)} is past duration {_fmt_us(duration_us)}"
            )
    if for_us and for_us + jitter_us > every_us:
        # The end of one window would undo (heal/resume) the next one early.
        window = _fmt_us(for_us)
        if jitter_us:
            window += f" plus up to {_fmt_us(jitter_us)} jitter"
        raise fields.error(
            "for",
            f"{window} is longer than the period every = "
            f"{_fmt_us(every_us)}: occurrences would overlap",
        )

    fit = (last_us - start_us) // every_us + 1 if last_us >= start_us else 0
    bounds = [
        n
        for n in (count, None if until_s is None else (_us(until_s) - start_us) // every_us + 1)
        if n is not None
    ]
    if bounds:
        wanted = min(bounds)
        if wanted > fit:
            key = "count" if count is not None and count == wanted else "until"
            raise past(key, start_us + fit * every_us, f"occurrence {fit + 1}")
    else:
        wanted = fit
        if wanted == 0:
            raise past(
                "start" if start_s is not None else "every", start_us, "the first occurrence"
            )
    if wanted > MAX_EVENTS:
        raise fields.error(
            "every",
            f"{wanted} occurrences is too many (at most {MAX_EVENTS}): "
            "use a longer period, or bound it with count or until",
        )
    return {
        "every_s": every_s,
        "start_s": start_us / _US,
        "until_s": until_s,
        "count": count,
        "for_s": for_s,
        "jitter_s": jitter_s,
        "nominal_us": tuple(start_us + k * every_us for k in range(wanted)),
    }


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and validate the scenario file at ``path`` (errors name the path as given)."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read scenario: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    return parse_scenario(text, source=source)


def list_scenarios(directory: str | os.PathLike[str] | None = None) -> list[Scenario]:
    """All scenarios in ``directory`` (default: the packaged ``chaos/scenarios/``), by name.

    The packaged files are read through :mod:`importlib.resources`, so this
    works from an installed wheel as well as from a checkout. Every file must
    be valid and names must be unique; otherwise ConfigError.
    """
    scenarios: list[Scenario] = []
    if directory is None:
        folder = importlib.resources.files("chaos").joinpath("scenarios")
        entries = sorted(
            (e for e in folder.iterdir() if e.name.endswith(".toml")), key=lambda e: e.name
        )
        for entry in entries:
            scenarios.append(
                parse_scenario(
                    entry.read_text(encoding="utf-8"), source=f"chaos/scenarios/{entry.name}"
                )
            )
    else:
        base = Path(directory)
        if not base.is_dir():
            raise ConfigError(f"{base}: not a directory of scenarios")
        scenarios = [load_scenario(path) for path in sorted(base.glob("*.toml"))]
    seen: dict[str, str] = {}
    for scenario in scenarios:
        if scenario.name in seen:
            raise ConfigError(
                f"{scenario.source}: name: {scenario.name!r} is also the name "
                f"of {seen[scenario.name]}"
            )
        seen[scenario.name] = scenario.source
    return sorted(scenarios, key=lambda s: s.name)


def find_scenario(spec: str | os.PathLike[str]) -> Scenario:
    """The scenario ``spec`` names: a path to a ``.toml`` file, or a packaged scenario's name."""
    text = os.fspath(spec)
    if text.endswith(".toml") or os.sep in text or "/" in text or Path(text).is_file():
        return load_scenario(text)
    packaged = list_scenarios()
    for scenario in packaged:
        if scenario.name == text:
            return scenario
    names = ", ".join(s.name for s in packaged)
    raise ConfigError(
        f"unknown scenario {text!r} (packaged: {names}; or give a path to a .toml file)"
    )


# --------------------------------------------------------------------------- targets


class Targets(list[str]):
    """The pods a selector resolved to; when empty, ``reason`` says why."""

    def __init__(self, pods: Iterable[str] = (), reason: str | None = None) -> None:
        super().__init__(pods)
        self.reason = reason


def _natural_key(pod: str) -> tuple[tuple[int, int, str], ...]:
    # pod-2 before pod-10.
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", pod)
        if part
    )


def _describe_pods(pods: Sequence[str]) -> str:
    if not pods:
        return "none"
    numbered = [re.fullmatch(r"(.*?)(\d+)", pod) for pod in pods]
    if len(pods) >= 3 and all(numbered):
        prefixes = {m[1] for m in numbered if m}
        numbers = [int(m[2]) for m in numbered if m]
        if len(prefixes) == 1 and numbers == list(range(numbers[0], numbers[0] + len(pods))):
            return f"{pods[0]}..{pods[-1]}"
    shown = ", ".join(pods[:8])
    return shown if len(pods) <= 8 else f"{shown}, ... ({len(pods)} in all)"


class TargetPicker:
    """Resolves target selectors against the live pods, with its own seeded RNG.

    The same seed and the same sequence of calls give the same picks, whatever
    order ``pods`` comes in (it is sorted by id first). Only ``random`` and
    ``fraction:`` draw from the RNG; ``round-robin`` keeps a cursor: the pod
    after the one it picked last, in id order, wrapping around.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._rng = random.Random(f"fleetsim-targets:{seed}")
        self._last_round_robin: str | None = None

    def pick(self, selector: str, pods: Sequence[str], leader: str | None) -> Targets:
        """The pods ``selector`` means now, sorted by id.

        Returns an empty :class:`Targets` with a ``reason`` when there is
        nothing to hit (no pods, no leader). Raises ConfigError for a pod id
        that is not running, or a selector that is not one.
        """
        live = sorted(set(pods), key=_natural_key)
        if selector == "leader":
            if leader is None:
                return Targets(reason="no leader")
            if leader not in live:
                return Targets(
                    reason=f"leader {leader!r} is not among the pods ({_describe_pods(live)})"
                )
            return Targets([leader])
        pod = _POD_ANY_RE.fullmatch(selector)
        if pod or _POD_RE.fullmatch(selector):
            name = pod[1] if pod else selector
            if name not in live:
                raise ConfigError(f"no pod named {name!r} (pods: {_describe_pods(live)})")
            return Targets([name])
        fraction = _FRACTION_RE.fullmatch(selector)
        share: float | None = None
        if fraction:
            try:
                share = float(fraction[1])
            except ValueError:
                share = None
            if share is None or not 0.0 < share <= 1.0:
                raise ConfigError(f"invalid target {selector!r}: fraction must be in (0, 1]")
        elif selector not in ("random", "all", "round-robin"):
            raise ConfigError(f"unknown target {selector!r} ({_TARGET_HINT})")
        if not live:
            return Targets(reason="no pods")
        if selector == "all":
            return Targets(live)
        if selector == "random":
            return Targets([self._rng.choice(live)])
        if selector == "round-robin":
            after = self._last_round_robin
            later = [p for p in live if after is None or _natural_key(p) > _natural_key(after)]
            chosen = (later or live)[0]
            self._last_round_robin = chosen
            return Targets([chosen])
        assert share is not None
        # Round half up, at least one: fraction:0.5 of 5 pods is 3, of 1 pod is 1.
        count = min(len(live), max(1, math.floor(share * len(live) + 0.5 + 1e-9)))
        return Targets(sorted(self._rng.sample(live, count), key=_natural_key))


# --------------------------------------------------------------------------- fault log

FAULT_LOG = "faults.jsonl"


class FaultLog:
    """Appends the faults actually applied to ``faults.jsonl``, one JSON object a line.

    ``path`` is the file, or a directory to hold ``faults.jsonl``. Each line
    is written and flushed on its own, so the log survives a crash of the
    coordinator up to the last fault. Records (``type``):

    ``start``  scenario name, source, seed, duration and the planned schedule
    ``fault``  a planned fault as applied: resolved ``targets``, ``outcome``
               (``ok``, ``skipped``, ``failed``, ...) and the pods' ``reply``
    ``note``   anything else worth replaying (``heal-all``, ``end``, ...)

    Every record carries the wall-clock ``time`` (UTC, ISO 8601), the
    ``elapsed_s`` since :meth:`start`, the ``scenario`` name and the ``seed``.
    Thread-safe.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        target = Path(path)
        self.path = target / FAULT_LOG if target.is_dir() else target
        self.scenario: str | None = None
        self.seed: int | None = None
        self._started = time.monotonic()
        self._lock = threading.Lock()
        try:
            self._out = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write fault log {self.path}: {exc.strerror}") from None

    def start(
        self, scenario: Scenario, seed: int, schedule: Sequence[PlannedFault] | None = None
    ) -> dict[str, Any]:
        """Record the start of a run of ``scenario`` with ``seed``; return the record."""
        self.scenario, self.seed = scenario.name, seed
        self._started = time.monotonic()
        plan = scenario.schedule(seed) if schedule is None else schedule
        return self._write(
            {
                "type": "start",
                "source": scenario.source,
                "duration_s": scenario.duration_s,
                "schedule": [fault.as_dict() for fault in plan],
            }
        )

    def record(
        self, fault: PlannedFault, targets: Sequence[str], outcome: str, reply: object = None
    ) -> dict[str, Any]:
        """Record one applied fault, its resolved targets and outcome; return the record."""
        return self._write(
            {
                "type": "fault",
                **fault.as_dict(),
                "targets": list(targets),
                "outcome": outcome,
                "reply": reply,
            }
        )

    def note(self, event: str, **details: object) -> dict[str, Any]:
        """Record any other event (``heal-all``, ``end``, ...); return the record."""
        return self._write({"type": "note", "event": event, **details})

    def _write(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            record = {
                "time": datetime.now(UTC).isoformat(),
                "elapsed_s": round(time.monotonic() - self._started, 6),
                "scenario": self.scenario,
                "seed": self.seed,
                **body,
            }
            line = json.dumps(record, separators=(",", ":"), default=str)
            self._out.write(line + "\n")
            self._out.flush()
        return record

    def close(self) -> None:
        """Close the file (later writes fail)."""
        with self._lock:
            self._out.close()

    def __enter__(self) -> FaultLog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def read_fault_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a fault log (a file, or a directory holding ``faults.jsonl``).

    A torn last line (the writer died mid-line) is ignored; any other
    malformed line raises ConfigError naming the line.
    """
    target = Path(path)
    if target.is_dir():
        target = target / FAULT_LOG
    try:
        text = target.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read fault log {target}: {exc.strerror}") from None
    return list(_records(target, text))


def _records(path: Path, text: str) -> Iterator[dict[str, Any]]:
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # no newline after it: torn by a crash
                return
            raise ConfigError(f"{path}:{number}: not a JSON fault record") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{number}: not a JSON fault record")
        yield record
