"""Chaos figures for `fleetsim bench --chaos`: failover, orphan recovery, throughput, over trials.

Each fault runs in R fresh trials (``chaos.trial``: a real fleet of 4 pods
working through sleep:20 steps, the fault 2 s in, drained, then judged by
the checker). Figures, in database time:

- the checker's: failover (the old leader's last sign of life to the next
  term) and orphan recovery (a dead pod's claim to its step being claimed
  again);
- from the fault itself (:class:`FaultClock` reads the database clock just
  before the injector acts): the next term's start, and the next claim of
  each step the victim held, minus that moment;
- throughput during the fault (its ``for``, or the lease for a kill) as a
  fraction of the same trial's before it (first claim to the fault).
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from fleetsim.bench import server
from fleetsim.bench.measure import Spread
from fleetsim.coordinator import Coordinator, FleetSpec
from fleetsim.errors import ConfigError
from fleetsim.pod_spawner import SPAWN_MODES

FAULT_AT_S = 2.0
# name -> (action, target, parameters, needs the fault proxy)
FAULTS: dict[str, tuple[str, str | None, dict[str, Any], bool]] = {
    "kill-leader": ("kill-leader", None, {}, False),
    "kill": ("kill", "random", {}, False),
    # Longer than the lease (3 s): the frozen leader loses its term.
    "pause-leader": ("pause", "leader", {"for": 4.0}, False),
    "partition-leader": ("partition", "leader",
                         {"from": "store", "mode": "blackhole", "for": 4.0}, True),
    "storage-brownout": ("storage-fault", "all",
                         {"latency_ms": 50.0, "error_rate": 0.05, "for": 3.0}, False),
}

NEW_TERM = """
SELECT extract(epoch FROM min(started_at) - %(at)s) FROM leader_terms WHERE term > %(term)s
"""
# The victim's claims open at the fault, each to its step's next claim.
RECLAIMS = """
SELECT extract(epoch FROM (SELECT min(b.claimed_at) FROM step_attempts b
                            WHERE b.step_id = a.step_id AND b.claim_token > a.claim_token)
                          - %(at)s)
  FROM step_attempts a
 WHERE a.pod_id = %(pod)s AND a.incarnation = %(incarnation)s
   AND a.claimed_at <= %(at)s AND (a.finished_at IS NULL OR a.finished_at > %(at)s)
"""
# Completions before the fault (from the first claim) and during it.
THROUGHPUT = """
SELECT count(*) FILTER (WHERE finished_at <= %(at)s AND outcome = 'completed'),
       count(*) FILTER (WHERE finished_at > %(at)s AND finished_at <= %(end)s
                          AND outcome = 'completed'),
       extract(epoch FROM %(at)s - min(claimed_at)),
       extract(epoch FROM LEAST(%(end)s, max(finished_at)) - %(at)s)
  FROM finished_attempts
"""


def parse_faults(text: str) -> tuple[str, ...]:
    """``kill-leader,pause-leader`` -> the names, each checked."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in FAULTS]
    if not names or unknown:
        raise ConfigError(f"--chaos takes {', '.join(FAULTS)}; got {text!r}")
    return names


def chaos_trial(name: str) -> Any:
    """The trial of one fault: 4 pods, batch 5, 1,500 sleep:20 steps, the fault 2 s in."""
    from chaos.trial import Trial

    action, target, params, proxy = FAULTS[name]
    return Trial(description=f"bench {name}", pods=4, batch=5, workload="sleep:20",
                 steps=1500, faults=((FAULT_AT_S, action, target, params),),
                 fault_proxy=proxy)


class FaultClock(Coordinator):
    """A trial's coordinator that notes each fault in database time and measures from it.

    The figures are read when the trial stops the fleet (drained, before the
    schema is dropped) into :attr:`measured`, one dict per fault.
    """

    def __init__(self, spec: FleetSpec) -> None:
        super().__init__(spec)
        self.faults: list[dict[str, Any]] = []
        self.measured: list[dict[str, Any]] = []

    def start(self) -> None:
        """Start the fleet, then time every fault the injector applies."""
        super().start()
        apply = self.injector.apply

        def timed(action: str, target: str | None, params: dict[str, Any]) -> dict[str, Any]:
            assert self.store is not None
            lease = self.store.current_leader()
            pods = {p["id"]: p["incarnation"] for p in self.store.pods()}
            at = self.store.db_now()
            result: dict[str, Any] = apply(action, target, params)
            pod = result.get("pod")
            self.faults.append({
                "at": at, "term": lease.term if lease else 0, "pod": pod,
                "incarnation": pods.get(pod, 0) if pod else None,
                "window_s": float(params.get("for") or self.spec.timings.lease_s)})
            return result

        self.injector.apply = timed

    def stop(self, grace_s: float | None = None) -> None:
        """Measure from each fault (never failing the trial for it), then stop."""
        with contextlib.suppress(Exception):
            self._measure()
        super().stop(grace_s)

    def _measure(self) -> None:
        if not self.faults or self.measured:
            return
        assert self.spec.store_url is not None
        conn = server.connect(self.spec.store_url, "fleetsim-bench-chaos", self.spec.schema)
        try:
            for fault in self.faults:
                params = {**fault, "end": fault["at"] + timedelta(seconds=fault["window_s"])}
                (new_term,), = server.query(conn, NEW_TERM, params)
                reclaims = ([float(r[0]) for r in server.query(conn, RECLAIMS, params)
                             if r[0] is not None] if fault["pod"] else [])
                before, during, before_s, during_s = server.query(conn, THROUGHPUT, params)[0]
                fraction = None
                if before and before_s and during_s and float(during_s) > 0:
                    fraction = (during / float(during_s)) / (before / float(before_s))
                self.measured.append({
                    "pod": fault["pod"],
                    "new_term_s": None if new_term is None else float(new_term),
                    "reclaim_median_s": statistics.median(reclaims) if reclaims else None,
                    "reclaim_max_s": max(reclaims) if reclaims else None,
                    "steps_held": len(reclaims), "throughput_fraction": fraction,
                })
        finally:
            conn.close()


