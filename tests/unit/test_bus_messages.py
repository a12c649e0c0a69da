"""Bus messages: every type round-trips; decode rejects anything else with ProtocolError."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetsim.bus import messages as m
from fleetsim.errors import ProtocolError

pytestmark = pytest.mark.timeout(30)

ids = st.integers(min_value=0, max_value=2**63)
names = st.text(min_size=1, max_size=20)
ints = st.integers(min_value=-(2**63), max_value=2**63)
finite = st.floats(allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
rates = st.floats(min_value=0, max_value=1)
json_values = st.recursive(
    st.none() | st.booleans() | ints | finite | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=4)
float_maps = st.dictionaries(st.text(max_size=10), finite, max_size=5)

STRATEGIES: dict[type[m.Message], st.SearchStrategy[Any]] = {
    m.Hello: st.builds(m.Hello, names, ints, ints, st.text(), request_id=ids),
    m.PodHeartbeat: st.builds(
        m.PodHeartbeat,
        names,
        ints,
        st.sampled_from(["starting", "running", "draining"]),
        st.booleans(),
        st.none() | ints,
        ints,
        ints,
        ints,
        request_id=ids,
    ),
    m.Metrics: st.builds(m.Metrics, names, ints, float_maps, float_maps, finite, request_id=ids),
    m.Ping: st.builds(m.Ping, request_id=ids),
    m.Shutdown: st.builds(m.Shutdown, non_negative, request_id=ids),
    m.SelfKill: st.builds(m.SelfKill, request_id=ids),
    m.SetStorageFault: st.builds(
        m.SetStorageFault, rates, non_negative, rates, st.none() | non_negative, request_id=ids
    ),
    m.ClearStorageFault: st.builds(m.ClearStorageFault, request_id=ids),
    m.BusPartition: st.builds(m.BusPartition, st.none() | non_negative, request_id=ids),
    m.HangNextStep: st.builds(m.HangNextStep, st.none() | non_negative, request_id=ids),
    m.StatusRequest: st.builds(m.StatusRequest, request_id=ids),
    m.ChaosRequest: st.builds(
        m.ChaosRequest,
        st.sampled_from(m.CHAOS_ACTIONS),
        st.none() | names,
        json_objects,
        request_id=ids,
    ),
    m.DownRequest: st.builds(m.DownRequest, non_negative, request_id=ids),
    m.Ok: st.builds(m.Ok, json_objects, request_id=ids),
    m.Error: st.builds(m.Error, st.text(), st.text(), request_id=ids),
    m.Event: st.builds(m.Event, names, finite, json_objects, request_id=ids),
}
any_message = st.one_of(*STRATEGIES.values())

# One valid instance of each type, for the targeted rejection tests.
EXAMPLES: list[m.Message] = [
    m.Hello("pod-1", 2, 4242, "host-a", request_id=1),
    m.PodHeartbeat("pod-1", 2, "running", True, 7, 3, 10, 1, request_id=2),
    m.Metrics("pod-1", 2, {"claimed": 3.0}, {"rss_mb": 51.5}, 1700000000.5),
    m.Ping(request_id=3),
    m.Shutdown(5.0, request_id=4),
    m.SelfKill(request_id=5),
    m.SetStorageFault(0.1, 250.0, 0.05, None, request_id=6),
    m.ClearStorageFault(request_id=7),
    m.BusPartition(3.0, request_id=8),
    m.StatusRequest(request_id=9),
    m.ChaosRequest("kill", "pod-2", {"signal": "KILL"}, request_id=10),
    m.DownRequest(10.0, request_id=11),
    m.Ok({"pods": [1, 2]}, request_id=12),
    m.Error("bad-request", "no such pod", request_id=13),
    m.Event("pod.died", 1700000000.0, {"pod_id": "pod-2"}),
    m.HangNextStep(2.5, request_id=14),
]


def _envelope(msg: m.Message) -> dict[str, Any]:
    envelope: dict[str, Any] = json.loads(m.encode(msg))
    return envelope


def _frame(envelope: object) -> bytes:
    return json.dumps(envelope).encode()


def test_every_message_type_has_a_strategy_and_an_example() -> None:
    assert set(STRATEGIES) == set(m.MESSAGE_TYPES.values())
    assert {type(msg) for msg in EXAMPLES} == set(m.MESSAGE_TYPES.values())


@settings(max_examples=300, deadline=None)
@given(any_message)
def test_round_trip(msg: m.Message) -> None:
    frame = m.encode(msg)
    assert m.decode(frame) == msg
    assert type(m.decode(frame)) is type(msg)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda msg: msg.kind)
def test_wire_format(msg: m.Message) -> None:
    frame = m.encode(msg)
    envelope = json.loads(frame.decode("utf-8"))
    assert frame == json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()
    assert envelope["v"] == m.PROTOCOL_VERSION == 3
    assert envelope["kind"] == msg.kind
    assert envelope["id"] == msg.request_id
    assert set(envelope["body"]) == {f.name for f in dataclasses.fields(msg)} - {"request_id"}


def test_ints_are_widened_to_float_and_error_codes_to_str() -> None:
    frame = _frame({"v": 3, "kind": "shutdown", "id": 0, "body": {"grace_s": 5}})
    msg = m.decode(frame)
    assert isinstance(msg, m.Shutdown)
    assert type(msg.grace_s) is float
    error = m.Error(m.ErrorCode.PROTOCOL, "x")
    assert type(error.code) is str
    assert m.encode(error) == m.encode(m.Error("protocol", "x"))


def test_peek_request_id() -> None:
    assert m.peek_request_id(_frame({"v": 99, "kind": "nope", "id": 41})) == 41
    assert m.peek_request_id(b"\xff garbage") == 0
    assert m.peek_request_id(_frame({"id": True})) == 0
    assert m.peek_request_id(_frame({"id": -3})) == 0


VALID = _envelope(EXAMPLES[4])  # a Shutdown


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "empty"),
        (b"x" * (m.MAX_FRAME_SIZE + 1), "over"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"v": 3, "kind": "ping"', "JSON"),
        (b"[" * 60_000, "JSON"),  # deeper than the recursion limit
        (b"\xef\xbb\xbf{}", "JSON"),  # BOM
        (b"[1, 2]", "object"),
        (b'"ping"', "object"),
        (b'{"v": 3, "v": 3, "kind": "ping", "id": 0, "body": {}}', "duplicate"),
        (b'{"v": 3, "kind": "shutdown", "id": 0, "body": {"grace_s": NaN}}', "NaN"),
        (b'{"v": 3, "kind": "shutdown", "id": 0, "body": {"grace_s": Infinity}}', "Infinity"),
        (b'{"v": 3, "kind": "shutdown", "id": 0, "body": {"grace_s": 1e999}}', "grace_s"),
        (_frame({**VALID, "v": 1}), "version"),  # an older peer
        (_frame({**VALID, "v": "2"}), "version"),
        (_frame({**VALID, "v": True}), "version"),
        (_frame({k: v for k, v in VALID.items() if k != "v"}), "version"),
        (_frame({**VALID, "kind": "launch-missiles"}), "unknown message kind"),
        (_frame({**VALID, "kind": 3}), "kind"),
        (_frame({**VALID, "id": "7"}), "id"),
        (_frame({**VALID, "id": 1.0}), "id"),
        (_frame({**VALID, "id": -1}), "id"),
        (_frame({k: v for k, v in VALID.items() if k != "id"}), "id"),
        (_frame({**VALID, "body": []}), "body"),
        (_frame({**VALID, "extra": 1}), "unknown envelope field"),
        (_frame({**VALID, "body": {"grace_s": 1.0, "force": True}}), "unknown field 'force'"),
        (_frame({**VALID, "body": {"grace_s": -1.0}}), ">= 0"),
        (_frame({**VALID, "body": {"grace_s": True}}), "expected float"),
        (
            _frame(
                {**_envelope(EXAMPLES[10]), "body": {"action": "x", "target": None, "params": {}}}
            ),
            "unknown chaos action",
        ),
        (
            _frame(
                {
                    **_envelope(EXAMPLES[6]),
                    "body": {**_envelope(EXAMPLES[6])["body"], "error_rate": 1.5},
                }
            ),
            "between 0 and 1",
        ),
        (
            _frame(
                {
                    **_envelope(EXAMPLES[2]),
                    "body": {**_envelope(EXAMPLES[2])["body"], "counters": {"a": "1"}},
                }
            ),
            "counters.a",
        ),
        (
            _frame(
                {**_envelope(EXAMPLES[0]), "body": {**_envelope(EXAMPLES[0])["body"], "pod_id": ""}}
            ),
            "empty",
        ),
    ],
)
def test_decode_rejects(frame: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        m.decode(frame)


def test_max_frame_size_is_configurable() -> None:
    frame = m.encode(m.Ok({"blob": "x" * 100}))
    with pytest.raises(ProtocolError, match="over 64"):
        m.decode(frame, max_size=64)
    with pytest.raises(ProtocolError, match="over 64"):
        m.encode(m.Ok({"blob": "x" * 100}), max_size=64)


@pytest.mark.parametrize(
    "msg", [msg for msg in EXAMPLES if _envelope(msg)["body"]], ids=lambda msg: msg.kind
)
def test_decode_rejects_every_missing_or_mistyped_field(msg: m.Message) -> None:
    envelope = _envelope(msg)
    for name in envelope["body"]:
        body = dict(envelope["body"])
        del body[name]
        with pytest.raises(ProtocolError, match=f"missing field '{name}'"):
            m.decode(_frame({**envelope, "body": body}))
        # A list is the wrong type for every field we declare.
        with pytest.raises(ProtocolError, match=name):
            m.decode(_frame({**envelope, "body": {**envelope["body"], name: [1]}}))


def test_bool_is_not_an_int_and_int_is_not_a_str() -> None:
    body = _envelope(EXAMPLES[0])["body"]
    with pytest.raises(ProtocolError, match="incarnation"):
        m.decode(_frame({**_envelope(EXAMPLES[0]), "body": {**body, "incarnation": True}}))
    with pytest.raises(ProtocolError, match="host"):
        m.decode(_frame({**_envelope(EXAMPLES[0]), "body": {**body, "host": 1}}))


def test_construction_validates_too() -> None:
    with pytest.raises(ProtocolError, match="incarnation"):
        m.Hello("pod-1", "2", 1, "h")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="between 0 and 1"):
        m.SetStorageFault(2.0, 0.0, 0.0, None)
    with pytest.raises(ProtocolError, match="cannot encode"):
        m.encode(m.Ok({"not json": {1, 2}}))
    with pytest.raises(ProtocolError, match="cannot encode"):
        m.encode(m.Ok({"lone surrogate": "\ud800"}))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048) | st.binary(max_size=256).map(lambda tail: b'{"v":2,' + tail))
def test_fuzz_random_bytes_only_raise_protocol_error(frame: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        m.decode(frame)


field_names = st.sampled_from(
    sorted({f.name for cls in m.MESSAGE_TYPES.values() for f in dataclasses.fields(cls)})
)
near_envelopes = st.fixed_dictionaries(
    {
        "v": st.just(m.PROTOCOL_VERSION) | json_values,
        "kind": st.sampled_from(sorted(m.MESSAGE_TYPES)) | json_values,
        "id": ids | json_values,
        "body": st.dictionaries(field_names, json_values, max_size=9) | json_values,
    }
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_envelopes)
def test_fuzz_near_valid_envelopes_decode_or_raise_protocol_error(envelope: object) -> None:
    try:
        msg = m.decode(_frame(envelope))
    except ProtocolError:
        return
    assert m.decode(m.encode(msg)) == msg
