"""The cluster's presence claims and hub leases in a JetStream key-value bucket.

Every write is a compare-and-set on the key's last revision
(:meth:`~artcafe_trio.nats.KeyValue.update`), retried from a fresh read when another
hub wrote in between; the rules of what to write are the pure functions of
:mod:`._records`. Every claim is written with the store's ``claim_ttl`` (a backstop:
see :mod:`._records`). Writes are O(agents' transitions), O(agents / claim TTL)
for the refreshes of online claims and O(hubs) for leases, never one per heartbeat.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from ..nats import (
    KeyExistsError,
    KeyValue,
    KvEntry,
    KvOp,
    NatsClient,
    NatsError,
    WrongLastRevisionError,
)
from ._records import (
    HUB_LOST,
    LEASE_PREFIX,
    PRESENCE_PREFIX,
    HubLease,
    PresenceClaim,
    lease_key,
    next_claim,
    parse_presence_key,
    presence_key,
    reap_claim,
    reaper_key,
    refresh_claim,
    release_claim,
)

__all__ = [
    "ClusterStore",
    "LeaseChange",
    "MAX_CAS_ATTEMPTS",
    "open_cluster_store",
]

log = logging.getLogger("artcafe_trio.cluster")

#: Compare-and-set attempts before a write gives up (each one lost to another hub).
MAX_CAS_ATTEMPTS = 16


class ClusterContention(RuntimeError):
    """A key changed under every one of :data:`MAX_CAS_ATTEMPTS` writes."""


@attrs.frozen
class LeaseChange:
    """A hub's lease appeared (``alive``) or went away: expired, deleted or purged."""

    hub: str
    alive: bool
    revision: int
    lease: HubLease | None
    expired: bool = False


def _claim_of(entry: KvEntry | None) -> PresenceClaim | None:
    if entry is None or entry.op is not KvOp.PUT:
        return None
    try:
        return PresenceClaim.decode(entry.value)
    except ValueError as exc:  # a foreign or corrupt value: treated as absent, logged
        log.warning("ignoring an unreadable presence claim at %s: %s", entry.key, exc)
        return None


