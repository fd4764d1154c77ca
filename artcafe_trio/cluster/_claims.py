"""This hub's presence claims in the cluster: claim, release, watch (for the backplane).

:class:`ClaimKeeper` keeps the claim of each agent this hub owns (the epoch a release
writes at), queues releases (one per agent, in order) and writes them from a task,
retries a claim a NATS outage delayed, and turns every other hub's claim change into
``peer.presence_observed`` — and a claim of ours taken over into
``peer.session_claimed``.
"""

from __future__ import annotations

import collections
import logging

import trio

from ..hub._backplane import BackplanePeer, PresenceUpdate, SessionClaim
from ..nats import KvOp, NatsError
from ._config import ClusterConfig
from ._records import HUB_LOST, PRESENCE_PREFIX, PresenceClaim, parse_presence_key
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

    def __init__(self, config: ClusterConfig, hub_id: str) -> None:
        self.config = config
        self.hub_id = hub_id
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
        claim = self._claims.pop(key, None)
        if claim is None:
            return  # never claimed here, or taken over by another hub
        self._releases[key] = (claim, update.reason)
        self._releases.move_to_end(key)
        self._release_wake.set()

    async def watch(
        self, store: ClusterStore, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Every claim as it changes: another hub's is observed; one of ours taken
        over (or reaped) closes our session. At start, claims this hub id left online
        (a previous run killed) are released as ``hub_lost``."""
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
                if not started and watcher.caught_up:
                    started = True
                    task_status.started()

    def _claim_changed(self, key: _Key, claim: PresenceClaim, *, initial: bool) -> None:
        peer = self._peer
        assert peer is not None
        self._latest[key] = claim
        mine = claim.hub == self.hub_id
        if mine and claim.reason != HUB_LOST:
            if initial and claim.status == "online" and key not in self._claims:
                self._releases[key] = (claim, HUB_LOST)  # a previous run's leftover
                self._release_wake.set()
            return  # our own write
        kept = self._claims.get(key)
        if kept is not None and claim.epoch >= kept.epoch:
            del self._claims[key]  # taken over (or reaped: our lease lapsed)
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
