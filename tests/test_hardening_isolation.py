"""Hardening: no connection can cost another its presence, its messages or the hub's memory.

Regression tests for issue 9, items 1-3, 7, 12 and 15: fan-out amplification, byte-bounded
queues and the hub-wide output budget, back-pressure for a connection's own answers, the
per-agent rate limit, unauthenticated-connection limits, forged replies, and agent paths.

A consumer that does not read is simulated with ``trio.testing.lockstep_stream_pair``:
the hub's writes to it block until the client reads, as on a real socket whose buffers
are full (plain memory streams buffer without bound, so nothing would ever queue).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

import artcafe_trio.hub._router as router_module
from artcafe_trio import CloseCode, HubConfig, open_hub
from artcafe_trio.hub._hubevents import SlowConsumerCut
from artcafe_trio.protocol import (
    Error,
    Heartbeat,
    HeartbeatAck,
    Leave,
    Message,
    PresenceQuery,
    PresenceState,
    Publish,
    Published,
    decode,
)
from artcafe_trio.testing import TestHub, open_test_hub

from .conftest import RawClient, raw_connect

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("hub_streams")]

BIG = 10 * 1024 * 1024  # max_frame_bytes for tests that publish large payloads


class _LockstepDialer:
    """Dials the hub over a lockstep stream: the hub's writes wait for the client's reads."""

    def __init__(self, hub: TestHub) -> None:
        self.hub = hub.hub

    async def dial(
        self, nursery: trio.Nursery, resource: str
    ) -> trio_websocket.WebSocketConnection:
        client, server = trio.testing.lockstep_stream_pair()
        self.hub.serve_stream(server, "memory")
        return await trio_websocket.wrap_client_stream(
            nursery, client, "127.0.0.1", resource, max_message_size=4 * BIG
        )


async def connect(
    hub: TestHub,
    nursery: trio.Nursery,
    agent: str,
    tenant: str = "t1",
    *,
    lockstep: bool = False,
    **auth: Any,
) -> RawClient:
    key = hub.register(tenant, agent)
    dialer: Any = _LockstepDialer(hub) if lockstep else hub
    client = await raw_connect(dialer, nursery, agent, tenant, key, **auth)
    assert client.welcome is not None, getattr(client, "refusal", None)
    return client


async def barrier(client: RawClient) -> list[Any]:
    """Everything the hub sends ``client`` before answering a presence query."""
    await client.send(PresenceQuery(id="barrier"))
    frames = []
    while True:
        frame = decode(await client.ws.get_message(), max_bytes=4 * BIG)
        if isinstance(frame, PresenceState) and frame.id == "barrier":
            return frames
        frames.append(frame)


def session_of_agent(hub: TestHub, agent: str) -> Any:
    [session] = [s for s in hub.hub._directory.agent_sessions() if s.agent_id == agent]
    return session


def ten_token_patterns(count: int) -> list[str]:
    """``count`` distinct patterns (literal/``*`` mixes) that all match ``a.b.c.d.e.f.g.h.i.j``."""
    tokens = "abcdefghij"
    mixes = itertools.product(*[(t, "*") for t in tokens])
    return [".".join(mix) for mix in itertools.islice(mixes, count)]


# --- item 1: fan-out amplification ------------------------------------------------------


async def test_one_delivery_per_connection_however_many_patterns_match() -> None:
    async with open_test_hub(max_frame_bytes=BIG, close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            attacker = await connect(hub, nursery, "attacker")
            patterns = ten_token_patterns(1000)
            for pattern in patterns:
                await attacker.subscribe(pattern)
            payload = "x" * (1024 * 1024)
            await attacker.send(Publish(subject="a.b.c.d.e.f.g.h.i.j", data=payload, id="p"))
            frames = await barrier(attacker)
            messages = [f for f in frames if isinstance(f, Message)]
            assert len(messages) == 1  # not one per matching pattern
            assert messages[0].subscription is None
            assert messages[0].data == payload
            assert hub.hub.stats.deliveries == 1
            # The hub held one encoded copy, not 1,000.
            assert hub.hub.output_budget.peak < 2 * len(payload)
            nursery.cancel_scope.cancel()


async def test_one_publish_is_encoded_once_for_every_receiver() -> None:
    async with open_test_hub(close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            receivers = [await connect(hub, nursery, f"r{i}") for i in range(5)]
            for n, receiver in enumerate(receivers):
                await receiver.subscribe(["jobs.>", "jobs.*", "*.new", ">", "jobs.new"][n])
            pub = await connect(hub, nursery, "pub")
            await pub.send(Publish(subject="jobs.new", data={"n": 1}, id="p"))
            await pub.recv_type(Published)
            got = [await r.recv_type(Message) for r in receivers]
            assert {m.message_id for m in got} == {got[0].message_id}
            assert {m.time for m in got} == {got[0].time}  # the same frame for all
            nursery.cancel_scope.cancel()


async def test_a_long_fan_out_lets_other_tasks_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_module, "FANOUT_BATCH", 2)
    async with open_test_hub(close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            receivers = [await connect(hub, nursery, f"r{i}") for i in range(6)]
            for receiver in receivers:
                await receiver.subscribe("fan")
            pub = await connect(hub, nursery, "pub")
            seen: list[int] = []

            async def watch() -> None:
                while True:
                    seen.append(hub.hub.stats.deliveries)
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(watch)
            await pub.send(Publish(subject="fan", data=1, id="p"))
            for receiver in receivers:
                await receiver.recv_type(Message)
            assert hub.hub.stats.deliveries == 6
            # Another task ran in the middle of the fan-out, between two batches.
            assert any(0 < deliveries < 6 for deliveries in seen), seen
            nursery.cancel_scope.cancel()


async def test_send_queue_is_bounded_in_bytes() -> None:
    # The stuck consumer reads only when the test asks for its close code: the frame the
    # hub was writing when it cut it off must be allowed to finish meanwhile (a frame cut
    # in the middle ends the connection without a close frame: 1006, not 4004).
    async with open_test_hub(
        max_frame_bytes=BIG, send_queue_bytes=1024 * 1024, close_timeout=5.0
    ) as hub:
        async with trio.open_nursery() as nursery:
            stuck = await connect(hub, nursery, "stuck", lockstep=True)
            await stuck.subscribe("blobs")
            pub = await connect(hub, nursery, "pub")
            for i in range(30):  # 3 MB of deliveries, far fewer than send_queue_size frames
                await pub.send(Publish(subject="blobs", data="y" * 100_000, id=f"b{i}"))
                assert isinstance(await pub.recv_type(Published), Published)
            assert hub.hub.stats.slow_consumers == 1
            with trio.fail_after(5):
                assert await stuck.close_code() == CloseCode.SLOW_CONSUMER
            assert hub.hub.output_budget.used == 0  # what it held was released
            await pub.ws.aclose()  # answered: the hub need not wait out its close_timeout
            nursery.cancel_scope.cancel()


async def test_output_budget_cuts_off_the_largest_consumer_first() -> None:
    budget = 3 * 1024 * 1024
    async with open_test_hub(
        max_frame_bytes=BIG,
        send_queue_bytes=2 * 1024 * 1024,
        output_budget_bytes=budget,
        close_timeout=5.0,  # as above: the cut-off consumer reads only when asked
    ) as hub:
        async with trio.open_nursery() as nursery:
            consumers = {}
            for name in ("big", "mid", "small"):
                consumers[name] = await connect(hub, nursery, name, lockstep=True)
                await consumers[name].subscribe(f"to.{name}")
            big = session_of_agent(hub, "big")
            pub = await connect(hub, nursery, "pub")
            peak_seen = 0

            ids = itertools.count()

            async def publish(name: str, count: int) -> None:
                nonlocal peak_seen
                for _ in range(count):
                    frame_id = f"m{next(ids)}"
                    await pub.send(Publish(subject=f"to.{name}", data="z" * 100_000, id=frame_id))
                    await pub.recv_type(Published)
                    peak_seen = max(peak_seen, hub.hub.output_budget.used)

            await publish("big", 16)  # ~1.6 MB queued
            await publish("mid", 10)  # ~1.0 MB
            sent_small = 0
            while not hub.hub.output_budget.cut_offs:  # until over the 3 MiB budget
                await publish("small", 1)
                sent_small += 1
                assert sent_small < 20
            assert hub.hub.output_budget.cut_offs == 1
            assert peak_seen <= budget
            assert hub.hub.output_budget.peak <= budget
            [reason] = [e.reason for e in hub.hub.events.recent if isinstance(e, SlowConsumerCut)]
            assert reason.startswith(
                f"slow consumer: hub output budget of {budget} bytes exceeded and this"
                " connection held the most output ("
            ), reason
            assert big.close_reason == reason
            with trio.fail_after(5):
                assert await consumers["big"].close_code() == CloseCode.SLOW_CONSUMER
            # The others keep their connection and every delivery queued for them.
            for name, count in (("mid", 10), ("small", sent_small)):
                got = [await consumers[name].recv_type(Message) for _ in range(count)]
                assert [m.subject for m in got] == [f"to.{name}"] * count
            for client in (consumers["mid"], consumers["small"], pub):
                await client.ws.aclose()  # answered: the hub need not wait out close_timeout
            nursery.cancel_scope.cancel()


async def test_budget_attack_leaves_another_tenant_online(autojump_clock: Any) -> None:
    """The attack of item 1 under a virtual clock: a bystander in another tenant keeps
    its presence and its ACKs while one agent floods large messages at stuck consumers."""
    budget = 4 * 1024 * 1024
    async with open_test_hub(
        max_frame_bytes=BIG, output_budget_bytes=budget, publish_rate=1e6, publish_burst=10**6
    ) as hub:
        async with (
            trio.open_nursery() as nursery,
            hub.open_agent("bystander", tenant_id="other", heartbeat_interval=1.0) as bystander,
        ):
            stuck = [await connect(hub, nursery, f"s{i}", lockstep=True) for i in range(4)]
            for client in stuck:
                for pattern in ten_token_patterns(200):
                    await client.subscribe(pattern)
            pub = await connect(hub, nursery, "pub")
            peak = 0
            acks: dict[Any, float] = {}  # the bystander's ACKs seen: last_ack -> rtt

            async def watch_bystander() -> None:
                while True:
                    health = bystander.health()
                    if health.rtt is not None:
                        acks[health.last_ack] = health.rtt
                    await trio.sleep(0.05)

            nursery.start_soon(watch_bystander)
            with trio.move_on_after(20):
                for i in itertools.count():
                    await pub.send(
                        Publish(subject="a.b.c.d.e.f.g.h.i.j", data="w" * 500_000, id=f"m{i}")
                    )
                    await pub.recv_type(Published)
                    peak = max(peak, hub.hub.output_budget.used)
                    await trio.sleep(0.3)
            assert peak <= budget
            assert hub.hub.output_budget.peak <= budget  # the hub's own accounting
            assert hub.hub.stats.slow_consumers >= 1
            cut_off = [e.reason for e in hub.hub.events.recent if isinstance(e, SlowConsumerCut)]
            assert cut_off and all(
                "slow consumer: hub output budget of 4194304 bytes exceeded" in r
                or "bytes of deliveries waiting" in r
                for r in cut_off
            ), cut_off
            # Its ACK round trip stays in the normal range: an ACK a second, each quick.
            assert len(acks) >= 15, acks
            assert max(acks.values()) < 0.05, acks
            [row] = [r for r in hub.hub.presence_table("other") if r.agent_id == "bystander"]
            assert (row.status, row.reason) == ("online", "connected")
            assert hub.hub.stats.transitions.get("timeout", 0) == 0
            assert bystander.health().connected
            assert bystander.health().total_reconnects == 0
            nursery.cancel_scope.cancel()


# --- item 2: the rate limit is per agent ---------------------------------------------------


async def test_rate_limit_is_kept_across_reconnects(autojump_clock: Any) -> None:
    async with open_test_hub(publish_rate=10, publish_burst=20, close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            key = hub.register("t1", "pub")
            first = await raw_connect(hub, nursery, "pub", "t1", key)
            for i in range(20):
                await first.send(Publish(subject="x", data=i, id=f"a{i}"))
                assert isinstance(await first.recv_type(Published), Published)
            # A new session (take-over) starts with the same, empty bucket.
            second = await raw_connect(hub, nursery, "pub", "t1", key)
            assert second.welcome is not None
            await second.send(Publish(subject="x", data="more", id="b0"))
            answer = await second.recv()
            assert isinstance(answer, Error), answer
            assert (answer.code, answer.id) == ("rate_limited", "b0")
            await trio.sleep(0.1)  # one token back at 10/s
            await second.send(Publish(subject="x", data="later", id="b1"))
            assert isinstance(await second.recv_type(Published), Published)
            nursery.cancel_scope.cancel()


# --- item 3: a fast client that reads is never cut off -----------------------------------


async def test_pipelined_publishes_are_back_pressured_not_cut_off() -> None:
    async with open_test_hub(send_queue_size=64, reply_window=32, close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            client = await connect(hub, nursery, "fast", lockstep=True)
            [session] = [s for s in hub.hub._directory.agent_sessions() if s.agent_id == "fast"]
            most_replies = 0
            answers = 0

            async def read() -> None:
                nonlocal answers, most_replies
                while answers < 1900:
                    frame = await client.recv()
                    assert isinstance(frame, Published), frame
                    answers += 1
                    most_replies = max(most_replies, session.outbox.replies)

            async with trio.open_nursery() as inner:
                inner.start_soon(read)
                for i in range(1900):  # inside the burst of 2,000
                    await client.send(Publish(subject="nowhere", data=i, id=f"p{i}"))
            assert answers == 1900
            assert most_replies <= 32
            assert hub.hub.stats.slow_consumers == 0
            nursery.cancel_scope.cancel()


async def test_heartbeat_flood_is_back_pressured_not_cut_off() -> None:
    async with open_test_hub(send_queue_size=64, reply_window=32, close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            client = await connect(hub, nursery, "beater", lockstep=True)
            acks: list[int] = []

            async def read() -> None:
                while len(acks) < 3000:
                    frame = await client.recv()
                    assert isinstance(frame, HeartbeatAck), frame
                    acks.append(frame.seq)

            async with trio.open_nursery() as inner:
                inner.start_soon(read)
                for seq in range(3000):
                    await client.send(Heartbeat(seq=seq))
            assert acks == list(range(3000))
            assert hub.hub.stats.slow_consumers == 0
            nursery.cancel_scope.cancel()


async def test_a_close_lets_the_reader_finish_the_answers_it_is_writing() -> None:
    """The reader writes its connection's answers itself when the writer is idle. A
    close decided meanwhile (here by the hub, from another task) must not cancel that
    write half-way: the peer still gets whole frames, then the close with its code."""
    async with open_test_hub(close_timeout=5.0) as hub:
        async with trio.open_nursery() as nursery:
            client = await connect(hub, nursery, "slow", lockstep=True)
            [session] = [s for s in hub.hub._directory.agent_sessions() if s.agent_id == "slow"]
            for seq in range(20):  # ACKs the client does not read yet: the write blocks
                await client.send(Heartbeat(seq=seq))
                if session.reader_writing:
                    break
            with trio.fail_after(5):
                while not session.reader_writing:
                    await trio.sleep(0.01)
            session.close(CloseCode.SERVICE_RESTART, "restarting")
            frames = []
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                with trio.fail_after(5):
                    while True:
                        frames.append(decode(await client.ws.get_message()))
            assert closed.value.reason.code == CloseCode.SERVICE_RESTART
            assert frames
            assert all(isinstance(frame, HeartbeatAck) for frame in frames)
            nursery.cancel_scope.cancel()


# --- item 7: unauthenticated connections ------------------------------------------------------


async def test_unauthenticated_connections_are_limited_per_address(
    autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_test_hub(
        max_unauthenticated_per_address=4, max_unauthenticated=100, close_timeout=0.05
    ) as hub:
        limiter = hub.hub.unauthenticated
        idle = [await hub.connect_in_memory(remote="10.0.0.9") for _ in range(10)]
        await trio.sleep(0.1)
        assert limiter.count("10.0.0.9") == 4
        assert limiter.evicted == 6
        assert "unauthenticated connections at the limit (4 per address)" in caplog.text
        # Six were closed (the oldest admitted; trio starts their tasks in any order).
        closed = 0
        for stream in idle:
            with trio.move_on_after(1):
                closed += await stream.receive_some() == b""
        assert closed == 6
        # An agent from that very address still gets in while the limit is reached.
        async with hub.open_agent("legit", tenant_id="t1") as agent:
            assert agent.health().connected
            assert limiter.count("10.0.0.9") == 4
        for stream in idle:
            await stream.aclose()


async def test_unauthenticated_connections_are_limited_in_total(autojump_clock: Any) -> None:
    async with open_test_hub(
        max_unauthenticated_per_address=4, max_unauthenticated=6, close_timeout=0.05
    ) as hub:
        limiter = hub.hub.unauthenticated
        idle = []
        for address in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
            idle += [await hub.connect_in_memory(remote=address) for _ in range(3)]
        await trio.sleep(0.1)
        assert len(limiter) == 6
        async with hub.open_agent("legit", tenant_id="t1") as agent:
            assert agent.health().connected
            assert len(limiter) <= 6
        for stream in idle:
            await stream.aclose()


async def test_http_upgrade_has_a_deadline(autojump_clock: Any) -> None:
    async with open_test_hub(handshake_timeout=3.0, close_timeout=0.05) as hub:
        slowloris = await hub.connect_in_memory()
        await slowloris.send_all(b"GET /api/v1/ws/agent/x?tenant_id=t HTTP/1.1\r\nHost: h\r\n")
        silent = await hub.connect_in_memory()
        start = trio.current_time()
        with trio.fail_after(10):
            assert await slowloris.receive_some() == b""
            assert await silent.receive_some() == b""
        assert trio.current_time() - start == pytest.approx(3.0)
        assert hub.hub.stats.handshake_timeouts == 2
        assert len(hub.hub.unauthenticated) == 0


async def test_tcp_connections_are_limited_per_peer_address() -> None:
    config = HubConfig(max_unauthenticated_per_address=3, close_timeout=0.05)
    async with open_hub(port=0, config=config) as hub:
        assert hub.port is not None
        sockets = []
        for _ in range(5):
            sockets.append(await trio.open_tcp_stream("127.0.0.1", hub.port))
        with trio.fail_after(5):
            for stream in sockets[:2]:  # the two oldest were closed for the newer ones
                assert await stream.receive_some() == b""
            while hub.unauthenticated.count("127.0.0.1") != 3:
                await trio.sleep(0.01)
        for stream in sockets:
            await stream.aclose()


# --- item 12: replies cannot be forged ------------------------------------------------------


async def test_only_a_receiver_of_the_request_may_answer_it_once() -> None:
    async with open_test_hub(close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            requester = await connect(hub, nursery, "req")
            worker = await connect(hub, nursery, "worker")
            forger = await connect(hub, nursery, "forger")
            await worker.subscribe("math.double")
            assert requester.welcome is not None
            reply_to = f"$reply.{requester.welcome.session_id}.tok1"
            await requester.send(Publish(subject="math.double", data=21, reply_to=reply_to))
            await worker.recv_type(Message)
            # An agent the request was not delivered to cannot answer it.
            await forger.send(Publish(subject=reply_to, data="FORGED", id="f"))
            refusal = await forger.recv_type(Error)
            assert (refusal.code, refusal.id) == ("reply_not_expected", "f")
            await worker.send(Publish(subject=reply_to, data=42, id="w1"))
            await worker.recv_type(Published)
            # Only once: a second answer is refused.
            await worker.send(Publish(subject=reply_to, data=43, id="w2"))
            again = await worker.recv_type(Error)
            assert (again.code, again.id) == ("reply_not_expected", "w2")
            frames = await barrier(requester)
            assert [(m.data, m.sender) for m in frames if isinstance(m, Message)] == [
                (42, "worker")
            ]
            nursery.cancel_scope.cancel()


async def test_open_requests_are_bounded_and_forgotten_with_the_requester() -> None:
    async with open_test_hub(max_open_requests=3, close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            requester = await connect(hub, nursery, "req")
            worker = await connect(hub, nursery, "worker")
            await worker.subscribe("jobs")
            assert requester.welcome is not None
            inbox = f"$reply.{requester.welcome.session_id}"
            for n in range(5):
                await requester.send(Publish(subject="jobs", data=n, reply_to=f"{inbox}.{n}"))
            await barrier(requester)
            assert sorted(hub.hub._router.replies.grants) == [
                f"{inbox}.2",
                f"{inbox}.3",
                f"{inbox}.4",
            ]
            # The oldest were dropped: answering them is refused.
            await worker.send(Publish(subject=f"{inbox}.0", data="late", id="late"))
            assert (await worker.recv_type(Error)).code == "reply_not_expected"
            await requester.ws.aclose()
            with trio.fail_after(5):
                while hub.hub._router.replies.grants:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


# --- item 15: agent paths -------------------------------------------------------------


@pytest.mark.parametrize(
    "resource",
    ["/api/v1/ws/agent/?tenant_id=t1", "/api/v1/ws/agent/bob/extra?tenant_id=t1"],
)
async def test_agent_path_without_exactly_one_id_is_http_404(resource: str) -> None:
    async with open_test_hub(close_timeout=0.05) as hub:
        statuses = []
        try:
            async with trio.open_nursery() as nursery:
                await hub.dial(nursery, resource)
        except* trio_websocket.ConnectionRejected as group:
            statuses = [exc.status_code for exc in group.exceptions]  # type: ignore[attr-defined]
        assert statuses == [404]


# --- the agent side of one delivery per connection ---------------------------------------


async def test_agent_runs_every_matching_handler_once_per_message(autojump_clock: Any) -> None:
    calls: list[tuple[str, Any]] = []
    async with open_test_hub() as hub, hub.open_agent("agent") as agent:
        async with hub.open_agent("pub") as pub:
            done = trio.Event()

            async def star(subject: str, data: Any) -> None:
                calls.append(("tasks.*", data))
                if len(calls) >= 2:
                    done.set()

            async def rest(subject: str, data: Any) -> None:
                calls.append(("tasks.>", data))
                if len(calls) >= 2:
                    done.set()

            await agent.subscribe("tasks.*", star)
            await agent.subscribe("tasks.>", rest)
            await pub.publish("tasks.new", 7, confirm=True)
            with trio.fail_after(5):
                await done.wait()
            await trio.sleep(1)
            assert sorted(calls) == [("tasks.*", 7), ("tasks.>", 7)]


# --- presence writes keep their order -------------------------------------------------


async def test_the_final_presence_flush_never_overtakes_a_write_in_flight(
    tmp_path: Any, nursery: trio.Nursery
) -> None:
    """A slow registry write of `online` still in its worker thread when the agent leaves
    and the hub stops: the shutdown's flush of `left` waits for it, so `left` lands last."""
    import threading

    from artcafe_trio import Registry

    registry = Registry.open(tmp_path / "hub.db")
    original = registry.record_presence
    written: list[list[str]] = []
    calls = itertools.count()
    in_flight, release = threading.Event(), threading.Event()

    def slow_first_write(changes: Any) -> None:
        if next(calls) == 0:  # the first write (online) is slow: still in flight below
            in_flight.set()
            assert release.wait(10), "the final flush never queued behind this write"
        original(changes)
        written.append([change.reason for change in changes])

    async def release_once_the_final_flush_waits(hub: Any) -> None:
        # The writer task holds the flush lock during its write: the only other flush
        # is the shutdown's, so a waiter on the lock is that flush, waiting behind it.
        lock = hub._presence_writer._flush_lock
        while lock.statistics().tasks_waiting == 0:
            await trio.sleep(0.01)
        release.set()

    registry.record_presence = slow_first_write  # type: ignore[method-assign]
    try:
        async with open_hub(registry=registry, port=None) as hub:
            test_hub = TestHub(hub)
            client = await connect(test_hub, nursery, "a1")
            with trio.fail_after(10):
                while not in_flight.is_set():  # the writer has taken `online` into its thread
                    await trio.sleep(0.01)
            assert written == []
            nursery.start_soon(release_once_the_final_flush_waits, hub)
            await client.send(Leave())
            await client.close_code()
        assert written == [["connected"], ["left"]]
        [row] = registry.presence_rows()
        assert (row.status, row.reason) == ("offline", "left")
    finally:
        registry.close()


