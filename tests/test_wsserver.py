"""The hub's wsproto-driven WebSocket (``artcafe_trio.hub._wsserver``), byte by byte.

A wsproto client speaks to ``read_upgrade_request`` / ``ServerWebSocket`` over a memory
stream pair, so the close codes, control frames and limits are checked exactly.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

from artcafe_trio.hub._wsserver import ServerWebSocket, frame_text, read_upgrade_request

pytestmark = pytest.mark.timeout(10)


class Client:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    async def events(self) -> list[object]:
        """Events from whatever the server sends next (or its end of stream)."""
        data = await self.stream.receive_some(65536)
        self.ws.receive_data(bytes(data) if data else None)
        return list(self.ws.events())


async def opened(max_message_size: int = 1000) -> tuple[Client, ServerWebSocket]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = Client(client_stream)
    await client_stream.send_all(client.ws.send(Request(host="h", target="/x?y=1")))
    request = await read_upgrade_request(server_stream, max_message_size=max_message_size)
    assert request is not None
    assert request.path == "/x?y=1"
    server = await request.accept()
    assert any(isinstance(e, AcceptConnection) for e in await client.events())
    return client, server


async def close_code(server: ServerWebSocket) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        await server.get_message()
    return int(closed.value.reason.code)


def test_frame_text_is_what_wsproto_sends() -> None:
    sizes = [0, 1, 125, 126, 127, 0xFFFF, 0x10000, 70_000]
    for text in ["héllo", "é" * 63, "é" * 62 + "x", *("x" * size for size in sizes)]:
        assert frame_text(text) == bytes(FrameProtocol(False, []).send_data(text, True))


async def test_messages_fragments_and_ping() -> None:
    client, server = await opened()
    await client.stream.send_all(
        client.ws.send(TextMessage(data="ab", message_finished=False))
        + client.ws.send(Ping(payload=b"p"))
        + client.ws.send(TextMessage(data="cd", message_finished=True))
        + client.ws.send(TextMessage(data="ef"))
    )
    assert await server.get_message() == "abcd"
    assert await server.get_message() == "ef"
    await server.send_message("answer")  # the pong goes out with the next write
    events = await client.events()
    assert isinstance(events[0], Pong) and events[0].payload == b"p"
    assert isinstance(events[1], TextMessage) and events[1].data == "answer"


async def test_invalid_utf8_closes_1007() -> None:
    client, server = await opened()
    await client.stream.send_all(bytes([0x81, 0x82, 0, 0, 0, 0, 0xC3, 0x28]))  # masked, bad
    assert await close_code(server) == 1007
    await server.aclose()  # after a violation: the close frame, and no wait for an answer
    [close] = await client.events()
    assert isinstance(close, CloseConnection) and close.code == 1007


async def test_unmasked_client_frame_closes_1002() -> None:
    client, server = await opened()
    await client.stream.send_all(bytes([0x81, 0x02]) + b"hi")
    assert await close_code(server) == 1002


async def test_message_over_the_limit_closes_1009_before_it_is_all_read() -> None:
    client, server = await opened(max_message_size=1000)
    await client.stream.send_all(client.ws.send(TextMessage(data="x" * 5000)))
    assert await close_code(server) == 1009


async def test_peer_close_is_echoed_and_reported() -> None:
    client, server = await opened()
    await client.stream.send_all(client.ws.send(CloseConnection(code=4321, reason="bye")))
    assert await close_code(server) == 4321
    await server.aclose()
    events = await client.events()
    assert isinstance(events[0], CloseConnection) and events[0].code == 4321


async def test_end_of_stream_is_1006() -> None:
    client, server = await opened()
    await client.stream.aclose()
    assert await close_code(server) == 1006
    with pytest.raises(ConnectionClosed):
        await server.send_message("late")


async def test_a_request_that_is_no_upgrade_gets_http_400() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert await read_upgrade_request(server_stream, max_message_size=10) is None
    assert (await client_stream.receive_some(65536)).startswith(b"HTTP/1.1 400 ")


async def test_reject_sends_the_status_and_body() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = Client(client_stream)
    await client_stream.send_all(client.ws.send(Request(host="h", target="/nope")))
    request = await read_upgrade_request(server_stream, max_message_size=10)
    assert request is not None
    await request.reject(404, body=b"unknown path")
    events = await client.events()
    assert isinstance(events[0], RejectConnection) and events[0].status_code == 404


async def opened_lockstep() -> tuple[trio.abc.Stream, ServerWebSocket]:
    """A server WebSocket over a lockstep pair: a write waits for the reader."""
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    ws = WSConnection(ConnectionType.CLIENT)
    accepted: list[ServerWebSocket] = []

    async def upgrade() -> None:
        request = await read_upgrade_request(server_stream, max_message_size=1 << 20)
        assert request is not None
        accepted.append(await request.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upgrade)
        await client_stream.send_all(ws.send(Request(host="h", target="/x")))
        ws.receive_data(bytes(await client_stream.receive_some(65536)))
    assert any(isinstance(e, AcceptConnection) for e in ws.events())
    return client_stream, accepted[0]


async def test_a_write_cut_short_is_never_followed_by_a_close_frame() -> None:
    """A slow consumer cut off in the middle of a frame: the stream's state is unknown
    (trio: after a cancelled send_all only aclose is valid), so the close must not
    write a close frame after the half-sent one; it closes the stream (the peer sees the
    connection end) and does not fail."""
    client, server = await opened_lockstep()
    data = frame_text("x" * 100_000)
    with trio.move_on_after(1):  # the consumer reads a little, then stops
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_frames, data)
            assert len(await client.receive_some(1000)) <= 1000
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    with trio.fail_after(2):
        await server.aclose(4004, "slow consumer")
    with pytest.raises(ConnectionClosed):
        await server.send_message("more")
    rest = b""
    with trio.fail_after(2):
        while chunk := await client.receive_some(65536):
            rest += chunk
    assert len(rest) < len(data)  # the rest of the half-sent frame at most: no close frame


async def test_pings_before_a_session_are_held_only_up_to_a_bound() -> None:
    """Before a session takes its pongs (during the handshake), they wait for the next
    write; a peer that keeps pinging is closed with 1008 instead of growing that."""
    from artcafe_trio.hub._wsserver import MAX_PENDING_CONTROL

    client, server = await opened()
    pings = MAX_PENDING_CONTROL // 127 + 1  # each pong is 127 bytes
    await client.stream.send_all(client.ws.send(Ping(payload=b"p" * 125)) * pings)
    assert await close_code(server) == 1008
    assert server.unsent_bytes <= MAX_PENDING_CONTROL + 200  # the close frame
