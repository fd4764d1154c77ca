"""The examples of docs/testing.md: testing your own agents with artcafe_trio.testing."""

import random

import pytest
import trio

from artcafe_trio import ConnectFailed, ReconnectFailed
from artcafe_trio.testing import open_test_hub

# --- the code under test: your agent's behaviour ---------------------------------------


def install_worker(agent):
    """Your agent's handlers, as your application registers them."""

    @agent.on_message("tasks.resize")
    async def resize(subject, data):
        await agent.publish("results.resize", {"width": data["width"] // 2})


# --- 1. a hub outage ---------------------------------------------------------------------


async def test_worker_recovers_from_a_hub_outage(autojump_clock):
    async with (
        open_test_hub() as hub,
        hub.open_agent("worker-1", tenant_id="acme", rng=random.Random(1)) as worker,
    ):
        install_worker(worker)
        reconnected = trio.Event()
        worker.on_reconnect(reconnected.set)

        hub.go_down()  # every connection is closed with 1012; new ones are refused
        await trio.sleep(30)  # a 30-second outage, in milliseconds of real time
        assert worker.health().state == "reconnecting"
        assert worker.health().reconnect_attempts > 0

        hub.come_back()
        await reconnected.wait()  # backoff found the hub again; subscriptions are restored

        async with hub.open_agent("planner", tenant_id="acme") as planner:
            results = []
            await planner.subscribe("results.*", lambda subject, data: results.append(data))
            await planner.publish("tasks.resize", {"width": 640})
            await trio.sleep(1)
            assert results == [{"width": 320}]


# --- 2. a hung hub: the ACK watchdog fires at exactly interval x multiplier -----------------


async def test_hung_hub_is_detected_at_exactly_the_timeout(autojump_clock):
    async with (
        open_test_hub() as hub,
        hub.open_agent(
            "worker-1",
            tenant_id="acme",
            heartbeat_interval=10,
            heartbeat_timeout_multiplier=3,
            heartbeat_jitter=0,  # heartbeats exactly every 10 s from the connection
            rng=random.Random(1),  # a reproducible backoff: the first retry waits 0.13 s
        ) as worker,
    ):
        await trio.sleep(25)  # heartbeats at t=0, 10 and 20, each ACKed at once
        hub.blackhole()  # the sockets stay open, but nothing gets through either way
        last_ack = trio.current_time() - worker.health().seconds_since_ack
        assert last_ack == 20

        await trio.sleep_until(last_ack + 30 - 0.001)
        assert worker.health().connected  # 1 ms before the timeout: still connected
        await trio.sleep_until(last_ack + 30 + 0.001)
        assert worker.health().state == "reconnecting"  # 1 ms after it: reconnecting

        hub.blackhole(False)  # let new connections through again
        await worker.wait_connected()


# --- 3. the hub's side: a silent agent goes offline with reason "timeout" ------------------


async def test_monitor_sees_a_silent_worker_time_out(autojump_clock):
    events = []

    def on_presence(subject, data):
        events.append((trio.current_time(), data["agent_id"], data["reason"]))

    async with (
        open_test_hub() as hub,
        hub.open_agent(
            "worker-1",
            tenant_id="acme",
            heartbeat_interval=10,
            heartbeat_timeout_multiplier=3,
            heartbeat_jitter=0,  # heartbeats exactly every 10 s from the connection
        ),
    ):
        await trio.sleep(5)  # the hub last heard from the worker at t=0 (its first heartbeat)
        hub.blackhole(to_agents=False)  # what the worker sends is lost: it looks hung

        # Opened after blackhole(), so the monitor's own connection is not affected.
        async with hub.open_agent("monitor", tenant_id="acme") as monitor:
            await monitor.subscribe("$presence.>", on_presence)
            await trio.sleep(60)

    assert events[0] == (30, "worker-1", "timeout")  # 0 + 10 s x 3, to the tick


# --- 4. giving up, loudly -----------------------------------------------------------------


async def test_agent_gives_up_when_the_hub_stays_down(autojump_clock):
    async with open_test_hub() as hub:
        hub.go_down()
        with pytest.raises(ReconnectFailed) as failure:
            async with hub.open_agent("worker-1", tenant_id="acme", max_reconnect_attempts=3):
                pass  # never reached: entering waits for the first connection
        assert failure.value.attempts == 3
        cause = failure.value.last_cause  # the last attempt, told in words
        assert isinstance(cause, ConnectFailed) and not cause.permanent
        assert str(cause).startswith("cannot connect to ")
        assert isinstance(cause.__cause__, OSError)  # what failed underneath
