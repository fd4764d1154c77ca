"""Tests for artcafe_trio.protocol._frames: every frame round-trips; every defect is a ProtocolError.

Synchronous tests (no trio needed): the frame layer is sans-IO.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artcafe_trio._errors import ProtocolError
from artcafe_trio.protocol._frames import (
    CLIENT_FRAME_TYPES,
    DEFAULT_MAX_FRAME_BYTES,
    FRAME_TYPES,
    MAX_ID_LENGTH,
    PROTOCOL_VERSION,
    AdminAuth,
    Auth,
    Challenge,
    Error,
    Frame,
    Heartbeat,
    HeartbeatAck,
    Leave,
    Message,
    PresenceEvent,
    PresenceQuery,
    PresenceRecord,
    PresenceState,
    Publish,
    Published,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    decode,
    encode,
    encode_message,
)

# Every code decode() may raise; docs/protocol.md documents each one.
DECODE_CODES = frozenset(
    {
        "binary_frame",
        "frame_too_large",
        "invalid_json",
        "not_an_object",
        "missing_field",
        "unknown_type",
        "invalid_field",
        "invalid_subject",
    }
)

# --------------------------------------------------------------------------- strategies

_TOKEN_ALPHABET = st.sampled_from(
    [chr(c) for c in range(0x21, 0x7F) if chr(c) not in ".*>"],
)
tokens = st.text(_TOKEN_ALPHABET, min_size=1, max_size=8)
subjects = st.lists(tokens, min_size=1, max_size=6).map(".".join)
patterns = st.builds(
    lambda toks, tail: ".".join([*toks, *tail]),
    st.lists(tokens | st.just("*"), min_size=1, max_size=6),
    st.sampled_from([[], [">"]]),
) | st.just(">")
ids = st.text(min_size=1, max_size=MAX_ID_LENGTH)
texts = st.text(max_size=40)
numbers = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=2**53 - 1)  # MAX_SAFE_INTEGER
string_tuples = st.lists(texts, max_size=4).map(tuple)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


presence_records = st.builds(
    PresenceRecord,
    tenant_id=texts,
    agent_id=texts,
    status=st.sampled_from(["online", "offline"]),
    reason=optional(st.sampled_from(["connected", "timeout", "disconnected", "left"])),
    session_id=optional(texts),
    since=optional(numbers),
    last_seen=optional(numbers),
    last_heartbeat=optional(numbers),
    heartbeat_timeout=optional(numbers),
    capabilities=string_tuples,
    metadata=json_objects,
    hub_id=optional(texts),
)

presence_events = st.builds(
    PresenceEvent,
    tenant_id=texts,
    agent_id=texts,
    status=st.sampled_from(["online", "offline"]),
    reason=st.sampled_from(["connected", "timeout", "disconnected", "left"]),
    time=numbers,
    session_id=optional(texts),
    capabilities=string_tuples,
    metadata=json_objects,
)

FRAME_STRATEGIES: dict[str, st.SearchStrategy[Frame]] = {
    "challenge": st.builds(
        Challenge, nonce=texts, expires_in=numbers, hub_id=texts, protocol=counts
    ),
    "auth": st.builds(
        Auth,
        agent_id=ids,
        tenant_id=ids,
        algorithm=st.sampled_from(["ed25519", "rsa-pkcs1-sha256"]) | texts,
        signature=texts,
        heartbeat_interval=optional(numbers),
        heartbeat_timeout_multiplier=numbers,
        capabilities=string_tuples,
        metadata=json_objects,
        protocol=counts,
    ),
    "welcome": st.builds(
        Welcome,
        session_id=texts,
        agent_id=texts,
        tenant_id=texts,
        hub_id=texts,
        hub_time=numbers,
        heartbeat_interval=optional(numbers),
        heartbeat_timeout=optional(numbers),
        max_frame_bytes=counts,
        protocol=counts,
    ),
    "admin_auth": st.builds(AdminAuth, token=texts),
    "subscribe": st.builds(Subscribe, id=ids, subject=patterns),
    "subscribed": st.builds(Subscribed, id=ids, subject=texts),
    "unsubscribe": st.builds(Unsubscribe, id=ids, subject=patterns),
    "unsubscribed": st.builds(Unsubscribed, id=ids, subject=texts),
    "publish": st.builds(
        Publish, subject=subjects, data=json_values, id=optional(ids), reply_to=optional(subjects)
    ),
    "published": st.builds(Published, id=ids, message_id=texts, duplicate=st.booleans()),
    "message": st.builds(
        Message,
        subject=texts,
        data=json_values,
        sender=texts,
        message_id=texts,
        time=numbers,
        subscription=optional(texts),
        reply_to=optional(texts),
    ),
    "heartbeat": st.builds(Heartbeat, seq=counts),
    "heartbeat_ack": st.builds(HeartbeatAck, seq=counts, hub_time=numbers),
    "presence_query": st.builds(PresenceQuery, id=ids),
    "presence_state": st.builds(
        PresenceState, id=ids, agents=st.lists(presence_records, max_size=3).map(tuple)
    ),
    "leave": st.builds(Leave, reason=optional(texts)),
    "error": st.builds(Error, code=texts, message=texts, id=optional(texts), fatal=st.booleans()),
}


def decode_or_protocol_error(text: Any, **kwargs: Any) -> Frame | ProtocolError:
    """decode(); a ProtocolError is returned (with a documented code), anything else raises."""
    result: Frame | ProtocolError
    try:
        result = decode(text, **kwargs)
    except ProtocolError as exc:
        result = exc
    if isinstance(result, ProtocolError):
        assert result.code in DECODE_CODES, result
    else:
        assert isinstance(result, Frame)
    return result


def code_of(text: Any, **kwargs: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(text, **kwargs)
    return info.value.code


def error_of(text: Any, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(text, **kwargs)
    return info.value


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


# --------------------------------------------------------------------------- registry of types


def test_frame_types_registry_is_consistent() -> None:
    assert set(FRAME_STRATEGIES) == set(FRAME_TYPES), "every frame type needs a strategy here"
    for name, cls in FRAME_TYPES.items():
        assert cls.type == name
        assert issubclass(cls, Frame)
    assert set(CLIENT_FRAME_TYPES) <= set(FRAME_TYPES)
    assert {"challenge", "welcome", "message", "published"}.isdisjoint(CLIENT_FRAME_TYPES)


def test_frames_are_frozen() -> None:
    frame = Heartbeat(seq=1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        frame.seq = 2  # type: ignore[misc]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("frame_type", sorted(FRAME_TYPES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip_every_frame_type(frame_type: str, data: st.DataObject) -> None:
    frame = data.draw(FRAME_STRATEGIES[frame_type])
    text = encode(frame)
    assert isinstance(text, str)
    decoded = decode(text)
    assert type(decoded) is type(frame)
    assert decoded == frame
    obj = json.loads(text)
    assert obj["type"] == frame_type
    assert next(iter(obj)) == "type"
    assert encode(decoded) == text


@settings(max_examples=100, deadline=None)
@given(event=presence_events)
def test_presence_event_round_trip(event: PresenceEvent) -> None:
    data = event.to_data()
    assert isinstance(data, dict)
    # It travels as a message's data: through JSON and back.
    assert PresenceEvent.from_data(json.loads(json.dumps(data))) == event
    assert "type" not in data
    if event.session_id is None:
        assert "session_id" not in data


@settings(max_examples=50, deadline=None)
@given(records=st.lists(presence_records, max_size=4))
def test_presence_records_round_trip_inside_presence_state(records: list[PresenceRecord]) -> None:
    state = PresenceState(id="q1", agents=tuple(records))
    decoded = decode(encode(state))
    assert isinstance(decoded, PresenceState)
    assert decoded.agents == tuple(records)
    assert all(type(r) is PresenceRecord for r in decoded.agents)


def test_presence_record_hub_id_is_optional_and_omitted_when_absent() -> None:
    """Old frames (no ``hub_id``) still decode; a record without one sends none."""
    old = '{"type":"presence_state","id":"q","agents":[{"tenant_id":"t","agent_id":"a","status":"online"}]}'
    decoded = decode(old)
    assert isinstance(decoded, PresenceState)
    assert decoded.agents[0].hub_id is None
    assert "hub_id" not in encode(decoded)
    with_hub = PresenceState(
        id="q", agents=(PresenceRecord(tenant_id="t", agent_id="a", status="online", hub_id="h2"),)
    )
    assert '"hub_id":"h2"' in encode(with_hub)
    again = decode(encode(with_hub))
    assert isinstance(again, PresenceState) and again.agents[0].hub_id == "h2"
    bad = decode_or_protocol_error(old.replace('"online"', '"online","hub_id":7'))
    assert isinstance(bad, ProtocolError)


@pytest.mark.parametrize(
    "data",
    [
        None,
        "not an object",
        [],
        {"tenant_id": "t", "agent_id": "a", "status": "online", "reason": "connected"},
        {"tenant_id": "t", "agent_id": "a", "status": "online", "reason": "x", "time": "now"},
    ],
)
def test_presence_event_from_bad_data_is_protocol_error(data: object) -> None:
    with pytest.raises(ProtocolError) as info:
        PresenceEvent.from_data(data)
    assert info.value.code in {"invalid_field", "missing_field"}


def test_defaults_decode_from_minimal_frames() -> None:
    challenge = decode('{"type":"challenge","nonce":"n","expires_in":30,"hub_id":"h"}')
    assert challenge == Challenge(nonce="n", expires_in=30.0, hub_id="h", protocol=1)
    assert isinstance(challenge, Challenge)
    assert type(challenge.expires_in) is float
    auth = decode(
        '{"type":"auth","agent_id":"a","tenant_id":"t","algorithm":"ed25519","signature":"s"}'
    )
    assert isinstance(auth, Auth)
    assert auth.heartbeat_interval is None
    assert auth.heartbeat_timeout_multiplier == 3.0
    assert auth.capabilities == ()
    assert auth.metadata == {}
    assert auth.protocol == PROTOCOL_VERSION == 1
    publish = decode('{"type":"publish","subject":"a"}')
    assert publish == Publish(subject="a", data=None, id=None, reply_to=None)
    assert decode('{"type":"published","id":"p","message_id":"m"}') == Published(
        id="p", message_id="m", duplicate=False
    )
    assert decode('{"type":"error","code":"x"}') == Error(code="x", message="", id=None)
    assert decode('{"type":"leave"}') == Leave(reason=None)


def test_null_is_accepted_for_optional_fields_only() -> None:
    assert decode('{"type":"publish","subject":"a","id":null,"reply_to":null}') == Publish(
        subject="a"
    )
    assert code_of('{"type":"heartbeat","seq":null}') == "invalid_field"
    assert code_of('{"type":"published","id":"p","message_id":"m","duplicate":null}') == (
        "invalid_field"
    )


def test_unknown_extra_fields_are_ignored() -> None:
    text = dumps({"type": "heartbeat", "seq": 7, "future": {"x": [1, 2]}, "id": "h1"})
    assert decode(text) == Heartbeat(seq=7)
    text = dumps({"type": "publish", "subject": "tasks.new", "data": 1, "priority": "high"})
    assert decode(text) == Publish(subject="tasks.new", data=1)


def test_encode_omits_none_optional_fields() -> None:
    obj = json.loads(encode(Publish(subject="a.b")))
    assert obj == {"type": "publish", "subject": "a.b", "data": None}
    obj = json.loads(encode(Error(code="rate_limited")))
    assert obj == {"type": "error", "code": "rate_limited", "message": "", "fatal": False}
    obj = json.loads(
        encode(Welcome(session_id="s", agent_id="a", tenant_id="t", hub_id="h", hub_time=1.0))
    )
    assert "heartbeat_interval" not in obj
    assert "heartbeat_timeout" not in obj
    obj = json.loads(encode(Auth(agent_id="a", tenant_id="t", algorithm="ed25519", signature="")))
    assert "heartbeat_interval" not in obj
    assert obj["capabilities"] == []
    assert obj["metadata"] == {}


def test_encode_is_compact_json() -> None:
    text = encode(Heartbeat(seq=3))
    assert text == '{"type":"heartbeat","seq":3}'
    assert " " not in encode(Subscribe(id="1", subject="a.*"))


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - json's own error
        encode(Publish(subject="a", data=float("nan")))


# --------------------------------------------------------------------------- encode_message


@settings(max_examples=150, deadline=None)
@given(
    subject=subjects,
    subscription=optional(patterns),
    data=json_values,
    sender=texts,
    message_id=texts,
    time=numbers,
    reply_to=optional(subjects),
)
def test_encode_message_decodes_to_the_equivalent_message(
    subject: str,
    subscription: str | None,
    data: Any,
    sender: str,
    message_id: str,
    time: float,
    reply_to: str | None,
) -> None:
    text = encode_message(
        subject=subject,
        subscription=subscription,
        data_json=json.dumps(data),
        sender=sender,
        message_id=message_id,
        time=time,
        reply_to=reply_to,
    )
    expected = Message(
        subject=subject,
        data=data,
        sender=sender,
        message_id=message_id,
        time=time,
        subscription=subscription,
        reply_to=reply_to,
    )
    assert decode(text) == expected
    assert json.loads(text) == json.loads(encode(expected))
    obj = json.loads(text)
    assert ("subscription" in obj) == (subscription is not None)
    assert ("reply_to" in obj) == (reply_to is not None)


# --------------------------------------------------------------------------- fuzzing decode


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_random_text_never_raises_anything_but_protocol_error(text: str) -> None:
    result = decode_or_protocol_error(text)
    if isinstance(result, ProtocolError):
        return
    assert isinstance(json.loads(text), dict)


@settings(max_examples=100, deadline=None)
@given(raw=st.binary())
def test_binary_frames_are_refused(raw: bytes) -> None:
    assert code_of(raw) == "binary_frame"


@pytest.mark.parametrize("raw", [b"", b'{"type":"heartbeat","seq":1}', bytearray(b"{}")])
def test_binary_frames_even_valid_json(raw: bytes | bytearray) -> None:
    error = error_of(raw)
    assert error.code == "binary_frame"
    assert error.frame_id is None


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_random_json_values(value: Any) -> None:
    result = decode_or_protocol_error(dumps(value))
    if not isinstance(value, dict):
        assert isinstance(result, ProtocolError)
        assert result.code == "not_an_object"
    elif "type" not in value:
        assert isinstance(result, ProtocolError)
        assert result.code == "missing_field"


# Values that stress each field kind: wrong types, edge numbers, huge integers.
hostile_values = (
    json_values
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.sampled_from([-1, -0.5, 1e308, 10**308, 10**309, -(10**309), "", "a" * 200, "a..b"])
    | st.sampled_from(["tasks.*", "tasks.>", "$presence.x", [1], ["a", 1], {"a": 1}, [{}]])
)


@st.composite
def frame_shaped_objects(draw: st.DrawFn) -> dict[str, Any]:
    frame_type = draw(st.sampled_from(sorted(FRAME_TYPES)))
    names = [f.name for f in attrs.fields(FRAME_TYPES[frame_type])] + ["id", "extra"]
    chosen = draw(st.lists(st.sampled_from(names), unique=True))
    obj: dict[str, Any] = {"type": frame_type}
    for name in chosen:
        obj[name] = draw(hostile_values)
    return obj


@settings(max_examples=500, deadline=None)
@given(obj=frame_shaped_objects())
def test_frame_shaped_garbage_never_raises_anything_but_protocol_error(obj: dict[str, Any]) -> None:
    result = decode_or_protocol_error(dumps(obj))
    if isinstance(result, Frame):
        assert result.type == obj["type"]
        assert decode(encode(result)) == result
    elif isinstance(obj.get("id"), str) and len(obj["id"]) <= MAX_ID_LENGTH:
        assert result.frame_id == obj["id"]
    else:
        assert result.frame_id is None


@settings(max_examples=200, deadline=None)
@given(frame_type=st.sampled_from(sorted(FRAME_TYPES)), data=st.data())
def test_every_required_field_is_required(frame_type: str, data: st.DataObject) -> None:
    frame = data.draw(FRAME_STRATEGIES[frame_type])
    obj = json.loads(encode(frame))
    required = [f.name for f in attrs.fields(FRAME_TYPES[frame_type]) if f.default is attrs.NOTHING]
    for name in required:
        broken = {k: v for k, v in obj.items() if k != name}
        error = error_of(dumps(broken))
        assert error.code == "missing_field"
        assert name in error.message


# --------------------------------------------------------------------------- specific codes


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "{'type': 'heartbeat'}",
        '{"type":"heartbeat","seq":1,}',
        '{"type":"heartbeat" "seq":1}',
        "NaN",
        "Infinity",
        "-Infinity",
        '{"type":"heartbeat_ack","seq":1,"hub_time":NaN}',
        '{"type":"heartbeat_ack","seq":1,"hub_time":Infinity}',
        '{"type":"heartbeat_ack","seq":1,"hub_time":-Infinity}',
        '{"type":"publish","subject":"a","data":[NaN]}',
        '{"type":"publish","subject":"a","data":"\x00"}',
        '{"type":"heartbeat","seq":1} trailing',
        '{"type":"heartbeat","seq":1' + "0" * 5000 + "}",
        "[" * 100_000,
        "{" * 100_000,
        '{"type":"publish","subject":"a","data":' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"a":' * 50_000 + "1" + "}" * 50_000,
    ],
    ids=lambda t: repr(t[:40]),
)
def test_invalid_json(text: str) -> None:
    error = error_of(text)
    assert error.code == "invalid_json"
    assert error.frame_id is None


@pytest.mark.parametrize("text", ["[]", "[{}]", "1", "-2.5", '"frame"', "null", "true", "false"])
def test_not_an_object(text: str) -> None:
    assert code_of(text) == "not_an_object"


@pytest.mark.parametrize(
    ("text", "frame_id"),
    [
        ("{}", None),
        ('{"id":"x1"}', "x1"),
        ('{"id":"x1","subject":"a"}', "x1"),
        ('{"type":"publish"}', None),
        ('{"type":"publish","id":"p1","data":1}', "p1"),
        ('{"type":"heartbeat"}', None),
        ('{"type":"subscribe","id":"s1"}', "s1"),
        ('{"type":"auth","agent_id":"a","tenant_id":"t","algorithm":"ed25519"}', None),
        ('{"type":"presence_query"}', None),
        ('{"type":"presence_state","id":"q","agents":[{"tenant_id":"t"}]}', "q"),
        ('{"type":"error"}', None),
    ],
)
def test_missing_field(text: str, frame_id: str | None) -> None:
    error = error_of(text)
    assert error.code == "missing_field"
    assert error.frame_id == frame_id


@pytest.mark.parametrize(
    "text",
    ['{"type":"nope"}', '{"type":""}', '{"type":"HEARTBEAT","seq":1}', '{"type":"Frame"}'],
)
def test_unknown_type(text: str) -> None:
    assert code_of(text) == "unknown_type"


def test_unknown_type_carries_the_id_and_bounds_the_message() -> None:
    error = error_of(dumps({"type": "x" * 10_000, "id": "u1"}))
    assert error.code == "unknown_type"
    assert error.frame_id == "u1"
    assert len(str(error)) < 200


@pytest.mark.parametrize(
    "obj",
    [
        {"type": 5},
        {"type": None},
        {"type": ["heartbeat"]},
        {"type": "heartbeat", "seq": "x"},
        {"type": "heartbeat", "seq": True},
        {"type": "heartbeat", "seq": False},
        {"type": "heartbeat", "seq": -1},
        {"type": "heartbeat", "seq": 1.5},
        {"type": "heartbeat", "seq": 1.0},
        {"type": "heartbeat_ack", "seq": 1, "hub_time": "now"},
        {"type": "heartbeat_ack", "seq": 1, "hub_time": -0.5},
        {"type": "heartbeat_ack", "seq": 1, "hub_time": True},
        {"type": "subscribed", "id": "s", "subject": 5},
        {"type": "message", "subject": 5, "sender": "a", "message_id": "m", "time": 0},
        {"type": "published", "id": "p", "message_id": "m", "duplicate": "yes"},
        {"type": "published", "id": "p", "message_id": "m", "duplicate": 1},
        {"type": "subscribe", "id": "", "subject": "a"},
        {"type": "subscribe", "id": 5, "subject": "a"},
        {"type": "subscribe", "id": "x" * (MAX_ID_LENGTH + 1), "subject": "a"},
        {"type": "publish", "subject": "a", "id": 7},
        {"type": "presence_state", "id": "q", "agents": "all"},
        {"type": "presence_state", "id": "q", "agents": [1]},
        {"type": "leave", "reason": 1},
        {"type": "error", "code": 404},
        {"type": "admin_auth", "token": None},
    ]
    + [
        {
            "type": "auth",
            "agent_id": "a",
            "tenant_id": "t",
            "algorithm": "ed25519",
            "signature": "s",
            **bad,
        }
        for bad in (
            {"heartbeat_interval": "30"},
            {"heartbeat_interval": -1},
            {"heartbeat_interval": False},
            {"heartbeat_timeout_multiplier": None},
            {"heartbeat_timeout_multiplier": "3"},
            {"capabilities": [1]},
            {"capabilities": "publish"},
            {"capabilities": {"a": "b"}},
            {"metadata": []},
            {"metadata": "x"},
            {"protocol": "1"},
            {"protocol": 1.0},
            {"agent_id": ""},
            {"tenant_id": "t" * (MAX_ID_LENGTH + 1)},
            {"signature": 5},
        )
    ],
    ids=lambda obj: repr(obj)[:70],
)
def test_invalid_field(obj: dict[str, Any]) -> None:
    assert code_of(dumps(obj)) == "invalid_field"


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"heartbeat_ack","seq":1,"hub_time":1' + "0" * 400 + "}",
        '{"type":"challenge","nonce":"n","hub_id":"h","expires_in":-1' + "0" * 400 + "}",
        '{"type":"auth","agent_id":"a","tenant_id":"t","algorithm":"ed25519","signature":"s",'
        '"heartbeat_interval":1' + "0" * 400 + "}",
    ],
    ids=["heartbeat_ack.hub_time", "challenge.expires_in", "auth.heartbeat_interval"],
)
def test_huge_integer_in_a_number_field_is_invalid_field(text: str) -> None:
    # An integer too large for a float must be refused like any other bad number,
    # not escape as OverflowError (which would crash a hub reading an auth frame).
    assert code_of(text) == "invalid_field"


def test_integer_fields_stop_at_2_53_and_data_integers_are_exact() -> None:
    """Issue 9 item 16: a field the hub reads holds what every client can represent;
    ``data`` is the publisher's and is relayed exactly (docs/protocol.md §2)."""
    top = 2**53 - 1
    assert decode(dumps({"type": "heartbeat", "seq": top})) == Heartbeat(seq=top)
    for too_big in (top + 1, 10**1000):
        with pytest.raises(ProtocolError) as refused:
            decode(dumps({"type": "heartbeat", "seq": too_big}))
        assert refused.value.code == "invalid_field"
    big = 10**1000
    frame = decode(dumps({"type": "publish", "subject": "a", "data": [big, -big]}))
    assert isinstance(frame, Publish)
    assert frame.data == [big, -big]
    assert decode(encode(frame)) == frame


