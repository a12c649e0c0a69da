"""A run's figures and report: on a real chaos run, and on a history with known answers.

One real ``fleetsim run --report`` (a leader kill and a storage brownout)
serves the tests of the real case; the known answers come from a history
written with direct SQL, every instant an exact offset from one base time.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fleetsim.cli import cli
from fleetsim.figures import FIGURE_NAMES, compute_figures, fault_windows, merge_windows
from fleetsim.report import gather, write_report
from fleetsim.store import Store, StoreConfig
from tests.integration.test_checker import Db
from tests.integration.test_cli import fleetsim

PLOTS = ("throughput", "latency", "timeline", "queues", "resources")

# The brownout first: a storage fault on "all" right after a kill can miss the
# restarted pod (not yet on the bus) and fail.
SCENARIO = """
name = "brownout-and-kill"
description = "A storage brownout on every pod, then a leader kill."
duration = "3s"

[[fault]]
action = "storage-fault"
target = "all"
error_rate = 0.2
latency = "30ms"
at = "0.3s"
for = "1.5s"

[[fault]]
action = "kill-leader"
at = "2.2s"
"""


def write_metrics(run_dir: Path, start: float, end: float, pods: int = 3) -> int:
    """A synthetic metrics.jsonl in the documented shape; returns the largest pod RSS."""
    lines = []
    t, peak = start, 0
    while t <= end:
        for i in range(1, pods + 1):
            rss = (50 + 10 * i) * 2**20 + int(t - start) * 4096
            peak = max(peak, rss)
            lines.append({"t": t, "kind": "pod", "pod": f"pod-{i}", "incarnation": 0,
                          "rss_bytes": rss, "cpu_percent": 10.0 * i, "completed": 1,
                          "in_flight": 0})
        lines.append({"t": t, "kind": "coordinator", "rss_bytes": 80 * 2**20,
                      "cpu_percent": 5.0})
        lines.append({"t": t, "kind": "fleet", "steps_per_s": 1.0, "completed": 1,
                      "e2e_p50_s": 0.1, "e2e_p95_s": 0.2, "e2e_p99_s": 0.3})
        lines.append({"t": t, "kind": "store", "depth": {"default": 0},
                      "steps_dead_tuples": 0, "connections": 4})
        t += 0.5
    text = "\n".join(json.dumps(line) for line in lines) + "\n{\"t\": 1, torn"
    (run_dir / "metrics.jsonl").write_text(text)
    return peak


@pytest.fixture(scope="module")
def chaos_run(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real run with --report: 3 pods, 500 steps, a brownout and a leader kill."""
    base = tmp_path_factory.mktemp("report")
    scenario = base / "brownout-and-kill.toml"
    scenario.write_text(SCENARIO)
    run_dir = base / "run"
    result = fleetsim(run_dir, "run", "--store", pg_url, "--pods", "3", "--steps", "500",
                      "--workload", "sleep:10", "--chaos", str(scenario), "--report", "--json",
                      timeout=150)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    try:
        yield {"data": data, "run_dir": run_dir, "url": pg_url, "stderr": result.stderr}
    finally:
        with Store(StoreConfig(pg_url, schema=data["schema"])) as s:
            s.drop_schema()


