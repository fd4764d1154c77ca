"""The hub's connection pump under races found in review after the hot-path merge
(each test failed before its fix): a batch the writer took but did not write is still
released; a live agent on a slow link keeps its presence while the reader writes to
it; answers are not held behind a long burst of publishes that wait for a backplane."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
import trio_websocket

from artcafe_trio.hub import _pump
from artcafe_trio.hub._flow import Delivery, Outbox, OutputBudget
from artcafe_trio.protocol import Heartbeat, HeartbeatAck, PresenceQuery, Publish, decode
from artcafe_trio.testing import open_test_hub

from .conftest import raw_connect


class _Config:
    write_stall_timeout = 5.0
    close_timeout = 1.0


class _Hub:
    config = _Config()


class _QuietWs:
    async def send_frames(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()


class _WriterSession:
    """What ``_pump._writer`` uses of a session."""

    def __init__(self, budget: OutputBudget) -> None:
        self.hub = _Hub()
        self.ws = _QuietWs()
        self.reading, self.closing, self.draining, self.writing = True, False, False, False
        self.scope = trio.CancelScope()
        self.outbox = Outbox(
            budget, max_frames=100, max_bytes=10**6, reply_window=16,
            reply_window_bytes=10**6, on_overflow=lambda reason: None,
        )  # fmt: skip

    def may_write(self) -> bool:
        return self.draining or (self.reading and not self.closing)


async def test_a_batch_taken_as_the_session_ends_is_released() -> None:
    """A delivery wakes the writer in the scheduling step where the reader ends: the
    writer takes the batch, sees it may not write, and must still release it (before,
    its bytes stayed in the hub-wide budget for good and the outbox stayed busy)."""
    budget = OutputBudget(10**7)
    session = _WriterSession(budget)

    async def writer() -> None:
        with session.scope:
            await _pump._writer(session)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        session.outbox.deliver(Delivery(b"x" * 1000))
        session.reading = False  # the reader ended (the peer went away) ...
        session.scope.cancel()  # ... and the writer is stopped, in the same step
    session.outbox.discard()  # what the hub does with a session that ended
    assert budget.used == 0
    assert not session.outbox.busy
    assert session.outbox not in budget._consumers


META = {"blob": "m" * 8000}


class Slow(trio.abc.Stream):
    """The client's end: reads 2 KiB at most every 50 ms (~40 KB/s), steadily."""

    def __init__(self, inner):
        self.inner = inner

    async def send_all(self, data):
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes=None):
        await trio.sleep(0.05)
        return await self.inner.receive_some(2048)

    async def aclose(self):
        await self.inner.aclose()


class SlowDialer:
    def __init__(self, hub):
        self.hub = hub.hub

    async def dial(self, nursery, resource):
        client, server = trio.testing.lockstep_stream_pair()
        self.hub.serve_stream(server, "memory")
        return await trio_websocket.wrap_client_stream(
            nursery, Slow(client), "127.0.0.1", resource, max_message_size=50_000_000
        )


async def test_slow_but_live_agent_keeps_its_presence(autojump_clock: Any) -> None:
    async with open_test_hub(
        close_timeout=0.05, max_frame_bytes=10_000_000, write_stall_timeout=60.0
    ) as hub:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                key = hub.register("t1", f"peer{i}")
                await raw_connect(hub, nursery, f"peer{i}", "t1", key, metadata=META)
            key = hub.register("t1", "slow")
            slow = await raw_connect(
                SlowDialer(hub),
                nursery,
                "slow",
                "t1",
                key,
                heartbeat_interval=1.0,
                heartbeat_timeout_multiplier=2.0,
            )
            [session] = [s for s in hub.hub._directory.agent_sessions() if s.agent_id == "slow"]

            async def heartbeats():
                for seq in range(1, 1000):
                    await slow.send(Heartbeat(seq=seq))
                    await trio.sleep(0.5)

            async def drain():
                try:
                    while True:
                        await slow.ws.get_message()
                except trio_websocket.ConnectionClosed:
                    pass

            nursery.start_soon(heartbeats)
            nursery.start_soon(drain)
            await slow.send(PresenceQuery(id="q"))  # a ~170 KB answer: ~4 s on this link
            await trio.sleep(8)
            closed = (session.close_code, session.close_reason) if session.closing else None
            assert not session.closing, closed
            nursery.cancel_scope.cancel()


async def test_heartbeat_ack_not_held_behind_a_burst_of_publishes(autojump_clock: Any) -> None:
    async with open_test_hub(close_timeout=0.05) as hub:
        backplane = hub.hub._backplane
        original = backplane.publish_route

        async def slow_publish_route(route):  # a NATS flush: 50 ms round trip
            await trio.sleep(0.05)
            return await original(route)

        backplane.publish_route = slow_publish_route
        async with trio.open_nursery() as nursery:
            key = hub.register("t1", "pub")
            client = await raw_connect(
                hub,
                nursery,
                "pub",
                "t1",
                key,
                heartbeat_interval=1.0,
                heartbeat_timeout_multiplier=1.5,
            )
            start = trio.current_time()
            await client.send(Publish(subject="s", data=-1, id="first"))
            await trio.sleep(0.01)  # the hub is in the first publish's flush
            await client.send(Heartbeat(seq=1))
            for i in range(100):
                await client.send(Publish(subject="s", data=i, id=f"p{i}"))
            while True:
                frame = decode(await client.ws.get_message())
                if isinstance(frame, HeartbeatAck):
                    break
            waited = trio.current_time() - start
            assert waited < 1.5, f"ack held {waited:.2f} s: past the agent's 1.5 s ack deadline"
            nursery.cancel_scope.cancel()
