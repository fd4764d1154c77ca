"""Prove it under faults, in memory. Each scenario prints what it measured (run with
``-s``); the figures are collected in ``docs/reliability.md``.

Where the network's behaviour is what is tested (a blackholed hub, a flapping network, a
consumer that stops reading, a reconnect storm), the hub runs in memory behind
``tests/memfaults.py`` (the fault proxy's switches over in-memory streams) under
``autojump_clock``: every time measured is the library's own timeout or backoff, so the
expectations are exact. The scenarios that need real processes and sockets are in
``test_faults_processes.py``; scenario 1 (hub SIGKILL + restart) is in ``test_e2e.py``.
Both fault proxies' own self-tests are here.
"""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from artcafe_trio import (
    Agent,
    Backoff,
    CloseCode,
    Hub,
    PrivateKey,
    generate_private_key,
)
from artcafe_trio.testing import open_test_hub

from .faultkit import (
    FAST_BACKOFF,
    HEARTBEAT,
    TENANT,
    TIMEOUT,
    agent_resource,
    authenticated,
    memory_monitor,
    percentile,
    wait_until,
)
from .faults import open_fault_proxy
from .memfaults import MemoryFaultProxy

pytestmark = pytest.mark.timeout(60)


# --- the proxy itself ----------------------------------------------------------------------


@asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        )
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_fault_proxy_switches_do_what_they_say() -> None:
    async with echo_server() as port, open_fault_proxy(port) as proxy:
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await stream.send_all(b"ping")
        with trio.fail_after(2):
            assert await stream.receive_some() == b"ping"

        # Latency: each direction adds its delay; order is kept.
        proxy.set_latency(0.1)
        start = trio.current_time()
        for part in (b"a", b"b", b"c"):
            await stream.send_all(part)
        got = b""
        with trio.fail_after(2):
            while len(got) < 3:
                got += await stream.receive_some()
        elapsed = trio.current_time() - start
        assert got == b"abc"
        assert 0.2 <= elapsed < 0.4
        proxy.set_latency(0)

        # Blackhole: the socket stays up, nothing comes back; afterwards it flows again.
        proxy.blackhole(to_agents=False)
        await stream.send_all(b"lost")
        with trio.move_on_after(0.3) as silent:
            await stream.receive_some()
        assert silent.cancelled_caught
        assert proxy.stats.dropped["to_hub"] == 4
        proxy.blackhole(False)
        await stream.send_all(b"back")
        with trio.fail_after(2):
            assert await stream.receive_some() == b"back"

        # Reset: the client sees the connection die abruptly.
        assert proxy.reset_all() == 1
        with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()  # ECONNRESET
        await stream.aclose()
        await wait_until(lambda: proxy.active == 0, 2)

        # Refuse ("close"): accepted, then reset at once; the reset may even beat the
        # client's connect() back from the kernel.
        proxy.refuse()
        with trio.fail_after(2), pytest.raises((trio.BrokenResourceError, OSError)):
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            try:
                await stream.receive_some()
            finally:
                await stream.aclose()
        await wait_until(lambda: proxy.refused == 1, 2)
        # Refuse ("unlisten"): nobody listens; then the same port listens again.
        proxy.refuse(mode="unlisten")
        with pytest.raises(OSError, match="onnect"):
            await trio.open_tcp_stream("127.0.0.1", proxy.port)
        proxy.refuse(False)
        stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
        await stream.send_all(b"again")
        with trio.fail_after(2):
            assert await stream.receive_some() == b"again"
        await stream.aclose()


async def test_memory_fault_proxy_switches_do_what_they_say(autojump_clock: trio.abc.Clock) -> None:
    """The in-memory proxy's switches, on raw byte streams (the test plays the hub)."""
    async with open_test_hub() as hub:
        proxy = MemoryFaultProxy(hub, capacity=8)
        link_end = await proxy.connect("/x", serve=False)
        (link,) = proxy.links
        # Back-pressure: 8 bytes unread fill the pipe; a 9th waits for the reader.
        await link.agent.send_all(b"12345678")
        with trio.move_on_after(1) as blocked:
            await link.agent.send_all(b"9")
        assert blocked.cancelled_caught
        assert await link.hub.receive_some() == b"12345678"
        await link.hub.send_all(b"back")
        assert await link_end.receive_some() == b"back"
        # Blackhole: written bytes vanish (counted), the stream stays open.
        proxy.blackhole(to_agents=False)
        await link.agent.send_all(b"lost")
        assert proxy.stats.dropped["to_hub"] == 4
        proxy.blackhole(False)
        await link.agent.send_all(b"kept")
        assert await link.hub.receive_some() == b"kept"
        # Reset: both ends fail, pending and later.
        assert proxy.reset_all() == 1
        with pytest.raises(trio.BrokenResourceError):
            await link_end.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await link.hub.send_all(b"x")
        assert proxy.active == 0 and proxy.reset_all() == 0
        # Refuse: "unlisten" fails the connect; "close" connects and resets at once.
        proxy.refuse(mode="unlisten")
        with pytest.raises(OSError, match="refused"):
            await proxy.connect("/y")
        proxy.refuse(mode="close")
        refused_end = await proxy.connect("/z", serve=False)
        with pytest.raises(trio.BrokenResourceError):
            await refused_end.receive_some()
        assert (proxy.accepted, proxy.refused) == (1, 2)
        assert len(proxy.attempts) == 3


