"""The pod process: heartbeat, claim loop, step execution, leadership, recovery.

Threads:

- the main thread claims batches and hands them to a pool of
  ``concurrency`` runner threads, then writes the outcomes back, fenced by
  each step's claim token;
- the heartbeat thread keeps the pod alive in the store and fences the pod
  when it cannot (store lost for longer than the lease, or declared dead);
- the election thread competes for the leader lease and, while leader, runs
  recovery, every action fenced by its term;
- the watchdog thread fences the pod when the last good heartbeat is older
  than the lease, even if a store call hangs (a blackholed connection never
  errors by itself).

Chaos reaches the pod only through seams: a statement hook on the store
(storage faults) and the bus command handler; the loops have no chaos
branches.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import tenacity

from fleetsim.client_history import ClientHistory, NullHistory
from fleetsim.errors import (
    ClaimInterrupted,
    ConfigError,
    InjectedFault,
    NotLeader,
    PodIdInUse,
    StoreError,
    StoreUnavailable,
    UnstorableValue,
)
from fleetsim.store import ClaimedStep, Store, WriteOutcome, check_storable
from pods.config import PodConfig
from pods.exitcodes import PodExit
from pods.hooks import CountingHook, PodHook
from pods.served_queues import ServedQueues
from pods.workloads import HANG_DEFAULT_MS, Workload, WorkloadCache, parse_workload

log = logging.getLogger("fleetsim.pod")
T = TypeVar("T")

# The claim loop's idle poll backs off from the first to the second value
# while the queues stay empty.
_IDLE_POLL_S = (0.01, 0.2)

# A candidate tries for the lease at least this often: a lease is freed
# early when its holder certainly died (the coordinator saw its process
# exit: Store.record_exit), and the next leader should not wait a renew
# period for it. An attempt that finds the lease held changes nothing.
_CANDIDATE_POLL_S = 0.25


@dataclass
class _BatchOutcome:
    """What happened to each step of a claimed batch (filled by runner threads)."""

    completed: list[tuple[int, int, Any]] = field(default_factory=list)
    failed: list[tuple[int, int, str]] = field(default_factory=list)
    cancelled: list[tuple[int, int]] = field(default_factory=list)
    unstarted: list[tuple[int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Steps running with an execution timeout: (id, token) -> (monotonic
    # deadline, timeout in s, lane index).
    running: dict[tuple[int, int], tuple[float, float, int]] = field(default_factory=dict)
    # Steps failed for running past their timeout, with their lane: whatever
    # their runner returns later is dropped, never written.
    timed_out: dict[tuple[int, int], int] = field(default_factory=dict)
    # Lanes whose running step is past its timeout (until it returns).
    hung: set[int] = field(default_factory=set)
    # Set when the batch stops waiting for its lanes (its outcome is being
    # written): a lane that returns after it starts no further step.
    closed: bool = False


class Pod:
    """One pod. ``run()`` blocks until the pod stops and returns its exit code."""

    def __init__(
        self, config: PodConfig, store: Store, hooks: Sequence[PodHook] = ()
    ) -> None:
        self.config = config
        self.store = store
        self.counters = CountingHook()
        self.hooks: list[PodHook] = [self.counters, *hooks]
        self.workloads = WorkloadCache(parse_workload(config.workload), config.handlers)
        self.stopping = threading.Event()  # graceful stop requested
        self.fenced = threading.Event()  # must not act on claimed steps
        self.superseded = threading.Event()  # a newer incarnation exists
        self.handler_exited = threading.Event()  # a handler called sys.exit
        self._cancel_requested: set[tuple[int, int]] = set()
        self._abandoned: list[tuple[int, int]] = []  # tokens of writes dropped or given up
        # The store may hold claims of ours we do not know of: a claim failed
        # (its reply may be lost after it committed) or a write was given up.
        # Set by any thread; cleared only by the claim loop, between batches.
        self._holds_unknown_claims = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="step")
        # Runner threads left behind running a step past its timeout (Python
        # cannot kill a thread); each still holds a thread of its old pool.
        self.hung_runners = 0
        self.late_results_dropped = 0  # results of those runners once they returned
        # Chaos (`fleetsim chaos hang`): the next step to start runs the hang
        # workload for this long instead of its own; None: no such fault.
        self._hang_next_s: float | None = None
        self.term: int | None = None
        self._last_heartbeat_ok = time.monotonic()
        # When this pod got the store back after losing it for longer than
        # the dead threshold (see _recovery_may_judge).
        self._store_back_at = float("-inf")
        self.bus: Any = None  # a fleetsim.bus.PodBusClient when joined to a coordinator
        self.metrics_enabled = False  # only with a metrics endpoint to push to
        # Histograms and gauges (pods.metrics.PodMetrics), once enable_metrics() ran.
        self.metrics: Any = None
        self.storage_faults: Any = None  # a chaos.storage_faults.StorageFaultInjector
        self.id_in_use: str | None = None  # why registration was refused, if it was
        # What this pod invoked and was told, outside the store (evidence
        # for the checker); a NullHistory unless the pod was given a folder.
        self.history: ClientHistory = NullHistory()
        # Its --queue names, or every queue in the store ("*"), re-read as it goes.
        self.served_queues = ServedQueues(config.queues, store)

    # -- lifecycle --------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT request a graceful stop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())

    def register(self, timeout_s: float = 10.0) -> None:
        """Register with the store, retrying transient errors up to ``timeout_s``."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(StoreUnavailable),
            # Exponential with jitter, spelt so that every tenacity >= 8.2 reads it alike.
            wait=(tenacity.wait_exponential(multiplier=0.1, max=1.0)
                  + tenacity.wait_random(0, 0.1)),
            stop=tenacity.stop_after_delay(timeout_s),
            reraise=True,
        )
        requeued = retrying(
            self.store.register_pod,
            self.config.pod_id,
            incarnation=self.config.incarnation,
            pid=os.getpid(),
            host=socket.gethostname(),
            live_within_s=self.config.timings.dead_after_s,
        )
        if requeued:
            log.info("requeued %d steps left claimed by an earlier run of this pod", requeued)

    def run(self) -> PodExit:
        """Register, work until stopped, shut down gracefully."""
        cfg = self.config
        try:
            self.register()
        except PodIdInUse as exc:
            log.error("cannot register: %s", exc)
            self.id_in_use = str(exc)
            return PodExit.ID_IN_USE
        except StoreError as exc:
            log.error("cannot register: %s", exc)
            return PodExit.STORE_UNREACHABLE
        log.info(
            "ready: pod %s incarnation %d pid %d (workload %s, concurrency %d, batch %d)",
            cfg.pod_id, cfg.incarnation, os.getpid(), cfg.workload, cfg.concurrency, cfg.batch,
        )
        threads = [
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True),
            threading.Thread(target=self._election_loop, name="election", daemon=True),
            threading.Thread(target=self._watchdog_loop, name="watchdog", daemon=True),
        ]
        if self.metrics_enabled:
            self.enable_metrics()
        if self.bus is not None:
            self.bus.start()
        for thread in threads:
            thread.start()
        try:
            self._claim_loop()
        finally:
            self.stopping.set()
            for thread in threads:
                thread.join(timeout=cfg.timings.lease_s)
            self._shutdown()
        if self.handler_exited.is_set():
            return PodExit.CRASHED
        return PodExit.SUPERSEDED if self.superseded.is_set() else PodExit.OK

    def enable_metrics(self) -> Any:
        """Install the metrics hook (latency histograms, gauges) if not yet; return it."""
        if self.metrics is None:
            from pods.metrics import PodMetrics

            self.metrics = PodMetrics()
            self.hooks.append(self.metrics)
        return self.metrics

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        term = self.term
        try:
            if term is not None:
                self.store.release_leadership(self.config.pod_id, term)
                self._notify("on_leadership", None)
            self._release_abandoned()
            if not self.superseded.is_set():
                if self._holds_unknown_claims.is_set():
                    self._release_unknown_claims()
                self.store.stop_pod(self.config.pod_id, self.config.incarnation)
        except StoreError as exc:
            log.warning("shutdown without the store (recovery will requeue): %s", exc)
        if self.bus is not None:
            self._send_last_metrics()
            self.bus.close()
        self.history.close()
        log.info("stopped: %s", self.counters.snapshot())

    def _send_last_metrics(self, timeout_s: float = 0.5) -> None:
        """Send the final counters before the bus closes (it drops what is unsent)."""
        if not self.metrics_enabled or self.metrics is None:
            return
        sent = self.bus.stats.metrics_sent
        self._report_to_bus()
        deadline = time.monotonic() + timeout_s
        while self.bus.stats.metrics_sent == sent and time.monotonic() < deadline:
            time.sleep(0.01)

    # -- the claim loop ---------------------------------------------------

    def _claim_loop(self) -> None:
        cfg = self.config
        idle = _IDLE_POLL_S[0]
        while not self.stopping.is_set():
            if self.fenced.is_set():
                self.stopping.wait(cfg.timings.heartbeat_s)
                continue
            try:
                if self._holds_unknown_claims.is_set():
                    self._release_unknown_claims()
                claim_started = time.perf_counter()
                steps = self.store.claim_steps(
                    cfg.pod_id, self.served_queues.current(), cfg.batch,
                    incarnation=cfg.incarnation,
                )
                self._notify("on_claim_done", time.perf_counter() - claim_started, len(steps))
            except ClaimInterrupted as exc:
                # Part of the claim committed: run those steps. The failed
                # part may have committed too, unseen: release it after them.
                log.warning("%s", exc)
                self._holds_unknown_claims.set()
                self.history.claim_unknown()
                steps = exc.steps
            except StoreError as exc:
                log.warning("claim failed: %s", exc)
                self._notify("on_store_error", "claim")
                # Unless the statement surely never ran (a fault injected
                # before it), the claim may have committed without us.
                if not isinstance(exc, InjectedFault) or exc.took_effect:
                    self._holds_unknown_claims.set()
                    self.history.claim_unknown()
                self.stopping.wait(min(1.0, idle * 4))
                idle = min(_IDLE_POLL_S[1], idle * 2)
                continue
            if not steps:
                self.stopping.wait(idle)
                idle = min(_IDLE_POLL_S[1], idle * 2)
                continue
            idle = _IDLE_POLL_S[0]
            self.history.claimed(steps)
            self._notify("on_claimed", steps)
            self._write_back(self._run_batch(steps))

    def _release_unknown_claims(self) -> None:
        """Give back every claim the store says we hold: between batches we hold none.

        A claim whose reply was lost committed steps to this pod that it never
        saw; nobody else would take them while this pod stays alive.
        """
        # Cleared first: a thread that sets it meanwhile is then not lost.
        self._holds_unknown_claims.clear()
        try:
            released = self.store.release_claims_of(self.config.pod_id, self.config.incarnation)
        except StoreError:
            self._holds_unknown_claims.set()
            self.history.append({"type": "write", "op": "release_all", "ids": [], "tokens": [],
                                 "reply": "unknown"})
            raise
        self.history.append({"type": "write", "op": "release_all", "ids": [], "tokens": [],
                             "reply": "accepted", "accepted": released})
        if released:
            log.warning("released %d steps claimed or held without a reply (%s)",
                        len(released), ", ".join(map(str, released[:10])))

    def _run_batch(self, steps: list[ClaimedStep]) -> _BatchOutcome:
        """Run a batch on the pool; on stop, wait at most the grace period.

        A step running past its execution timeout fails (``timed out after
        Ns``, retried with backoff or dead) without waiting for it: the wait
        ends at the earliest deadline of the running steps. Its runner thread
        cannot be killed: it is left behind, and what it returns is dropped.
        The batch ends once every lane still running is such a hung one; the
        hung lanes' later steps are released unstarted, and the pod goes on
        with a fresh pool.
        """
        outcome = _BatchOutcome()
        started = time.time()
        lanes = [steps[i :: self.config.concurrency] for i in range(self.config.concurrency)]
        lane_of: dict[Future[None], int] = {
            self._pool.submit(self._run_lane, lane, outcome, index): index
            for index, lane in enumerate(lanes) if lane
        }
        started_stop: float | None = None
        pending = set(lane_of)
        while pending:
            wait_s = 0.1
            with outcome.lock:
                if outcome.running:
                    earliest = min(d for d, _, _ in outcome.running.values())
                    wait_s = min(wait_s, max(0.0, earliest - time.monotonic()))
            _, pending = wait_futures(pending, timeout=wait_s)
            self._fail_overdue(outcome)
            with outcome.lock:
                all_hung = bool(pending) and all(lane_of[f] in outcome.hung for f in pending)
            if all_hung:
                break
            if self.stopping.is_set() and started_stop is None:
                started_stop = time.monotonic()
            if started_stop is not None and (
                time.monotonic() - started_stop > self.config.timings.grace_s
            ):
                log.warning("grace period over with %d lanes still running", len(pending))
                break
        with outcome.lock:
            hung_left = [f for f in pending if lane_of[f] in outcome.hung]
        if hung_left:
            # Python cannot kill a thread: each hung runner keeps its thread
            # (and the old pool's) until its step returns. New batches run on
            # a fresh pool, so the pod keeps its concurrency meanwhile.
            self.hung_runners += len(hung_left)
            log.warning("%d runner threads left behind on steps past their timeout "
                        "(%d so far); their late results will be dropped",
                        len(hung_left), self.hung_runners)
            old = self._pool
            self._pool = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="step")
            old.shutdown(wait=False, cancel_futures=True)
        if pending:
            # Steps still running past the grace period are released: whoever
            # claims them next runs them again from the start.
            with outcome.lock:
                outcome.closed = True
                finished = {s[0] for s in outcome.completed}
                finished |= {s[0] for s in outcome.failed}
                finished |= {s[0] for s in outcome.cancelled}
                finished |= {s[0] for s in outcome.unstarted}
                outcome.unstarted.extend(
                    (s.id, s.claim_token) for s in steps if s.id not in finished
                )
        with outcome.lock:
            self.history.ran(started, time.time(), len(outcome.completed), len(outcome.failed))
        return outcome

    def _fail_overdue(self, outcome: _BatchOutcome) -> None:
        """Fail the running steps past their deadline; note their lanes as hung."""
        now = time.monotonic()
        with outcome.lock:
            overdue = [(key, timeout, lane) for key, (deadline, timeout, lane)
                       in outcome.running.items() if deadline <= now]
            for key, timeout, lane in overdue:
                del outcome.running[key]
                outcome.timed_out[key] = lane
                outcome.hung.add(lane)
                outcome.failed.append(
                    (key[0], key[1], f"TimeoutError: timed out after {timeout:g}s"))
        for key, timeout, _ in overdue:
            log.warning("step %d timed out after %gs: failing it; its runner thread is left "
                        "behind and the lane is lost until it returns", key[0], timeout)

    def _run_lane(self, lane: list[ClaimedStep], outcome: _BatchOutcome, lane_index: int = 0
                  ) -> None:
        for index, step in enumerate(lane):
            if outcome.closed:
                # The batch gave up waiting for this lane (a step of it ran
                # past its timeout): the rest was released unstarted.
                return
            if self.stopping.is_set() or self.fenced.is_set():
                with outcome.lock:
                    outcome.unstarted.extend((s.id, s.claim_token) for s in lane[index:])
                return
            key = (step.id, step.claim_token)
            if key in self._cancel_requested:
                with outcome.lock:
                    outcome.cancelled.append(key)
                continue
            started = time.perf_counter()
            if step.timeout_s is not None:
                with outcome.lock:
                    outcome.running[key] = (
                        time.monotonic() + step.timeout_s, step.timeout_s, lane_index)
            try:
                workload = self._take_hang() or self.workloads.for_payload(step.payload)
                result = workload.run(
                    step.payload, step_id=step.id, attempt=step.attempts, seed=self.config.seed
                )
                # A result the store cannot hold fails its step, not its batch.
                check_storable(result, f"step {step.id}'s result")
            except (Exception, SystemExit) as exc:
                error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, SystemExit):
                    # A handler called sys.exit. Escaping the runner thread, it
                    # left its step claimed by a live pod: lost for ever. Its
                    # step fails (retried), the pod stops and exits CRASHED.
                    error = f"SystemExit: the handler called sys.exit({exc.code!r})"
                    self.handler_exited.set()
                    self.stopping.set()
                if step.timeout_s is not None and self._late(outcome, key):
                    continue
                if not isinstance(exc, ConfigError):
                    log.info("step %d failed: %s", step.id, error)
                    log.debug("%s", traceback.format_exc())
                self._notify("on_step_done", step, False, time.perf_counter() - started, error)
                with outcome.lock:
                    outcome.failed.append((step.id, step.claim_token, error))
                continue
            if step.timeout_s is not None and self._late(outcome, key):
                continue
            self._notify("on_step_done", step, True, time.perf_counter() - started, None)
            with outcome.lock:
                if key in self._cancel_requested:
                    outcome.cancelled.append(key)
                else:
                    outcome.completed.append((step.id, step.claim_token, result))

    def _late(self, outcome: _BatchOutcome, key: tuple[int, int]) -> bool:
        """Whether a step that just returned had timed out (its result is dropped)."""
        with outcome.lock:
            outcome.running.pop(key, None)
            late = key in outcome.timed_out
            if late:
                outcome.hung.discard(outcome.timed_out[key])
        if late:
            with self._lock:
                self.late_results_dropped += 1
            log.warning("step %d returned after its timeout: late result dropped, "
                        "never written (its runner thread is free again)", key[0])
        return late

    def _write_back(self, outcome: _BatchOutcome) -> None:
        """Write a batch's outcomes, fenced by token; keep what could not be written."""
        if self.fenced.is_set():
            # We may have been declared dead: our tokens are probably stale.
            # Completing is still safe (fenced), but a self-fenced pod must not
            # act; remember the tokens and release them when the store is back.
            # _abandon also marks the pod as holding claims, so they are
            # released before the next claim even if the heartbeat loop's
            # release of the earlier ones is already under way.
            self._abandon([*outcome.completed, *outcome.failed, *outcome.cancelled,
                           *outcome.unstarted])
            return
        refused = self._write("complete", self.store.complete_many, outcome.completed)
        # A completion the store refused for what it carries (not for being
        # unreachable) fails its step, spending an attempt: released, it
        # would be claimed and refused again for ever.
        self._write("fail", self.store.fail_many, outcome.failed + [
            (item[0], item[1], f"the store refused the result: {error}")
            for item, error in refused
        ])
        self._write("release", self.store.release_many, outcome.unstarted)
        for step_id, token in outcome.cancelled:
            try:
                acked = self._retry(
                    functools.partial(self.store.acknowledge_cancel, step_id, token))
            except StoreError as exc:
                log.warning("could not acknowledge the cancel of step %d: %s", step_id, exc)
                self.history.wrote("cancel", [(step_id, token)], None)
                self._holds_unknown_claims.set()  # the step is still ours: release it
            else:
                self.history.wrote("cancel", [(step_id, token)],
                                   {step_id} if acked == WriteOutcome.ACCEPTED else set())
            self._cancel_requested.discard((step_id, token))

    def _write(
        self, kind: str, write: Callable[[Any], Any], items: list[Any]
    ) -> list[tuple[Any, StoreError]]:
        """Write ``items``, fenced by token; return the completions refused for their content.

        A batch the store refuses for what it carries (UnstorableValue: a
        value the server rejects) is written again one item at a time, so
        one bad item cannot hold its batch-mates back. Any other failure
        (the store away, a timeout, a deadlock) says nothing about the
        items: they are kept, to be released before the next claim.
        """
        if not items:
            return []
        try:
            accepted = self._retry(lambda: write(items))
        except UnstorableValue as exc:
            self.history.wrote(kind, items, None)
            if len(items) == 1:
                log.warning("could not %s step %d: %s", kind, items[0][0], exc)
                if kind == "complete":
                    return [(items[0], exc)]
                self._abandon(items)
                return []
            refused: list[tuple[Any, StoreError]] = []
            for index, item in enumerate(items):
                try:
                    refused += self._write_one(kind, write, item)
                except StoreError:
                    # Not the item's fault: stop splitting, keep the rest.
                    self._abandon(items[index:])
                    break
            return refused
        except StoreError as exc:
            self.history.wrote(kind, items, None)
            self._notify("on_store_error", kind)
            log.warning("could not %s %d steps (%s); they are released before the next claim",
                        kind, len(items), exc)
            self._abandon(items)
            return []
        self.history.wrote(kind, items, accepted)
        rejected = len(items) - len(accepted)
        if rejected:
            log.info("%d %s writes refused: lease lost (steps were requeued)", rejected, kind)
        self._notify("on_write", kind, len(accepted), rejected)
        self._notify("on_accepted", kind, accepted)
        return []

    def _write_one(
        self, kind: str, write: Callable[[Any], Any], item: Any
    ) -> list[tuple[Any, StoreError]]:
        """One item of a split batch; raises StoreError unless the store refused its content."""
        try:
            accepted = self._retry(lambda: write([item]))
        except UnstorableValue as exc:
            self.history.wrote(kind, [item], None)
            log.warning("could not %s step %d: %s", kind, item[0], exc)
            if kind == "complete":
                return [(item, exc)]
            self._abandon([item])
            return []
        except StoreError:
            self.history.wrote(kind, [item], None)
            raise
        self.history.wrote(kind, [item], accepted)
        self._notify("on_write", kind, len(accepted), 1 - len(accepted))
        self._notify("on_accepted", kind, accepted)
        return []

    def _abandon(self, items: list[Any]) -> None:
        """Keep the tokens of writes given up, and release the steps before the next claim."""
        # Their tokens go back by a fenced release (refused, and recorded,
        # if the steps were requeued meanwhile); release_claims_of gives
        # back any the store still has as ours before the next claim.
        with self._lock:
            self._abandoned += [(item[0], item[1]) for item in items]
        self._holds_unknown_claims.set()

    def _retry(self, call: Callable[[], T]) -> T:
        """Retry a store call on transient errors, for at most one lease period.

        Waits 0.05 s (+ up to 0.05 s of jitter) after the first failure,
        doubling up to 0.5 s; gives up once a failure ends a lease period
        after the first attempt started.
        """
        started = time.monotonic()
        try:
            # The first attempt without tenacity: building its Retrying for
            # every write cost about a tenth of the pod's own work per batch.
            return call()
        except StoreUnavailable:
            lease_s = self.config.timings.lease_s
            if time.monotonic() - started >= lease_s:
                raise
        time.sleep(0.05 + random.uniform(0, 0.05))  # the wait after the first attempt
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(StoreUnavailable),
            # Attempt n here is attempt n + 1 of the whole: 0.05 * 2**n.
            wait=(tenacity.wait_exponential(multiplier=0.1, max=0.5)
                  + tenacity.wait_random(0, 0.05)),
            stop=tenacity.stop_after_delay(max(0.0, lease_s - (time.monotonic() - started))),
            reraise=True,
        )
        return retrying(call)

    def _release_abandoned(self) -> None:
        """Give back, by token, the steps whose outcome was dropped or given up.

        The tokens are kept until the store has taken them back: if the
        release fails they are still ours to release, and the pod is marked
        as holding claims (release_claims_of before its next claim).
        """
        with self._lock:
            items = list(self._abandoned)
        if not items:
            return
        try:
            released = self.store.release_many(items)
        except StoreError:
            self.history.wrote("release", items, None)
            self._holds_unknown_claims.set()
            raise
        self.history.wrote("release", items, released)
        with self._lock:
            done = set(items)
            self._abandoned = [item for item in self._abandoned if item not in done]
        log.info("released %d of %d steps dropped while fenced", len(released), len(items))

    # -- heartbeat --------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        cfg = self.config
        while not self.stopping.wait(cfg.timings.heartbeat_s):
            self._report_to_bus()
            try:
                beat = self.store.heartbeat(cfg.pod_id, cfg.incarnation)
            except StoreError as exc:
                log.debug("heartbeat failed: %s", exc)
                self._notify("on_store_error", "heartbeat")
                continue
            now = time.monotonic()
            if now - self._last_heartbeat_ok > cfg.timings.dead_after_s:
                self._store_back_at = now
            self._last_heartbeat_ok = now
            if not beat.alive:
                if beat.incarnation is not None and beat.incarnation > cfg.incarnation:
                    log.warning("superseded by incarnation %d: exiting", beat.incarnation)
                    self.superseded.set()
                    self.stopping.set()
                    return
                log.warning("declared dead by the leader: dropping my steps and rejoining")
                self._set_fenced(True)
                try:
                    self.register()
                except PodIdInUse as exc:
                    # Another process took the id while we were dead: we
                    # are fenced for good (the claim and the heartbeat
                    # check the incarnation); leave.
                    log.warning("cannot rejoin: %s", exc)
                    self.superseded.set()
                    self.stopping.set()
                    return
                except StoreError as exc:
                    log.warning("rejoin failed: %s", exc)
                    continue
            if self.fenced.is_set():
                try:
                    self._release_abandoned()
                except StoreError:
                    continue
                self._set_fenced(False)
            with self._lock:
                self._cancel_requested.update(beat.cancel_requested)

    def _watchdog_loop(self) -> None:
        lease = self.config.timings.lease_s
        while not self.stopping.wait(self.config.timings.heartbeat_s / 2):
            silent = time.monotonic() - self._last_heartbeat_ok
            if silent > lease and not self.fenced.is_set():
                log.warning("no heartbeat for %.1fs (lease %.1fs): fencing myself", silent, lease)
                self._set_fenced(True)

    def _report_to_bus(self) -> None:
        if self.bus is None:
            return
        from fleetsim.bus import PodStatus

        counts = self.counters.snapshot()
        state = "fenced" if self.fenced.is_set() else (
            "stopping" if self.stopping.is_set() else "alive")
        self.bus.update_status(PodStatus(
            state=state, is_leader=self.term is not None, term=self.term,
            claimed=counts.get("claimed", 0), completed=counts.get("completed", 0),
            failed=counts.get("failed", 0),
        ))
        if self.metrics_enabled and self.metrics is not None:
            counters, gauges = self.metrics.snapshot(counts)
            gauges["leader_term"] = float(self.term or 0)
            self.bus.send_metrics(counters, gauges)

    def handle_command(self, command: Any) -> Any:
        """Answer a coordinator command (runs in the bus thread: quick, no store calls)."""
        from fleetsim.bus import (
            ClearStorageFault,
            HangNextStep,
            Ok,
            SelfKill,
            SetStorageFault,
            Shutdown,
        )

        if isinstance(command, Shutdown):
            self.stopping.set()
            return Ok({"stopping": True})
        if isinstance(command, SelfKill):
            # Reply first, then die the way a SIGKILL from chaos would.
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()
            return Ok({"pid": os.getpid()})
        if isinstance(command, HangNextStep):
            self.hang_next_step(command.hang_s)
            return Ok({"pod": self.config.pod_id, "hang_s": self._hang_next_s})
        if isinstance(command, SetStorageFault | ClearStorageFault):
            from chaos.storage_faults import StorageFault

            if self.storage_faults is None:
                raise ConfigError("storage faults are not enabled in this pod")
            if isinstance(command, ClearStorageFault):
                self.storage_faults.clear()
            else:
                self.storage_faults.set(
                    StorageFault(command.error_rate, command.latency_ms,
                                 command.disconnect_rate, command.reply_loss_rate),
                    command.duration_s,
                )
            return Ok({"pod": self.config.pod_id})
        raise ConfigError(f"unsupported command {type(command).__name__}")

    def hang_next_step(self, hang_s: float | None = None) -> None:
        """Make the next step this pod starts hang (``hang_s``; None: an hour), a chaos fault.

        The step's execution timeout, if it has one, fails it; the leader
        revokes its claim after timeout + dead-after; without a timeout it
        holds its claim until the hang ends.
        """
        with self._lock:
            self._hang_next_s = HANG_DEFAULT_MS / 1000.0 if hang_s is None else hang_s
        log.warning("chaos: the next step will hang for %gs", self._hang_next_s)

    def _take_hang(self) -> Workload | None:
        if self._hang_next_s is None:  # the hot path: no lock taken
            return None
        with self._lock:
            hang_s, self._hang_next_s = self._hang_next_s, None
        return None if hang_s is None else Workload(f"hang:{hang_s * 1000:g}", "hang",
                                                    hang_s * 1000.0)

    def _set_fenced(self, fenced: bool) -> None:
        if fenced:
            self.fenced.set()
        else:
            self.fenced.clear()
            log.info("store reachable again: resuming")
        self._notify("on_fenced", fenced)

    # -- leadership -------------------------------------------------------

    def _election_loop(self) -> None:
        cfg = self.config
        t = cfg.timings
        next_renew = 0.0
        next_recovery = 0.0
        while not self.stopping.wait(min(t.renew_s, t.recovery_s, 0.1)):
            now = time.monotonic()
            try:
                if self.term is None:
                    if now >= next_renew and not self.fenced.is_set():
                        lease = self.store.acquire_leadership(cfg.pod_id, t.lease_s)
                        if lease is not None:
                            self._set_term(lease.term)
                            next_renew = now + t.renew_s
                            next_recovery = now
                        else:
                            # Try again right when the holder's lease runs out
                            # (DB time, as reported), not up to a renew period later.
                            holder = self.store.current_leader()
                            wait = holder.expires_in_s + 0.02 if holder else 0.05
                            next_renew = now + min(t.renew_s, _CANDIDATE_POLL_S,
                                                   max(0.02, wait))
                    continue
                if now >= next_renew:
                    next_renew = now + t.renew_s
                    if self.store.renew_leadership(cfg.pod_id, self.term, t.lease_s) is None:
                        log.warning("lost the leader lease of term %d", self.term)
                        self._set_term(None)
                        continue
                # A recorded exit (a certain death) is acted on at once, not
                # at the next pass: the probe is one cheap read, leader only.
                if self._recovery_may_judge(now) and (
                        now >= next_recovery or self.store.has_unmarked_exits()):
                    next_recovery = now + t.recovery_s
                    result = self.store.recover(cfg.pod_id, self.term, t.dead_after_s)
                    if result.marked_dead or result.requeued or result.dead_lettered:
                        log.info(
                            "recovery (term %d): dead pods %s, requeued %d, dead-lettered %d",
                            self.term, list(result.marked_dead), len(result.requeued),
                            len(result.dead_lettered),
                        )
            except NotLeader:
                log.warning("leader action refused: term %s is over", self.term)
                self._set_term(None)
            except StoreError as exc:
                log.warning("election/recovery error: %s", exc)

    def _recovery_may_judge(self, now: float) -> bool:
        """Whether silent heartbeats now mean dead pods, as far as this leader can tell.

        After this pod itself lost the store for longer than the dead
        threshold, every pod probably did too (a network cut, a store
        restart): their heartbeats are old because none could land, not
        because they died. Declaring them dead would revoke every claim in
        flight and spend an attempt on each step. So a leader judges only
        once its own heartbeats have landed again for two dead thresholds,
        which gives every live pod time to reconnect and heartbeat. This only
        delays recovery (liveness); who is dead is still decided in database
        time, fenced by the term.
        """
        dead_after = self.config.timings.dead_after_s
        return (now - self._last_heartbeat_ok <= dead_after
                and now - self._store_back_at >= 2 * dead_after)

    def _set_term(self, term: int | None) -> None:
        if term is not None:
            log.info("became leader, term %d", term)
        self.term = term
        self._notify("on_leadership", term)

    def _notify(self, method: str, *args: Any) -> None:
        for hook in self.hooks:
            try:
                getattr(hook, method)(*args)
            except Exception:
                log.exception("hook %s.%s failed", type(hook).__name__, method)
