"""Experiments: a scenario file that also describes the fleet, the queues, the load and
the thresholds that pass or fail the run (``fleetsim run FILE``).

One format: an experiment is a scenario (:mod:`chaos.scenario`: ``name``,
``duration``, ``seed``, ``[workload]`` hints, ``[[fault]]``) plus any of::

    [fleet]                      # CLI: --pods --workload --concurrency --batch --queue ...
    pods = 5
    lease = "3s"                 # and heartbeat, renew, dead_after, recovery, grace
    [[fleet.group]]              # heterogeneous fleets: instead of `pods`
    name = "slow"
    pods = 2
    workload = "sleep:50"
    queues = ["orders"]

    [[queue]]
    name = "orders"
    concurrency_limit = 5
    strict_fifo = true

    [load]
    duration = "30s"             # open loop: `rate` steps/s for `duration`, seeded
    rate = 40                    # (or steps = N: submit N at once and drain)
    [[load.mix]]
    weight = 3
    queue = "orders"
    workload = "sleep:20"

    [thresholds]                 # see fleetsim.thresholds
    valid = true
    lost = "== 0"

Parsing is pure and strict like the scenario's: every error is one
:class:`~fleetsim.errors.ConfigError` line naming the file and the field.
The fleet settings come out in the command line's names
(:attr:`Experiment.settings`), so ``fleetsim run`` can let an option given
on the command line override the file, and the file override the
scenario's ``[workload]`` hints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from chaos.scenario import Scenario, _Fields, find_scenario, parse_scenario
from fleetsim.config import PodGroup
from fleetsim.errors import ConfigError
from fleetsim.thresholds import Threshold, parse_thresholds

__all__ = [
    "Experiment",
    "LoadPlan",
    "MixEntry",
    "QueuePlan",
    "experiment_from",
    "find_experiment",
    "parse_experiment",
]

_TIMINGS: Final = ("heartbeat", "lease", "renew", "dead_after", "recovery", "grace")
_FLEET_KEYS: Final = ("pods", "workload", "concurrency", "batch", "queues", "restart",
                      "group", *_TIMINGS)
_GROUP_KEYS: Final = ("name", "pods", "workload", "concurrency", "batch", "queues")
_QUEUE_KEYS: Final = ("name", "concurrency_limit", "max_length", "strict_fifo",
                      "max_attempts", "timeout")
_LOAD_KEYS: Final = ("steps", "duration", "rate", "timeout", "mix")
_MIX_KEYS: Final = ("weight", "queue", "workload", "priority", "max_attempts")


@dataclass(frozen=True)
class QueuePlan:
    """A ``[[queue]]``: its settings, made before any step is submitted."""

    name: str
    concurrency_limit: int | None = None
    max_length: int | None = None
    strict_fifo: bool = False
    max_attempts: int = 3  # of the steps the load submits to it
    timeout_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class MixEntry:
    """One kind of step in the load: drawn with probability weight / total weight."""

    weight: float = 1.0
    queue: str | None = None  # None: the fleet's first named queue, else "default"
    workload: str | None = None  # None: the serving pod's own workload
    priority: int = 0
    max_attempts: int | None = None  # None: the queue's (3 unless [[queue]] says)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class LoadPlan:
    """``[load]``: drain mode (``steps``) or open loop (``duration`` at ``rate``)."""

    steps: int | None = None
    duration_s: float | None = None
    rate: float | None = None
    timeout_s: float | None = None  # drain deadline after the load (CLI --timeout)
    mix: tuple[MixEntry, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**self.__dict__, "mix": [m.as_dict() for m in self.mix]}


@dataclass(frozen=True)
class Experiment:
    """A scenario plus the fleet, queues, load and thresholds of one run."""

    scenario: Scenario
    #: Fleet and load settings the file gives, in `fleetsim run`'s option
    #: names (pods, workload, concurrency, batch, queues, restart, heartbeat,
    #: lease, renew, dead_after, recovery, grace, steps, duration, rate,
    #: timeout, seed).
    #: The scenario's [workload] hints are folded in below the file's own.
    settings: Mapping[str, Any] = field(default_factory=dict)
    groups: tuple[PodGroup, ...] = ()
    queues: tuple[QueuePlan, ...] = ()
    load: LoadPlan = LoadPlan()
    thresholds: tuple[Threshold, ...] = ()

    @property
    def name(self) -> str:
        """The file's ``name``."""
        return self.scenario.name

    @property
    def has_faults(self) -> bool:
        """Whether a fault schedule runs alongside the load."""
        return bool(self.scenario.faults)