@pytest.mark.parametrize(
    ("obj", "frame_id"),
    [
        ({"type": "publish", "subject": "a..b", "id": "p1"}, "p1"),
        ({"type": "publish", "subject": "tasks.*", "id": "p2"}, "p2"),
        ({"type": "publish", "subject": "tasks.>"}, None),
        ({"type": "publish", "subject": ""}, None),
        ({"type": "publish", "subject": ".a"}, None),
        ({"type": "publish", "subject": "a b"}, None),
        ({"type": "publish", "subject": "caf\u00e9"}, None),
        ({"type": "publish", "subject": "a\ud800"}, None),
        ({"type": "publish", "subject": 5, "id": "p3"}, "p3"),
        ({"type": "publish", "subject": None}, None),
        ({"type": "publish", "subject": "a", "reply_to": "x.*", "id": "p4"}, "p4"),
        ({"type": "publish", "subject": "a", "reply_to": "a.b" * 100}, None),
        ({"type": "publish", "subject": ".".join("a" * 17)}, None),
        ({"type": "subscribe", "id": "s1", "subject": "ta*sks"}, "s1"),
        ({"type": "subscribe", "id": "s2", "subject": "a.>.b"}, "s2"),
        ({"type": "subscribe", "id": "s3", "subject": "a..b"}, "s3"),
        ({"type": "unsubscribe", "id": "u1", "subject": ">>"}, "u1"),
    ],
    ids=lambda v: repr(v)[:60],
)
def test_invalid_subject(obj: dict[str, Any], frame_id: str | None) -> None:
    error = error_of(dumps(obj))
    assert error.code == "invalid_subject"
    assert error.frame_id == frame_id


