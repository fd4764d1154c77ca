"""Hardening: answers and writes in flight are bounded like deliveries (issue 9, item 1).

A connection that never reads its socket could make the hub hold unbounded answers to
its own frames (one ``presence_query`` answer is the whole tenant's presence table),
outside the hub-wide output budget, and a consumer stuck in the middle of a write with
nothing more queued was never cut off. Now answers are bounded in bytes
(``reply_window_bytes``: reading the connection pauses), counted in the output budget
and in choosing whom to cut off, and a write that does not complete within
``write_stall_timeout`` cuts the connection off (4004).
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import trio

from artcafe_trio import CloseCode
from artcafe_trio.protocol import PresenceQuery, Publish, Published
from artcafe_trio.testing import open_test_hub

from .test_hardening_isolation import BIG, connect

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("hub_streams")]

META = {"blob": "m" * 8000}  # 8 KB of metadata per agent: each presence answer is large


def session_of(hub: Any, agent: str) -> Any:
    [session] = [s for s in hub.hub._directory.agent_sessions() if s.agent_id == agent]
    return session


async def jam_the_writer(hub: Any, nursery: trio.Nursery, client: Any, session: Any) -> None:
    """Get one large delivery stuck in ``session``'s write (its client never reads).

    The hub's reader writes a connection's answers itself when nothing else is being
    written (one answer then waits in that write, and reading waits with it); with a
    delivery stuck in the writer, answers queue in the outbox instead: what a
    connection that reads nothing can make the hub hold at most."""
    await client.subscribe("jam")
    pub = await connect(hub, nursery, f"jammer-{session.agent_id}")
    for i in range(10):
        await pub.send(Publish(subject="jam", data="j" * 200_000, id=f"j{i}"))
        await pub.recv_type(Published)
        await trio.sleep(0.1)
        if session.outbox.flight_bytes:
            return
    raise AssertionError("no delivery got stuck in the write")


async def test_answers_to_a_connection_that_never_reads_are_bounded_in_bytes(
    autojump_clock: Any,
) -> None:
    """The audit's probe: 40 agents with 8 KB metadata, one agent that never reads its
    socket asks for the presence table again and again. Before: 256 answers held
    (~80 MB here, 210 MB with 100 agents), outside the budget, never cut off."""
    window = 1024 * 1024
    async with open_test_hub(
        close_timeout=0.05, max_frame_bytes=BIG, reply_window_bytes=window, write_stall_timeout=10.0
    ) as hub:
        async with trio.open_nursery() as nursery:
            for i in range(40):
                await connect(hub, nursery, f"peer{i}", metadata=META)
            attacker = await connect(hub, nursery, "att", lockstep=True, heartbeat_interval=None)
            session = session_of(hub, "att")
            start = trio.current_time()
            await jam_the_writer(hub, nursery, attacker, session)
            sent = 0
            for i in range(300):
                with trio.move_on_after(1) as blocked:
                    await attacker.send(PresenceQuery(id=f"q{i}"))
                if blocked.cancelled_caught:
                    break  # the hub stopped reading this connection
                sent += 1
            held = sum(sys.getsizeof(e) for e in session.outbox._queue if isinstance(e, str))
            answer = max(sys.getsizeof(e) for e in session.outbox._queue if isinstance(e, str))
            assert answer > 300_000  # one answer is the 40 agents' presence rows
            assert sent < 20  # not 256: reading paused on bytes, not frames
            # At most the window plus one answer (plus the one being written) is held ...
            assert held <= window + 2 * answer
            # ... and it is in the hub-wide budget.
            assert hub.hub.output_budget.used >= held
            assert hub.hub.output_budget.peak <= hub.hub.config.output_budget_bytes
            # Its writes make no progress: cut off within write_stall_timeout, with a reason,
            # although nothing more is queued for it and it sends no heartbeats.
            with trio.fail_after(30):
                while not session.closing:
                    await trio.sleep(0.5)
            assert trio.current_time() - start == pytest.approx(10.0, abs=1.5)
            assert session.close_code == CloseCode.SLOW_CONSUMER
            assert "did not complete in 10 s" in session.close_reason
            assert hub.hub.stats.slow_consumers == 1
            with trio.fail_after(5):
                while hub.hub.output_budget.used > 0:  # what it held is released
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()


async def test_a_write_that_stalls_with_nothing_more_queued_is_cut_off(autojump_clock: Any) -> None:
    async with open_test_hub(
        max_frame_bytes=BIG, write_stall_timeout=7.0, close_timeout=0.05
    ) as hub:
        async with trio.open_nursery() as nursery:
            stuck = await connect(hub, nursery, "stuck", lockstep=True)
            await stuck.subscribe("blob")
            session = session_of(hub, "stuck")
            pub = await connect(hub, nursery, "pub")
            # The client library buffers a message or two: publish until one is stuck in
            # the hub's write with nothing queued behind it.
            for i in range(10):
                await pub.send(Publish(subject="blob", data="b" * 200_000, id=f"b{i}"))
                await pub.recv_type(Published)
                await trio.sleep(0.1)
                if session.outbox.flight_bytes:
                    break
            start = trio.current_time()
            await trio.sleep(1)
            assert not session.closing  # one delivery, in flight: below every queue bound
            assert session.outbox.queued_frames == 0
            assert session.outbox.flight_bytes > 200_000  # ... and accounted as held
            assert session.outbox.held_bytes == session.outbox.flight_bytes
            with trio.fail_after(20):
                while not session.closing:
                    await trio.sleep(0.25)
            assert trio.current_time() - start == pytest.approx(7.0, abs=0.5)
            assert session.close_code == CloseCode.SLOW_CONSUMER
            assert "did not complete in 7 s" in session.close_reason
            with trio.fail_after(5):
                while hub.hub.output_budget.used:
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()


async def test_a_slow_but_steady_reader_is_not_cut_off_by_the_write_stall_deadline(
    autojump_clock: Any,
) -> None:
    async with open_test_hub(
        max_frame_bytes=BIG, write_stall_timeout=2.0, close_timeout=0.05
    ) as hub:
        async with trio.open_nursery() as nursery:
            reader = await connect(hub, nursery, "slow", lockstep=True)
            await reader.subscribe("tick")
            pub = await connect(hub, nursery, "pub")
            for i in range(10):
                await pub.send(Publish(subject="tick", data=i, id=f"t{i}"))
                await pub.recv_type(Published)
            got = []
            for _ in range(10):
                await trio.sleep(1.5)  # each write waits 1.5 s for the reader: under 2 s
                got.append((await reader.recv()).data)
            assert got == list(range(10))
            assert hub.hub.stats.slow_consumers == 0
            nursery.cancel_scope.cancel()


async def test_answers_count_in_the_output_budget_and_in_choosing_whom_to_cut_off(
    autojump_clock: Any,
) -> None:
    """One agent that never reads holds ~2 MB of presence answers; deliveries to a
    stuck consumer then push the hub over its 3 MiB budget: the answer holder holds
    the most, so it is the one cut off, and the consumer keeps its connection."""
    budget = 3 * 1024 * 1024
    async with open_test_hub(
        max_frame_bytes=BIG,
        output_budget_bytes=budget,
        reply_window_bytes=2 * 1024 * 1024,
        write_stall_timeout=1000.0,
        close_timeout=5.0,
    ) as hub:
        async with trio.open_nursery() as nursery:
            for i in range(30):
                await connect(hub, nursery, f"peer{i}", metadata=META)
            asker = await connect(hub, nursery, "asker", lockstep=True)
            await jam_the_writer(hub, nursery, asker, session_of(hub, "asker"))
            consumer = await connect(hub, nursery, "consumer", lockstep=True)
            await consumer.subscribe("to.consumer")
            for i in range(30):
                with trio.move_on_after(1) as blocked:
                    await asker.send(PresenceQuery(id=f"q{i}"))
                if blocked.cancelled_caught:
                    break  # reading it paused (a lockstep stream allows no later send)
            asking = session_of(hub, "asker")
            assert asking.outbox.reply_bytes > 1024 * 1024 + 512 * 1024  # over half the window
            pub = await connect(hub, nursery, "pub")
            for i in range(20):  # 2 MB of deliveries: over the budget with the answers
                await pub.send(Publish(subject="to.consumer", data="z" * 100_000, id=f"m{i}"))
                await pub.recv_type(Published)
            assert hub.hub.output_budget.cut_offs == 1
            assert asking.closing and asking.close_code == CloseCode.SLOW_CONSUMER
            assert "hub output budget of 3145728 bytes exceeded" in asking.close_reason
            assert not session_of(hub, "consumer").closing
            assert hub.hub.output_budget.peak <= budget
            nursery.cancel_scope.cancel()


async def test_the_budget_never_admits_more_than_it_holds_even_with_writes_in_flight() -> None:
    """Unit level: bytes in flight stay held until written, so when only they are left
    the budget refuses (cutting off the receiver, with a reason) rather than go over."""
    from artcafe_trio.hub._flow import Delivery, Outbox, OutputBudget

    budget = OutputBudget(1_000_000)
    reasons: dict[str, str] = {}

    def outbox(name: str) -> Outbox:
        return Outbox(
            budget, max_frames=100, max_bytes=10**9, reply_window=100,
            reply_window_bytes=10**9, on_overflow=lambda reason: reasons.setdefault(name, reason),
        )  # fmt: skip

    writing, other = outbox("writing"), outbox("other")
    assert writing.deliver(Delivery(b"a" * 700_000))
    batch = await writing.take(1 << 20)  # in flight: still held
    assert budget.used > 700_000 and writing.held_bytes == writing.flight_bytes > 700_000
    writing.reply("x" * 50_000)  # an answer counts too
    assert budget.used > 750_000
    assert not other.deliver(Delivery(b"b" * 300_000))  # over: make room
    # The holder of the most was cut off first; its answer was freed but not its write
    # in flight, so the new delivery still did not fit: refused, its receiver cut off.
    assert "held the most output" in reasons["writing"]
    assert "exhausted (only output in flight is left)" in reasons["other"]
    assert budget.used <= budget.limit and budget.peak <= budget.limit
    writing.sent(batch)  # the write ended: everything is released
    assert budget.used == 0


async def test_an_answer_the_reader_writes_itself_is_held_to_the_write_stall_deadline(
    autojump_clock: Any,
) -> None:
    """With the writer idle the hub's reader writes a connection's answers itself (and
    stops reading meanwhile): a client that never reads is cut off by that write's
    deadline too, not held until its heartbeat timeout (it sends none here)."""
    async with open_test_hub(
        close_timeout=0.05, max_frame_bytes=BIG, write_stall_timeout=4.0
    ) as hub:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                await connect(hub, nursery, f"peer{i}", metadata=META)
            silent = await connect(hub, nursery, "silent", lockstep=True, heartbeat_interval=None)
            session = session_of(hub, "silent")
            # The client library buffers a message or two: ask until an answer is stuck
            # in the reader's own write (the writer idle, nothing queued).
            for i in range(10):
                with trio.move_on_after(1):
                    await silent.send(PresenceQuery(id=f"q{i}"))  # ~160 KB answers
                await trio.sleep(0.1)
                if session.reader_writing:
                    break
            start = trio.current_time()
            assert session.reader_writing and session.outbox.busy
            with trio.fail_after(30):
                while not session.closing:
                    await trio.sleep(0.25)
            assert trio.current_time() - start == pytest.approx(4.0, abs=0.5)
            assert session.close_code == CloseCode.SLOW_CONSUMER
            assert "did not complete in 4 s" in session.close_reason
            nursery.cancel_scope.cancel()