# --- scenario 2: a blackholed hub (half-open) --------------------------------------------


async def test_blackholed_hub_is_detected_by_each_agent_at_its_ack_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    names = [f"worker-{i}" for i in range(4)]
    async with (
        open_test_hub(disconnect_grace=1.0) as hub,
        memory_monitor(hub) as seen,
        AsyncExitStack() as stack,
    ):
        proxy = MemoryFaultProxy(hub)
        agents: list[Agent] = []
        for index, name in enumerate(names):
            agents.append(
                await stack.enter_async_context(
                    hub.open_agent(
                        name, tenant_id=TENANT, dial=proxy.dial, backoff=FAST_BACKOFF,
                        connect_timeout=1.0, rng=random.Random(index), **HEARTBEAT,
                    )
                )
            )  # fmt: skip
            await trio.sleep(0.13)  # spread the agents' heartbeat phases
        await trio.sleep(1.0)
        sessions = [a.session_id for a in agents]
        assert all(a.health().healthy for a in agents)
        links = [proxy.links_of(name)[-1] for name in names]

        proxy.blackhole()
        blackholed_at = trio.current_time()
        ack_at_blackhole = []
        for agent in agents:
            since = agent.health().seconds_since_ack
            assert since is not None
            ack_at_blackhole.append(blackholed_at - since)
        # Each agent gives up on its connection (closes it) when its watchdog fires.
        with trio.fail_after(TIMEOUT + 1):
            while any(link.agent.closed_at is None for link in links):
                await trio.sleep(0.01)
        detection = []
        for i, agent in enumerate(agents):
            health = agent.health()
            assert not health.connected and health.seconds_since_ack is not None
            last_ack = trio.current_time() - health.seconds_since_ack
            assert last_ack == pytest.approx(ack_at_blackhole[i], abs=1e-9)  # no ACK got through
            closed_at = links[i].agent.closed_at
            assert closed_at is not None
            detection.append(closed_at - last_ack)
        print(
            "\n[scenario 2] blackholed hub, ACK timeout "
            f"{TIMEOUT:g} s: detection after last ACK = "
            + ", ".join(f"{d:.3f}" for d in detection)
            + " s (autojump clock: exact)"
        )
        assert detection == pytest.approx([TIMEOUT] * len(agents), abs=1e-9)
        # The hub, which hears nothing either, times every one of them out too, at the
        # same instant: its deadline is the last heartbeat (ACKed at once) + the timeout.
        await wait_until(lambda: hub.hub.stats.transitions.get("timeout", 0) == len(agents), 3)
        for i, name in enumerate(names):
            status, reason, at = seen.arrivals(name)[1]
            assert (status, reason) == ("offline", "timeout")
            assert at == pytest.approx(ack_at_blackhole[i] + TIMEOUT, abs=1e-9)

        proxy.blackhole(False)
        with trio.fail_after(10):
            for agent in agents:
                await agent.wait_connected()
        assert all(a.session_id not in sessions for a in agents)
        table = {r.agent_id: r.status for r in hub.hub.presence_table(TENANT)}
        assert table == {**dict.fromkeys(names, "online"), "monitor": "online"}
        assert hub.hub.stats.transitions.get("timeout", 0) == len(agents)


# --- scenario 4: a flapping network ------------------------------------------------------

GRACE = 1.5


