#!/usr/bin/env python3
"""Scale of one machine: `fleetsim up --pods N` as a user starts it (issue 15).

Starts a detached fleet of N pods (on the embedded PostgreSQL unless
--store is given), then measures, through the public CLI only:

- start: from `fleetsim up` to every pod alive in `fleetsim status`;
- drain: submits --steps no-op steps and times them to completed;
- the store's connections (pg_stat_activity of the fleet's database) at
  their peak, against the server's max_connections;
- the peak RSS of the coordinator and of the largest pod (psutil);
- the verdict of `fleetsim check`.

Prints one JSON document; exits 1 if the fleet did not start, drain or
check valid. Example:

    python scripts/bench_scale.py --pods 50 --steps 50000
    python scripts/bench_scale.py --pods 200 --steps 50000 --repeat 1
    python scripts/bench_scale.py --pods 50 --spawn fork,exec --repeat 3   # side by side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg2

FLEETSIM = [sys.executable, "-m", "fleetsim"]


def cli(run_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEETSIM, "--run-dir", str(run_dir), *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def status(run_dir: Path) -> dict[str, Any]:
    result = cli(run_dir, "status", "--json", timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"fleetsim status: {result.stderr.strip()}")
    data: dict[str, Any] = json.loads(result.stdout)
    return data


class Sampler(threading.Thread):
    """Peak RSS of the coordinator and the pods, and peak store connections."""

    def __init__(self, run_dir: Path, url: str, coordinator_pid: int) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.url, self.coordinator_pid = run_dir, url, coordinator_pid
        self.pod_pids: list[int] = []
        self.stop = threading.Event()
        self.coordinator_rss = 0
        self.pod_rss = 0
        self.pod_rss_median = 0
        self.connections = 0
        self.max_connections = 0

    def run(self) -> None:
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW max_connections")
                self.max_connections = int(cur.fetchone()[0])
            while not self.stop.wait(0.5):
                with conn.cursor() as cur:
                    cur.execute("SELECT count(*) FROM pg_stat_activity"
                                " WHERE datname = current_database()")
                    self.connections = max(self.connections, int(cur.fetchone()[0]))
                self.coordinator_rss = max(self.coordinator_rss, _rss(self.coordinator_pid))
                sizes = [_rss(pid) for pid in self.pod_pids]
                if sizes:
                    self.pod_rss = max(self.pod_rss, *sizes)
                    self.pod_rss_median = max(self.pod_rss_median,
                                              int(statistics.median(sizes)))
        finally:
            conn.close()


def _rss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def trial(pods: int, steps: int, store: str | None, timeout: float,
          spawn: str = "fork") -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"fleetsim-scale-{pods}-"))
    up_args = ["up", "--pods", str(pods), "--detach", "--no-status-line", "--spawn", spawn]
    if store:
        up_args += ["--store", store, "--schema", f"scale_{os.getpid()}_{pods}"]
    started = time.monotonic()
    result = cli(run_dir, *up_args, timeout=timeout)
    if result.returncode != 0:
        return {"pods": pods, "spawn": spawn,
                "error": f"fleetsim up: {result.stderr.strip()[-500:]}"}
    try:
        run = json.loads((run_dir / "run.json").read_text())
        deadline = time.monotonic() + timeout
        while True:
            alive = [p for p in status(run_dir)["pods"] if p["state"] == "alive"]
            if len(alive) >= pods:
                break
            if time.monotonic() > deadline:
                return {"pods": pods, "error": f"only {len(alive)} pods alive"}
            time.sleep(0.2)
        start_s = time.monotonic() - started
        sampler = Sampler(run_dir, run["store_url"], int(run["coordinator_pid"]))
        sampler.pod_pids = [int(p["pid"]) for p in alive if p.get("pid")]
        sampler.start()
        submitted = time.monotonic()
        result = cli(run_dir, "submit", "--count", str(steps), timeout=timeout)
        if result.returncode != 0:
            return {"pods": pods, "error": f"fleetsim submit: {result.stderr.strip()}"}
        while status(run_dir)["steps"]["completed"] < steps:
            if time.monotonic() - submitted > timeout:
                return {"pods": pods, "error": "not drained in time"}
            time.sleep(0.25)
        drain_s = time.monotonic() - submitted
        sampler.stop.set()
        sampler.join(10)
        checked = cli(run_dir, "check", "--json", timeout=timeout)
        valid = checked.returncode == 0 and json.loads(checked.stdout).get("valid") is True
        return {
            "pods": pods, "spawn": spawn, "steps": steps, "start_s": round(start_s, 2),
            "drain_s": round(drain_s, 2), "steps_per_s": round(steps / drain_s, 1),
            "valid": valid,
            "connections_peak": sampler.connections,
            "max_connections": sampler.max_connections,
            "coordinator_rss_mb": round(sampler.coordinator_rss / 2**20, 1),
            "pod_rss_max_mb": round(sampler.pod_rss / 2**20, 1),
            "pod_rss_median_mb": round(sampler.pod_rss_median / 2**20, 1),
        }
    finally:
        cli(run_dir, "down", timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", default="50", help="fleet sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--store", help="PostgreSQL URL (default: the embedded server)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--spawn", default="fork",
                        help="fork, exec or both (fork,exec: interleaved, side by side)")
    args = parser.parse_args()
    trials = []
    spawns = args.spawn.split(",")
    for repeat in range(args.repeat):
        for pods in (int(n) for n in args.pods.split(",")):
            # Interleaved, the order reversed every other repeat.
            for spawn in spawns if repeat % 2 == 0 else spawns[::-1]:
                outcome = trial(pods, args.steps, args.store, args.timeout, spawn)
                print(json.dumps(outcome), file=sys.stderr)
                trials.append(outcome)
    summary = {}
    for spawn in spawns:
        for pods in (int(n) for n in args.pods.split(",")):
            starts = [t["start_s"] for t in trials
                      if t.get("spawn") == spawn and t["pods"] == pods and "start_s" in t]
            if starts:
                summary[f"{pods} pods, {spawn}"] = {"start_s_median": statistics.median(starts),
                                                    "start_s": starts}
    print(json.dumps({"trials": trials, "summary": summary}, indent=2))
    return 0 if all(t.get("valid") for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
