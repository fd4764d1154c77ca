"""Tests for artcafe_trio.protocol._backoff: exponential backoff with full jitter."""

from __future__ import annotations

import itertools
import math
import random

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from artcafe_trio import Backoff


def expected_delays(backoff: Backoff, seed: int, count: int) -> list[float]:
    """The documented formula, computed independently with a second Random(seed)."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        ceiling = min(backoff.cap, backoff.base * backoff.factor**n)
        out.append(rng.uniform(0, ceiling))
    return out


def test_defaults_match_the_brief() -> None:
    backoff = Backoff()
    assert backoff.base == 1.0
    assert backoff.factor == 2.0
    assert backoff.cap == 60.0
    assert backoff.max_attempts == 10
    assert backoff.jitter is True


@pytest.mark.parametrize("seed", [0, 1, 42, 2**40])
@pytest.mark.parametrize(
    "backoff",
    [
        Backoff(),
        Backoff(base=0.5, factor=3.0, cap=20.0, max_attempts=12),
        Backoff(base=0.1, factor=1.0, cap=5.0, max_attempts=3),
        Backoff(base=10.0, factor=2.0, cap=1.0, max_attempts=4),  # base above cap
    ],
    ids=["default", "base0.5-x3-cap20", "constant", "base-above-cap"],
)
def test_exact_delays_for_a_seeded_rng(backoff: Backoff, seed: int) -> None:
    assert backoff.max_attempts is not None
    delays = list(backoff.delays(random.Random(seed)))
    assert delays == expected_delays(backoff, seed, backoff.max_attempts)
    rng = random.Random(seed)
    one_by_one = [backoff.delay(n, rng) for n in range(backoff.max_attempts)]
    assert one_by_one == delays


def test_default_ceilings_double_then_cap() -> None:
    backoff = Backoff()
    assert [backoff.ceiling(n) for n in range(10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]


def test_full_jitter_spreads_over_the_whole_range() -> None:
    backoff = Backoff(base=1.0, factor=2.0, cap=60.0, max_attempts=None)
    rng = random.Random(7)
    samples = [backoff.delay(6, rng) for _ in range(2000)]
    assert min(samples) < 3.0  # not "ceiling/2 + jitter": full jitter reaches near 0
    assert max(samples) > 57.0
    assert all(0.0 <= s <= 60.0 for s in samples)
    assert len(set(samples)) > 1900  # no thundering herd: agents do not retry in step


@settings(max_examples=300, deadline=None)
@given(
    base=st.floats(min_value=1e-6, max_value=1e6),
    factor=st.floats(min_value=1.0, max_value=100.0),
    cap=st.floats(min_value=1e-6, max_value=1e6),
    n=st.integers(min_value=0, max_value=100_000),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_never_above_cap(base: float, factor: float, cap: float, n: int, seed: int) -> None:
    backoff = Backoff(base=base, factor=factor, cap=cap, max_attempts=None)
    ceiling = backoff.ceiling(n)
    assert 0.0 < ceiling <= cap
    assert math.isfinite(ceiling)
    try:
        raw = base * factor**n
    except OverflowError:
        raw = math.inf
    assert ceiling == min(cap, raw)
    delay = backoff.delay(n, random.Random(seed))
    assert 0.0 <= delay <= ceiling
    assert backoff.ceiling(n + 1) >= ceiling  # never shrinks
    assert attrs.evolve(backoff, jitter=False).delay(n, random.Random(seed)) == ceiling


@pytest.mark.parametrize("max_attempts", [1, 2, 10, 37])
def test_delays_yields_exactly_max_attempts(max_attempts: int) -> None:
    backoff = Backoff(max_attempts=max_attempts)
    delays = list(backoff.delays(random.Random(0)))
    assert len(delays) == max_attempts
    assert all(0.0 <= d <= backoff.cap for d in delays)


def test_delays_is_endless_without_max_attempts() -> None:
    backoff = Backoff(max_attempts=None)
    delays = list(itertools.islice(backoff.delays(random.Random(3)), 1000))
    assert len(delays) == 1000
    assert all(0.0 <= d <= backoff.cap for d in delays)
    assert delays == expected_delays(backoff, 3, 1000)


def test_delays_restart_from_zero_on_a_fresh_iterator() -> None:
    backoff = Backoff(base=1.0, jitter=False, max_attempts=3)
    assert list(backoff.delays(random.Random(0))) == [1.0, 2.0, 4.0]
    assert list(backoff.delays(random.Random(0))) == [1.0, 2.0, 4.0]


def test_no_jitter_gives_the_ceiling_and_draws_nothing() -> None:
    backoff = Backoff(base=0.5, factor=2.0, cap=10.0, max_attempts=7, jitter=False)
    rng = random.Random(5)
    state = rng.getstate()
    assert list(backoff.delays(rng)) == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert rng.getstate() == state


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": 0},
        {"base": 0.0},
        {"base": -1.0},
        {"base": math.nan},
        {"cap": 0},
        {"cap": -5.0},
        {"cap": math.nan},
        {"factor": 0.5},
        {"factor": 0.0},
        {"factor": -2.0},
        {"max_attempts": 0},
        {"max_attempts": -1},
    ],
    ids=repr,
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_negative_failures_are_refused() -> None:
    with pytest.raises(ValueError, match="failures"):
        Backoff().ceiling(-1)
    with pytest.raises(ValueError, match="failures"):
        Backoff().delay(-1, random.Random(0))


@pytest.mark.parametrize("n", [1024, 10_000, 10**6, 10**18, 10**100])
def test_huge_failure_counts_do_not_overflow(n: int) -> None:
    backoff = Backoff(base=1.0, factor=2.0, cap=60.0)
    assert backoff.ceiling(n) == 60.0
    assert 0.0 <= backoff.delay(n, random.Random(1)) <= 60.0
    assert Backoff(base=3.0, factor=1.0, cap=60.0).ceiling(n) == 3.0


def test_integer_settings_do_not_overflow() -> None:
    backoff = Backoff(base=1, factor=2, cap=30)
    assert backoff.ceiling(5000) == 30
    assert 0.0 <= backoff.delay(5000, random.Random(1)) <= 30


def test_backoff_is_frozen_and_comparable() -> None:
    backoff = Backoff()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        backoff.base = 2.0  # type: ignore[misc]
    assert Backoff() == backoff
    assert attrs.evolve(backoff, max_attempts=None).max_attempts is None
