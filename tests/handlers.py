"""Step handlers the tests start pods with (``--workload tests.handlers:NAME``)."""

from __future__ import annotations

from typing import Any


def bad_results(payload: dict[str, Any]) -> Any:
    """Return what ``payload["kind"]`` asks for, including values jsonb refuses."""
    kind = payload.get("kind")
    if kind == "nan":
        return {"x": float("nan")}
    if kind == "inf":
        return [float("inf")]
    if kind == "nul":
        return "a\x00b"
    if kind == "surrogate":
        return {"s": "\udc80"}
    if kind == "nul-error":
        raise ValueError("bad \x00 byte")
    return {"ok": True}
