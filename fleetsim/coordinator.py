"""The coordinator: starts the store, spawns and supervises the pods.

It is not in the data path: pods claim and complete steps through the store,
and keep doing so if the coordinator dies. Pods are separate OS processes
started fresh (``python -m fleetsim pod``), never forked from this one, in
their own session so a Ctrl-C in the terminal reaches only the coordinator,
which then stops them gracefully.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fleetsim.client_history import ClientHistory, NullHistory, history_dir
from fleetsim.config import FleetTimings, PodGroup
from fleetsim.errors import ConfigError, FleetNotRunning, FleetsimError
from fleetsim.pod_spawner import (
    SPAWN_MODES,
    ForkedPod,
    PodSpawner,
    fork_available,
    module_argv,
)
from fleetsim.rundir import (
    ProcessRecord,
    RunDir,
    coordinator_record,
    stop_processes,
)
from fleetsim.store import StepSpec, Store, StoreConfig, redact
from fleetsim.store.url import host_port, with_host_port

log = logging.getLogger("fleetsim.coordinator")

# How long a pod may take from spawn to registered-and-alive.
POD_READY_TIMEOUT_S = 30.0
_SUBMIT_CHUNK = 10_000
# How often the foreground coordinator looks for leader changes and recoveries.
WATCH_PERIOD_S = 0.25


@dataclass(frozen=True)
class FleetSpec:
    """What `fleetsim up` was asked to run."""

    run_dir: Path
    pods: int = 5
    concurrency: int = 1
    batch: int = 50
    workload: str = "noop"
    handlers: tuple[str, ...] = ()  # more handlers steps may name (pods' --handler)
    queues: tuple[str, ...] = ("default",)
    store_url: str | None = None  # None: an embedded PostgreSQL in the run directory
    schema: str = "fleetsim"
    seed: int = 0
    restart: bool = False
    timings: FleetTimings = field(default_factory=FleetTimings)
    steps: int = 0  # steps to submit at start
    rate: float = 0.0  # steps per second for those (0: all at once)
    fault_proxy: bool = True  # each pod reaches the store through its own fault proxy
    bus_host: str = "127.0.0.1"  # another address needs CURVE keys
    bus_keys: Path | None = None  # directory from `fleetsim keys generate`
    client_history: bool = True  # pods and the submitter keep client histories
    # Pod groups with their own workload, concurrency, batch and queues; when
    # given, ``pods`` must be their total and the per-pod fields above are
    # only the defaults of a pod outside every group (there is none).
    groups: tuple[PodGroup, ...] = ()
    metrics: bool = True  # pods send metrics; the coordinator writes metrics.jsonl
    metrics_port: int = 0  # a Prometheus endpoint on this port (0: none)
    metrics_host: str = "127.0.0.1"
    # "fork": pods are forked from a spawner process that imported a pod's
    # modules once (fleetsim.pod_spawner; 50 pods start in a third of the
    # time); "exec": each pod is a fresh `python -m fleetsim pod`.
    spawn: str = "fork"

    @property
    def submit_queue(self) -> str:
        """Where --steps go: the first queue named, else ``default``."""
        return next((q for q in self.queues if q != "*"), "default")

    def __post_init__(self) -> None:
        if not 1 <= self.pods <= 200:
            raise ConfigError(f"--pods must be between 1 and 200, got {self.pods}")
        if self.steps < 0:
            raise ConfigError("--steps must be >= 0")
        if self.rate < 0:
            raise ConfigError("--rate must be >= 0")
        if self.spawn not in SPAWN_MODES:
            raise ConfigError(f"--spawn must be fork or exec, got {self.spawn!r}")
        if self.groups and sum(g.pods for g in self.groups) != self.pods:
            raise ConfigError(f"the pod groups hold {sum(g.pods for g in self.groups)} pods, "
                              f"not {self.pods}")

    def group_of(self, pod_id: str) -> PodGroup | None:
        """The group of ``pod-N`` (groups number their pods in order), or None."""
        if not self.groups or not pod_id.startswith("pod-"):
            return None
        try:
            number = int(pod_id.removeprefix("pod-"))
        except ValueError:
            return None
        for group in self.groups:
            if number <= group.pods:
                return group
            number -= group.pods
        return None


@dataclass
class PodProcess:
    """A pod the coordinator spawned."""

    pod_id: str
    incarnation: int
    process: subprocess.Popen[bytes] | ForkedPod
    log_path: Path
    started_at: float
    ready_at: float | None = None
    exit_noticed: bool = False  # its exit was given to the store (or is being)

    @property
    def pid(self) -> int:
        """The pod's OS pid."""
        return self.process.pid


