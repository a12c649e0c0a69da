#!/usr/bin/env python3
"""Benchmark a running fleetsim fleet end to end (a benchmark, not a test).

Only public tools are driven: the ``fleetsim`` CLI (``run``, ``up --detach``,
``status --json``, ``submit``, ``down``), the store's tables read with
psycopg2, and the raw ``FOR UPDATE SKIP LOCKED`` reference loop of
``scripts/bench_store.py`` (imported, not copied). Measured:

1. throughput of ``fleetsim run --workload noop`` (``steps_per_s``) with 1, 2,
   5 and 10 pods at batch 50, plus 5 pods at ``--concurrency 4``, beside the
   reference (5 processes, batch 50) and bench_store's bare Store loop (5
   processes: the store's SQL without pods) in the same repeat, interleaved,
   order flipped every repeat; ratio 5 pods / reference (goal >= 50 %).
   bench_store ANALYZEs its freshly filled tables; ``fleetsim run`` does not;
2. leader failover: SIGKILL the leader (from ``fleetsim status --json``) of a
   ``fleetsim up --detach --restart`` fleet kept busy with ``sleep:50`` steps,
   time until a new term is acquired (``leader_lease.acquired_at``);
3. orphan recovery: SIGKILL a non-leader pod holding claimed steps, time until
   every step it held is claimed again (a newer ``step_attempts`` row by
   another pod or by the victim's respawned incarnation), (a) in fleets
   without ``--restart`` (the leader's recovery, re-claimed by others) and (b)
   in the ``--restart`` fleet (the respawn's re-registration requeues them);
4. pod start-to-ready (spawn -> registered and alive; goal < 2 s): the
   coordinator's ``ready in X s`` lines of every fleet, plus respawned pods
   (process creation -> ``pods.started_at``);
5. peak RSS of the coordinator and of each pod (psutil every 100 ms during the
   5-pod throughput runs and the failover fleet; the kernel's VmHWM too).

Kills wait a random 0-2.5 s first, so they do not phase-lock with the pods'
claim rounds or the leader's renewals. Fleets run with fleetsim's defaults
(timings, and whatever ``up`` enables by default).

Every fleet gets its own schema and run directory (in a temporary folder);
both are removed afterwards, also on Ctrl-C or SIGTERM (fleets stopped with
``fleetsim down``, leftover processes killed, schemas dropped).

    /work/venv/bin/python scripts/bench_fleet.py                  # full run (~5-8 min)
    /work/venv/bin/python scripts/bench_fleet.py --quick --repeat 1
    /work/venv/bin/python scripts/bench_fleet.py --json fleet.json --parts throughput

Progress goes to stderr, the result table to stdout. Times of kills and of
store events are compared on one clock: the database's (the offset to the
local clock is measured at start). On a shared machine, read the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import multiprocessing as mp
import os
import platform
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import psutil
import psycopg2

# scripts/ is not a package: put it on sys.path and import bench_store by name
# (runpy would not do: its claimers are spawned processes that find
# ``bench_store._claimer`` by module name; spawn hands sys.path to them).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_store
from bench_store import connect, fresh_run, log

T = TypeVar("T")

DEFAULT_URL = bench_store.DEFAULT_URL
GOAL_RATIO = 0.50  # 5 pods vs the raw SKIP LOCKED reference (5 processes, batch 50)
GOAL_READY_S = 2.0  # pod start-to-ready
REF_PROCS, REF_BATCH = 5, 50
SLOW_WORKLOAD = "sleep:50"
READY_LINE = re.compile(r"(pod-\d+): pid (\d+), incarnation (\d+), ready in ([0-9.]+)s")
APP = "fleetsim-bench-fleet"
# Kills wait a random 0..KILL_JITTER_S first: the pods' claim rounds (a batch of
# 50 x 50 ms) and the leader's renewals would otherwise phase-lock with ours.
KILL_JITTER_S = 2.5
JITTER = random.Random(0)


class BenchError(RuntimeError):
    """A measurement could not be taken."""


def wait_for(cond: Callable[[], T | None], timeout: float, what: str,
             interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def fleetsim_argv() -> list[str]:
    """The fleetsim console script next to this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("fleetsim")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("fleetsim")
    return [found] if found else [sys.executable, "-m", "fleetsim"]


