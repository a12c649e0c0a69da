"""The checker's self-test: broken stores (mutants) it must catch under chaos."""

from fleetsim.selftest.mutants import MUTANTS, Mutant, parse_mutants

__all__ = ["MUTANTS", "Mutant", "parse_mutants"]
