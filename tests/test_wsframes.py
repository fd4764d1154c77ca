"""The hub's frame splitter (``hub/_wsframes.py``) against wsproto alone.

The same client bytes, cut at random places, go to a ``ServerWebSocket`` with the
splitter and to one without it (wsproto parses everything): the messages, the control
frames queued in answer, the close code and reason must be the same, for well-formed
streams and for every kind of defect the splitter hands to wsproto.
"""

from __future__ import annotations

import os
import random
import struct

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.frame_protocol import XorMaskerSimple

from artcafe_trio.hub._wsframes import FrameSplitter, unmask
from artcafe_trio.hub._wsserver import ServerWebSocket

LIMIT = 300  # the message size limit of the receivers under test


def opened_server(*, fast: bool) -> ServerWebSocket:
    """A server-side ``ServerWebSocket`` in the OPEN state (no stream: fed by hand)."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="h", target="/")))
    assert any(isinstance(e, Request) for e in server.events())
    client.receive_data(server.send(AcceptConnection()))
    ws = ServerWebSocket(trio.testing.memory_stream_pair()[1], server, LIMIT)
    assert (ws._splitter is not None) is True  # the fast path engages on this wsproto
    if not fast:
        ws._splitter = None
    return ws


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length_bytes: int | None = None,
) -> bytes:
    """One client frame, built by hand (so that defects can be built too)."""
    size = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    if length_bytes is None:
        length_bytes = 0 if size <= 125 else 2 if size <= 0xFFFF else 8
    code = {0: size, 2: 126, 8: 127}[length_bytes]
    head = bytes([first, (0x80 if masked else 0) | code])
    if length_bytes == 2:
        head += struct.pack("!H", size)
    elif length_bytes == 8:
        head += struct.pack("!Q", size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(XorMaskerSimple(bytearray(mask)).process(bytearray(payload)))


def text(body: str, **kw: object) -> bytes:
    return frame(1, body.encode("utf-8"), **kw)  # type: ignore[arg-type]


GOOD = [
    text('{"type":"heartbeat","seq":1}'),
    text(""),
    text("é" * 40),
    text("x" * 200),  # a 2-byte length
    text("y" * LIMIT),  # exactly the limit
    frame(9, b"ping"),  # a ping between messages: answered with a pong
    frame(10, b"pong"),
    frame(2, b"\x00\x01"),  # binary: the hub refuses it later, wsproto decodes it
    text("frag-", fin=False) + frame(9, b"p") + frame(0, b"ment", fin=False) + frame(0, b"ed"),
]

BAD = [
    text("z" * (LIMIT + 1)),  # over the limit: 1009
    text("z" * 100, fin=False) + frame(0, b"z" * 250),  # fragments over the limit: 1009
    frame(1, b"\xff\xfe"),  # invalid UTF-8: 1007
    frame(1, "\ud800".encode("utf-8", "surrogatepass")),  # a lone surrogate: 1007
    text("unmasked", masked=False),  # 1002
    text("rsv", rsv=4),  # 1002 (no extension)
    frame(3, b"x"),  # reserved opcode
    frame(0, b"continuation without a start"),
    text("start", fin=False) + text("not a continuation"),
    text("short", length_bytes=2),  # non-minimal length
    text("short", length_bytes=8),
    frame(9, b"p" * 126),  # a control frame too long
    frame(9, b"p", fin=False),  # a fragmented control frame
    frame(8, struct.pack("!H", 1000) + b"bye"),  # a close
    frame(8, b"\x03"),  # a malformed close
    bytes([0x81, 0xFF]) + b"\xff" * 8 + b"mask",  # a 64-bit length with the top bit set
]


def chunks(data: bytes, rng: random.Random) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        step = rng.choice([1, 2, 3, 7, 13, 64, 1000])
        out.append(data[pos : pos + step])
        pos += step
    return out


def outcome(ws: ServerWebSocket, pieces: list[bytes], end: bool) -> tuple[object, ...]:
    for piece in pieces:
        if ws.closed is not None:
            break
        ws._receive(piece)
    if end and ws.closed is None:
        ws._receive(None)
    closed = ws.closed and (ws.closed.code, ws.closed.reason)
    return list(ws._messages), bytes(ws._control), closed, ws._failed


@pytest.mark.parametrize("seed", range(200))
def test_the_splitter_changes_nothing_wsproto_would_say(seed: int) -> None:
    rng = random.Random(seed)
    stream = [rng.choice(GOOD) for _ in range(rng.randint(1, 12))]
    if rng.random() < 0.6:
        stream.insert(rng.randint(0, len(stream)), rng.choice(BAD))
        stream.append(rng.choice(GOOD))  # after a defect nothing more may be read
    data = b"".join(stream)
    pieces = chunks(data, rng) if seed % 3 else [data]
    end = rng.random() < 0.5
    fast = outcome(opened_server(fast=True), pieces, end)
    slow = outcome(opened_server(fast=False), pieces, end)
    assert fast == slow


def test_byte_by_byte_is_the_same_as_at_once() -> None:
    data = b"".join(GOOD)
    one = outcome(opened_server(fast=True), [data[i : i + 1] for i in range(len(data))], False)
    assert one == outcome(opened_server(fast=True), [data], False)
    assert one[0][:2] == ['{"type":"heartbeat","seq":1}', ""]


def test_a_frame_is_decoded_here_only_when_whole() -> None:
    splitter = FrameSplitter(LIMIT)
    data = text("hello") + text("x" * 200)
    assert splitter.split(data[:3]) == []
    assert splitter.split(data[3:9]) == []
    assert splitter.split(data[9:20]) == ["hello"]
    assert splitter.split(data[20:]) == ["x" * 200]


def test_an_oversized_frame_is_passed_through_as_it_arrives() -> None:
    splitter = FrameSplitter(LIMIT)
    data = text("z" * 1000)
    first = splitter.split(data[:100])
    assert first == [data[:100]]  # not held back: wsproto's 1009 check runs early
    assert splitter.split(data[100:] + text("next")) == [data[100:], "next"]


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 65536])
def test_unmask_is_wsproto_s(size: int) -> None:
    payload, mask = os.urandom(size), os.urandom(4)
    assert unmask(payload, mask) == bytes(XorMaskerSimple(bytearray(mask)).process(payload))


def test_the_splitter_stays_off_when_wsproto_holds_bytes_already() -> None:
    """The splitter must start at a frame boundary: if wsproto holds part of a frame
    when the connection opens, wsproto alone reads that connection, and reads it right."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="h", target="/")))
    list(server.events())
    server.send(AcceptConnection())
    data = text("held") + text("after")
    server.receive_data(data[:5])
    ws = ServerWebSocket(trio.testing.memory_stream_pair()[1], server, LIMIT)
    assert ws._splitter is None
    ws._receive(data[5:])
    assert list(ws._messages) == ["held", "after"]
