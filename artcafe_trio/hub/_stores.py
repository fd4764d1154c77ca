"""Per-agent memory kept across sessions: publish ids seen (de-duplication) and
publish rate buckets. Both are bounded in time and pruned by the hub's housekeeping."""

from __future__ import annotations

import collections

from ._flow import TokenBucket

__all__ = ["BucketStore", "Dedupe", "DedupeStore"]


class Dedupe:
    """Recently seen publish ids of one agent, bounded in time and count."""

    def __init__(self, window: float, max_ids: int) -> None:
        self.window = window
        self.max_ids = max_ids
        self.seen: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()

    def lookup(self, frame_id: str, now: float) -> str | None:
        while self.seen:
            oldest = next(iter(self.seen.values()))
            if now - oldest[0] <= self.window and len(self.seen) <= self.max_ids:
                break
            self.seen.popitem(last=False)
        hit = self.seen.get(frame_id)
        return hit[1] if hit else None

    def remember(self, frame_id: str, message_id: str, now: float) -> None:
        self.seen[frame_id] = (now, message_id)


class DedupeStore:
    """The de-duplication store: one :class:`Dedupe` per agent (kept across its sessions,
    so a publish re-sent after a reconnect is answered ``duplicate``)."""

    def __init__(self, window: float, max_ids: int) -> None:
        self.window = window
        self.max_ids = max_ids
        self._caches: dict[tuple[str, str], Dedupe] = {}

    def __len__(self) -> int:
        return len(self._caches)

    def cache(self, tenant_id: str, agent_id: str) -> Dedupe:
        key = (tenant_id, agent_id)
        cache = self._caches.get(key)
        if cache is None:
            cache = self._caches[key] = Dedupe(self.window, self.max_ids)
        return cache

    def prune(self, now: float) -> None:
        """Forget the caches of agents that published nothing within the window."""
        window = self.window
        self._caches = {
            key: cache
            for key, cache in self._caches.items()
            if cache.seen and now - next(reversed(cache.seen.values()))[0] <= window
        }


class BucketStore:
    """Publish rate buckets, one per agent, kept across its sessions."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, tenant_id: str, agent_id: str) -> TokenBucket:
        key = (tenant_id, agent_id)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket

    def prune(self, now: float) -> None:
        """Forget the buckets that have refilled (a new bucket would be the same)."""
        self._buckets = {
            key: bucket for key, bucket in self._buckets.items() if not bucket.is_full(now)
        }
