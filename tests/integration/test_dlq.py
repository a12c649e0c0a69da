"""The dead-letter queue: list, redrive, purge, with real pods and the checker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fleetsim.checker import check
from fleetsim.config import FleetTimings
from fleetsim.store import Store, StoreConfig
from fleetsim.store.dlq import actions, dead_steps, purge, redrive
from tests.helpers import running_fleet, wait_until

GATE = "tests.pod_handlers:fail_while_gate"
FAST = FleetTimings(heartbeat_s=0.2, lease_s=1.5, renew_s=0.5, dead_after_s=1.0,
                    recovery_s=0.2, grace_s=2.0)


def fleetsim(run_dir: Path, store_config: StoreConfig, *args: str
             ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEETSIM_STORE": store_config.url,
           "FLEETSIM_SCHEMA": store_config.schema or ""}
    return subprocess.run(
        [sys.executable, "-m", "fleetsim", "--run-dir", str(run_dir), *args],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )


def kill_by_failure(store: Store, n: int, *, queue: str = "default",
                    max_attempts: int = 2) -> list[int]:
    """``n`` steps failed by a test pod until their attempts are spent (dead)."""
    ids = [store.submit(queue, {"n": i}, max_attempts=max_attempts) for i in range(n)]
    store.register_pod("killer")

    def all_dead() -> bool:
        for c in store.claim_steps("killer", [queue], batch=n):
            store.fail(c.id, c.claim_token, f"boom {c.id}")
        return all(store.get_step(i).status == "dead" for i in ids)  # type: ignore[union-attr]

    wait_until(all_dead, 20, what="steps dead")
    return ids


@pytest.mark.timeout(60)
def test_redrive_grants_a_fresh_budget_and_keeps_the_dlq_invariant(store: Store) -> None:
    ids = kill_by_failure(store, 3, max_attempts=2)
    listed = dead_steps(store)
    assert sorted(d.id for d in listed) == ids
    assert all(d.attempts == 2 and d.max_attempts == 2 and d.error for d in listed)
    assert check(store, final=True).valid

    outcome = redrive(store, [ids[0], ids[1], 999999])
    assert outcome.redriven == (ids[0], ids[1])
    assert outcome.not_dead == {999999: "missing"}
    step = store.get_step(ids[0])
    assert step is not None and step.status == "queued"
    assert (step.attempts, step.max_attempts) == (2, 4)  # 2 spent + a fresh budget of 2
    assert [d.id for d in dead_steps(store)] == [ids[2]]
    # Not finished yet: only the redriven steps are in flight, nothing else breaks.
    report = check(store, final=False)
    assert report.violations == [] and report.valid is None  # None: steps in flight

    # The fresh budget is spent like the first: two more failures and it is dead again.
    def dead_again() -> bool:
        for c in store.claim_steps("killer", batch=5):
            if c.id == ids[0]:
                store.fail(c.id, c.claim_token, "again")
            else:  # spends no attempt
                store.release_many([(c.id, c.claim_token)])
        return store.get_step(ids[0]).status == "dead"  # type: ignore[union-attr]

    wait_until(dead_again, 20, what="dead again")
    again = store.get_step(ids[0])
    assert again is not None and (again.attempts, again.max_attempts) == (4, 4)
    # A second redrive grants the first budget again, not the grown one.
    redrive(store, [ids[0]])
    again = store.get_step(ids[0])
    assert again is not None and again.max_attempts == 6
    recorded = [(a["action"], a["step_id"], a["max_attempts_before"], a["max_attempts_after"])
                for a in actions(store)]
    assert recorded == [("redrive", ids[0], 2, 4), ("redrive", ids[1], 2, 4),
                        ("redrive", ids[0], 4, 6)]

    def finished() -> bool:
        for c in store.claim_steps("killer", batch=5):
            store.complete(c.id, c.claim_token, {"ok": 1})
        return store.status_counts()["completed"] == 2

    wait_until(finished, 20, what="redriven steps completed")
    report = check(store, final=True)
    assert report.valid, report.violations


@pytest.mark.timeout(60)
def test_redrive_all_of_one_queue_and_purge(store: Store) -> None:
    a = kill_by_failure(store, 2, queue="a", max_attempts=1)
    b = kill_by_failure(store, 2, queue="b", max_attempts=1)
    assert redrive(store, all_dead=True, queue="a").redriven == tuple(a)
    assert sorted(d.id for d in dead_steps(store)) == b
    assert purge(store, queue="a") == []  # nothing dead in a any more
    assert purge(store, queue="b") == b
    assert store.get_step(b[0]) is None
    assert [x["action"] for x in actions(store)] == ["redrive", "redrive", "purge", "purge"]
    for c in store.claim_steps("killer", ["a"], batch=5):
        store.complete(c.id, c.claim_token, None)
    report = check(store, final=True)
    assert report.valid, report.violations


@pytest.mark.timeout(150)
def test_cli_redriven_steps_complete_on_a_real_pod(tmp_path: Path, store: Store,
                                                   store_config: StoreConfig) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    run_dir = tmp_path / "run"
    with running_fleet(store_config, run_dir, pods=1, handlers=(GATE,), timings=FAST):
        ids = [store.submit(payload={"workload": GATE, "gate": str(gate), "n": i},
                            max_attempts=2) for i in range(4)]
        wait_until(lambda: store.status_counts()["dead"] == 4, 30, what="4 dead steps")

        listed = fleetsim(run_dir, store_config, "dlq", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        data = json.loads(listed.stdout)
        assert data["total"] == 4
        assert sorted(s["id"] for s in data["steps"]) == ids
        assert all(s["attempts"] == 2 and "gate" in s["error"] and s["died_at"]
                   for s in data["steps"])
        text = fleetsim(run_dir, store_config, "dlq", "list")
        assert f"step {ids[0]}  queue default  attempts 2/2" in text.stdout

        usage = fleetsim(run_dir, store_config, "dlq", "redrive")
        assert usage.returncode == 2 and usage.stderr.count("\n") == 1, usage.stderr
        purge_no_tty = fleetsim(run_dir, store_config, "dlq", "purge")
        assert purge_no_tty.returncode == 2 and "--yes" in purge_no_tty.stderr

        gate.unlink()
        one = fleetsim(run_dir, store_config, "dlq", "redrive", str(ids[0]), "424242")
        assert one.returncode == 1
        assert "redrove 1 step" in one.stdout
        assert "step 424242 (no such step)" in one.stderr
        assert "Traceback" not in one.stderr
        rest = fleetsim(run_dir, store_config, "dlq", "redrive", "--all", "--json")
        assert rest.returncode == 0, rest.stderr
        assert sorted(json.loads(rest.stdout)["redriven"]) == ids[1:]

        wait_until(lambda: store.status_counts()["completed"] == 4, 30, what="redriven done")
        assert store.get_step(ids[0]).result == {"passed": True}  # type: ignore[union-attr]
        emptied = fleetsim(run_dir, store_config, "dlq", "list")
        assert "empty" in emptied.stdout
    checked = fleetsim(run_dir, store_config, "check", "--final", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["valid"] is True


@pytest.mark.timeout(150)
def test_purged_steps_keep_the_cross_examination_valid(tmp_path: Path, store: Store,
                                                       store_config: StoreConfig) -> None:
    """Steps submitted with a client history, dead, then purged: `check` stays valid."""
    run_dir = tmp_path / "run"
    with running_fleet(store_config, run_dir, pods=1, timings=FAST):
        submitted = fleetsim(run_dir, store_config, "submit", "--count", "3", "--workload",
                             "fail:1", "--max-attempts", "2", "--json")
        assert submitted.returncode == 0, submitted.stderr
        ok = fleetsim(run_dir, store_config, "submit", "--count", "2", "--json")
        assert ok.returncode == 0, ok.stderr
        wait_until(lambda: store.status_counts()["dead"] == 3
                   and store.status_counts()["completed"] == 2, 30, what="3 dead, 2 done")
        purged = fleetsim(run_dir, store_config, "dlq", "purge", "--yes", "--json")
        assert purged.returncode == 0, purged.stderr
        assert sorted(json.loads(purged.stdout)["purged"]) == json.loads(submitted.stdout)["ids"]
    checked = fleetsim(run_dir, store_config, "check", "--final", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["valid"] is True
