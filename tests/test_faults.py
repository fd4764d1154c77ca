"""Prove it under faults. Each scenario prints what it measured (run with ``-s``); the
figures are collected in ``docs/reliability.md``.

Where the network's behaviour is what is tested (a blackholed hub, a flapping network, a
consumer that stops reading, a reconnect storm), the hub runs in memory behind
``tests/memfaults.py`` (the fault proxy's switches over in-memory streams) under
``autojump_clock``: every time measured is the library's own timeout or backoff, so the
expectations are exact. Real processes and sockets stay where they are the point: a
SIGSTOPped agent process, SIGTERM of a hub process and a new one on the same port, the
TCP fault proxy's own switches, the agent's own TCP dialer against a hub that hangs up
mid-handshake, and socket buffers during a graceful shutdown.

Scenario 1 (hub SIGKILL + restart, presence history) lives in ``tests/test_e2e.py``.
The last three tests are deterministic reproductions of library bugs these scenarios
found (see "Defects found" in ``docs/reliability.md``).
"""

from __future__ import annotations

import collections
import functools
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_websocket
from trio_websocket import WebSocketConnection

from artcafe_trio import (
    Agent,
    Backoff,
    CloseCode,
    Hub,
    HubConfig,
    PresenceEvent,
    PrivateKey,
    ReconnectFailed,
    Registry,
    generate_private_key,
    open_agent,
    open_hub,
)
from artcafe_trio.protocol import Challenge, Message, Publish, Published
from artcafe_trio.testing import TestHub, open_test_hub

from .conftest import RawClient
from .faults import open_fault_proxy
from .hubproc import HubProcess
from .memfaults import MemoryFaultProxy

pytestmark = pytest.mark.timeout(60)

TENANT = "acme"
FAST_BACKOFF = Backoff(base=0.1, cap=0.5)
HEARTBEAT = {"heartbeat_interval": 0.5, "heartbeat_timeout_multiplier": 3.0}
TIMEOUT = 0.5 * 3.0


# --- helpers -----------------------------------------------------------------------------


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


# --- scenario 3: a frozen agent (SIGSTOP) ------------------------------------------------

