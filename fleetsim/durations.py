"""Durations as people write them: ``500ms``, ``8s``, ``2m``, ``1h``.

Every timeout, lease, heartbeat interval and fault duration in options,
scenario files and the environment goes through :func:`parse_duration`, so
they all accept the same spellings and fail with the same one-line message.
Internally a duration is always a float number of seconds.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import click

from fleetsim.errors import ConfigError

__all__ = ["DurationType", "format_duration", "parse_duration"]

#: Seconds per unit. Deliberately only four units: ``us`` or ``d`` would
#: invite typos such as ``5d`` meant as seconds, and nothing here needs them.
_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# A plain decimal number (no sign: negatives get their own message, no
# exponent: ``1e3s`` reads like a typo) followed by an optional unit.
_DURATION_RE = re.compile(r"(?P<sign>[+-]?)\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-z]*)")

if TYPE_CHECKING:
    _FloatParamType = click.ParamType[float]
else:
    # ParamType is only subscriptable from click 8.4; setup.cfg allows 8.1.
    _FloatParamType = click.ParamType

_HINT = "use a number with ms, s, m or h (e.g. 500ms, 8s, 2m)"


def _invalid(text: object, reason: str = _HINT) -> ConfigError:
    shown = repr(text.strip()) if isinstance(text, str) else repr(text)
    return ConfigError(f"invalid duration {shown}: {reason}")


def parse_duration(text: str | float | int) -> float:
    """Return the duration *text* in seconds.

    Accepts ``500ms``, ``8s``, ``2m``, ``1h``, ``1.5s`` and bare numbers
    (seconds), with whitespace around the value or between number and unit;
    units are case-insensitive. A number (``int`` or ``float``) is taken as
    seconds. Raises :class:`~fleetsim.errors.ConfigError` with a one-line
    message naming the value for anything else: empty text, negative
    durations, NaN or infinity, unknown units.
    """
    if isinstance(text, bool):
        # bool is an int subclass; True as "1 second" is always a mistake.
        raise _invalid(text, "expected a duration, not a boolean")
    if isinstance(text, int | float):
        seconds = float(text)
    elif isinstance(text, str):
        match = _DURATION_RE.fullmatch(text.strip().lower())
        if match is None:
            raise _invalid(text)
        unit = match["unit"] or "s"
        if unit not in _UNITS:
            raise _invalid(text)
        if match["sign"] == "-":
            raise _invalid(text, "durations cannot be negative")
        number = float(match["number"])
        # Divide for ms: 500/1000 is correctly rounded, 500*0.001 is not.
        seconds = number / 1000.0 if unit == "ms" else number * _UNITS[unit]
    else:
        raise _invalid(text, f"expected text or a number, not {type(text).__name__}")
    if not math.isfinite(seconds):
        raise _invalid(text, "must be a finite number")
    if seconds < 0:
        raise _invalid(text, "durations cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """Return *seconds* in the shortest unit-suffixed form, for display.

    Whole hours and minutes show as ``2h`` and ``5m``; other durations of a
    second or more in seconds rounded to the millisecond (``1.5s``,
    ``90s``); shorter ones in milliseconds rounded to the microsecond
    (``250ms``, ``0.5ms``). The result always parses back with
    :func:`parse_duration` to within that rounding. Negative durations (a
    clock difference, say) get a leading ``-``; NaN and infinity raise
    :class:`ValueError`.
    """
    if not math.isfinite(seconds):
        raise ValueError(f"cannot format non-finite duration {seconds!r}")
    if seconds < 0:
        return "-" + format_duration(-seconds)
    # Round once, in integers, so that the unit chosen and the digits shown
    # agree: 0.9999996 s becomes 1 s, not "1000.000ms".
    micros = round(seconds * 1_000_000)
    if micros == 0:
        return "0s"
    if micros < 1_000_000:
        return _decimal(micros, 1000) + "ms"
    # Rounded from the seconds, not from the microseconds: rounding twice
    # can land more than half a millisecond away (1.5194997 s -> 1.52 s).
    millis = round(seconds * 1000)
    if millis % 3_600_000 == 0:
        return f"{millis // 3_600_000}h"
    if millis % 60_000 == 0:
        return f"{millis // 60_000}m"
    return _decimal(millis, 1000) + "s"


def _decimal(value: int, scale: int) -> str:
    """Render ``value / scale`` without float noise or trailing zeros."""
    whole, fraction = divmod(value, scale)
    if fraction == 0:
        return str(whole)
    digits = len(str(scale)) - 1
    return f"{whole}.{fraction:0{digits}d}".rstrip("0")


class DurationType(_FloatParamType):
    """A click parameter type for durations (``--lease 8s``), via :func:`parse_duration`."""

    name = "DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        """Return *value* in seconds, or fail with parse_duration's message."""
        try:
            return parse_duration(value)
        except ConfigError as error:
            self.fail(str(error), param, ctx)
