"""A deadline queue driven by one task: the hub's presence timers.

Each watched object has a deadline that may move later at any time without
touching the queue (a heartbeat only writes a float). The queue holds one
entry per watched object; when an entry comes due, the object's ``expire``
method says whether it really expired (``None``) or returns its new deadline,
which is pushed back. One sleeping task, whose cancel-scope deadline is the
earliest entry, fires every expiry at the moment it is due: no periodic scan.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Protocol

import trio

__all__ = ["DeadlineQueue", "Expirable"]


class Expirable(Protocol):
    def expire(self, now: float) -> float | None:
        """Called when a deadline is due: act and return ``None``, or return a later deadline."""


class DeadlineQueue:
    """One-task timer wheel for objects whose deadlines only move later."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Expirable]] = []
        self._counter = itertools.count()
        self._scope: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, deadline: float, item: Expirable) -> None:
        """Watch ``item`` until ``deadline`` (call once per item; later moves are free)."""
        heapq.heappush(self._heap, (deadline, next(self._counter), item))
        if self._scope is not None and deadline < self._scope.deadline:
            self._scope.deadline = deadline

    async def run(self) -> None:
        """Fire expiries forever (run it as a task)."""
        while True:
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                _, _, item = heapq.heappop(self._heap)
                later = item.expire(now)
                if later is not None:
                    heapq.heappush(self._heap, (later, next(self._counter), item))
            with trio.CancelScope(deadline=self._heap[0][0] if self._heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
