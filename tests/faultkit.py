"""Helpers shared by the fault scenarios (``test_faults.py`` in memory,
``test_faults_processes.py`` with real processes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio_websocket
from trio_websocket import WebSocketConnection

from artcafe_trio import (
    Backoff,
    Hub,
    HubConfig,
    PresenceEvent,
    PrivateKey,
    Registry,
    generate_private_key,
    open_agent,
    open_hub,
)
from artcafe_trio.protocol import Challenge
from artcafe_trio.testing import TestHub

from .conftest import RawClient

TENANT = "acme"
FAST_BACKOFF = Backoff(base=0.1, cap=0.5)
HEARTBEAT = {"heartbeat_interval": 0.5, "heartbeat_timeout_multiplier": 3.0}
TIMEOUT = 0.5 * 3.0


def register(registry: Registry, *agents: str) -> dict[str, PrivateKey]:
    keys = {}
    for agent in agents:
        keys[agent] = generate_private_key()
        registry.add_key(TENANT, agent, keys[agent].public_key)
    return keys


async def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.01) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(poll)


def percentile(values: Iterable[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@attrs.define
class PresenceLog:
    """What a monitor agent subscribed to ``$presence.>`` saw, in arrival order."""

    events: list[PresenceEvent] = attrs.field(factory=list)
    at: list[float] = attrs.field(factory=list)
    """When each event arrived, on the trio clock (exact under ``autojump_clock``)."""

    def handler(self, subject: str, data: Any) -> None:
        self.events.append(PresenceEvent.from_data(data))
        self.at.append(trio.current_time())

    def arrivals(self, agent_id: str) -> list[tuple[str, str, float]]:
        return [
            (e.status, e.reason, at)
            for e, at in zip(self.events, self.at, strict=True)
            if e.agent_id == agent_id
        ]

    def of(self, agent_id: str) -> list[PresenceEvent]:
        return [e for e in self.events if e.agent_id == agent_id]

    def transitions(self, agent_id: str) -> list[tuple[str, str]]:
        return [(e.status, e.reason) for e in self.of(agent_id)]


@asynccontextmanager
async def in_process_hub(
    *agents: str, **config: Any
) -> AsyncIterator[tuple[Hub, dict[str, PrivateKey]]]:
    """An in-process hub on a free port with an in-memory registry holding ``agents``."""
    with Registry.open(":memory:") as registry:
        keys = register(registry, *agents)
        async with open_hub(port=0, registry=registry, config=HubConfig(**config)) as hub:
            yield hub, keys


@asynccontextmanager
async def monitor(hub: Hub, key: PrivateKey) -> AsyncIterator[PresenceLog]:
    """A monitor agent, connected straight to the hub, recording every presence event."""
    seen = PresenceLog()
    async with open_agent(
        url=hub.url, organization_id=TENANT, agent_id="monitor", private_key=key,
        backoff=FAST_BACKOFF, **HEARTBEAT,
    ) as agent:  # fmt: skip
        await agent.subscribe("$presence.>", seen.handler)
        yield seen


@asynccontextmanager
async def memory_monitor(hub: TestHub) -> AsyncIterator[PresenceLog]:
    """A monitor agent connected straight to an in-memory hub (no fault proxy)."""
    seen = PresenceLog()
    async with hub.open_agent(
        "monitor", tenant_id=TENANT, backoff=FAST_BACKOFF, **HEARTBEAT
    ) as agent:
        await agent.subscribe("$presence.>", seen.handler)
        yield seen


def agent_resource(agent_id: str) -> str:
    return f"/api/v1/ws/agent/{agent_id}?tenant_id={TENANT}"


async def raw_client(
    hub: Hub, nursery: trio.Nursery, agent_id: str, key: PrivateKey, *patterns: str
) -> RawClient:
    """A raw protocol client over TCP: authenticates, subscribes, then reads only if told."""
    ws = await trio_websocket.connect_websocket_url(
        nursery, f"{hub.url}{agent_resource(agent_id)}", max_message_size=10**7
    )
    return await authenticated(ws, agent_id, key, *patterns)


async def authenticated(
    ws: WebSocketConnection, agent_id: str, key: PrivateKey, *patterns: str
) -> RawClient:
    """Authenticate a raw client on ``ws`` and subscribe it to ``patterns``."""
    client = RawClient(ws)
    challenge = await client.recv()
    assert isinstance(challenge, Challenge)
    signature = key.sign_auth(tenant_id=TENANT, agent_id=agent_id, nonce=challenge.nonce)
    await client.send(
        json.dumps({"type": "auth", "agent_id": agent_id, "tenant_id": TENANT,
                    "algorithm": key.algorithm, "signature": signature})
    )  # fmt: skip
    assert (await client.recv()).type == "welcome"
    for pattern in patterns:
        await client.subscribe(pattern)
    return client
