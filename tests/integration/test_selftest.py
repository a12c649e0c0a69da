"""The checker's self-test: store mutants under chaos must be caught."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fleetsim.errors import ConfigError
from fleetsim.selftest.mutants import MUTANTS, Mutant, apply_mutant, parse_mutants
from fleetsim.selftest.runner import TRIALS, run_selftest


def test_every_mutant_has_a_trial_and_its_guard_is_in_its_statement() -> None:
    from fleetsim.store import queries

    assert set(TRIALS) == set(MUTANTS)
    for mutant in MUTANTS.values():
        assert getattr(queries, mutant.statement).count(mutant.old) == 1, mutant.name


def test_a_mutant_whose_guard_is_gone_refuses_to_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetsim.selftest import mutants

    ghost = Mutant("ghost", "COMPLETE", "no such fragment", "", "nothing")
    monkeypatch.setitem(mutants.MUTANTS, "ghost", ghost)
    with pytest.raises(ConfigError, match="no longer in COMPLETE"):
        apply_mutant("ghost")


def test_unknown_mutant_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown mutant nope"):
        parse_mutants("claim-without-lock,nope")
    assert [m.name for m in parse_mutants("all")] == list(MUTANTS)


def test_production_commands_offer_no_way_to_a_mutant() -> None:
    for command in (["pod", "--help"], ["up", "--help"], ["run", "--help"]):
        out = subprocess.run([sys.executable, "-m", "fleetsim", *command],
                             capture_output=True, text=True, timeout=30).stdout
        assert "mutant" not in out.lower()


@pytest.mark.timeout(180)
def test_selftest_kills_the_lockless_claim_and_its_control_stays_valid(pg_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fleetsim", "selftest", "--mutants", "claim-without-lock",
         "--controls", "--store", pg_url, "--json"],
        capture_output=True, text=True, timeout=170)
    assert out.returncode == 0, out.stderr
    results = {r["name"]: r for r in json.loads(out.stdout)["results"]}
    assert results["control"]["verdict"] == "valid"
    assert results["claim-without-lock"]["killed"] is True
    assert results["claim-without-lock"]["violations"].get("phantom_claim", 0) > 0


@pytest.mark.stress
@pytest.mark.timeout(1500)
def test_every_mutant_is_killed_or_documented_equivalent(pg_url: str) -> None:
    results = run_selftest(pg_url, list(MUTANTS.values()), controls=True)
    for r in results:
        if r.killed is None:
            assert r.verdict == "valid", f"control of {r.trial}: {r.violations} {r.note}"
        else:
            assert r.killed or r.note.startswith("equivalent"), r.as_dict()
