"""`fleetsim submit --payload JSON` and `--payload-file FILE` (issue 12, item 12)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleetsim.store import Store, StoreConfig
from tests.helpers import rows

pytestmark = pytest.mark.timeout(60)


def submit(store_config: StoreConfig, tmp_path: Path, *args: str,
           stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(tmp_path / "none"), "submit",
         *args], capture_output=True, text=True, timeout=50, input=stdin,
        env={**os.environ, "FLEETSIM_STORE": store_config.url,
             "FLEETSIM_SCHEMA": store_config.schema or ""},
    )


def one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1 and error.startswith("error: "), error
    for fragment in fragments:
        assert fragment in error, error
    return error


def payloads(store: Store) -> list[tuple[str, dict[str, object], str | None]]:
    return [(r[0], r[1], r[2]) for r in
            rows(store, "SELECT queue, payload, idempotency_key FROM steps ORDER BY id")]


def test_payload_goes_with_every_step_and_workload_sets_its_key(
        store: Store, store_config: StoreConfig, tmp_path: Path) -> None:
    done = submit(store_config, tmp_path, "--payload", '{"order": 7, "items": ["a"]}',
                  "--count", "2", "--queue", "orders", "--workload", "sleep:1")
    assert done.returncode == 0, done.stderr
    assert payloads(store) == [
        ("orders", {"order": 7, "items": ["a"], "workload": "sleep:1"}, None)] * 2


def test_payload_file_is_json_lines_one_step_each_with_keys(
        store: Store, store_config: StoreConfig, tmp_path: Path) -> None:
    lines = tmp_path / "steps.jsonl"
    lines.write_text('{"n": 0}\n\n{"n": 1, "workload": "noop"}\n  {"n": 2}  \n')
    done = submit(store_config, tmp_path, "--payload-file", str(lines), "--key", "batch",
                  "--queue", "q1")
    assert done.returncode == 0, done.stderr
    assert "submitted 3 steps" in done.stdout
    assert payloads(store) == [("q1", {"n": 0}, "batch-0"),
                               ("q1", {"n": 1, "workload": "noop"}, "batch-1"),
                               ("q1", {"n": 2}, "batch-2")]
    # From standard input too; the same keys are the same steps (idempotent).
    again = submit(store_config, tmp_path, "--payload-file", "-", "--key", "batch",
                   "--queue", "q1", stdin='{"n": 0}\n{"n": 1}\n{"n": 2}\n{"n": 3}\n')
    assert again.returncode == 0, again.stderr
    assert len(payloads(store)) == 4


def test_a_large_payload_file_is_streamed(store: Store, store_config: StoreConfig,
                                          tmp_path: Path) -> None:
    lines = tmp_path / "many.jsonl"
    lines.write_text("".join(f'{{"i": {i}}}\n' for i in range(25_000)))
    done = submit(store_config, tmp_path, "--payload-file", str(lines), "--json")
    assert done.returncode == 0, done.stderr
    got = rows(store, "SELECT min((payload->>'i')::int), max((payload->>'i')::int), count(*),"
                      " bool_and(id - (payload->>'i')::int = (SELECT min(id) FROM steps))"
                      " FROM steps")
    assert tuple(got[0]) == (0, 24_999, 25_000, True)


@pytest.mark.parametrize(("text", "fragments"), [
    ('{"n": 1}\n{"n": 2,\n{"n": 3}\n', ("line 2", "invalid JSON")),
    ('{"n": 1}\n[1, 2]\n', ("line 2", "must be a JSON object", "array")),
    ('"just text"\n', ("line 1", "must be a JSON object", "string")),
    ('{"n": NaN}\n', ("line 1", "invalid JSON")),
])
def test_a_bad_line_in_a_payload_file_is_named_and_nothing_is_submitted(
        store: Store, store_config: StoreConfig, tmp_path: Path, text: str,
        fragments: tuple[str, ...]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    one_line_error(submit(store_config, tmp_path, "--payload-file", str(bad)),
                   str(bad), *fragments)
    assert payloads(store) == []


@pytest.mark.parametrize(("args", "fragments"), [
    (("--payload", "{nope"), ("--payload", "invalid JSON")),
    (("--payload", "[1]"), ("--payload", "must be a JSON object")),
    (("--payload", "{}", "--payload-file", "-"), ("--payload", "--payload-file")),
    (("--payload-file", "-", "--count", "3"), ("--count", "--payload-file")),
    (("--payload-file", "/no/such/file.jsonl"), ("/no/such/file.jsonl",)),
])
def test_bad_payload_options_are_one_line_errors(store: Store, store_config: StoreConfig,
                                                 tmp_path: Path, args: tuple[str, ...],
                                                 fragments: tuple[str, ...]) -> None:
    one_line_error(submit(store_config, tmp_path, *args, stdin="{}\n"), *fragments)
    assert payloads(store) == []


def test_an_empty_payload_file_submits_nothing(store: Store, store_config: StoreConfig,
                                               tmp_path: Path) -> None:
    one_line_error(submit(store_config, tmp_path, "--payload-file", "-", stdin="\n\n"),
                   "no steps")


def test_a_bad_line_after_the_first_chunk_says_what_was_submitted(
        store: Store, store_config: StoreConfig, tmp_path: Path) -> None:
    lines = tmp_path / "late.jsonl"
    lines.write_text("".join(f'{{"i": {i}}}\n' for i in range(10_000)) + '{"i": 10000}\n'
                     + "{oops\n")
    error = one_line_error(submit(store_config, tmp_path, "--payload-file", str(lines)),
                           f"{lines} line 10002", "invalid JSON",
                           "10000 steps before it were submitted")
    assert "ids " in error
    assert rows(store, "SELECT count(*) FROM steps")[0][0] == 10_000