def assert_report(folder: Path) -> str:
    page = (folder / "index.html").read_text()
    for name in PLOTS:
        png = (folder / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert "http://" not in page and "https://" not in page  # opens with no network
    return page


@pytest.mark.timeout(200)
def test_run_figures_are_sane_and_the_report_is_written(chaos_run: dict[str, Any]) -> None:
    data, run_dir = chaos_run["data"], chaos_run["run_dir"]
    figures = data["figures"]
    assert set(FIGURE_NAMES) <= set(figures)
    assert "failover" in figures  # the checker's figures stay beside them
    assert figures["success_pct"] == 100.0
    for prefix in ("e2e", "queue_wait"):
        p50, p95, p99 = (figures[f"{prefix}_p{p}_s"] for p in (50, 95, 99))
        assert 0 <= p50 <= p95 <= p99
    assert figures["queue_wait_p99_s"] <= figures["e2e_p99_s"]
    assert figures["throughput_steps_per_s"] > 0
    # The brownout lands while the 500 steps run: there is a window inside the work.
    assert figures["throughput_in_faults_steps_per_s"] is not None
    assert figures["throughput_in_faults_ratio"] is not None
    assert figures["peak_rss_pod_bytes"] is None or figures["peak_rss_pod_bytes"] > 0

    index = Path(data["report"])
    assert index == run_dir / "reports" / data["schema"] / "index.html"
    page = assert_report(index.parent)
    assert "<b class='valid'>VALID</b>" in page
    assert "<td>kill-leader</td>" in page, (run_dir / "faults.jsonl").read_text()
    assert "<td>storage-fault</td>" in page, (run_dir / "faults.jsonl").read_text()
    assert f"report: {index}" in chaos_run["stderr"]


@pytest.mark.timeout(120)
def test_report_command_with_and_without_metrics(chaos_run: dict[str, Any],
                                                 tmp_path: Path) -> None:
    data, run_dir, url = chaos_run["data"], chaos_run["run_dir"], chaos_run["url"]
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)  # whatever the coordinator wrote: absent first
    with Store(StoreConfig(url, schema=data["schema"])) as s:
        gathered = gather(s, run_dir, data["schema"])
    assert gathered.figures["peak_rss_pod_bytes"] is None
    write_report(gathered, tmp_path / "without")
    assert "No metrics recorded" in assert_report(tmp_path / "without")

    span = gathered.history.span
    assert span is not None
    peak = write_metrics(run_dir, span[0], span[1])
    out = tmp_path / "with"
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--store", url, "--schema",
                                      data["schema"], "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verdict"] == "valid" and report["index"] == str(out / "index.html")
    figures = report["figures"]
    assert figures["peak_rss_pod_bytes"] == peak
    assert figures["peak_rss_coordinator_bytes"] == 80 * 2**20
    assert "No metrics recorded" not in assert_report(out)

    checked = CliRunner().invoke(cli, ["--run-dir", str(run_dir), "check", "--store", url,
                                       "--schema", data["schema"], "--json"])
    assert checked.exit_code == 0, checked.output
    assert set(FIGURE_NAMES) <= set(json.loads(checked.stdout)["figures"])


