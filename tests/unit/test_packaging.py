"""The project's own files: docker compose, README commands, CI script."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.mark.timeout(60)
def test_docker_compose_file_is_valid() -> None:
    if shutil.which("docker-compose") is None:
        if IN_CI:
            pytest.fail("docker-compose is required in CI to check docker-compose.yml")
        pytest.skip("docker-compose not installed")
    result = subprocess.run(
        ["docker-compose", "config"], cwd=ROOT, capture_output=True, text=True, timeout=50
    )
    assert result.returncode == 0, result.stderr
    for service in ("postgres", "tests", "fleet"):
        assert f"{service}:" in result.stdout
    assert "service_healthy" in result.stdout


@pytest.mark.timeout(10)
def test_readme_has_exactly_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count("<!-- main-command -->") == 1
    assert readme.count("<!-- test-command -->") == 1
    assert "fleetsim up --pods 5" in readme.split("<!-- main-command -->")[1].split("```")[1]
    assert "pytest" in readme.split("<!-- test-command -->")[1].split("```")[1]


@pytest.mark.timeout(10)
def test_ci_script_runs_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in script
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
