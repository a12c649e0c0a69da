"""Chaos figures for `fleetsim bench --chaos`: failover and orphan recovery, over trials.

Each fault runs in R fresh trials (``chaos.trial``: a real fleet of 4 pods
working through sleep:20 steps, the fault 2 s in, drained, then judged by
the checker). The figures are the checker's, in database time: failover
(the old leader's last sign of life to the next term) and orphan recovery
(a dead pod's claim to its step being claimed again).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from fleetsim.errors import ConfigError

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


def run_chaos(url: str, faults: tuple[str, ...], repeat: int,
              say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every fault ``repeat`` times, interleaved; one row per fault."""
    from chaos.trial import run_trial

    results: dict[str, list[Any]] = {name: [] for name in faults}
    try:
        for index in range(repeat):
            for name in faults:
                say(f"[{index + 1}/{repeat}] chaos {name}")
                result = run_trial(url, chaos_trial(name), name=name, seed=index, say=say)
                say(f"  {result.verdict} in {result.seconds:.1f}s")
                results[name].append(result)
    except KeyboardInterrupt:
        say("interrupted: reporting what was measured")
    return [_row(name, runs) for name, runs in results.items() if runs]


def _row(name: str, runs: list[Any]) -> dict[str, Any]:
    def values(figure: str, key: str) -> list[float]:
        out = []
        for run in runs:
            value = (run.figures.get(figure) or {}).get(key)
            if value is not None:
                out.append(float(value))
        return out

    def summary(figure: str) -> dict[str, float | None]:
        medians = values(figure, "median_s")
        maxima = values(figure, "max_s")
        return {"median_s": statistics.median(medians) if medians else None,
                "max_s": max(maxima) if maxima else None, "trials_with_it": len(medians)}

    return {
        "fault": name, "trials": len(runs),
        "valid": sum(1 for r in runs if r.verdict == "valid"),
        "verdicts": [r.verdict for r in runs],
        "failover": summary("failover"),
        "orphan_recovery": summary("orphan_recovery"),
        "notes": [r.note for r in runs if r.note],
    }


def chaos_table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The chaos table: one line per fault."""
    def s(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    head = ("fault", "trials", "valid", "failover median", "max", "orphan re-claim median",
            "max")
    body = [(r["fault"], str(r["trials"]), f"{r['valid']}/{r['trials']}",
             s(r["failover"]["median_s"]), s(r["failover"]["max_s"]),
             s(r["orphan_recovery"]["median_s"]), s(r["orphan_recovery"]["max_s"]))
            for r in rows]
    widths = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(len(head))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return lines
