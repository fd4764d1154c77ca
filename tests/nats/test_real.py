"""The client against a real nats-server: core features, nats-py interop, faults."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from artcafe_trio import Backoff
from artcafe_trio.nats import (
    Disconnected,
    Headers,
    LameDuckMode,
    NatsClient,
    NoRespondersError,
    OutboundBufferFull,
    Reconnected,
    open_nats,
)

from .servers import NatsNode

PEER = Path(__file__).with_name("natspy_peer.py")


async def collect(sub: object, count: int, limit: float = 5.0) -> list[object]:
    out = []
    with trio.fail_after(limit):
        async for msg in sub:  # type: ignore[attr-defined]
            out.append(msg)
            if len(out) == count:
                break
    return out


async def test_publish_subscribe_with_and_without_headers(nats_node: NatsNode) -> None:
    async with open_nats(nats_node.url) as nc:
        sub = await nc.subscribe("t.*")
        await nc.publish("t.plain", b"one")
        await nc.publish("t.hdr", b"two", headers={"A": ["1", "2"], "B": "x y"})
        await nc.publish("t.empty", b"", reply="r.1")
        await nc.publish("other", b"not for us")
        await nc.flush()
        plain, hdr, empty = await collect(sub, 3)
        assert (plain.subject, plain.data, plain.headers) == ("t.plain", b"one", None)  # type: ignore[attr-defined]
        assert hdr.data == b"two"  # type: ignore[attr-defined]
        assert hdr.headers.get_all("A") == ["1", "2"]  # type: ignore[attr-defined]
        assert hdr.headers["B"] == "x y"  # type: ignore[attr-defined]
        assert (empty.data, empty.reply) == (b"", "r.1")  # type: ignore[attr-defined]
        await sub.unsubscribe()
        await nc.publish("t.after", b"")
        await nc.flush()
        assert [m async for m in sub] == []


async def test_queue_group_delivers_each_message_to_one_member(nats_node: NatsNode) -> None:
    async with open_nats(nats_node.url) as a, open_nats(nats_node.url) as b:
        subs = [await a.subscribe("q.work", queue="w"), await b.subscribe("q.work", queue="w")]
        await a.flush()
        await b.flush()
        for i in range(200):
            await a.publish("q.work", b"%d" % i)
        await a.flush()
        await b.flush()
        await a.flush()
        counts = [s.pending for s in subs]
        got = []
        for s in subs:
            got += [int((await s.next_msg()).data) for _ in range(s.pending)]
        got.sort()
        assert got == list(range(200))
        assert all(c > 0 for c in counts)


async def test_request_reply_and_no_responders(nats_node: NatsNode) -> None:
    async with open_nats(nats_node.url) as nc:

        async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            sub = await nc.subscribe("svc.echo")
            await nc.flush()
            task_status.started()
            async for msg in sub:
                assert msg.reply is not None
                await nc.publish(msg.reply, b"echo:" + msg.data, headers={"Seen": msg.subject})

        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            with trio.fail_after(5):
                answers = [await nc.request("svc.echo", b"%d" % i) for i in range(20)]
            assert [m.data for m in answers] == [b"echo:%d" % i for i in range(20)]
            assert answers[0].headers == Headers((("Seen", "svc.echo"),))
            with trio.fail_after(5), pytest.raises(NoRespondersError):
                await nc.request("svc.nobody", b"?")
            nursery.cancel_scope.cancel()


async def test_interop_with_nats_py_both_ways(nats_node: NatsNode) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, str(PEER), nats_node.url], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None and process.stdin is not None
        with trio.fail_after(20):
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(100)
        assert line == b"ready\n"
        async with open_nats(nats_node.url) as nc:
            echoed = await nc.subscribe("interop.from_py")
            worked = await nc.subscribe("interop.worked")
            mine = await nc.subscribe("interop.work", queue="w")
            answers = await nc.subscribe("interop.answer")
            service = await nc.subscribe("interop.trio_svc")
            await nc.flush()
            # ours -> nats-py -> ours, with and without headers
            await nc.publish("interop.to_py", b"plain")
            await nc.publish("interop.to_py", b"hdr", headers={"X-Multi": ["a", "b"], "K": "v"})
            plain, hdr = await collect(echoed, 2)
            assert (plain.data, plain.headers) == (b"plain", None)  # type: ignore[attr-defined]
            assert hdr.data == b"hdr"  # type: ignore[attr-defined]
            assert hdr.headers["K"] == "v"  # type: ignore[attr-defined]
            # nats-py parsed both X-Multi lines; its headers are a dict, so it keeps (and
            # echoes) the last value only. (Both values end to end: the first test above.)
            assert hdr.headers.get_all("X-Multi") == ["b"]  # type: ignore[attr-defined]
            assert list(hdr.headers) == ["X-Multi", "K"]  # type: ignore[attr-defined]
            # our request, nats-py's reply
            with trio.fail_after(5):
                reply = await nc.request("interop.py_svc", b"ping")
            assert reply.data == b"py:ping"
            # nats-py's request, our reply
            await nc.publish("interop.ask", b"question")
            request = (await collect(service, 1))[0]
            assert request.headers["Asked-By"] == "py"  # type: ignore[attr-defined]
            await nc.publish(request.reply, b"trio:" + request.data)  # type: ignore[attr-defined]
            (answer,) = await collect(answers, 1)
            assert answer.data == b"trio:question"  # type: ignore[attr-defined]
            # one queue group across both clients
            for i in range(100):
                await nc.publish("interop.work", b"%d" % i)
            await nc.flush()
            ours = [int(m.data) for m in [await mine.next_msg() for _ in range(mine.pending)]]
            theirs = [int(m.data) for m in await collect(worked, 100 - len(ours))]  # type: ignore[attr-defined]
            assert sorted(ours + theirs) == list(range(100))
            assert ours and theirs
    finally:
        if process.stdin is not None:
            await process.stdin.aclose()
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0


async def test_sigstop_fires_the_ping_deadline_at_its_configured_time(
    own_nats_node: NatsNode,
) -> None:
    interval, outstanding = 0.25, 2
    async with open_nats(
        own_nats_node.url,
        ping_interval=interval,
        max_pings_outstanding=outstanding,
        connect_timeout=0.5,
        backoff=Backoff(base=0.05, cap=0.2, max_attempts=None),
    ) as nc:
        events = nc.events()
        await nc.flush()
        stopped = trio.current_time()
        own_nats_node.stop_signal()
        try:
            with trio.fail_after(5):
                event = await events.receive()
            elapsed = trio.current_time() - stopped
        finally:
            own_nats_node.cont_signal()
        assert isinstance(event, Disconnected)
        assert "stale connection" in event.cause
        # The first unanswered PING leaves within one interval; it then has interval x outstanding.
        assert interval * outstanding - 0.05 <= elapsed <= interval * (outstanding + 1) + 0.25
        with trio.fail_after(10):
            assert isinstance(await events.receive(), Reconnected)
        await nc.flush()


async def test_sigstop_during_a_publish_burst_still_fires_the_ping_deadline(
    own_nats_node: NatsNode,
) -> None:
    """The server stops reading mid-burst: the socket buffers fill, the writer blocks
    and the publisher waits for buffer space; the deadline fires on time anyway."""
    interval, outstanding = 0.25, 2
    async with open_nats(
        own_nats_node.url,
        ping_interval=interval,
        max_pings_outstanding=outstanding,
        connect_timeout=0.5,
        reconnect_buffer_size=1024 * 1024,
        backoff=Backoff(base=0.05, cap=0.2, max_attempts=None),
    ) as nc:
        events = nc.events()
        await nc.flush()
        longest_wait = 0.0
        stopped = trio.current_time()
        own_nats_node.stop_signal()
        try:

            async def burst() -> None:
                nonlocal longest_wait
                chunk = b"x" * 60000
                while True:
                    before = trio.current_time()
                    try:
                        await nc.publish("burst", chunk)
                    except OutboundBufferFull:
                        return  # disconnected, and the reconnect buffer is full
                    longest_wait = max(longest_wait, trio.current_time() - before)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(burst)
                with trio.fail_after(5):
                    event = await events.receive()
                elapsed = trio.current_time() - stopped
        finally:
            own_nats_node.cont_signal()
        assert isinstance(event, Disconnected)
        assert "stale connection" in event.cause
        assert interval * outstanding - 0.05 <= elapsed <= interval * (outstanding + 1) + 0.25
        # The publisher really was stuck behind the blocked write until the deadline.
        assert longest_wait >= interval
        with trio.fail_after(10):
            assert isinstance(await events.receive(), Reconnected)
        await nc.flush()


async def test_killing_a_node_right_after_a_flush_loses_nothing_flushed_between_survivors(
    own_nats_cluster: list[NatsNode],
) -> None:
    """Kill n1 right after two batches are flushed, without waiting for delivery.

    ``moving`` (on n1) subscribes to ``kill.b`` and publishes ``kill.a``;
    ``publisher`` (on n2) publishes ``kill.b``; ``staying`` (on n3) subscribes to
    both. What core NATS promises, and this asserts: every ``kill.b`` message
    ``publisher`` flushed reaches ``staying`` although a node with interest in
    them died in between; ``moving`` reconnects elsewhere, resubscribes, and what
    it flushes after the reconnect all arrives. The ``kill.a`` batch was flushed to
    n1 itself: its copies on their way over n1's routes may die with n1 (see
    docs/nats.md), so for it only order and no duplicates are asserted."""
    n1, n2, n3 = own_nats_cluster
    backoff = Backoff(base=0.05, cap=0.5, max_attempts=None)
    async with (
        open_nats(n1.url, backoff=backoff, randomize=False) as moving,
        open_nats(n2.url) as publisher,
        open_nats(n3.url) as staying,
    ):
        events = moving.events()
        from_moving = await staying.subscribe("kill.a")
        from_publisher = await staying.subscribe("kill.b")
        echo = await moving.subscribe("kill.b")
        await staying.flush()
        await wait_for_interest(moving, "kill.a", from_moving)
        await wait_for_interest(publisher, "kill.b", from_publisher)
        await wait_for_interest(publisher, "kill.b", echo)
        assert len(moving.servers) == 3  # learned n2 and n3 from INFO connect_urls

        for i in range(2000):
            await moving.publish("kill.a", b"%d" % i)
            await publisher.publish("kill.b", b"%d" % i)
        await moving.flush()
        await publisher.flush()
        await trio.to_thread.run_sync(n1.kill)  # at once: nothing waited for delivery
        for i in range(2000, 2100):  # in flight or buffered across the reconnect: not promised
            await moving.publish("kill.a", b"%d" % i)
        with trio.fail_after(10):
            while not isinstance(event := await events.receive(), Reconnected):
                assert isinstance(event, Disconnected)
        assert moving.connected_server != f"127.0.0.1:{n1.port}"
        await moving.flush()
        for i in range(2100, 2200):
            await moving.publish("kill.a", b"%d" % i)
        await moving.flush()

        async def receive(sub: object, until: int) -> list[int]:
            got: list[int] = []
            with trio.fail_after(10):
                while not got or got[-1] < until:
                    data = (await sub.next_msg()).data  # type: ignore[attr-defined]
                    if data != b"probe":
                        got.append(int(data))
            return got

        got_b = await receive(from_publisher, 1999)
        got_a = await receive(from_moving, 2199)
        # Flushed by a survivor: every message, once, in order.
        assert got_b == list(range(2000))
        # Flushed after the reconnect: all there; overall in order and no duplicates.
        assert set(range(2100, 2200)) <= set(got_a)
        assert got_a == sorted(set(got_a))
        # The subscription was re-sent on the new connection: what is published now
        # reaches it. (Its queue still holds what it got before the kill, and maybe late
        # probes, so this looks for a payload of its own.)
        with trio.fail_after(10):
            while True:
                await publisher.publish("kill.b", b"after")
                await publisher.flush()
                with trio.move_on_after(0.1):
                    while (await echo.next_msg()).data != b"after":
                        pass
                    break


async def wait_for_interest(publisher: NatsClient, subject: str, sub: object) -> None:
    """Publish probes until ``sub`` sees one (interest crosses routes asynchronously)."""
    with trio.fail_after(10):
        while True:
            await publisher.publish(subject, b"probe")
            await publisher.flush()
            with trio.move_on_after(0.1):
                while (await sub.next_msg()).data != b"probe":  # type: ignore[attr-defined]
                    pass
                break
    while sub.pending:  # type: ignore[attr-defined]
        assert (await sub.next_msg()).data == b"probe"  # type: ignore[attr-defined]


async def test_lame_duck_mode_is_reported(own_nats_node: NatsNode) -> None:
    async with open_nats(
        own_nats_node.url, backoff=Backoff(base=0.05, cap=0.2, max_attempts=None)
    ) as nc:
        events = nc.events()
        await nc.flush()
        assert own_nats_node.proc is not None
        own_nats_node.proc.send_signal(signal.SIGUSR2)  # nats-server: enter lame duck mode
        with trio.fail_after(5):
            event = await events.receive()
        assert event == LameDuckMode(f"127.0.0.1:{own_nats_node.port}")
