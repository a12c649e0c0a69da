"""The hot statements' generic plans reach ``steps`` only through its indexes.

Pods prepare the hot statements once per connection with generic plans,
often while the tables are still empty, and keep those plans for the life
of the connection. A plan that scans ``steps`` would make every claim or
completion cost as much as the whole table: these tests pin that the plans
made on empty tables (and on analyzed full ones) use indexes only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from fleetsim.store import StepSpec, Store, StoreConfig
from fleetsim.store.store import _HOT

pytestmark = pytest.mark.timeout(60)

PARAMS: dict[str, dict[str, Any]] = {
    "fleetsim_claim": {"queues": ["default"], "pod": "p", "batch": 50, "incarnation": 0},
    "fleetsim_complete": {"items": json.dumps([{"id": 1, "token": 1, "result": None}])},
    "fleetsim_fail": {"items": json.dumps([{"id": 1, "token": 1, "error": "x"}]),
                      "retry_base": 1.0, "retry_cap": 10.0, "retry_jitter": 0.1},
    "fleetsim_release": {"items": json.dumps([{"id": 1, "token": 1}])},
    "fleetsim_heartbeat": {"pod": "p", "incarnation": 0},
}
HISTORY = {"steps", "finished_attempts", "rejected_writes"}


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def generic_plans(config: StoreConfig, prepare_before: Any = None) -> dict[str, dict[str, Any]]:
    """Each hot statement's generic plan, prepared before ``prepare_before()`` runs."""
    conn = psycopg2.connect(config.url, options=f"-c search_path={config.schema}")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SET plan_cache_mode = force_generic_plan")
            for statement in _HOT:
                cur.execute(statement.prepare)
            if prepare_before is not None:
                prepare_before()
            plans = {}
            for statement in _HOT:
                cur.execute("EXPLAIN (FORMAT JSON) " + statement.execute_py,
                            PARAMS[statement.name])
                plans[statement.name] = cur.fetchone()[0][0]["Plan"]
            return plans
    finally:
        conn.close()


def table_scans(plan: dict[str, Any]) -> set[str]:
    """The history tables the plan reads with a sequential scan."""
    return {n["Relation Name"] for n in nodes(plan)
            if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in HISTORY}


def indexes_used(plan: dict[str, Any]) -> set[str]:
    return {n["Index Name"] for n in nodes(plan) if "Index Name" in n}


def assert_index_only_access(plans: dict[str, dict[str, Any]]) -> None:
    assert set(plans) == set(PARAMS), "a hot statement has no case here"
    for name, plan in plans.items():
        assert table_scans(plan) == set(), f"{name} scans {table_scans(plan)}"
    assert "steps_claimable" in indexes_used(plans["fleetsim_claim"])
    for name in ("fleetsim_complete", "fleetsim_fail", "fleetsim_release"):
        assert "steps_pkey" in indexes_used(plans[name]), name


def test_plans_made_on_empty_tables_use_indexes_once_the_tables_fill(
    store: Store, store_config: StoreConfig
) -> None:
    plans = generic_plans(store_config, prepare_before=lambda: store.submit_many(
        [StepSpec(payload={"n": n}) for n in range(5000)]))
    assert_index_only_access(plans)


def test_plans_made_on_analyzed_full_tables_use_indexes(
    store: Store, store_config: StoreConfig
) -> None:
    store.submit_many([StepSpec(payload={"n": n}) for n in range(5000)])
    store.analyze()
    assert_index_only_access(generic_plans(store_config))


def test_the_plan_check_sees_a_scan() -> None:
    """The check itself can fail: a sequential scan of steps is reported."""
    plan = {"Node Type": "Hash Join", "Plans": [
        {"Node Type": "Seq Scan", "Relation Name": "steps"},
        {"Node Type": "Index Scan", "Relation Name": "pods", "Index Name": "pods_pkey"}]}
    assert table_scans(plan) == {"steps"}
    with pytest.raises(AssertionError):
        assert_index_only_access(dict.fromkeys(PARAMS, plan))
