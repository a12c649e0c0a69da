"""Statement-level storage faults, injected inside a pod at the SQL layer.

The pod registers one :class:`StorageFaultInjector` with its store as a
statement hook (see ``Store.add_statement_hook``); it costs one attribute
check per statement while idle. The coordinator turns it on over the bus
(``SetStorageFault``): errors at a rate, added latency, dropped connections,
for a duration. The same injector, registered as a reply hook
(``Store.add_reply_hook``), loses replies: the statement has taken effect,
then the connection drops before its result reaches the pod.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from fleetsim.errors import ConfigError, InjectedFault


@dataclass(frozen=True)
class StorageFault:
    """What to inject: rates in [0, 1], latency in milliseconds.

    ``error_rate`` and ``disconnect_rate`` act before a statement (it never
    runs); ``reply_loss_rate`` after one (it ran and committed, and the
    caller sees a dropped connection instead of its result).
    """

    error_rate: float = 0.0
    latency_ms: float = 0.0
    disconnect_rate: float = 0.0
    reply_loss_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("error_rate", "disconnect_rate", "reply_loss_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if self.error_rate + self.disconnect_rate > 1.0:
            raise ConfigError("error_rate + disconnect_rate must not exceed 1")
        if not 0.0 <= self.latency_ms <= 60_000:
            raise ConfigError(f"latency must be in [0, 60000] ms, got {self.latency_ms}")


class StorageFaultInjector:
    """A store statement hook that injects the current fault, if any."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._fault: StorageFault | None = None
        self._until: float | None = None
        self.injected_errors = 0
        self.injected_disconnects = 0
        self.injected_reply_losses = 0

    def set(self, fault: StorageFault, duration_s: float | None = None) -> None:
        """Inject ``fault`` from now on, for ``duration_s`` (None: until cleared)."""
        with self._lock:
            self._fault = fault
            self._until = None if duration_s is None else time.monotonic() + duration_s

    def clear(self) -> None:
        """Stop injecting."""
        with self._lock:
            self._fault = None
            self._until = None

    @property
    def active(self) -> StorageFault | None:
        """The fault in force now, if any."""
        with self._lock:
            if self._until is not None and time.monotonic() >= self._until:
                self._fault = self._until = None
            return self._fault

    def __call__(self) -> None:
        """Before a statement: sleep, raise an injected error, or do nothing."""
        if self._fault is None:  # the idle fast path: no lock
            return
        fault = self.active
        if fault is None:
            return
        if fault.latency_ms:
            time.sleep(fault.latency_ms / 1000.0)
        with self._lock:
            draw = self._rng.random()
        if draw < fault.disconnect_rate:
            self.injected_disconnects += 1
            raise InjectedFault("injected storage fault: connection dropped", disconnect=True)
        if draw < fault.disconnect_rate + fault.error_rate:
            self.injected_errors += 1
            raise InjectedFault("injected storage fault: statement failed")

    def after_statement(self) -> None:
        """After a statement took effect: maybe drop the connection before its reply."""
        if self._fault is None:  # the idle fast path: no lock
            return
        fault = self.active
        if fault is None or not fault.reply_loss_rate:
            return
        with self._lock:
            draw = self._rng.random()
        if draw < fault.reply_loss_rate:
            self.injected_reply_losses += 1
            raise InjectedFault(
                "injected storage fault: reply lost", disconnect=True, took_effect=True
            )