def vm_hwm(pid: int) -> int | None:
    """The kernel's peak RSS of a live process (Linux), in bytes."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def create_time_offset() -> float:
    """psutil's create_time() - the local clock at fork, in seconds.

    Linux gives process start times in ticks since boot and the boot time in
    whole seconds, so create_time() can be off by up to a second: calibrate on
    a few throw-away processes whose fork we bracket.
    """
    best = (float("inf"), 0.0)
    for _ in range(5):
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-c", ""], stdin=subprocess.DEVNULL)
        t1 = time.time()
        try:
            created = psutil.Process(proc.pid).create_time()  # a zombie until waited for
        except psutil.Error:
            created = None
        proc.wait()
        if created is not None:
            best = min(best, (t1 - t0, created - (t0 + t1) / 2))
    return best[1]


# -- processes: remember every descendant, sample RSS ------------------------


class ProcWatch(threading.Thread):
    """Every 100 ms samples the RSS of watched trees; every 0.5 s lists their
    descendants, remembered so that cleanup can kill whatever is left."""

    def __init__(self) -> None:
        super().__init__(name="procwatch", daemon=True)
        self.lock = threading.Lock()
        self.roots: dict[int, dict[str, Any]] = {}
        self.known: dict[int, psutil.Process] = {}
        self.stop = threading.Event()

    def add_root(self, pid: int, sample: bool) -> None:
        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            return
        with self.lock:
            self.known[pid] = proc
            self.roots[pid] = {"proc": proc, "sample": sample, "members": {pid: proc},
                               "rss": {}, "hwm": {}, "samples": 0}
        self._scan(pid)

    def remove_root(self, pid: int) -> dict[str, Any]:
        with self.lock:
            return self.roots.pop(pid, {})

    def _scan(self, pid: int) -> None:
        with self.lock:
            root = self.roots.get(pid)
        if root is None:
            return
        try:
            children = root["proc"].children(recursive=True)
        except psutil.Error:
            children = []
        with self.lock:
            for child in children:
                self.known.setdefault(child.pid, child)
                root["members"].setdefault(child.pid, child)

    def run(self) -> None:
        tick = 0
        while not self.stop.wait(0.1):
            tick += 1
            with self.lock:
                roots = list(self.roots.items())
            for pid, root in roots:
                if tick % 5 == 0:
                    self._scan(pid)
                if not root["sample"]:
                    continue
                root["samples"] += 1
                for member_pid, proc in list(root["members"].items()):
                    try:
                        rss = proc.memory_info().rss
                    except psutil.Error:
                        continue
                    root["rss"][member_pid] = max(rss, root["rss"].get(member_pid, 0))
                    hwm = vm_hwm(member_pid)
                    if hwm:
                        root["hwm"][member_pid] = max(hwm, root["hwm"].get(member_pid, 0))


def rss_peaks(root: dict[str, Any], coordinator_pid: int) -> dict[str, Any]:
    """Peak RSS of the coordinator and of its pods, from one watched tree."""
    def pick(table: dict[int, int]) -> dict[str, Any]:
        pods = [v for pid, v in table.items() if pid != coordinator_pid]
        return {"coordinator": table.get(coordinator_pid),
                "pod_max": max(pods) if pods else None,
                "pod_median": statistics.median(pods) if pods else None,
                "pods": len(pods)}
    return {"samples": root.get("samples", 0), "rss": pick(root.get("rss", {})),
            "vm_hwm": pick(root.get("hwm", {}))}


# -- the bench context: store connection, processes, cleanup -----------------


class Bench:
    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.tmp = tmp
        self.cli = fleetsim_argv()
        # The URL goes in the environment, never on a command line (ps shows
        # those); other FLEETSIM_* settings of the caller must not leak in.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETSIM_")}
        self.env["FLEETSIM_STORE"] = url
        self.watch = ProcWatch()
        self.watch.start()
        self.popens: list[subprocess.Popen[bytes]] = []
        self.patient: list[subprocess.Popen[bytes]] = []
        self.run_dirs: set[Path] = set()
        self.schemas: set[str] = set()
        self.conn = connect(url, None, APP)
        self.offset = self.clock_offset()
        self.create_time_offset = create_time_offset()

    # database

    def sql(self, statement: str, params: Any = ()) -> list[tuple[Any, ...]]:
        if self.conn.closed:
            self.conn = connect(self.url, None, APP)
        with self.conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def clock_offset(self) -> float:
        """database clock - local clock (s), from the fastest of a few round trips."""
        best = (float("inf"), 0.0)
        for _ in range(7):
            t0 = time.time()
            (db,) = self.sql("SELECT extract(epoch FROM clock_timestamp())::float8")[0]
            t1 = time.time()
            best = min(best, (t1 - t0, db - (t0 + t1) / 2))
        return best[1]

    def db_time(self, local: float) -> float:
        return local + self.offset

    def new_schema(self, tag: str) -> str:
        name = f"bench_fleet_{os.getpid()}_{secrets.token_hex(3)}_{tag}"
        self.schemas.add(name)
        return name

    def drop_schema(self, schema: str) -> None:
        self.sql("SET lock_timeout = '10s'")
        self.sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        self.schemas.discard(schema)

    # fleetsim commands

    def popen(self, args: Sequence[str], patient: bool = False, **kwargs: Any
              ) -> subprocess.Popen[bytes]:
        # Its own session: a Ctrl-C reaches only us, and we stop it cleanly.
        proc = subprocess.Popen([*self.cli, *args], env=self.env, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)
        self.popens.append(proc)
        if patient:
            self.patient.append(proc)
        return proc

    def fleetsim(self, args: Sequence[str], timeout: float = 180, patient: bool = False
                 ) -> str:
        """Run a short fleetsim command; its stdout (raise with its error line).

        ``patient``: on cleanup, let it finish rather than stop it (`up
        --detach`: killing it would orphan the coordinator it is starting).
        """
        proc = self.popen(args, patient, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=timeout)
        self.popens.remove(proc)
        if patient:
            self.patient.remove(proc)
        if proc.returncode != 0:
            last = (err.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            raise BenchError(f"fleetsim {args[2] if len(args) > 2 else args}: exit "
                             f"{proc.returncode}: {last}")
        return out.decode()

    # cleanup

    def cleanup(self) -> None:
        """Stop fleets and processes we started, drop our schemas, remove tmp."""
        for proc in self.patient:  # `up --detach` returns once its fleet is ready
            with contextlib.suppress(Exception):
                proc.communicate(timeout=150)
        for run_dir in list(self.run_dirs):
            if (run_dir / "run.json").exists():
                with contextlib.suppress(Exception):
                    self.fleetsim(["--run-dir", str(run_dir), "down", "--timeout", "30"], 90)
            self.run_dirs.discard(run_dir)
        for proc in self.popens:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # `fleetsim run` stops its pods
        deadline = time.monotonic() + 25
        for proc in self.popens:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.popens.clear()
        self.watch.stop.set()
        with self.watch.lock:
            known = list(self.watch.known.values())
        for proc in known:  # psutil checks the create time: no pid-reuse accidents
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    log(f"killing leftover process {proc.pid}")
                    proc.kill()
        for schema in sorted(self.schemas):
            try:
                self.drop_schema(schema)
            except psycopg2.Error as exc:
                log(f"could not drop schema {schema}: {str(exc).strip()}")
        with contextlib.suppress(Exception):
            self.conn.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- 1. throughput ------------------------------------------------------------


def fleet_run(bench: Bench, pods: int, steps: int, concurrency: int, sample: bool
              ) -> dict[str, Any]:
    """One `fleetsim run --workload noop --json`; its result, ready times, RSS."""
    schema = bench.new_schema(f"run{pods}")
    run_dir = bench.tmp / schema
    args = ["--run-dir", str(run_dir), "run", "--pods", str(pods), "--steps", str(steps),
            "--workload", "noop", "--batch", str(REF_BATCH), "--concurrency",
            str(concurrency), "--schema", schema, "--json"]
    load = os.getloadavg()[0]
    proc = bench.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    bench.watch.add_root(proc.pid, sample)
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        watched = bench.watch.remove_root(proc.pid)
    bench.popens.remove(proc)
    stderr = err.decode(errors="replace")
    try:
        result = json.loads(out)
    except ValueError:
        last = (stderr.strip().splitlines() or ["?"])[-1]
        raise BenchError(f"fleetsim run exited {proc.returncode}: {last}") from None
    bench.drop_schema(result.get("schema") or schema)  # `run` keeps it for `check`
    if result.get("schema") != schema:
        bench.drop_schema(schema)
    shutil.rmtree(run_dir, ignore_errors=True)
    ready = [float(m.group(4)) for m in READY_LINE.finditer(stderr)]
    row = {
        "kind": "fleet", "pods": pods, "concurrency": concurrency, "batch": REF_BATCH,
        "steps": steps, "steps_s": result["steps_per_s"], "elapsed_s": result["elapsed_s"],
        "valid": result["valid"], "exit": proc.returncode,
        "pods_with_work": result["pods_with_work"], "ready_s": ready,
        "loadavg_1m_before": load,
    }
    if sample:
        row["memory"] = rss_peaks(watched, proc.pid)
    log(f"  fleet  pods={pods:2d} c={concurrency}: {result['completed']}/{steps} in "
        f"{result['elapsed_s']:.2f} s = {result['steps_per_s'] or 0:,.0f} steps/s"
        f"{'' if result['valid'] else '  !! INVALID'} (load {load:.1f}; ready "
        f"{max(ready, default=0):.2f} s max)")
    return row


def reference_run(url: str, index: int, ctx: Any) -> contextlib.AbstractContextManager[Any]:
    """bench_store's fresh_run (own schema, always dropped) with its default knobs.

    Its signature is still moving (``checkpoint`` was added): pass each
    ANALYZE/CHECKPOINT switch it has, on, as ``bench_store.py`` does by default.
    """
    accepted = inspect.signature(fresh_run).parameters
    knobs = {name: True for name in ("analyze", "checkpoint") if name in accepted}
    return fresh_run(url, index, ctx, **knobs)


def bench_throughput(bench: Bench, args: argparse.Namespace) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    # "store": bench_store's bare Store.claim_steps/complete_many loop in 5
    # processes: the store's SQL without the pods around it.
    plan: list[tuple[str, int, int]] = [
        ("fleet", 1, 1), ("fleet", 2, 1), ("ref", REF_PROCS, 1), ("fleet", 5, 1),
        ("store", REF_PROCS, 1), ("fleet", 5, 4), ("fleet", 10, 1),
    ]
    for index in range(args.repeat):
        # The reference sits next to the 5-pod run; the order flips every repeat.
        order = plan if index % 2 == 0 else plan[::-1]
        log(f"throughput repeat {index + 1}/{args.repeat}: {args.steps} noop steps per run")
        with reference_run(bench.url, index, ctx) as ref_run:
            for kind, n, concurrency in order:
                if kind in ("ref", "store"):
                    result = ref_run.bench_claim(kind, REF_PROCS, REF_BATCH, args.steps)
                    row = {"kind": kind, "pods": REF_PROCS, "concurrency": 1,
                           "batch": REF_BATCH, "steps": args.steps,
                           "steps_s": result["steps_s"], "valid": result["ok"],
                           "loadavg_1m_before": result["loadavg_1m_before"]}
                else:
                    row = fleet_run(bench, n, args.steps, concurrency,
                                    sample=(n == 5 and concurrency == 1))
                row["repeat"] = index
                rows.append(row)
    return rows


# -- detached fleets (2., 3., 4.) ---------------------------------------------


class Fleet:
    """A `fleetsim up --detach` fleet in its own run directory and schema."""

    def __init__(self, bench: Bench, tag: str, pods: int, restart: bool, sample: bool) -> None:
        self.bench = bench
        self.pods = pods
        self.restart = restart
        self.sample = sample
        self.schema = bench.new_schema(tag)
        self.run_dir = bench.tmp / self.schema
        self.coordinator_pid: int | None = None
        self.ready_s: list[float] = []
        self.memory: dict[str, Any] | None = None
        self.s = f'"{self.schema}"'

    def up(self, steps: int) -> None:
        b = self.bench
        b.run_dirs.add(self.run_dir)
        b.fleetsim(["--run-dir", str(self.run_dir), "up", "--detach", "--pods", str(self.pods),
                    "--restart" if self.restart else "--no-restart",
                    "--workload", SLOW_WORKLOAD, "--schema", self.schema], patient=True)
        data = json.loads((self.run_dir / "run.json").read_text())
        self.coordinator_pid = data["coordinator_pid"]
        b.watch.add_root(self.coordinator_pid, self.sample)
        self.submit(steps)

    def submit(self, count: int) -> None:
        self.bench.fleetsim(["--run-dir", str(self.run_dir), "submit", "--count", str(count),
                             "--workload", SLOW_WORKLOAD, "--schema", self.schema, "--json"])

    def top_up(self, low: int, count: int) -> None:
        (depth,) = self.bench.sql(
            f"SELECT count(*) FROM {self.s}.steps WHERE status IN ('queued', 'failed')")[0]
        if depth < low:
            self.submit(count)

    def status(self) -> dict[str, Any]:
        out = self.bench.fleetsim(["--run-dir", str(self.run_dir), "status", "--json",
                                   "--schema", self.schema])
        data: dict[str, Any] = json.loads(out)
        return data

    def alive_pods(self) -> dict[str, tuple[int, int]]:
        """Pods alive in the store with a live process: id -> (pid, incarnation)."""
        rows = self.bench.sql(
            f"SELECT id, pid, incarnation FROM {self.s}.pods WHERE status = 'alive'"
            " AND heartbeat_at > now() - interval '2 seconds'")
        return {r[0]: (r[1], r[2]) for r in rows if is_pod_of(r[1], r[0], self.schema)}

    def lease(self) -> tuple[str, int, float] | None:
        rows = self.bench.sql(
            f"SELECT holder, term, extract(epoch FROM acquired_at)::float8"
            f" FROM {self.s}.leader_lease WHERE expires_at > now()")
        return (rows[0][0], int(rows[0][1]), float(rows[0][2])) if rows else None

    def wait_stable(self, pods: int, timeout: float = 90) -> None:
        """`pods` pods alive and a leader among them."""
        def ok() -> bool:
            alive = self.alive_pods()
            lease = self.lease()
            return len(alive) == pods and lease is not None and lease[0] in alive
        wait_for(ok, timeout, f"{pods} live pods and a leader in {self.schema}", 0.1)

    def down(self) -> None:
        b = self.bench
        if self.coordinator_pid is not None:
            watched = b.watch.remove_root(self.coordinator_pid)
            if self.sample:
                self.memory = rss_peaks(watched, self.coordinator_pid)
        log_path = self.run_dir / "logs" / "coordinator.log"
        with contextlib.suppress(OSError):
            self.ready_s = [float(m.group(4))
                            for m in READY_LINE.finditer(log_path.read_text(errors="replace"))]
        b.fleetsim(["--run-dir", str(self.run_dir), "down", "--json"], timeout=120)
        b.run_dirs.discard(self.run_dir)
        b.drop_schema(self.schema)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def is_pod_of(pid: int | None, pod_id: str, schema: str) -> bool:
    """Whether ``pid`` is the live process of pod ``pod_id`` on ``schema``."""
    if pid is None:
        return False
    try:
        proc = psutil.Process(pid)
        cmd = proc.cmdline()
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
    except psutil.Error:
        return False
    return "pod" in cmd and pod_id in cmd and schema in cmd


def kill_leader(fleet: Fleet) -> dict[str, Any]:
    """SIGKILL the leader; time until a new term is acquired, and the respawn."""
    b = fleet.bench
    fleet.wait_stable(fleet.pods)
    leader = fleet.status()["leader"]  # the public way to find the leader's pid
    if not leader or not leader.get("pid"):
        raise BenchError(f"fleetsim status shows no leader pid: {leader}")
    holder, term, pid = leader["pod"], int(leader["term"]), int(leader["pid"])
    lease = fleet.lease()
    if lease is None or lease[:2] != (holder, term) or not is_pod_of(pid, holder, fleet.schema):
        raise BenchError(f"leader changed under us ({leader} vs {lease})")
    (incarnation,) = b.sql(f"SELECT incarnation FROM {fleet.s}.pods WHERE id = %s",
                           (holder,))[0]
    time.sleep(JITTER.uniform(0, KILL_JITTER_S))
    lease = fleet.lease()
    if lease is None or lease[:2] != (holder, term) or not is_pod_of(pid, holder, fleet.schema):
        raise BenchError(f"leader changed under us ({leader} vs {lease})")
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    def new_term() -> tuple[str, int, float] | None:
        now = fleet.lease()
        return now if now is not None and now[1] > term else None

    new = wait_for(new_term, 60, "a new leader term", interval=0.01)
    seen_at = time.time()
    kill_db = b.db_time(killed_at)
    out: dict[str, Any] = {
        "old_leader": holder, "old_term": term, "new_leader": new[0], "new_term": new[1],
        "same_pod_id": new[0] == holder,  # its respawned incarnation won
        "failover_s": new[2] - kill_db, "seen_after_s": seen_at - killed_at,
    }
    if fleet.restart:
        out.update(wait_respawn(fleet, holder, incarnation, kill_db))
    log(f"  failover: {holder} (term {term}) killed -> {new[0]} term {new[1]} after "
        f"{out['failover_s']:.2f} s{' (respawned incarnation)' if out['same_pod_id'] else ''}")
    return out


def wait_respawn(fleet: Fleet, pod_id: str, incarnation: int, kill_db: float
                 ) -> dict[str, Any]:
    """Wait for the coordinator's respawn of ``pod_id``; its spawn and ready times."""
    b = fleet.bench
    row = wait_for(lambda: b.sql(
        f"SELECT pid, incarnation, extract(epoch FROM started_at)::float8 FROM {fleet.s}.pods"
        " WHERE id = %s AND incarnation > %s AND status = 'alive'", (pod_id, incarnation)),
        90, f"the respawn of {pod_id}", interval=0.05)[0]
    pid, _, started_at = row
    out: dict[str, Any] = {"respawn_registered_s": started_at - kill_db}
    with contextlib.suppress(psutil.Error):
        spawned = b.db_time(psutil.Process(pid).create_time() - b.create_time_offset)
        out["respawn_ready_s"] = started_at - spawned  # process creation -> registered
    return out


