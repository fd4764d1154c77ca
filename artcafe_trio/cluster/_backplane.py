"""The hub's backplane over NATS: routes on core NATS, presence in key-value.

:class:`NatsBackplane` implements :class:`~artcafe_trio.hub._backplane.Backplane` on
the pieces of this package:

- **routes**: each (tenant, pattern) held by this hub's agents is one NATS
  subscription on ``ac.<tenant>.<pattern>``, made and dropped by a task of
  :meth:`~NatsBackplane.run` (:meth:`~NatsBackplane.interest` only records the wanted
  state, coalesced, and wakes it). A publish is published once (echo off) and
  flushed before it is confirmed; every copy that arrives, and every copy published
  here, goes through one :class:`RecentIds` filter, so a hub gets each publish once
  and a re-send through another hub after a failover is recognised. Answers to
  requests travel on ``ac.<tenant>.$reply.…``, which every hub subscribes to once.
- **presence** (:mod:`._claims`): a session's claim is a compare-and-set of its agent's key at
  ``epoch + 1`` (the claim kept); an offline transition queues a release at the
  kept epoch (a stale epoch writes nothing: no flap). Every hub watches every
  claim: another hub's change is ``peer.presence_observed`` (so each hub shows each
  transition once to its own subscribers) and a claim of ours that another hub took
  is ``peer.session_claimed`` (ours closed as replaced, no presence change).
  Claims carry a long TTL (``claim_ttl``), the online ones this hub keeps are
  rewritten before it runs out, and an online claim that expires (its hub is gone
  and nobody reaped it) is reported offline ``hub_lost`` by every hub.
- **hubs**: the hub's lease is held (a fenced hub logs it, reports its view as
  degraded (:meth:`~NatsBackplane.degraded`: the hub's status answer and metrics)
  and keeps serving; if a reaper marks its agents ``hub_lost`` the claim watch
  closes their sessions so they move); every lease is watched and a lost hub's
  agents are reaped after the disconnect grace by one hub. A graceful stop writes
  the queued releases and deletes the lease in a shielded ``finally``.
- **draining** (:meth:`~NatsBackplane.begin_drain`, :mod:`._drain`): a graceful
  stop leaves the agents it closes online for another live hub to take over or
  reap, unless this hub is the last one out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from ..hub._backplane import BackplanePeer, PresenceUpdate, Route, SessionClaim
from ..nats import KeyExistsError, NatsClient, NatsError, Subscription, open_nats
from ..protocol._keys import PublicKey
from ._claims import ClaimKeeper, _Wakeup
from ._config import ClusterConfig
from ._credentials import CredentialsMirror
from ._drain import Drain, holds_online
from ._reaper import run_reaper
from ._records import HubLease, PresenceClaim
from ._routes import RecentIds, RouteEnvelope, nats_subject, split_nats_subject
from ._store import ClusterStore, open_cluster_store

__all__ = ["DEGRADED_CLAIMS_PENDING", "DEGRADED_FENCED", "NatsBackplane"]

log = logging.getLogger("artcafe_trio.cluster")

#: Why a hub's cluster view is degraded (:meth:`NatsBackplane.degraded`).
DEGRADED_FENCED = "fenced"
DEGRADED_CLAIMS_PENDING = "claims_pending"

INTEREST_RETRY = 0.5  # seconds between attempts to apply interest while NATS is away

#: The subject every hub subscribes to once for answers to requests.
REPLY_SUBJECT = "ac.*.$reply.>"


class NatsBackplane:
    """A hub's share of a cluster over NATS (one per hub; see the module docstring).

    ``hub_id`` must be unique in the cluster; ``grace`` is the disconnect grace a
    reaper waits after a lost lease.
    """

    def __init__(
        self,
        config: ClusterConfig,
        *,
        hub_id: str,
        grace: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.hub_id = hub_id
        self.grace = grace
        self._wall_clock = wall_clock
        self._peer: BackplanePeer | None = None
        self._nc: NatsClient | None = None
        self._store: ClusterStore | None = None
        self._recent = RecentIds(window=config.dedupe_window, size=config.dedupe_size)
        #: NATS subject -> wanted (True) or not, not yet applied; coalesced.
        self._interest: dict[str, bool] = {}
        self._interest_wake = _Wakeup()
        self._interest_busy = False
        self._subs: dict[str, Subscription] = {}
        #: This hub's presence claims (counters: ``refreshes``, ``expired``).
        self.claims = ClaimKeeper(config, hub_id, wall_clock=wall_clock)
        self.claims.live_hubs = lambda: self._hub_urls.keys()
        self._nursery: trio.Nursery | None = None
        #: True while the lease could not be refreshed for a TTL (see ``hold_lease``).
        self.fenced = False
        self.routes_dropped = 0  # arriving copies already seen (overlaps, re-sends)
        self.routes_unsent = 0  # publishes NATS refused (local delivery only)
        self.routes_unconfirmed = 0  # publishes not flushed within flush_timeout
        self._started = wall_clock()
        advertised = config.advertise_url
        self._own_urls: tuple[str, ...] = (advertised.rstrip("/"),) if advertised else ()
        #: hub id -> the agent URLs in its live lease (not this hub's, not draining ones).
        self._hub_urls: dict[str, tuple[str, ...]] = {}
        self._drainer = Drain(self.claims, grace=grace, lease_ttl=config.lease_ttl)

    # --- Backplane -------------------------------------------------------------------

    async def run(
        self, peer: BackplanePeer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, hold the lease, start the watches; serve until cancelled, then hand
        over (releases written, lease deleted) within ``stop_timeout``.

        The NATS client must outlive the tasks for the handover, so the work runs
        shielded once started; a cancellation stops the tasks, then waits for it."""
        self._peer = peer
        tasks = trio.CancelScope()
        body = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._serve, body, tasks)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                tasks.cancel()
                body.deadline = trio.current_time() + self.config.stop_timeout + 1.0

    async def _serve(
        self,
        body: trio.CancelScope,
        tasks: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        cfg = self.config
        with body:
            async with open_nats(
                list(cfg.servers), name=f"artcafe-hub-{self.hub_id}", echo=False,
                user=cfg.user, password=cfg.password, token=cfg.token, tls=cfg.tls,
            ) as nc:  # fmt: skip
                self._nc = nc
                store = self._store = await open_cluster_store(
                    nc, self.hub_id, bucket=cfg.bucket, replicas=cfg.replicas,
                    api_timeout=cfg.api_timeout, claim_ttl=cfg.claim_ttl,
                    wall_clock=self._wall_clock,
                )  # fmt: skip
                leased = False
                try:
                    with tasks:
                        async with trio.open_nursery() as nursery:
                            self._nursery = nursery
                            assert self._peer is not None
                            self.claims.bind(self._peer, store, nursery)
                            await self._drainer.after_previous_run(store, nursery)
                            await nursery.start(self._hold_lease, store)
                            leased = True
                            await nursery.start(self.claims.watch, store)
                            await nursery.start(self._reap, store)
                            await nursery.start(self._watch_hubs, store)
                            if cfg.shared_credentials:
                                await _share_credentials(self._peer, store, nursery)
                            replies = await nc.subscribe(REPLY_SUBJECT)
                            nursery.start_soon(self._drain, replies)
                            nursery.start_soon(self._apply_interest, nc, nursery)
                            nursery.start_soon(self.claims.write_releases, store)
                            nursery.start_soon(self.claims.refresh_claims, store)
                            await nc.flush()
                            log.info("hub %s joined the cluster at %s", self.hub_id,
                                     nc.connected_server)  # fmt: skip
                            body.shield = True  # from now on, stopped through ``tasks``
                            task_status.started()
                finally:
                    if leased:
                        with trio.CancelScope(shield=True), trio.move_on_after(cfg.stop_timeout):
                            await self._drainer.hand_over(store, list(self._hub_urls))

    async def claim_session(self, claim: SessionClaim) -> None:
        await self.claims.claim_session(claim)

    def degraded(self) -> tuple[str, ...]:
        """Why this hub's view of the cluster is degraded, empty when it is not:
        ``fenced`` while its lease could not be refreshed for a lease TTL (other hubs
        may reap its agents; what it shows of the others may be stale), and
        ``claims_pending`` while a session's claim is being retried (the other hubs
        do not see that agent on this hub yet). The hub keeps serving either way."""
        reasons: list[str] = []
        if self.fenced:
            reasons.append(DEGRADED_FENCED)
        if self.claims.claims_pending:
            reasons.append(DEGRADED_CLAIMS_PENDING)
        return tuple(reasons)

    def connect_urls(self) -> tuple[str, ...]:
        urls: list[str] = []
        for hub in sorted(self._hub_urls):
            urls.extend(url for url in self._hub_urls[hub] if url not in urls)
        return tuple(urls)

    def advertise(self, url: str) -> None:
        """The URL the hub listens on, for its lease, unless ``advertise_url`` is set
        (written with the next refresh of the lease, within ``lease_ttl / 3``)."""
        if not self._own_urls:
            self._own_urls = (url.rstrip("/"),)

    def announce_presence(self, update: PresenceUpdate) -> None:
        self._drainer.announce(update, other_hubs=len(self._hub_urls))

    def begin_drain(self) -> None:  # see _drain.py
        self._drainer.begin()

    def holds_back(self, update: PresenceUpdate) -> bool:
        return holds_online(update, draining=self._drainer.draining, other_hubs=len(self._hub_urls))

    def interest(self, tenant_id: str, pattern: str, present: bool) -> None:
        self._interest[nats_subject(tenant_id, pattern)] = present
        self._interest_wake.set()

    async def publish_route(self, route: Route) -> str | None:
        envelope = RouteEnvelope(
            self.hub_id, route.message_id, route.sender, route.data_json, route.time,
            route.reply_to, route.publish_id, route.reply_from,
        )  # fmt: skip
        key = envelope.dedupe_key(route.tenant_id)
        earlier = self._recent.earlier(key, trio.current_time(), route.message_id)
        if earlier is not None:
            return earlier
        nc = self._nc
        if nc is None:
            raise RuntimeError("the backplane is not running")
        payload, headers = envelope.to_nats()
        try:
            await nc.publish(nats_subject(route.tenant_id, route.subject), payload, headers=headers)
            if not nc.is_connected:
                # Buffered for the reconnect: waiting for a flush would stall the
                # publisher's connection (its heartbeats too) for flush_timeout each time.
                self.routes_unconfirmed += 1
                return None
            with trio.move_on_after(self.config.flush_timeout) as scope:
                await nc.flush()
        except NatsError as exc:  # the reconnect buffer is full, or the client closed
            log.error("a publish reached local agents only: NATS refused it (%r)", exc)
            self.routes_unsent += 1
            return None
        if scope.cancelled_caught:
            log.error("NATS did not confirm a publish within %gs", self.config.flush_timeout)
            self.routes_unconfirmed += 1
        return None

    # --- tasks of run ---------------------------------------------------------------

    async def _hold_lease(
        self, store: ClusterStore, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the lease; a lease left by this hub's previous run (killed) is waited
        out (up to 2 × TTL + 2 s), then the id is taken as another live hub's: an error."""
        ttl = self.config.lease_ttl

        def lease() -> HubLease:
            return HubLease(self.hub_id, self._own_urls, self._started, self._drainer.draining)

        # The server removes an expired lease a little after its TTL (up to ~1.5 s
        # late measured with 1 s): wait two TTLs and 2 s before taking it as alive.
        deadline = trio.current_time() + 2 * ttl + 2.0
        while True:
            try:
                await store.hold_lease(
                    lease, ttl=ttl, on_fenced=self._on_fenced, task_status=task_status
                )
            except KeyExistsError:
                if trio.current_time() >= deadline:
                    raise
                log.warning("hub %s: a lease of this id exists; waiting for it", self.hub_id)
                await trio.sleep(ttl / 4)
            else:  # pragma: no cover - hold_lease returns only by raising
                return

    def _on_fenced(self, fenced: bool) -> None:
        self.fenced = fenced
        if fenced:
            log.error("hub %s fenced: other hubs may reap its agents; still serving", self.hub_id)

    async def _apply_interest(self, nc: NatsClient, nursery: trio.Nursery) -> None:
        """Make the NATS subscriptions what :meth:`interest` asked for."""
        while True:
            await self._interest_wake.wait()
            self._interest_busy = True
            try:
                while self._interest:
                    subject = next(iter(self._interest))
                    wanted = self._interest[subject]
                    sub = self._subs.get(subject)
                    if wanted and sub is None:
                        sub = self._subs[subject] = await nc.subscribe(subject)
                        nursery.start_soon(self._drain, sub)
                    elif not wanted and sub is not None:
                        del self._subs[subject]
                        await sub.unsubscribe()
                    if self._interest.get(subject) == wanted:
                        del self._interest[subject]  # applied (unless it changed meanwhile)
                with trio.move_on_after(self.config.flush_timeout):
                    await nc.flush()
            except NatsError as exc:
                # A NATS blip while (un)subscribing: what is not applied stays wanted and
                # is tried again; the client re-sends live subscriptions on reconnect.
                log.warning("hub %s: interest not applied yet (%r); retrying", self.hub_id, exc)
                await trio.sleep(INTEREST_RETRY)
                self._interest_wake.set()
            finally:
                self._interest_busy = False

    @property
    def interest_settled(self) -> bool:
        """Whether every interest change has been sent to NATS (tests, diagnostics)."""
        return not self._interest and not self._interest_busy

    async def _drain(self, sub: Subscription) -> None:
        """Hand each new routed copy of ``sub`` to the hub."""
        async for msg in sub:
            parts = split_nats_subject(msg.subject)
            if parts is None:
                continue
            tenant_id, subject = parts
            try:
                env = RouteEnvelope.from_nats(msg.data, msg.headers)
            except (ValueError, UnicodeDecodeError) as exc:
                log.warning("dropping a malformed route on %s: %s", msg.subject, exc)
                continue
            key = env.dedupe_key(tenant_id)
            if self._recent.earlier(key, trio.current_time(), env.message_id) is not None:
                self.routes_dropped += 1
                continue
            assert self._peer is not None
            route = Route(
                tenant_id, subject, env.data_json, env.sender, env.message_id, env.time,
                env.reply_to, env.publish_id, env.reply_from,
            )  # fmt: skip
            await self._peer.route_arrived(route)

    async def _watch_hubs(
        self, store: ClusterStore, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the other live hubs' URLs (for :meth:`connect_urls`) from their leases."""
        async with store.watch_leases() as leases:
            task_status.started()
            async for change in leases:
                if change.hub == self.hub_id:
                    continue
                if change.alive and change.lease is not None and not change.lease.draining:
                    self._hub_urls[change.hub] = change.lease.urls
                else:
                    self._hub_urls.pop(change.hub, None)

    async def _reap(
        self, store: ClusterStore, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Reap lost hubs (what is reaped reaches every hub through the claim watch)."""

        def reaped(hub: str, claims: list[PresenceClaim]) -> None:
            log.info("hub %s reaped hub %s: %d agent(s)", self.hub_id, hub, len(claims))

        await run_reaper(store, grace=self.grace, on_reaped=reaped, task_status=task_status)


async def _share_credentials(
    peer: BackplanePeer, store: ClusterStore, nursery: trio.Nursery
) -> None:
    """Mirror the bucket's credentials and have the hub authenticate from them."""
    mirror = CredentialsMirror(store.kv)
    await nursery.start(mirror.run)

    async def load() -> tuple[object, dict[tuple[str, str], tuple[PublicKey, ...]]]:
        await trio.lowlevel.checkpoint()
        return mirror.revision, mirror.credentials()

    peer.use_credentials(load)
