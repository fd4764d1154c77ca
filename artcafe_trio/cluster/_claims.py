"""This hub's presence claims in the cluster: claim, release, watch (for the backplane).

:class:`ClaimKeeper` keeps the claim of each agent this hub owns (the epoch a release
writes at), queues releases (one per agent, in order) and writes them from a task,
retries a claim a NATS outage delayed, rewrites the online claims it keeps before
their TTL runs out (paced by a :class:`~._refresh.RefreshSchedule`), and turns every
other hub's claim change into ``peer.presence_observed`` — a claim of ours taken
over into ``peer.session_claimed``, and an online claim that expired (nobody
refreshed it: its hub is gone) into an offline ``hub_lost``.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Iterable

import attrs
import trio

from ..hub._backplane import BackplanePeer, PresenceUpdate, SessionClaim
from ..nats import KvOp, NatsError
from ._config import ClusterConfig
from ._records import (
    HUB_LOST,
    PRESENCE_PREFIX,
    PresenceClaim,
    expired_claim,
    parse_presence_key,
)
from ._refresh import RefreshSchedule, retry_delay
from ._store import ClusterContention, ClusterStore

__all__ = ["ClaimKeeper"]

log = logging.getLogger("artcafe_trio.cluster")

_Key = tuple[str, str]


class _Wakeup:
    """A flag one task waits on and others set (no queue: the state is elsewhere)."""

    def __init__(self) -> None:
        self._set = False
        self._lot = trio.lowlevel.ParkingLot()

    def set(self) -> None:
        self._set = True
        self._lot.unpark_all()

    async def wait(self) -> None:
        if self._set:
            await trio.lowlevel.checkpoint()
        while not self._set:
            await self._lot.park()
        self._set = False


class ClaimKeeper:
    """The presence half of :class:`~artcafe_trio.cluster.NatsBackplane`; bound to
    the hub, the store and the backplane's nursery by :meth:`bind` once running."""

    def __init__(
        self, config: ClusterConfig, hub_id: str, *, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.hub_id = hub_id
        self._wall_clock = wall_clock
        self._peer: BackplanePeer | None = None
        self._store: ClusterStore | None = None
        self._nursery: trio.Nursery | None = None
        #: This hub's claim per agent it owns (the epoch a release writes at).
        self._claims: dict[_Key, PresenceClaim] = {}
        #: Releases to write, in order, one per agent (the latest reason).
        self._releases: collections.OrderedDict[_Key, tuple[PresenceClaim, str]] = (
            collections.OrderedDict()
        )
        self._release_wake = _Wakeup()
        #: Agents whose claim is being retried (by session id), and an offline
        #: announced meanwhile (its reason): written once the claim lands.
        self._pending_claims: dict[_Key, str] = {}
        self._offline_while_pending: dict[_Key, str] = {}
        #: The newest claim the watch delivered per agent (one per agent of the cluster).
        self._latest: dict[_Key, PresenceClaim] = {}
        #: Claims a previous run of this hub left online are released at once as
        #: ``hub_lost`` (it crashed); set to a dict (that run drained) they are kept
        #: here instead, for :meth:`release_leftovers` after the grace.
        self.leftovers: dict[_Key, PresenceClaim] | None = None
        #: When each kept claim is rewritten (its TTL restarted).
        self._refresh: RefreshSchedule[_Key] = RefreshSchedule(config.claim_ttl)
        self._refresh_wake = _Wakeup()
        self.refreshes = 0  # claims rewritten to restart their TTL
        self.refresh_failures = 0  # refreshes that failed (tried again)
        self.expired = 0  # online claims seen expiring (reported offline hub_lost)
        #: The other live hubs' ids (set by the backplane, from their leases): the
        #: lowest id of them and this hub reports an expiry (its alerts).
        self.live_hubs: Callable[[], Iterable[str]] = tuple

    @property
    def claims_pending(self) -> bool:
        """Whether a local session's claim is being retried (not in the bucket yet)."""
        return bool(self._pending_claims)

    def bind(self, peer: BackplanePeer, store: ClusterStore, nursery: trio.Nursery) -> None:
        self._peer, self._store, self._nursery = peer, store, nursery

    async def claim_session(self, claim: SessionClaim) -> None:
        store = self._store
        if store is None:
            raise RuntimeError("the backplane is not running")
        key = (claim.tenant_id, claim.agent_id)
        written = await self._try_claim(store, claim)
        if written is None:
            # Served locally meanwhile (the cluster view of it is stale); retried.
            log.error("could not claim %s/%s in the cluster; retrying", *key)
            self._pending_claims[key] = claim.session_id
            assert self._nursery is not None
            self._nursery.start_soon(self._retry_claim, store, claim)
            return
        self._pending_claims.pop(key, None)  # an older session's retry stops
        self._offline_while_pending.pop(key, None)
        self._keep(key, written)

    async def _try_claim(self, store: ClusterStore, claim: SessionClaim) -> PresenceClaim | None:
        """One bounded claim attempt (``None``: it failed, or the session is gone)."""
        assert self._peer is not None
        described = self._peer.describe_session(claim.session_id)
        if described is None:
            return None
        capabilities, metadata = described
        try:
            with trio.fail_after(self.config.claim_timeout):
                return await store.claim(
                    claim.tenant_id, claim.agent_id, claim.session_id,
                    capabilities=capabilities, metadata=metadata,
                )  # fmt: skip
        except (NatsError, OSError, ClusterContention, trio.TooSlowError) as exc:
            log.warning("claim of %s/%s failed: %r", claim.tenant_id, claim.agent_id, exc)
            return None

    def _keep(self, key: _Key, written: PresenceClaim) -> None:
        latest = self._latest.get(key)
        if latest is not None and latest.epoch > written.epoch and latest.hub != self.hub_id:
            # Another hub claimed the agent while our claim was being acknowledged.
            assert self._peer is not None
            self._peer.session_claimed(
                SessionClaim(latest.tenant_id, latest.agent_id, latest.session_id or "", latest.hub)
            )
            return
        kept = self._claims.get(key)
        if kept is None or written.epoch > kept.epoch:
            self._claims[key] = written
            self._refresh.written(key, trio.current_time())
            self._refresh_wake.set()

    def _drop(self, key: _Key) -> PresenceClaim | None:
        """Stop keeping (and refreshing) the agent's claim; the claim kept, if any."""
        self._refresh.forget(key)
        return self._claims.pop(key, None)

    async def _retry_claim(self, store: ClusterStore, claim: SessionClaim) -> None:
        """Claim again (backing off) while the session lives. A claim that lands after
        its session ended — or an earlier attempt that landed late — is released."""
        key = (claim.tenant_id, claim.agent_id)
        assert self._peer is not None
        delay = 0.5
        written: PresenceClaim | None = None
        while self._pending_claims.get(key) == claim.session_id:
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)
            if self._peer.describe_session(claim.session_id) is None:
                try:
                    current = await store.get(*key)
                except NatsError:
                    continue
                if current is not None and current.session_id == claim.session_id:
                    written = current  # an earlier attempt landed after all
                break
            written = await self._try_claim(store, claim)
            if written is not None:
                break
        if self._pending_claims.get(key) != claim.session_id:
            return  # a newer local session claims now
        del self._pending_claims[key]
        reason = self._offline_while_pending.pop(key, None)
        if written is None:
            return
        if reason is None and self._peer.describe_session(claim.session_id) is not None:
            self._keep(key, written)
            log.warning("claimed %s/%s in the cluster after a retry", *key)
        else:
            self._releases[key] = (written, reason or "disconnected")
            self._release_wake.set()

    def announce_presence(self, update: PresenceUpdate) -> None:
        if update.status != "offline":
            return  # online was written by the session's claim
        key = (update.tenant_id, update.agent_id)
        if key in self._pending_claims:
            self._offline_while_pending[key] = update.reason
        claim = self._drop(key)
        if claim is None:
            return  # never claimed here, or taken over by another hub
        self._releases[key] = (claim, update.reason)
        self._releases.move_to_end(key)
        self._release_wake.set()

    async def watch(
        self, store: ClusterStore, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Every claim as it changes: another hub's is observed; one of ours taken
        over (or reaped) closes our session; an online claim that expired is an
        offline ``hub_lost``. At start, claims this hub id left online (a previous run
        killed) are released as ``hub_lost`` (kept in :attr:`leftovers` instead when
        that run drained)."""
        started = False
        async with store.kv.watch(PRESENCE_PREFIX + ">") as watcher:
            if watcher.caught_up:
                started = True
                task_status.started()
            async for entry in watcher:
                ids = parse_presence_key(entry.key)
                if ids is not None and entry.op is KvOp.PUT:
                    try:
                        claim = PresenceClaim.decode(entry.value)
                    except ValueError:
                        claim = None
                    if claim is not None:
                        self._claim_changed(ids, claim, initial=not started)
                elif ids is not None and entry.op is KvOp.EXPIRED:
                    moment = self._wall_clock() if entry.time is None else entry.time
                    self._claim_expired(ids, moment, initial=not started)
                if not started and watcher.caught_up:
                    started = True
                    task_status.started()

    def _claim_changed(self, key: _Key, claim: PresenceClaim, *, initial: bool) -> None:
        peer = self._peer
        assert peer is not None
        self._latest[key] = claim
        mine = claim.hub == self.hub_id
        reaped_elsewhere = claim.reaper is not None and claim.reaper != self.hub_id
        if mine and claim.reason != HUB_LOST and not reaped_elsewhere:
            if initial and claim.status == "online" and key not in self._claims:
                if self.leftovers is not None:
                    self.leftovers[key] = claim  # a drained run's: its agent may be back
                else:
                    self._releases[key] = (claim, HUB_LOST)  # a previous run's leftover
                    self._release_wake.set()
            return  # our own write
        kept = self._claims.get(key)
        if kept is not None and claim.epoch >= kept.epoch:
            self._drop(key)  # taken over (or reaped: our lease lapsed; or expired)
            peer.session_claimed(
                SessionClaim(claim.tenant_id, claim.agent_id, claim.session_id or "", claim.hub)
            )
        update = PresenceUpdate(
            tenant_id=claim.tenant_id, agent_id=claim.agent_id, status=claim.status,
            reason=claim.reason, time=claim.since, session_id=claim.session_id,
            hub_id=claim.hub, capabilities=claim.capabilities, metadata=claim.metadata,
            local=False, reaped_by=claim.reaper,
        )  # fmt: skip
        peer.presence_observed(update)

    def release_leftovers(self, reason: str) -> None:
        """Release, with ``reason``, the claims a drained previous run left online
        (each at its epoch: an agent claimed again since, here or elsewhere, is not
        touched)."""
        for key, claim in (self.leftovers or {}).items():
            if key not in self._releases:
                self._releases[key] = (claim, reason)
        self.leftovers = None
        self._release_wake.set()

    def _claim_expired(self, key: _Key, moment: float, *, initial: bool) -> None:
        """The agent's claim expired at ``moment``: nobody refreshed it. Online, it
        was owned by a hub that is gone (or, ours, not refreshed for half a TTL):
        reported as the reaper would have, offline ``hub_lost`` — each hub reports it
        to its own subscribers, once (a session of ours on it is closed, to claim
        again). The claim is forgotten either way."""
        latest = self._latest.pop(key, None)
        gone = None if latest is None else expired_claim(latest, now=moment)
        if gone is None:
            return  # an offline claim's expiry: nothing changes
        self.expired += 1
        # Every hub sees the expiry; one (the lowest live id, the same on every hub that
        # sees the same leases) reports it as the reaper would, for its alerts.
        gone = attrs.evolve(gone, reaper=min([self.hub_id, *self.live_hubs()]))
        log.info("the claim of %s/%s (hub %s) expired: offline %s", *key, gone.hub, HUB_LOST)
        self._claim_changed(key, gone, initial=initial)
        self._latest.pop(key, None)  # the bucket holds no claim of it now

    async def refresh_claims(self, store: ClusterStore) -> None:
        """Rewrite each kept claim when its schedule says (one at a time: about two
        writes per claim per TTL), until cancelled. A refresh that fails is tried
        again after :func:`~._refresh.retry_delay`, and nothing else is tried
        meanwhile; one that finds the claim no longer ours writes nothing (the watch
        reports what happened)."""
        schedule = self._refresh
        while True:
            due = schedule.next_due()
            with trio.move_on_at(math.inf if due is None else due):
                await self._refresh_wake.wait()
            while (key := schedule.pop_due(trio.current_time())) is not None:
                kept = self._claims.get(key)
                if kept is None:
                    continue
                started = trio.current_time()  # the new TTL starts after this
                try:
                    refreshed = await store.refresh(kept)
                except (NatsError, OSError, ClusterContention) as exc:
                    # NATS is away: the other due claims would fail too. One attempt
                    # per retry delay (not one per claim); the backlog goes once back.
                    self.refresh_failures += 1
                    log.warning("refresh of the claim of %s/%s failed (%r)", *key, exc)
                    if self._claims.get(key) is kept and key not in schedule:
                        schedule.failed(key, trio.current_time())
                    await trio.sleep(retry_delay(schedule.ttl))
                    break
                if refreshed:
                    self.refreshes += 1
                    if self._claims.get(key) is kept and key not in schedule:
                        schedule.written(key, started)

    async def write_releases(self, store: ClusterStore) -> None:
        while True:
            await self._release_wake.wait()
            await self.flush_releases(store)

    async def flush_releases(self, store: ClusterStore) -> None:
        """Write the queued releases in order; one is forgotten only once written (or
        after three failed attempts, logged), so a cancelled write is not lost."""
        while self._releases:
            key, queued = next(iter(self._releases.items()))
            for attempt in range(3):
                try:
                    await store.release(*queued)
                    break
                except (NatsError, OSError, ClusterContention) as exc:
                    log.warning("release of %s/%s failed (%r)", *key, exc)
                    await trio.sleep(0.2 * (attempt + 1))
            if self._releases.get(key) is queued:
                del self._releases[key]
