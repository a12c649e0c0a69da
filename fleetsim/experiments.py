"""Running experiments: one verified run, its replay record and its failure bundle.

:func:`run_experiment` is ``fleetsim run``'s engine: start a fleet (pod
groups and all), make the queues, submit the load (a seeded mix, at once or
at a fixed rate) while the fault schedule runs, wait until drained, judge
with the checker, evaluate the thresholds, stop. Like the coordinator it is
glue: it reaches ``chaos`` and ``pods`` lazily.

Every run leaves ``<run dir>/runs/<schema>/replay.json``: the experiment
text and the settings as resolved, the seed, the fault schedule as applied
(targets resolved to pod ids), the pods and their incarnations, the verdict
and the thresholds. ``fleetsim replay`` runs it again from that record. A
run that fails (invalid, a threshold failed, not drained in time) also
leaves ``<run dir>/failures/<schema>/``: the pod logs, the coordinator's
lines, ``faults.jsonl``, the history export, the checker's witnesses, the
client histories, the metrics series (``metrics.jsonl``, if the fleet
wrote one), the record, and ``README.txt`` with the command that replays
it.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import shlex
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fleetsim.config import FleetTimings, PodGroup
from fleetsim.errors import ConfigError, FleetsimError, StoreUnavailable
from fleetsim.store import QueueConfig, Store, redact_argv
from fleetsim.thresholds import evaluate
from fleetsim.trends import threshold_figures

__all__ = [
    "RECORD_FILE",
    "NotDrained",
    "RunPlan",
    "find_record",
    "flat_figures",
    "fleet_spec",
    "packaged_text",
    "replayed_schedule",
    "run_experiment",
]

RECORD_FILE = "replay.json"
_TIMING_NAMES = {"heartbeat": "heartbeat_s", "lease": "lease_s", "renew": "renew_s",
                 "dead_after": "dead_after_s", "recovery": "recovery_s", "grace": "grace_s"}


class NotDrained(FleetsimError):
    """Steps were still waiting when the run's timeout passed."""


@dataclass(frozen=True)
class RunPlan:
    """Everything one run needs, resolved (command line over file over hints).

    ``params`` uses `fleetsim run`'s option names: pods, concurrency, batch,
    workload, handlers, queues, store, seed, the timings, steps, rate,
    timeout, duration (open loop: ``rate`` steps/s for that long; None:
    ``steps``), fault_proxy (None: only with faults) and restart (None: only
    with faults). ``experiment`` is None for a run of command-line options
    alone (``--chaos NAME`` then names its scenario in ``scenario``).
    """

    run_dir: Path
    params: Mapping[str, Any]
    schema: str
    experiment: Any = None  # chaos.experiment.Experiment
    scenario: str | None = None  # --chaos NAME, without an experiment
    experiment_text: str | None = None  # the file as read, for the replay record
    schedule: list[Any] | None = None  # a replay's recorded fault schedule
    command: tuple[str, ...] = ()  # how the user ran it (for the record)

    @property
    def seed(self) -> int:
        """The run's seed (load draws, fault schedule, target picks, seeded workloads)."""
        return int(self.params["seed"])