async def test_open_requests_are_bounded_hub_wide_in_responders_held() -> None:
    """Requests fanned out to many receivers hold a set of responders each; all of them
    together stay within ``max_reply_grants`` (the oldest requests are forgotten)."""
    async with open_test_hub(max_reply_grants=5, close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            requester = await connect(hub, nursery, "req")
            workers = [await connect(hub, nursery, f"w{i}") for i in range(2)]
            for worker in workers:
                await worker.subscribe("jobs")
            assert requester.welcome is not None
            inbox = f"$reply.{requester.welcome.session_id}"
            for n in range(3):  # 2 responders each: 6 > 5, so the first is forgotten
                await requester.send(Publish(subject="jobs", data=n, reply_to=f"{inbox}.{n}"))
            await barrier(requester)
            assert sorted(hub.hub._router.replies.grants) == [f"{inbox}.1", f"{inbox}.2"]
            assert hub.hub._router.replies.granted == 4
            await workers[0].send(Publish(subject=f"{inbox}.0", data="late", id="late"))
            assert (await workers[0].recv_type(Error)).code == "reply_not_expected"
            await workers[1].send(Publish(subject=f"{inbox}.2", data="ok", id="ok"))
            await workers[1].recv_type(Published)
            assert hub.hub._router.replies.granted == 2
            await requester.ws.aclose()
            with trio.fail_after(5):
                while hub.hub._router.replies.grants:
                    await trio.sleep(0.01)
            assert hub.hub._router.replies.granted == 0
            nursery.cancel_scope.cancel()
