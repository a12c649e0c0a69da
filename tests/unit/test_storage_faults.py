"""The storage fault injector: what it raises before and after a statement."""

from __future__ import annotations

import pytest

from chaos.storage_faults import StorageFault, StorageFaultInjector
from fleetsim.errors import ConfigError, InjectedFault

pytestmark = pytest.mark.timeout(30)


def outcomes(call: object, times: int) -> list[str]:
    """What ``times`` calls did: "ok", "error" or "disconnect"."""
    seen = []
    for _ in range(times):
        try:
            call()  # type: ignore[operator]
        except InjectedFault as fault:
            seen.append("disconnect" if fault.disconnect else "error")
        else:
            seen.append("ok")
    return seen


@pytest.mark.parametrize("fault", [
    dict(error_rate=1.5), dict(disconnect_rate=-0.1), dict(reply_loss_rate=2.0),
    dict(error_rate=0.6, disconnect_rate=0.6), dict(latency_ms=-1.0),
])
def test_an_impossible_fault_is_refused(fault: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        StorageFault(**fault)


def test_an_idle_injector_never_raises() -> None:
    injector = StorageFaultInjector(seed=1)
    assert outcomes(injector, 100) == ["ok"] * 100
    assert outcomes(injector.after_statement, 100) == ["ok"] * 100


def test_errors_and_disconnects_come_before_a_statement_at_their_rates() -> None:
    injector = StorageFaultInjector(seed=7)
    injector.set(StorageFault(error_rate=0.3, disconnect_rate=0.2))
    seen = outcomes(injector, 2000)
    assert 500 < seen.count("error") < 700
    assert 300 < seen.count("disconnect") < 500
    assert injector.injected_errors == seen.count("error")
    assert injector.injected_disconnects == seen.count("disconnect")
    # Those faults never touch a reply.
    assert outcomes(injector.after_statement, 200) == ["ok"] * 200


def test_lost_replies_come_after_a_statement_and_drop_the_connection() -> None:
    injector = StorageFaultInjector(seed=7)
    injector.set(StorageFault(reply_loss_rate=0.25))
    assert outcomes(injector, 200) == ["ok"] * 200
    seen = outcomes(injector.after_statement, 2000)
    assert set(seen) == {"ok", "disconnect"}
    assert 400 < seen.count("disconnect") < 600
    assert injector.injected_reply_losses == seen.count("disconnect")


def test_a_fault_ends_after_its_duration_or_when_cleared() -> None:
    injector = StorageFaultInjector(seed=3)
    injector.set(StorageFault(error_rate=1.0), duration_s=0.0)
    assert injector.active is None
    assert outcomes(injector, 10) == ["ok"] * 10
    injector.set(StorageFault(reply_loss_rate=1.0))
    assert outcomes(injector.after_statement, 3) == ["disconnect"] * 3
    injector.clear()
    assert outcomes(injector.after_statement, 3) == ["ok"] * 3
