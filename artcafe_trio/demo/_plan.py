"""The demo's settings and timeline: what it stages, how long each stage takes, the
tolerances its checks allow."""

from __future__ import annotations

import math

import attrs

from artcafe_trio import Backoff

__all__ = ["Plan", "make_plan", "stage_estimates"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

TENANT = "demo"
MONITOR = "monitor"
HUNG = "hung-worker"
FLAKY = "flaky-worker"
LEAVER = "leaving-worker"
TASK_SUBJECT = "tasks.new"

MULTIPLIER = 3.0
"""Heartbeat timeout = interval x this (the library's default multiplier)."""
GRACE_INTERVALS = 2.0
"""The hub's disconnect grace, in heartbeat intervals."""
EARLY = 0.1
"""How much earlier than expected a detection may come (clock granularity)."""
LATE = 1.0
"""How much later than expected a detection may come."""
MIN_INTERVAL, MAX_INTERVAL = 0.1, 10.0
MAX_WORKERS = 100
MIN_PAUSE, DEFAULT_PAUSE = 0.5, 2.5
"""Seconds between stages: the least that keeps the story readable, and the default."""
SAMPLE_PERIOD = 0.02
"""How often the hub's presence table and each agent's health() are sampled."""
REDRAW_PERIOD = 0.25
CONNECT_BOUND = 15.0
"""The most the agents may take to come online."""
CLOSE_HANDSHAKE = 1.0
"""How long an agent waits for the close handshake of a connection it gives up: a hung
connection never answers it."""


# --------------------------------------------------------------------------- the plan


@attrs.frozen
class Plan:
    """The demo's settings and timeline (every duration in seconds)."""

    interval: float
    workers: int
    duration: float
    pause: float
    requested: float | None = None

    @property
    def multiplier(self) -> float:
        return MULTIPLIER

    @property
    def timeout(self) -> float:
        return self.interval * MULTIPLIER

    @property
    def grace(self) -> float:
        return self.interval * GRACE_INTERVALS

    @property
    def backoff(self) -> Backoff:
        return Backoff(base=self.interval / 2, cap=self.interval * 2, max_attempts=None)

    @property
    def stretched(self) -> bool:
        """True when the requested duration was too short for the stages."""
        return self.requested is not None and self.duration > self.requested + 1e-9


def stage_estimates(interval: float) -> dict[str, float]:
    """How long each stage takes, in seconds, before the pause that follows it."""
    timeout = interval * MULTIPLIER
    grace = interval * GRACE_INTERVALS
    base, cap = interval / 2, interval * 2
    return {
        "online": 0.5,
        "hang": timeout + CLOSE_HANDSHAKE + base,
        "blip": grace + 0.25,
        "outage": grace + interval + cap,
        "leave": 0.2,
    }


def make_plan(duration: float | None, workers: int, interval: float) -> Plan:
    """Validate the options and fit the timeline into ``duration``.

    Raises ``ValueError`` (a usage error) for options the demo cannot honour.
    A duration too short for the stages is stretched to the minimum (see
    :attr:`Plan.stretched`).
    """
    if not (math.isfinite(interval) and MIN_INTERVAL <= interval <= MAX_INTERVAL):
        raise ValueError(
            f"--interval must be between {MIN_INTERVAL:g} and {MAX_INTERVAL:g} seconds "
            f"for the demo, got {interval:g}"
        )
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"--agents must be between 1 and {MAX_WORKERS}, got {workers}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"--duration must be a positive number of seconds, got {duration:g}")
    busy = sum(stage_estimates(interval).values())
    pauses = 5  # after each of the five stages
    total: float
    if duration is None:
        total = math.ceil(busy + pauses * DEFAULT_PAUSE)
    else:
        total = max(duration, busy + pauses * MIN_PAUSE)
    return Plan(
        interval=interval,
        workers=workers,
        duration=total,
        pause=(total - busy) / pauses,
        requested=duration,
    )
