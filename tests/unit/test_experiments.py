"""Experiment files (issue 14): parsing, thresholds, the load's seeded mix, replay schedules."""

from __future__ import annotations

from typing import Any

import pytest

from chaos.experiment import find_experiment, parse_experiment
from chaos.scenario import list_scenarios
from fleetsim.errors import ConfigError
from fleetsim.experiments import flat_figures, replayed_schedule
from fleetsim.load import LoadGenerator, StepKind
from fleetsim.thresholds import FIGURE_NAMES, evaluate, parse_thresholds

pytestmark = pytest.mark.timeout(20)

EXPERIMENT = """
name = "two-speeds"
duration = "30s"
seed = 11

[fleet]
lease = "2s"

[[fleet.group]]
name = "slow"
pods = 2
workload = "sleep:50"
queues = ["orders", "bulk"]

[[fleet.group]]
name = "fast"
pods = 3
workload = "sleep:5"
concurrency = 2
queues = ["orders", "bulk"]

[[queue]]
name = "orders"
concurrency_limit = 5
strict_fifo = true
max_attempts = 4

[load]
duration = "30s"
rate = 40

[[load.mix]]
weight = 1
queue = "orders"
workload = "sleep:20"
priority = -1

[[load.mix]]
weight = 3
queue = "bulk"

[[fault]]
action = "kill-leader"
every = "5s"

[thresholds]
valid = true
e2e_p99_s = "< 2.0"
failover_max_s = "< 4.0"
success_pct = ">= 99"
lost = "== 0"
"""


def test_a_full_experiment_parses_into_groups_queues_load_and_thresholds() -> None:
    e = parse_experiment(EXPERIMENT, "x.toml")
    assert [(g.name, g.pods, g.workload, g.concurrency, g.queues) for g in e.groups] == [
        ("slow", 2, "sleep:50", 1, ("orders", "bulk")),
        ("fast", 3, "sleep:5", 2, ("orders", "bulk"))]
    assert [(q.name, q.concurrency_limit, q.strict_fifo, q.max_attempts) for q in e.queues] \
        == [("orders", 5, True, 4)]
    assert e.load.duration_s == 30.0 and e.load.rate == 40.0
    assert [(m.weight, m.queue, m.workload, m.priority) for m in e.load.mix] == [
        (1.0, "orders", "sleep:20", -1), (3.0, "bulk", None, 0)]
    assert e.settings == {"lease": 2.0, "duration": 30.0, "rate": 40.0, "seed": 11}
    assert [(t.name, t.condition) for t in e.thresholds] == [
        ("valid", "== true"), ("e2e_p99_s", "< 2.0"), ("failover_max_s", "< 4.0"),
        ("success_pct", ">= 99"), ("lost", "== 0")]
    assert e.has_faults


@pytest.mark.parametrize(("text", "message"), [
    ('[thresholds]\ne2e_p99 = "< 2"\n', "thresholds.e2e_p99: unknown figure (did you mean "
                                        "'e2e_p99_s'?)"),
    ('[thresholds]\nlost = "about 0"\n', "thresholds.lost: invalid condition 'about 0'"),
    ('[thresholds]\nlost = [1]\n', "thresholds.lost: expected a condition"),
    ('[load]\nsteps = 5\nduration = "5s"\nrate = 1\n', "load.steps: give steps"),
    ('[load]\nduration = "5s"\n', "load.rate: missing"),
    ('[load]\nsteps = 5\n[[load.mix]]\nweigth = 2\n', "load.mix[0].weigth: unknown key "
                                                      "(did you mean 'weight'?)"),
    ('[fleet]\npods = 2\n[[fleet.group]]\nname = "a"\n', "fleet.pods: give pods or"),
    ('[[fleet.group]]\npods = 2\n', "fleet.group[0].name: missing"),
    ('[[queue]]\nname = "q"\nconcurrency_limit = 0\n', "queue[0].concurrency_limit: must be"),
    ('[fleet]\nlease = "soon"\n', "fleet.lease: invalid duration"),
])
def test_a_bad_experiment_is_one_line_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_experiment('name = "bad"\n' + text, "bad.toml")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("bad.toml: ")


def test_a_plain_scenario_still_needs_a_duration_and_an_experiment_without_faults_not() -> None:
    with pytest.raises(ConfigError, match="duration: missing"):
        parse_experiment('name = "s"\n')
    assert parse_experiment('name = "e"\n[load]\nsteps = 10\n').settings == {"steps": 10}


def test_every_shipped_scenario_is_an_experiment_with_its_own_workload() -> None:
    for scenario in list_scenarios():
        e = find_experiment(scenario.name)
        hints = scenario.workload.as_dict()
        assert hints, scenario.name
        for key in ("pods", "steps", "workload"):
            assert e.settings.get(key) == hints.get(key), (scenario.name, key)
        assert e.has_faults


def test_thresholds_judge_top_level_keys_and_figures_and_fail_what_is_not_measured() -> None:
    thresholds = parse_thresholds({"valid": True, "lost": "== 0", "e2e_p99_s": "< 2.0",
                                   "failover_max_s": "< 4", "completed": ">= 1_000"})
    result: dict[str, Any] = {"valid": True, "lost": 0, "completed": 999,
                              "figures": {"failover_max_s": 4.5, "e2e_p99_s": None}}
    rows = {r.threshold.name: r for r in evaluate(thresholds, result)}
    assert rows["valid"].passed and rows["lost"].passed
    assert not rows["failover_max_s"].passed and rows["failover_max_s"].value == 4.5
    assert not rows["completed"].passed  # the broken case: 999 < 1000 must fail
    assert not rows["e2e_p99_s"].passed and "not measured" in rows["e2e_p99_s"].describe()
    # A boolean threshold is not met by a number, nor a number one by a boolean.
    assert not evaluate(parse_thresholds({"valid": True}), {"valid": 1})[0].passed
    assert not evaluate(parse_thresholds({"lost": "== 0"}), {"lost": False})[0].passed
    assert rows["valid"].as_dict() == {"name": "valid", "condition": "== true",
                                       "value": True, "passed": True}