def run_experiment(plan: RunPlan, say: Callable[[str], None]) -> dict[str, Any]:
    """Run ``plan`` once and return `fleetsim run --json`'s result.

    The result holds the counts, ``valid``, the violations, the figures (the
    checker's, flattened to names thresholds can use), ``resources`` (the
    resource trends of every process and of the store, fleetsim.trends;
    None, with ``resources_skipped`` saying why, for a run under a minute or
    without metrics), ``thresholds`` (one row each) and ``passed`` (valid
    and every threshold met); ``record`` is the replay record's path and, if
    the run did not pass, ``bundle`` the failure bundle's.
    """
    from fleetsim.coordinator import Coordinator

    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        say(line)

    spec = fleet_spec(plan)
    experiment = plan.experiment
    faults_log = plan.run_dir / "faults.jsonl"
    log_offset = faults_log.stat().st_size if faults_log.exists() else 0
    coordinator = Coordinator(spec, echo=echo)
    coordinator.install_signal_handlers()
    coordinator.start()
    load: Any = None
    timed_out: str | None = None
    bundle_dir = plan.run_dir / "failures" / plan.schema
    try:
        store = coordinator.store
        assert store is not None
        if sum(store.status_counts().values()):
            raise ConfigError(f"schema {plan.schema!r} already holds steps: `run` needs a "
                              "fresh one (leave --schema out to get a new run_<time> schema)")
        for queue in experiment.queues if experiment else ():
            store.configure_queue(QueueConfig(queue.name, queue.concurrency_limit,
                                              queue.max_length, queue.strict_fifo,
                                              timeout_s=queue.timeout_s))
        load = _load(plan, spec, store, coordinator)
        echo(f"submitting {load.count} steps" + (f" at {load.rate:g}/s" if load.rate else ""))
        load.start()
        if not load.rate:
            load.join()
            store.analyze()  # a fresh schema has no statistics: plan claims on real numbers
        scenario = plan.scenario or (_scenario_of(experiment) if experiment else None)
        if scenario is not None:
            started = coordinator.run_scenario(scenario, plan.seed, schedule=plan.schedule)
            echo(f"chaos: scenario {started['scenario']} (seed {started['seed']}, "
                 f"{started['faults']} faults over {started['duration_s']:g}s)")
        while load.is_alive() or (coordinator.scenario is not None
                                  and not coordinator.scenario.done.is_set()):
            if coordinator.stopping.is_set():
                raise KeyboardInterrupt
            coordinator.poll()
            time.sleep(0.1)
        if load.error:
            raise FleetsimError(f"the load failed: {load.error}")
        try:
            _wait_drained(store, load.accepted, float(plan.params["timeout"]), coordinator, echo)
        except NotDrained as exc:
            timed_out = str(exc)
            echo(f"error: {timed_out}")
        summary = _with_store_retry(store.run_summary)
        from fleetsim.checker import check as check_history

        report = _with_store_retry(lambda: check_history(
            store, final=True, client_histories=coordinator.client_history_dir))
        # The run's own figures (latency, success, throughput in faults, RSS)
        # beside the checker's: thresholds may name any of them.
        from fleetsim.report import gather

        gathered = _with_store_retry(lambda: gather(
            store, plan.run_dir, plan.schema, report.figures,
            series=bool(plan.params.get("write_report"))))
        result = _result(plan, spec, summary, load, report, gathered.figures)
        # Read while the coordinator still samples: its series covers the whole run.
        result["resources"], skipped = _resources(plan.run_dir, spec)
        if skipped:
            result["resources_skipped"] = skipped
        result["figures"].update(threshold_figures(result["resources"]))
        if plan.experiment is not None:
            stats = _with_store_retry(store.queue_stats)
            for name, row in result["queues"].items():
                row.update(stats[name].as_dict() if name in stats else {})
        if timed_out:
            result["timed_out"] = timed_out
        thresholds = evaluate(experiment.thresholds, result) if experiment else []
        result["thresholds"] = [row.as_dict() for row in thresholds]
        result["passed"] = bool(result["valid"] and not timed_out
                                and all(row.passed for row in thresholds))
        if coordinator.scenario is not None:
            result["scenario"] = coordinator.scenario.scenario.name
            result["faults_applied"] = coordinator.scenario.applied
        if not result["passed"]:
            _bundle_store_part(bundle_dir, store, report)
    finally:
        pods = _pods_seen(coordinator)
        coordinator.stop()
    record = _record(plan, result, pods, _read_new(faults_log, log_offset))
    record_dir = plan.run_dir / "runs" / plan.schema
    record_dir.mkdir(parents=True, exist_ok=True)
    (record_dir / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    result["record"] = str(record_dir)
    if plan.params.get("write_report"):
        from fleetsim.report import write_report

        written = write_report(gathered, plan.run_dir / "reports" / plan.schema,
                               report.as_dict())
        say(f"report: {written['index']}")
        result["report"] = str(written["index"])
    if not result["passed"]:
        _bundle_files(bundle_dir, plan, record, lines, faults_log, log_offset, coordinator)
        result["bundle"] = str(bundle_dir)
    return result


# -- the fleet and the load -----------------------------------------------------


def fleet_spec(plan: RunPlan) -> Any:
    """The coordinator's FleetSpec for ``plan`` (pod groups, handlers, timings)."""
    from fleetsim.coordinator import FleetSpec
    from pods.workloads import is_handler

    params, experiment = plan.params, plan.experiment
    groups: tuple[PodGroup, ...] = experiment.groups if experiment else ()
    faults = bool(plan.scenario) or bool(experiment and experiment.has_faults)
    handlers = list(params["handlers"])
    # Pods run only the handlers they were started with: every group's and
    # every kind of step's, so a mix may send any of them to any pod.
    named = [g.workload for g in groups]
    named += [m.workload for m in experiment.load.mix if m.workload] if experiment else []
    for workload in named:
        if is_handler(workload) and workload not in handlers:
            handlers.append(workload)
    queues = tuple(params["queues"])
    if groups:
        queues = tuple(dict.fromkeys(q for g in groups for q in g.queues))
    timings = FleetTimings(**{_TIMING_NAMES[k]: float(params[k]) for k in _TIMING_NAMES})
    restart = params.get("restart")
    fault_proxy = params.get("fault_proxy")
    return FleetSpec(
        run_dir=plan.run_dir, pods=sum(g.pods for g in groups) if groups else params["pods"],
        concurrency=params["concurrency"], batch=params["batch"],
        workload=groups[0].workload if groups else params["workload"], queues=queues,
        store_url=params["store"], schema=plan.schema, seed=plan.seed,
        restart=faults if restart is None else bool(restart), timings=timings,
        fault_proxy=faults if fault_proxy is None else bool(fault_proxy),
        handlers=tuple(handlers), groups=groups,
        metrics=bool(params.get("metrics", True)), metrics_port=int(params.get("metrics_port", 0)),
    )


def _load(plan: RunPlan, spec: Any, store: Store, coordinator: Any) -> Any:
    from fleetsim.load import LoadGenerator, StepKind

    experiment = plan.experiment
    attempts = {q.name: q.max_attempts for q in experiment.queues} if experiment else {}
    mix = experiment.load.mix if experiment else ()
    kinds = [StepKind(m.weight, m.queue or spec.submit_queue, m.workload, m.priority,
                      m.max_attempts or attempts.get(m.queue or spec.submit_queue, 3))
             for m in mix] or [StepKind(1.0, spec.submit_queue, None, 0,
                                        attempts.get(spec.submit_queue, 3))]
    rate = float(plan.params.get("rate") or 0.0)
    duration = plan.params.get("duration")
    # Open loop: `rate` steps/s for `duration`; else `steps` (at `rate`, or at once).
    count = max(1, round(float(duration) * rate)) if duration and rate else int(
        plan.params["steps"])
    return LoadGenerator(store, kinds, count, rate, plan.seed,
                         history_dir=coordinator.client_history_dir,
                         stopping=coordinator.stopping)


def _scenario_of(experiment: Any) -> Any:
    """The experiment's scenario, if it has faults to run."""
    return experiment.scenario if experiment.has_faults else None


def _with_store_retry(call: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    """Retry a read while the store restarts (chaos may have just restarted it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _wait_drained(store: Store, steps: int, timeout_s: float, coordinator: Any,
                  say: Callable[[str], None]) -> None:
    deadline = time.monotonic() + timeout_s
    next_report = time.monotonic() + 2.0
    while True:
        if coordinator.stopping.is_set():
            raise KeyboardInterrupt
        now = time.monotonic()
        try:
            # An index probe every poll; the counts (a scan of every step)
            # only for the progress line and the timeout's message.
            if not store.has_open_steps():
                return
            if now > deadline or now >= next_report:
                counts = store.status_counts()
                waiting = counts["queued"] + counts["claimed"] + counts["failed"]
                if now > deadline:
                    raise NotDrained(f"not drained after {timeout_s:.0f}s: {waiting} steps "
                                     "left")
                say(f"  {steps - waiting}/{steps} done")
                next_report = now + 2.0
        except StoreUnavailable:
            time.sleep(0.5)
            continue
        coordinator.poll()
        time.sleep(0.05)


# -- the result -------------------------------------------------------------------


def _result(plan: RunPlan, spec: Any, summary: dict[str, Any], load: Any,
            report: Any, figures: Mapping[str, Any]) -> dict[str, Any]:
    steps = load.accepted
    window = summary["window_s"] or 0.0
    # Every step accounted for; the checker adds the invariants. A submit
    # retried after its reply was lost may have landed twice: the store may
    # hold up to that many more steps than were acknowledged, never fewer.
    in_store = summary["submitted"]
    valid = (
        steps <= in_store <= steps + load.indeterminate
        and summary["completed"] + summary["dead"] + summary["cancelled"] == in_store
        and summary["duplicate_completions"] == 0
        and summary["completed_without_attempt"] == 0
    )
    totals: dict[str, int] = report.counts.get("violations", {})
    result: dict[str, Any] = {
        "submitted": summary["submitted"],
        "completed": summary["completed"],
        "dead": summary["dead"],
        "cancelled": summary["cancelled"],
        "elapsed_s": round(window, 3),
        "steps_per_s": round(summary["completed"] / window, 1) if window > 0 else None,
        "valid": bool(valid and report.valid),
        "pods": spec.pods,
        "pods_with_work": summary["pods_with_work"],
        "workload": spec.workload,
        "schema": plan.schema,
        "duplicate_completions": summary["duplicate_completions"],
        "seed": plan.seed,
        "rejected": sum(load.rejected.values()),
        "indeterminate": load.indeterminate,
        "lost": int(totals.get("lost_step", 0)),
        "violations_total": sum(int(v) for v in totals.values()),
        "violations": [v.as_dict() for v in report.violations],
        "figures": {**figures, **flat_figures(report.figures)},
    }
    if plan.experiment is not None:
        result["experiment"] = plan.experiment.name
        result["queues"] = {
            q: {"submitted": load.submitted.get(q, 0), "rejected": load.rejected.get(q, 0)}
            for q in sorted(set(load.submitted) | set(load.rejected))}
        if spec.groups:
            result["groups"] = [g.to_dict() for g in spec.groups]
    return result


def _resources(run_dir: Path, spec: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The run's resource trends (fleetsim.trends), or None and why there are none."""
    from fleetsim.metrics import metrics_path, read_samples
    from fleetsim.trends import TooShort, resource_trends

    if not spec.metrics:
        return None, "no metrics series (--no-metrics)"
    try:
        return resource_trends(read_samples(metrics_path(run_dir))[0]), None
    except TooShort as exc:
        return None, str(exc)


def flat_figures(figures: Mapping[str, Any]) -> dict[str, Any]:
    """The checker's nested figures under the flat names thresholds use."""
    def get(section: str, key: str) -> Any:
        value = figures.get(section)
        return value.get(key) if isinstance(value, Mapping) else None

    return {
        "failover_max_s": get("failover", "max_s"),
        "failover_median_s": get("failover", "median_s"),
        "orphan_recovery_max_s": get("orphan_recovery", "max_s"),
        "claim_to_completion_p50_s": get("claim_to_completion", "p50_s"),
        "claim_to_completion_p99_s": get("claim_to_completion", "p99_s"),
    }


# -- replay record and failure bundle -----------------------------------------


def _pods_seen(coordinator: Any) -> list[dict[str, Any]]:
    """Every pod incarnation the coordinator started (from its events)."""
    return [{"id": e["pod"], "incarnation": e["incarnation"], "pid": e["pid"]}
            for e in coordinator.events if e.get("topic") == "pod.started"]


def _read_new(path: Path, offset: int) -> list[dict[str, Any]]:
    """The JSON lines appended to ``path`` since ``offset``."""
    try:
        with open(path, encoding="utf-8") as handle:
            handle.seek(offset)
            text = handle.read()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def _record(plan: RunPlan, result: dict[str, Any], pods: list[dict[str, Any]],
            fault_records: list[dict[str, Any]]) -> dict[str, Any]:
    experiment = plan.experiment
    # The store URL may hold a password: replay takes --store instead.
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.params.items()
              if k not in ("store", "as_json", "repeat")}
    return {
        "version": 1,
        "experiment": experiment.name if experiment else None,
        "source": experiment.scenario.source if experiment else None,
        "experiment_text": plan.experiment_text,
        "scenario": plan.scenario,
        "seed": plan.seed,
        "schema": plan.schema,
        "params": params,
        "command": redact_argv(plan.command),
        "pods": pods,
        "faults": [r for r in fault_records if r.get("type") == "fault"],
        "valid": result["valid"],
        "passed": result["passed"],
        "thresholds": result["thresholds"],
        "timed_out": result.get("timed_out"),
    }


def _bundle_store_part(folder: Path, store: Store, report: Any) -> None:
    """What a failure bundle needs from the store, taken while it still runs."""
    from fleetsim.history import export_history

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "witnesses.json").write_text(
        json.dumps([v.as_dict() for v in report.violations], indent=2, default=str) + "\n")
    (folder / "check.txt").write_text(report.summary() + "\n")
    try:
        with open(folder / "history.jsonl", "w", encoding="utf-8") as out:
            _with_store_retry(lambda: export_history(store, out))
    except FleetsimError as exc:
        (folder / "history.jsonl").write_text(f"# export failed: {exc}\n")


