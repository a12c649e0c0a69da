"""The store builds each statement's SQLAlchemy text once (no store needed)."""

from __future__ import annotations

import pytest

from fleetsim.store import store


@pytest.mark.timeout(10)
def test_statement_texts_are_built_once() -> None:
    """text() parses its binds with a regex on every construction; the store's
    statements go through ``_text`` on every call, hot paths included, so it
    must hand back the one object per SQL. (Its cache decorator once slid onto
    the function inserted above it, unnoticed.)"""
    sql = "SELECT 1 WHERE :a = :a  -- test_statement_texts_are_built_once"
    assert store._text(sql) is store._text(sql)