def parse_spawns(text: str) -> tuple[str, ...]:
    """``fork,exec`` -> the ways of starting pods to compare, each checked."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names or any(n not in SPAWN_MODES for n in names):
        raise ConfigError(f"--spawn takes fork, exec or fork,exec; got {text!r}")
    return names


def run_chaos(url: str, faults: tuple[str, ...], repeat: int, say: Callable[[str], None],
              factory: Callable[[FleetSpec], FaultClock] = FaultClock,
              spawns: tuple[str, ...] = ("fork",)) -> list[dict[str, Any]]:
    """Every fault ``repeat`` times, interleaved; one row per fault (and way of spawning).

    With several ``spawns`` each fault runs with pods forked and exec'd
    side by side (the order reversed every other repeat); the rows are
    named ``kill-leader (fork)``, ``kill-leader (exec)``.
    """
    from chaos.trial import run_trial

    def key(name: str, spawn: str) -> str:
        return name if len(spawns) == 1 else f"{name} ({spawn})"

    results: dict[str, list[tuple[Any, dict[str, Any]]]] = {
        key(name, spawn): [] for name in faults for spawn in spawns}
    try:
        for index in range(repeat):
            order = spawns if index % 2 == 0 else spawns[::-1]
            for name, spawn in itertools.product(faults, order):
                made: list[FaultClock] = []

                def keep(spec: FleetSpec, made: list[FaultClock] = made,
                         spawn: str = spawn) -> FaultClock:
                    made.append(factory(replace(spec, spawn=spawn)))
                    return made[-1]

                say(f"[{index + 1}/{repeat}] chaos {key(name, spawn)}")
                result = run_trial(url, chaos_trial(name), name=name, seed=index, say=say,
                                   factory=keep)
                measured = made[0].measured[0] if made and made[0].measured else {}
                say(f"  {result.verdict} in {result.seconds:.1f}s")
                results[key(name, spawn)].append((result, measured))
    except KeyboardInterrupt:
        say("interrupted: reporting what was measured")
    return [_row(name, runs) for name, runs in results.items() if runs]


def _row(name: str, runs: list[tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    def summary(values: list[Any], of_max: list[Any] | None = None) -> dict[str, Any]:
        got = Spread.of(float(v) for v in values if v is not None)
        top = Spread.of(float(v) for v in (of_max if of_max is not None else values)
                        if v is not None)
        return {"median_s": got.median if got else None, "max_s": top.high if top else None,
                "trials_with_it": got.n if got else 0}

    def checker(figure: str, key: str) -> list[Any]:
        return [(run.figures.get(figure) or {}).get(key) for run, _ in runs]

    def mine(key: str) -> list[Any]:
        return [measured.get(key) for _, measured in runs]

    fractions = Spread.of(v for v in mine("throughput_fraction") if v is not None)
    return {
        "fault": name, "trials": len(runs),
        "valid": sum(1 for run, _ in runs if run.verdict == "valid"),
        "verdicts": [run.verdict for run, _ in runs],
        "failover": summary(checker("failover", "median_s"), checker("failover", "max_s")),
        "orphan_recovery": summary(checker("orphan_recovery", "median_s"),
                                   checker("orphan_recovery", "max_s")),
        "new_term_from_fault": summary(mine("new_term_s")),
        "reclaim_from_fault": summary(mine("reclaim_median_s"), mine("reclaim_max_s")),
        "throughput_fraction": fractions.as_dict() if fractions else None,
        "trials_measured": [measured for _, measured in runs],
        "notes": [run.note for run, _ in runs if run.note],
    }


def chaos_table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The chaos table: one line per fault."""
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    def pair(figure: dict[str, Any] | None) -> tuple[str, str]:
        figure = figure or {}
        return s(figure.get("median_s")), s(figure.get("max_s"))

    def fraction(value: dict[str, float] | None) -> str:
        if not value:
            return "-"
        return f"{value['median']:.2f} [{value['min']:.2f}-{value['max']:.2f}]"

    head = ("fault", "trials", "valid", "failover median", "max", "orphan re-claim median",
            "max", "new term from fault median", "max", "re-claim from fault median", "max",
            "throughput during/before")
    body = [(r["fault"], str(r["trials"]), f"{r['valid']}/{r['trials']}",
             *pair(r["failover"]), *pair(r["orphan_recovery"]),
             *pair(r.get("new_term_from_fault")), *pair(r.get("reclaim_from_fault")),
             fraction(r.get("throughput_fraction")))
            for r in rows]
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(len(head))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return lines