def parse_experiment(text: str, source: str = "<string>") -> Experiment:
    """Parse and validate an experiment (or a plain scenario) from TOML ``text``."""
    return experiment_from(parse_scenario(text, source))


def find_experiment(spec: str | os.PathLike[str]) -> Experiment:
    """The experiment ``spec`` names: a ``.toml`` path or a packaged scenario's name."""
    return experiment_from(find_scenario(spec))


def experiment_from(scenario: Scenario) -> Experiment:
    """Validate the experiment sections of a parsed scenario."""
    source, raw = scenario.source, scenario.experiment
    settings: dict[str, Any] = dict(scenario.workload.as_dict())  # hints, lowest
    if "rate" in settings:
        settings["rate"] = float(settings["rate"])
        if "steps" not in settings:
            # A trickle hint: that many steps/s while the scenario runs (as the
            # test harness does), ending a little before its faults do.
            settings["duration"] = max(1.0, scenario.duration_s - 2.0)
    groups: tuple[PodGroup, ...] = ()
    if "fleet" in raw:
        fleet_settings, groups = _parse_fleet(source, raw["fleet"])
        settings.update(fleet_settings)
        if groups:
            settings.pop("pods", None)  # a hint's pod count gives way to the groups
            settings.pop("workload", None)
    queues = _parse_queues(source, raw.get("queue"))
    load = _parse_load(source, raw.get("load"))
    if load.steps is not None:
        settings["steps"] = load.steps
        settings.pop("duration", None)
        settings.pop("rate", None)
        if load.rate is not None:
            settings["rate"] = load.rate  # drain mode, submitted at that rate
    if load.duration_s is not None:
        settings.pop("steps", None)
        settings["duration"] = load.duration_s
        settings["rate"] = load.rate
    if load.timeout_s is not None:
        settings["timeout"] = load.timeout_s
    if scenario.seed is not None:
        settings["seed"] = scenario.seed
    thresholds = parse_thresholds(raw.get("thresholds"), source)
    names = {q.name for q in queues}
    for index, entry in enumerate(load.mix):
        if entry.queue is not None and entry.queue == "*":
            raise ConfigError(f"{source}: load.mix[{index}].queue: '*' is not a queue name")
    if len(names) != len(queues):
        raise ConfigError(f"{source}: queue: a queue name appears twice")
    return Experiment(scenario, settings, groups, queues, load, thresholds)


# -- sections -------------------------------------------------------------------


def _table(source: str, where: str, raw: object) -> _Fields:
    if not isinstance(raw, dict):
        raise _Fields(source, "", {}).error(where, "expected a table")
    return _Fields(source, where, raw)


def _tables(source: str, where: str, raw: object) -> list[_Fields]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise _Fields(source, "", {}).error(where, f"expected an array of tables ([[{where}]])")
    return [_Fields(source, f"{where}[{i}]", entry) for i, entry in enumerate(raw)]


def _bool(fields: _Fields, key: str) -> bool | None:
    if not fields.has(key):
        return None
    value = fields.table[key]
    if not isinstance(value, bool):
        raise fields.error(key, "expected true or false")
    return value


def _number(fields: _Fields, key: str, positive: bool = True) -> float | None:
    if not fields.has(key):
        return None
    value = fields.table[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fields.error(key, "expected a number")
    if positive and not value > 0:
        raise fields.error(key, f"must be more than 0, got {value}")
    return float(value)


def _queues(fields: _Fields, key: str) -> tuple[str, ...] | None:
    if not fields.has(key):
        return None
    value = fields.table[key]
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not value
            or not all(isinstance(q, str) and q.strip() for q in value)):
        raise fields.error(key, 'expected a list of queue names, e.g. ["orders"] (or ["*"])')
    return tuple(value)


