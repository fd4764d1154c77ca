"""Hardening: churn of unauthenticated connections from many addresses cannot close an
agent's slow handshake (issue 9, item 7).

Over the total bound the hub used to close the oldest unauthenticated connection of
all: an agent whose handshake takes a few round trips of 200 ms is the oldest while
five addresses keep opening connections, so it was closed before it could log in. Now
the oldest of the address holding the most slots is closed.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from artcafe_trio.testing import TestHub, open_test_hub

from .conftest import raw_connect

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("hub_streams")]

LEG = 0.2  # seconds each way on the agent's link


class _DelayedStream(trio.abc.Stream):
    """A stream whose every send and receive takes ``LEG`` more seconds."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep(LEG)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        await trio.sleep(LEG)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


class _SlowLinkDialer:
    """Dials the hub from ``address`` over a link with ``LEG`` seconds each way."""

    def __init__(self, hub: TestHub, address: str) -> None:
        self.hub = hub.hub
        self.address = address

    async def dial(
        self, nursery: trio.Nursery, resource: str
    ) -> trio_websocket.WebSocketConnection:
        client, server = trio.testing.memory_stream_pair()
        self.hub.serve_stream(server, self.address)
        return await trio_websocket.wrap_client_stream(
            nursery, _DelayedStream(client), "127.0.0.1", resource
        )


async def test_an_agent_with_a_slow_handshake_connects_during_churn_from_many_addresses(
    autojump_clock: Any,
) -> None:
    async with open_test_hub(
        max_unauthenticated_per_address=4, max_unauthenticated=10, close_timeout=0.05
    ) as hub:
        limiter = hub.hub.unauthenticated
        streams: list[trio.abc.Stream] = []
        most = 0

        async def churn() -> None:
            nonlocal most
            addresses = [f"10.0.0.{n}" for n in range(1, 6)]
            while True:
                for address in addresses:
                    streams.append(await hub.connect_in_memory(remote=address))
                    most = max(most, len(limiter))
                await trio.sleep(0.01)

        key = hub.register("t1", "slow")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(churn)
            await trio.sleep(0.5)  # the bound is reached and churning
            evicted_before = limiter.evicted
            dialer: Any = _SlowLinkDialer(hub, "10.0.0.99")
            with trio.fail_after(10):
                agent = await raw_connect(dialer, nursery, "slow", "t1", key)
            assert agent.welcome is not None  # logged in: never closed to make room
            assert limiter.evicted - evicted_before > 100  # while others were, constantly
            assert most <= 10
            assert any(s.agent_id == "slow" for s in hub.hub._directory.agent_sessions())
            nursery.cancel_scope.cancel()
        for stream in streams:
            await stream.aclose()