def test_valid_subjects_and_patterns_are_accepted() -> None:
    assert decode('{"type":"publish","subject":"$presence.x"}') == Publish(subject="$presence.x")
    assert decode('{"type":"subscribe","id":"1","subject":">"}') == Subscribe(id="1", subject=">")
    assert decode('{"type":"subscribe","id":"1","subject":"*.a.>"}') == Subscribe(
        id="1", subject="*.a.>"
    )
    long_subject = ".".join(["a" * 15] * 16)
    assert len(long_subject) == 255
    assert decode(dumps({"type": "publish", "subject": long_subject})) == Publish(
        subject=long_subject
    )


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "heartbeat", "seq": "x", "id": "h1"},
        {"type": "nope", "id": "h1"},
        {"type": "publish", "id": "h1"},
        {"type": "publish", "subject": "a", "data": 1, "reply_to": 5, "id": "h1"},
        {"type": "presence_state", "id": "h1", "agents": [{"tenant_id": 1}]},
        {"id": "h1"},
        {"type": 7, "id": "h1"},
    ],
    ids=lambda v: repr(v)[:60],
)
def test_error_carries_a_string_id(obj: dict[str, Any]) -> None:
    assert error_of(dumps(obj)).frame_id == "h1"


@pytest.mark.parametrize("bad_id", [5, None, ["h1"], {"id": "h1"}, "x" * (MAX_ID_LENGTH + 1)])
def test_error_carries_no_unusable_id(bad_id: object) -> None:
    error = error_of(dumps({"type": "nope", "id": bad_id}))
    assert error.code == "unknown_type"
    assert error.frame_id is None


