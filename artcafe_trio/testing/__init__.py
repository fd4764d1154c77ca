"""The test kit: the real hub over in-memory streams, for your own pytest-trio tests.

Everything runs on trio's clock, so with pytest-trio's ``autojump_clock`` a
90-second heartbeat timeout takes milliseconds::

    from artcafe_trio.testing import open_test_hub

    async def test_my_agent_survives_an_outage(autojump_clock):
        async with open_test_hub() as hub:
            async with hub.open_agent("worker-1", tenant_id="acme") as agent:
                hub.go_down()                 # close every connection, refuse new ones
                await trio.sleep(5)
                hub.come_back()
                await agent.wait_connected()

Faults: :meth:`TestHub.go_down` / :meth:`TestHub.come_back` (an outage),
:meth:`TestHub.blackhole` (connections stay open but nothing gets through:
a hung hub, a half-open network).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
import trio_websocket
from trio_websocket import WebSocketConnection

from .._faulty import FaultyStream
from .._util import collapse_exception_groups
from ..agent._agent import Agent, open_agent
from ..hub import CloseCode, Hub, HubConfig, serve_hub
from ..protocol._keys import PrivateKey, generate_private_key
from ..registry._registry import Registry

__all__ = ["FaultyStream", "TestHub", "open_test_hub"]


class TestHub:
    """A running in-memory hub with helpers to register agents and inject faults."""

    __test__ = False  # not a pytest test class

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.registry: Registry = hub.registry
        self.down = False
        self._streams: list[FaultyStream] = []

    def register(self, tenant_id: str, agent_id: str, *, algorithm: str = "ed25519") -> PrivateKey:
        """Generate a key for ``tenant_id/agent_id``, register it, and return it."""
        key = generate_private_key(algorithm)
        self.registry.add_key(tenant_id, agent_id, key.public_key)
        return key

    async def connect_in_memory(self, remote: str = "memory") -> trio.abc.Stream:
        """A client byte stream connected to this hub (the hub serves the other end).

        ``remote`` is the address the hub sees (its limits and logs are per address).
        """
        client, server = trio.testing.memory_stream_pair()
        self.hub.serve_stream(server, remote)
        return client

    async def dial(self, nursery: trio.Nursery, resource: str) -> WebSocketConnection:
        """The :data:`Dialer` agents use to reach this hub."""
        if self.down:
            await trio.lowlevel.checkpoint()
            raise OSError("test hub is down")
        stream = FaultyStream(await self.connect_in_memory())
        self._streams = [s for s in self._streams if not s.closed]
        self._streams.append(stream)
        return await trio_websocket.wrap_client_stream(
            nursery,
            stream,  # type: ignore[arg-type]
            "memory",
            resource,
            max_message_size=self.hub.config.max_frame_bytes * 4 + 65536,
        )

    @asynccontextmanager
    async def open_agent(
        self, agent_id: str, *, tenant_id: str = "test", **kwargs: Any
    ) -> AsyncIterator[Agent]:
        """``open_agent`` connected to this hub; registers the agent if it has no key."""
        if "private_key" not in kwargs and "private_key_path" not in kwargs:
            kwargs["private_key"] = self.register(tenant_id, agent_id)
        kwargs.setdefault("dial", self.dial)
        async with open_agent(agent_id=agent_id, tenant_id=tenant_id, **kwargs) as agent:
            yield agent

    def go_down(self, code: int = CloseCode.SERVICE_RESTART) -> None:
        """Close every session with ``code`` and refuse new connections until
        :meth:`come_back`."""
        self.down = True
        self.hub.close_all(code, "test hub going down")

    def come_back(self) -> None:
        self.down = False

    def blackhole(self, on: bool = True, *, to_agents: bool = True, to_hub: bool = True) -> None:
        """Silence every current connection (sockets stay open): what the hub sends
        (``to_agents``), what agents send (``to_hub``), or both."""
        for stream in self._streams:
            if to_agents:
                stream.drop_incoming = on
            if to_hub:
                stream.drop_outgoing = on


@asynccontextmanager
async def open_test_hub(
    config: HubConfig | None = None, *, registry: Registry | None = None, **config_fields: Any
) -> AsyncIterator[TestHub]:
    """Run the real hub with an in-memory registry and no sockets.

    ``config_fields`` override :class:`HubConfig` fields, e.g.
    ``open_test_hub(disconnect_grace=0)``.
    """
    if config is None:
        config = HubConfig(**config_fields)
    own = registry is None
    registry = registry or Registry.open(":memory:")
    try:
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                hub: Hub = await nursery.start(
                    functools.partial(serve_hub, registry=registry, port=None, config=config)
                )
                try:
                    yield TestHub(hub)
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        if own:
            registry.close()
