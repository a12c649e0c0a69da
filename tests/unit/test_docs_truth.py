"""Docs that state what the code does (issue 12, item 4): checked against the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from fleetsim.cli import cli
from fleetsim.store import SCHEMA_VERSION
from pods.identity import default_pod_id

pytestmark = pytest.mark.timeout(10)

ROOT = Path(__file__).resolve().parents[2]
CLI_MD = (ROOT / "docs" / "reference" / "cli.md").read_text()
QUICKSTART = (ROOT / "docs" / "quickstart.md").read_text()
README = (ROOT / "README.md").read_text()


def test_the_init_json_example_shows_the_current_schema_version() -> None:
    section = CLI_MD[CLI_MD.index("### `init --json`"):]
    example = json.loads(section.split("```json", 1)[1].split("```", 1)[0])
    assert example["version"] == SCHEMA_VERSION


def test_the_pod_id_row_matches_help_and_the_hostname_rule() -> None:
    row = next(line for line in CLI_MD.splitlines() if line.startswith("| `--id ID`"))
    help_text = CliRunner().invoke(cli, ["pod", "--help"]).output
    assert "pod-<hostname>-<pid>" in help_text and "pod-<hostname>-<pid>" in row
    assert "old default" not in row
    # The default id always fits: no exit for a long hostname can happen.
    assert len(default_pod_id("h" * 300, 4_194_304)) <= 64
    assert "longer than 64 characters, the pod exits" not in row


def test_the_test_docs_do_not_claim_one_server_and_one_timeout_for_every_test() -> None:
    for text in (README, QUICKSTART):
        assert "they use `FLEETSIM_TEST_DATABASE_URL` if set, otherwise an embedded server" \
            not in text
    assert "unless it sets a longer one" not in QUICKSTART
    assert re.search(r"test_fault_proxy\.py", QUICKSTART)
    assert "store-restart" in QUICKSTART
