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
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing
from trio_websocket import WebSocketConnection

from .._faulty import FaultyStream
from .._util import collapse_exception_groups
from ..agent._agent import FROM_BACKOFF, Agent, FromBackoff, open_agent
from ..agent._transport import Dialer, MemoryTransport, Transport
from ..hub import CloseCode, Hub, HubConfig, serve_hub
from ..protocol._backoff import Backoff
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
        self.transport: Transport = MemoryTransport(
            self._open_stream, max_message_size=hub.config.max_frame_bytes * 4 + 65536
        )
        """The :class:`~artcafe_trio.agent._transport.Transport` agents use to reach this hub
        (``open_agent(transport=hub.transport)``)."""

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

    async def _open_stream(self) -> trio.abc.Stream:
        if self.down:
            await trio.lowlevel.checkpoint()
            raise OSError("test hub is down")
        stream = FaultyStream(await self.connect_in_memory())
        self._streams = [s for s in self._streams if not s.closed]
        self._streams.append(stream)
        return stream

    async def dial(self, nursery: trio.Nursery, resource: str) -> WebSocketConnection:
        """A WebSocket to this hub: the ``dial`` function agents may use (``open_agent(
        dial=hub.dial)``; the same as :attr:`transport`'s ``connect``)."""
        return await self.transport.connect(nursery, resource)

    @asynccontextmanager
    async def open_agent(
        self,
        agent_id: str,
        *,
        tenant_id: str = "test",
        dial: Dialer | None = None,
        transport: Transport | None = None,
        organization_id: str | None = None,
        private_key_path: str | os.PathLike[str] | None = None,
        private_key: PrivateKey | None = None,
        private_key_password: str | bytes | None = None,
        url: str | None = None,
        heartbeat_interval: float | None = 30.0,
        heartbeat_timeout_multiplier: float = 3.0,
        auto_reconnect: bool = True,
        heartbeat_jitter: float = 0.1,
        max_reconnect_attempts: int | FromBackoff | None = FROM_BACKOFF,
        backoff: Backoff | None = None,
        retry_first_connect: bool = True,
        rng: random.Random | None = None,
        ssl_context: ssl.SSLContext | None = None,
        capabilities: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        connect_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        max_concurrent_handlers: int = 1,
        max_pending_messages: int = 10_000,
        max_pending_publishes: int = 10_000,
        raise_handler_errors: bool = False,
        wall_clock: Callable[[], float] = time.time,
        stop_on_signals: bool = False,
    ) -> AsyncIterator[Agent]:
        """:func:`~artcafe_trio.open_agent` connected to this hub (over :attr:`transport`
        unless ``dial`` or ``transport`` is given); registers the agent if it has no key.
        The other keywords are ``open_agent``'s."""
        if private_key is None and private_key_path is None:
            private_key = self.register(tenant_id, agent_id)
        if dial is None and transport is None:
            transport = self.transport
        async with open_agent(
            agent_id=agent_id,
            tenant_id=tenant_id,
            dial=dial,
            transport=transport,
            organization_id=organization_id,
            private_key_path=private_key_path,
            private_key=private_key,
            private_key_password=private_key_password,
            url=url,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout_multiplier=heartbeat_timeout_multiplier,
            auto_reconnect=auto_reconnect,
            heartbeat_jitter=heartbeat_jitter,
            max_reconnect_attempts=max_reconnect_attempts,
            backoff=backoff,
            retry_first_connect=retry_first_connect,
            rng=rng,
            ssl_context=ssl_context,
            capabilities=capabilities,
            metadata=metadata,
            connect_timeout=connect_timeout,
            stop_timeout=stop_timeout,
            max_concurrent_handlers=max_concurrent_handlers,
            max_pending_messages=max_pending_messages,
            max_pending_publishes=max_pending_publishes,
            raise_handler_errors=raise_handler_errors,
            wall_clock=wall_clock,
            stop_on_signals=stop_on_signals,
        ) as agent:
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


def _hub_config(config: HubConfig | None, fields: dict[str, Any]) -> HubConfig:
    given = {name: value for name, value in fields.items() if value is not None}
    return HubConfig(**given) if config is None else attrs.evolve(config, **given)


@asynccontextmanager
async def open_test_hub(
    config: HubConfig | None = None,
    *,
    registry: Registry | None = None,
    hub_id: str | None = None,
    challenge_timeout: float | None = None,
    min_heartbeat_interval: float | None = None,
    max_heartbeat_interval: float | None = None,
    min_timeout_multiplier: float | None = None,
    max_timeout_multiplier: float | None = None,
    disconnect_grace: float | None = None,
    max_frame_bytes: int | None = None,
    max_subscriptions: int | None = None,
    send_queue_size: int | None = None,
    send_queue_bytes: int | None = None,
    output_budget_bytes: int | None = None,
    reply_window: int | None = None,
    reply_window_bytes: int | None = None,
    write_stall_timeout: float | None = None,
    max_open_requests: int | None = None,
    max_reply_grants: int | None = None,
    max_unauthenticated_per_address: int | None = None,
    max_unauthenticated: int | None = None,
    handshake_timeout: float | None = None,
    publish_rate: float | None = None,
    publish_burst: int | None = None,
    dedupe_window: float | None = None,
    dedupe_max_ids: int | None = None,
    auth_failures_free: int | None = None,
    auth_failure_delay_cap: float | None = None,
    auth_failure_memory: float | None = None,
    registry_poll_interval: float | None = None,
    last_seen_flush_interval: float | None = None,
    close_timeout: float | None = None,
    refused_log_per_second: float | None = None,
) -> AsyncIterator[TestHub]:
    """Run the real hub with an in-memory registry and no sockets.

    The keywords are :class:`HubConfig` fields (None: ``HubConfig``'s default, or
    ``config``'s value), e.g. ``open_test_hub(disconnect_grace=0)``.
    """
    config = _hub_config(config, dict(
        hub_id=hub_id,
        challenge_timeout=challenge_timeout,
        min_heartbeat_interval=min_heartbeat_interval,
        max_heartbeat_interval=max_heartbeat_interval,
        min_timeout_multiplier=min_timeout_multiplier,
        max_timeout_multiplier=max_timeout_multiplier,
        disconnect_grace=disconnect_grace,
        max_frame_bytes=max_frame_bytes,
        max_subscriptions=max_subscriptions,
        send_queue_size=send_queue_size,
        send_queue_bytes=send_queue_bytes,
        output_budget_bytes=output_budget_bytes,
        reply_window=reply_window,
        reply_window_bytes=reply_window_bytes,
        write_stall_timeout=write_stall_timeout,
        max_open_requests=max_open_requests,
        max_reply_grants=max_reply_grants,
        max_unauthenticated_per_address=max_unauthenticated_per_address,
        max_unauthenticated=max_unauthenticated,
        handshake_timeout=handshake_timeout,
        publish_rate=publish_rate,
        publish_burst=publish_burst,
        dedupe_window=dedupe_window,
        dedupe_max_ids=dedupe_max_ids,
        auth_failures_free=auth_failures_free,
        auth_failure_delay_cap=auth_failure_delay_cap,
        auth_failure_memory=auth_failure_memory,
        registry_poll_interval=registry_poll_interval,
        last_seen_flush_interval=last_seen_flush_interval,
        close_timeout=close_timeout,
        refused_log_per_second=refused_log_per_second,
    ))  # fmt: skip
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
