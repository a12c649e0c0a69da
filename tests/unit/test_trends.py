"""Resource trends from synthetic metrics series: a leak is flagged, noise and restarts are not."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fleetsim.cli import cli
from fleetsim.thresholds import parse_thresholds
from fleetsim.trends import (
    THRESHOLD_NAMES,
    TooShort,
    resource_trends,
    threshold_figures,
    trend,
    trend_rows,
    warmup_s,
)

MIB = 2**20
T0 = 1_800_000_000.0


def pod_lines(pod: str, incarnation: int, start: float, end: float,
              rss: Callable[[float], float], fds: Callable[[float], float] = lambda t: 20.0,
              ) -> list[dict[str, Any]]:
    """One pod line a second from ``start`` to ``end`` (seconds into the run)."""
    return [{"t": T0 + t, "kind": "pod", "pod": pod, "incarnation": incarnation,
             "rss_bytes": rss(t), "open_fds": fds(t), "completed": 0}
            for t in range(int(start), int(end) + 1)]


def coordinator_lines(end: float, rss: Callable[[float], float] = lambda t: 60.0 * MIB,
                      ) -> list[dict[str, Any]]:
    return [{"t": T0 + t, "kind": "coordinator", "pid": 4242, "rss_bytes": rss(t),
             "open_fds": 30.0, "cpu_percent": 3.0} for t in range(int(end) + 1)]


def store_lines(end: float) -> list[dict[str, Any]]:
    return [{"t": T0 + t + 0.05, "kind": "store", "depth": {"default": 0},
             "steps_bytes": 1_000_000 + 1000 * t, "steps_dead_tuples": 50 * t}
            for t in range(int(end) + 1)]


def noisy(base: float, spread: float, seed: int) -> Callable[[float], float]:
    """A flat series with +-spread relative noise and a rare spike (a burst of work)."""
    rng = random.Random(seed)

    def value(t: float) -> float:
        spike = 1.3 if rng.random() < 0.03 else 1.0
        return base * (1 + rng.uniform(-spread, spread)) * spike
    return value


def test_the_warm_up_is_a_fifth_of_the_run_at_most_a_minute() -> None:
    assert warmup_s(100) == pytest.approx(20.0)
    assert warmup_s(1800) == 60.0
    assert warmup_s(-5) == 0.0


def test_a_leaking_pod_is_flagged_and_a_flat_noisy_one_is_not() -> None:
    run = 600
    samples = (coordinator_lines(run) + store_lines(run)
               # 50 MiB growing 2 MiB a minute: +19% over the 8 minutes after warm-up.
               + pod_lines("pod-1", 0, 0, run, lambda t: 50 * MIB + 2 * MIB * t / 60)
               + pod_lines("pod-2", 0, 0, run, noisy(50 * MIB, 0.08, seed=1)))
    trends = resource_trends(samples)
    assert trends["warmup_s"] == 60.0 and trends["run_s"] == pytest.approx(run, abs=0.1)
    assert list(trends["processes"]) == ["coordinator", "pod-1#0", "pod-2#0"]
    leak = trends["processes"]["pod-1#0"]["rss_bytes"]
    assert leak["growth_pct"] > 10 and trends["processes"]["pod-1#0"]["leaking"] is True
    assert leak["slope_per_min"] == pytest.approx(2 * MIB, rel=1e-6)
    assert leak["first"] == 50 * MIB + 2 * MIB and leak["last"] == leak["peak"] == 70 * MIB
    flat = trends["processes"]["pod-2#0"]
    assert abs(flat["rss_bytes"]["growth_pct"]) < 3 and flat["leaking"] is False
    # Spikes raise the peak, not the growth.
    assert flat["rss_bytes"]["peak"] > 55 * MIB
    assert trends["leaking"] == ["pod-1#0"]
    assert trends["rss_growth_pct_max"] == leak["growth_pct"]
    assert trends["processes"]["coordinator"]["rss_bytes"]["growth_pct"] == 0.0
    assert trends["processes"]["pod-2#0"]["open_fds"]["slope_per_min"] == 0.0


def test_a_leak_hidden_in_noise_is_still_flagged() -> None:
    run = 300
    base = noisy(40 * MIB, 0.1, seed=7)
    samples = coordinator_lines(run) + pod_lines(
        "pod-1", 0, 0, run, lambda t: base(t) + 12 * MIB * t / run)
    trends = resource_trends(samples)
    assert trends["leaking"] == ["pod-1#0"], trends["processes"]["pod-1#0"]


def test_growth_during_warm_up_alone_is_not_a_leak() -> None:
    run = 300  # warm-up 60 s: RSS climbs 30 -> 60 MiB in it, then holds
    samples = coordinator_lines(run) + pod_lines(
        "pod-1", 0, 0, run, lambda t: (30 + 30 * min(t, 40) / 40) * MIB)
    trends = resource_trends(samples)
    assert trends["leaking"] == []
    assert trends["processes"]["pod-1#0"]["rss_bytes"]["first"] == 60 * MIB
    # Without the warm-up the same series doubles.
    assert resource_trends(samples, warmup=0.0)["leaking"] == ["pod-1#0"]


def test_a_restarted_incarnation_is_a_series_of_its_own_not_a_jump() -> None:
    run = 400
    samples = (coordinator_lines(run)
               + pod_lines("pod-1", 0, 0, 200, lambda t: 40 * MIB)
               # The new process starts larger (say a bigger cache): not growth of #0.
               + pod_lines("pod-1", 1, 201, run, lambda t: 80 * MIB))
    trends = resource_trends(samples)
    assert set(trends["processes"]) == {"coordinator", "pod-1#0", "pod-1#1"}
    assert trends["leaking"] == []
    assert trends["processes"]["pod-1#0"]["rss_bytes"]["last"] == 40 * MIB
    assert trends["processes"]["pod-1#1"]["rss_bytes"]["first"] == 80 * MIB
    # Broken case: the same lines under one incarnation are a 100% jump.
    merged = [dict(s, incarnation=0) for s in samples]
    assert resource_trends(merged)["leaking"] == ["pod-1#0"]


def test_a_series_too_short_after_warm_up_has_no_growth_and_says_why() -> None:
    run = 300
    samples = coordinator_lines(run) + pod_lines("pod-3", 2, 280, run, lambda t: 9e9 * t)
    entry = resource_trends(samples)["processes"]["pod-3#2"]
    assert entry["rss_bytes"]["growth_pct"] is None and entry["leaking"] is False
    assert "too short" in entry["rss_bytes"]["note"]


def test_the_store_figures_start_end_and_slope() -> None:
    run = 120
    trends = resource_trends(coordinator_lines(run) + store_lines(run))
    size = trends["store"]["steps_bytes"]
    assert size["slope_per_min"] == pytest.approx(60_000)
    # Warm-up 24 s from the store's first sample (t 0.05): the first one after is t 25.05.
    assert size["first"] == 1_000_000 + 1000 * 25 and size["last"] == 1_000_000 + 1000 * run
    dead = trends["store"]["steps_dead_tuples"]
    assert dead["slope_per_min"] == pytest.approx(3000) and dead["last"] == 50 * run
    assert threshold_figures(trends)["steps_dead_tuples_end"] == 50 * run


def test_a_short_or_empty_series_has_no_trends() -> None:
    with pytest.raises(TooShort, match="spans 20 s"):
        resource_trends(coordinator_lines(20))
    with pytest.raises(TooShort, match="spans 0 s"):
        resource_trends([])
    with pytest.raises(TooShort, match="no process sample"):
        resource_trends(store_lines(100))


def test_malformed_and_failed_lines_are_skipped() -> None:
    run = 120
    samples: list[dict[str, Any]] = [
        *coordinator_lines(run),
        {"t": T0 + 5, "kind": "store", "error": "store unavailable"},
        {"t": T0 + 6, "kind": "pod", "pod": "pod-1", "incarnation": 0, "rss_bytes": "lots"},
        {"t": "soon", "kind": "coordinator", "rss_bytes": 1e12},
        {"t": T0 + 7, "kind": "coordinator", "pid": 4242, "rss_bytes": True},
    ]
    trends = resource_trends(samples)
    assert trends["leaking"] == [] and trends["store"] == {"steps_bytes": None,
                                                           "steps_dead_tuples": None}
    assert trends["processes"]["pod-1#0"] == {"rss_bytes": None, "open_fds": None,
                                              "leaking": False}


def test_trend_of_points_in_any_order() -> None:
    points = [(float(t), 100.0 + t) for t in range(100)]
    shuffled = points[::-1]
    assert trend(points, 20.0) == trend(shuffled, 20.0)
    with pytest.raises(ValueError):
        trend([], 0.0)


def test_the_trend_figures_are_threshold_names() -> None:
    parsed = parse_thresholds({"rss_growth_pct_max": "< 10", "fds_growth_pct_max": "< 50",
                               "rss_slope_bytes_per_min_max": "< 1e6",
                               "steps_dead_tuples_end": "< 100000"})
    assert sorted(t.name for t in parsed) == sorted(THRESHOLD_NAMES)
    assert threshold_figures(None) == dict.fromkeys(THRESHOLD_NAMES)


def test_the_human_rows_name_the_largest_growth_and_the_leak() -> None:
    run = 300
    samples = (coordinator_lines(run) + store_lines(run)
               + pod_lines("pod-1", 0, 0, run, lambda t: 50 * MIB + 2 * MIB * t / 60))
    rows = dict(trend_rows(resource_trends(samples)))
    assert "(pod-1#0)" in rows["RSS growth / slope (largest)"]
    assert rows["LEAKING (RSS growth ≥ 10 %)"] == "pod-1#0"
    assert trend_rows(None, "the metrics series spans 12 s") == [
        ("resource trends", "none: the metrics series spans 12 s")]


@pytest.mark.parametrize(("args", "message"), [
    (["--duration", "90s", "--steps", "10"], "--steps and --duration exclude each other"),
    (["--duration", "90s"], "--duration needs a rate"),
])
def test_run_refuses_a_duration_it_cannot_honour(tmp_path: Path, args: list[str],
                                                 message: str) -> None:
    result = CliRunner().invoke(cli, ["--run-dir", str(tmp_path), "run", *args],
                                env={"FLEETSIM_STORE": ""})
    assert result.exit_code == 2, (result.output, result.exception)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
        result.stderr


def test_helper_processes_are_series_of_their_own() -> None:
    run = 200
    proxy = [{"t": T0 + t, "kind": "process", "name": "fault-proxy", "pid": 77,
              "rss_bytes": 30 * MIB + MIB * t / 10, "open_fds": 12.0} for t in range(run + 1)]
    nameless = [{"t": T0 + 3, "kind": "process", "pid": 78, "rss_bytes": 1e9}]
    trends = resource_trends(coordinator_lines(run) + proxy + nameless
                             + pod_lines("pod-10", 0, 0, run, lambda t: 40 * MIB)
                             + pod_lines("pod-9", 0, 0, run, lambda t: 40 * MIB))
    assert list(trends["processes"]) == ["coordinator", "fault-proxy", "pod-9#0", "pod-10#0"]
    assert trends["leaking"] == ["fault-proxy"]
    # Two coordinators in one file (an `up` run twice into it): one series per pid.
    twice = coordinator_lines(run) + [dict(s, pid=99) for s in coordinator_lines(run)]
    assert set(resource_trends(twice)["processes"]) == {"coordinator#99", "coordinator#4242"}