def test_report_rejects_bad_input(tmp_path: Path, pg_url: str) -> None:
    def report(*args: str) -> Result:
        return CliRunner().invoke(cli, ["--run-dir", str(tmp_path), "report", *args])

    missing = report(str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "no run directory" in missing.stderr
    out = report("--store", pg_url, "--schema", "x", "--out", str(tmp_path / "a" / "b"))
    assert out.exit_code == 2 and "does not exist" in out.stderr
    nothing = report("--store", pg_url, "--schema", "no_such_schema_x")
    assert nothing.exit_code == 2 and nothing.stderr.count("\n") == 1


# -- known answers ------------------------------------------------------------------

T = "(SELECT t0 FROM base) + make_interval(secs => {})"


def at(s: float) -> str:
    return T.format(s)


@pytest.fixture
def db(store_config: StoreConfig, store: Store) -> Iterator[Db]:
    assert store_config.schema is not None
    conn = Db(store_config.url, store_config.schema)
    conn.all("CREATE TABLE base AS SELECT statement_timestamp() - interval '100 s' AS t0")
    try:
        yield conn
    finally:
        conn.close()


def build_history(db: Db) -> None:
    """Five steps submitted at 0; four completed, one claimed and never finished.

    step  first claim  completion  e2e   queue wait
    1     1            2           2     1
    2     1            3           3     1
    3     2            4           4     2
    4     2 (lost), 5  6           6     2
    5     3            -           -     3
    Work window: first claim 1 -> last completion 6 (5 s, 4 completions).
    """
    db.all(f"INSERT INTO pods (id, status, started_at, heartbeat_at)"
           f" VALUES ('pod-a', 'alive', {at(0)}, {at(6)})")
    db.all(f"INSERT INTO pod_registrations (pod_id, incarnation, registered_at)"
           f" VALUES ('pod-a', 0, {at(0)})")
    for step, done in ((1, 2), (2, 3), (3, 4), (4, 6)):
        db.all(f"INSERT INTO steps (id, queue, status, created_at, finished_at, attempts)"
               f" VALUES ({step}, 'default', 'completed', {at(0)}, {at(done)}, 1)")
    db.all(f"INSERT INTO steps (id, queue, status, created_at, claimed_by, claim_token,"
           f" claimed_at, claim_incarnation, attempts)"
           f" VALUES (5, 'default', 'claimed', {at(0)}, 'pod-a', 6, {at(3)}, 0, 1)")
    attempts = ((1, 1, 1, 2, "completed"), (2, 2, 1, 3, "completed"),
                (3, 3, 2, 4, "completed"), (4, 4, 2, 4.5, "lease_lost"),
                (5, 4, 5, 6, "completed"))
    for token, step, claimed, finished, outcome in attempts:
        db.all(f"INSERT INTO finished_attempts (claim_token, step_id, pod_id, claimed_at,"
               f" finished_at, outcome) VALUES ({token}, {step}, 'pod-a', {at(claimed)},"
               f" {at(finished)}, '{outcome}')")


def percentile(values: list[float], q: float) -> float:
    """percentile_cont: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def test_figures_of_a_known_history(db: Db, store: Store, tmp_path: Path) -> None:
    build_history(db)
    t0 = float(db.one("SELECT extract(epoch FROM t0) FROM base"))
    # A pause of pod-a from 2.5 to 4.5 s: completions at 3 and 4 fall inside.
    (tmp_path / "faults.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"type": "action", "ts": t0 + 2.5, "action": "pause", "target": "pod-a",
         "params": {"for": 5.0}, "result": {"pod": "pod-a", "pid": 1, "for_s": 5.0}},
        {"type": "action", "ts": t0 + 4.5, "action": "resume", "target": "pod-a",
         "params": {}, "result": {"pod": "pod-a", "pid": 1}},
        # A fault of another run in the same run directory, long before: ignored.
        {"type": "action", "ts": t0 - 500, "action": "kill", "target": "pod-a",
         "params": {}, "result": {"pod": "pod-a", "pid": 1, "term": None}},
    )) + "\n")
    figures = compute_figures(store, tmp_path)
    assert figures["success_pct"] == 80.0  # step 5 never completed
    e2e, waits = [2.0, 3.0, 4.0, 6.0], [1.0, 1.0, 2.0, 2.0, 3.0]
    for p in (50, 95, 99):
        assert figures[f"e2e_p{p}_s"] == pytest.approx(percentile(e2e, p / 100), abs=1e-5)
        assert figures[f"queue_wait_p{p}_s"] == pytest.approx(percentile(waits, p / 100),
                                                              abs=1e-5)
    assert figures["throughput_steps_per_s"] == pytest.approx(4 / 5, abs=1e-3)
    # Inside: 2 completions (3, 4) in 2 s; outside: 2 (2, 6) in 3 s.
    assert figures["throughput_in_faults_steps_per_s"] == pytest.approx(1.0, abs=1e-3)
    assert figures["throughput_outside_faults_steps_per_s"] == pytest.approx(2 / 3, abs=1e-3)
    assert figures["throughput_in_faults_ratio"] == pytest.approx(1.5, abs=1e-3)
    assert figures["peak_rss_pod_bytes"] is None  # no metrics.jsonl

    (tmp_path / "faults.jsonl").unlink()
    quiet = compute_figures(store, tmp_path)
    assert quiet["throughput_in_faults_ratio"] is None
    assert quiet["throughput_in_faults_steps_per_s"] is None
    assert quiet["throughput_outside_faults_steps_per_s"] == pytest.approx(0.8, abs=1e-3)


def test_fault_windows_end_at_restart_heal_or_expiry(tmp_path: Path) -> None:
    t = 1000.0
    records = [
        {"type": "action", "ts": t, "action": "kill", "target": "pod-1", "params": {},
         "result": {"pod": "pod-1", "pid": 5, "term": 3}},
        {"type": "action", "ts": t + 1, "action": "partition", "target": "pod-2",
         "params": {"for": 10}, "result": {"pod": "pod-2", "from": "all", "for_s": 10}},
        {"type": "action", "ts": t + 2, "action": "storage-fault", "target": "all",
         "params": {"for": 3}, "result": {"pods": ["pod-1", "pod-2"], "error_rate": 0.1,
                                          "latency_ms": 20.0, "for_s": 3}},
        {"type": "action", "ts": t + 4, "action": "heal", "target": None, "params": {},
         "result": {"healed": ["partition-store:pod-2"]}},
        {"type": "action", "ts": t + 4.5, "action": "end-storage-fault", "target": "pod-1",
         "params": {}, "result": {"expired": True}},
        {"type": "action", "ts": t + 5, "action": "end-storage-fault", "target": "pod-2",
         "params": {}, "result": {"expired": True}},
        {"type": "action", "ts": t + 6, "action": "store-restart", "target": None,
         "params": {}, "result": {"old_pid": 1, "new_pid": 2, "downtime_s": 1.5}},
    ]
    (tmp_path / "faults.jsonl").write_text(
        "\n".join(json.dumps(r) for r in records) + "\n{torn")
    windows = fault_windows(tmp_path, (t - 1, t + 20), [{"pod": "pod-1", "at": t + 2.5}])
    got = [(w.action, w.start - t, w.end - t, w.pods) for w in windows]
    assert got == [("kill", 0, 2.5, ("pod-1",)), ("partition", 1, 4, ("pod-2",)),
                   ("storage-fault", 2, 5, ("pod-1", "pod-2")),
                   ("store-restart", 6, 7.5, ())]
    assert windows[0].label == "kill pod-1 (T3)"
    assert merge_windows([(0, 2), (1, 3), (5, 6)], clip=(0.5, 5.5)) == [(0.5, 3), (5, 5.5)]


@pytest.mark.timeout(120)
def test_the_page_renders_in_headless_chromium(chaos_run: dict[str, Any],
                                               tmp_path: Path) -> None:
    """Not blank, and no console message (the page has no script; a bad resource logs)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium (Debian: apt-get install chromium; .ci/run installs it)")
    from PIL import Image

    shot = tmp_path / "page.png"
    rendered = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", f"--screenshot={shot}", "--window-size=1400,3000",
         Path(chaos_run["data"]["report"]).as_uri()],
        capture_output=True, text=True, timeout=90,
    )
    assert shot.exists(), rendered.stderr
    assert "CONSOLE" not in rendered.stderr, rendered.stderr
    with Image.open(shot) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000) or []
    # A blank page is one colour; plots bring hundreds.
    assert len(colours) > 100
    white = max(count for count, _ in colours)
    assert white < 0.95 * 1400 * 3000


