"""The hub's fast JSON paths give exactly what the standard library gives.

``protocol/_json.py`` (encoders and a decoder built once), the templates ``encode`` uses
for ``published`` and ``heartbeat_ack``, and ``encode_message``'s spelled-out head and
tail are checked against the plain ``json`` calls they replace: the same text, the same
values, the same exceptions with the same messages.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs
import pytest

from artcafe_trio.protocol._fields import _to_object
from artcafe_trio.protocol._frames import HeartbeatAck, Published, encode, encode_message
from artcafe_trio.protocol._json import dumps_compact, loads_strict, reject_constant

VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**64,
    10**300,
    0.1,
    1e16,
    5e-324,
    -0.0,
    "",
    'é\u2028"\\/\n',
    "\ud800",
    [],
    {},
    {"a": [1, 2.5, {"b": None}], "é": "x"},
    [[[[["deep"]]]]],
]


def reference_dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def outcome(call: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", call(*args)
    except Exception as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("value", VALUES)
def test_dumps_compact_is_json_dumps(value: Any) -> None:
    assert dumps_compact(value) == reference_dumps(value)


@pytest.mark.parametrize(
    "value", [math.inf, -math.inf, math.nan, [1, math.inf], {"a": object()}, {1: {2j: 3}}]
)
def test_dumps_compact_refuses_what_json_dumps_refuses(value: Any) -> None:
    expected = outcome(reference_dumps, value)
    assert expected[0] != "ok"
    assert outcome(dumps_compact, value) == expected
    assert outcome(dumps_compact, [1, 2]) == ("ok", "[1,2]")  # no stale state after an error


def test_dumps_compact_still_detects_cycles() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    assert outcome(dumps_compact, cycle) == outcome(reference_dumps, cycle)
    assert outcome(dumps_compact, cycle)[0] == "ValueError"


def reference_loads(text: str) -> Any:
    return json.loads(text, parse_constant=reject_constant)


TEXTS = [
    "{}",
    '{"type":"publish","subject":"a.b","data":{"x":[1,2.5e3,-0,true,null]},"id":"1"}',
    " {}",
    "{} ",
    "\n{}\t",
    "{}x",
    "{}{}",
    "",
    " ",
    "\ufeff{}",
    "NaN",
    "[1,NaN]",
    '{"a":Infinity}',
    '{"a":-Infinity}',
    '{"a":1e999}',
    '{"a":"\\ud800"}',
    '{"a":"\\x"}',
    '{"a":1,"a":2}',
    '{"a":"raw\ncontrol"}',
    "[" * 100 + "]" * 100,
    "[" * 100_000,
    '"just a string"',
    "18446744073709551616",
]


@pytest.mark.parametrize("text", TEXTS)
def test_loads_strict_is_json_loads(text: str) -> None:
    expected = outcome(reference_loads, text)
    got = outcome(loads_strict, text)
    if expected[0] == "ok" and isinstance(expected[1], float) and math.isnan(expected[1]):
        pytest.fail("a NaN was accepted")  # pragma: no cover
    assert got == expected


def generic_encode(frame: Any) -> str:
    """``encode`` before the templates: every frame through ``_to_object``."""
    return reference_dumps({"type": frame.type, **_to_object(frame)})


@pytest.mark.parametrize(
    "frame",
    [
        Published(id="p-1", message_id="hub-1"),
        Published(id="é\"'\\", message_id="h\u2028", duplicate=True),
        HeartbeatAck(seq=0, hub_time=0.0),
        HeartbeatAck(seq=2**53 - 1, hub_time=1764650000.123456),
        HeartbeatAck(seq=7, hub_time=1e16),
        HeartbeatAck(seq=7, hub_time=5e-324),
        HeartbeatAck(seq=7, hub_time=12),  # an int time: not the template's, same text
    ],
)
def test_templates_write_what_the_generic_encoder_writes(frame: Any) -> None:
    assert encode(frame) == generic_encode(frame)


@pytest.mark.parametrize("hub_time", [math.inf, math.nan])
def test_a_non_finite_ack_time_is_refused_as_before(hub_time: float) -> None:
    frame = HeartbeatAck(seq=1, hub_time=hub_time)
    assert outcome(encode, frame) == outcome(generic_encode, frame)
    assert outcome(encode, frame)[0] == "ValueError"


def test_an_odd_published_goes_the_generic_way() -> None:
    frame = attrs.evolve(Published(id="p", message_id="m"), duplicate=1)
    assert (
        encode(frame)
        == generic_encode(frame)
        == ('{"type":"published","id":"p","message_id":"m","duplicate":1}')
    )


def reference_message(**kw: Any) -> str:
    """``encode_message`` as it was: two ``json.dumps`` around the data."""
    head = {"type": "message", "subject": kw["subject"]}
    if kw["subscription"] is not None:
        head["subscription"] = kw["subscription"]
    tail = {"sender": kw["sender"], "message_id": kw["message_id"], "time": kw["time"]}
    if kw.get("reply_to") is not None:
        tail["reply_to"] = kw["reply_to"]
    return (
        json.dumps(head, separators=(",", ":"))[:-1]
        + ',"data":'
        + kw["data_json"]
        + ","
        + json.dumps(tail, separators=(",", ":"))[1:]
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"subscription": None, "time": 1764650000.25, "reply_to": None},
        {"subscription": "a.*", "time": 0.1, "reply_to": "$reply.s-1.x"},
        {"subscription": "é.>", "time": 3, "reply_to": None},
        {"subscription": None, "time": math.inf, "reply_to": 'r"q'},
    ],
)
def test_encode_message_is_what_it_was(kw: dict[str, Any]) -> None:
    kw = {"subject": 'a.é"b', "data_json": '{"x":1}', "sender": "ag\\1", "message_id": "h-1", **kw}
    assert encode_message(**kw) == reference_message(**kw)
