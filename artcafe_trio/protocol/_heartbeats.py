"""The agent's heartbeat schedule: a random phase, then jittered periods (sans-IO).

The first heartbeat of a connection goes out at once (it proves the connection);
:func:`heartbeat_delays` yields the wait before each later one. With
``jitter == 0`` every wait is exactly ``interval`` (a fleet that connects at once
beats in step). With ``jitter > 0``:

- the wait before the second heartbeat is ``interval * (1 - u)``, ``u`` uniform in
  ``[0, 1)``: a random phase in ``(0, interval]``, so agents that connected in the
  same instant spread their beats over a whole interval;
- every later wait is ``interval * uniform(1 - period_jitter, 1 + period_jitter)``:
  the mean rate is unchanged and phases keep drifting apart.

No wait exceeds ``interval * (1 + period_jitter)``. The agent caps
``period_jitter`` at half the slack its timeout leaves (see
:func:`period_jitter`), so a heartbeat always reaches the hub at least
``(multiplier - 1) / 2`` intervals before either side's deadline.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["MAX_HEARTBEAT_JITTER", "heartbeat_delays", "period_jitter"]

MAX_HEARTBEAT_JITTER = 0.5


def period_jitter(jitter: float, interval: float, timeout: float | None) -> float:
    """The per-period jitter for one connection: ``jitter``, but never more than half
    of ``timeout / interval - 1`` (the slack the deadline leaves over one interval)."""
    if timeout is None:
        return jitter
    return max(0.0, min(jitter, (timeout / interval - 1) / 2))


def heartbeat_delays(
    interval: float, jitter: float, rng: random.Random, *, period: float | None = None
) -> Iterator[float]:
    """The waits between consecutive heartbeats of one connection, endlessly.

    ``jitter`` (0 to :data:`MAX_HEARTBEAT_JITTER`) turns the random phase on when
    positive; ``period`` is the per-period jitter (default ``jitter``), e.g. as
    capped by :func:`period_jitter`. ``rng`` is drawn once per wait, lazily.
    """
    if jitter == 0:
        while True:
            yield interval
    spread = jitter if period is None else period
    yield interval * (1.0 - rng.random())
    while True:
        yield interval * rng.uniform(1.0 - spread, 1.0 + spread)
