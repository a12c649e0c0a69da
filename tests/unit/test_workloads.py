"""The workload allow-list: a payload selects among what the pod was started with."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fleetsim.errors import ConfigError
from pods.workloads import WorkloadCache, WorkloadNotAllowed, is_handler, parse_workload

HANDLER = "tests.workload_handlers:touch"
OTHER = "tests.workload_handlers:touch_other"


def cache(default: str = "noop", *handlers: str) -> WorkloadCache:
    return WorkloadCache(parse_workload(default), handlers)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("spec", ["subprocess:call", "os:system", OTHER, "builtins:exec"])
def test_a_handler_not_given_at_start_is_refused_and_never_imported(spec: str) -> None:
    module = spec.partition(":")[0]
    was_loaded = module in sys.modules
    workloads = cache("noop", HANDLER)
    with pytest.raises(WorkloadNotAllowed, match="not allowed on this pod") as raised:
        workloads.for_payload({"workload": spec})
    assert spec in str(raised.value) and HANDLER in str(raised.value)
    assert isinstance(raised.value, ConfigError)  # fails the step, not the pod
    if not was_loaded:
        assert module not in sys.modules


@pytest.mark.timeout(10)
def test_builtins_default_and_start_handlers_are_allowed(tmp_path: Path) -> None:
    workloads = cache(HANDLER, "tests.workload_handlers:touch_other")
    for spec in ("noop", "sleep:0", "cpu:0", "fail:0"):
        assert workloads.for_payload({"workload": spec}).spec == spec
    assert workloads.for_payload({}).spec == HANDLER
    workloads.for_payload({"workload": OTHER}).run(
        {"path": str(tmp_path / "x")}, step_id=1, attempt=0, seed=0)
    assert (tmp_path / "x").exists()
    assert workloads.allowed == {HANDLER, OTHER}


@pytest.mark.timeout(10)
def test_a_bad_start_handler_stops_the_pod_at_start() -> None:
    with pytest.raises(ConfigError, match="cannot import"):
        cache("noop", "tests.workload_handlers:missing")
    with pytest.raises(ConfigError, match="give a module:function"):
        cache("noop", "sleep:5")


@pytest.mark.timeout(10)
def test_payload_chosen_specs_do_not_grow_memory_without_bound() -> None:
    workloads = cache()
    for ms in range(5000):
        workloads.for_payload({"workload": f"sleep:{ms}"})
    assert len(workloads._cache) <= 257


@pytest.mark.timeout(10)
def test_is_handler() -> None:
    assert is_handler("a.b:c") and is_handler(" mod:fn ")
    assert not is_handler("noop") and not is_handler("sleep:5") and not is_handler("fail:0.1")
