"""Prove it under faults, with real processes and sockets where they are the point: a
SIGSTOPped agent process (scenario 3), SIGTERM of a hub process and a new one on the same
port (scenario 7), and deterministic reproductions of the library bugs the scenarios found
(the agent's own TCP dialer against a hub that hangs up mid-handshake, socket buffers
during a graceful shutdown; see "Defects found" in ``docs/reliability.md``).
"""

from __future__ import annotations

import collections
import functools
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from artcafe_trio import (
    Backoff,
    CloseCode,
    Hub,
    HubConfig,
    ReconnectFailed,
    Registry,
    generate_private_key,
    open_agent,
    open_hub,
)
from artcafe_trio.protocol import Message, Publish, Published

from .faultkit import (
    FAST_BACKOFF,
    HEARTBEAT,
    TENANT,
    TIMEOUT,
    in_process_hub,
    monitor,
    raw_client,
    register,
    wait_until,
)
from .hubproc import HubProcess

pytestmark = pytest.mark.timeout(60)


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

            def heartbeat_seen() -> bool:  # heartbeats flowing: the hub has one from it
                return any(
                    r.agent_id == "frozen" and r.last_heartbeat is not None
                    for r in hub.presence_table(TENANT)
                )

            await wait_until(heartbeat_seen, 5)

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
