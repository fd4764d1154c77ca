"""The hub's writes that never wait (a plain TCP stream on POSIX), over OS socket pairs.

A frame queued for a connection is written at once by the task that queued it; a reader
defers what it queues until the end of the burst it works through (one write per
receiver); the connection's writer task only finishes what the socket did not take.
The hub side of each pair is ``trio.SocketStream``, as it is for TCP.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable

import pytest
import trio
import trio.testing
from wsproto.frame_protocol import FrameProtocol

from artcafe_trio.hub._backplane import Route
from artcafe_trio.hub._pump import _Session
from artcafe_trio.hub._wsserver import ServerWebSocket, frame_text, nowait_socket
from artcafe_trio.protocol import Message, Publish, Published
from artcafe_trio.protocol._frames import encode
from artcafe_trio.testing import TestHub, open_test_hub

from .conftest import RawClient, _connect_over_a_socket_pair, raw_connect

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(os.name != "posix", reason="writes that never wait are POSIX only"),
]

SMALL_BUFFER = 4096


@pytest.fixture(autouse=True)
def socket_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TestHub, "connect_in_memory", _connect_over_a_socket_pair)


def session_of(hub: TestHub, agent_id: str) -> _Session:
    session = hub.hub._directory.live("t1", agent_id)  # type: ignore[attr-defined]
    assert isinstance(session, _Session)
    return session


def shrink_buffers(hub: TestHub, session: _Session) -> None:
    """Small kernel buffers on both sides of the receiver's pair: it fills at once."""
    server = session.ws._stream
    assert isinstance(server, trio.SocketStream)
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    client = hub._streams[-1].inner
    assert isinstance(client, trio.SocketStream)
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)


def stop_reading(hub: TestHub) -> trio.Event:
    """The last connected client stops reading its socket (at most the read it is in
    finishes) until the event is set."""
    stream = hub._streams[-1]
    receive = stream.receive_some
    resume = trio.Event()

    async def gated(max_bytes: int | None = None) -> bytes | bytearray:
        await resume.wait()
        return await receive(max_bytes)

    stream.receive_some = gated  # type: ignore[method-assign]
    return resume


def count_writes(ws: ServerWebSocket) -> list[int]:
    """The sizes of ``ws``'s writes that never wait, from now on."""
    sizes: list[int] = []
    write: Callable[[bytes], bool] = ws.send_frames_nowait

    def counted(data: bytes) -> bool:
        sizes.append(len(data))
        return write(data)

    ws.send_frames_nowait = counted  # type: ignore[method-assign]
    return sizes


async def connect(hub: TestHub, nursery: trio.Nursery, agent_id: str) -> RawClient:
    return await raw_connect(hub, nursery, agent_id, "t1", hub.register("t1", agent_id))


async def until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


async def stalled_receiver(
    hub: TestHub, nursery: trio.Nursery
) -> tuple[RawClient, _Session, trio.Event, RawClient]:
    """A receiver subscribed to ``big.>`` that has stopped reading (small buffers), and a
    publisher: (receiver, its session, the event that resumes its reading, publisher)."""
    receiver = await connect(hub, nursery, "receiver")
    await receiver.subscribe("big.>")
    session = session_of(hub, "receiver")
    shrink_buffers(hub, session)
    resume = stop_reading(hub)
    publisher = await connect(hub, nursery, "publisher")
    return receiver, session, resume, publisher


async def until_gone(hub: TestHub, agent_id: str) -> None:
    await until(lambda: hub.hub._directory.live("t1", agent_id) is None)  # type: ignore[attr-defined]


def test_only_a_plain_socket_stream_writes_without_waiting() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert nowait_socket(trio.SocketStream(trio.socket.from_stdlib_socket(a))) is not None
    _client, server = trio.testing.memory_stream_pair()
    assert nowait_socket(server) is None


async def test_the_test_kit_s_socket_pairs_write_without_waiting(nursery: trio.Nursery) -> None:
    async with open_test_hub() as hub:
        await connect(hub, nursery, "a")
        assert session_of(hub, "a").ws.writes_without_waiting


async def test_a_partial_write_is_finished_before_anything_else_even_a_pong() -> None:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import Ping, Pong, Request, TextMessage

    from artcafe_trio.hub._wsserver import read_upgrade_request

    a, b = socket.socketpair()
    client_stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    server_stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    server_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    client = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(client.send(Request(host="h", target="/")))
    request = await read_upgrade_request(server_stream, max_message_size=1 << 20)
    assert request is not None
    server = await request.accept()
    client.receive_data(await client_stream.receive_some(65536))
    list(client.events())  # the accept

    big = "x" * 300_000
    assert not server.send_frames_nowait(frame_text(big))  # the socket took only part
    await client_stream.send_all(client.send(Ping(b"p")) + client.send(TextMessage("next")))
    assert await server.get_message() == "next"  # the pong now waits to be sent
    received: list[object] = []  # whole messages, and the pong
    text = ""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.send_frames, frame_text("after"))
        while "after" not in received:
            client.receive_data(await client_stream.receive_some(65536))
            for event in client.events():
                if isinstance(event, TextMessage):
                    text += event.data
                    if event.message_finished:
                        received.append(text)
                        text = ""
                else:
                    received.append(event)
    assert len(received) == 3
    assert received[0] == big
    assert isinstance(received[1], Pong) and received[1].payload == b"p"
    assert received[2] == "after"
    await client_stream.aclose()
    await server.aclose()  # its close frame, then the end of stream instead of an answer