def test_the_figures_the_metrics_pipeline_adds_are_known_names() -> None:
    for name in ("e2e_p50_s", "e2e_p95_s", "e2e_p99_s", "queue_wait_p99_s", "success_pct",
                 "throughput_in_faults_ratio", "throughput_steps_per_s",
                 "peak_rss_pod_bytes", "peak_rss_coordinator_bytes"):
        assert name in FIGURE_NAMES
    flat = flat_figures({"failover": {"max_s": 1.5, "median_s": 1.0},
                         "claim_to_completion": {"p99_s": 0.2}})
    assert flat["failover_max_s"] == 1.5 and flat["claim_to_completion_p99_s"] == 0.2
    assert flat["orphan_recovery_max_s"] is None


def test_the_load_mix_is_drawn_by_weight_and_the_same_for_the_same_seed() -> None:
    kinds = [StepKind(1.0, "orders", "sleep:20"), StepKind(3.0, "bulk", None)]

    def draws(seed: int) -> list[str]:
        load = LoadGenerator(None, kinds, 0, 0.0, seed)  # type: ignore[arg-type]
        return [load.draw().queue for _ in range(4000)]

    first = draws(5)
    assert first == draws(5) and first != draws(6)
    assert 0.7 < first.count("bulk") / len(first) < 0.8


def test_a_replay_schedule_pins_random_picks_to_the_pods_they_hit() -> None:
    base = {"params": {}, "duration_s": None, "fault": 0, "occurrence": 0}
    record = {"faults": [
        {**base, "offset_s": 1.0, "action": "kill", "target": "random",
         "targets": ["pod-3"], "outcome": "applied"},
        {**base, "offset_s": 2.0, "action": "kill-leader", "target": "leader",
         "targets": ["pod-1"], "outcome": "applied", "occurrence": 1},
        {**base, "offset_s": 3.0, "action": "pause", "target": "fraction:0.4",
         "targets": ["pod-2", "pod-5"], "outcome": "applied", "duration_s": 2.0,
         "fault": 1},
        {**base, "offset_s": 4.0, "action": "kill", "target": "random", "targets": [],
         "outcome": "skipped", "occurrence": 2},
    ]}
    planned = replayed_schedule(record)
    assert [(f.offset_s, f.action, f.target) for f in planned] == [
        (1.0, "kill", "pod-3"), (2.0, "kill-leader", "leader"), (3.0, "pause", "pod-2"),
        (3.0, "pause", "pod-5"), (4.0, "kill", "random")]


def test_the_documented_example_is_a_valid_experiment() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "two-speed-fleet.toml"
    e = find_experiment(str(path))
    assert [g.name for g in e.groups] == ["slow", "fast"] and e.has_faults
    assert {q.name: q.strict_fifo for q in e.queues} == {"orders": True, "bulk": False}
    assert len(e.load.mix) == 2 and len(e.thresholds) == 4


def test_a_recorded_command_line_never_keeps_a_password() -> None:
    """Replay records, bundles and bench baselines keep the command line."""
    from fleetsim.store import redact_argv

    args = ["run", "x.toml", "--store=postgresql://u:secret@h/db", "--store",
            "postgresql://v:hidden@h/db?password=also", "--seed", "3"]
    shown = " ".join(redact_argv(args))
    assert "secret" not in shown and "hidden" not in shown and "also" not in shown, shown
    assert "--store=postgresql://u:***@h/db" in shown and "--seed 3" in shown


class _LosingStore:
    """A store whose first submit commits and then loses its reply (the
    store went away mid-call); unit-level: the run-level check is in
    fleetsim.experiments._result."""

    def __init__(self, fail_with: Exception) -> None:
        self.fail_with = fail_with
        self.stored: list[int] = []

    def submit_many(self, specs: list[Any]) -> list[int]:
        ids = list(range(len(self.stored) + 1, len(self.stored) + len(specs) + 1))
        self.stored += ids
        if len(self.stored) == len(specs):  # the first call: committed, reply lost
            raise self.fail_with
        return ids


def test_a_submit_sent_again_after_a_lost_reply_counts_as_indeterminate() -> None:
    from fleetsim.errors import StoreUnavailable

    store = _LosingStore(StoreUnavailable("connection lost"))
    load = LoadGenerator(store, [StepKind(1.0, "default", None)], count=20, rate=0, seed=1)  # type: ignore[arg-type]
    load.run()
    assert load.error is None and load.accepted == 20
    assert load.indeterminate == 20 and len(store.stored) == 40  # may have landed twice


def test_a_load_that_dies_of_anything_is_an_error_not_a_short_pass() -> None:
    load = LoadGenerator(_LosingStore(OSError("disk full")), [StepKind(1.0, "default", None)],  # type: ignore[arg-type]
                         count=20, rate=0, seed=1)
    load.run()
    assert load.error is not None and "disk full" in load.error


@pytest.mark.parametrize("condition", ["< 1e400", "> -1e999"])
def test_a_threshold_that_no_value_could_fail_is_refused(condition: str) -> None:
    with pytest.raises(ConfigError, match="not a finite number"):
        parse_thresholds({"e2e_p99_s": condition})