ORPHANS = """
SELECT c.id,
       (SELECT extract(epoch FROM min(a.claimed_at))::float8 FROM {s}.step_attempts a
         WHERE a.step_id = c.id AND a.claim_token > c.tok
           AND (a.pod_id <> %(pod)s OR a.incarnation > %(inc)s)) AS reclaimed_at,
       (SELECT string_agg(DISTINCT a.pod_id || '/' || a.incarnation, ',')
          FROM {s}.step_attempts a
         WHERE a.step_id = c.id AND a.claim_token > c.tok) AS reclaimed_by,
       o.outcome, extract(epoch FROM o.finished_at)::float8, s.status
  FROM unnest(%(ids)s::bigint[], %(toks)s::bigint[]) AS c(id, tok)
  JOIN {s}.step_attempts o ON o.claim_token = c.tok
  JOIN {s}.steps s ON s.id = c.id
"""


def kill_orphan_holder(fleet: Fleet, pods: int) -> dict[str, Any] | None:
    """SIGKILL a non-leader holding claimed steps; time until all are claimed again.

    None if the pod turned out to hold nothing when it died (then kill another).
    """
    b = fleet.bench
    fleet.wait_stable(pods)
    time.sleep(JITTER.uniform(0, KILL_JITTER_S))

    def pick() -> tuple[Any, ...] | None:
        rows = b.sql(
            f"SELECT p.id, p.pid, p.incarnation, count(*) FROM {fleet.s}.pods p"
            f" JOIN {fleet.s}.steps s ON s.claimed_by = p.id AND s.status = 'claimed'"
            f" WHERE p.status = 'alive' AND p.id IS DISTINCT FROM (SELECT holder FROM"
            f" {fleet.s}.leader_lease WHERE expires_at > now())"
            # Steps already orphaned once would burn their attempts (a respawned
            # pod claims its own orphans back): prefer a pod holding fresh ones.
            " GROUP BY 1, 2, 3 ORDER BY max(s.attempts), random()")
        rows = [r for r in rows if is_pod_of(r[1], r[0], fleet.schema)]
        return rows[0] if rows else None

    victim, pid, incarnation, _ = wait_for(pick, 30, "a non-leader holding steps", 0.05)
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    # A statement the pod had already sent may still commit: let it land.
    time.sleep(0.1)
    held = b.sql(f"SELECT id, claim_token FROM {fleet.s}.steps"
                 " WHERE claimed_by = %s AND status = 'claimed'", (victim,))
    if not held:  # it wrote its batch back just as it was killed: not a sample
        log(f"  orphans: {victim} held no claimed steps once killed; killing another")
        if fleet.restart:
            wait_respawn(fleet, victim, incarnation, b.db_time(killed_at))
        return None
    params = {"ids": [r[0] for r in held], "toks": [r[1] for r in held], "pod": victim,
              "inc": incarnation}
    query = ORPHANS.format(s=fleet.s)

    def settled() -> list[tuple[Any, ...]] | None:
        rows = b.sql(query, params)
        done = all(r[1] is not None or r[3] == "completed" or r[5] in ("dead", "cancelled")
                   for r in rows)
        return rows if done else None

    rows = wait_for(settled, 90, f"the steps of {victim} to be claimed again", 0.05)
    kill_db = b.db_time(killed_at)
    reclaimed = [r for r in rows if r[1] is not None]
    dead = sum(1 for r in rows if r[1] is None and r[5] == "dead")
    (by_leader,) = b.sql(
        f"SELECT count(*) FROM {fleet.s}.leader_actions"
        " WHERE action IN ('requeue', 'dead_letter') AND claim_token = ANY(%s)",
        (params["toks"],))[0]
    requeued = [r[4] for r in rows if r[3] == "lease_lost" and r[4] is not None]
    by = sorted({p for r in reclaimed for p in (r[2] or "").split(",") if p})
    out: dict[str, Any] = {
        "victim": victim, "held": len(rows), "reclaimed": len(reclaimed),
        "dead_lettered": dead,
        "orphan_recovery_s": (max(r[1] for r in reclaimed) - kill_db) if reclaimed else None,
        "requeued_s": (max(requeued) - kill_db) if requeued else None,
        "requeued_by": "leader recovery" if by_leader else "re-registration",
        "reclaimed_by": by,
        "reclaimed_by_respawn": any(p.startswith(f"{victim}/") for p in by),
    }
    if fleet.restart:
        out.update(wait_respawn(fleet, victim, incarnation, kill_db))
    log(f"  orphans: {victim} killed holding {len(rows)} steps -> requeued after "
        f"{out['requeued_s'] or float('nan'):.2f} s ({out['requeued_by']}), all claimed again"
        f" after {out['orphan_recovery_s'] or float('nan'):.2f} s"
        + (f" ({dead} dead-lettered)" if dead else ""))
    return out


