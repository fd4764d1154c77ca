"""The trio driver over memory streams, under ``autojump_clock``: exact timings."""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from artcafe_trio import Backoff
from artcafe_trio._util import collapse_exception_groups
from artcafe_trio.nats import (
    AsyncServerError,
    BadSubjectError,
    Disconnected,
    LameDuckMode,
    MaxPayloadExceeded,
    NatsClient,
    NatsClosed,
    NatsConnectError,
    NatsConnectionLost,
    NatsReconnectFailed,
    OutboundBufferFull,
    Reconnected,
    ServersDiscovered,
    SlowConsumer,
    open_nats,
)

from .fakeserver import FakeServer


@pytest.fixture
def autojump(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    return autojump_clock


@asynccontextmanager
async def fake_client(**options: Any) -> AsyncIterator[tuple[NatsClient, FakeServer]]:
    info = options.pop("info", {})
    servers = options.pop("servers", ["nats://127.0.0.1:4222"])
    lockstep = options.pop("lockstep", False)
    with collapse_exception_groups():
        async with trio.open_nursery() as nursery:
            fake = FakeServer(nursery, lockstep=lockstep, **info)
            async with open_nats(servers, dial=fake.dial, randomize=False, **options) as nc:
                yield nc, fake
            nursery.cancel_scope.cancel()


async def test_ping_deadline_fires_at_interval_times_outstanding(autojump: Any) -> None:
    async with fake_client(
        ping_interval=10, max_pings_outstanding=2, backoff=Backoff(base=1, max_attempts=None)
    ) as (nc, fake):
        events = nc.events()
        t0 = trio.current_time()
        fake.current.frozen = True  # like SIGSTOP: the socket stays open, nothing answers
        event = await events.receive()
        assert isinstance(event, Disconnected)
        assert "stale connection" in event.cause
        # The first unanswered PING goes out at t0 + 10; it may stay unanswered for 10 x 2.
        assert trio.current_time() - t0 == pytest.approx(30, abs=1e-6)
        event = await events.receive()
        assert isinstance(event, Reconnected)
        assert nc.is_connected


async def test_the_ping_deadline_holds_while_a_write_is_blocked(autojump: Any) -> None:
    """A server that stops reading during a publish burst (SIGSTOP, a black hole):
    the writer blocks in ``send_all`` and publishers wait for buffer space. The
    PINGs queued meanwhile still count, so the connection is declared dead at
    the exact deadline, the blocked write is cancelled and the publishers go on."""
    async with fake_client(
        lockstep=True,
        ping_interval=10,
        max_pings_outstanding=2,
        write_buffer_size=1000,
        backoff=Backoff(base=1, cap=1, max_attempts=None),
    ) as (nc, fake):
        events = nc.events()
        await nc.flush()
        stalled = fake.current
        t0 = trio.current_time()
        stalled.stalled = True
        published = 0
        parked: list[tuple[float, float]] = []

        async def burst() -> None:
            nonlocal published
            for i in range(300):
                before = trio.current_time()
                await nc.publish("burst", b"%099d" % i)
                if trio.current_time() > before:
                    parked.append((before - t0, trio.current_time() - t0))
                published += 1

        with trio.fail_after(100):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(burst)
                event = await events.receive()
                assert isinstance(event, Disconnected)
                assert "stale connection" in event.cause
                # The first PING was queued at t0 + 10 (behind the blocked write); 10 x 2 later:
                assert trio.current_time() - t0 == pytest.approx(30, abs=1e-6)
                assert isinstance(await events.receive(), Reconnected)
        assert published == 300
        # The burst waited for buffer space from the start until the connection was dropped.
        assert parked == [(0, 30)]
        await nc.flush()
        assert fake.current is not stalled
        # What was still buffered is sent on the new connection, in order (the
        # cancelled write's messages are lost with the connection: at most once).
        pubs = [int(p) for p in fake.current.pubs()]
        assert pubs[0] > 0 and pubs == list(range(pubs[0], 300))


async def test_answered_pings_keep_the_connection(autojump: Any) -> None:
    async with fake_client(ping_interval=10, max_pings_outstanding=1) as (nc, fake):
        events = nc.events()
        await trio.sleep(95)
        assert fake.current.commands.count(("PING",)) == 1 + 9  # handshake + one per interval
        assert len(fake.connections) == 1
        with pytest.raises(trio.WouldBlock):
            events.receive_nowait()


async def test_a_flush_counts_as_a_ping_and_fails_when_the_connection_goes_stale(
    autojump: Any,
) -> None:
    async with fake_client(ping_interval=10, max_pings_outstanding=2) as (nc, fake):
        await trio.sleep(3)
        fake.current.frozen = True
        t0 = trio.current_time()
        with pytest.raises(NatsConnectionLost):
            await nc.flush()
        assert trio.current_time() - t0 == pytest.approx(20, abs=1e-6)


async def test_reconnect_waits_the_backoff_delays_then_gives_up(autojump: Any) -> None:
    backoff = Backoff(base=1, factor=2, cap=8, max_attempts=4)
    expected = list(backoff.delays(random.Random(3)))
    fake_ref: list[FakeServer] = []
    with pytest.raises(NatsReconnectFailed) as caught:
        async with fake_client(backoff=backoff, rng=random.Random(3)) as (_nc, fake):
            fake_ref.append(fake)
            await trio.sleep(5)
            fake.refuse = True
            await fake.current.close()
            await trio.sleep_forever()
    assert caught.value.attempts == 4
    assert isinstance(caught.value.last_cause, ConnectionRefusedError)
    times = [t for t, _ in fake_ref[0].dials]
    assert times[0] == 0
    gaps = [b - a for a, b in zip([5.0, *times[1:]], times[1:], strict=False)]
    assert gaps == pytest.approx(expected, abs=1e-6)


async def test_first_connect_tries_each_server_once_then_fails(autojump: Any) -> None:
    async with trio.open_nursery() as nursery:
        fake = FakeServer(nursery)
        fake.refuse = True
        with pytest.raises(NatsConnectError):
            async with open_nats(["nats://a:1", "nats://b:2"], dial=fake.dial, randomize=False):
                pass  # pragma: no cover
        assert [address for _, address in fake.dials] == ["a:1", "b:2"]
        assert trio.current_time() == 0


async def test_publishes_while_disconnected_are_buffered_then_sent_after_resubscribing(
    autojump: Any,
) -> None:
    async with fake_client(
        reconnect_buffer_size=60, backoff=Backoff(base=1, max_attempts=None)
    ) as (nc, fake):
        events = nc.events()
        sub_a = await nc.subscribe("a")
        await nc.subscribe("b", queue="q")
        gone = await nc.subscribe("c")
        await gone.unsubscribe()
        await nc.flush()
        fake.refuse = True
        await fake.current.close()
        assert isinstance(await events.receive(), Disconnected)
        sent = []
        with pytest.raises(OutboundBufferFull):
            for i in range(100):
                payload = b"m%d" % i
                await nc.publish("a", payload)
                sent.append(payload)
        assert len(sent) == 60 // len(b"PUB a 2\r\nm0\r\n")  # whole commands only
        late = await nc.subscribe("d")
        fake.refuse = False
        assert isinstance(await events.receive(), Reconnected)
        await nc.flush()
        commands = fake.current.commands
        assert commands[0][0] == "CONNECT"
        assert commands[1] == ("PING",)
        assert commands[2:5] == [
            ("SUB", "a", "1"),
            ("SUB", "b", "q", "2"),
            ("SUB", "d", str(late.sid)),
        ]
        assert fake.current.pubs() == sent
        assert commands[-1] == ("PING",)
        assert sub_a.sid == 1


async def test_slow_consumer_drops_are_counted_and_reported_once(autojump: Any) -> None:
    async with fake_client(pending_msgs_limit=3) as (nc, fake):
        events = nc.events()
        sub = await nc.subscribe("s")
        await nc.flush()
        await fake.current.send(b"".join(b"MSG s %d 1\r\n%d\r\n" % (sub.sid, i) for i in range(5)))
        await nc.flush()
        assert sub.dropped == 2
        assert sub.pending == 3
        event = await events.receive()
        assert event == SlowConsumer("s", sub.sid, 1)
        with pytest.raises(trio.WouldBlock):
            events.receive_nowait()
        assert [(await sub.next_msg()).data for _ in range(3)] == [b"0", b"1", b"2"]


async def test_info_updates_extend_the_pool_and_report_lame_duck(autojump: Any) -> None:
    async with fake_client(backoff=Backoff(base=1, max_attempts=None)) as (nc, fake):
        events = nc.events()
        await fake.current.send(
            b'INFO {"connect_urls":["10.0.0.2:4222","127.0.0.1:4222"],"ldm":true}\r\n'
        )
        assert await events.receive() == ServersDiscovered(("10.0.0.2:4222",))
        assert await events.receive() == LameDuckMode("127.0.0.1:4222")
        assert nc.servers == ["127.0.0.1:4222", "10.0.0.2:4222"]
        await fake.current.close()
        assert isinstance(await events.receive(), Disconnected)
        assert isinstance(await events.receive(), Reconnected)
        assert fake.dials[-1][1] == "10.0.0.2:4222"
        assert nc.connected_server == "10.0.0.2:4222"


async def test_permission_errors_are_events_and_the_connection_stays(autojump: Any) -> None:
    async with fake_client() as (nc, fake):
        events = nc.events()
        await fake.current.send(b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n")
        assert await events.receive() == AsyncServerError(
            "127.0.0.1:4222", 'Permissions Violation for Publish to "x"'
        )
        await nc.flush()
        assert len(fake.connections) == 1


async def test_subscriptions_end_when_the_client_closes(autojump: Any) -> None:
    async with fake_client() as (nc, fake):
        sub = await nc.subscribe("x")
        await fake.current.send(b"MSG x 1 2\r\nhi\r\n")
        await nc.flush()
    assert [m.data async for m in sub] == [b"hi"]
    with pytest.raises(NatsClosed):
        await nc.publish("x", b"")


async def test_publish_in_a_burst_becomes_few_writes(autojump: Any) -> None:
    writes: list[int] = []
    async with trio.open_nursery() as nursery:
        fake = FakeServer(nursery)

        async def dial(host: str, port: int) -> trio.abc.Stream:
            stream = await fake.dial(host, port)
            original = stream.send_all

            async def send_all(data: bytes | bytearray | memoryview) -> None:
                writes.append(len(data))
                await original(data)

            stream.send_all = send_all  # type: ignore[method-assign]
            return stream

        async with open_nats("nats://h:1", dial=dial, write_buffer_size=1024) as nc:
            writes.clear()
            for i in range(1000):
                await nc.publish("burst", b"%04d" % i)
            await nc.flush()
            assert [int(p) for p in fake.current.pubs()] == list(range(1000))
            # 19 bytes per command, written in chunks of about write_buffer_size.
            assert sum(writes) == 1000 * len(b"PUB burst 4\r\n0000\r\n") + len(b"PING\r\n")
            assert len(writes) <= 1000 * 19 // 1024 + 2
        nursery.cancel_scope.cancel()


async def test_a_flush_while_disconnected_completes_after_the_reconnect(autojump: Any) -> None:
    async with fake_client(backoff=Backoff(base=1, cap=1, max_attempts=None)) as (nc, fake):
        events = nc.events()
        fake.refuse = True
        await fake.current.close()
        assert isinstance(await events.receive(), Disconnected)
        await nc.publish("later", b"x")
        done = trio.Event()

        async def flush() -> None:
            await nc.flush()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flush)
            await trio.sleep(10)
            assert not done.is_set()
            fake.refuse = False
            with trio.fail_after(5):
                await done.wait()
        assert fake.current.pubs() == [b"x"]
        assert fake.current.commands[-1] == ("PING",)


async def test_a_cancelled_request_leaves_nothing_behind(autojump: Any) -> None:
    async with fake_client() as (nc, fake):
        with trio.move_on_after(1) as scope:
            await nc.request("slow", b"?")
        assert scope.cancelled_caught
        assert nc._mux is not None
        assert nc._mux.waiters == {}
        # The reply subscription was made once, before the request.
        subs = [c for c in fake.current.commands if c[0] == "SUB"]
        assert len(subs) == 1
        assert subs[0][1].startswith("_INBOX.")
        assert subs[0][1].endswith(".*")


async def test_bad_publishes_are_refused_before_anything_is_sent(autojump: Any) -> None:
    async with fake_client(info={"max_payload": 100}) as (nc, fake):
        with pytest.raises(MaxPayloadExceeded):
            await nc.publish("big", b"x" * 101)
        with pytest.raises(BadSubjectError):
            await nc.publish("two words", b"")
        with pytest.raises(BadSubjectError):
            await nc.publish("ok", b"", headers={"Bad:Key": "v"})
        await nc.publish("fits", b"x" * 100)
        await nc.flush()
        assert fake.current.pubs() == [b"x" * 100]


async def test_event_channels_end_when_the_client_closes(autojump: Any) -> None:
    async with fake_client() as (nc, _):
        events = nc.events()
    assert [e async for e in events] == []


async def test_bucket_creation_retries_while_the_cluster_has_no_placement(
    autojump_clock: object,
) -> None:
    """A cluster still forming answers "no suitable peers" (10005): creation retries it
    within ``api_timeout``, and gives up with that error once the time is spent."""
    import json

    from artcafe_trio.nats import JetStreamError, key_value
    from artcafe_trio.nats._protocol import Msg

    def answer(body: object) -> Msg:
        return Msg(subject="_INBOX.x", sid=1, reply=None, data=json.dumps(body).encode())

    not_found = {"error": {"code": 404, "err_code": 10059, "description": "stream not found"}}
    no_peers = {"error": {"code": 500, "err_code": 10005, "description": "no suitable peers"}}
    created = {"config": {"name": "KV_b", "max_msgs_per_subject": 1}}

    class FakeClient:
        def __init__(self, creates_refused: int) -> None:
            self.creates_refused = creates_refused
            self.calls: list[tuple[str, float]] = []

        async def request(self, subject: str, payload: bytes) -> Msg:
            self.calls.append((subject, trio.current_time()))
            await trio.lowlevel.checkpoint()
            if ".INFO." in subject:
                return answer(not_found)
            if self.creates_refused:
                self.creates_refused -= 1
                return answer(no_peers)
            return answer(created)

    fake = FakeClient(creates_refused=3)
    kv = await key_value(fake, "b", api_timeout=5.0)  # type: ignore[arg-type]
    assert kv.bucket == "b"
    creates = [t for subject, t in fake.calls if ".CREATE." in subject]
    assert [round(b - a, 3) for a, b in itertools.pairwise(creates)] == [0.05, 0.1, 0.2]

    never = FakeClient(creates_refused=10**6)
    start = trio.current_time()
    with pytest.raises(JetStreamError) as refused:
        await key_value(never, "b", api_timeout=2.0)  # type: ignore[arg-type]
    assert refused.value.err_code == 10005
    assert trio.current_time() - start <= 2.0