def _workload(fields: _Fields, key: str = "workload") -> str | None:
    value = fields.string(key)
    if value is not None and not value.strip():
        raise fields.error(key, "must not be empty")
    return value


def _parse_fleet(source: str, raw: object) -> tuple[dict[str, Any], tuple[PodGroup, ...]]:
    fields = _table(source, "fleet", raw)
    fields.reject_unknown(_FLEET_KEYS, {"groups": "unknown key (did you mean [[fleet.group]]?)"})
    settings: dict[str, Any] = {}
    for key in ("pods", "concurrency", "batch"):
        value = fields.integer(key, minimum=1)
        if value is not None:
            settings[key] = value
    workload = _workload(fields)
    if workload is not None:
        settings["workload"] = workload
    queues = _queues(fields, "queues")
    if queues is not None:
        settings["queues"] = queues
    restart = _bool(fields, "restart")
    if restart is not None:
        settings["restart"] = restart
    for key in _TIMINGS:
        seconds = fields.duration(key, positive=True)
        if seconds is not None:
            settings[key] = seconds
    groups = []
    for group in _tables(source, "fleet.group", fields.table.get("group")):
        group.reject_unknown(_GROUP_KEYS)
        name = group.string("name", required=True)
        assert name is not None
        try:
            groups.append(PodGroup(
                name=name, pods=group.integer("pods", minimum=1) or 1,
                workload=_workload(group) or workload or "noop",
                concurrency=group.integer("concurrency", minimum=1)
                or settings.get("concurrency", 1),
                batch=group.integer("batch", minimum=1) or settings.get("batch", 50),
                queues=_queues(group, "queues") or settings.get("queues", ("*",)),
            ))
        except ConfigError as exc:
            raise group.error(None, str(exc)) from None
    if groups and "pods" in settings:
        raise fields.error("pods", "give pods or [[fleet.group]] sections, not both")
    if len({g.name for g in groups}) != len(groups):
        raise fields.error("group", "a group name appears twice")
    return settings, tuple(groups)


def _parse_queues(source: str, raw: object) -> tuple[QueuePlan, ...]:
    plans = []
    for fields in _tables(source, "queue", raw):
        fields.reject_unknown(_QUEUE_KEYS)
        name = fields.string("name", required=True)
        assert name is not None
        if not name.strip() or name == "*":
            raise fields.error("name", f"invalid queue name {name!r}")
        plans.append(QueuePlan(
            name=name,
            concurrency_limit=fields.integer("concurrency_limit", minimum=1),
            max_length=fields.integer("max_length", minimum=1),
            strict_fifo=bool(_bool(fields, "strict_fifo")),
            max_attempts=fields.integer("max_attempts", minimum=1) or 3,
            timeout_s=fields.duration("timeout", positive=True),
        ))
    return tuple(plans)


def _parse_load(source: str, raw: object) -> LoadPlan:
    if raw is None:
        return LoadPlan()
    fields = _table(source, "load", raw)
    fields.reject_unknown(_LOAD_KEYS)
    steps = fields.integer("steps", minimum=1)
    duration_s = fields.duration("duration", positive=True)
    rate = _number(fields, "rate")
    if steps is not None and duration_s is not None:
        raise fields.error("steps", "give steps (drain mode) or duration with rate, not both")
    if duration_s is not None and rate is None:
        raise fields.error("rate", "missing: an open-loop load needs a rate (steps/s)")
    if rate is not None and steps is None and duration_s is None:
        raise fields.error("duration", "missing: a rate needs a duration (e.g. \"30s\")")
    mix = []
    for entry in _tables(source, "load.mix", fields.table.get("mix")):
        entry.reject_unknown(_MIX_KEYS)
        priority = entry.integer("priority")
        mix.append(MixEntry(
            weight=_number(entry, "weight") or 1.0,
            queue=entry.string("queue"),
            workload=_workload(entry),
            priority=priority or 0,
            max_attempts=entry.integer("max_attempts", minimum=1),
        ))
    return LoadPlan(steps=steps, duration_s=duration_s, rate=rate,
                    timeout_s=fields.duration("timeout", positive=True), mix=tuple(mix))