def bench_failover(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """2. leader kills and 3b. orphan kills, alternating, in one --restart fleet."""
    log(f"failover: fleet of 5 (--restart, {SLOW_WORKLOAD}), {args.kills} leader kills"
        f" and {args.kills} non-leader kills, alternating")
    fleet = Fleet(bench, "fo", 5, restart=True, sample=True)
    failovers: list[dict[str, Any]] = []
    orphans: list[dict[str, Any]] = []
    try:
        fleet.up(steps=8000)
        for _ in range(args.kills):
            fleet.top_up(3000, 5000)
            failovers.append(kill_leader(fleet))
            for _attempt in range(3):
                result = kill_orphan_holder(fleet, 5)
                if result is not None:
                    orphans.append(result)
                    break
    finally:
        fleet.down()
    return {"failover": failovers, "orphans_restart": orphans, "ready_s": fleet.ready_s,
            "memory": fleet.memory}


def bench_orphans(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """3a. orphan kills in fleets without --restart (2 kills per fleet of 5)."""
    per_fleet = 2
    log(f"orphans: {args.kills} non-leader kills in fleets of 5 without --restart"
        f" ({per_fleet} per fleet)")
    orphans: list[dict[str, Any]] = []
    ready: list[float] = []
    while len(orphans) < args.kills:
        fleet = Fleet(bench, "or", 5, restart=False, sample=False)
        try:
            fleet.up(steps=3000)
            killed = 0
            while killed < per_fleet and len(orphans) < args.kills:
                result = kill_orphan_holder(fleet, 5 - killed)
                killed += 1
                if result is not None:
                    orphans.append(result)
        finally:
            fleet.down()
        ready += fleet.ready_s
    return {"orphans_recovery": orphans, "ready_s": ready}


# -- summary and report --------------------------------------------------------


def dist(values: Sequence[float]) -> dict[str, Any] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    rows = raw.get("throughput") or []
    if rows:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            key = (r["kind"] if r["kind"] in ("ref", "store")
                   else f"pods{r['pods']}_c{r['concurrency']}")
            groups.setdefault(key, []).append(r)
        s["throughput"] = {
            k: {**(dist([r["steps_s"] for r in v]) or {}), "pods": v[0]["pods"],
                "concurrency": v[0]["concurrency"], "all_valid": all(r["valid"] for r in v)}
            for k, v in groups.items()
        }
        ref = [r for r in rows if r["kind"] == "ref"]
        five = [r for r in rows if r["kind"] == "fleet" and r["pods"] == 5
                and r["concurrency"] == 1]
        if ref and five:
            paired = [f["steps_s"] / r["steps_s"] for r in ref for f in five
                      if f["repeat"] == r["repeat"]]
            s["ratio_5pods_ref"] = {
                "ratio_of_medians": statistics.median(f["steps_s"] for f in five)
                / statistics.median(r["steps_s"] for r in ref),
                "paired": dist(paired), "goal": GOAL_RATIO,
            }
        store = [r for r in rows if r["kind"] == "store"]
        if ref and store:
            s["ratio_storeloop_ref"] = (statistics.median(r["steps_s"] for r in store)
                                        / statistics.median(r["steps_s"] for r in ref))
        mem = [r["memory"] for r in five if r.get("memory")]
        if mem:
            s["memory_run"] = {
                "coordinator_rss": dist([m["rss"]["coordinator"] for m in mem]),
                "pod_rss_max": dist([m["rss"]["pod_max"] for m in mem]),
                "coordinator_hwm": dist([m["vm_hwm"]["coordinator"] for m in mem]),
                "pod_hwm_max": dist([m["vm_hwm"]["pod_max"] for m in mem]),
            }
    fo = raw.get("failover") or {}
    if fo.get("failover"):
        s["failover_s"] = dist([r["failover_s"] for r in fo["failover"]])
        s["failover_won_by_respawn"] = sum(r["same_pod_id"] for r in fo["failover"])
    if fo.get("orphans_restart"):
        s["orphans_restart_s"] = dist([r["orphan_recovery_s"] for r in fo["orphans_restart"]])
        s["orphans_restart_requeued_s"] = dist(
            [r["requeued_s"] for r in fo["orphans_restart"]])
    if fo.get("memory"):
        m = fo["memory"]
        s["memory_up"] = {"coordinator_rss": m["rss"]["coordinator"],
                          "pod_rss_max": m["rss"]["pod_max"],
                          "coordinator_hwm": m["vm_hwm"]["coordinator"],
                          "pod_hwm_max": m["vm_hwm"]["pod_max"], "pods_seen": m["rss"]["pods"]}
    orph = raw.get("orphans") or {}
    if orph.get("orphans_recovery"):
        s["orphans_recovery_s"] = dist(
            [r["orphan_recovery_s"] for r in orph["orphans_recovery"]])
        s["orphans_recovery_requeued_s"] = dist(
            [r["requeued_s"] for r in orph["orphans_recovery"]])
    ready: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] == "fleet":
            ready.setdefault(f"run, {r['pods']} pods", []).extend(r["ready_s"])
    up_ready = (fo.get("ready_s") or []) + (orph.get("ready_s") or [])
    if up_ready:
        ready.setdefault("up --detach, 5 pods", []).extend(up_ready)
    respawn = [r.get("respawn_ready_s") for r in
               (fo.get("failover") or []) + (fo.get("orphans_restart") or [])]
    if any(v is not None for v in respawn):
        ready["respawned pod (1 at a time)"] = [v for v in respawn if v is not None]
    s["ready_s"] = {k: dist(v) for k, v in ready.items() if v}
    everything = [x for values in ready.values() for x in values]
    if everything:
        s["ready_s_all"] = dist(everything)
    return s


def print_report(s: dict[str, Any], meta: dict[str, Any]) -> None:
    def rng(d: dict[str, Any] | None, spec: str = ",.0f", unit: str = "") -> str:
        if not d:
            return "-"
        return f"{d['median']:{spec}}{unit} ({d['min']:{spec}}-{d['max']:{spec}})"

    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v / 2**20:.0f} MiB"

    print()
    print(f"fleetsim fleet benchmark - {meta['repeat']} repeat(s); median (min-max)")
    print(f"server {meta['server_version']}; {meta['cpus']} CPUs, shared; load avg "
          f"{meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f}")
    tp = s.get("throughput")
    if tp:
        print()
        print(f"1. throughput, noop, batch {REF_BATCH}, {meta['steps']:,} steps, steps/s")
        print(f"   {'what':<42} {'steps/s':>26}")
        order = ["ref", "store", "pods1_c1", "pods2_c1", "pods5_c1", "pods5_c4", "pods10_c1"]
        for key in sorted(tp, key=lambda k: order.index(k) if k in order else 99):
            row = tp[key]
            if key == "ref":
                name = f"reference SKIP LOCKED, {row['pods']} procs"
            elif key == "store":
                name = f"bare Store loop (bench_store), {row['pods']} procs"
            else:
                name = f"fleetsim run --pods {row['pods']}" + (
                    f" --concurrency {row['concurrency']}" if row["concurrency"] > 1 else "")
            flag = "" if row["all_valid"] else "  !! invalid run"
            print(f"   {name:<42} {rng(row):>26}{flag}")
        ratio = s.get("ratio_5pods_ref")
        if ratio:
            ok = ratio["ratio_of_medians"] >= GOAL_RATIO
            p = ratio["paired"]
            print(f"   5 pods / reference: {ratio['ratio_of_medians']:.0%} (paired "
                  f"{p['min']:.0%}-{p['max']:.0%}); goal >= {GOAL_RATIO:.0%}: "
                  f"{'met' if ok else 'MISSED'}")
        if "ratio_storeloop_ref" in s:
            print(f"   bare Store loop / reference: {s['ratio_storeloop_ref']:.0%}")
    print()
    print("2-4. timings (s), median / max (n)")

    def line(name: str, d: dict[str, Any] | None, extra: str = "") -> None:
        if d:
            print(f"   {name:<50} {d['median']:6.2f} / {d['max']:6.2f}  (n={d['n']}){extra}")

    if s.get("failover_s"):
        line("leader failover: kill -> new term", s["failover_s"],
             f"  [{s['failover_won_by_respawn']} won by the respawned pod]")
    line("orphans, no --restart: kill -> requeued by leader", s.get("orphans_recovery_requeued_s"))
    line("orphans, no --restart: kill -> all re-claimed", s.get("orphans_recovery_s"))
    line("orphans, --restart: kill -> requeued", s.get("orphans_restart_requeued_s"))
    line("orphans, --restart: kill -> all re-claimed", s.get("orphans_restart_s"))
    for name, d in (s.get("ready_s") or {}).items():
        goal = ""
        if d:
            verdict = "met" if d["max"] < GOAL_READY_S else "max over"
            goal = f"  goal < {GOAL_READY_S:.0f} s: {verdict}"
        line(f"pod start-to-ready, {name}", d, goal)
    mem_run, mem_up = s.get("memory_run"), s.get("memory_up")
    if mem_run or mem_up:
        print()
        print("5. peak RSS (psutil every 100 ms; kernel VmHWM in brackets)")
        if mem_run:
            print(f"   fleetsim run coordinator (5 pods, median of runs): "
                  f"{mib(mem_run['coordinator_rss']['median'])} "
                  f"[{mib((mem_run['coordinator_hwm'] or {}).get('median'))}]")
            print(f"   pod, largest of 5 (median of runs):               "
                  f"{mib(mem_run['pod_rss_max']['median'])} "
                  f"[{mib((mem_run['pod_hwm_max'] or {}).get('median'))}]")
        if mem_up:
            print(f"   up --detach coordinator (failover fleet):          "
                  f"{mib(mem_up['coordinator_rss'])} [{mib(mem_up['coordinator_hwm'])}]")
            label = f"pod, largest of {mem_up['pods_seen']} (incl. respawns):"
            print(f"   {label:<51}{mib(mem_up['pod_rss_max'])} [{mib(mem_up['pod_hwm_max'])}]")