def _bundle_files(folder: Path, plan: RunPlan, record: dict[str, Any], lines: list[str],
                  faults_log: Path, offset: int, coordinator: Any) -> None:
    """The failure bundle's files: logs, faults, client histories, record, replay command."""
    folder.mkdir(parents=True, exist_ok=True)
    logs = plan.run_dir / "logs"
    if logs.is_dir():
        shutil.copytree(logs, folder / "logs", dirs_exist_ok=True)
    (folder / "coordinator.log").write_text("".join(line + "\n" for line in lines))
    with open(folder / "faults.jsonl", "w", encoding="utf-8") as out:
        for line in _read_new(faults_log, offset):
            out.write(json.dumps(line) + "\n")
    metrics = plan.run_dir / "metrics.jsonl"  # the metrics series, where the fleet keeps one
    if metrics.is_file():
        shutil.copyfile(metrics, folder / "metrics.jsonl")
    histories = Path(coordinator.client_history_dir)
    if histories.is_dir():
        shutil.copytree(histories, folder / "client-history", dirs_exist_ok=True)
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    if plan.experiment_text is not None:
        (folder / "experiment.toml").write_text(plan.experiment_text)
    failed = [f"threshold {t['name']} {t['condition']}: "
              f"{'not measured' if t['value'] is None else t['value']}"
              for t in record["thresholds"] if not t["passed"]]
    why = (["invalid (see check.txt, witnesses.json)"] if not record["valid"] else []) + failed
    if record.get("timed_out"):
        why.append(str(record["timed_out"]))
    command = f"fleetsim --run-dir {shlex.quote(str(plan.run_dir))} replay " \
              f"{shlex.quote(str(folder))}"
    (folder / "README.txt").write_text(
        f"fleetsim run {record['experiment'] or record['scenario'] or ''} "
        f"(seed {record['seed']}, schema {record['schema']}) did not pass:\n"
        + "".join(f"  {w}\n" for w in why)
        + f"\nreplay it (same experiment, seed and fault schedule; add --store URL for an "
        f"external store):\n  {command}\n"
        + (f"\nas run:\n  {shlex.join(record['command'])}\n" if record["command"] else ""))


