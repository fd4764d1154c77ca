"""Regression tests for defects found in review: each failed before its fix."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
import trio
import wsproto
from wsproto.events import AcceptConnection, Request, TextMessage

from artcafe_trio import (
    AgentClosed,
    CloseCode,
    ConnectFailed,
    ConnectionLost,
    ReconnectFailed,
    SessionReplaced,
    open_hub,
)
from artcafe_trio.testing import TestHub, open_test_hub

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("hub_streams")]


# --- the hub survives whatever one connection does ---------------------------------


async def test_a_reset_right_after_the_upgrade_request_does_not_kill_the_hub() -> None:
    request = (
        b"GET /api/v1/ws/agent/a?tenant_id=t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )

    def reset_many(port: int) -> None:
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.sendall(request)  # then closed with RST

    async with open_hub(port=0) as hub:
        assert hub.port is not None
        await trio.to_thread.run_sync(reset_many, hub.port)
        await trio.sleep(0.2)
        async with TestHub(hub).open_agent("still-works") as agent:
            assert agent.health().connected


async def test_a_thousand_failed_logins_from_one_address_do_not_overflow(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub() as hub:
        wrong = hub.register("t", "someone-else")
        hub.register("t", "a")
        # A thousand earlier failures from this address, then one more real one.
        state = hub.hub._auth_throttle._address("memory")
        state.failures, state.last_failure = 1100, trio.current_time()
        state.last_check = trio.current_time()
        from artcafe_trio import AuthenticationError

        start = trio.current_time()
        # The refusal is delayed by the capped penalty (10 s), so the agent's own
        # connect_timeout may fire first; either way the hub must stay up.
        with pytest.raises((AuthenticationError, ConnectionLost)):
            async with hub.open_agent("a", tenant_id="t", private_key=wrong, auto_reconnect=False):
                pass
        assert trio.current_time() - start == pytest.approx(10.0, abs=0.01)
        async with hub.open_agent("a", tenant_id="t") as agent:
            assert agent.health().connected


async def raw_peer(hub: TestHub, payload: str | None) -> trio.abc.Stream:
    """A peer that upgrades, optionally sends one text frame, and never reads again."""
    stream = await hub.connect_in_memory()
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="memory", target="/api/v1/ws/agent/a?tenant_id=t")))
    accepted = False
    while not accepted:
        ws.receive_data(await stream.receive_some())
        accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
    if payload is not None:
        await stream.send_all(ws.send(TextMessage(payload)))
    return stream


async def test_peers_that_never_finish_the_close_handshake_hold_no_hub_task(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub() as hub:
        hub.register("t", "a")
        assert hub.hub._connections.nursery is not None
        base = len(hub.hub._connections.nursery.child_tasks)
        bad_auth = '{"type":"auth","agent_id":"a","tenant_id":"t","algorithm":"ed25519","signature":"AAAA"}'
        peers = [
            await raw_peer(hub, bad_auth),
            await raw_peer(hub, "not json"),
            await raw_peer(hub, None),
        ]
        assert len(hub.hub._connections.nursery.child_tasks) - base == 3
        await trio.sleep(60)  # challenge expiry (30 s) plus the bounded close (2 s)
        assert len(hub.hub._connections.nursery.child_tasks) - base == 0
        del peers


async def test_deeply_nested_metadata_is_refused_at_auth() -> None:
    async with open_test_hub() as hub:
        deep: dict[str, Any] = {}
        node = deep
        for _ in range(100):
            node["x"] = {}
            node = node["x"]
        from artcafe_trio import AuthenticationError

        with pytest.raises((ConnectionLost, AuthenticationError, ReconnectFailed)):
            async with hub.open_agent("deep", metadata=deep, auto_reconnect=False):
                pass
        async with hub.open_agent("fine", metadata={"version": "1.0"}) as agent:
            table = await agent.presence()
            assert [r.agent_id for r in table if r.status == "online"] == ["fine"]


# --- the agent --------------------------------------------------------------------


async def test_a_confirmed_publish_cancelled_before_it_is_sent_is_withdrawn(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub() as hub:
        received: list[Any] = []
        async with hub.open_agent("watcher", heartbeat_interval=None) as watcher:
            await watcher.subscribe("x", lambda s, d: received.append(d))
            async with hub.open_agent("pub") as pub:
                hub.go_down()
                await trio.sleep(0.01)
                with trio.move_on_after(2):
                    await pub.publish("x", "withdrawn", confirm=True)
                assert pub.health().waiting_publishes == 0
                hub.come_back()
                await pub.wait_connected()
                await watcher.wait_connected()
                await pub.publish("x", "sent", confirm=True)
            await trio.sleep(0.5)
        assert received == ["sent"]


async def test_unsubscribe_while_the_subscribe_is_in_flight_reaches_the_hub(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub() as hub, hub.open_agent("a1") as agent:
        agent.on_message("p.q")(lambda s, d: None)  # subscribe sent in the background
        await agent.unsubscribe("p.q")
        await trio.sleep(0.5)
        session = hub.hub._directory.live("test", "a1")
        assert session.subscriptions == set()


async def test_request_fails_with_connection_lost_when_the_connection_drops(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub() as hub, hub.open_agent("worker") as worker:
        await worker.subscribe("slow", lambda s, d: None)  # never replies
        async with hub.open_agent("client") as client:

            async def drop_soon() -> None:
                await trio.sleep(1)
                hub.hub.close_all(1012, "restart")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drop_soon)
                with pytest.raises(ConnectionLost), trio.fail_after(10):
                    await client.request("slow", 1)


async def test_waiters_outside_the_block_are_released_when_the_agent_stops(
    autojump_clock: trio.abc.Clock,
) -> None:
    outcomes: list[str] = []

    async def wait_connected(agent: Any) -> None:
        try:
            await agent.wait_connected()
            outcomes.append("connected?!")
        except AgentClosed:
            outcomes.append("closed")

    async with open_test_hub() as hub, trio.open_nursery() as nursery:
        async with hub.open_agent("a1", stop_timeout=1) as agent:
            hub.go_down()
            await trio.sleep(0.01)
            nursery.start_soon(wait_connected, agent)
            await trio.sleep(1)
    assert outcomes == ["closed"]


async def test_being_replaced_by_another_process_stops_the_agent_loudly(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub() as hub:
        key = hub.register("test", "twin")
        with pytest.raises(SessionReplaced) as info:
            async with hub.open_agent("twin", private_key=key):
                async with hub.open_agent("twin", private_key=key):
                    await trio.sleep(5)
        assert info.value.code == CloseCode.REPLACED == 4003


async def test_errors_leaving_the_api_keep_their_cause(autojump_clock: trio.abc.Clock) -> None:
    async with open_test_hub() as hub:
        hub.go_down()
        with pytest.raises(ReconnectFailed) as info:
            async with hub.open_agent("a1", max_reconnect_attempts=2):
                pass
        # Raised without its chain (the traceback stays short: test_first_hour), the
        # cause is kept where programs look for it.
        assert info.value.__cause__ is None and info.value.__suppress_context__
        cause = info.value.last_cause
        assert isinstance(cause, ConnectFailed)  # the attempt, told in words
        assert isinstance(cause.__cause__, OSError)  # and what failed underneath


async def test_adding_a_handler_while_stopping_raises_agent_closed(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub() as hub:
        async with hub.open_agent("a1", stop_timeout=1) as agent:

            @agent.on_message("work")
            async def work(subject: str, data: Any) -> None:
                await trio.sleep(0.5)
                with pytest.raises(AgentClosed):
                    agent.on_message("late")(lambda s, d: None)

            await agent.publish("work", 1, confirm=True)
            await trio.sleep(0.1)
        assert agent.state == "closed"


async def test_a_hub_that_cannot_listen_changes_nothing(tmp_path: Any) -> None:
    from pathlib import Path

    from artcafe_trio import Registry

    db = Path(str(tmp_path)) / "hub.db"
    async with open_hub(db=db, port=0) as running:
        async with TestHub(running).open_agent("a1", tenant_id="t"):

            def status() -> str | None:
                with Registry.open(db) as registry:
                    [row] = [r for r in registry.list_agents() if r.agent_id == "a1"]
                    return row.status

            with trio.fail_after(5):  # the running hub writes presence in the background
                while status() != "online":
                    await trio.sleep(0.02)
            other_db = Path(str(tmp_path)) / "other.db"
            with pytest.raises(OSError, match="ddress already in use"):
                async with open_hub(db=db, port=running.port):
                    pass
            with pytest.raises(OSError, match="ddress already in use"):
                async with open_hub(db=other_db, port=running.port):
                    pass
            assert not other_db.exists()
            assert status() == "online"