def test_container_and_bus_partitions_end_when_they_end(tmp_path: Path) -> None:
    """A container's partition is tracked as partition-network, a bus
    partition ends by itself: neither lasts to the end of the run."""
    t = 1000.0
    records = [
        {"type": "action", "ts": t, "action": "partition", "target": "pod-c-1", "params": {},
         "result": {"pod": "pod-c-1", "from": "network", "mode": "disconnect", "for_s": None,
                    "via": "engine", "container": "tier-pod-1"}},
        {"type": "action", "ts": t + 5, "action": "heal", "target": None, "params": {},
         "result": {"healed": ["partition-network:pod-c-1"]}},
        {"type": "action", "ts": t + 6, "action": "partition", "target": "pod-d-1",
         "params": {"for": 2}, "result": {"pod": "pod-d-1", "from": "network", "for_s": 2}},
        {"type": "action", "ts": t + 7, "action": "end-partition-network", "target": "pod-d-1",
         "params": {}, "result": {"expired": True}},
        {"type": "action", "ts": t + 10, "action": "partition", "target": "pod-2",
         "params": {}, "result": {"pod": "pod-2", "from": "bus", "for_s": None}},
    ]
    (tmp_path / "faults.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    windows = fault_windows(tmp_path, (t - 1, t + 100), [])
    assert [(w.start - t, w.end - t) for w in windows] == [(0, 5), (6, 7), (10, 20)]