def find_record(spec: str, run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The replay record ``spec`` names: a folder holding one, or a run's schema."""
    candidates = [Path(spec), run_dir / "runs" / spec, run_dir / "failures" / spec]
    for folder in candidates:
        path = folder / RECORD_FILE if folder.is_dir() else folder
        if path.name == RECORD_FILE and path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError as exc:
                raise ConfigError(f"{path}: not a replay record: {exc}") from None
            if not isinstance(data, dict) or data.get("version") != 1:
                raise ConfigError(f"{path}: not a replay record (version 1)")
            return path, data
    raise ConfigError(f"no replay record for {spec!r}: give a run's folder (runs/<schema> "
                      f"or failures/<schema> in {run_dir}) or its schema")


def replayed_schedule(record: Mapping[str, Any]) -> list[Any]:
    """The planned faults of a record, with each selector replaced by the pods it hit.

    ``random``, ``round-robin`` and ``fraction:`` picks become the pod ids the
    original run resolved them to (one fault per pod); ``leader`` stays the
    leader of the moment, as do faults that were skipped or failed.
    """
    from chaos.scenario import PlannedFault

    planned = []
    for r in record.get("faults", []):
        base = PlannedFault(offset_s=float(r["offset_s"]), action=r["action"],
                            target=r.get("target"), params=dict(r.get("params") or {}),
                            duration_s=r.get("duration_s"), fault=int(r["fault"]),
                            occurrence=int(r["occurrence"]))
        targets = [t for t in r.get("targets") or [] if t]
        resolvable = base.target not in (None, "leader", "all") and r.get("outcome") == "applied"
        if resolvable and targets and all(t.startswith("pod-") for t in targets):
            planned += [replace(base, target=t) for t in targets]
        else:
            planned.append(base)
    return sorted(planned, key=lambda f: (f.offset_s, f.fault, f.occurrence))


def packaged_text(source: str) -> str | None:
    """The text of an experiment file: a path, or a packaged ``chaos/scenarios/`` one."""
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if source.startswith("chaos/scenarios/"):
        entry = importlib.resources.files("chaos").joinpath("scenarios", path.name)
        with contextlib.suppress(OSError):
            return entry.read_text(encoding="utf-8")
    return None
