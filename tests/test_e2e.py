"""An agent in this process against ``artcafe-trio hub`` in a subprocess, over real TCP."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from artcafe_trio import Backoff, Registry, generate_private_key, open_agent

from .hubproc import HubProcess

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

FAST_BACKOFF = Backoff(base=0.2, cap=1.0)


def register(db: Path, tenant: str, *agents: str) -> dict[str, Any]:
    keys = {}
    with Registry.open(db) as registry:
        for agent in agents:
            keys[agent] = generate_private_key()
            registry.add_key(tenant, agent, keys[agent].public_key)
    return keys


def recorded_status(db: Path, agent_id: str) -> str | None:
    with Registry.open(db) as registry:
        rows = [r for r in registry.list_agents() if r.agent_id == agent_id]
    return rows[0].status if rows else None


async def test_agent_survives_hub_sigkill_and_restart(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    keys = register(db, "acme", "worker", "producer")
    hub = HubProcess(db)
    received: list[int] = []
    reconnects: list[str | None] = []
    try:
        await hub.start()
        # 1 s x 3: generous enough that a busy CI machine causes no extra reconnects.
        common = {"url": hub.url, "organization_id": "acme", "backoff": FAST_BACKOFF,
                  "heartbeat_interval": 1.0}  # fmt: skip
        async with (
            open_agent(agent_id="worker", private_key=keys["worker"], **common) as worker,
            open_agent(agent_id="producer", private_key=keys["producer"], **common) as producer,
        ):
            worker.on_reconnect(lambda: reconnects.append(worker.session_id))
            await worker.subscribe("jobs.*", lambda s, d: received.append(d))
            await producer.publish("jobs.before", 1, confirm=True)
            # The ACK means the hub accepted and routed it, not that the worker has it:
            # wait for the delivery before killing the hub. Presence reaches the
            # registry in the background: wait for it too, so the kill finds it there.
            with trio.fail_after(5):
                while not received or recorded_status(db, "worker") != "online":
                    await trio.sleep(0.02)

            await hub.kill()
            with trio.fail_after(10):
                while worker.health().connected or producer.health().connected:
                    await trio.sleep(0.05)
            assert worker.state == "reconnecting"

            async with trio.open_nursery() as nursery:
                # Published during the outage: it waits, then goes to the new hub once the
                # worker has resubscribed (a reconnect restores subscriptions first, then
                # flushes), so the worker receives its own message exactly once. Pub/sub
                # keeps no backlog: a subscriber must be connected to receive.
                nursery.start_soon(lambda: worker.publish("jobs.during", 2, confirm=True))
                with trio.fail_after(5):  # it waits (through the hub's restart below)
                    while worker.health().waiting_publishes != 1:
                        await trio.sleep(0.01)
                assert not worker.health().connected
                await hub.start()
                with trio.fail_after(20):
                    await worker.wait_connected()
                    await producer.wait_connected()
            await producer.publish("jobs.after", 3, confirm=True)
            with trio.fail_after(5):
                while len(received) < 3:
                    await trio.sleep(0.05)
            await trio.sleep(0.5)
            assert sorted(received) == [1, 2, 3]
            assert reconnects  # on_reconnect ran (more than once only on a very loaded machine)
            assert worker.health().total_reconnects >= 1
            table = {r.agent_id: r.status for r in await worker.presence()}
            assert table == {"worker": "online", "producer": "online"}
        assert await hub.terminate() == 0
    finally:
        await hub.aclose()
    with Registry.open(db) as registry:
        history = [
            (h.status, h.reason) for h in reversed(registry.presence_history("acme", "worker"))
        ]
    # online, the outage the restarted hub recorded, online again, and the graceful leave.
    assert history[:3] == [("online", "connected"), ("offline", "disconnected"),
                           ("online", "connected")]  # fmt: skip
    assert history[-1] == ("offline", "left")


async def test_frozen_hub_is_detected_at_the_ack_timeout(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    keys = register(db, "acme", "worker")
    hub = HubProcess(db)
    try:
        await hub.start()
        async with open_agent(
            url=hub.url, organization_id="acme", agent_id="worker", private_key=keys["worker"],
            heartbeat_interval=0.5, heartbeat_timeout_multiplier=3.0, backoff=FAST_BACKOFF,
        ) as agent:  # fmt: skip
            with trio.fail_after(5):  # heartbeats flow: one is answered
                while agent.health().last_ack is None:
                    await trio.sleep(0.01)
            hub.signal(signal.SIGSTOP)  # the socket stays open; nothing answers
            with trio.fail_after(10):
                while agent.health().connected:
                    await trio.sleep(0.01)
            # The last ACK is read after the loss, not at SIGSTOP: an ACK the hub wrote
            # just before it stopped may still arrive, and it moves the deadline.
            health = agent.health()
            assert health.seconds_since_ack is not None
            detected = health.seconds_since_ack
            assert 1.5 <= detected < 1.7  # interval 0.5 x multiplier 3.0
            hub.signal(signal.SIGCONT)
            with trio.fail_after(20):
                await agent.wait_connected()
    finally:
        hub.signal(signal.SIGCONT)
        await hub.aclose()
