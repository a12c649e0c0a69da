"""What PostgreSQL can store: checks by the store's rules, not Python's.

``json.dumps`` accepts NaN and infinities and escapes a NUL character or a
lone surrogate as ``\\u0000`` / ``\\udc80``; PostgreSQL's ``jsonb`` refuses all
of them, and ``text`` refuses NUL. A value that passes Python's encoder but
not the server's fails its whole statement, so a batch write carrying it
fails for every step in it: such values are caught here, before they are
sent, one step at a time.
"""

from __future__ import annotations

import math
from typing import Any

from fleetsim.errors import UnstorableValue

# Deeper documents are refused rather than risk Python's recursion limit.
MAX_DEPTH = 200


def check_storable(value: Any, what: str = "value") -> None:
    """Raise UnstorableValue if ``value`` is not a JSON document ``jsonb`` can hold.

    ``what`` names the value in the error (``"step 17's result"``).
    """
    problem = _problem(value, 0)
    if problem is not None:
        raise UnstorableValue(f"{what} cannot be stored: {problem}")


def storable_text(text: str) -> str:
    """``text`` with what PostgreSQL's ``text`` and ``jsonb`` refuse replaced.

    For diagnostic strings (a step's error message), where keeping the
    message matters more than keeping every character.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _problem(value: Any, depth: int) -> str | None:
    if depth > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value!r} is not a JSON number"
    if isinstance(value, str):
        return _text_problem(value)
    if isinstance(value, list | tuple):
        for item in value:
            problem = _problem(item, depth + 1)
            if problem is not None:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"key {key!r} is not a string"
            problem = _text_problem(key) or _problem(item, depth + 1)
            if problem is not None:
                return problem
        return None
    return f"{type(value).__name__} is not JSON"


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "a string contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "a string contains a lone surrogate"
    return None
