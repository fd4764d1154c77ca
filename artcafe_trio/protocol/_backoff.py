"""Reconnect backoff: exponential growth with full jitter.

``delay(n) = uniform(0, min(cap, base * factor ** n))`` for the ``n``-th
consecutive failure (``n`` from 0), as in "Exponential Backoff and Jitter"
(AWS Architecture Blog, 2015). Randomness is injected so tests are exact.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import attrs

__all__ = ["Backoff"]


def _positive(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


@attrs.frozen
class Backoff:
    """How long to wait between reconnection attempts, and when to give up.

    ``max_attempts`` is the number of consecutive failed reconnection attempts
    after which the agent raises ``ReconnectFailed``; ``None`` retries forever.
    Each attempt is preceded by a delay drawn by :meth:`delay`.
    ``jitter=False`` gives the plain exponential ceiling (for comparisons in
    benchmarks; never use it in production: every agent would retry in step).
    """

    base: float = attrs.field(default=1.0, validator=_positive)
    factor: float = attrs.field(default=2.0)
    cap: float = attrs.field(default=60.0, validator=_positive)
    max_attempts: int | None = 10
    jitter: bool = True

    def __attrs_post_init__(self) -> None:
        if not math.isfinite(self.base) or not math.isfinite(self.cap):
            raise ValueError("base and cap must be finite")
        if not self.factor >= 1 or not math.isfinite(self.factor):
            raise ValueError(f"factor must be >= 1, got {self.factor!r}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {self.max_attempts!r}")

    def ceiling(self, failures: int) -> float:
        """Upper bound of the delay after ``failures`` consecutive failures (0-based)."""
        if failures < 0:
            raise ValueError("failures must be >= 0")
        try:
            raw = self.base * self.factor**failures
        except OverflowError:
            return self.cap
        return min(self.cap, raw)

    def delay(self, failures: int, rng: random.Random) -> float:
        """The delay to wait after ``failures`` consecutive failures (0-based)."""
        ceiling = self.ceiling(failures)
        return rng.uniform(0.0, ceiling) if self.jitter else ceiling

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The wait before each reconnection attempt: ``max_attempts`` of them.

        Endless when ``max_attempts`` is ``None``. The agent waits ``delays[n]``
        before its ``n+1``-th consecutive attempt and gives up when the last one fails.
        """
        failures = 0
        while self.max_attempts is None or failures < self.max_attempts:
            yield self.delay(failures, rng)
            failures += 1
