"""Tests for fleetsim.durations: parsing, display and the click type."""

from __future__ import annotations

import math

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from fleetsim.durations import DurationType, format_duration, parse_duration
from fleetsim.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("8s", 8.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0.25h", 900.0),
        (".5s", 0.5),
        ("5.", 5.0),
        ("3", 3.0),
        ("0", 0.0),
        ("0ms", 0.0),
        ("  8s  ", 8.0),
        ("8 s", 8.0),
        ("\t2m\n", 120.0),
        ("1.5S", 1.5),
        ("500MS", 0.5),
        ("+2s", 2.0),
        ("1ms", 0.001),
        (8, 8.0),
        (0, 0.0),
        (1.5, 1.5),
    ],
)
def test_parse_accepts(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("5x", "use a number with ms, s, m or h"),
        ("250us", "use a number with ms, s, m or h"),
        ("5d", "use a number with ms, s, m or h"),
        ("", "use a number with ms, s, m or h"),
        ("   ", "use a number with ms, s, m or h"),
        ("s", "use a number with ms, s, m or h"),
        ("ms", "use a number with ms, s, m or h"),
        ("1h30m", "use a number with ms, s, m or h"),
        ("5 m s", "use a number with ms, s, m or h"),
        ("1e3s", "use a number with ms, s, m or h"),
        ("1,5s", "use a number with ms, s, m or h"),
        ("nan", "use a number with ms, s, m or h"),
        ("inf", "use a number with ms, s, m or h"),
        ("-5s", "cannot be negative"),
        ("-0.1", "cannot be negative"),
        ("9" * 400, "finite"),
        (-1, "cannot be negative"),
        (-0.001, "cannot be negative"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (True, "boolean"),
    ],
)
def test_parse_rejects_with_one_line_naming_the_value(text: str | float, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(text)
    message = str(caught.value)
    assert message.startswith("invalid duration ")
    assert reason in message
    assert "\n" not in message
    shown = repr(text.strip()) if isinstance(text, str) else repr(text)
    assert shown in message


def test_parse_rejects_other_types() -> None:
    with pytest.raises(ConfigError, match="not NoneType"):
        parse_duration(None)  # type: ignore[arg-type]


def test_documented_message() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration("5x")
    assert str(caught.value) == (
        "invalid duration '5x': use a number with ms, s, m or h (e.g. 500ms, 8s, 2m)"
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0000001, "0s"),
        (0.0005, "0.5ms"),
        (0.001, "1ms"),
        (0.25, "250ms"),
        (0.5, "500ms"),
        (0.9999996, "1s"),
        (1, "1s"),
        (1.5, "1.5s"),
        (8, "8s"),
        (59.5, "59.5s"),
        (60, "1m"),
        (90, "90s"),
        (120, "2m"),
        (3600, "1h"),
        (5400, "90m"),
        (7200, "2h"),
        (3725.25, "3725.25s"),
        (-2, "-2s"),
    ],
)
def test_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_format_rejects_non_finite(value: float) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        format_duration(value)


_SECONDS = st.floats(min_value=0, max_value=10**9, allow_nan=False, allow_infinity=False)


@given(_SECONDS)
def test_format_parses_back_within_display_rounding(seconds: float) -> None:
    back = parse_duration(format_duration(seconds))
    # Shown to the microsecond below one second and to the millisecond above.
    tolerance = 0.5e-6 if seconds < 0.999 else 0.5e-3
    assert abs(back - seconds) <= tolerance * (1 + 1e-9) + seconds * 1e-15


@given(_SECONDS)
def test_format_is_stable_on_its_own_output(seconds: float) -> None:
    text = format_duration(seconds)
    assert format_duration(parse_duration(text)) == text


@given(st.integers(min_value=0, max_value=10**9))
def test_whole_milliseconds_round_trip_exactly(millis: int) -> None:
    assert parse_duration(format_duration(millis / 1000)) == millis / 1000


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["ms", "s", "m", "h", ""]),
    st.sampled_from(["", " ", "  "]),
)
def test_integer_spellings(number: int, unit: str, space: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "": 1}[unit]
    expected = number / 1000 if unit == "ms" else number * factor
    assert parse_duration(f"{space}{number}{space}{unit}{space}") == expected


@click.command()
@click.option("--lease", type=DurationType(), default="8s", show_default=True)
def _lease_command(lease: float) -> None:
    click.echo(repr(lease))


def test_click_type_converts() -> None:
    result = CliRunner().invoke(_lease_command, ["--lease", "500ms"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "0.5"


def test_click_type_default_goes_through_parse() -> None:
    result = CliRunner().invoke(_lease_command, [])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "8.0"


def test_click_type_fails_with_the_message() -> None:
    result = CliRunner().invoke(_lease_command, ["--lease", "5x"])
    assert result.exit_code == 2
    assert "invalid duration '5x': use a number with ms, s, m or h" in result.output


def test_click_type_metadata_and_direct_values() -> None:
    duration = DurationType()
    assert duration.name == "DURATION"
    assert duration.convert(2.5, None, None) == 2.5
    assert duration.convert("2m", None, None) == 120.0
    with pytest.raises(click.BadParameter, match="cannot be negative"):
        duration.convert("-1s", None, None)
    result = CliRunner().invoke(_lease_command, ["--help"])
    assert "DURATION" in result.output