class ClusterStore:
    """Presence claims and leases of one hub (``hub_id``) in the cluster bucket.

    Obtain one with :func:`open_cluster_store`; ``wall_clock`` stamps ``since``;
    every claim is written with ``claim_ttl`` (``None``: claims never expire).
    """

    def __init__(
        self,
        kv: KeyValue,
        hub_id: str,
        *,
        claim_ttl: float | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.kv = kv
        self.hub_id = hub_id
        self.claim_ttl = claim_ttl
        self._wall_clock = wall_clock

    async def _cas(
        self,
        key: str,
        change: Callable[[PresenceClaim | None, int], PresenceClaim | None],
        *,
        new_epoch: bool = False,
    ) -> PresenceClaim | None:
        """Apply ``change`` to the key's claim by compare-and-set until it lands or
        ``change`` says there is nothing to write (``None``); returns what was written.

        When the key holds no claim, ``change`` also gets a revision a new epoch must
        go above (else 0): that of what the key holds (an expiry marker, an
        unreadable value), or — ``new_epoch``, a key with nothing at all (never
        written, or its expiry marker gone too) — the bucket's last revision."""
        ttl = self.claim_ttl
        for _ in range(MAX_CAS_ATTEMPTS):
            entry = await self.kv.entry(key)
            current = _claim_of(entry)
            above = 0
            if entry is not None and current is None:
                above = entry.revision
            elif entry is None and new_epoch:
                above = await self.kv.last_revision()
            new = change(current, above)
            if new is None:
                return None
            try:
                if entry is None:
                    await self.kv.create(key, new.encode(), ttl=ttl)
                else:
                    await self.kv.update(key, new.encode(), last=entry.revision, ttl=ttl)
            except (WrongLastRevisionError, KeyExistsError):
                await trio.lowlevel.checkpoint()
                continue
            return new
        raise ClusterContention(f"{key} changed under {MAX_CAS_ATTEMPTS} writes in a row")

    async def claim(
        self,
        tenant_id: str,
        agent_id: str,
        session_id: str,
        *,
        capabilities: tuple[str, ...] = (),
        metadata: dict[str, Any] | None = None,
    ) -> PresenceClaim:
        """Make this hub the owner of the agent at the next epoch (a take-over when
        another hub owned it: that hub sees the key change and closes its session)."""
        now = self._wall_clock()
        written = await self._cas(
            presence_key(tenant_id, agent_id),
            lambda current, above: next_claim(
                current, tenant_id=tenant_id, agent_id=agent_id, hub=self.hub_id,
                session_id=session_id, now=now, capabilities=capabilities, metadata=metadata,
                above=above,
            ),
            new_epoch=True,
        )  # fmt: skip
        assert written is not None  # next_claim always writes
        return written

    async def release(self, claim: PresenceClaim, reason: str) -> bool:
        """Mark the agent offline with ``reason`` if this hub still owns it at
        ``claim.epoch``; ``False`` (nothing written) when another hub took over."""
        now = self._wall_clock()
        written = await self._cas(
            presence_key(claim.tenant_id, claim.agent_id),
            lambda current, _: release_claim(
                current, hub=self.hub_id, epoch=claim.epoch, reason=reason, now=now
            ),
        )
        return written is not None

    async def refresh(self, claim: PresenceClaim) -> bool:
        """Rewrite the agent's claim unchanged (its TTL restarts) if this hub still owns
        it online at ``claim.epoch``; ``False`` (nothing written) otherwise."""
        written = await self._cas(
            presence_key(claim.tenant_id, claim.agent_id),
            lambda current, _: refresh_claim(current, hub=self.hub_id, epoch=claim.epoch),
        )
        return written is not None

    async def get(self, tenant_id: str, agent_id: str) -> PresenceClaim | None:
        return _claim_of(await self.kv.entry(presence_key(tenant_id, agent_id)))

    async def snapshot(self) -> dict[tuple[str, str], PresenceClaim]:
        """Every agent's claim, as of one moment of the bucket. A watch reads it, whose
        consumer may sit on a replica a few milliseconds behind the stream's leader: a
        write acknowledged just before may be missing (``get`` reads the leader)."""
        claims: dict[tuple[str, str], PresenceClaim] = {}
        async with self.kv.watch(PRESENCE_PREFIX + ">") as watcher:
            while not watcher.caught_up:  # set with the last initial value (or if none)
                entry = await watcher.__anext__()
                ids = parse_presence_key(entry.key)
                claim = _claim_of(entry)
                if ids is None:
                    continue
                if claim is None:
                    claims.pop(ids, None)
                else:
                    claims[ids] = claim
        return claims

    async def reap(self, lost_hub: str, *, reason: str = HUB_LOST) -> list[PresenceClaim]:
        """Mark offline (``reason``) every agent ``lost_hub`` still owns online;
        an agent another hub claimed meanwhile is left alone. Returns what was written."""
        now = self._wall_clock()
        reaped: list[PresenceClaim] = []
        for (tenant_id, agent_id), claim in (await self.snapshot()).items():
            if claim.hub != lost_hub or claim.status != "online":
                continue
            written = await self._cas(
                presence_key(tenant_id, agent_id),
                functools.partial(
                    _reaped, lost_hub=lost_hub, now=now, reaper=self.hub_id, reason=reason,
                    epoch=claim.epoch,  # a newer claim (the agent back meanwhile): left alone
                ),
            )  # fmt: skip
            if written is not None:
                reaped.append(written)
        return reaped

    async def elect_reaper(self, lost_hub: str, lease_revision: int, *, ttl: float) -> bool:
        """Whether this hub won the right to reap ``lost_hub``'s lease
        ``lease_revision`` (create-if-absent; the key expires after ``ttl``)."""
        try:
            await self.kv.create(
                reaper_key(lost_hub, lease_revision), self.hub_id.encode(), ttl=ttl
            )
        except KeyExistsError:
            return False
        return True

    async def hold_lease(
        self,
        lease: HubLease | Callable[[], HubLease],
        *,
        ttl: float,
        on_fenced: Callable[[bool], None] | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Write this hub's lease with ``ttl`` and refresh it every ``ttl / 3`` until
        cancelled; ``task_status.started`` gets the first revision. ``lease`` may be a
        function: each refresh then writes what it returns (the hub's URLs, known once
        it listens).

        Each refresh is bounded by ``ttl / 3``. When no refresh has succeeded for
        ``ttl`` (NATS unreachable, quorum lost, this process frozen) the lease may
        have expired and other hubs may be reaping: ``on_fenced(True)`` is called
        once, and the hub must stop claiming to own its agents. When a refresh
        succeeds again (the lease written anew if it expired) ``on_fenced(False)``.
        A lease another process wrote under this hub's id is taken back, loudly.
        """
        key = lease_key(self.hub_id)
        current = lease if callable(lease) else (lambda: lease)
        value = current().encode()
        try:
            revision = await self.kv.create(key, value, ttl=ttl)
        except KeyExistsError:
            log.error("hub id %r already holds a lease: another hub runs with this id", key)
            raise
        task_status.started(revision)
        last_ok = trio.current_time()
        fenced = False
        while True:
            await trio.sleep(ttl / 3)
            value = current().encode()
            refreshed: int | None = None
            with trio.move_on_after(ttl / 3):
                try:
                    refreshed = await self._refresh(key, value, revision, ttl)
                except (NatsError, OSError) as exc:
                    log.warning("could not refresh the lease %s: %s", key, exc)
            now = trio.current_time()
            if refreshed is not None:
                revision, last_ok = refreshed, now
                if fenced:
                    fenced = False
                    log.warning("the lease %s is held again", key)
                    if on_fenced is not None:
                        on_fenced(False)
            elif not fenced and now - last_ok >= ttl:
                fenced = True
                log.error("the lease %s was not refreshed for %g s: fenced", key, ttl)
                if on_fenced is not None:
                    on_fenced(True)

    async def _refresh(self, key: str, value: bytes, revision: int, ttl: float) -> int:
        try:
            return await self.kv.update(key, value, last=revision, ttl=ttl)
        except WrongLastRevisionError:
            entry = await self.kv.entry(key)
            if entry is not None and entry.op is KvOp.PUT:
                log.error("the lease %s changed under this hub; writing it again", key)
            # Expired (or deleted) while we could not refresh: write a new one.
            return await self.kv.update(key, value, last=entry.revision if entry else 0, ttl=ttl)

    async def drop_lease(self) -> None:
        """Delete this hub's lease (a graceful shutdown: no waiting for the TTL)."""
        await self.kv.delete(lease_key(self.hub_id))

    @asynccontextmanager
    async def watch_leases(self) -> AsyncIterator[AsyncIterator[LeaseChange]]:
        """Every lease as it is now, then each change; an expiry is reported with
        ``expired=True`` the moment the server's TTL marker arrives."""
        async with self.kv.watch(LEASE_PREFIX + "*") as watcher:

            async def changes() -> AsyncIterator[LeaseChange]:
                async for entry in watcher:
                    hub = entry.key[len(LEASE_PREFIX) :]
                    if entry.op is KvOp.PUT:
                        try:
                            lease = HubLease.decode(entry.value)
                        except ValueError as exc:
                            log.warning("ignoring an unreadable lease at %s: %s", entry.key, exc)
                            continue
                        yield LeaseChange(hub, True, entry.revision, lease)
                    else:
                        yield LeaseChange(
                            hub, False, entry.revision, None, expired=entry.op is KvOp.EXPIRED
                        )

            yield changes()


async def open_cluster_store(
    nc: NatsClient,
    hub_id: str,
    *,
    bucket: str = "artcafe_cluster",
    replicas: int = 3,
    marker_ttl: float = 60.0,
    api_timeout: float = 5.0,
    claim_ttl: float | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> ClusterStore:
    """Bind (creating if needed) the cluster bucket with per-key TTLs and expiry
    markers, replicated ``replicas`` times, as hub ``hub_id``; every JetStream call
    on it fails after ``api_timeout`` s; claims are written with ``claim_ttl``."""
    kv = await nc.key_value(
        bucket, history=1, replicas=replicas, limit_marker_ttl=marker_ttl,
        api_timeout=api_timeout,
    )  # fmt: skip
    return ClusterStore(kv, hub_id, claim_ttl=claim_ttl, wall_clock=wall_clock)


def _reaped(
    current: PresenceClaim | None,
    _revision: int,
    *,
    lost_hub: str,
    now: float,
    reaper: str,
    reason: str,
    epoch: int,
) -> PresenceClaim | None:
    """:func:`reap_claim` as a compare-and-set update (``None``: nothing to write)."""
    if current is None:
        return None
    return reap_claim(
        current, lost_hub=lost_hub, now=now, reaper=reaper, reason=reason, epoch=epoch
    )
