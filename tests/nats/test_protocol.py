"""The sans-IO NATS protocol core: parser events, precise errors, header round-trips."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artcafe_trio.nats import BadSubjectError, NatsProtocolError
from artcafe_trio.nats._protocol import (
    MAX_CONTROL_LINE,
    Err,
    Event,
    Headers,
    Info,
    Msg,
    NatsParser,
    Ok,
    Ping,
    Pong,
    decode_headers,
    encode_connect,
    encode_headers,
    encode_pub,
    encode_sub,
    encode_unsub,
)

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=8)
subject = st.lists(token, min_size=1, max_size=4).map(".".join)
header_key = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnop-_0123456789", min_size=1, max_size=10
)
header_value = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), max_size=12
) | st.just("with inner space")
#: A status description: one trimmed line, possibly with inner spaces ("No Responders").
description = st.lists(header_value.filter(bool), max_size=3).map(" ".join)
headers = st.builds(
    Headers,
    st.lists(st.tuples(header_key, header_value), max_size=5).map(tuple),
    st.one_of(st.none(), st.integers(100, 999)),
    description,
).map(lambda h: h if h.status is not None else Headers(h.fields))


def server_msg(subj: str, sid: int, reply: str | None, data: bytes, hdrs: Headers | None) -> bytes:
    """What the server sends for a message (its MSG/HMSG mirrors our PUB/HPUB)."""
    wire = encode_pub(
        subj, data, reply=reply, headers=encode_headers(hdrs) if hdrs is not None else None
    )
    op, rest = wire.split(b" ", 1)
    name = rest.split(b" ", 1)[0]
    return (b"MSG " if op == b"PUB" else b"HMSG ") + name + b" %d" % sid + rest[len(name) :]


messages = st.builds(
    lambda subj, sid, reply, data, hdrs: (
        server_msg(subj, sid, reply, data, hdrs),
        Msg(subj, sid, reply, data, hdrs),
    ),
    subject,
    st.integers(1, 10**6),
    st.one_of(st.none(), subject),
    st.binary(max_size=64),
    st.one_of(st.none(), headers),
)
controls = st.sampled_from(
    [
        (b"PING\r\n", Ping()),
        (b"PONG\r\n", Pong()),
        (b"+OK\r\n", Ok()),
        (b"-ERR 'Stale Connection'\r\n", Err("Stale Connection")),
        (
            b'INFO {"server_id":"x","max_payload":1024}\r\n',
            Info({"server_id": "x", "max_payload": 1024}),
        ),
        (b"ping\r\n", Ping()),
    ]
)
streams = st.lists(st.one_of(messages, controls), max_size=12)


def feed_all(chunks: list[bytes]) -> list[Event]:
    parser = NatsParser()
    events: list[Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events


@settings(max_examples=300, deadline=None)
@given(streams, st.data())
def test_any_split_of_a_valid_stream_gives_the_same_events(
    items: list[tuple[bytes, Event]], data: st.DataObject
) -> None:
    wire = b"".join(raw for raw, _ in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    expected = [event for _, event in items]
    assert feed_all(chunks) == expected
    assert feed_all([wire]) == expected
    assert feed_all([wire[i : i + 1] for i in range(len(wire))]) == expected


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"FOO bar\r\n", "unknown_operation"),
        (b"\r\n", "unknown_operation"),
        (b"PING\n", "missing_crlf"),
        (b"MSG a 1\r\n", "bad_arguments"),
        (b"MSG a x 3\r\nabc\r\n", "bad_arguments"),
        (b"MSG a 1 -3\r\n", "bad_size"),
        (b"MSG a 1 1_0\r\n", "bad_size"),
        (b"MSG a 1 3\r\nabcXY", "missing_crlf"),
        (b"HMSG a 1 20 10\r\n", "bad_size"),
        (b"HMSG a 1 2 10\r\n", "bad_size"),
        (b"HMSG a 1 12 12\r\nHTTP/1.1\r\n\r\n\r\n", "bad_header"),
        (b"HMSG a 1 15 15\r\nNATS/1.0\r\nA\r\n\r\n\r\n", "bad_header"),
        (b"HMSG a 1 14 14\r\nNATS/1.0 5\r\n\r\n\r\n", "bad_header"),
        (b"INFO {nope\r\n", "bad_json"),
        (b"INFO [1]\r\n", "bad_json"),
        (b"MSG a 1 99999999999\r\n", "payload_too_large"),
        (b"MSG \xff 1 0\r\n\r\n", "bad_arguments"),
        (b"X" * (MAX_CONTROL_LINE + 2), "line_too_long"),
    ],
)
def test_malformed_input_gives_a_precise_error(wire: bytes, reason: str) -> None:
    parser = NatsParser()
    with pytest.raises(NatsProtocolError) as caught:
        parser.feed(wire)
    assert caught.value.reason == reason
    with pytest.raises(NatsProtocolError):  # the parser stays poisoned
        parser.feed(b"PING\r\n")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_but_a_protocol_error(wire: bytes) -> None:
    parser = NatsParser(max_payload=1000)
    try:
        events = parser.feed(wire)
    except NatsProtocolError:
        return
    assert all(isinstance(e, Info | Msg | Ping | Pong | Ok | Err) for e in events)


@settings(max_examples=300, deadline=None)
@given(headers)
def test_headers_round_trip(h: Headers) -> None:
    assert decode_headers(encode_headers(h)) == h


@settings(max_examples=100, deadline=None)
@given(description.filter(bool), st.sampled_from([" ", "  ", "\t"]), st.booleans())
def test_an_untrimmed_status_description_is_refused_like_a_value(
    text: str, pad: str, leading: bool
) -> None:
    padded = pad + text if leading else text + pad
    with pytest.raises(BadSubjectError, match="description"):
        encode_headers(Headers((), 503, padded))


def test_inline_status_and_multi_value_headers() -> None:
    no_responders = decode_headers(b"NATS/1.0 503\r\n\r\n")
    assert no_responders.status == 503
    assert no_responders.description == ""
    assert len(no_responders) == 0
    heartbeat = decode_headers(b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 7\r\n\r\n")
    assert (heartbeat.status, heartbeat.description) == (100, "Idle Heartbeat")
    assert heartbeat["Nats-Last-Consumer"] == "7"
    multi = Headers.of({"A": ["1", "2"], "B": "x"})
    assert encode_headers(multi) == b"NATS/1.0\r\nA: 1\r\nA: 2\r\nB: x\r\n\r\n"
    assert multi["A"] == "1"
    assert multi.get_all("A") == ["1", "2"]
    assert list(multi) == ["A", "B"]
    assert "B" in multi
    assert "a" not in multi  # keys are case-sensitive
    assert (
        encode_headers(Headers((), 503, "No Responders")) == b"NATS/1.0 503 No Responders\r\n\r\n"
    )


def test_no_responders_message_parses_to_a_503_status() -> None:
    wire = b"HMSG _INBOX.x.1 3 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
    (event,) = NatsParser().feed(wire)
    assert isinstance(event, Msg)
    assert event.headers is not None
    assert event.headers.status == 503
    assert event.data == b""


def test_commands_encode_exactly() -> None:
    assert encode_pub("a.b", b"hi") == b"PUB a.b 2\r\nhi\r\n"
    assert encode_pub("a.b", b"hi", reply="r") == b"PUB a.b r 2\r\nhi\r\n"
    block = encode_headers({"K": "v"})
    assert (
        encode_pub("a", b"xy", headers=block) == b"HPUB a 18 20\r\nNATS/1.0\r\nK: v\r\n\r\nxy\r\n"
    )
    assert encode_sub("a.*", 3) == b"SUB a.* 3\r\n"
    assert encode_sub("a.*", 3, queue="q") == b"SUB a.* q 3\r\n"
    assert encode_unsub(3) == b"UNSUB 3\r\n"
    assert encode_unsub(3, 5) == b"UNSUB 3 5\r\n"
    assert encode_connect({"verbose": False}) == b'CONNECT {"verbose":false}\r\n'


@pytest.mark.parametrize("bad", ["", "a b", "a\r\nPUB x 1", "a\tb", " ", "\ud800"])
def test_subjects_that_would_break_framing_are_refused(bad: str) -> None:
    with pytest.raises(BadSubjectError):
        encode_pub(bad, b"")
    with pytest.raises(BadSubjectError):
        encode_sub("ok", 1, queue=bad)


@pytest.mark.parametrize(
    "bad",
    [{"A:B": "v"}, {"A B": "v"}, {"": "v"}, {"A": "x\r\nB: y"}, {"A": " padded"}],
)
def test_headers_that_would_break_framing_are_refused(bad: dict[str, str]) -> None:
    with pytest.raises(BadSubjectError):
        encode_headers(bad)


TRIO_FREE = textwrap.dedent(
    """
    import sys
    sys.modules["trio"] = None
    import artcafe_trio.nats._protocol as p
    assert sys.modules["trio"] is None
    assert not any(n.startswith("trio.") for n in sys.modules)
    assert "artcafe_trio.hub._hub" not in sys.modules and "artcafe_trio.agent._agent" not in sys.modules
    (m,) = p.NatsParser().feed(b"MSG a 1 2\\r\\nhi\\r\\n")
    assert m.data == b"hi"
    print("trio-free ok")
    """
)


def test_protocol_core_imports_without_trio() -> None:
    result = subprocess.run(
        [sys.executable, "-c", TRIO_FREE], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "trio-free ok"


def test_the_subpackage_does_not_import_the_hub_or_the_agent() -> None:
    script = (
        "import sys, artcafe_trio.nats\n"
        "assert 'artcafe_trio.hub._hub' not in sys.modules\n"
        "assert 'artcafe_trio.agent._agent' not in sys.modules\n"
        "assert 'trio_websocket' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_public_names_are_sorted_resolve_lazily_and_share_one_root() -> None:
    import artcafe_trio
    import artcafe_trio.nats as pkg
    from artcafe_trio.nats import _client, _errors, _kv, _protocol

    names = list(pkg.__all__)
    order = sorted(names, key=lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n))
    assert names == order
    for name in names:
        obj = getattr(pkg, name)
        assert any(getattr(m, name, None) is obj for m in (_client, _errors, _kv, _protocol)), name
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, artcafe_trio.ArtcafeError), name
    with pytest.raises(AttributeError, match="no_such_name"):
        pkg.no_such_name  # noqa: B018
