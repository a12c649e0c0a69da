#!/usr/bin/env python3
"""Chaos figures for a fleetsim fleet (a benchmark, not a test).

Measured, each over ``--repeat`` trials (default 10), median and max:

1. **failover** in one in-process fleet, ``Coordinator(FleetSpec(pods=5,
   fault_proxy=True, restart=True))`` on a fresh schema, kept busy with
   ``sleep:20`` steps; faults go through ``coordinator.injector.apply(...)``
   exactly as ``fleetsim chaos ...`` does. Three faults, interleaved:

   - ``kill-leader`` (SIGKILL; the coordinator respawns the pod);
   - ``pause`` of the leader: SIGSTOP for 3 x the lease (9 s);
   - ``partition`` of the leader from the store: its fault proxy blackholes
     for 3 x the lease;

   time from the injector call to a lease with a higher term in
   ``leader_lease``, polled with psycopg2 every ~10 ms (``SELECT holder, term
   ... WHERE expires_at > now()``). The lease's own ``acquired_at`` (database
   clock, offset measured at start) is kept beside it. After each trial the
   fault is over (healed), the victim is back alive (registered, heartbeating,
   on the bus) and a leader is in place before the next one starts, after a
   random 0-2.5 s wait so faults do not phase-lock with renewals.

2. **throughput under a storage brownout**, in a second in-process fleet (4
   pods, ``noop``, same options): trials alternate clean, brownout, clean,
   brownout, ... In a brownout trial ``storage-fault --all`` (20 % statement
   errors, 50 ms latency on every pod statement) is applied before the
   trial's steps are submitted and healed once they are all done. Each trial
   is measured as ``fleetsim run`` does: completed / (last completion - first
   claim) from ``step_attempts``, for that trial's steps. Reported: the
   medians and their ratio (and the paired ratios).

3. **control round trip under metrics load**: a real fleet (``fleetsim up
   --detach --pods 5``, busy with ``sleep:50`` steps; bench_fleet's ``Fleet``)
   and 5 separate processes, each a PUSH socket (the project's bus library,
   pyzmq) streaming valid ``Metrics`` frames to its metrics endpoint as fast
   as it takes them. From this process a ``ControlClient`` times
   ``--requests`` ``Ping`` round trips per trial (answered by the
   coordinator's bus thread) and a fifth as many ``StatusRequest`` (answered
   from the store by a worker thread); p50/p99 per trial, and pooled. A
   trial of Pings before the flood starts gives the unloaded baseline.

Every fleet gets its own schema and run directory (in a temporary folder),
removed afterwards, also on Ctrl-C or SIGTERM (fleets stopped, flooders and
leftover pods killed, schemas dropped). Fleets use fleetsim's default timings.

    /work/venv/bin/python scripts/bench_chaos.py                   # full run (~10 min)
    /work/venv/bin/python scripts/bench_chaos.py --quick
    /work/venv/bin/python scripts/bench_chaos.py --parts brownout --repeat 4 --json b.json

Progress goes to stderr, the table and JSON to stdout. On a shared machine,
read the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import psycopg2

# scripts/ is not a package: import the colleagues' benchmarks by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fleet
from bench_fleet import KILL_JITTER_S, Bench, BenchError, Fleet, dist, wait_for
from bench_store import log

DEFAULT_URL = bench_fleet.DEFAULT_URL
APP = "fleetsim-bench-chaos"
PARTS = ("failover", "brownout", "latency")

FAILOVER_PODS = 5
FAILOVER_WORKLOAD = "sleep:20"
BROWNOUT_PODS = 4
BROWNOUT_WORKLOAD = "sleep:1"
BROWNOUT = {"error_rate": 0.2, "latency_ms": 50.0}
FLOODERS = 5
POLL_S = 0.010


# -- an in-process fleet -----------------------------------------------------------


class InProcessFleet:
    """A ``Coordinator`` run by this process on a fresh schema, supervised by a thread."""

    def __init__(self, bench: Bench, tag: str, pods: int, workload: str) -> None:
        from fleetsim.coordinator import Coordinator, FleetSpec

        self.bench = bench
        self.tag = tag
        self.schema = f"bench_chaos_{os.getpid()}_{secrets.token_hex(3)}_{tag}"
        bench.schemas.add(self.schema)  # dropped by bench.cleanup() whatever happens
        self.run_dir = bench.tmp / self.schema
        self.s = f'"{self.schema}"'
        self.spec = FleetSpec(run_dir=self.run_dir, pods=pods, workload=workload,
                              store_url=bench.url, schema=self.schema, seed=0,
                              fault_proxy=True, restart=True)
        self.coordinator = Coordinator(self.spec, echo=lambda line: log(f"  [{tag}] {line}"))
        self.timings = self.spec.timings
        self._supervisor: threading.Thread | None = None
        self._stopped = False

    @property
    def injector(self) -> Any:
        return self.coordinator.injector

    def start(self) -> None:
        log(f"{self.tag}: starting {self.spec.pods} pods ({self.spec.workload}, fault proxies,"
            f" restart) on schema {self.schema}")
        try:
            self.coordinator.start()
        except BaseException:
            self._stopped = True  # start() stopped what it had started
            self._remove()
            raise
        # What `fleetsim up` does between requests: reap and respawn pods.
        self._supervisor = threading.Thread(target=self.coordinator.run_forever,
                                            kwargs={"tick_s": 0.05}, name="supervise",
                                            daemon=True)
        self._supervisor.start()

    def submit(self, count: int) -> tuple[int, int]:
        """Submit ``count`` steps (the coordinator's store: no faults); their id range."""
        from fleetsim.store import StepSpec

        store = self.coordinator.store
        ids: list[int] = []
        for start in range(0, count, 10_000):
            ids += store.submit_many([StepSpec("default")] * min(10_000, count - start))
        return min(ids), max(ids)

    def depth(self) -> int:
        (n,) = self.bench.sql(
            f"SELECT count(*) FROM {self.s}.steps WHERE status IN ('queued', 'failed')")[0]
        return int(n)

    def top_up(self, low: int, count: int) -> None:
        if self.depth() < low:
            self.submit(count)

    def lease(self) -> tuple[str, int, float] | None:
        rows = self.bench.sql(
            f"SELECT holder, term, extract(epoch FROM acquired_at)::float8"
            f" FROM {self.s}.leader_lease WHERE expires_at > now()")
        return (rows[0][0], int(rows[0][1]), float(rows[0][2])) if rows else None

    def stable(self) -> bool:
        """Every pod we run is alive in the store (its current pid, heartbeating since it
        last registered), heard on the bus, and one of them holds the lease."""
        pids = self.coordinator.pod_pids()
        rows = self.bench.sql(
            f"SELECT id, pid FROM {self.s}.pods WHERE status = 'alive'"
            " AND heartbeat_at > started_at AND heartbeat_at > now() - interval '1.5 s'")
        alive = {r[0]: r[1] for r in rows}
        if len(pids) != self.spec.pods or any(alive.get(p) != pid for p, pid in pids.items()):
            return False
        if not set(pids) <= set(self.coordinator.bus.connected_pods()):
            return False
        lease = self.lease()
        return lease is not None and lease[0] in pids

    def wait_stable(self, timeout: float = 90) -> None:
        wait_for(self.stable, timeout, f"all {self.spec.pods} pods alive and a leader", 0.05)

    def check(self, final: bool) -> dict[str, Any]:
        """The checker's verdict on this fleet's history so far."""
        from fleetsim.checker import check

        report = check(self.coordinator.store, final=final)
        return {"verdict": report.verdict, "final": final,
                "violations": report.counts["violations"],
                "steps": report.counts["steps"], "attempts": report.counts["attempts"],
                "terms": report.counts["terms"],
                "rejected_writes": report.counts["rejected_writes"]}

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        spawned = [e["pid"] for e in self.coordinator.events if e["topic"] == "pod.started"]
        proxy = self.coordinator.proxy_process
        try:
            self.coordinator.stop()  # heals every fault first: a stopped pod ignores SIGTERM
        finally:
            if self._supervisor is not None:
                self._supervisor.join(5)
            # Anything the coordinator could not stop: kill it (checked by command
            # line, so a reused pid is never hit).
            for pid in spawned:
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    if self.schema in " ".join(proc.cmdline()):
                        log(f"killing leftover pod process {pid}")
                        proc.kill()
            if proxy is not None and proxy.poll() is None:
                proxy.kill()
                proxy.wait()
            self._remove()

    def _remove(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        with contextlib.suppress(psycopg2.Error):
            self.bench.drop_schema(self.schema)


# -- 1. failover -------------------------------------------------------------------


def fault_plan(kind: str, lease_s: float) -> tuple[str, str | None, dict[str, Any], float]:
    """(action, target, params, how long the fault lasts) for a failover trial."""
    if kind == "kill-leader":
        return "kill-leader", None, {}, 0.0
    if kind == "pause-leader":
        return "pause", "leader", {"for": 3 * lease_s}, 3 * lease_s
    return ("partition", "leader", {"from": "store", "mode": "blackhole", "for": 3 * lease_s},
            3 * lease_s)


def wait_new_term(fleet: InProcessFleet, term: int, timeout: float = 60
                  ) -> tuple[tuple[str, int, float], float]:
    """Poll leader_lease every ~10 ms until a lease with a term above ``term``."""
    deadline = time.monotonic() + timeout
    while True:
        polled = time.monotonic()
        lease = fleet.lease()
        if lease is not None and lease[1] > term:
            return lease, time.monotonic()
        if polled > deadline:
            raise BenchError(f"no new leader term within {timeout:.0f} s")
        time.sleep(max(0.0, POLL_S - (time.monotonic() - polled)))


def failover_trial(fleet: InProcessFleet, kind: str, rng: random.Random
                   ) -> dict[str, Any] | None:
    """One fault against the leader; None if leadership moved before it landed."""
    bench = fleet.bench
    fleet.wait_stable()
    fleet.top_up(4000, 10_000)
    time.sleep(rng.uniform(0, KILL_JITTER_S))
    action, target, params, lasts = fault_plan(kind, fleet.timings.lease_s)
    lease = fleet.lease()
    if lease is None:
        return None
    holder, term, _ = lease
    injected_wall = time.time()
    injected = time.monotonic()
    result = fleet.injector.apply(action, target, params)
    applied_s = time.monotonic() - injected
    victim = result["pod"]
    if victim != holder:  # a new term began between our read and the injection
        log(f"  {kind}: leadership moved before the fault landed; trial discarded")
        if lasts:
            fleet.injector.apply("heal", victim, {})
        return None
    new, seen = wait_new_term(fleet, term)
    out: dict[str, Any] = {
        "kind": kind, "victim": victim, "old_term": term, "new_leader": new[0],
        "new_term": new[1], "failover_s": seen - injected,
        "acquired_after_s": new[2] - bench.db_time(injected_wall),
        "apply_s": applied_s, "same_pod_id": new[0] == victim,
    }
    if lasts:
        # Let the fault run its course (the injector's timer ends it), then heal
        # anything left, as `fleetsim chaos heal` would.
        time.sleep(max(0.0, injected + lasts + 0.05 - time.monotonic()))
        out["healed"] = fleet.injector.apply("heal", victim, {}).get("healed", [])
    fleet.wait_stable()
    out["back_alive_s"] = time.monotonic() - injected
    log(f"  {kind}: {victim} (term {term}) -> {new[0]} term {new[1]} seen after "
        f"{out['failover_s']:.2f} s (acquired +{out['acquired_after_s']:.2f} s);"
        f" all back after {out['back_alive_s']:.1f} s")
    return out


def bench_failover(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    kinds = ("kill-leader", "pause-leader", "partition-leader")
    log(f"failover: {args.repeat} trials each of {', '.join(kinds)}, interleaved")
    fleet = InProcessFleet(bench, "failover", FAILOVER_PODS, FAILOVER_WORKLOAD)
    bench.fleets.append(fleet)
    rng = random.Random(0)
    trials: list[dict[str, Any]] = []
    discarded = 0
    try:
        fleet.start()
        fleet.submit(10_000)
        for index in range(args.repeat):
            for kind in kinds:
                log(f"failover trial {index + 1}/{args.repeat}: {kind}")
                for _attempt in range(5):
                    result = failover_trial(fleet, kind, rng)
                    if result is not None:
                        result["trial"] = index
                        trials.append(result)
                        break
                    discarded += 1
                else:
                    raise BenchError(f"{kind}: the leader kept changing under us")
        verdict = fleet.check(final=False)
        log(f"failover fleet history: {verdict['verdict']}, violations "
            f"{sum(verdict['violations'].values())}")
    finally:
        fleet.stop()
    return {"trials": trials, "discarded": discarded, "history": verdict,
            "lease_s": fleet.timings.lease_s, "pods": FAILOVER_PODS,
            "workload": FAILOVER_WORKLOAD}


# -- 2. brownout -------------------------------------------------------------------


def brownout_trial(fleet: InProcessFleet, faulty: bool, steps: int) -> dict[str, Any]:
    bench = fleet.bench
    fleet.wait_stable()
    if faulty:
        fleet.injector.apply("storage-fault", "all", dict(BROWNOUT))
    try:
        lo, hi = fleet.submit(steps)
        wait_for(lambda: bench.sql(
            f"SELECT count(*) = 0 FROM {fleet.s}.steps WHERE id BETWEEN %s AND %s"
            " AND status IN ('queued', 'claimed', 'failed')", (lo, hi))[0][0],
            900, f"{steps} steps to finish", 0.05)
    finally:
        if faulty:
            fleet.injector.apply("heal", None, {})
    # As `fleetsim run`: completed / (last completion - first claim). Also the
    # steady rate between the 10th and the 90th percentile of completions,
    # which leaves out the ramp (idle pods poll every 0.2 s) and the tail.
    completed, window, attempts, steady = bench.sql(
        f"SELECT count(*) FILTER (WHERE outcome = 'completed'),"
        f" extract(epoch FROM max(finished_at) FILTER (WHERE outcome = 'completed')"
        f"                   - min(claimed_at))::float8, count(*),"
        f" extract(epoch FROM percentile_disc(0.9) WITHIN GROUP (ORDER BY finished_at)"
        f"                      FILTER (WHERE outcome = 'completed')"
        f"                  - percentile_disc(0.1) WITHIN GROUP (ORDER BY finished_at)"
        f"                      FILTER (WHERE outcome = 'completed'))::float8"
        f" FROM {fleet.s}.step_attempts WHERE step_id BETWEEN %s AND %s", (lo, hi))[0]
    (dead,) = bench.sql(f"SELECT count(*) FROM {fleet.s}.steps WHERE id BETWEEN %s AND %s"
                        " AND status = 'dead'", (lo, hi))[0]
    rate = completed / window if window else None
    log(f"  {'brownout' if faulty else 'clean':8s}: {completed}/{steps} in {window:.2f} s ="
        f" {rate or 0:,.0f} steps/s ({attempts} attempts, {dead} dead)")
    return {"kind": "brownout" if faulty else "clean", "steps": steps, "completed": completed,
            "dead": int(dead), "attempts": int(attempts), "window_s": window,
            "steps_s": rate,
            "steady_steps_s": 0.8 * completed / steady if steady else None}


def bench_brownout(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    log(f"brownout: {args.repeat} clean and {args.repeat} brownout trials of {args.steps}"
        f" {BROWNOUT_WORKLOAD} steps, alternating; {BROWNOUT_PODS} pods")
    fleet = InProcessFleet(bench, "brownout", BROWNOUT_PODS, BROWNOUT_WORKLOAD)
    bench.fleets.append(fleet)
    trials: list[dict[str, Any]] = []
    try:
        fleet.start()
        for index in range(args.repeat):
            log(f"brownout trial pair {index + 1}/{args.repeat}")
            for faulty in (False, True):
                row = brownout_trial(fleet, faulty, args.steps)
                row["trial"] = index
                trials.append(row)
        verdict = fleet.check(final=True)
        log(f"brownout fleet history: {verdict['verdict']}, violations "
            f"{sum(verdict['violations'].values())}")
    finally:
        fleet.stop()
    return {"trials": trials, "history": verdict, "pods": BROWNOUT_PODS,
            "workload": BROWNOUT_WORKLOAD, "fault": BROWNOUT}


# -- 3. control round trips under a metrics flood ------------------------------------


def _flood(endpoint: str, index: int, stop: Any, sent: Any) -> None:
    """Flooder process: one PUSH socket sending Metrics as fast as they are taken."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent owns Ctrl-C
    import zmq

    from fleetsim.bus import Metrics, encode

    frame = encode(Metrics(f"flood-{index}", 0, {f"counter_{i}": float(i) for i in range(10)},
                           {"rss_mb": 1.0}, time.time()))
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDTIMEO, 100)  # blocked at the high-water mark: recheck stop
    push.connect(endpoint)
    n = 0
    try:
        while not stop.is_set():
            for _ in range(64):
                try:
                    push.send(frame)
                    n += 1
                except zmq.Again:
                    break
            sent.value = n
    finally:
        sent.value = n
        push.close(linger=0)
        context.term()


class Flood:
    """``FLOODERS`` flooding processes (spawned), stopped and reaped by :meth:`stop`."""

    def __init__(self, endpoint: str, count: int) -> None:
        ctx = mp.get_context("spawn")
        self.stop_event = ctx.Event()
        self.sent = [ctx.Value("q", 0, lock=False) for _ in range(count)]
        self.procs = [ctx.Process(target=_flood, args=(endpoint, i, self.stop_event, v),
                                  name=f"flood-{i}", daemon=True)
                      for i, v in enumerate(self.sent)]

    def start(self) -> None:
        for proc in self.procs:
            proc.start()

    def total(self) -> int:
        return sum(int(v.value) for v in self.sent)

    def stop(self) -> None:
        self.stop_event.set()
        for proc in self.procs:
            if proc.pid is None:
                continue
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def time_requests(client: Any, make: Any, n: int) -> list[float]:
    from fleetsim.bus import Error

    out = []
    for _ in range(n):
        sent = time.perf_counter()
        reply = client.request(make(), timeout_s=10)
        out.append(time.perf_counter() - sent)
        if isinstance(reply, Error):
            raise BenchError(f"the coordinator answered an error: {reply.message}")
    return out


def percentiles(values: Sequence[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p99": q[98], "max": max(values),
            "n": len(values)}


def bench_latency(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    from fleetsim.bus import ControlClient, Ping, StatusRequest

    status_n = max(10, args.requests // 5)
    log(f"latency: real fleet of 5 pods + {FLOODERS} flooding processes; {args.repeat} trials"
        f" of {args.requests} Ping and {status_n} StatusRequest round trips")
    fleet = Fleet(bench, "latency", 5, restart=False, sample=False)
    flood: Flood | None = None
    out: dict[str, Any] = {"flooders": FLOODERS, "requests": args.requests,
                           "status_requests": status_n, "trials": []}
    try:
        fleet.up(steps=20_000)  # sleep:50 steps: a busy fleet for a few minutes
        # No psutil scans in this process while timing (bench_fleet's ProcWatch).
        bench.watch.remove_root(fleet.coordinator_pid)
        endpoints = json.loads((fleet.run_dir / "run.json").read_text())["bus"]
        from fleetsim.bus.security import BUS_SECRET_FILE, load_secret

        secret = load_secret(fleet.run_dir / BUS_SECRET_FILE)  # the bus refuses unsigned requests
        with ControlClient(endpoints["cli"], timeout_s=10, secret=secret) as client:
            client.request(Ping(), timeout_s=10)  # connect outside the timing
            fleet.wait_stable(pods=5)
            out["baseline_ping"] = percentiles(time_requests(client, Ping, args.requests))
            out["baseline_status"] = percentiles(time_requests(client, StatusRequest, status_n))
            log(f"  no flood: Ping p50 {out['baseline_ping']['p50'] * 1e3:.2f} ms,"
                f" p99 {out['baseline_ping']['p99'] * 1e3:.2f} ms; StatusRequest p50"
                f" {out['baseline_status']['p50'] * 1e3:.2f} ms,"
                f" p99 {out['baseline_status']['p99'] * 1e3:.2f} ms")
            flood = Flood(endpoints["metrics"], FLOODERS)
            bench.flood = flood
            flood.start()
            wait_for(lambda: flood.total() > 20_000, 60, "the metrics flood to start", 0.1)
            for index in range(args.repeat):
                sent0, t0 = flood.total(), time.monotonic()
                pings = time_requests(client, Ping, args.requests)
                status = time_requests(client, StatusRequest, status_n)
                rate = (flood.total() - sent0) / (time.monotonic() - t0)
                row = {"trial": index, "ping": percentiles(pings),
                       "status": percentiles(status), "metrics_per_s": rate,
                       "ping_s": pings, "status_s": status}
                out["trials"].append(row)
                log(f"  trial {index + 1}/{args.repeat}: Ping p50 {row['ping']['p50'] * 1e3:.2f}"
                    f" / p99 {row['ping']['p99'] * 1e3:.2f} ms, StatusRequest p50"
                    f" {row['status']['p50'] * 1e3:.2f} / p99 {row['status']['p99'] * 1e3:.2f}"
                    f" ms; {rate:,.0f} metrics/s pushed")
    finally:
        if flood is not None:
            flood.stop()
            bench.flood = None
        fleet.down()
    return out


# -- summary and report ----------------------------------------------------------------


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    fo = raw.get("failover")
    if fo:
        s["failover"] = {}
        for kind in ("kill-leader", "pause-leader", "partition-leader"):
            rows = [r for r in fo["trials"] if r["kind"] == kind]
            if rows:
                s["failover"][kind] = {
                    "failover_s": dist([r["failover_s"] for r in rows]),
                    "acquired_after_s": dist([r["acquired_after_s"] for r in rows]),
                    "back_alive_s": dist([r["back_alive_s"] for r in rows]),
                    "won_by_respawn": sum(r["same_pod_id"] for r in rows),
                }
        s["failover_history"] = fo["history"]
        s["failover_discarded"] = fo["discarded"]
    bo = raw.get("brownout")
    if bo:
        clean = [r for r in bo["trials"] if r["kind"] == "clean"]
        brown = [r for r in bo["trials"] if r["kind"] == "brownout"]
        paired = [b["steps_s"] / c["steps_s"] for c in clean for b in brown
                  if b["trial"] == c["trial"] and b["steps_s"] and c["steps_s"]]
        steady_clean = [r["steady_steps_s"] for r in clean if r["steady_steps_s"]]
        steady_brown = [r["steady_steps_s"] for r in brown if r["steady_steps_s"]]
        s["brownout"] = {
            "clean_steps_s": dist([r["steps_s"] for r in clean]),
            "brownout_steps_s": dist([r["steps_s"] for r in brown]),
            "ratio_of_medians": (statistics.median(r["steps_s"] for r in brown)
                                 / statistics.median(r["steps_s"] for r in clean))
            if clean and brown else None,
            "paired_ratio": dist(paired),
            "steady_clean_steps_s": dist(steady_clean),
            "steady_brownout_steps_s": dist(steady_brown),
            "steady_ratio_of_medians": (statistics.median(steady_brown)
                                        / statistics.median(steady_clean))
            if steady_clean and steady_brown else None,
            "brownout_dead": sum(r["dead"] for r in brown),
            "brownout_extra_attempts": sum(r["attempts"] - r["steps"] for r in brown),
            "history": bo["history"],
        }
    la = raw.get("latency")
    if la and la["trials"]:
        trials = la["trials"]
        pooled_ping = [v for t in trials for v in t["ping_s"]]
        pooled_status = [v for t in trials for v in t["status_s"]]
        s["latency"] = {
            "ping_p50_s": dist([t["ping"]["p50"] for t in trials]),
            "ping_p99_s": dist([t["ping"]["p99"] for t in trials]),
            "status_p50_s": dist([t["status"]["p50"] for t in trials]),
            "status_p99_s": dist([t["status"]["p99"] for t in trials]),
            "ping_pooled": percentiles(pooled_ping),
            "status_pooled": percentiles(pooled_status),
            "baseline_ping": la["baseline_ping"],
            "baseline_status": la["baseline_status"],
            "metrics_per_s": dist([t["metrics_per_s"] for t in trials]),
        }
    return s


def print_report(s: dict[str, Any], meta: dict[str, Any]) -> None:
    def line(name: str, d: dict[str, Any] | None, scale: float = 1.0, unit: str = " s",
             spec: str = "6.2f", extra: str = "") -> None:
        if d:
            print(f"   {name:<44} {d['median'] * scale:{spec}} / {d['max'] * scale:{spec}}{unit}"
                  f"  (n={d['n']}){extra}")

    print()
    print(f"fleetsim chaos benchmark - {meta['repeat']} trial(s) per figure; median / max")
    print(f"server {meta['server_version']}; {meta['cpus']} CPUs, shared; load avg "
          f"{meta['loadavg_start'][0]:.1f} -> {meta['loadavg_end'][0]:.1f}")
    fo = s.get("failover")
    if fo:
        print()
        print(f"1. failover: fault -> lease with a higher term seen (polled every "
              f"{POLL_S * 1e3:.0f} ms); {FAILOVER_PODS} pods, {FAILOVER_WORKLOAD}, lease "
              f"{meta['lease_s']:g} s")
        names = {"kill-leader": "kill-leader (SIGKILL)",
                 "pause-leader": f"pause leader (SIGSTOP {3 * meta['lease_s']:g} s)",
                 "partition-leader": f"partition leader from store ({3 * meta['lease_s']:g} s"
                                     " blackhole)"}
        for kind, d in fo.items():
            line(names[kind], d["failover_s"],
                 extra=f"  [acquired_at: {d['acquired_after_s']['median']:.2f} /"
                       f" {d['acquired_after_s']['max']:.2f}]")
        for kind, d in fo.items():
            line(f"{kind}: all pods back alive", d["back_alive_s"])
        h = s["failover_history"]
        print(f"   history: {sum(h['violations'].values())} violations ({h['steps']:,} steps,"
              f" {h['terms']} terms, {h['rejected_writes']} late writes refused)")
    bo = s.get("brownout")
    if bo:
        print()
        print(f"2. throughput, {BROWNOUT_PODS} pods, {BROWNOUT_WORKLOAD}, {meta['steps']:,} steps"
              f" per trial, clean/brownout alternating (steps/s)")
        line("clean", bo["clean_steps_s"], unit="", spec="8,.0f")
        line(f"brownout ({BROWNOUT['error_rate']:.0%} errors + "
             f"{BROWNOUT['latency_ms']:.0f} ms, all pods)", bo["brownout_steps_s"], unit="",
             spec="8,.0f")
        p = bo["paired_ratio"]
        print(f"   brownout / clean, ratio of medians: {bo['ratio_of_medians']:.0%}"
              f"   (paired: median {p['median']:.0%}, {p['min']:.0%}-{p['max']:.0%})")
        if bo["steady_ratio_of_medians"] is not None:
            print(f"   steady rate (10th-90th percentile of completions): clean "
                  f"{bo['steady_clean_steps_s']['median']:,.0f}, brownout "
                  f"{bo['steady_brownout_steps_s']['median']:,.0f} steps/s: "
                  f"{bo['steady_ratio_of_medians']:.0%}")
        h = bo["history"]
        print(f"   brownout: {bo['brownout_extra_attempts']} extra attempts, "
              f"{bo['brownout_dead']} dead-lettered; history {h['verdict']} "
              f"({sum(h['violations'].values())} violations)")
    la = s.get("latency")
    if la:
        print()
        print(f"3. control round trip, real coordinator of 5 pods, {FLOODERS} processes pushing"
              f" metrics ({la['metrics_per_s']['median']:,.0f}/s median) (ms)")
        line("Ping p50", la["ping_p50_s"], 1e3, " ms")
        line("Ping p99", la["ping_p99_s"], 1e3, " ms")
        line("StatusRequest p50", la["status_p50_s"], 1e3, " ms")
        line("StatusRequest p99", la["status_p99_s"], 1e3, " ms")
        pp, ps = la["ping_pooled"], la["status_pooled"]
        b, bs = la["baseline_ping"], la["baseline_status"]
        print(f"   pooled: Ping p50 {pp['p50'] * 1e3:.2f} p99 {pp['p99'] * 1e3:.2f} max"
              f" {pp['max'] * 1e3:.1f} ms (n={pp['n']}); StatusRequest p50 {ps['p50'] * 1e3:.2f}"
              f" p99 {ps['p99'] * 1e3:.2f} ms (n={ps['n']})")
        print(f"   without the flood: Ping p50 {b['p50'] * 1e3:.2f} p99 {b['p99'] * 1e3:.2f} ms"
              f" (n={b['n']}); StatusRequest p50 {bs['p50'] * 1e3:.2f} p99"
              f" {bs['p99'] * 1e3:.2f} ms (n={bs['n']})")


# -- main ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chaos figures for a fleetsim fleet.")
    parser.add_argument("--store", default=os.environ.get("FLEETSIM_STORE", DEFAULT_URL),
                        help="PostgreSQL URL (default: $FLEETSIM_STORE or %(default)s)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="trials per figure (default 10, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per brownout trial (default 10000, --quick 2000)")
    parser.add_argument("--requests", type=int, default=None,
                        help="Ping round trips per latency trial (default 500, --quick 100)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated subset of %(default)s")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (2 if args.quick else 10)
    args.steps = args.steps or (2_000 if args.quick else 10_000)
    args.requests = args.requests or (100 if args.quick else 500)
    if args.repeat < 1 or args.steps < 100 or args.requests < 10:
        parser.error("need --repeat >= 1, --steps >= 100 and --requests >= 10")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from fleetsim.config import FleetTimings

    meta = bench_fleet.start_meta(
        args.store, APP, "bench_chaos", repeat=args.repeat, steps=args.steps,
        requests=args.requests, parts=args.parts, lease_s=FleetTimings().lease_s,
    )
    if meta is None:
        return 2
    raw: dict[str, Any] = {}
    bench: Bench | None = None
    code = 0
    try:
        bench = Bench(args.store, Path(tempfile.mkdtemp(prefix="bench_chaos_")))
        bench.fleets = []  # in-process fleets, stopped on the way out
        bench.flood = None
        meta["db_clock_offset_s"] = bench.offset
        if "failover" in args.parts:
            raw["failover"] = bench_failover(bench, args)
        if "brownout" in args.parts:
            raw["brownout"] = bench_brownout(bench, args)
        if "latency" in args.parts:
            raw["latency"] = bench_latency(bench, args)
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        code = 130
    except (BenchError, subprocess.TimeoutExpired, psycopg2.Error) as exc:
        log(f"failed: {exc}")
        code = 1
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if bench is not None:
                if bench.flood is not None:
                    bench.flood.stop()
                for fleet in bench.fleets:
                    try:
                        fleet.stop()
                    except Exception as exc:
                        log(f"stopping fleet {fleet.schema} failed: {exc}")
                bench.cleanup()
                log("cleaned up: fleets stopped, schemas dropped")
        finally:
            signal.signal(signal.SIGINT, previous)
    if code == 130:
        return code
    bench_fleet.finish_report(meta, raw, args.json, summarise, print_report)
    return code


if __name__ == "__main__":
    sys.exit(main())
