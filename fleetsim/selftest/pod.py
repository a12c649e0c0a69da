"""A pod on a broken store: ``python -m fleetsim.selftest.pod --mutant NAME <pod options>``.

The self-test's only way into a mutant: it applies the mutant to this
process's store statements, then runs ``fleetsim pod`` with the rest of the
arguments. Production commands never import this module.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    """Apply ``--mutant NAME`` (the first two arguments), then run ``fleetsim pod``."""
    if len(argv) < 2 or argv[0] != "--mutant":
        sys.exit("usage: python -m fleetsim.selftest.pod --mutant NAME [fleetsim pod options]")
    from fleetsim.selftest.mutants import apply_mutant

    apply_mutant(argv[1])
    from fleetsim.cli import main as fleetsim_main

    sys.argv = ["fleetsim", "pod", *argv[2:]]
    fleetsim_main()


if __name__ == "__main__":
    main(sys.argv[1:])
