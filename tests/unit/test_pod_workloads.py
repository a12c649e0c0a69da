"""The pod's workloads: noop, sleep, cpu, fail:p (seeded per step and attempt), module:function."""

from __future__ import annotations

import random
import time

import pytest

from fleetsim.errors import ConfigError
from pods.workloads import StepFailed, WorkloadCache, parse_workload


def run(spec: str, payload: dict | None = None, *, step_id: int = 1, attempt: int = 0,
        seed: int = 0) -> object:
    return parse_workload(spec).run(payload or {}, step_id=step_id, attempt=attempt, seed=seed)


@pytest.mark.timeout(10)
def test_noop_returns_nothing_at_once() -> None:
    started = time.perf_counter()
    assert run("noop") is None
    assert time.perf_counter() - started < 0.05


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", ["sleep", "cpu"])
def test_sleep_and_cpu_take_their_milliseconds(kind: str) -> None:
    started = time.perf_counter()
    assert run(f"{kind}:60") is None
    took = time.perf_counter() - started
    assert 0.06 <= took < 1.0, took


@pytest.mark.timeout(10)
def test_cpu_burns_cpu_and_sleep_does_not() -> None:
    def cpu_seconds(spec: str) -> float:
        started = time.process_time()
        run(spec)
        return time.process_time() - started

    # cpu is bounded by wall time: on a busy machine it gets only its share.
    burnt, slept = cpu_seconds("cpu:100"), cpu_seconds("sleep:100")
    assert burnt > 0.005 and burnt > 10 * slept, (burnt, slept)


@pytest.mark.timeout(10)
def test_fail_is_seeded_per_step_and_attempt() -> None:
    def outcome(step_id: int, attempt: int, seed: int = 7) -> bool:
        try:
            run("fail:0.5", step_id=step_id, attempt=attempt, seed=seed)
        except StepFailed:
            return False
        return True

    first = [outcome(s, a) for s in range(200) for a in range(3)]
    # The same step, attempt and seed give the same outcome on any pod, any time.
    assert first == [outcome(s, a) for s in range(200) for a in range(3)]
    # ... and it is the documented draw: random.Random("seed:step:attempt").
    assert first[0] == (random.Random("7:0:0").random() >= 0.5)
    # Another attempt of a step is a new draw (a retry can succeed).
    by_attempt = [[outcome(s, a) for s in range(200)] for a in range(3)]
    assert by_attempt[0] != by_attempt[1]
    # Another seed is another run.
    assert first != [outcome(s, a, seed=8) for s in range(200) for a in range(3)]
    # About p of them fail.
    assert 0.4 < first.count(False) / len(first) < 0.6


@pytest.mark.timeout(10)
def test_fail_extremes() -> None:
    for step_id in range(50):
        assert run("fail:0", step_id=step_id) is None
        with pytest.raises(StepFailed, match=f"failed step {step_id}"):
            run("fail:1", step_id=step_id)


@pytest.mark.timeout(10)
def test_a_user_handler_gets_the_payload_and_returns_its_result() -> None:
    workload = parse_workload("tests.pod_handlers:square")
    assert workload.kind == "handler"
    assert workload.run({"n": 12}, step_id=1, attempt=0, seed=0) == {"n": 12, "square": 144}
    with pytest.raises(ValueError, match="handler raised for 3"):
        parse_workload("tests.pod_handlers:raises").run({"n": 3}, step_id=1, attempt=0,
                                                         seed=0)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown workload"),
    ("noop:1", "takes no argument"),
    ("sleep", "needs a value"),
    ("sleep:x", "not a number"),
    ("sleep:-1", "milliseconds"),
    ("cpu:3600001", "milliseconds"),
    ("fail:1.5", "probability"),
    ("fail:-0.1", "probability"),
    ("tests.pod_handlers:missing", "has no function"),
    ("tests.no_such_module:f", "cannot import"),
])
def test_bad_specs_are_one_line_config_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        parse_workload(spec)
    assert "\n" not in str(raised.value)


@pytest.mark.timeout(10)
def test_a_payload_selects_a_builtin_or_an_allowed_handler() -> None:
    cache = WorkloadCache(parse_workload("sleep:0"), ("tests.pod_handlers:square",))
    assert cache.for_payload({}).spec == "sleep:0"
    assert cache.for_payload({"workload": 5}).spec == "sleep:0"  # not a spec: the default
    assert cache.for_payload({"workload": "fail:0.3"}).amount == 0.3
    assert cache.for_payload({"workload": "tests.pod_handlers:square"}).kind == "handler"
    assert cache.for_payload({"workload": "fail:0.3"}) is cache.for_payload(
        {"workload": "fail:0.3"})  # parsed once
