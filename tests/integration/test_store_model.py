"""A hypothesis state machine of the step lifecycle against a plain-Python model.

Every rule runs on the real store (a private schema per example) and on the
model; after every step the two must agree on each step's status and
attempts. Retries have no backoff here (RetryPolicy(0, 0, 0)) so a failed
step is claimable at once, which keeps the model small and exact.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from fleetsim.store import RetryPolicy, StepSpec, Store, StoreConfig, WriteOutcome


@dataclass
class ModelStep:
    priority: int
    max_attempts: int
    status: str = "queued"
    attempts: int = 0
    token: int | None = None
    cancel_requested: bool = False


class StepLifecycle(RuleBasedStateMachine):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.store = Store(StoreConfig(url, schema=f"m_{uuid.uuid4().hex[:12]}",
                                       retry=RetryPolicy(base_s=0.0, cap_s=0.0, jitter=0.0)))
        self.store.init_schema()
        self.store.register_pod("pod-m")
        self.model: dict[int, ModelStep] = {}
        self.stale: list[tuple[int, int]] = []  # (step id, token) no longer current

    def teardown(self) -> None:
        self.store.drop_schema()
        self.store.close()

    # -- rules ----------------------------------------------------------------

    @rule(priority=st.integers(0, 2), max_attempts=st.integers(1, 3),
          count=st.integers(1, 3))
    def submit(self, priority: int, max_attempts: int, count: int) -> None:
        ids = self.store.submit_many([StepSpec("default", {}, priority, max_attempts)] * count)
        for step_id in ids:
            self.model[step_id] = ModelStep(priority, max_attempts)

    @rule(batch=st.integers(1, 3))
    def claim(self, batch: int) -> None:
        claimable = sorted(
            (s.priority, i) for i, s in self.model.items() if s.status in ("queued", "failed")
        )
        expected = [i for _, i in claimable[:batch]]
        claimed = self.store.claim_steps("pod-m", ["default"], batch)
        assert [c.id for c in claimed] == expected
        tokens = [c.claim_token for c in claimed]
        assert tokens == sorted(tokens)
        for c in claimed:
            step = self.model[c.id]
            if step.token is not None:
                self.stale.append((c.id, step.token))
            step.status, step.token, step.cancel_requested = "claimed", c.claim_token, False

    def _claimed(self) -> list[int]:
        return sorted(i for i, s in self.model.items() if s.status == "claimed")

    @precondition(lambda self: any(s.status == "claimed" for s in self.model.values()))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        step_id = data.draw(st.sampled_from(self._claimed()))
        step = self.model[step_id]
        assert self.store.complete(step_id, step.token, {"ok": True}) is WriteOutcome.ACCEPTED
        step.status = "completed"

    @precondition(lambda self: any(s.status == "claimed" for s in self.model.values()))
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        step_id = data.draw(st.sampled_from(self._claimed()))
        step = self.model[step_id]
        outcome = self.store.fail(step_id, step.token, "boom")
        step.attempts += 1
        if step.attempts >= step.max_attempts:
            step.status = "dead"
        elif step.cancel_requested:
            step.status = "cancelled"
        else:
            step.status = "failed"
        assert outcome.status == step.status

    @precondition(lambda self: any(s.status == "claimed" for s in self.model.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        step_id = data.draw(st.sampled_from(self._claimed()))
        step = self.model[step_id]
        assert self.store.release(step_id, step.token) is WriteOutcome.ACCEPTED
        step.status = "cancelled" if step.cancel_requested else "queued"

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        step_id = data.draw(st.sampled_from(sorted(self.model)))
        step = self.model[step_id]
        result = self.store.cancel(step_id)
        if step.status in ("queued", "failed"):
            step.status = "cancelled"
            assert result == "cancelled"
        elif step.status == "claimed":
            step.cancel_requested = True
            assert result == "cancel_requested"
        else:
            assert result == step.status

    @precondition(lambda self: any(s.status == "claimed" and s.cancel_requested
                                   for s in self.model.values()))
    @rule(data=st.data())
    def acknowledge_cancel(self, data: st.DataObject) -> None:
        step_id = data.draw(st.sampled_from(sorted(
            i for i, s in self.model.items() if s.status == "claimed" and s.cancel_requested)))
        step = self.model[step_id]
        assert self.store.acknowledge_cancel(step_id, step.token) is WriteOutcome.ACCEPTED
        step.status = "cancelled"

    @precondition(lambda self: bool(self.stale))
    @rule(data=st.data())
    def stale_write_is_refused(self, data: st.DataObject) -> None:
        step_id, token = data.draw(st.sampled_from(self.stale))
        before = self.store.get_step(step_id)
        assert self.store.complete(step_id, token) is WriteOutcome.LEASE_LOST
        assert self.store.get_step(step_id) == before

    # -- the two must agree ----------------------------------------------------

    @invariant()
    def store_matches_model(self) -> None:
        counts = self.store.status_counts()
        for status, n in counts.items():
            assert n == sum(1 for s in self.model.values() if s.status == status), status
        for step_id, step in self.model.items():
            row = self.store.get_step(step_id)
            assert row is not None
            assert (row.status, row.attempts) == (step.status, step.attempts), step_id


@pytest.mark.timeout(300)
def test_step_lifecycle_matches_the_model(pg_url: str) -> None:
    run_state_machine_as_test(
        lambda: StepLifecycle(pg_url),
        settings=settings(max_examples=25, stateful_step_count=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow]),
    )


@pytest.mark.timeout(300)
def test_the_model_check_can_fail(pg_url: str) -> None:
    """A machine whose model is wrong must be caught (the test is not vacuous)."""

    class WrongModel(StepLifecycle):
        @rule()
        def submit_one_unrecorded(self) -> None:
            self.store.submit("default")  # the model does not learn of it

    with pytest.raises(AssertionError):
        run_state_machine_as_test(
            lambda: WrongModel(pg_url),
            settings=settings(max_examples=10, stateful_step_count=10, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow]),
        )