def test_frame_id_at_the_length_limit_is_carried() -> None:
    frame_id = "i" * MAX_ID_LENGTH
    assert error_of(dumps({"type": "nope", "id": frame_id})).frame_id == frame_id


# --------------------------------------------------------------------------- size limit


def test_default_limit_is_one_mebibyte() -> None:
    assert DEFAULT_MAX_FRAME_BYTES == 1024 * 1024
    head = '{"type":"publish","subject":"a","data":"'
    fits = head + "x" * (DEFAULT_MAX_FRAME_BYTES - len(head) - 2) + '"}'
    assert len(fits) == DEFAULT_MAX_FRAME_BYTES
    assert isinstance(decode(fits), Publish)
    too_big = head + "x" * (DEFAULT_MAX_FRAME_BYTES - len(head) - 1) + '"}'
    error = error_of(too_big)
    assert error.code == "frame_too_large"
    assert error.frame_id is None


def test_huge_string_beyond_max_bytes() -> None:
    assert code_of("x" * (8 * DEFAULT_MAX_FRAME_BYTES)) == "frame_too_large"
    # Checked before parsing: even a hopeless nesting bomb is just "too large".
    assert code_of("[" * (DEFAULT_MAX_FRAME_BYTES + 1)) == "frame_too_large"


@pytest.mark.parametrize("char", ["\u00e9", "\u20ac", "\U0001f600", "\ud800"])
def test_limit_counts_utf8_bytes_not_characters(char: str) -> None:
    width = len(char.encode("utf-8", "surrogatepass"))
    head, tail = '{"type":"publish","subject":"a","data":"', '"}'
    room = 1000 - len(head) - len(tail)
    fits = head + char * (room // width) + "x" * (room % width) + tail
    assert len(fits.encode("utf-8", "surrogatepass")) == 1000
    assert isinstance(decode(fits, max_bytes=1000), Publish)
    over = head + char * (room // width + 1) + tail
    assert len(over) <= 1000 < len(over.encode("utf-8", "surrogatepass"))
    assert code_of(over, max_bytes=1000) == "frame_too_large"


# --------------------------------------------------------------------------- surrogates


def test_lone_surrogates_are_data_not_crashes() -> None:
    # Escaped lone surrogates are valid JSON; they decode to Python str as-is.
    frame = decode('{"type":"publish","subject":"a","data":"\\ud800x\\udfff"}')
    assert frame == Publish(subject="a", data="\ud800x\udfff")
    # encode() escapes them again (ASCII-only output), so the text is valid UTF-8.
    text = encode(frame)
    assert text.isascii()
    assert decode(text) == frame
    # A raw lone surrogate character in the text behaves the same.
    assert decode('{"type":"publish","subject":"a","data":"\ud800"}') == Publish(
        subject="a", data="\ud800"
    )


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.just('"')))
def test_surrogate_soup_never_raises_anything_but_protocol_error(text: str) -> None:
    result = decode_or_protocol_error(text)
    assert isinstance(result, ProtocolError)
    assert result.code in {"invalid_json", "not_an_object"}
