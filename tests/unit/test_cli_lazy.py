"""The CLI loads a command's module only when that command runs.

Fifty `fleetsim pod` processes start at once on two cores: each used to
import every command (the bench, the report's figures, experiments...),
about 0.25 s of CPU a pod for nothing. These tests fail if a command is
missing from the lazy table or if an eager import creeps back.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fleetsim.cli import COMMAND_MODULES, cli

pytestmark = pytest.mark.timeout(60)


def test_every_command_is_in_the_lazy_table_and_only_there() -> None:
    for module in sorted(set(COMMAND_MODULES.values())):
        importlib.import_module(f"fleetsim.cli.{module}")
    assert set(cli.commands) == set(COMMAND_MODULES)
    for name, command in cli.commands.items():
        module = command.callback.__module__ if command.callback else ""
        if isinstance(command, type(cli)) or not module.startswith("fleetsim.cli."):
            continue  # a group's callback may live elsewhere
        assert module == f"fleetsim.cli.{COMMAND_MODULES[name]}", name


def test_help_lists_every_command() -> None:
    output = CliRunner().invoke(cli, ["--help"]).output
    for name in COMMAND_MODULES:
        assert f"  {name} " in output or f"  {name}\n" in output, name


def test_a_pod_process_does_not_import_other_commands() -> None:
    probe = ("import sys, fleetsim.cli.fleet; "
             "print(','.join(sorted(m for m in sys.modules if m.startswith(('fleetsim.cli.', "
             "'fleetsim.bench', 'fleetsim.report', 'matplotlib')))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=30, check=True).stdout.strip().split(",")
    assert set(loaded) == {"fleetsim.cli.common", "fleetsim.cli.fleet"}, loaded


def test_an_unknown_command_is_still_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2 and "No such command" in result.output
