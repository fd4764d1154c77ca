"""Heartbeat phase jitter: a random phase for the second heartbeat, then jittered periods.

Times are the hub's receipt times on trio's clock (in-memory streams: no latency),
recorded by wrapping the hub's heartbeat event hook.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

from artcafe_trio import HeartbeatAgent, generate_private_key
from artcafe_trio.protocol._heartbeats import heartbeat_delays, period_jitter
from artcafe_trio.testing import TestHub, open_test_hub

Beats = dict[str, list[float]]


def record_beats(hub: TestHub, monkeypatch: pytest.MonkeyPatch) -> Beats:
    """agent id -> the times at which the hub received its heartbeats."""
    beats: Beats = defaultdict(list)
    events = hub.hub.events
    original: Callable[..., None] = events.heartbeat

    def heartbeat(row: Any, session_id: str, rtt: float | None) -> None:
        if row is not None:
            beats[row.agent_id].append(trio.current_time())
        original(row, session_id, rtt)

    monkeypatch.setattr(events, "heartbeat", heartbeat)
    return beats


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


@asynccontextmanager
async def agents(hub: TestHub, count: int, **kwargs: Any) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        for i in range(count):
            await stack.enter_async_context(hub.open_agent(f"a{i}", rng=random.Random(i), **kwargs))
        yield


# --- the schedule (sans-IO) ------------------------------------------------------


def test_zero_jitter_is_the_exact_interval_and_draws_nothing() -> None:
    rng = random.Random(3)
    state = rng.getstate()
    delays = heartbeat_delays(7.5, 0.0, rng)
    assert [next(delays) for _ in range(50)] == [7.5] * 50
    assert rng.getstate() == state


def test_jittered_delays_for_a_seeded_rng() -> None:
    twin = random.Random(11)
    expected = [10 * (1 - twin.random())] + [10 * twin.uniform(0.9, 1.1) for _ in range(20)]
    delays = heartbeat_delays(10.0, 0.1, random.Random(11))
    assert [next(delays) for _ in range(21)] == expected


def test_jittered_delays_stay_within_their_bounds() -> None:
    rng = random.Random(5)
    firsts = []
    for _ in range(2000):
        delays = heartbeat_delays(2.0, 0.2, rng, period=0.05)
        firsts.append(next(delays))
        later = [next(delays) for _ in range(5)]
        assert all(2.0 * 0.95 <= d <= 2.0 * 1.05 for d in later)
    assert all(0 < d <= 2.0 for d in firsts)
    # The phase covers the whole interval: every tenth of it is hit.
    assert {math.floor(d / 0.2) for d in firsts} >= set(range(10))


@pytest.mark.parametrize(
    ("jitter", "interval", "timeout", "expected"),
    [
        (0.1, 10.0, 30.0, 0.1),  # default multiplier 3: slack 2 intervals, no cap
        (0.5, 10.0, 30.0, 0.5),
        (0.5, 10.0, 15.0, 0.25),  # the hub's minimum multiplier 1.5: half of 0.5
        (0.1, 10.0, 10.0, 0.0),  # no slack at all: no per-period jitter
        (0.3, 10.0, None, 0.3),
    ],
)
def test_period_jitter_keeps_half_the_timeout_slack(
    jitter: float, interval: float, timeout: float | None, expected: float
) -> None:
    assert period_jitter(jitter, interval, timeout) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [-0.01, 0.51, math.nan, math.inf])
def test_out_of_range_jitter_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=r"heartbeat_jitter must be between 0 and 0\.5"):
        HeartbeatAgent("a", tenant_id="t", private_key=generate_private_key(), heartbeat_jitter=bad)


# --- the agent, under autojump_clock ----------------------------------------------


async def test_exact_send_times_with_an_injected_rng(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_test_hub() as hub:
        beats = record_beats(hub, monkeypatch)
        async with hub.open_agent(
            "a1", heartbeat_interval=10, heartbeat_jitter=0.1, rng=random.Random(42)
        ):
            await trio.sleep(200)
    times = beats["a1"]
    twin = random.Random(42)
    expected = [times[0], times[0] + 10 * (1 - twin.random())]
    while len(expected) < len(times):
        expected.append(expected[-1] + 10 * twin.uniform(0.9, 1.1))
    assert len(times) >= 19
    assert times == expected
    assert all(9.0 <= gap <= 11.0 for gap in gaps(times)[1:])


async def test_the_first_heartbeat_still_goes_out_on_connect(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_test_hub() as hub:
        beats = record_beats(hub, monkeypatch)
        async with hub.open_agent("a1", heartbeat_interval=30, rng=random.Random(1)) as agent:
            connected_at = trio.current_time()
            await trio.sleep(0.001)
            assert beats["a1"] == [connected_at]
            assert agent.health().last_ack is not None


async def test_zero_jitter_keeps_the_old_exact_schedule(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(9)
    state = rng.getstate()
    async with open_test_hub() as hub:
        beats = record_beats(hub, monkeypatch)
        async with hub.open_agent("a1", heartbeat_interval=10, heartbeat_jitter=0, rng=rng):
            await trio.sleep(100)
    times = beats["a1"]
    assert len(times) == 11
    assert gaps(times) == [10.0] * 10
    assert rng.getstate() == state  # no draw at all


async def test_jitter_never_costs_the_presence_at_the_minimum_multiplier(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Multiplier 1.5 (the hub's minimum) with the largest jitter: the per-period
    # jitter is capped at 0.25, so no gap exceeds 1.25 intervals (timeout: 1.5).
    async with open_test_hub() as hub:
        beats = record_beats(hub, monkeypatch)
        async with hub.open_agent(
            "a1",
            heartbeat_interval=1,
            heartbeat_timeout_multiplier=1.5,
            heartbeat_jitter=0.5,
            rng=random.Random(4),
        ) as agent:
            await trio.sleep(300)
            assert agent.health().reconnect_attempts == 0
            assert agent.health().total_reconnects == 0
    longest = max(gaps(beats["a1"]))
    assert 1.2 < longest <= 1.25
    assert hub.hub.stats.heartbeats == len(beats["a1"]) > 280


async def test_a_fleet_connected_at_once_spreads_its_second_heartbeats(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_test_hub() as hub:
        beats = record_beats(hub, monkeypatch)
        async with agents(hub, 100, heartbeat_interval=10):
            await trio.sleep(10.5)
    assert len(beats) == 100
    firsts = {times[0] for times in beats.values()}
    assert len(firsts) == 1  # all connected in the same instant
    (start,) = firsts
    offsets = [times[1] - start for times in beats.values()]
    assert all(0 < offset <= 10 for offset in offsets)
    per_second = [0] * 10
    for offset in offsets:
        per_second[min(int(offset), 9)] += 1
    # Uniform would be 10 per second; in step would be 100 in one of them.
    assert min(per_second) >= 3
    assert max(per_second) <= 20


async def test_without_jitter_a_fleet_beats_in_step(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_test_hub() as hub:
        beats = record_beats(hub, monkeypatch)
        async with agents(hub, 100, heartbeat_interval=10, heartbeat_jitter=0):
            await trio.sleep(10.5)
    assert len(beats) == 100
    assert len({times[1] for times in beats.values()}) == 1


def test_agents_without_an_rng_share_one_source_reseeded_in_a_forked_child() -> None:
    """One Mersenne Twister per process, not per agent (2.5 KiB each); a forked worker
    reseeds it, or every worker of a pre-fork server would jitter alike."""
    from artcafe_trio.agent import _agent

    key = generate_private_key()
    first, second = (
        _agent.build_agent(agent_id=name, organization_id="t", private_key=key)
        for name in ("a", "b")
    )
    assert first._sup.rng is second._sup.rng is _agent._SHARED_RNG
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next draw and leave at once
        os.write(write, repr(_agent._SHARED_RNG.random()).encode())
        os._exit(0)
    os.close(write)
    try:
        child_draw = float(os.read(read, 64))
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert child_draw != _agent._SHARED_RNG.random()
