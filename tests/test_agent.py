"""The agent against the real hub over memory streams, under autojump_clock."""

from __future__ import annotations

import functools
import itertools
import logging
import random
from typing import Any

import pytest
import trio

from artcafe_trio import (
    AgentClosed,
    AgentState,
    AuthenticationError,
    Backoff,
    ConnectFailed,
    ConnectionLost,
    HeartbeatAgent,
    HeartbeatTimeout,
    HubError,
    Message,
    ProtocolError,
    ReconnectFailed,
    SimpleAgent,
    generate_private_key,
    open_agent,
    run_agent,
)
from artcafe_trio.testing import TestHub, open_test_hub

pytestmark = pytest.mark.timeout(30)


async def test_enter_returns_connected_and_health_is_filled(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    # heartbeat_jitter=0: the second heartbeat is at t=10, not at a random phase.
    async with test_hub.open_agent("a1", heartbeat_interval=10, heartbeat_jitter=0) as agent:
        assert agent.state == "connected"
        await trio.sleep(0.5)
        health = agent.health()
        assert health.connected
        assert health.healthy
        assert health.session_id is not None
        assert health.heartbeat_timeout == 30.0
        assert health.rtt is not None
        assert health.seconds_since_ack == pytest.approx(0.5)
        legacy = agent.get_connection_health()
        assert legacy["healthy"] is True
        assert legacy["connected"] is True
        assert isinstance(legacy["last_heartbeat_ack"], str)
        assert "T" in legacy["last_heartbeat_ack"]
        assert legacy["reconnect_attempts"] == 0
    assert agent.state == "closed"
    assert not agent.health().connected


@pytest.mark.parametrize(("interval", "multiplier"), [(30.0, 3.0), (10.0, 2.0), (1.0, 5.0)])
async def test_ack_timeout_is_detected_exactly_at_interval_times_multiplier(
    test_hub: TestHub, autojump_clock: trio.abc.Clock, interval: float, multiplier: float
) -> None:
    timeout = interval * multiplier
    async with test_hub.open_agent(
        "a1", heartbeat_interval=interval, heartbeat_timeout_multiplier=multiplier
    ) as agent:
        await trio.sleep(interval * 2.5)
        test_hub.blackhole()  # the hub hangs: the socket stays open, nothing gets through
        health = agent.health()
        assert health.seconds_since_ack is not None
        last_ack = trio.current_time() - health.seconds_since_ack
        await trio.sleep_until(last_ack + timeout - 0.001)
        assert agent.health().connected
        await trio.sleep_until(last_ack + timeout + 0.0001)
        assert not agent.health().connected
        assert agent.state == "reconnecting"
        test_hub.blackhole(False)
        with trio.fail_after(120):
            await agent.wait_connected()


async def test_health_keeps_when_and_why_the_last_connection_ended(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    """A loss and its reconnection can both fall between two polls of health() (the
    demo sampled every 20 ms and missed a watchdog that reconnected in 10 ms):
    ``last_disconnect`` and its reason outlive the new connection."""
    async with test_hub.open_agent(
        "a1", heartbeat_interval=1.0, heartbeat_jitter=0, wall_clock=trio.current_time
    ) as agent:
        health = agent.health()
        assert (health.last_disconnect, health.last_disconnect_reason) == (None, None)
        await trio.sleep(2.5)
        test_hub.blackhole()
        health = agent.health()
        assert health.last_ack is not None
        last_ack = health.last_ack.timestamp()
        await trio.sleep(3.5)  # the watchdog fires at last_ack + 3 s
        test_hub.blackhole(False)
        with trio.fail_after(10):
            await agent.wait_connected()
        health = agent.health()
        assert health.connected
        assert health.last_disconnect is not None
        assert health.last_disconnect.timestamp() == pytest.approx(last_ack + 3.0, abs=1e-6)
        assert health.last_disconnect_reason == "no heartbeat ACK for 3 s"
        first = agent.session_id
        test_hub.hub.close_all(1001, "bye")
        with trio.fail_after(10):
            while agent.session_id in (None, first):
                await trio.sleep(0.01)
        assert agent.health().last_disconnect_reason == "the hub closed the connection (1001 bye)"
    health = agent.health()
    assert health.last_disconnect_reason == "agent stopped"
    assert health.last_disconnect is not None
    assert health.last_disconnect.timestamp() == pytest.approx(trio.current_time(), abs=1.5)


async def test_backoff_delays_follow_the_policy_and_give_up_after_ten(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    attempts: list[float] = []

    async def refusing_dial(nursery: trio.Nursery, resource: str) -> Any:
        attempts.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        raise OSError("connection refused")

    key = test_hub.register("test", "a1")
    expected = list(Backoff().delays(random.Random(7)))
    assert len(expected) == 10
    start = trio.current_time()
    with pytest.raises(ReconnectFailed) as info:
        async with test_hub.open_agent(
            "a1", private_key=key, dial=refusing_dial, rng=random.Random(7)
        ):
            pytest.fail("must not connect")
    assert info.value.attempts == 10
    cause = info.value.last_cause
    assert isinstance(cause, ConnectFailed) and not cause.permanent
    assert isinstance(cause.__cause__, OSError)
    assert str(cause) == "cannot connect to ws://127.0.0.1:8765: connection refused"
    assert str(info.value) == (
        "gave up after 10 consecutive failed connection attempts over "
        f"{sum(expected):.1f} s; last cause: {cause}"
    )
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps == pytest.approx(expected, abs=1e-9)
    assert len(attempts) == 11  # the first try, then ten reconnection attempts
    assert trio.current_time() - start == pytest.approx(sum(expected), abs=1e-9)
    assert info.value.elapsed == pytest.approx(sum(expected), abs=1e-9)


async def test_unreachable_hub_without_auto_reconnect_fails_at_once(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    test_hub.go_down()
    start = trio.current_time()
    with pytest.raises(ConnectionLost) as info:
        async with test_hub.open_agent("a1", auto_reconnect=False):
            pytest.fail("must not connect")
    assert not isinstance(info.value, ReconnectFailed)
    assert trio.current_time() == start


async def test_unreachable_hub_at_start_is_retried_until_it_comes_up(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    test_hub.go_down()

    async def bring_up() -> None:
        await trio.sleep(20)
        test_hub.come_back()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bring_up)
        async with test_hub.open_agent("a1") as agent:
            assert trio.current_time() >= 20
            assert agent.health().reconnect_attempts > 0
            await trio.sleep(1)  # the first ACK proves the connection healthy
            assert agent.health().reconnect_attempts == 0


async def test_rejected_key_raises_at_once_and_is_never_retried(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    dials = 0

    async def counting_dial(nursery: trio.Nursery, resource: str) -> Any:
        nonlocal dials
        dials += 1
        return await test_hub.dial(nursery, resource)

    stranger = test_hub.register("other-tenant", "a1")
    test_hub.register("test", "a1")
    with pytest.raises(AuthenticationError, match="refused agent 'a1'"):
        async with test_hub.open_agent("a1", private_key=stranger, dial=counting_dial):
            pytest.fail("must not connect")
    assert dials == 1


async def test_failure_counter_resets_only_after_a_healthy_connection(
    test_hub: TestHub, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every connection is welcomed, but the hub never ACKs a heartbeat.
    hub = test_hub.hub

    def no_acks(session: Any, frame: Any) -> None:
        pass

    monkeypatch.setattr(hub, "_handle_heartbeat", no_acks)
    with pytest.raises(ReconnectFailed) as info:
        async with test_hub.open_agent("a1", heartbeat_interval=1.0) as agent:
            await trio.sleep_forever()
    assert info.value.attempts == 10
    assert isinstance(info.value.last_cause, HeartbeatTimeout)
    assert info.value.last_cause.timeout == 3.0  # 1 s x the default multiplier 3.0
    assert "no heartbeat ACK" in str(info.value.last_cause)
    assert agent.get_connection_health()["reconnect_attempts"] == 10
    assert agent.get_connection_health()["connected"] is False


async def test_clean_close_by_the_hub_reconnects(
    test_hub: TestHub, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "artcafe_trio.agent")
    async with test_hub.open_agent("a1", rng=random.Random(1)) as agent:
        first = agent.session_id
        for code in (1000, 1001, 1012):
            test_hub.hub.close_all(code, "bye")
            await trio.sleep(0.01)
            assert not agent.health().connected
            with trio.fail_after(5):
                await agent.wait_connected()
            assert agent.session_id != first
        assert agent.health().total_reconnects == 3
    warnings = [r.getMessage() for r in caplog.records if "reconnect attempt" in r.getMessage()]
    assert len(warnings) == 3
    assert "attempt 1/10" in warnings[0]
    assert "1012" in warnings[2]


async def test_auto_reconnect_false_raises_connection_lost(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    with pytest.raises(ConnectionLost) as info:
        async with test_hub.open_agent("a1", auto_reconnect=False):
            test_hub.hub.close_all(1012, "restart")
            await trio.sleep_forever()
    assert info.value.code == 1012


async def test_hub_outage_restores_subscriptions_before_buffered_publishes(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    received: list[Any] = []
    order: list[str] = []
    async with test_hub.open_agent("a1") as agent:
        agent.on_message("jobs.*")(lambda subject, data: received.append(data))

        @agent.on_reconnect
        async def recovered() -> None:
            order.append(f"callback after {len(received)} messages")

        await trio.sleep(1)
        test_hub.go_down()
        await trio.sleep(0.01)
        assert agent.state == "reconnecting"
        publishing_done = trio.Event()

        confirmed = 0

        async def publish_during_outage(i: int) -> None:
            nonlocal confirmed
            await agent.publish(f"jobs.{i}", i, confirm=True)
            confirmed += 1
            if confirmed == 5:
                publishing_done.set()

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(publish_during_outage, i)
            await trio.sleep(10)
            assert agent.health().waiting_publishes == 5
            assert received == []
            test_hub.come_back()
            with trio.fail_after(120):
                await publishing_done.wait()
        await trio.sleep(0.1)
        # Self-delivery proves the subscription was back before the buffered publishes.
        assert sorted(received) == [0, 1, 2, 3, 4]
        assert len(order) == 1  # on_reconnect ran once, for the one reconnection


async def test_confirmed_publish_whose_ack_was_lost_arrives_exactly_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub() as hub:
        received: list[Any] = []
        async with (
            hub.open_agent("watcher", heartbeat_interval=None) as watcher,
            hub.open_agent("pub", heartbeat_interval=5) as pub,
        ):
            await watcher.subscribe("orders.>", lambda s, d: received.append(d))
            stream = hub._streams[-1]  # the publisher's connection
            stream.drop_incoming = True  # the hub's answers (ACKs) are lost
            with trio.fail_after(60):
                message_id = await pub.publish("orders.new", {"n": 1}, confirm=True)
            assert message_id is not None
            assert pub.health().total_reconnects == 1
            await trio.sleep(1)
        assert received == [{"n": 1}]


async def test_publish_waits_while_disconnected_and_a_cancelled_wait_withdraws_it(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    received: list[Any] = []
    async with (
        test_hub.open_agent("watcher", heartbeat_interval=None) as watcher,
        test_hub.open_agent("pub") as pub,
    ):
        await watcher.subscribe("x", lambda s, d: received.append(d))
        test_hub.go_down()
        await trio.sleep(0.01)
        assert not pub.health().connected
        with trio.move_on_after(3) as scope:
            await pub.publish("x", "withdrawn")
        assert scope.cancelled_caught
        assert pub.health().waiting_publishes == 0
        test_hub.come_back()
        await pub.wait_connected()
        await watcher.wait_connected()
        await pub.publish("x", "sent", confirm=True)
        await trio.sleep(1)
    assert received == ["sent"]


async def test_handler_blocking_ten_timeouts_causes_no_reconnect(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    done = trio.Event()
    async with test_hub.open_agent(
        "a1", heartbeat_interval=1, heartbeat_timeout_multiplier=3
    ) as agent:

        @agent.on_message("slow")
        async def slow(subject: str, data: Any) -> None:
            await trio.sleep(30)  # 10 x the 3 s timeout
            done.set()

        await agent.subscribe("ping", lambda s, d: None)
        session = agent.session_id
        await agent.publish("slow", None)
        await done.wait()
        health = agent.health()
        assert health.total_reconnects == 0
        assert agent.session_id == session
        assert health.seconds_since_ack is not None
        assert health.seconds_since_ack < 1.1 + 1e-6  # no gap over interval x (1 + jitter)
    [record] = [r for r in test_hub.hub.presence_table() if r.agent_id == "a1"]
    assert (record.status, record.reason) == ("offline", "left")


async def test_handlers_are_ordered_per_subscription_and_errors_do_not_stop_the_agent(
    test_hub: TestHub, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []
    async with test_hub.open_agent("a1") as agent:

        @agent.on_message("n")
        async def ordered(subject: str, data: int) -> None:
            await trio.sleep(random.random())
            if data == 3:
                raise ValueError("boom on 3")
            seen.append(data)

        for i in range(6):
            await agent.publish("n", i, confirm=True)
        await trio.sleep(10)
        assert seen == [0, 1, 2, 4, 5]
        assert agent.health().handler_errors == 1
        assert agent.health().connected
    assert any("boom on 3" in (r.exc_text or "") or r.exc_info for r in caplog.records)


async def test_raise_handler_errors_makes_a_handler_error_fatal(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    with pytest.raises(ValueError, match="fatal"):
        async with test_hub.open_agent("a1", raise_handler_errors=True) as agent:

            @agent.on_message("x")
            def bad(subject: str, data: Any) -> None:
                raise ValueError("fatal")

            await agent.publish("x", 1)
            await trio.sleep_forever()


async def test_concurrent_handlers_overlap_up_to_the_limit(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    running = peak = 0
    async with test_hub.open_agent("a1", max_concurrent_handlers=3) as agent:

        @agent.on_message("job")
        async def work(subject: str, data: Any) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await trio.sleep(1)
            running -= 1

        for i in range(9):
            await agent.publish("job", i)
        await trio.sleep(2.9)
        assert running == 3  # the third batch of three is still at work
        await trio.sleep(0.2)
        assert running == 0
        assert peak == 3


async def test_wildcards_and_concrete_subject_and_message_argument(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    got: list[tuple[str, str, Any]] = []
    async with test_hub.open_agent("a1") as agent:
        await agent.subscribe("tasks.*", lambda s, d: got.append(("*", s, d)))
        await agent.subscribe("tasks.>", lambda s, d, m: got.append((">", s, m.sender)))
        await agent.publish("tasks.new", 1)
        await agent.publish("tasks.a.b", 2)
        await agent.publish("tasksXYZ", 3)
        await trio.sleep(1)
    assert sorted(got) == [
        ("*", "tasks.new", 1),
        (">", "tasks.a.b", "a1"),
        (">", "tasks.new", "a1"),
    ]


async def test_unsubscribe_stops_delivery(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    got: list[Any] = []
    async with test_hub.open_agent("a1") as agent:
        handler = got.append
        await agent.subscribe("x", lambda s, d: handler(d))
        await agent.publish("x", 1, confirm=True)
        await trio.sleep(0.1)
        await agent.unsubscribe("x")
        await agent.publish("x", 2, confirm=True)
        await trio.sleep(0.1)
    assert got == [1]


async def test_refused_subscription_raises_hub_error(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    async with test_hub.open_agent("a1") as agent:
        with pytest.raises(HubError) as info:
            await agent.subscribe("$reply.>", lambda s, d: None)
        assert info.value.code == "forbidden_subject"


async def test_publishing_to_the_presence_prefix_fails_loudly(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    async with test_hub.open_agent("a1") as agent:
        with pytest.raises(HubError) as info:
            await agent.publish("$presence.a2", {"status": "offline"}, confirm=True)
        assert info.value.code == "forbidden_subject"
        assert agent.health().waiting_publishes == 0


async def test_invalid_or_oversized_publish_fails_in_the_caller(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    async with test_hub.open_agent("a1") as agent:
        with pytest.raises(ProtocolError) as info:
            await agent.publish("tasks.*", 1)
        assert info.value.code == "invalid_subject"
        with pytest.raises(ProtocolError) as info:
            await agent.publish("big", "x" * (1024 * 1024))
        assert info.value.code == "frame_too_large"
        with pytest.raises(TypeError):
            await agent.publish("x", object())
        assert agent.health().waiting_publishes == 0


async def test_request_reply(test_hub: TestHub, autojump_clock: trio.abc.Clock) -> None:
    async with test_hub.open_agent("worker") as worker, test_hub.open_agent("client") as client:

        @worker.on_message("math.double")
        async def double(subject: str, data: int, message: Message) -> None:
            await worker.reply(message, data * 2)

        await trio.sleep(0.1)
        with trio.fail_after(5):
            assert await client.request("math.double", 21) == 42


async def test_presence_events_and_table(test_hub: TestHub, autojump_clock: trio.abc.Clock) -> None:
    events: list[tuple[str, str, str]] = []
    async with test_hub.open_agent("monitor") as monitor:
        await monitor.subscribe(
            "$presence.>", lambda s, d: events.append((d["agent_id"], d["status"], d["reason"]))
        )
        async with test_hub.open_agent("worker"):
            table = {r.agent_id: r.status for r in await monitor.presence()}
            assert table == {"monitor": "online", "worker": "online"}
        await trio.sleep(0.1)
    assert events == [("worker", "online", "connected"), ("worker", "offline", "left")]


async def test_graceful_exit_lets_handlers_finish_and_flushes_publishes(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    results: list[Any] = []
    async with test_hub.open_agent("collector", heartbeat_interval=None) as collector:
        await collector.subscribe("results", lambda s, d: results.append(d))
        async with test_hub.open_agent("worker", stop_timeout=10) as worker:

            @worker.on_message("work")
            async def work(subject: str, data: int) -> None:
                await trio.sleep(2)
                await worker.publish("results", data * 10)

            await worker.publish("work", 1)
            await worker.publish("work", 2)
            await trio.sleep(0.1)
        # Leaving the block waited for both handlers and their publishes.
        await trio.sleep(0.1)
        assert results == [10, 20]
        with pytest.raises(AgentClosed):
            await worker.publish("results", 3)
    [record] = [r for r in test_hub.hub.presence_table() if r.agent_id == "worker"]
    assert (record.status, record.reason) == ("offline", "left")


async def test_stop_timeout_bounds_a_handler_that_never_ends(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    started = trio.Event()
    async with test_hub.open_agent("a1", stop_timeout=4) as agent:

        @agent.on_message("forever")
        async def forever(subject: str, data: Any) -> None:
            started.set()
            await trio.sleep_forever()

        await agent.publish("forever", None)
        await started.wait()
        leaving = trio.current_time()
    assert trio.current_time() - leaving == pytest.approx(4.0, abs=0.01)


async def test_outside_cancellation_propagates_and_still_leaves(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    with trio.move_on_after(5) as scope:
        async with test_hub.open_agent("a1"):
            await trio.sleep_forever()
    assert scope.cancelled_caught
    await trio.sleep(0.1)
    [record] = test_hub.hub.presence_table()
    assert (record.status, record.reason) == ("offline", "left")


async def test_stop_ends_the_block_without_error(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    async with test_hub.open_agent("a1") as agent:
        agent.stop()
        await trio.sleep_forever()
    assert agent.state == "closed"


async def test_get_connection_health_during_outage_and_after_giving_up(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    snapshots: list[dict[str, Any]] = []
    with pytest.raises(ReconnectFailed):
        async with test_hub.open_agent(
            "a1", heartbeat_interval=1, max_reconnect_attempts=3, rng=random.Random(1)
        ) as agent:  # seeded: three short backoff draws could sum to under a second
            await trio.sleep(1.5)
            snapshots.append(agent.get_connection_health())
            test_hub.go_down()
            await trio.sleep(0.01)
            snapshots.append(agent.get_connection_health())
            await trio.sleep_forever()
    snapshots.append(agent.get_connection_health())
    connected, outage, gave_up = snapshots
    assert (connected["connected"], connected["healthy"]) == (True, True)
    assert (outage["connected"], outage["healthy"]) == (False, False)
    assert outage["reconnect_attempts"] == 1
    assert outage["last_heartbeat_ack"] == connected["last_heartbeat_ack"]
    assert gave_up["reconnect_attempts"] == 3
    assert gave_up["state"] == "closed"
    assert gave_up["seconds_since_ack"] > 1


class CustomMonitoringAgent(HeartbeatAgent):
    """The original guide's subclass pattern, verbatim in shape."""

    async def setup(self) -> None:
        @self.on_message("system.health")
        async def health_check(subject: str, data: Any) -> None:
            health = self.get_connection_health()
            await self.publish(
                "health.response",
                {
                    "agent_id": self.agent_id,
                    "healthy": health["healthy"],
                    "last_heartbeat": health["last_heartbeat_ack"],
                    "uptime": health["seconds_since_ack"],
                },
            )

    async def run(self) -> None:
        await self.setup()
        await super().run()


async def test_custom_monitoring_agent_from_the_original_guide(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    responses: list[Any] = []
    key = test_hub.register("org-1", "monitor-1")
    agent = CustomMonitoringAgent(
        agent_id="monitor-1",
        private_key=key,
        organization_id="org-1",
        heartbeat_interval=15,
        heartbeat_jitter=0,  # the exact schedule: heartbeats at t=0, 15, 30...
        dial=test_hub.dial,
    )
    async with (
        trio.open_nursery() as nursery,
        test_hub.open_agent("probe", tenant_id="org-1") as probe,
    ):
        nursery.start_soon(agent.run)
        await probe.subscribe("health.response", lambda s, d: responses.append(d))
        await trio.sleep(20)
        await probe.publish("system.health", {})
        await trio.sleep(1)
        await agent.stop()
    [response] = responses
    assert response["agent_id"] == "monitor-1"
    assert response["healthy"] is True
    assert isinstance(response["last_heartbeat"], str)
    assert response["uptime"] == pytest.approx(5.0, abs=0.01)  # last ACK at t=15, asked at t=20


async def test_simple_agent_sends_no_heartbeats(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    key = test_hub.register("org", "simple")
    agent = SimpleAgent("simple", organization_id="org", private_key=key, dial=test_hub.dial)
    got: list[Any] = []
    agent.on_message("hello")(lambda s, d: got.append(d))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.sleep(1000)
        health = agent.get_connection_health()
        assert health["connected"] is True
        assert health["healthy"] is True
        assert health["last_heartbeat_ack"] is None
        await agent.publish("hello", "world")
        await trio.sleep(1)
        await agent.stop()
    assert got == ["world"]
    assert test_hub.hub.stats.heartbeats == 0


async def test_agent_arguments_are_validated() -> None:
    from artcafe_trio import generate_private_key, open_agent

    key = generate_private_key()
    with pytest.raises(ValueError, match="organization_id"):
        async with open_agent(agent_id="a", private_key=key):
            pass
    with pytest.raises(ValueError, match="exactly one"):
        async with open_agent(agent_id="a", tenant_id="t"):
            pass
    with pytest.raises(ValueError, match="aliases"):
        async with open_agent(agent_id="a", tenant_id="t", organization_id="u", private_key=key):
            pass


async def test_over_real_sockets() -> None:
    from artcafe_trio import open_hub

    async with open_hub(port=0) as hub:
        key = TestHub(hub).register("acme", "tcp-agent")
        async with trio.open_nursery():
            from artcafe_trio import open_agent

            with trio.fail_after(10):
                async with open_agent(
                    url=hub.url, agent_id="tcp-agent", organization_id="acme", private_key=key
                ) as agent:
                    got = trio.Event()
                    await agent.subscribe("ping", lambda s, d: got.set())
                    await agent.publish("ping", 1, confirm=True)
                    await got.wait()
                assert agent.state == "closed"


async def test_presence_query_survives_a_connection_lost_before_the_answer(
    test_hub: TestHub, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = test_hub.hub
    handle_query = hub._handle_presence_query
    dropped = 0

    def lose_first_query(session: Any, frame: Any) -> None:
        nonlocal dropped
        if not dropped:
            dropped += 1
            session.close(1012, "restart")  # the answer never comes on this connection
            return
        handle_query(session, frame)

    monkeypatch.setattr(hub, "_handle_presence_query", lose_first_query)
    async with test_hub.open_agent("a1") as agent:
        with trio.fail_after(30):
            table = await agent.presence()
        assert [r.agent_id for r in table] == ["a1"]
        assert dropped == 1
        assert agent.health().total_reconnects == 1


async def test_publish_waiting_when_the_agent_stops_raises_agent_closed(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    outcome: list[BaseException] = []

    async def publish_from_outside(agent: Any) -> None:
        try:
            await agent.publish("x", 1)
        except AgentClosed as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        async with test_hub.open_agent("a1", stop_timeout=2) as agent:
            test_hub.go_down()
            await trio.sleep(0.01)
            nursery.start_soon(publish_from_outside, agent)
            await trio.sleep(1)
            assert agent.health().waiting_publishes == 1
    assert len(outcome) == 1
    assert agent.health().waiting_publishes == 0


async def test_cancelling_while_the_hub_is_unreachable_ends_promptly(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    test_hub.go_down()
    start = trio.current_time()
    with trio.move_on_after(5) as scope:
        async with test_hub.open_agent("a1"):
            pytest.fail("must not connect")
    assert scope.cancelled_caught
    assert trio.current_time() - start == pytest.approx(5.0, abs=1e-6)


async def test_stop_before_the_first_connection_ends_run(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    key = test_hub.register("org", "a1")
    agent = HeartbeatAgent("a1", organization_id="org", private_key=key, dial=test_hub.dial)
    test_hub.go_down()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await trio.sleep(3)
        assert agent.get_connection_health()["state"] == "connecting"
        stopped_at = trio.current_time()
        await agent.stop()
    assert trio.current_time() - stopped_at < 0.01
    assert agent.get_connection_health()["state"] == "closed"


# --- run_agent: an agent as a task of the caller's nursery ------------------------------


async def test_run_agent_in_the_callers_nursery(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    key = test_hub.register("test", "a1")
    got: list[Any] = []
    async with trio.open_nursery() as nursery:
        agent = await nursery.start(
            functools.partial(
                run_agent, agent_id="a1", tenant_id="test", private_key=key,
                transport=test_hub.transport,
            )
        )  # fmt: skip
        assert agent.state == "connected" and agent.health().connected
        await agent.subscribe("jobs", lambda subject, data: got.append(data))
        assert await agent.publish("jobs", 7, confirm=True)
        await trio.sleep(1)
        agent.stop()  # the task stops gracefully and returns: the nursery ends
    assert got == [7]
    assert agent.state == "closed"
    [record] = [r for r in test_hub.hub.presence_table() if r.agent_id == "a1"]
    assert (record.status, record.reason) == ("offline", "left")


async def test_run_agent_is_cancelled_with_the_nursery(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    key = test_hub.register("test", "a1")
    async with trio.open_nursery() as nursery:
        agent = await nursery.start(
            functools.partial(
                run_agent, agent_id="a1", tenant_id="test", private_key=key, dial=test_hub.dial
            )
        )
        nursery.cancel_scope.cancel()
    assert agent.state == "closed"
    [record] = [r for r in test_hub.hub.presence_table() if r.agent_id == "a1"]
    assert (record.status, record.reason) == ("offline", "left")  # the quick leave


async def test_run_agent_raises_entry_errors_from_start(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    stranger = generate_private_key()
    async with trio.open_nursery() as nursery:
        with pytest.raises(AuthenticationError):
            await nursery.start(
                functools.partial(
                    run_agent, agent_id="a1", tenant_id="test", private_key=stranger,
                    transport=test_hub.transport,
                )
            )  # fmt: skip


async def test_an_agent_serves_once(test_hub: TestHub, autojump_clock: trio.abc.Clock) -> None:
    async with test_hub.open_agent("a1") as agent:
        with pytest.raises(RuntimeError, match="only once"):
            await agent.serve()


async def test_agent_state_is_a_string_enum(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    async with test_hub.open_agent("a1") as agent:
        state: str = agent.state
        assert agent.state is AgentState.CONNECTED and state == "connected"
        assert type(agent.health().state) is str and agent.health().state == "connected"
    assert agent.health().state == AgentState.CLOSED


async def test_dial_and_transport_are_exclusive(test_hub: TestHub) -> None:
    with pytest.raises(ValueError, match="at most one of dial and transport"):
        async with test_hub.open_agent("a1", dial=test_hub.dial, transport=test_hub.transport):
            pass


async def test_open_test_hub_fields_override_a_given_config(autojump_clock: trio.abc.Clock) -> None:
    from artcafe_trio import HubConfig

    base = HubConfig(disconnect_grace=7.0, close_timeout=0.25)
    async with open_test_hub(base, disconnect_grace=0.0) as hub:
        assert hub.hub.config.disconnect_grace == 0.0  # the keyword wins
        assert hub.hub.config.close_timeout == 0.25  # the rest is the config's
    async with open_test_hub(send_queue_size=7) as hub:
        assert hub.hub.config.send_queue_size == 7
        assert hub.hub.config.disconnect_grace == HubConfig().disconnect_grace


# --- a hub that breaks the handshake: the ClientConnection's errors, as failed attempts ----

CHALLENGE_TEXT = '{"type": "challenge", "nonce": "n", "expires_in": 30, "hub_id": "fake"}'


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        (["{not json"], "not valid JSON"),
        (['{"type": "heartbeat_ack", "seq": 1, "hub_time": 0}'], "expected a challenge"),
        ([CHALLENGE_TEXT, CHALLENGE_TEXT], "expected a welcome"),
        (
            [CHALLENGE_TEXT, '{"type": "error", "code": "challenge_expired", "message": "slow"}'],
            "hub error during handshake: challenge_expired: slow",
        ),
    ],
)
async def test_a_hub_breaking_the_handshake_is_a_failed_attempt(
    autojump_clock: trio.abc.Clock, frames: list[str], expected: str
) -> None:
    import trio.testing
    import trio_websocket

    from artcafe_trio.agent._transport import wrap_client_stream

    async def fake_hub(stream: trio.abc.Stream, nursery: trio.Nursery) -> None:
        request = await trio_websocket.wrap_server_stream(nursery, stream)
        ws = await request.accept()
        await ws.send_message(frames[0])
        for frame in frames[1:]:
            await ws.get_message()  # the agent's auth
            await ws.send_message(frame)
        await trio.sleep_forever()

    async with trio.open_nursery() as hubs:

        async def dial(nursery: trio.Nursery, resource: str) -> Any:
            client, server = trio.testing.memory_stream_pair()
            hubs.start_soon(fake_hub, server, hubs)
            return await wrap_client_stream(nursery, client, "fake", resource)

        with pytest.raises(ConnectFailed, match=expected) as info:
            async with open_agent(
                agent_id="a1", tenant_id="t", private_key=generate_private_key(), dial=dial,
                retry_first_connect=False,
            ):  # fmt: skip
                pass
        assert not info.value.permanent  # a broken hub may be fixed: it would be retried
        hubs.cancel_scope.cancel()


# --------------------------------------------------------------------------- closing


class StallingStream(trio.abc.Stream):
    """A byte stream that records when it is closed and what went out. ``stall_close``:
    a close frame (``0x88``) it is given never goes out: the agent's WebSocket reader
    is stuck sending its reply to the hub's close, which trio-websocket has already
    recorded (``stalled`` is then set)."""

    def __init__(
        self, inner: trio.abc.Stream, *, stall_close: bool, swallow_text: bool = False
    ) -> None:
        self.inner = inner
        self.stall_close = stall_close
        # Text frames (0x81) are dropped: sent ones, and received ones after the first
        # (the challenge): the hub's answers never arrive, nor its error frames.
        self.swallow_text = swallow_text
        self.challenged = False
        self.stalled = trio.Event()
        self.sent: list[bytes] = []
        self.log: list[str] = []  # "sent close", "received close", "closed" in order
        self.closed_at: float | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.stall_close and bytes(data[:1]) == b"\x88":
            self.stalled.set()
            await trio.sleep_forever()
        if self.swallow_text and bytes(data[:1]) == b"\x81":
            await trio.lowlevel.checkpoint()
            return
        await self.inner.send_all(data)
        self.sent.append(bytes(data))
        if bytes(data[:1]) == b"\x88":
            self.log.append("sent close")

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if self.swallow_text and self.challenged:
            data = _without_text_frames(data)
            if not data:  # not the end of the stream: read on
                return await self.receive_some(max_bytes)
        self.challenged = self.challenged or b"\x81" in data[:1]
        if b"\x88" in data[:1]:  # a frame from the hub (unmasked) starting the chunk
            self.log.append("received close")
        return data

    async def aclose(self) -> None:
        if self.closed_at is None:
            self.closed_at = trio.current_time()
            self.log.append("closed")
        await self.inner.aclose()


def _without_text_frames(data: bytes | bytearray) -> bytes:
    """``data`` (whole frames from the hub: unmasked, each under 64 KiB) without its text
    frames."""
    kept = b""
    while data:
        length, header = data[1] & 0x7F, 2
        if length == 126:
            length, header = int.from_bytes(data[2:4], "big"), 4
        frame, data = data[: header + length], data[header + length :]
        if frame[:1] != b"\x81":
            kept += frame
    return kept


def _recorded_transport(
    hub: TestHub, *, stall_close: bool, swallow_text: bool = False
) -> tuple[Any, list[StallingStream], list[StallingStream]]:
    """A transport to ``hub`` whose streams (agent's end, hub's end) are recorded."""
    import trio.testing

    from artcafe_trio.agent._transport import MemoryTransport

    ends: list[StallingStream] = []
    hub_ends: list[StallingStream] = []

    async def open_stream() -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        client, server = trio.testing.memory_stream_pair()
        hub_ends.append(StallingStream(server, stall_close=False))
        hub.hub.serve_stream(hub_ends[-1], "memory")
        ends.append(StallingStream(client, stall_close=stall_close, swallow_text=swallow_text))
        return ends[-1]

    return MemoryTransport(open_stream), ends, hub_ends


async def test_the_socket_is_closed_when_the_agent_stops_while_replying_to_the_hub_s_close(
    autojump_clock: trio.abc.Clock,
) -> None:
    # trio-websocket 0.12 records the hub's close before it sends its reply; an aclose()
    # then returns at once without closing the stream, and the reader (cancelled with
    # the connection) never sends the reply: the hub waited close_timeout for it.
    async with open_test_hub(close_timeout=2.0) as hub:
        transport, ends, hub_ends = _recorded_transport(hub, stall_close=True)
        async with hub.open_agent("a1", transport=transport):
            hub.hub.close_all(1012, "restart")
            with trio.fail_after(5):
                await ends[0].stalled.wait()
            stopped = trio.current_time()
        with trio.fail_after(5):
            while hub_ends[0].closed_at is None:
                await trio.sleep(0.01)
        assert ends[0].closed_at == stopped  # the agent closed its socket at once
        assert hub_ends[0].closed_at - stopped < 0.1  # not after close_timeout (2 s)


async def test_the_socket_is_closed_when_the_connect_times_out_while_replying_to_the_hub_s_close(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The hub gives up on the agent's auth (which never arrives) and closes; the agent's
    # reply is stuck; then the agent's connect_timeout cuts its handshake short.
    async with open_test_hub(challenge_timeout=1.0, close_timeout=10.0) as hub:
        transport, ends, hub_ends = _recorded_transport(hub, stall_close=True, swallow_text=True)
        with pytest.raises(ConnectFailed, match="no welcome"):
            async with hub.open_agent(
                "a1", transport=transport, connect_timeout=3.0, retry_first_connect=False
            ):
                pass  # pragma: no cover
        assert ends[0].stalled.is_set()
        assert ends[0].closed_at == pytest.approx(3.0, abs=0.1)
        with trio.fail_after(15):
            while hub_ends[0].closed_at is None:
                await trio.sleep(0.01)
        assert hub_ends[0].closed_at < 3.2  # not after close_timeout (at 11 s)


async def test_an_agent_cancelled_from_within_sends_its_close_frame_and_does_not_wait(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Ctrl+C in a handler: the agent's tasks, its WebSocket reader among them, are
    # cancelled; nothing can read the hub's reply to the close, so none is waited for.
    async with open_test_hub() as hub:
        transport, ends, _ = _recorded_transport(hub, stall_close=False)
        interrupted: list[float] = []
        with pytest.raises(KeyboardInterrupt):
            async with hub.open_agent("a1", transport=transport) as agent:

                @agent.on_message("job")
                def interrupt(subject: str, data: Any) -> None:
                    interrupted.append(trio.current_time())
                    raise KeyboardInterrupt

                await agent.publish("job", 1)
                await trio.sleep(10)
        assert trio.current_time() - interrupted[0] < 0.1  # was 1 s: the close limit
        assert ends[0].log == ["sent close", "closed"]


async def test_a_graceful_stop_still_waits_for_the_hub_s_close_reply(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub() as hub:
        transport, ends, _ = _recorded_transport(hub, stall_close=False)
        async with hub.open_agent("a1", transport=transport):
            pass
        assert ends[0].log == ["sent close", "received close", "closed"]
        (row,) = hub.hub.presence_table("test")
        assert (row.status, row.reason) == ("offline", "left")