FROZEN_AGENT = """
import sys, trio
from artcafe_trio import Backoff, open_agent

async def main():
    url, tenant, agent_id, key_path = sys.argv[1:5]
    async with open_agent(
        url=url, organization_id=tenant, agent_id=agent_id, private_key_path=key_path,
        heartbeat_interval=0.5, heartbeat_timeout_multiplier=3.0,
        backoff=Backoff(base=0.1, cap=0.5),
    ) as agent:
        print("connected", agent.session_id, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_frozen_agent_is_reported_offline_once_with_reason_timeout(tmp_path: Path) -> None:
    async with (
        in_process_hub("frozen", "monitor", disconnect_grace=5.0) as (hub, keys),
        monitor(hub, keys["monitor"]) as seen,
    ):
        key_path = tmp_path / "frozen.pem"
        key_path.write_bytes(keys["frozen"].to_pem())
        key_path.chmod(0o600)
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", FROZEN_AGENT, str(hub.url), TENANT, "frozen", str(key_path)],
            stdout=subprocess.PIPE,
        )
        assert process.stdout is not None
        try:
            output = b""
            with trio.fail_after(15):
                while b"connected" not in output:
                    chunk = await process.stdout.receive_some()
                    assert chunk, "the agent subprocess exited early"
                    output += chunk
            await wait_until(lambda: seen.transitions("frozen") == [("online", "connected")], 5)
            await trio.sleep(1.2)  # heartbeats flowing

            process.send_signal(signal.SIGSTOP)
            stopped_at = time.time()
            await wait_until(lambda: len(seen.of("frozen")) >= 2, TIMEOUT + 3)
            offline = seen.of("frozen")[1]
            (record,) = [r for r in hub.presence_table(TENANT) if r.agent_id == "frozen"]
            assert record.last_seen is not None and record.heartbeat_timeout == TIMEOUT
            deadline = record.last_seen + record.heartbeat_timeout
            lateness = offline.time - deadline
            print(
                f"\n[scenario 3] frozen agent: last frame {stopped_at - record.last_seen:.3f} s "
                f"before SIGSTOP; offline ({offline.reason}) {lateness * 1000:.1f} ms after "
                f"its deadline (last frame + {TIMEOUT:g} s)"
            )
            assert (offline.status, offline.reason) == ("offline", "timeout")
            # It was heartbeating until frozen: its last frame is within one interval.
            assert -0.05 <= stopped_at - record.last_seen <= 0.5 + 0.1
            assert 0 <= lateness <= 1.0
            await trio.sleep(1.5)  # nothing more while it stays frozen
            assert seen.transitions("frozen") == [("online", "connected"), ("offline", "timeout")]

            process.send_signal(signal.SIGCONT)  # it wakes up, finds its session gone, returns
            await wait_until(lambda: len(seen.of("frozen")) >= 3, 10)
            assert seen.transitions("frozen") == [
                ("online", "connected"), ("offline", "timeout"), ("online", "connected"),
            ]  # fmt: skip
        finally:
            process.send_signal(signal.SIGCONT)
            process.kill()
            with trio.move_on_after(5):
                await process.wait()
            await process.stdout.aclose()


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


# --- scenario 7: graceful hub shutdown (SIGTERM) and a new hub on the same port ---------


@pytest.mark.slow
async def test_graceful_hub_switch_loses_no_confirmed_publish(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    names = ["publisher", "subscriber", "bystander"]
    with Registry.open(db) as registry:
        keys = register(registry, *names)
    hub = HubProcess(db)
    # Counted per sequence number: what the publisher itself got back on its own
    # subscription, and what the separate subscriber got.
    own: collections.Counter[int] = collections.Counter()
    theirs: collections.Counter[int] = collections.Counter()
    started: dict[int, float] = {}
    confirmed: dict[int, float] = {}
    resubscribed: list[float] = []
    try:
        await hub.start()
        # The retry budget must cover a hub process restart (about a second): 40 attempts of
        # base 0.1 s / cap 0.5 s backoff is ~10 s on average.
        common = {"url": hub.url, "organization_id": TENANT, "backoff": FAST_BACKOFF,
                  "max_reconnect_attempts": 40, **HEARTBEAT}  # fmt: skip
        async with (
            open_agent(agent_id="publisher", private_key=keys["publisher"], **common) as pub,
            open_agent(agent_id="subscriber", private_key=keys["subscriber"], **common) as sub,
            open_agent(agent_id="bystander", private_key=keys["bystander"], **common) as by,
        ):
            agents = [pub, sub, by]
            # Why the publisher subscribes to its own subject: pub/sub keeps no backlog, and
            # after a reconnect an agent restores its subscriptions *before* it re-sends the
            # publishes that wait, so its own subscription is in place on the new hub before
            # any of its publishes reach it. Every confirmed publish must come back to it:
            # that is the strict no-loss check. The separate subscriber may miss publishes
            # the new hub routed before the subscriber was back (by design); for it we
            # check every publish confirmed before the SIGTERM and every publish started
            # after it restored its subscription, and count what it missed in between.
            await pub.subscribe("orders.>", lambda s, d: own.update([d["seq"]]))
            await sub.subscribe("orders.>", lambda s, d: theirs.update([d["seq"]]))
            sub.on_reconnect(lambda: resubscribed.append(trio.current_time()))
            sessions = [a.session_id for a in agents]

            async def publish_one(seq: int) -> None:
                started[seq] = trio.current_time()
                await pub.publish("orders.new", {"seq": seq}, confirm=True)
                confirmed[seq] = trio.current_time()

            publishing_done = trio.Event()

            async def publish_loop(nursery: trio.Nursery) -> None:
                seq = 0
                while not publishing_done.is_set():
                    nursery.start_soon(publish_one, seq)
                    seq += 1
                    await trio.sleep(0.02)

            with trio.fail_after(40):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(publish_loop, nursery)
                    await trio.sleep(1.0)
                    term_sent = trio.current_time()
                    assert await hub.terminate() == 0  # graceful: agents got 1012
                    exited_in = trio.current_time() - term_sent
                    await hub.start()  # a new hub process on the same port and database
                    listening_in = trio.current_time() - term_sent
                    await wait_until(
                        lambda: all(
                            a.health().connected and a.session_id not in sessions for a in agents
                        ),
                        15,
                    )
                    switched = trio.current_time() - term_sent
                    await trio.sleep(1.0)  # more publishes on the new hub
                    publishing_done.set()
            total = len(started)
            with trio.move_on_after(5):
                while set(own) != set(range(total)):
                    await trio.sleep(0.01)
            await trio.sleep(0.5)  # let any duplicate (or latecomer) arrive
            lost = sorted(set(range(total)) - set(own))
            assert not lost, (
                "confirmed publishes never delivered (seq: started, confirmed, "
                "relative to SIGTERM): "
                + ", ".join(
                    f"{s}: {started[s] - term_sent:+.3f}, {confirmed[s] - term_sent:+.3f}"
                    for s in lost
                )
            )

            assert len(confirmed) == total  # every publish was confirmed
            during = [s for s in started if term_sent <= started[s] and (
                not resubscribed or started[s] < resubscribed[0])]  # fmt: skip
            must_reach_subscriber = [
                seq for seq in range(total)
                if confirmed[seq] < term_sent or (resubscribed and started[seq] > resubscribed[0])
            ]  # fmt: skip
            missed = sorted(set(range(total)) - set(theirs))
            duplicates_own = sum(n - 1 for n in own.values())
            duplicates_theirs = sum(n - 1 for n in theirs.values())
            print(
                f"\n[scenario 7] SIGTERM: old hub exited after {exited_in:.2f} s, new hub "
                f"listening after {listening_in:.2f} s, all agents moved over after "
                f"{switched:.2f} s; {total} confirmed publishes ({len(during)} started during "
                f"the switch), lost 0 (publisher's own subscription), duplicates "
                f"{duplicates_own}; the other subscriber missed {len(missed)} published "
                f"before it was back, duplicates {duplicates_theirs}"
            )
            assert during, "some publishes must have been made during the switch"
            assert not set(must_reach_subscriber) & set(missed)
            assert len(resubscribed) == 1
            for agent in agents:
                assert agent.state == "connected"
                assert agent.health().total_reconnects >= 1
        assert await hub.terminate() == 0
    finally:
        await hub.aclose()


# --- faults that expose library bugs ----------------------------------------------------
#
# Each of these failed when written; docs/reliability.md ("Bugs found") has the details.


async def _hub_until(
    stop: trio.Event, done: trio.Event, *, task_status: trio.TaskStatus[Hub], **kwargs: Any
) -> None:
    """Run ``open_hub(**kwargs)`` until ``stop`` is set (a graceful shutdown); set ``done``."""
    try:
        async with open_hub(**kwargs) as hub:
            task_status.started(hub)
            await stop.wait()
    finally:
        done.set()


async def test_an_attempt_cut_during_the_websocket_handshake_fails_at_once() -> None:
    """A hub that dies mid-handshake (accepts the TCP connection, reads the HTTP upgrade
    request, closes) must cost the agent one failed attempt, not its connect_timeout."""

    async def dies_mid_handshake(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, dies_mid_handshake, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        start = trio.current_time()
        # 3 attempts (max_reconnect_attempts=2) with backoff delays below 0.1 + 0.2 s: well
        # under a second if each attempt fails when its connection is closed; 3 x 10 s
        # (the default connect_timeout) if it waits for a welcome that cannot come.
        with trio.move_on_after(5) as hung, pytest.raises(ReconnectFailed):
            async with open_agent(
                url=f"ws://127.0.0.1:{port}", organization_id=TENANT, agent_id="a",
                private_key=generate_private_key(), backoff=FAST_BACKOFF,
                max_reconnect_attempts=2,
            ):  # fmt: skip
                pass
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    print(
        f"\n[handshake cut] 3 attempts against a hub that closes mid-handshake: "
        f"{'still waiting' if hung.cancelled_caught else 'ReconnectFailed'} after {elapsed:.2f} s"
    )
    assert not hung.cancelled_caught, (
        "each attempt whose connection was closed during the WebSocket handshake waited for "
        "the connect_timeout instead of failing at once"
    )


async def test_graceful_hub_shutdown_does_not_wait_out_the_close_timeout() -> None:
    """Agents answer the hub's 1012 close at once, so a graceful shutdown with every
    agent responsive should take a fraction of close_timeout, not all of it."""
    names = [f"agent-{i}" for i in range(10)]
    config = HubConfig(close_timeout=5.0)
    with Registry.open(":memory:") as registry:
        keys = register(registry, *names)
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            stop, done = trio.Event(), trio.Event()
            hub: Hub = await nursery.start(
                functools.partial(_hub_until, stop, done, registry=registry, port=0, config=config)
            )
            agents = [
                await stack.enter_async_context(
                    open_agent(
                        url=hub.url, organization_id=TENANT, agent_id=name,
                        private_key=keys[name], backoff=Backoff(base=30.0, cap=30.0),
                        **HEARTBEAT,
                    )
                )
                for name in names
            ]  # fmt: skip
            start = trio.current_time()
            stop.set()
            with trio.fail_after(config.close_timeout + 5):
                await done.wait()
            took = trio.current_time() - start
            assert not any(a.health().connected for a in agents)
    print(
        f"\n[graceful shutdown] {len(names)} responsive agents, close_timeout "
        f"{config.close_timeout:g} s: the hub took {took:.2f} s to stop"
    )
    assert took < 1.0


async def test_graceful_hub_shutdown_delivers_what_it_already_confirmed() -> None:
    """A publish the hub confirmed before it began shutting down reaches a subscriber that
    is connected and reading (behind a backlog, not a slow consumer: its queue is far from
    full). The protocol promises delivery to every matching connection, and the publisher,
    holding a ``published`` answer, will never re-send it."""
    # close_timeout bounds how long the hub may take to finish what it is writing: ample
    # for the reader to take 12 MB over loopback.
    config = HubConfig(close_timeout=3.0, publish_rate=1e9, publish_burst=10**9)
    bulk = 60
    blob = "x" * 200_000  # 60 x 200 kB: more than the socket buffers hold
    with Registry.open(":memory:") as registry:
        keys = register(registry, "pub", "reader")
        async with trio.open_nursery() as nursery:
            stop, done = trio.Event(), trio.Event()
            hub: Hub = await nursery.start(
                functools.partial(_hub_until, stop, done, registry=registry, port=0, config=config)
            )
            reader = await raw_client(hub, nursery, "reader", keys["reader"], "orders.>")
            pub = await raw_client(hub, nursery, "pub", keys["pub"])
            for i in range(bulk):
                await pub.send(Publish(subject="orders.bulk", data=blob, id=f"bulk-{i}"))
            await pub.send(Publish(subject="orders.last", data="last", id="last"))
            confirmed: set[str] = set()
            with trio.fail_after(10):
                while "last" not in confirmed:
                    confirmed.add((await pub.recv_type(Published)).id)
            assert hub.stats.slow_consumers == 0

            stop.set()  # graceful shutdown, after "last" was confirmed
            subjects: list[str] = []
            code = None
            with trio.fail_after(config.close_timeout + 5):
                try:
                    while True:
                        frame = await reader.recv()
                        if isinstance(frame, Message):
                            subjects.append(frame.subject)
                except trio_websocket.ConnectionClosed as exc:
                    code = exc.reason.code if exc.reason else None
                await done.wait()
            for client in (reader, pub):
                with trio.move_on_after(2):
                    await client.ws.aclose()
            nursery.cancel_scope.cancel()
    print(
        f"\n[graceful shutdown] {bulk + 1} publishes confirmed before the shutdown; the "
        f"connected reader got {len(subjects)} of them, then close code {code}"
    )
    assert subjects == ["orders.bulk"] * bulk + ["orders.last"]
    assert code == CloseCode.SERVICE_RESTART