async def test_flapping_network_is_not_a_presence_flap_but_a_long_cut_is(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub(disconnect_grace=GRACE) as hub, memory_monitor(hub) as seen:
        proxy = MemoryFaultProxy(hub)
        async with hub.open_agent(
            "flappy", tenant_id=TENANT, dial=proxy.dial, backoff=FAST_BACKOFF,
            max_reconnect_attempts=100, connect_timeout=1.0, rng=random.Random(4), **HEARTBEAT,
        ) as agent:  # fmt: skip
            back: list[float] = []  # when each new session was up (trio clock)
            agent.on_reconnect(lambda: back.append(trio.current_time()))
            await wait_until(lambda: seen.transitions("flappy") == [("online", "connected")], 5)
            await trio.sleep(0.5)

            # Short cuts: the connection is reset; the agent is back well within the grace.
            gaps = []
            for n in range(6):
                attempts = len(proxy.attempts)
                cut = trio.current_time()
                assert proxy.reset_all() == 1
                await wait_until(lambda: len(back) > n, GRACE)  # noqa: B023
                gaps.append(back[-1] - cut)
                # One attempt, after the first backoff delay (the last connection had
                # proved healthy, so the backoff restarted): the session is up at once.
                assert len(proxy.attempts) == attempts + 1
                assert proxy.attempts[-1] == pytest.approx(back[-1], abs=1e-9)
                assert 0 <= gaps[-1] < FAST_BACKOFF.ceiling(0)
                await trio.sleep(0.3)  # it proves healthy (an ACK), so its backoff restarts
            await trio.sleep(GRACE + 0.5)  # any grace timer would have fired by now
            print(
                f"\n[scenario 4] {len(gaps)} resets, grace {GRACE:g} s: back after "
                + ", ".join(f"{g * 1000:.0f}" for g in gaps)
                + f" ms; presence events for the agent: {seen.transitions('flappy')}"
            )
            assert max(gaps) < GRACE / 2
            assert agent.health().total_reconnects == len(gaps)
            assert seen.transitions("flappy") == [("online", "connected")]  # not a single flap

            # Long cuts: refused for longer than the grace; one offline and one online per cut.
            lateness = []
            for mode in ("close", "unlisten"):
                before, reconnects = len(seen.of("flappy")), len(back)
                proxy.refuse(mode=mode)
                assert proxy.reset_all() == 1
                cut_at = trio.current_time()
                await trio.sleep(GRACE + 1.0)
                proxy.refuse(False)
                await wait_until(lambda: len(back) > reconnects, 5)  # noqa: B023
                await wait_until(lambda: len(seen.of("flappy")) >= before + 2, 3)  # noqa: B023
                await trio.sleep(0.3)
                offline, online = seen.arrivals("flappy")[before:]
                lateness.append(offline[2] - (cut_at + GRACE))
                assert offline[:2] == ("offline", "disconnected")
                assert online[:2] == ("online", "connected")
                # Offline exactly when the grace ran out; online when the session was up.
                assert offline[2] == pytest.approx(cut_at + GRACE, abs=1e-9)
                assert online[2] == pytest.approx(back[-1], abs=1e-9)
            print(
                f"[scenario 4] long cuts ({GRACE + 1:g} s, refused by reset / by no listener): "
                f"offline {', '.join(f'{x * 1000:.0f}' for x in lateness)} ms after cut + grace; "
                f"refused attempts {proxy.refused}"
            )
            assert proxy.refused > 2  # the agent kept trying while refused, in both modes
            assert seen.transitions("flappy") == [
                ("online", "connected"),
                ("offline", "disconnected"), ("online", "connected"),
                ("offline", "disconnected"), ("online", "connected"),
            ]  # fmt: skip


# --- scenario 5: a consumer that stops reading -------------------------------------------

FLOOD = 500
BLOB = "x" * 32_000


def record_latency(samples: list[float], subject: str, data: Any) -> None:
    """Handler: publish→receive latency, both stamped with the trio clock."""
    samples.append(trio.current_time() - data["t"])


async def _flood(
    hub: Hub, publisher: Agent, latencies: dict[str, list[float]], subject: str
) -> int | None:
    """Publish ``FLOOD`` large messages, paced; return the index at which the hub cut a
    slow consumer off (``None`` if it did not)."""
    cut_at = None
    for seq in range(FLOOD):
        await publisher.publish(subject, {"seq": seq, "t": trio.current_time(), "blob": BLOB})
        if cut_at is None and hub.stats.slow_consumers:
            cut_at = seq
        await trio.sleep(0.002)
    await wait_until(lambda: all(len(v) == FLOOD for v in latencies.values()), 15)
    return cut_at


async def test_a_stuck_consumer_is_cut_off_without_slowing_the_others(
    autojump_clock: trio.abc.Clock,
) -> None:
    """In memory, each direction of a connection holds 64 KiB (a socket buffer), so a
    consumer that stops reading back-pressures the hub as over TCP; bytes cross in no
    time, so any latency measured is the hub's own doing."""
    watchers = ["watcher-1", "watcher-2"]
    config = {"send_queue_size": 64, "publish_rate": 1e9, "publish_burst": 10**9}
    # A long close_timeout lets the hub finish the frame it was writing to the stuck consumer
    # when it cut it off, so the consumer, once drained, sees the slow-consumer close code.
    async with open_test_hub(close_timeout=30, **config) as test_hub, AsyncExitStack() as stack:
        hub = test_hub.hub
        proxy = MemoryFaultProxy(test_hub)
        common = {"tenant_id": TENANT, "dial": proxy.dial, "backoff": FAST_BACKOFF, **HEARTBEAT}
        publisher = await stack.enter_async_context(test_hub.open_agent("pub", **common))
        latencies: dict[str, dict[str, list[float]]] = {"baseline": {}, "stuck": {}}
        for name in watchers:
            agent = await stack.enter_async_context(test_hub.open_agent(name, **common))
            for run, subject in (("baseline", "firehose.baseline"), ("stuck", "firehose.stuck")):
                latencies[run][name] = []
                await agent.subscribe(
                    subject, functools.partial(record_latency, latencies[run][name])
                )

        baseline_cut = await _flood(hub, publisher, latencies["baseline"], "firehose.baseline")
        assert baseline_cut is None and hub.stats.slow_consumers == 0

        async with trio.open_nursery() as nursery:
            key = test_hub.register(TENANT, "stuck")
            ws = await proxy.dial(nursery, agent_resource("stuck"))
            stuck = await authenticated(ws, "stuck", key, "firehose.stuck")
            stuck_cut = await _flood(hub, publisher, latencies["stuck"], "firehose.stuck")
            assert hub.stats.slow_consumers == 1
            assert stuck_cut is not None
            assert stuck_cut >= config["send_queue_size"]  # not before its queue was full
            with trio.fail_after(10):
                # Cut off: draining what it was sent ends with the slow-consumer close code.
                assert await stuck.close_code() == CloseCode.SLOW_CONSUMER
            with trio.move_on_after(2):
                await stuck.ws.aclose()
            nursery.cancel_scope.cancel()

        def figures(run: str, upto: int) -> tuple[float, float, float]:
            values = [x for samples in latencies[run].values() for x in samples[:upto]]
            return percentile(values, 0.5), percentile(values, 0.95), max(values)

        base_all, stuck_all = figures("baseline", FLOOD), figures("stuck", FLOOD)
        base_pre, stuck_pre = figures("baseline", stuck_cut), figures("stuck", stuck_cut)
        ms = "/".join

        def show(values: tuple[float, float, float]) -> str:
            return ms(f"{v * 1000:.1f}" for v in values)

        print(
            f"\n[scenario 5] {FLOOD} x {len(BLOB) // 1000} kB to 2 agents (+1 stuck); "
            f"stuck consumer cut off at message {stuck_cut}; latency p50/p95/max ms: "
            f"baseline {show(base_all)}, with stuck {show(stuck_all)}; "
            f"before the cut: baseline {show(base_pre)}, with stuck {show(stuck_pre)}"
        )
        assert all(len(s) == FLOOD for s in latencies["stuck"].values())  # nobody else lost any
        assert stuck_all[0] <= 3 * base_all[0] + 0.005
        assert stuck_pre[0] <= 3 * base_pre[0] + 0.005
        # Exactly: every watcher got every message at the instant it was published, with
        # and without the stuck consumer (a fan-out that waited for the stuck consumer, or
        # for a timeout to cut it off, would show here as trio time passing).
        assert base_all[2] == stuck_all[2] == 0.0


# --- scenario 6: a reconnect storm -------------------------------------------------------
#
# How the hub "restarts": ``hub.close_all(1012)`` (what a graceful shutdown sends) while the
# in-memory proxy in front of it refuses connections (ECONNREFUSED) for STORM_DOWN seconds:
# the outage is exactly STORM_DOWN, so the comparison measures the backoff policy alone.
# Under autojump_clock a handshake takes no time: every attempt is stamped at the instant
# the backoff chose. Scenario 7 and tests/test_e2e.py restart real hub processes.

STORM_AGENTS = 200
STORM_DOWN = 1.0
STORM_BASE, STORM_CAP = 2.0, 4.0


@attrs.define
class StormResult:
    attempts: list[float]  # seconds after the 1012 close
    recovered_in: float
    peak_share_1s: float
    peak_count_1s: int
    peak_count_100ms: int


def peak_window(times: list[float], width: float) -> int:
    """The most attempts in any window ``[t, t + width)``."""
    ordered = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ordered):
        while ordered[lo] <= t - width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def _storm(keys: dict[str, PrivateKey], backoff: Backoff) -> StormResult:
    async with open_test_hub(disconnect_grace=10.0) as test_hub, trio.open_nursery() as crowd:
        for name, key in keys.items():
            test_hub.registry.add_key(TENANT, name, key.public_key)
        proxy = MemoryFaultProxy(test_hub)
        agents: list[Agent] = []
        back: list[float] = []  # when each agent's new session was up
        leave = trio.Event()

        async def run_agent(index: int, name: str) -> None:
            async with test_hub.open_agent(
                name, tenant_id=TENANT, private_key=keys[name], dial=proxy.dial,
                backoff=backoff, heartbeat_interval=5, rng=random.Random(index),
            ) as agent:  # fmt: skip
                agent.on_reconnect(lambda: back.append(trio.current_time()))
                agents.append(agent)
                await leave.wait()

        for index, name in enumerate(keys):
            crowd.start_soon(run_agent, index, name)
        await wait_until(
            lambda: (
                len(agents) == STORM_AGENTS and all(a.health().last_ack is not None for a in agents)
            ),
            30,
            poll=0.05,
        )
        sessions = {a.session_id for a in agents}

        proxy.refuse(mode="unlisten")
        restart = trio.current_time()
        del proxy.attempts[:]
        test_hub.hub.close_all(CloseCode.SERVICE_RESTART, "hub restarting")
        await trio.sleep(STORM_DOWN)
        proxy.refuse(False)
        await wait_until(
            lambda: all(a.health().connected and a.session_id not in sessions for a in agents),
            20,
            poll=0.02,
        )
        await trio.sleep(0.2)  # no straggling attempts after that
        assert len(back) == STORM_AGENTS
        attempts = [t - restart for t in proxy.attempts]
        leave.set()
    peak = peak_window(attempts, 1.0)
    return StormResult(
        attempts=attempts,
        recovered_in=max(back) - restart,
        peak_share_1s=peak / len(attempts),
        peak_count_1s=peak,
        peak_count_100ms=peak_window(attempts, 0.1),
    )


