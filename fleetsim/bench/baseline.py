"""Baselines: what a bench measured, stored, and a later run compared to it.

Only ratios to the reference loop of the same run are compared, never
absolute times: machines differ and a shared one is noisy, but a slower
claim path lowers the ratio wherever it runs. Per fleet configuration:

- ``ratio``: steps/s ÷ the reference's (higher is better);
- ``cpu_ratio``: client CPU per step ÷ the reference's (lower is better);
- ``server_cpu_ratio``: the server backends' CPU per step ÷ the reference's
  (lower is better; a local server only).

On a busy shared machine the CPU ratios are far steadier than the
throughput ratio (CPU per step does not depend on who else runs; steps per
second does), so they catch a costlier claim path sooner.

A figure regresses when it is worse than the baseline's by more than the
tolerance (``--max-regression``, 10% by default).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetsim.errors import ConfigError

FORMAT = "fleetsim-bench-baseline/1"
# (figure, higher is better)
FIGURES = (("ratio", True), ("cpu_ratio", False), ("server_cpu_ratio", False))


@dataclass(frozen=True)
class Regression:
    """One figure of one configuration that got worse than the baseline allows."""

    key: str
    figure: str
    baseline: float
    current: float
    tolerance: float

    def describe(self) -> str:
        """One line for people."""
        change = (self.current - self.baseline) / self.baseline * 100
        return (f"{self.key}: {self.figure} {self.current:.3f} vs baseline "
                f"{self.baseline:.3f} ({change:+.1f}%, tolerance {self.tolerance:.0%})")


def parse_tolerance(text: str) -> float:
    """``10%`` or ``0.1`` -> 0.1."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(
            f"--max-regression takes a percentage such as 10%, got {text!r}") from None
    if not 0 <= value < 1:
        raise ConfigError(f"--max-regression must be from 0% to below 100%, got {text!r}")
    return value


def machine_facts(pg_version: str | None) -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(), "cpu_model": cpu, "postgresql": pg_version,
        "python": sys.version.split()[0], "platform": platform.platform(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def baseline_of(rows: list[dict[str, Any]], machine: dict[str, Any],
                command: str) -> dict[str, Any]:
    """The baseline document of a bench's summary rows."""
    figures: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["kind"] != "fleet":
            continue
        entry = {name: row[name] for name, _ in FIGURES if row.get(name) is not None}
        if entry:
            figures[row["key"]] = entry
    return {"format": FORMAT, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command, "machine": machine, "figures": figures}


def load_baseline(path: Path) -> dict[str, Any]:
    """Read a baseline file (ConfigError if it is not one)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read baseline {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a fleetsim bench baseline (format {FORMAT})")
    return data


def compare(baseline: dict[str, Any], rows: list[dict[str, Any]],
            tolerance: float) -> tuple[list[Regression], list[str]]:
    """Regressions of ``rows`` against ``baseline``, and the configurations not compared.

    A figure is taken as its median over the repeats. A baseline figure
    this run did not measure is listed as not compared; ConfigError if
    nothing at all could be compared (a gate that compares nothing passes
    nothing).
    """
    regressions: list[Regression] = []
    current = {row["key"]: row for row in rows if row["kind"] == "fleet"}
    missing = []
    compared = 0
    for key, figures in sorted(baseline.get("figures", {}).items()):
        row = current.get(key)
        if row is None:
            missing.append(key)
            continue
        for name, higher_is_better in FIGURES:
            base = figures.get(name)
            now = row.get(name)
            now_value = now["median"] if isinstance(now, dict) else now
            if base is None:
                continue
            if now_value is None:
                missing.append(f"{key} {name}")
                continue
            compared += 1
            base_value = base["median"] if isinstance(base, dict) else float(base)
            worse = (now_value < base_value * (1 - tolerance) if higher_is_better
                     else now_value > base_value * (1 + tolerance))
            if worse:
                regressions.append(Regression(key, name, base_value, now_value, tolerance))
    if not compared:
        raise ConfigError("nothing of the baseline was measured in this run (its "
                          f"configurations: {', '.join(sorted(baseline.get('figures', {})))}"
                          "): run them to compare")
    return regressions, missing