# -- main ----------------------------------------------------------------------


PARTS = ("throughput", "failover", "orphans")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark a fleetsim fleet end to end.")
    parser.add_argument("--store", default=os.environ.get("FLEETSIM_STORE", DEFAULT_URL),
                        help="PostgreSQL URL (default: $FLEETSIM_STORE or %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="throughput repeats to take the median of (default 3)")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--steps", type=int,
                        help="noop steps per throughput run (default 20000, --quick 2000)")
    parser.add_argument("--kills", type=int,
                        help="kills per timing (default 10, --quick 3)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated subset of %(default)s")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.steps = args.steps or (2_000 if args.quick else 20_000)
    args.kills = args.kills or (3 if args.quick else 10)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    return args


def start_meta(url: str, app: str, prog: str, **extra: Any) -> dict[str, Any] | None:
    """Probe the server and describe the run; None (after a one-line error) if unreachable.

    Also turns SIGTERM into KeyboardInterrupt, so a killed benchmark cleans up.
    """

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        probe = connect(url, None, app)
        with probe.cursor() as cur:
            cur.execute("SELECT current_setting('server_version')")
            (version,) = cur.fetchone()
        probe.close()
    except psycopg2.Error as exc:
        print(f"{prog}: cannot connect: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return None
    return {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "server_version": version, "python": platform.python_version(),
        "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), **extra,
    }


def finish_report(meta: dict[str, Any], raw: dict[str, Any], json_path: str | None,
                  summarise: Any, print_report: Any) -> None:
    """Summarise, print the table and the JSON, and write the full document if asked."""
    meta["loadavg_end"] = os.getloadavg()
    summary = summarise(raw)
    print_report(summary, meta)
    document = {"meta": meta, "summary": summary, "raw": raw}
    print()
    print(json.dumps({"meta": meta, "summary": summary}, indent=2, default=str))
    if json_path:
        Path(json_path).write_text(json.dumps(document, indent=2, default=str) + "\n")
        log(f"wrote {json_path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    meta = start_meta(args.store, APP, "bench_fleet", repeat=args.repeat, steps=args.steps,
                      kills=args.kills, parts=args.parts)
    if meta is None:
        return 2
    raw: dict[str, Any] = {}
    bench: Bench | None = None
    code = 0
    try:
        bench = Bench(args.store, Path(tempfile.mkdtemp(prefix="bench_fleet_")))
        meta["db_clock_offset_s"] = bench.offset
        if "throughput" in args.parts:
            raw["throughput"] = bench_throughput(bench, args)
        if "failover" in args.parts:
            raw["failover"] = bench_failover(bench, args)
        if "orphans" in args.parts:
            raw["orphans"] = bench_orphans(bench, args)
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        code = 130
    except (BenchError, subprocess.TimeoutExpired, psycopg2.Error) as exc:
        log(f"failed: {exc}")
        code = 1
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if bench is not None:
                bench.cleanup()
                log("cleaned up: fleets stopped, schemas dropped")
        finally:
            signal.signal(signal.SIGINT, previous)
    if code == 130:
        return code
    finish_report(meta, raw, args.json, summarise, print_report)
    return code


if __name__ == "__main__":
    sys.exit(main())
