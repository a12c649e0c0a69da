"""Fixed-bucket histograms: percentiles, merge, windows, the wire form, broken input."""

from __future__ import annotations

import random
from typing import Any

import pytest

from fleetsim.errors import ConfigError
from fleetsim.metrics import BUCKETS_S, Histogram, merge_all


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(q * len(ordered)) - 1)]


def test_percentiles_within_a_bucket_of_the_exact_ones(seed: int) -> None:
    rng = random.Random(seed)
    values = [rng.lognormvariate(-4, 1.2) for _ in range(20_000)]  # ~18 ms median
    h = Histogram()
    h.observe_many(values)
    assert h.count == len(values)
    assert h.total == pytest.approx(sum(values))
    for q in (0.5, 0.95, 0.99):
        estimate = h.quantile(q)
        assert estimate is not None
        # One bucket spans a factor 10^(1/8) = 1.33: the estimate is in it.
        assert exact_quantile(values, q) / 1.34 <= estimate <= exact_quantile(values, q) * 1.34


def test_merge_is_the_histogram_of_the_union(seed: int) -> None:
    rng = random.Random(seed)
    parts = [[rng.expovariate(50) for _ in range(500)] for _ in range(4)]
    histograms = []
    for part in parts:
        h = Histogram()
        h.observe_many(part)
        histograms.append(h)
    union = Histogram()
    union.observe_many(v for part in parts for v in part)
    assert merge_all(histograms) == union
    assert merge_all([]) == Histogram() and Histogram().quantile(0.5) is None


def test_window_is_the_difference_of_two_snapshots() -> None:
    h = Histogram()
    h.observe_many([0.001] * 10)
    earlier = Histogram(h.counts, h.total)
    h.observe_many([1.0] * 10)
    window = h.minus(earlier)
    assert window.count == 10
    q = window.quantile(0.5)
    assert q is not None and 0.75 <= q <= 1.0


def test_a_restarted_series_is_not_an_earlier_snapshot() -> None:
    before = Histogram()
    before.observe_many([0.01] * 5)
    restarted = Histogram()
    restarted.observe(0.01)
    with pytest.raises(ConfigError, match="shrank"):
        restarted.minus(before)


def test_overflow_and_bounds() -> None:
    h = Histogram()
    h.observe(10_000.0)  # beyond the last bucket
    assert h.quantile(0.99) == BUCKETS_S[-1]
    h = Histogram()
    h.observe(BUCKETS_S[5])  # a bound belongs to its own bucket
    assert h.counts[5] == 1
    with pytest.raises(ConfigError):
        h.quantile(0.0)
    with pytest.raises(ConfigError):
        h.quantile(1.5)


def test_wire_round_trip_and_broken_wire_forms() -> None:
    h = Histogram()
    h.observe_many([0.002, 0.002, 0.5, 3.0])
    wire = h.to_counters("e2e_s")
    assert all(k.startswith("h.e2e_s.") for k in wire) and len(wire) == 4  # 3 buckets + sum
    assert Histogram.from_counters({**wire, "completed": 4.0}, "e2e_s") == h
    assert Histogram.from_counters({}, "e2e_s") == Histogram()
    with pytest.raises(ConfigError, match="no bucket"):
        Histogram.from_counters({"h.e2e_s.999": 1.0}, "e2e_s")
    with pytest.raises(ConfigError, match="holds"):
        Histogram.from_counters({"h.e2e_s.3": -1.0}, "e2e_s")
    with pytest.raises(ConfigError, match="holds"):
        Histogram.from_counters({"h.e2e_s.3": 1.5}, "e2e_s")
    with pytest.raises(ConfigError, match="buckets"):
        Histogram([1, 2, 3])
    with pytest.raises(ConfigError, match="negative"):
        Histogram([-1] + [0] * len(BUCKETS_S))


@pytest.mark.parametrize("counters", [
    {"h.e2e_s.²": 1.0},  # a digit to str.isdigit(), not to int()
    {"h.e2e_s.1": "1"},
    {"h.e2e_s.sum": None},
    {"h.e2e_s.-1": 1.0},
])
def test_a_malformed_snapshot_is_refused_with_a_config_error(counters: dict[str, Any]) -> None:
    """Refused the one way the recorder and the Prometheus collector catch, so
    one pod's bad snapshot never stops the fleet's series."""
    with pytest.raises(ConfigError):
        Histogram.from_counters(counters, "e2e_s")