async def test_a_burst_of_publishes_is_one_write_to_the_receiver_and_one_to_the_publisher(
    nursery: trio.Nursery,
) -> None:
    async with open_test_hub() as hub:
        receiver = await connect(hub, nursery, "receiver")
        await receiver.subscribe("burst.>")
        publisher = await connect(hub, nursery, "publisher")
        to_receiver = count_writes(session_of(hub, "receiver").ws)
        to_publisher = count_writes(session_of(hub, "publisher").ws)
        masked = FrameProtocol(client=True, extensions=[])
        burst = b"".join(
            bytes(masked.send_data(encode(Publish(id=f"p{n}", subject=f"burst.{n}",
                                                  data={"n": n})), True))
            for n in range(20)
        )  # fmt: skip
        # One write by the publisher: the hub reads the burst at once.
        stream = hub._streams[-1].inner
        await stream.send_all(burst)
        messages = await receiver.messages(20)
        assert [m.data["n"] for m in messages] == list(range(20))
        answers = [await publisher.recv_type(Published) for _ in range(20)]
        assert [a.id for a in answers] == [f"p{n}" for n in range(20)]
        assert len(to_receiver) == 1 and len(to_publisher) == 1, (to_receiver, to_publisher)


async def test_a_receiver_that_stops_reading_gets_every_message_in_order_once_it_reads(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    async with open_test_hub(disconnect_grace=0) as hub:
        receiver, session, resume, publisher = await stalled_receiver(hub, nursery)
        payload = "y" * 20_000
        for n in range(30):  # the receiver's client reads none of these yet
            await publisher.send(Publish(id=f"p{n}", subject="big.x", data={"n": n, "p": payload}))
            assert (await publisher.recv_type(Published)).id == f"p{n}"
        assert session.outbox.busy  # its writer finishes what the socket did not take
        assert hub.hub.output_budget.used > 0
        resume.set()
        messages = await receiver.messages(30)
        assert [(m.data["n"], m.data["p"]) for m in messages] == [(n, payload) for n in range(30)]
        await until(lambda: not session.outbox.busy)
        assert hub.hub.output_budget.used == 0
        assert hub.hub.stats.slow_consumers == 0


async def test_a_write_that_stalls_cuts_the_receiver_off_at_the_stall_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    async with open_test_hub(disconnect_grace=0, write_stall_timeout=5.0) as hub:
        _receiver, session, _resume, publisher = await stalled_receiver(hub, nursery)
        await publisher.send(Publish(id="p", subject="big.x", data={"p": "z" * 300_000}))
        await publisher.recv_type(Published)
        start = trio.current_time()
        await until_gone(hub, "receiver")
        assert 5.0 <= trio.current_time() - start <= 5.02
        assert hub.hub.stats.slow_consumers == 1
        assert session.close_code == 4004
        # The size is what that write had to send: the frame's rest, not the empty
        # batch the writer was handed (the review found "a write of 0 bytes").
        match = re.fullmatch(
            r"slow consumer: a write of (\d+) bytes did not complete in 5 s", session.close_reason
        )
        assert match is not None, session.close_reason
        assert 0 < int(match[1]) < 300_010
        assert hub.hub.output_budget.used == 0
        await publisher.send(Publish(id="q", subject="big.x", data={}))
        assert (await publisher.recv_type(Published)).id == "q"  # the publisher is served


async def test_a_receiver_cut_off_while_its_writer_finishes_a_write_releases_its_output(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    async with open_test_hub(disconnect_grace=0, send_queue_size=5) as hub:
        _receiver, session, _resume, publisher = await stalled_receiver(hub, nursery)
        for n in range(8):
            await publisher.send(Publish(id=f"p{n}", subject="big.x", data={"p": "w" * 50_000}))
            await publisher.recv_type(Published)
        await until_gone(hub, "receiver")
        assert session.close_code == 4004 and "deliveries waiting" in session.close_reason
        assert hub.hub.output_budget.used == 0


async def test_a_receiver_gone_mid_delivery_ends_its_session_and_spares_the_caller(
    nursery: trio.Nursery,
) -> None:
    async with open_test_hub(disconnect_grace=0) as hub:
        watcher = await connect(hub, nursery, "watcher")
        await watcher.subscribe("$presence.gone")
        await connect(hub, nursery, "gone")
        session = session_of(hub, "gone")
        client = hub._streams[-1].inner
        assert isinstance(client, trio.SocketStream)
        client.socket.close()  # the peer vanishes; the hub has not noticed yet
        frame = json.dumps({"type": "message", "subject": "x", "data": {}})
        from artcafe_trio.hub._flow import Delivery

        session.deliver(Delivery(frame_text(frame)))  # written at once: EPIPE, no raise
        with trio.fail_after(5):
            [event] = [m for m in await watcher.messages(2) if m.data["status"] == "offline"][:1]
        assert event.data["agent_id"] == "gone"
        assert hub.hub.output_budget.used == 0
        assert isinstance(event, Message)


async def test_a_session_closed_right_after_a_write_was_handed_off_releases_its_output(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    from artcafe_trio.hub._flow import Delivery

    async with open_test_hub(disconnect_grace=0) as hub:
        await connect(hub, nursery, "receiver")
        session = session_of(hub, "receiver")
        shrink_buffers(hub, session)
        stop_reading(hub)
        session.deliver(Delivery(frame_text("v" * 300_000)))  # partial: handed to the writer
        assert session.outbox.busy and hub.hub.output_budget.used > 0
        session.close(4000, "closed before its writer ran")  # no checkpoint in between
        await until_gone(hub, "receiver")
        assert hub.hub.output_budget.used == 0


async def test_deliveries_of_a_burst_do_not_wait_for_a_backplane_that_waits(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """A cluster's publish_route waits for NATS: what the reader deferred before it (a
    delivery of the burst's first publish) is written before that wait, not after."""
    from .test_backplane import RecordingBackplane, hub_over

    release = trio.Event()

    class WaitingBackplane(RecordingBackplane):
        async def publish_route(self, route: Route) -> str | None:
            if len(self.routes) == 1:  # the second publish waits, as for a flush
                await release.wait()
            return await super().publish_route(route)

    async with hub_over(WaitingBackplane()) as hub:
        receiver = await connect(hub, nursery, "receiver")
        await receiver.subscribe("jobs.>")
        await connect(hub, nursery, "publisher")
        masked = FrameProtocol(client=True, extensions=[])
        burst = b"".join(
            bytes(masked.send_data(encode(Publish(id=f"p{n}", subject="jobs.x", data={"n": n})),
                                   True))
            for n in range(2)
        )  # fmt: skip
        await hub._streams[-1].inner.send_all(burst)  # one chunk: one burst for the hub
        with trio.fail_after(1):
            [first] = await receiver.messages(1)  # while the second publish waits
        assert first.data == {"n": 0}
        release.set()
        [second] = await receiver.messages(1)
        assert second.data == {"n": 1}


async def test_a_reader_paused_by_its_reply_window_writes_what_it_queued_for_others(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """A publisher that does not read its answers is paused (back-pressure); the
    deliveries its burst queued for others go out before that pause, not after it."""
    async with open_test_hub(reply_window=4) as hub:
        receiver = await connect(hub, nursery, "receiver")
        await receiver.subscribe("jobs.>")
        await connect(hub, nursery, "publisher")
        publisher = session_of(hub, "publisher")
        shrink_buffers(hub, publisher)
        stop_reading(hub)
        masked = FrameProtocol(client=True, extensions=[])
        burst = b"".join(
            bytes(masked.send_data(encode(Publish(id=f"p{n:04}", subject="jobs.x",
                                                  data={"n": n, "pad": "q" * 200})), True))
            for n in range(200)
        )  # fmt: skip
        await hub._streams[-1].inner.send_all(burst)
        await until(lambda: publisher.outbox.reply_window_full)  # the reader is paused
        with trio.fail_after(1):
            [first] = await receiver.messages(1)
        assert first.data["n"] == 0


async def test_a_task_started_by_a_reader_writes_at_once_not_with_the_reader() -> None:
    """A task started from within a reader's deferral inherits its context variables
    (trio copies the context), and it used to inherit the deferral too: what it queued
    waited in the reader's list until the reader next flushed, which an idle reader may
    never do. The deferral belongs to the reader's task only."""
    from artcafe_trio.hub._flow import Delivery, Outbox, OutputBudget, deferring_writes

    written: list[str] = []

    def outbox(name: str) -> Outbox:
        box = Outbox(
            OutputBudget(1 << 20), max_frames=100, max_bytes=1 << 20, reply_window=100,
            reply_window_bytes=1 << 20, on_overflow=lambda reason: None,
        )  # fmt: skip
        box.write_now = lambda: written.append(name)
        return box

    for_reader, for_child = outbox("by the reader"), outbox("by the child")

    async def child() -> None:
        assert for_child.deliver(Delivery(b"x"))  # not a reader: written at once

    async with trio.open_nursery() as nursery:
        with deferring_writes() as deferred:
            assert for_reader.deliver(Delivery(b"y"))  # the reader's own: deferred
            assert deferred == [for_reader] and written == []
            nursery.start_soon(child)
            await trio.testing.wait_all_tasks_blocked()
            assert written == ["by the child"]  # while the reader still defers its own
            assert deferred == [for_reader]
        assert written == ["by the child", "by the reader"]  # leaving writes the rest