async def test_reconnect_storm_is_spread_by_jitter(autojump_clock: trio.abc.Clock) -> None:
    names = [f"agent-{i:03d}" for i in range(STORM_AGENTS)]
    keys = {name: generate_private_key() for name in names}
    results = {}
    for label, jitter in (("jitter", True), ("no jitter", False)):
        backoff = Backoff(base=STORM_BASE, cap=STORM_CAP, jitter=jitter)
        results[label] = result = await _storm(keys, backoff)
        print(
            f"\n[scenario 6] {STORM_AGENTS} agents closed with 1012, port dark "
            f"{STORM_DOWN:g} s, backoff base {STORM_BASE:g} s cap {STORM_CAP:g} s, {label}: "
            f"{len(result.attempts)} attempts, peak 1 s window {result.peak_count_1s} "
            f"({result.peak_share_1s:.0%}), peak 100 ms window {result.peak_count_100ms}, "
            f"all back in {result.recovered_in:.2f} s"
        )
        assert len(result.attempts) >= STORM_AGENTS  # everyone came back, some after retries
        # Every attempt while the port was dark failed and was retried; every later one
        # succeeded at once: the last success is the recovery.
        failed = [t for t in result.attempts if t < STORM_DOWN]
        assert len(result.attempts) == STORM_AGENTS + len(failed)
        assert result.recovered_in == pytest.approx(max(result.attempts), abs=1e-9)
    # Without jitter all 200 retry in the same instant, STORM_BASE after the close (after
    # the port is back, so no attempt fails): one wave. With full jitter the first attempts
    # spread over [0, STORM_BASE), and those that hit the dark port spread their retries.
    assert results["no jitter"].attempts == pytest.approx([STORM_BASE] * STORM_AGENTS, abs=1e-9)
    assert results["no jitter"].peak_share_1s == 1.0
    assert results["no jitter"].peak_count_100ms == STORM_AGENTS
    assert results["no jitter"].peak_share_1s > 0.9
    jittered = results["jitter"].attempts
    # First attempts in [0, STORM_BASE); a retry after a failure (before STORM_DOWN) waits
    # less than STORM_CAP.
    assert all(0 <= t < STORM_DOWN + STORM_CAP for t in jittered)
    assert results["jitter"].peak_share_1s < results["no jitter"].peak_share_1s
    assert results["jitter"].peak_count_100ms < results["no jitter"].peak_count_100ms
