"""Tests for chaos.scenario: parsing, validation, seeded schedules, targets, fault log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chaos.scenario import (
    ACTIONS,
    FaultLog,
    PlannedFault,
    Scenario,
    TargetPicker,
    find_scenario,
    list_scenarios,
    load_scenario,
    parse_scenario,
    read_fault_log,
)
from fleetsim.errors import ConfigError

SHIPPED = {
    "kill-leader-loop",
    "rolling-kill",
    "pause-leader-beyond-lease",
    "partition-leader-from-store",
    "storage-brownout",
    "store-restart",
    "mixed",
    "lost-replies",
    "trickle-storage-faults",
}
PODS = [f"pod-{i}" for i in range(1, 6)]

HEADER = 'name = "t"\nduration = "30s"\n'


def write(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(header + body)
    return path


def config_error(tmp_path: Path, body: str, header: str = HEADER) -> str:
    path = write(tmp_path, body, header)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message


# ----------------------------------------------------------------- shipped scenarios


@pytest.mark.timeout(30)
def test_every_shipped_scenario_loads_and_schedules() -> None:
    scenarios = list_scenarios()
    assert {s.name for s in scenarios} == SHIPPED
    for scenario in scenarios:
        assert scenario.source == f"chaos/scenarios/{scenario.name}.toml"
        assert scenario.description
        assert 0 < scenario.duration_s <= 40
        schedule = scenario.schedule(scenario.effective_seed())
        assert schedule, scenario.name
        assert all(f.end_s <= scenario.duration_s for f in schedule)
        assert all(f.offset_s < scenario.duration_s for f in schedule)
        assert json.dumps(scenario.as_dict())


@pytest.mark.timeout(30)
def test_shipped_scenarios_say_what_the_brief_says() -> None:
    by_name = {s.name: s for s in list_scenarios()}
    assert {f.action for f in by_name["pause-leader-beyond-lease"].schedule(1)} == {"pause"}
    for fault in by_name["pause-leader-beyond-lease"].schedule(1):
        assert (fault.target, fault.duration_s) == ("leader", 9.0)
    (partition,) = by_name["partition-leader-from-store"].schedule(1)
    assert partition.target == "leader"
    assert partition.duration_s == 9.0
    assert dict(partition.params) == {"from": "store", "mode": "blackhole"}
    (brownout,) = by_name["storage-brownout"].schedule(1)
    assert brownout.target == "all"
    assert brownout.duration_s == 8.0
    assert dict(brownout.params) == {"error_rate": 0.2, "latency_ms": 50.0, "disconnect_rate": 0.0,
                                     "reply_loss_rate": 0.0}
    rolling = by_name["rolling-kill"].schedule(1)
    assert [f.target for f in rolling] == ["round-robin"] * 5
    assert len({f.action for f in by_name["mixed"].schedule(1)}) >= 4
    assert {f.action for f in by_name["store-restart"].schedule(1)} == {"store-restart"}


@pytest.mark.timeout(30)
def test_list_scenarios_reads_a_directory(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('name = "a"\nduration = "5s"\n')
    (tmp_path / "b.toml").write_text(
        'name = "b"\nduration = "5s"\n[[fault]]\naction = "kill"\nat = "1s"\n'
    )
    (tmp_path / "notes.txt").write_text("not a scenario")
    assert [s.name for s in list_scenarios(tmp_path)] == ["a", "b"]
    (tmp_path / "c.toml").write_text('name = "a"\nduration = "5s"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: name: 'a' is also the name of .*a\.toml"):
        list_scenarios(tmp_path)


@pytest.mark.timeout(30)
def test_find_scenario_by_name_or_path(tmp_path: Path) -> None:
    assert find_scenario("mixed").name == "mixed"
    path = write(tmp_path, "")
    assert find_scenario(path).name == "t"
    with pytest.raises(ConfigError, match=r"unknown scenario 'nope' .*kill-leader-loop"):
        find_scenario("nope")


# ----------------------------------------------------------------- schedules


@pytest.mark.timeout(30)
def test_same_seed_same_schedule_different_seed_differs() -> None:
    for scenario in list_scenarios():
        first = scenario.schedule_json(42)
        assert first == scenario.schedule_json(42)
        assert [f.to_json() for f in scenario.schedule(42)] == first.splitlines()
        if any(spec.jitter_s for spec in scenario.faults):
            assert scenario.schedule_json(43) != first, scenario.name


@pytest.mark.timeout(30)
def test_schedule_without_jitter_is_exact_and_ordered() -> None:
    scenario = parse_scenario(
        'name = "x"\nduration = "10s"\n'
        '[[fault]]\naction = "kill"\nevery = "3s"\n'
        '[[fault]]\naction = "pause"\ntarget = "pod-2"\nat = "3s"\nfor = "2s"\n'
        '[[fault]]\naction = "heal"\nstart = "0s"\nevery = "4s"\nuntil = "8s"\n'
    )
    plan = [(f.offset_s, f.action, f.fault, f.occurrence) for f in scenario.schedule(1)]
    assert plan == [
        (0.0, "heal", 2, 0),
        (3.0, "kill", 0, 0),
        (3.0, "pause", 1, 0),
        (4.0, "heal", 2, 1),
        (6.0, "kill", 0, 1),
        (8.0, "heal", 2, 2),
        (9.0, "kill", 0, 2),
    ]
    assert scenario.schedule(1) == scenario.schedule(2)


@pytest.mark.timeout(30)
def test_every_with_count_and_small_periods_has_no_float_drift() -> None:
    scenario = parse_scenario(
        'name = "x"\nduration = "1s"\n'
        '[[fault]]\naction = "kill"\nevery = "100ms"\nuntil = "900ms"\n'
    )
    offsets = [f.offset_s for f in scenario.schedule(0)]
    assert offsets == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    counted = parse_scenario(
        'name = "x"\nduration = "1s"\n[[fault]]\naction = "kill"\nevery = "0.1"\ncount = 3\n'
    )
    assert [f.offset_s for f in counted.schedule(0)] == [0.1, 0.2, 0.3]


@pytest.mark.timeout(30)
def test_adding_a_fault_does_not_move_the_others() -> None:
    one = 'name = "x"\nduration = "30s"\n[[fault]]\naction = "kill"\nevery = "5s"\njitter = "1s"\n'
    two = one + '[[fault]]\naction = "store-restart"\nat = "3s"\njitter = "2s"\n'
    first = [f for f in parse_scenario(one).schedule(9)]
    second = [f for f in parse_scenario(two).schedule(9) if f.fault == 0]
    assert first == second


@pytest.mark.timeout(30)
def test_planned_fault_json() -> None:
    fault = PlannedFault(1.5, "partition", "leader", {"from": "store", "mode": "reset"}, 9.0, 0, 0)
    assert json.loads(fault.to_json()) == {
        "offset_s": 1.5,
        "action": "partition",
        "target": "leader",
        "params": {"from": "store", "mode": "reset"},
        "duration_s": 9.0,
        "fault": 0,
        "occurrence": 0,
    }
    assert fault.end_s == 10.5


@pytest.mark.timeout(30)
def test_seed_in_file_and_override() -> None:
    scenario = parse_scenario('name = "x"\nduration = "5s"\nseed = 7\n')
    assert scenario.effective_seed() == 7
    assert scenario.effective_seed(3) == 3
    assert parse_scenario('name = "x"\nduration = "5s"\n').effective_seed() == 0


@pytest.mark.timeout(30)
def test_workload_hints() -> None:
    scenario = parse_scenario(
        'name = "x"\nduration = "5s"\n[workload]\npods = 4\nsteps = 10\nworkload = "noop"\n'
    )
    assert (scenario.workload.pods, scenario.workload.steps, scenario.workload.workload) == (
        4,
        10,
        "noop",
    )


# ----------------------------------------------------------------- bad files

BAD = [
    # (body, field, reason pattern)
    (
        '[[fault]]\naction = "pause"\nat = "1s"\nfor = "5x"\n',
        "fault[0].for",
        r"invalid duration '5x': use ",
    ),
    (
        '[[fault]]\naction = "explode"\nat = "1s"\n',
        "fault[0].action",
        r"unknown action 'explode' \(expected one of kill, kill-leader, pause",
    ),
    ('[[fault]]\nat = "1s"\n', "fault[0].action", r"missing"),
    (
        '[[fault]]\naction = "kill"\nevry = "1s"\n',
        "fault[0].evry",
        r"unknown key \(did you mean 'every'\?\)",
    ),
    (
        '[[fault]]\naction = "kill"\nat = "1s"\nerror_rate = 0.5\n',
        "fault[0].error_rate",
        r"not a parameter of kill",
    ),
    (
        '[[fault]]\naction = "kill"\nat = "1s"\nevery = "2s"\n',
        "fault[0].at",
        r"both of 'at' and 'every'",
    ),
    ('[[fault]]\naction = "kill"\n', "fault[0]", r"neither of 'at' and 'every'"),
    ('[[fault]]\naction = "pause"\nat = "1s"\n', "fault[0].for", r"missing: pause needs"),
    ('[[fault]]\naction = "partition"\nat = "1s"\n', "fault[0].for", r"missing"),
    (
        '[[fault]]\naction = "storage-fault"\nat = "1s"\nerror_rate = 0.1\n',
        "fault[0].for",
        r"missing",
    ),
    (
        '[[fault]]\naction = "kill"\nat = "1s"\nfor = "5s"\n',
        "fault[0].for",
        r"not meaningful for kill",
    ),
    (
        '[[fault]]\naction = "heal"\nat = "1s"\nfor = "5s"\n',
        "fault[0].for",
        r"not meaningful for heal",
    ),
    (
        '[[fault]]\naction = "storage-fault"\nat = "1s"\nfor = "2s"\nerror_rate = 1.5\n',
        "fault[0].error_rate",
        r"out of range: a rate must be in \[0, 1\]",
    ),
    (
        '[[fault]]\naction = "storage-fault"\nat = "1s"\nfor = "2s"\ndisconnect_rate = -0.1\n',
        "fault[0].disconnect_rate",
        r"must be in \[0, 1\]",
    ),
    (
        '[[fault]]\naction = "storage-fault"\nat = "1s"\nfor = "2s"\nerror_rate = "high"\n',
        "fault[0].error_rate",
        r"expected a number",
    ),
    (
        '[[fault]]\naction = "storage-fault"\nat = "1s"\nfor = "2s"\n',
        "fault[0]",
        r"storage-fault does nothing",
    ),
    (
        '[[fault]]\naction = "kill"\nat = "1s"\ntarget = "fraction:1.5"\n',
        "fault[0].target",
        r"fraction 1.5 is out of range: it must be in \(0, 1\]",
    ),
    (
        '[[fault]]\naction = "kill"\nat = "1s"\ntarget = "fraction:0"\n',
        "fault[0].target",
        r"out of range",
    ),
    (
        '[[fault]]\naction = "kill"\nat = "1s"\ntarget = "leadr"\n',
        "fault[0].target",
        r"unknown target 'leadr' \(did you mean 'leader'\?",
    ),
    (
        '[[fault]]\naction = "kill-leader"\nat = "1s"\ntarget = "pod-1"\n',
        "fault[0].target",
        r"kill-leader always targets the leader",
    ),
    (
        '[[fault]]\naction = "store-restart"\nat = "1s"\ntarget = "all"\n',
        "fault[0].target",
        r"restarts the store",
    ),
    (
        '[[fault]]\naction = "partition"\nat = "1s"\nfor = "1s"\nfrom = "disk"\n',
        "fault[0].from",
        r"unknown side 'disk' \(expected one of store, bus, all\)",
    ),
    (
        '[[fault]]\naction = "partition"\nat = "1s"\nfor = "1s"\nmode = "drop"\n',
        "fault[0].mode",
        r"unknown mode 'drop' \(expected one of blackhole, reset\)",
    ),
    ('[[fault]]\naction = "kill"\nat = "31s"\n', "fault[0].at", r"past duration 30s"),
    (
        '[[fault]]\naction = "kill"\nat = "30s"\n',
        "fault[0].at",
        r"not before the end of the scenario \(duration 30s\)",
    ),
    (
        '[[fault]]\naction = "pause"\nat = "25s"\nfor = "9s"\n',
        "fault[0].at",
        r"at 25s \(lasting 9s\) could end at 34s, past duration 30s",
    ),
    (
        '[[fault]]\naction = "kill"\nat = "29.5s"\njitter = "1s"\n',
        "fault[0].at",
        r"\+ up to 1s jitter.*past duration 30s",
    ),
    (
        '[[fault]]\naction = "kill"\nevery = "5s"\ncount = 7\n',
        "fault[0].count",
        r"occurrence 6 at 30s is not before the end",
    ),
    (
        '[[fault]]\naction = "kill"\nevery = "5s"\nuntil = "40s"\n',
        "fault[0].until",
        r"40s is past duration 30s",
    ),
    (
        '[[fault]]\naction = "kill"\nevery = "5s"\nstart = "10s"\nuntil = "5s"\n',
        "fault[0].until",
        r"before the first occurrence at 10s",
    ),
    (
        '[[fault]]\naction = "kill"\nevery = "40s"\n',
        "fault[0].every",
        r"the first occurrence at 40s",
    ),
    (
        '[[fault]]\naction = "kill"\nevery = "5s"\nstart = "35s"\n',
        "fault[0].start",
        r"the first occurrence at 35s",
    ),
    ('[[fault]]\naction = "kill"\nevery = "0s"\n', "fault[0].every", r"longer than zero"),
    (
        '[[fault]]\naction = "kill"\nevery = "1ms"\n',
        "fault[0].every",
        r"too many \(at most 10000\)",
    ),
    (
        '[[fault]]\naction = "kill"\nevery = "5s"\ncount = 0\n',
        "fault[0].count",
        r"must be at least 1",
    ),
    (
        '[[fault]]\naction = "kill"\nat = "1s"\ncount = 2\n',
        "fault[0].count",
        r"only meaningful with 'every'",
    ),
    (
        '[[fault]]\naction = "pause"\nevery = "5s"\nfor = "6s"\n',
        "fault[0].for",
        r"longer than the period every = 5s: occurrences would overlap",
    ),
    ('[[fault]]\naction = "kill"\nat = true\n', "fault[0].at", r"expected a duration"),
    ('[[fault]]\naction = "kill"\nat = "-1s"\n', "fault[0].at", r"cannot be negative"),
    ('[[faults]]\naction = "kill"\nat = "1s"\n', "faults", r"did you mean \[\[fault\]\]"),
    ("fault = 3\n", "fault", r"expected an array of tables"),
    ('seed = "x"\n', "seed", r"expected an integer, got a string"),
    ('colour = "red"\n', "colour", r"unknown key \(expected one of name, description"),
    ("[workload]\npods = 0\n", "workload.pods", r"must be at least 1"),
    ("[workload]\npod = 3\n", "workload.pod", r"did you mean 'pods'"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("body", "where", "reason"), BAD, ids=[b[1] + ":" + b[2][:24] for b in BAD]
)
def test_bad_file_names_file_field_and_reason(
    tmp_path: Path, body: str, where: str, reason: str
) -> None:
    message = config_error(tmp_path, body)
    path = tmp_path / "bad.toml"
    assert message.startswith(f"{path}: {where}: "), message
    assert re.search(reason, message), message


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("header", "where", "reason"),
    [
        ('duration = "30s"\n', "name", "missing"),
        ('name = "t"\n', "duration", "missing"),
        ('name = "t"\nduration = "0s"\n', "duration", "longer than zero"),
        ('name = "t"\nduration = "30 days"\n', "duration", "invalid duration '30 days'"),
        ('name = "a b"\nduration = "30s"\n', "name", "invalid name 'a b'"),
        ('name = 3\nduration = "30s"\n', "name", "expected a string, got an integer"),
    ],
)
def test_bad_top_level(tmp_path: Path, header: str, where: str, reason: str) -> None:
    message = config_error(tmp_path, "", header=header)
    assert message.startswith(f"{tmp_path / 'bad.toml'}: {where}: "), message
    assert reason in message


@pytest.mark.timeout(30)
def test_toml_syntax_error_has_the_line_number(tmp_path: Path) -> None:
    message = config_error(tmp_path, '[[fault]]\naction = "kill"\nat = 5s\n')
    assert "invalid TOML" in message
    assert "line 5" in message


@pytest.mark.timeout(30)
def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read scenario"):
        load_scenario(tmp_path / "missing.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"bin\.toml: not UTF-8"):
        load_scenario(tmp_path / "bin.toml")


@pytest.mark.timeout(30)
def test_the_error_names_the_faulty_entry(tmp_path: Path) -> None:
    body = (
        '[[fault]]\naction = "kill"\nat = "1s"\n' * 2
        + '[[fault]]\naction = "pause"\nat = "1s"\nfor = "5x"\n'
    )
    message = config_error(tmp_path, body)
    assert message.startswith(f"{tmp_path / 'bad.toml'}: fault[2].for: invalid duration '5x'")


# ----------------------------------------------------------------- targets


@pytest.mark.timeout(30)
def test_target_picker_semantics() -> None:
    picker = TargetPicker(1)
    assert picker.pick("leader", PODS, "pod-3") == ["pod-3"]
    no_leader = picker.pick("leader", PODS, None)
    assert no_leader == [] and no_leader.reason == "no leader"
    stale = picker.pick("leader", PODS, "pod-9")
    assert stale == [] and stale.reason and "pod-9" in stale.reason
    assert picker.pick("all", list(reversed(PODS)), None) == PODS
    assert picker.pick("pod-4", PODS, None) == ["pod-4"]
    assert picker.pick("pod:pod-4", PODS, None) == ["pod-4"]
    (one,) = picker.pick("random", PODS, None)
    assert one in PODS
    two = picker.pick("fraction:0.4", PODS, None)
    assert len(two) == 2 and set(two) <= set(PODS) and two == sorted(two)
    assert len(picker.pick("fraction:0.01", PODS, None)) == 1
    assert picker.pick("fraction:1.0", PODS, None) == PODS
    assert len(picker.pick("fraction:0.5", PODS, None)) == 3
    empty = picker.pick("random", [], None)
    assert empty == [] and empty.reason == "no pods"


@pytest.mark.timeout(30)
def test_target_picker_unknown_pod() -> None:
    with pytest.raises(ConfigError, match=r"^no pod named 'pod-9' \(pods: pod-1\.\.pod-5\)$"):
        TargetPicker(0).pick("pod-9", PODS, "pod-1")
    with pytest.raises(ConfigError, match=r"no pod named 'pod-2' \(pods: pod-1, pod-3\)"):
        TargetPicker(0).pick("pod-2", ["pod-3", "pod-1"], None)
    with pytest.raises(ConfigError, match="unknown target 'everyone'"):
        TargetPicker(0).pick("everyone", PODS, None)


@pytest.mark.timeout(30)
def test_round_robin_cycles_in_id_order() -> None:
    picker = TargetPicker(0)
    pods = ["pod-10", "pod-2", "pod-1"]
    picks = [picker.pick("round-robin", pods, None)[0] for _ in range(4)]
    assert picks == ["pod-1", "pod-2", "pod-10", "pod-1"]
    # A pod gone (killed, not yet back) is skipped; the cycle goes on after it.
    assert picker.pick("round-robin", ["pod-1", "pod-10"], None) == ["pod-10"]


@pytest.mark.timeout(30)
def test_target_picker_is_deterministic() -> None:
    calls = [
        ("random", PODS),
        ("fraction:0.4", PODS),
        ("random", PODS[:3]),
        ("fraction:0.6", list(reversed(PODS))),
    ] * 10

    def run(seed: int, order: bool = True) -> list[list[str]]:
        picker = TargetPicker(seed)
        return [
            list(picker.pick(sel, pods if order else sorted(pods, reverse=True), "pod-1"))
            for sel, pods in calls
        ]

    assert run(5) == run(5)
    assert run(5) == run(5, order=False)  # the order pods come in does not matter
    assert run(5) != run(6)


# ----------------------------------------------------------------- fault log


@pytest.mark.timeout(30)
def test_fault_log_round_trip(tmp_path: Path) -> None:
    scenario = find_scenario("mixed")
    schedule = scenario.schedule(11)
    picker = TargetPicker(11)
    with FaultLog(tmp_path) as log:
        log.start(scenario, 11, schedule)
        for fault in schedule[:3]:
            targets = picker.pick(fault.target or "all", PODS, "pod-1")
            log.record(fault, targets, "ok", {"pod-1": {"ok": True}})
        log.note("heal-all")
    records = read_fault_log(tmp_path / "faults.jsonl")
    assert read_fault_log(tmp_path) == records
    assert [r["type"] for r in records] == ["start", "fault", "fault", "fault", "note"]
    assert all(r["scenario"] == "mixed" and r["seed"] == 11 for r in records)
    assert all("T" in r["time"] and r["elapsed_s"] >= 0 for r in records)
    start = records[0]
    assert start["schedule"] == [f.as_dict() for f in schedule]
    assert start["source"] == "chaos/scenarios/mixed.toml"
    # Replay: the scenario and seed in the log give the same schedule again.
    replayed = find_scenario(start["scenario"]).schedule(start["seed"])
    assert [f.as_dict() for f in replayed] == start["schedule"]
    first = records[1]
    assert first["action"] == schedule[0].action
    assert first["offset_s"] == schedule[0].offset_s
    assert first["outcome"] == "ok" and first["reply"] == {"pod-1": {"ok": True}}
    assert isinstance(first["targets"], list)
    assert records[-1]["event"] == "heal-all"


@pytest.mark.timeout(30)
def test_fault_log_appends_flushes_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "faults.jsonl"
    log = FaultLog(path)
    log.note("one")
    # Flushed per line: readable while the log is still open.
    assert [r["event"] for r in read_fault_log(path)] == ["one"]
    log.close()
    with FaultLog(path) as again:
        again.note("two")
    with path.open("a") as out:
        out.write('{"type": "note", "ev')  # the writer died mid-line
    assert [r["event"] for r in read_fault_log(path)] == ["one", "two"]
    path.write_text('{"type": "note"}\nnot json\n{"type": "note"}\n')
    with pytest.raises(ConfigError, match=r"faults\.jsonl:2: not a JSON fault record"):
        read_fault_log(path)


# ----------------------------------------------------------------- properties

MS = 1000


@st.composite
def scenarios(draw: st.DrawFn) -> str:
    """TOML text of a random valid scenario, all times in whole milliseconds."""
    duration = draw(st.integers(1, 60_000))
    lines = ['name = "prop"', f'duration = "{duration}ms"']
    for _ in range(draw(st.integers(0, 5))):
        action = draw(st.sampled_from(ACTIONS))
        lasting = action in ("pause", "partition", "storage-fault")
        entry = ["[[fault]]", f'action = "{action}"']
        if action == "storage-fault":
            entry.append(f"error_rate = {draw(st.floats(0.01, 0.5))!r}")
        span = duration - 1  # leave room: every fault must start before the end
        for_ms = draw(st.integers(1, max(1, span // 2))) if lasting else 0
        jitter = draw(st.integers(0, max(0, (span - for_ms) // 2)))
        room = duration - for_ms - jitter
        if room <= 0 or (for_ms + jitter == 0 and room <= 1):
            continue
        if for_ms:
            entry.append(f'for = "{for_ms}ms"')
        if jitter:
            entry.append(f'jitter = "{jitter}ms"')
        latest = room if for_ms or jitter else room - 1
        if draw(st.booleans()):
            entry.append(f'at = "{draw(st.integers(0, latest))}ms"')
        else:
            every = draw(st.integers(max(1, for_ms + jitter, duration // 50), max(1, duration)))
            if every < for_ms + jitter:
                continue
            start = draw(st.integers(0, latest))
            entry += [f'every = "{every}ms"', f'start = "{start}ms"']
            if draw(st.booleans()):
                entry.append(f'until = "{draw(st.integers(start, latest))}ms"')
        lines += entry
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(30)
@settings(max_examples=150, deadline=None)
@given(text=scenarios(), seed=st.integers(0, 2**32))
def test_random_scenarios_stay_inside_duration_and_in_order(text: str, seed: int) -> None:
    scenario = parse_scenario(text)
    schedule = scenario.schedule(seed)
    assert schedule == scenario.schedule(seed)
    offsets = [f.offset_s for f in schedule]
    assert offsets == sorted(offsets)
    for fault in schedule:
        assert 0 <= fault.offset_s < scenario.duration_s
        assert fault.end_s <= scenario.duration_s + 1e-9
    assert len(schedule) == sum(len(spec.nominal_us) for spec in scenario.faults)


@pytest.mark.timeout(30)
@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_arbitrary_text_is_a_scenario_or_one_config_error(text: str) -> None:
    try:
        scenario = parse_scenario(text, source="fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: ")
        assert "\n" not in str(exc)
    else:
        assert isinstance(scenario, Scenario)
