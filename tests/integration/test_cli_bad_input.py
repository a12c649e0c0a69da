"""Bad input against a real store, through the CLI as a user runs it (issue 10).

Each case ends in one clear line on stderr and a non-zero exit (or the
documented behaviour), never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleetsim.errors import ConfigError
from fleetsim.store import Store, StoreConfig

MAX_KEY_BYTES = 512  # documented in docs/reference/cli.md (submit --key)


def fleetsim(run_dir: Path, *args: str, env: dict[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), *args],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def cli_env(store_config: StoreConfig) -> dict[str, str]:
    return {"FLEETSIM_STORE": store_config.url, "FLEETSIM_SCHEMA": store_config.schema or ""}


# -- history export -o -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_history_export_into_a_missing_folder_is_one_line(tmp_path: Path, store: Store,
                                                          cli_env: dict[str, str]) -> None:
    store.submit("default")
    target = tmp_path / "missing" / "history.jsonl"
    result = fleetsim(tmp_path / "run", "history", "export", "-o", str(target), env=cli_env)
    assert result.returncode == 2
    error = one_line_error(result)
    assert str(target.parent) in error and "does not exist" in error
    assert not target.parent.exists()  # not created: a typo must not make folders

    ok = fleetsim(tmp_path / "run", "history", "export", "-o", str(tmp_path / "h.jsonl"),
                  env=cli_env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.strip() == "0 records"  # nothing claimed yet: no history


@pytest.mark.timeout(60)
def test_history_export_under_a_file_or_onto_a_folder_is_one_line(
    tmp_path: Path, store: Store, cli_env: dict[str, str]
) -> None:
    (tmp_path / "a-file").write_text("x")
    under_a_file = fleetsim(tmp_path / "run", "history", "export", "-o",
                            str(tmp_path / "a-file" / "h.jsonl"), env=cli_env)
    assert under_a_file.returncode == 2
    assert "is not a folder" in one_line_error(under_a_file)
    onto_a_folder = fleetsim(tmp_path / "run", "history", "export", "-o", str(tmp_path),
                             env=cli_env)
    assert onto_a_folder.returncode == 2  # click's usage error: "is a directory"
    assert "Traceback" not in onto_a_folder.stderr
    assert "is a directory" in onto_a_folder.stderr


@pytest.mark.timeout(60)
def test_history_export_keeps_an_earlier_file_when_the_store_is_unreachable(
    tmp_path: Path,
) -> None:
    earlier = tmp_path / "h.jsonl"
    earlier.write_text('{"earlier": true}\n')
    result = fleetsim(tmp_path / "run", "history", "export", "-o", str(earlier),
                      "--store", "postgresql://postgres@127.0.0.1:1/nothing")
    assert result.returncode == 3
    one_line_error(result)
    assert earlier.read_text() == '{"earlier": true}\n'


# -- idempotency keys --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_idempotency_key_too_long_for_the_index_is_refused(tmp_path: Path, store: Store,
                                                               cli_env: dict[str, str]) -> None:
    # Random-looking text does not compress: 3,000 bytes are past the btree's limit.
    key = "".join(f"{(i * 7919) % 100003:05d}" for i in range(600))
    with pytest.raises(ConfigError, match=f"at most {MAX_KEY_BYTES} bytes"):
        store.submit("default", idempotency_key=key)
    result = fleetsim(tmp_path / "run", "submit", "--key", key, env=cli_env)
    assert result.returncode == 2
    assert f"at most {MAX_KEY_BYTES} bytes" in one_line_error(result)
    assert store.status_counts()["queued"] == 0


@pytest.mark.timeout(60)
def test_a_key_of_exactly_the_limit_is_accepted_and_idempotent(store: Store) -> None:
    key = "é" * (MAX_KEY_BYTES // 2)  # 512 bytes in UTF-8, 256 characters
    first = store.submit("default", idempotency_key=key)
    assert store.submit("default", idempotency_key=key) == first
    with pytest.raises(ConfigError):
        store.submit("default", idempotency_key=key + "x")


# -- cancel with unknown ids ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_cancel_processes_every_id_and_reports_each(tmp_path: Path, store: Store,
                                                   cli_env: dict[str, str]) -> None:
    store.register_pod("pod-1")
    done = store.submit("default")
    (claim,) = store.claim_steps("pod-1", batch=1)
    store.complete(claim.id, claim.claim_token)
    claimed = store.submit("default")
    (claim,) = store.claim_steps("pod-1", batch=1)
    assert claim.id == claimed
    queued = store.submit("default")
    unknown = queued + 1000

    result = fleetsim(tmp_path / "run", "cancel", str(queued), str(unknown), str(claimed),
                      str(done), env=cli_env)
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"step {queued}: cancelled",
        f"step {unknown}: unknown (no such step)",
        f"step {claimed}: cancel_requested",
        f"step {done}: already completed",
    ]
    assert one_line_error(result) == f"error: no step with id {unknown}"
    assert store.get_step(queued).status == "cancelled"  # type: ignore[union-attr]
    assert store.get_step(claimed).cancel_requested  # type: ignore[union-attr]

    again = fleetsim(tmp_path / "run", "cancel", str(unknown), str(queued), str(unknown + 1),
                     "--json", env=cli_env)
    assert again.returncode == 1
    assert json.loads(again.stdout) == {str(unknown): "unknown", str(queued): "cancelled",
                                        str(unknown + 1): "unknown"}
    assert one_line_error(again) == f"error: no step with ids {unknown}, {unknown + 1}"

    fine = fleetsim(tmp_path / "run", "cancel", str(done), "--json", env=cli_env)
    assert fine.returncode == 0 and json.loads(fine.stdout) == {str(done): "completed"}


@pytest.mark.timeout(60)
def test_cancel_of_an_id_beyond_bigint_is_unknown_not_a_database_error(
    tmp_path: Path, store: Store, cli_env: dict[str, str]
) -> None:
    result = fleetsim(tmp_path / "run", "cancel", str(2**70), "0", "--json", env=cli_env)
    assert result.returncode == 1
    assert json.loads(result.stdout) == {str(2**70): "unknown", "0": "unknown"}
    one_line_error(result)
