"""Pass/fail thresholds of an experiment, judged on a run's JSON result.

An experiment's ``[thresholds]`` table maps a figure name to a condition::

    [thresholds]
    valid = true                 # a boolean: the figure must equal it
    lost = "== 0"                # "<op> <number>", op one of < <= > >= == !=
    e2e_p99_s = "< 2.0"
    success_pct = ">= 99"

A name is looked up among the result's top-level keys (``valid``,
``completed``, ``lost`` ...) and then among ``result["figures"]``. Names
are checked when the file is read, so a typo fails before anything starts;
a known figure the run did not measure (absent, or null) fails its
threshold as ``not measured``.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from fleetsim.errors import ConfigError
from fleetsim.figures import FIGURE_NAMES as RUN_FIGURE_NAMES
from fleetsim.trends import THRESHOLD_NAMES as TREND_NAMES

__all__ = [
    "FIGURE_NAMES",
    "RESULT_NAMES",
    "Threshold",
    "ThresholdResult",
    "evaluate",
    "parse_thresholds",
]

#: Top-level keys of `fleetsim run --json` a threshold may name.
RESULT_NAMES: Final = frozenset({
    "valid", "submitted", "completed", "dead", "cancelled", "rejected", "lost",
    "duplicate_completions", "elapsed_s", "steps_per_s", "pods_with_work", "violations_total",
})
#: Keys of ``result["figures"]`` a threshold may name: the checker's
#: failover, recovery and claim-to-completion times, flattened, and the
#: run's own latency/throughput/resource figures (fleetsim.figures), and
#: the resource trends' maxima (fleetsim.trends: null for a run too short
#: for trends). A known figure a run did not measure fails as "not
#: measured", not as a typo.
FIGURE_NAMES: Final = frozenset({
    "failover_max_s", "failover_median_s", "orphan_recovery_max_s",
    "claim_to_completion_p50_s", "claim_to_completion_p99_s",
    *RUN_FIGURE_NAMES, *TREND_NAMES,
})

_OPS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
    "<": operator.lt, ">": operator.gt,
}
_CONDITION_RE: Final = re.compile(r"\s*(<=|>=|==|!=|<|>)\s*([-+]?[0-9][0-9_]*(?:\.[0-9_]*)?"
                                  r"(?:[eE][-+]?[0-9]+)?)\s*")


@dataclass(frozen=True)
class Threshold:
    """One condition on one figure: ``name op expected``."""

    name: str
    condition: str  # as written: "< 2.0", or "== true" for a boolean
    op: str
    expected: float | bool

    def check(self, value: Any) -> bool:
        """Whether ``value`` meets the condition (False for a missing or non-number value)."""
        if value is None:
            return False
        if isinstance(self.expected, bool):
            return isinstance(value, bool) and bool(_OPS[self.op](value, self.expected))
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return False
        return bool(_OPS[self.op](value, self.expected))


@dataclass(frozen=True)
class ThresholdResult:
    """A threshold with the value the run measured and its verdict."""

    threshold: Threshold
    value: Any
    passed: bool

    def as_dict(self) -> dict[str, Any]:
        """The JSON row: ``{"name", "condition", "value", "passed"}``."""
        return {"name": self.threshold.name, "condition": self.threshold.condition,
                "value": self.value, "passed": self.passed}

    def describe(self) -> str:
        """One line: ``threshold e2e_p99_s < 2.0: 2.4 FAILED``."""
        shown = "not measured" if self.value is None else self.value
        verdict = "ok" if self.passed else "FAILED"
        return f"threshold {self.threshold.name} {self.threshold.condition}: {shown} {verdict}"


def parse_thresholds(table: object, source: str = "<string>",
                     known: frozenset[str] = RESULT_NAMES | FIGURE_NAMES,
                     ) -> tuple[Threshold, ...]:
    """The thresholds of a ``[thresholds]`` table; ConfigError (one line) for any bad entry."""
    if table is None:
        return ()
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: thresholds: expected a table ([thresholds])")
    parsed = []
    for name, raw in table.items():
        where = f"{source}: thresholds.{name}"
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else (
                "known: " + ", ".join(sorted(known)))
            raise ConfigError(f"{where}: unknown figure ({hint})")
        if isinstance(raw, bool):
            parsed.append(Threshold(name, f"== {str(raw).lower()}", "==", raw))
            continue
        if isinstance(raw, int | float):
            if not math.isfinite(raw):
                raise ConfigError(f"{where}: {raw!r} is not a finite number")
            parsed.append(Threshold(name, f"== {raw:g}", "==", float(raw)))
            continue
        if not isinstance(raw, str):
            raise ConfigError(f'{where}: expected a condition such as "< 2.0" or a boolean')
        match = _CONDITION_RE.fullmatch(raw)
        if match is None:
            raise ConfigError(f"{where}: invalid condition {raw!r} (expected <, <=, >, >=, == "
                              'or != and a number, e.g. "< 2.0")')
        op, number = match.groups()
        expected = float(number.replace("_", ""))
        if not math.isfinite(expected):  # "< 1e400" would pass any value
            raise ConfigError(f"{where}: {number} is not a finite number")
        parsed.append(Threshold(name, f"{op} {number}", op, expected))
    return tuple(parsed)


def lookup(result: Mapping[str, Any], name: str) -> Any:
    """The value of figure ``name`` in a run's result: top level, then ``figures``."""
    if name in result and name != "figures":
        return result[name]
    figures = result.get("figures")
    if isinstance(figures, Mapping):
        return figures.get(name)
    return None


def evaluate(thresholds: tuple[Threshold, ...],
             result: Mapping[str, Any]) -> list[ThresholdResult]:
    """Judge every threshold against ``result`` (a run's JSON), in file order."""
    rows = []
    for threshold in thresholds:
        value = lookup(result, threshold.name)
        rows.append(ThresholdResult(threshold, value, threshold.check(value)))
    return rows
