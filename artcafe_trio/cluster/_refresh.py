"""When a hub rewrites its online claims so their TTL never runs out (sans-IO).

A claim is written with the per-message TTL ``ttl`` (``ClusterConfig.claim_ttl``).
Its owner rewrites it once its age is between :data:`REFRESH_LOW` and
:data:`REFRESH_HIGH` of the TTL, at a point drawn at random for each write: a claim
costs about ``1 / 0.45`` writes per TTL, the claims of agents that arrived together
spread over a tenth of the TTL, and a refresh that fails is tried again every
:func:`retry_delay` during the half TTL left. Any other write of the claim (a new
session's claim) restarts its schedule: nothing is written per heartbeat, and a
claim written for another reason is not refreshed on top.

Nothing here imports trio or talks to NATS: times are whatever clock the caller
uses (:class:`~._claims.ClaimKeeper` uses trio's).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["REFRESH_HIGH", "REFRESH_LOW", "RefreshSchedule", "retry_delay"]

#: A claim is refreshed once this fraction of its TTL has passed, at the earliest...
REFRESH_LOW = 0.4
#: ... and at the latest (half of the TTL is left for retries).
REFRESH_HIGH = 0.5


K = TypeVar("K", bound=Hashable)


def retry_delay(ttl: float) -> float:
    """The wait before a failed refresh is tried again: a twentieth of the TTL,
    between 0.5 s and 10 s (a NATS leader election lasts seconds)."""
    return min(max(ttl / 20, 0.5), 10.0)


class RefreshSchedule(Generic[K]):
    """The next refresh of each claim a hub keeps (``key`` -> when), in time order.

    ``rng`` draws each claim's moment in ``[REFRESH_LOW, REFRESH_HIGH] × ttl`` after
    its write (seeded in tests)."""

    def __init__(self, ttl: float, *, rng: random.Random | None = None) -> None:
        self.ttl = ttl
        self._rng = rng or random.Random()
        self._due: dict[K, float] = {}
        #: (due, tie-breaker, key); an item whose due is no longer ``_due[key]`` is stale.
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: K) -> bool:
        return key in self._due

    def _at(self, key: K, due: float) -> None:
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._order), key))
        if len(self._heap) > 2 * len(self._due) + 64:  # stale items: rebuild
            self._heap = [(d, next(self._order), k) for k, d in self._due.items()]
            heapq.heapify(self._heap)

    def written(self, key: K, now: float) -> None:
        """``key``'s claim was written at ``now`` (its TTL restarted)."""
        self._at(key, now + self.ttl * self._rng.uniform(REFRESH_LOW, REFRESH_HIGH))

    def failed(self, key: K, now: float) -> None:
        """A refresh of ``key`` failed at ``now``: try again after :func:`retry_delay`."""
        self._at(key, now + retry_delay(self.ttl))

    def forget(self, key: K) -> None:
        """``key`` is no longer this hub's online claim (released, taken over)."""
        self._due.pop(key, None)

    def next_due(self) -> float | None:
        """When the earliest refresh is due (``None``: nothing to refresh)."""
        heap = self._heap
        while heap and self._due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> K | None:
        """The key of a refresh due at ``now`` (removed from the schedule: the caller
        reports :meth:`written` or :meth:`failed`), else ``None``."""
        due = self.next_due()
        if due is None or due > now:
            return None
        _, _, key = heapq.heappop(self._heap)
        del self._due[key]
        return key