class Coordinator:
    """Runs one fleet: store, pods, supervision, graceful stop."""

    def __init__(self, spec: FleetSpec, echo: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.run_dir = RunDir(spec.run_dir)
        self.echo = echo or (lambda line: None)
        self.pods: dict[str, PodProcess] = {}
        self._spawned: set[str] = set()  # every pod id spawned, running or not
        self.store_url: str | None = None
        self.store: Store | None = None
        self.embedded: Any = None  # fleetsim.store.embedded.EmbeddedPostgres
        self.stopping = threading.Event()
        self.events: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._submitter: threading.Thread | None = None
        self._submit_history: ClientHistory = NullHistory()
        self.bus: Any = None  # fleetsim.bus_service.BusService
        self.bus_secret_file: Path | None = None  # the fleet's bus secret (0600)
        self.proxies: Any = None  # chaos.proxy_process.ProxyControl
        self.proxy_process: subprocess.Popen[bytes] | None = None
        self.pod_urls: dict[str, str] = {}
        self.injector: Any = None  # chaos.injector.FaultInjector
        self.scenario: Any = None  # chaos.runner.ScenarioRunner, the latest
        self._self_record: ProcessRecord | None = None  # this process, in children.json
        # What watch() last saw: the leader (pod, term), since when there has
        # been none, and the latest leader action already reported.
        self._leader_seen: tuple[str, int] | None = None
        self._leaderless_since: float | None = None
        self._actions_after: int | None = None
        self._watch_at = 0.0
        self.metrics: Any = None  # fleetsim.metrics_recorder.MetricsRecorder
        self.metrics_server: Any = None  # the Prometheus endpoint's HTTP server
        self.spawner: PodSpawner | None = None  # forks the pods (spec.spawn == "fork")
        self._spawner_lock = threading.Lock()

    # -- start ------------------------------------------------------------

    def start(self) -> None:
        """Start the store and the pods; return once every pod is ready.

        Refuses (ConfigError, before starting anything) while processes an
        earlier fleet of this run directory started still run, and (once the
        store is up) while live pods heartbeat in the schema.
        """
        spec = self.spec
        self.run_dir.ensure()
        self._refuse_if_running()
        self._self_record = ProcessRecord.of("coordinator", "coordinator", os.getpid())
        self.run_dir.record_child(self._self_record)
        try:
            if self.forks_pods:
                # Its imports overlap the store's start.
                self._start_spawner()
            self._start_store()
            self._refuse_live_schema()
            self._start_bus()
            self._start_metrics()
            if spec.fault_proxy:
                self._start_proxies()
            from chaos.injector import FaultInjector

            self.injector = FaultInjector(self, seed=spec.seed,
                                          log_path=self.run_dir.path / "faults.jsonl")
            self._write_run_file("starting")
            for index in range(1, spec.pods + 1):
                self._spawn(f"pod-{index}", incarnation=0)
            self._wait_ready(list(self.pods.values()))
            self._write_run_file("ready")
            if spec.steps:
                self._submit_history = ClientHistory.for_submitter(self.client_history_dir)
                self._submitter = threading.Thread(
                    target=self._submit_steps, name="submitter", daemon=True
                )
                self._submitter.start()
        except BaseException:
            self.stop(grace_s=2.0)
            raise

    def _refuse_if_running(self) -> None:
        """ConfigError if a fleet (or what is left of one) runs in this run directory."""
        try:
            existing = self.run_dir.read()
        except FleetsimError:
            existing = {}  # none, or unreadable: a stale file this start replaces
        coordinator = coordinator_record(existing) if existing else None
        me = os.getpid()
        if coordinator is not None and coordinator.pid != me and coordinator.is_running():
            raise ConfigError(
                f"a fleet is already running in {self.run_dir.path} (coordinator pid "
                f"{coordinator.pid}); stop it with `fleetsim down` or use another --run-dir"
            )
        left = [c for c in self.run_dir.live_children() if c.pid != me]
        if left:
            raise ConfigError(
                f"processes an earlier fleet started in {self.run_dir.path} still run "
                f"({describe_processes(left)}); stop them with `fleetsim down` "
                "(nothing was started)"
            )

    def _refuse_live_schema(self) -> None:
        """ConfigError if pods of another fleet heartbeat in our schema.

        Only the ids a coordinator spawns (``pod-<n>``) count: pods that
        joined from elsewhere (``fleetsim pod``, pod containers) go on
        working while a coordinator restarts, and a coordinator that just
        died leaves its pods' heartbeats fresh for a moment, so they get
        until they are stale before the schema counts as taken.
        """
        assert self.store is not None and self.store_url is not None
        timings = self.spec.timings
        deadline = time.monotonic() + timings.dead_after_s + timings.heartbeat_s
        while True:
            live = sorted(
                (p["id"] for p in self.store.pods()
                 if p["state"] == "alive" and p["heartbeat_age_s"] < timings.dead_after_s
                 and SPAWNED_POD_ID.fullmatch(p["id"])),
                key=pod_sort_key,
            )
            if not live or time.monotonic() > deadline:
                break
            time.sleep(timings.heartbeat_s / 2)
        if live:
            shown = ", ".join(live[:5]) + (f" and {len(live) - 5} more" if len(live) > 5 else "")
            raise ConfigError(
                f"schema {self.spec.schema} of {redact(self.store_url)} is in use by a live "
                f"fleet (pods {shown} heartbeat within {timings.dead_after_s:g}s): stop it "
                "with `fleetsim down` in its run directory, or use another --schema"
            )

    def _start_store(self) -> None:
        spec = self.spec
        if spec.store_url:
            url = spec.store_url
        else:
            from fleetsim.store.embedded import EmbeddedPostgres, max_connections_for

            # Recorded before it starts: `down` must find it if we die half-way.
            self.run_dir.record_child(ProcessRecord.store(self.run_dir.pgdata))
            self.embedded = EmbeddedPostgres(self.run_dir.pgdata,
                                             max_connections=max_connections_for(spec.pods))
            self.echo(f"store: starting embedded PostgreSQL in {self.run_dir.pgdata}")
            url = self.embedded.start()
        self.store_url = url
        self.store = Store(StoreConfig(url, schema=spec.schema, application_name="coordinator"))
        self.store.ping()
        self.store.init_schema()
        self.echo(f"store: {redact(url)} (schema {spec.schema})")
        self._fresh_client_histories()

    @property
    def client_history_dir(self) -> Path:
        """Where this fleet's pods and submitter keep their client histories."""
        return history_dir(self.run_dir.path, self.spec.schema)

    def _fresh_client_histories(self) -> None:
        """Set aside client histories that belong to an earlier store under this schema.

        A store with no pod ever registered is new (or was reset): histories
        left from before would name steps it never had.
        """
        assert self.store is not None
        folder = self.client_history_dir
        if folder.is_dir() and any(folder.iterdir()) and self.store.pod_counts()[1] == 0:
            folder.rename(folder.with_name(f"{folder.name}.old-{int(time.time())}"))

    def _start_bus(self) -> None:
        from fleetsim.bus.security import BUS_SECRET_FILE, create_secret
        from fleetsim.bus_service import BusService

        keys = None
        if self.spec.bus_keys is not None:
            from fleetsim.bus.security import load_server_keys

            keys = load_server_keys(self.spec.bus_keys)
        # A fresh secret per fleet: every bus message must be signed with it.
        self.bus_secret_file = self.run_dir.path / BUS_SECRET_FILE
        secret = create_secret(self.bus_secret_file)
        self.bus = BusService(
            on_chaos=self.chaos,
            on_status=self.status,
            on_down=self.stopping.set,
            host=self.spec.bus_host, keys=keys, secret=secret,
        )
        endpoints = self.bus.start_and_wait()
        self.echo(f"bus: control {endpoints.control}, cli {endpoints.cli}")

    def _start_metrics(self) -> None:
        """The metrics.jsonl recorder and, with a port, the Prometheus endpoint."""
        if not self.spec.metrics:
            return
        from fleetsim.metrics import metrics_path
        from fleetsim.metrics_recorder import MetricsRecorder

        assert self.store_url is not None
        url, schema = self.store_url, self.spec.schema
        self.metrics = MetricsRecorder(
            metrics_path(self.run_dir.path), lambda: dict(self.bus.metrics),
            # A connection of its own: a slow store delays only the store lines.
            lambda: Store(StoreConfig(url, schema=schema, pool_size=1, statement_timeout_s=5.0,
                                      application_name="coordinator-metrics")),
            helpers=self._helper_pids)
        self.metrics.start()
        if self.spec.metrics_port:
            from fleetsim.prometheus import serve

            self.metrics_server = serve(self.metrics.figures, self.spec.metrics_port,
                                        self.spec.metrics_host)
            self.echo(f"metrics: http://{self.spec.metrics_host}:{self.spec.metrics_port}"
                      "/metrics")

    def _helper_pids(self) -> dict[str, int]:
        """The fleet's processes besides the pods and this one, for the metrics series."""
        helpers = {}
        if self.proxy_process is not None:
            helpers["fault-proxy"] = self.proxy_process.pid
        if self.spawner is not None and not self.spawner.gone:
            helpers["pod-spawner"] = self.spawner.process.pid
        return helpers

    def _start_proxies(self) -> None:
        from chaos.proxy_process import ProxyControl

        assert self.store_url is not None
        target = host_port(self.store_url)
        if target is None:
            raise ConfigError("the fault proxy needs a TCP store URL (host:port), not a socket;"
                              " use --no-fault-proxy")
        ready = self.run_dir.path / "proxy.json"
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "chaos.proxy_process", "--ready-file", str(ready)]
        with open(self.run_dir.logs / "proxy.log", "ab") as out:
            self.proxy_process = spawn_recorded(
                self.run_dir, "proxy", "fault-proxy", argv,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while not ready.exists():
            if self.proxy_process.poll() is not None or time.monotonic() > deadline:
                raise FleetsimError(f"the fault proxy did not start: "
                                    f"{last_line(self.run_dir.logs / 'proxy.log')}")
            time.sleep(0.02)
        import json

        self.proxies = ProxyControl(json.loads(ready.read_text())["endpoint"])
        self._proxy_target = target

    def _pod_store_url(self, pod_id: str) -> str:
        assert self.store_url is not None
        if self.proxies is None:
            return self.store_url
        if pod_id not in self.pod_urls:
            host, port = self._proxy_target
            proxy_port = self.proxies.request(op="add", name=pod_id, host=host, port=port)["port"]
            self.pod_urls[pod_id] = with_host_port(self.store_url, "127.0.0.1", proxy_port)
        return self.pod_urls[pod_id]

    # -- chaos ------------------------------------------------------------

    def chaos(self, request: Any) -> dict[str, Any]:
        """Handle a ChaosRequest from the bus: one action, or start a scenario."""
        if request.action == "run-scenario":
            return self.run_scenario(request.target, request.params.get("seed"))
        result: dict[str, Any] = self.injector.apply(request.action, request.target,
                                                     request.params)
        if self.bus is not None:
            self.bus.publish("fault.applied", **result)
        return result

    def run_scenario(self, spec: Any, seed: int | None = None,
                     schedule: list[Any] | None = None) -> dict[str, Any]:
        """Start a scenario (a packaged name, a .toml path, or a parsed Scenario) in the
        background; ``schedule`` (planned faults) replaces the one its seed gives (a replay).
        """
        from chaos.runner import ScenarioRunner
        from chaos.scenario import find_scenario

        if not spec:
            raise ConfigError("name a scenario (see `fleetsim chaos list`)")
        if self.scenario is not None and not self.scenario.done.is_set():
            raise ConfigError(f"scenario {self.scenario.scenario.name!r} is still running")
        scenario = find_scenario(spec) if isinstance(spec, str) else spec
        # An explicit seed wins, then the scenario file's, then the fleet's.
        if seed is None:
            seed = scenario.seed if scenario.seed is not None else self.spec.seed
        used_seed = scenario.effective_seed(seed)
        runner = ScenarioRunner(
            scenario, used_seed, self.injector,
            pods=self.injector.faultable_pods,
            leader=lambda: (lead[0] if (lead := self.leader()) else None),
            log_path=self.run_dir.path / "faults.jsonl", stopping=self.stopping,
        )
        if schedule is not None:
            runner.schedule = schedule
        self.scenario = runner
        runner.start()
        return {"action": "run-scenario", "scenario": scenario.name, "seed": used_seed,
                "duration_s": scenario.duration_s, "faults": len(runner.schedule),
                "log": str(self.run_dir.path / "faults.jsonl")}

    # -- what chaos needs (chaos.injector.Fleet) ----------------------------

    def pod_pids(self) -> dict[str, int]:
        """Pods this coordinator runs, with their pids."""
        with self._lock:
            return {pod_id: pod.pid for pod_id, pod in self.pods.items()}

    def pod_hosts(self) -> dict[str, str]:
        """The host name of every pod the store has alive (for pods in containers)."""
        if self.store is None:
            return {}
        try:
            return self.store.alive_pod_hosts()
        except FleetsimError:  # a chaos action on our own pods must not need the store
            return {}

    def pod_registration(self, pod_id: str) -> tuple[int, int | None] | None:
        """(incarnation, pid) of the pod's live registration in the store, or None."""
        if self.store is None:
            return None
        return self.store.alive_registrations().get(pod_id)

    def record_remote_exit(self, pod_id: str, incarnation: int, pid: int | None, *,
                           returncode: int | None = None) -> bool:
        """Record the certain death of a pod this coordinator did not spawn but
        saw die (the engine killed its container and saw it stop); see
        :meth:`_record_exit`. True if recorded."""
        if self.store is None or self.stopping.is_set():
            return False
        record = self.store.record_exit(pod_id, incarnation, pid, returncode=returncode)
        if record.recorded:
            self._event("pod.exit_recorded", pod=pod_id, incarnation=incarnation,
                        ended_term=record.ended_term, backends=record.backends)
        return record.recorded

    def remote_pods(self) -> list[str]:
        """Pods on the bus that this coordinator did not spawn (`fleetsim pod --join`)."""
        if self.bus is None:
            return []
        with self._lock:
            # A child of ours that died (and was reaped) is still heard for a
            # few seconds: it is not a remote pod.
            ours = set(self._spawned)
        return [p for p in self.bus.connected_pods() if p not in ours]

    def known_pods(self) -> list[str]:
        """Every pod id this coordinator has spawned, running or not."""
        with self._lock:
            return sorted(self._spawned, key=pod_sort_key)

    def leader(self) -> tuple[str, int] | None:
        """(pod id, term) of the current leader."""
        assert self.store is not None
        lease = self.store.current_leader()
        return (lease.holder, lease.term) if lease else None

    def send_command(self, pod_id: str, command: Any) -> Any:
        """A bus command to one pod; returns its reply."""
        return self.bus.send_command(pod_id, command)

    def set_proxy_fault(self, pod_id: str, mode: str | None) -> None:
        """Partition (mode) or heal (None) a pod's path to the store."""
        if self.proxies is None:
            raise ConfigError("this fleet runs without fault proxies (--no-fault-proxy): "
                              "store partitions are unavailable")
        if mode is None:
            self.proxies.request(op="heal", name=pod_id)
        else:
            self.proxies.request(op="set_fault", name=pod_id, mode=mode)

    def restart_store(self) -> dict[str, Any]:
        """Restart the embedded PostgreSQL (an external one is not ours to restart)."""
        if self.embedded is None:
            raise ConfigError("store-restart restarts the embedded PostgreSQL only; this fleet "
                              "uses an external store (restart it with your own tools)")
        old_pid = self.embedded.pid
        started = time.monotonic()
        self.embedded.restart()
        return {"old_pid": old_pid, "new_pid": self.embedded.pid,
                "downtime_s": round(time.monotonic() - started, 3)}

    def status(self) -> dict[str, Any]:
        """The status document, plus what only the coordinator knows."""
        from fleetsim.status import status_data

        assert self.store is not None
        with self._lock:
            ours = [{"id": pod_id} for pod_id in self.pods]
        data = status_data(self.store, {"pods": ours, "queues": list(self.spec.queues)})
        data["coordinator"] = {
            "pid": os.getpid(),
            "bus_pods": self.bus.connected_pods() if self.bus else [],
            "malformed_messages": self.bus.malformed if self.bus else 0,
            "refused_messages": self.bus.refused if self.bus else 0,
        }
        return data

    def pod_command(self, pod_id: str, incarnation: int) -> list[str]:
        """The command line of one pod (the store URL goes in the environment)."""
        spec, t = self.spec, self.spec.timings
        group = spec.group_of(pod_id)
        workload = group.workload if group else spec.workload
        concurrency = group.concurrency if group else spec.concurrency
        batch = group.batch if group else spec.batch
        cmd = [
            sys.executable, "-m", "fleetsim", "pod",
            "--id", pod_id, "--incarnation", str(incarnation),
            "--schema", spec.schema, "--workload", workload,
            "--concurrency", str(concurrency), "--batch", str(batch),
            "--seed", str(spec.seed),
            "--heartbeat", str(t.heartbeat_s), "--lease", str(t.lease_s),
            "--renew", str(t.renew_s), "--dead-after", str(t.dead_after_s),
            "--recovery", str(t.recovery_s), "--grace", str(t.grace_s),
        ]
        for queue in group.queues if group else spec.queues:
            cmd += ["--queue", queue]
        if spec.client_history:
            cmd += ["--client-history", str(self.client_history_dir)]
        for handler in spec.handlers:
            cmd += ["--handler", handler]
        if (self.bus is not None and self.bus.endpoints is not None
                and self.bus_secret_file is not None):
            cmd += ["--join", self.bus.endpoints.control,
                    "--bus-secret-file", str(self.bus_secret_file.resolve())]
            if spec.metrics:
                cmd += ["--metrics-endpoint", self.bus.endpoints.metrics]
            if spec.bus_keys is not None:
                cmd += ["--bus-keys", str(spec.bus_keys.resolve())]
        return cmd

    def _spawn(self, pod_id: str, incarnation: int) -> PodProcess:
        assert self.store_url is not None
        log_path = self.run_dir.logs / f"{pod_id}.log"
        env = dict(os.environ)
        # Never on the command line, where `ps` would show a password.
        env["FLEETSIM_STORE"] = self._pod_store_url(pod_id)
        env["PYTHONUNBUFFERED"] = "1"
        argv = self.pod_command(pod_id, incarnation)
        process: subprocess.Popen[bytes] | ForkedPod
        if self.forks_pods and module_argv(argv) is not None:
            process = self._fork_pod(pod_id, argv, env, log_path)
        else:
            out: IO[bytes]
            with open(log_path, "ab") as out:
                # Recorded before it runs (not when ready): `down` must find it if we die now.
                process = spawn_recorded(
                    self.run_dir, "pod", pod_id, argv,
                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                )
        pod = PodProcess(pod_id, incarnation, process, log_path, time.monotonic())
        with self._lock:
            self.pods[pod_id] = pod
            self._spawned.add(pod_id)
        threading.Thread(target=self._watch_exit, args=(pod,), daemon=True,
                         name=f"exit-{pod_id}").start()
        self._event("pod.started", pod=pod_id, pid=process.pid, incarnation=incarnation)
        return pod

    @property
    def forks_pods(self) -> bool:
        """Whether pods are forked by the pod-spawner (asked for, and possible here)."""
        return self.spec.spawn == "fork" and fork_available()

    def _start_spawner(self) -> PodSpawner:
        """Start the process the pods are forked from (recorded, like every child)."""
        def start(argv: list[str], fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
            with open(self.run_dir.logs / "pod-spawner.log", "ab") as out:
                return spawn_recorded(self.run_dir, "spawner", "pod-spawner", argv,
                                      stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True, pass_fds=fds)

        self.spawner = PodSpawner(start)
        return self.spawner

    def _fork_pod(self, pod_id: str, argv: list[str], env: dict[str, str],
                  log_path: Path) -> ForkedPod:
        """A pod forked by the spawner, recorded in children.json before it runs."""
        with self._spawner_lock:
            spawner = self.spawner
            if spawner is None or spawner.gone:
                if spawner is not None:
                    log.warning("the pod spawner is gone; starting another")
                spawner = self._start_spawner()
            child = spawner.spawn(argv, env, log_path)
        try:
            # The command line as /proc shows it (the child set it, and waits).
            self.run_dir.record_child(ProcessRecord.of("pod", pod_id, child.pid))
            spawner.release(child)
        except BaseException:
            spawner.cancel(child)
            raise
        return child

    def _wait_ready(self, pods: list[PodProcess], timeout_s: float = POD_READY_TIMEOUT_S) -> None:
        assert self.store is not None
        deadline = time.monotonic() + timeout_s
        waiting = {p.pod_id: p for p in pods}
        while waiting:
            for pod_id, pod in list(waiting.items()):
                code = pod.process.poll()
                if code is not None:
                    raise FleetsimError(
                        f"{pod_id} exited during start ({describe_returncode(code)}): "
                        f"{last_line(pod.log_path)}"
                    )
            # The registrations only, not store.pods() and its counts: this
            # runs every 50 ms while 50 pods start on the same cores.
            alive = self.store.alive_registrations()
            on_bus = set(self.bus.connected_pods()) if self.bus is not None else None
            for pod_id, pod in list(waiting.items()):
                # Ready: registered in the store, and reachable for chaos over the bus.
                if (alive.get(pod_id) == (pod.incarnation, pod.pid)
                        and (on_bus is None or pod_id in on_bus)):
                    pod.ready_at = time.monotonic()
                    self.echo(
                        f"{pod_id}: pid {pod.pid}, incarnation {pod.incarnation}, ready in "
                        f"{pod.ready_at - pod.started_at:.2f}s"
                    )
                    del waiting[pod_id]
            if waiting and time.monotonic() > deadline:
                raise FleetsimError(
                    f"pods not ready after {timeout_s:.0f}s: {', '.join(sorted(waiting))}"
                )
            if waiting:
                time.sleep(0.05)

    def _submit_steps(self) -> None:
        assert self.store is not None
        spec = self.spec
        left = spec.steps
        # Steps carry no workload of their own: the pods' --workload applies.
        payload: dict[str, object] = {}
        chunk = _SUBMIT_CHUNK if spec.rate <= 0 else max(1, int(spec.rate / 10))
        next_at = time.monotonic()
        while left > 0 and not self.stopping.is_set():
            n = min(chunk, left)
            try:
                ids = self.store.submit_many([StepSpec(spec.submit_queue, payload)] * n)
                self._submit_history.submitted(spec.submit_queue, ids)
            except FleetsimError as exc:
                log.warning("submit failed: %s", exc)
                self.stopping.wait(1.0)
                continue
            left -= n
            if spec.rate > 0:
                next_at += n / spec.rate
                self.stopping.wait(max(0.0, next_at - time.monotonic()))

    # -- supervise --------------------------------------------------------

    def poll(self) -> list[tuple[str, int]]:
        """Reap exited pods, respawn them if ``restart``; return (pod, returncode) exits."""
        exits = []
        with self._lock:
            for pod_id, pod in list(self.pods.items()):
                code = pod.process.poll()
                if code is None:
                    continue
                exits.append((pod_id, code))
                if self._leader_seen is not None and self._leader_seen[0] == pod_id:
                    # The leader died: from now on the fleet has none (its
                    # lease outlives it, but nobody acts under it).
                    self._leaderless_since = time.monotonic()
                self._event("pod.exited", pod=pod_id, pid=pod.pid, returncode=code,
                            reason=describe_returncode(code))
                del self.pods[pod_id]
                # Before a restart registers the next incarnation (which the
                # record is fenced against anyway), unless _watch_exit did.
                self._record_exit(pod, code)
                # A pod that left because another live process owns its id
                # (superseded, or refused at registration) is not restarted:
                # a new incarnation would take the id from its rightful owner.
                if (self.spec.restart and not self.stopping.is_set()
                        and code not in _NOT_RESTARTED):
                    new = self._spawn(pod_id, pod.incarnation + 1)
                    self.echo(f"{pod_id}: {describe_returncode(code)}; restarted as "
                              f"incarnation {new.incarnation} (pid {new.pid})")
                else:
                    self.echo(f"{pod_id}: {describe_returncode(code)}")
            if exits:
                self._write_run_file("ready")
        return exits

    def _watch_exit(self, pod: PodProcess) -> None:
        """Record a pod's death the moment its process ends (a thread per pod).

        poll() reaps and restarts at its callers' pace (0.05 to 0.25 s);
        this waits for the exit itself, without reaping it (WNOWAIT), so
        the store learns of it within milliseconds.
        """
        if isinstance(pod.process, ForkedPod):
            # The spawner, its parent, reaps it and reports at once.
            self._record_exit(pod, pod.process.wait())
            return
        try:
            info = os.waitid(os.P_PID, pod.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:  # already reaped: poll() records it
            return
        if info is None:
            return
        killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
        self._record_exit(pod, -info.si_status if killed else info.si_status)

    def _record_exit(self, pod: PodProcess, code: int) -> None:
        """Tell the store a pod process is gone (it exited: a certain death).

        Its lease is freed and its death recorded at once, fenced by its
        incarnation and pid (Store.record_exit), instead of waiting for the
        lease and the dead threshold to run out. If that fails (the store
        away, a pooler, no right to terminate backends) nothing is lost: the
        pod's silence gives it away as before, only later. Once per process.
        """
        with self._lock:
            if pod.exit_noticed:
                return
            pod.exit_noticed = True
        if self.store is None or self.stopping.is_set():
            return
        try:
            record = self.store.record_exit(pod.pod_id, pod.incarnation, pod.pid,
                                            returncode=code)
        except FleetsimError as exc:
            log.warning("%s exited; its death is left to the dead threshold: %s",
                        pod.pod_id, exc)
            return
        if record.recorded:
            self._event("pod.exit_recorded", pod=pod.pod_id, incarnation=pod.incarnation,
                        ended_term=record.ended_term, backends=record.backends)

    def run_forever(self, on_tick: Callable[[], None] | None = None, tick_s: float = 0.2) -> None:
        """Supervise until ``stopping`` is set (by a signal or a command)."""
        while not self.stopping.wait(tick_s):
            self.poll()
            self.watch()
            if on_tick is not None:
                on_tick()

    def watch(self) -> None:
        """Echo leader changes and recoveries as events (polled, every WATCH_PERIOD_S).

        ``leader: pod-2 (term 3) after 2.4 s without a leader`` (the time from
        the old leader's death, or from the lease lapsing, to the new term),
        and ``recovered 50 steps of pod-3`` for each dead pod whose claims a
        leader requeued or dead-lettered. A store that does not answer is
        skipped: the status line says so.
        """
        from fleetsim.store.fleet_events import last_leader_action, recoveries_after

        now = time.monotonic()
        if self.store is None or now < self._watch_at:
            return
        self._watch_at = now + WATCH_PERIOD_S
        try:
            lease = self.store.current_leader()
            if self._actions_after is None:  # the first look: report only what follows
                self._actions_after = last_leader_action(self.store)
                recovered = []
            else:
                recovered = recoveries_after(self.store, self._actions_after)
        except FleetsimError:
            return
        if lease is None:
            if self._leaderless_since is None:
                self._leaderless_since = now
        elif self._leader_seen is None or lease.term != self._leader_seen[1]:
            gap = None if self._leaderless_since is None else now - self._leaderless_since
            if self._leader_seen is not None or gap is not None:
                self.echo(f"leader: {lease.holder} (term {lease.term})"
                          + (f" after {gap:.1f} s without a leader" if gap is not None else ""))
            self._event("leader.elected", pod=lease.holder, term=lease.term,
                        leaderless_s=None if gap is None else round(gap, 3))
            self._leaderless_since = None
        if lease is not None:
            self._leader_seen = (lease.holder, lease.term)
        for batch in recovered:
            self._actions_after = max(self._actions_after or 0, batch.last_id)
            line = (f"recovered {batch.steps} step{'s' if batch.steps != 1 else ''} "
                    f"of {batch.pod or 'a dead pod'}")
            if batch.dead_lettered:
                line += (f" ({batch.requeued} requeued, {batch.dead_lettered} to the "
                         "dead-letter queue)")
            self.echo(line)
            self._event("steps.recovered", pod=batch.pod, term=batch.term,
                        requeued=batch.requeued, dead_lettered=batch.dead_lettered)

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT / SIGHUP stop the fleet gracefully."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stopping.set())

    # -- stop -------------------------------------------------------------

    def stop(self, grace_s: float | None = None) -> None:
        """Stop every pod gracefully (SIGKILL after the grace period), then the store."""
        self.stopping.set()
        stop_started = time.time()
        grace = self.spec.timings.grace_s if grace_s is None else grace_s
        if self.injector is not None:
            self.injector.heal_all()  # a paused pod cannot handle SIGTERM
        with self._lock:
            pods = list(self.pods.values())
        for pod in pods:
            if pod.process.poll() is None:
                pod.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 2.0
        for pod in pods:
            try:
                pod.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within the grace period: killing it", pod.pod_id)
                pod.process.kill()
                pod.process.wait()
        with self._lock:
            self.pods.clear()
        if self.metrics is not None:
            # A pod stopping gracefully sends its last snapshot before it exits:
            # wait (briefly) until the bus has it, so the final sample does.
            if self.bus is not None:
                graceful = {p.pod_id for p in pods if p.process.returncode == 0}
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline and any(
                        self.bus.metrics.get(pod_id, {}).get("ts", 0.0) < stop_started
                        for pod_id in graceful):
                    time.sleep(0.02)
            self.metrics.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        if self.bus is not None:
            self.bus.stop()
        if self.proxies is not None:
            with contextlib.suppress(FleetsimError):
                self.proxies.request(op="shutdown")
            self.proxies.close()
        if self.proxy_process is not None:
            try:
                self.proxy_process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proxy_process.kill()
                self.proxy_process.wait()
        if self.spawner is not None:
            self.spawner.close()
        if self._submitter is not None:
            self._submitter.join(timeout=5)
        self._submit_history.close()
        if self.store is not None:
            self.store.close()
        if self.embedded is not None:
            self.echo("store: stopping embedded PostgreSQL")
            self.embedded.stop()
        self.run_dir.remove_run_file()
        stopped = [ProcessRecord.store(self.run_dir.pgdata)] if self.embedded is not None else []
        if self._self_record is not None:
            stopped.append(self._self_record)
        # Forgets what stopped; whatever still runs stays recorded for `down`.
        with contextlib.suppress(FleetsimError):
            self.run_dir.forget_children(stopped)

    # -- state ------------------------------------------------------------

    def _event(self, topic: str, **data: Any) -> None:
        self.events.append({"topic": topic, "ts": time.time(), **data})
        log.info("%s %s", topic, data)

    def _write_run_file(self, state: str) -> None:
        with self._lock:
            pods = [
                {"id": p.pod_id, "pid": p.pid, "incarnation": p.incarnation}
                for p in sorted(self.pods.values(), key=lambda p: pod_sort_key(p.pod_id))
            ]
        self.run_dir.write({
            "version": 1,
            "state": state,
            "coordinator_pid": os.getpid(),
            "coordinator": self._self_record.to_dict() if self._self_record else None,
            "store_url": self.store_url,
            "schema": self.spec.schema,
            "embedded": self.embedded is not None,
            "pgdata": str(self.run_dir.pgdata) if self.embedded is not None else None,
            "timings": self.spec.timings.to_dict(),
            "workload": self.spec.workload,
            "handlers": list(self.spec.handlers),
            "queues": list(self.spec.queues),
            "restart": self.spec.restart,
            "pods": pods,
            "bus": self.bus.endpoints.to_dict() if self.bus and self.bus.endpoints else None,
            "bus_secret_file": (str(self.bus_secret_file.resolve())
                                if self.bus_secret_file is not None else None),
            "proxy_pid": self.proxy_process.pid if self.proxy_process else None,
            "bus_keys": str(self.spec.bus_keys.resolve()) if self.spec.bus_keys else None,
        })


# Holds a spawned child until its parent has recorded it, then becomes the
# child (exec keeps the pid and the start time). If the parent dies first,
# the read sees end of file and the child exits without ever running.
_SPAWN_GATE = 'read -r _ || exit 0; exec "$0" "$@" </dev/null'


def spawn_recorded(run_dir: RunDir, kind: str, name: str, argv: list[str],
                   **popen: Any) -> subprocess.Popen[bytes]:
    """Spawn ``argv`` and record it in ``children.json`` before it starts running.

    A coordinator SIGKILLed at any moment of a spawn leaves either a child
    that is recorded, or none: ``/bin/sh`` waits on a pipe for the go-ahead
    sent once the record is written, then execs ``argv`` (whose command line
    is the one recorded).
    """
    process = subprocess.Popen(["/bin/sh", "-c", _SPAWN_GATE, *argv],
                               stdin=subprocess.PIPE, **popen)
    assert process.stdin is not None
    try:
        run_dir.record_child(ProcessRecord.of(kind, name, process.pid, argv))
        process.stdin.write(b"go\n")
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        with contextlib.suppress(OSError):
            process.stdin.close()
    return process


# Pod exits that are not restarted: SUPERSEDED (4) and ID_IN_USE (5) of
# pods/exitcodes.py (the coordinator does not import the pod package).
_NOT_RESTARTED = frozenset({4, 5})


# The ids a coordinator gives the pods it spawns.
SPAWNED_POD_ID = re.compile(r"pod-\d+")


def pod_sort_key(pod_id: str) -> tuple[str, int]:
    """Sort pod-2 before pod-10."""
    prefix, _, number = pod_id.rpartition("-")
    return (prefix, int(number)) if number.isdigit() else (pod_id, 0)


def describe_returncode(code: int) -> str:
    """How a pod ended, from its return code (see pods.exitcodes)."""
    names = {0: "stopped", 1: "crashed", 2: "bad config", 3: "store unreachable",
             4: "superseded"}
    if code < 0:
        return "killed (SIGKILL)" if code == -signal.SIGKILL else f"killed by signal {-code}"
    return names.get(code, f"exit {code}")


def last_line(path: Path) -> str:
    """The last non-empty line of a log file (for one-line errors)."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"


def describe_processes(records: list[ProcessRecord]) -> str:
    """``coordinator pid 12, embedded PostgreSQL, pod-1 pid 14`` for messages."""
    return ", ".join(r.name if r.pid is None else f"{r.name} pid {r.pid}" for r in records)


def stop_detached_fleet(run_dir: RunDir, timeout_s: float = 60.0) -> dict[str, Any]:
    """Stop the fleet of another process (`fleetsim down`); stop its leftovers too.

    Signals only processes recorded at spawn whose create time and command
    line still match (:meth:`ProcessRecord.is_running`): a coordinator pid
    in ``run.json`` that is some other process now is left alone, and said
    so. Then every recorded child still running (pods spawned before the
    coordinator died, the fault proxy, pods of an earlier ``up``) gets
    SIGTERM, then SIGKILL after the grace period; the embedded server is
    stopped cleanly (``pg_ctl stop -m fast``).
    """
    invalid: str | None = None
    data: dict[str, Any] | None
    try:
        data = run_dir.read()
    except FleetNotRunning:
        data = None
    except ConfigError as exc:
        data, invalid = None, str(exc)
    result: dict[str, Any] = {
        "coordinator_pid": data["coordinator_pid"] if data else None,
        "coordinator": None, "killed": [], "proxy_stopped": False, "store_stopped": False,
        "stale_run_file": None,
    }
    try:
        children = run_dir.children()
    except ConfigError as exc:
        if data is None:
            raise ConfigError(f"{exc}; nothing was signalled") from None
        children = []
    if data is None and not any(c.is_running() for c in children):
        if invalid is not None:
            raise ConfigError(f"{invalid}; nothing was signalled (remove it if no fleet runs)")
        raise FleetNotRunning(f"no fleet in {run_dir.path} (start one with `fleetsim up`)")

    if data is not None:
        coordinator = coordinator_record(data)
        if coordinator is not None and coordinator.signal(signal.SIGTERM):
            result["coordinator"] = "stopped"
            deadline = time.monotonic() + timeout_s
            while coordinator.is_running() and time.monotonic() < deadline:
                time.sleep(0.1)
            if coordinator.signal(signal.SIGKILL):
                log.warning("the coordinator did not stop within %.0fs: killed it", timeout_s)
                result["coordinator"] = "killed"
        elif psutil_pid_exists(data["coordinator_pid"]):
            result["coordinator"] = "stale"
            result["stale_run_file"] = (
                f"{run_dir.run_file} is stale: its coordinator pid {data['coordinator_pid']} "
                "is not this fleet's coordinator; nothing was signalled for it")
        else:
            result["coordinator"] = "gone"
    elif invalid is not None:
        result["stale_run_file"] = f"{invalid}; ignored it"

    # What the coordinator did not stop (it crashed, or died while starting).
    grace = 10.0
    if data is not None and isinstance(data.get("timings"), dict):
        value = data["timings"].get("grace_s")
        if isinstance(value, int | float) and not isinstance(value, bool):
            grace = float(value)
    with contextlib.suppress(ConfigError):
        children = run_dir.children()  # again: the coordinator may have forgotten some
    others = [c for c in children if c.kind in ("pod", "proxy", "spawner", "coordinator")]
    stopped = stop_processes(others, grace_s=min(grace + 2.0, max(timeout_s, 1.0)))
    result["killed"] = [r.name for r in stopped if r.kind == "pod"]
    result["proxy_stopped"] = any(r.kind == "proxy" for r in stopped)
    for record in children:
        if record.kind == "store" and record.is_running():
            from fleetsim.store.embedded import EmbeddedPostgres

            assert record.pgdata is not None
            EmbeddedPostgres(Path(record.pgdata)).stop()
            result["store_stopped"] = True
    run_dir.forget_children([c for c in children if not c.is_running()])
    run_dir.remove_run_file()
    return result


def psutil_pid_exists(pid: int) -> bool:
    """Whether some process has ``pid`` (whatever it is)."""
    import psutil

    return bool(psutil.pid_exists(pid))


__all__ = [
    "Coordinator",
    "FleetSpec",
    "PodProcess",
    "describe_returncode",
    "stop_detached_fleet",
]
