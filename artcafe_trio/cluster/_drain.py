"""A hub's graceful stop in the cluster: draining (for the backplane).

A stopping hub closes its agents with 1012 ("reconnect elsewhere"). Releasing their
claims at once would show every agent offline, then online again a moment later on
another hub: the flap users see on every deploy. So :class:`Drain`, once
:meth:`~Drain.begin` is called, holds back those ``disconnected`` transitions while
another live hub exists (:func:`holds_online`): the claims stay online, owned by the
stopping hub, the agents claim them elsewhere at a newer epoch, and the one reaper of
the deleted lease marks the rest ``disconnected`` after the grace.

At the handover (:meth:`~Drain.hand_over`) the hub makes sure its lease says
``draining``, then reads the other hubs' leases from the bucket (the lease watch may
lag). With none live and not draining it is the last one out: it releases what it
held back and reaps what the other hubs left online, since no reaper is left.
Write-then-read: of hubs stopping together, the last to read sees every other one
draining.

A hub restarted after its previous run drained releases that run's leftovers after
the grace (:meth:`~Drain.after_previous_run`), unless claimed again meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import attrs
import trio

from ..hub._backplane import PresenceUpdate
from ..nats import KvEntry, KvOp, NatsError, WrongLastRevisionError
from ._claims import ClaimKeeper
from ._reaper import DISCONNECTED
from ._records import HUB_LOST, HubLease, lease_key
from ._store import ClusterContention, ClusterStore

__all__ = ["Drain", "holds_online", "lease_state", "release_leftovers_after"]

log = logging.getLogger("artcafe_trio.cluster")


def holds_online(update: PresenceUpdate, *, draining: bool, other_hubs: int) -> bool:
    """Whether a draining hub keeps ``update``'s agent online in the cluster rather
    than releasing it: the ``disconnected`` of a session its stop closed, while
    ``other_hubs`` live (non-draining) hubs can take the agent over or reap it. A
    ``left`` or ``timeout`` is released as always."""
    closed_by_stop = update.status == "offline" and update.reason == DISCONNECTED
    return draining and other_hubs > 0 and closed_by_stop


def lease_state(entry: KvEntry | None) -> str:
    """A hub's lease as read: ``live``, ``draining``, ``expired`` or ``gone``."""
    if entry is not None and entry.op is KvOp.EXPIRED:
        return "expired"
    if entry is None or entry.op is not KvOp.PUT:
        return "gone"
    try:
        return "draining" if HubLease.decode(entry.value).draining else "live"
    except ValueError:
        return "gone"  # unreadable: not a hub to count on


class Drain:
    """The draining state of one hub: the hub's ``presence`` claims, its disconnect
    ``grace`` and ``lease_ttl`` (see the module docstring)."""

    def __init__(self, presence: ClaimKeeper, *, grace: float, lease_ttl: float) -> None:
        self.hub_id = presence.hub_id
        self.presence = presence
        self.grace = grace
        self.lease_ttl = lease_ttl
        #: A graceful stop began (:meth:`begin`); the lease says so from its next write.
        self.draining = False
        #: Offline transitions held back while draining.
        self.held: list[PresenceUpdate] = []

    def begin(self) -> None:
        self.draining = True

    def announce(self, update: PresenceUpdate, *, other_hubs: int) -> None:
        """Hand ``update`` to the claims, unless it is held back (:func:`holds_online`)."""
        if holds_online(update, draining=self.draining, other_hubs=other_hubs):
            self.held.append(update)  # the agent reconnects elsewhere, or is reaped
        else:
            self.presence.announce_presence(update)

    async def after_previous_run(self, store: ClusterStore, nursery: trio.Nursery) -> None:
        """At start, before the claim watch: if this hub's previous run drained (its
        lease was deleted, not expired), what it left online is kept for the grace
        (its agents may be reconnecting, here or elsewhere), then released."""
        previous = await store.kv.entry(lease_key(self.hub_id))
        if previous is not None and previous.op is KvOp.DELETE:
            self.presence.leftovers = {}
            nursery.start_soon(release_leftovers_after, self.presence, self.grace)

    async def hand_over(self, store: ClusterStore, live_hubs: Iterable[str]) -> None:
        """A stop's handover (graceful or not): the queued releases, and, when this
        hub is the last one out (none of ``live_hubs``, the hubs the lease watch last
        saw live, is live now), the held-back ones and what the other hubs left
        online; then the lease deleted (the other hubs reap what is left after the
        grace). A NATS error leaves the rest to the lease's expiry."""
        try:
            await self._hand_over(store, live_hubs)
            await store.drop_lease()
        except (NatsError, OSError, ClusterContention) as exc:
            log.error("hub %s: handover incomplete (%r); the lease will expire", self.hub_id, exc)

    async def _hand_over(self, store: ClusterStore, live_hubs: Iterable[str]) -> None:
        held, self.held = self.held, []
        alone = True
        if self.draining:
            await self._confirm_draining(store)
            for hub in sorted(live_hubs):
                if lease_state(await store.kv.entry(lease_key(hub))) == "live":
                    alone = False
        if alone:
            for update in held:
                self.presence.announce_presence(update)
            # What a drained previous run of this hub left online, not claimed again
            # yet: nobody else is left to release it after the grace.
            self.presence.release_leftovers(DISCONNECTED)
        elif held:
            log.info("hub %s drained: %d agent(s) left online to reconnect elsewhere",
                     self.hub_id, len(held))  # fmt: skip
        await self.presence.flush_releases(store)
        if alone and self.draining:
            await self._reap_others(store)

    async def _confirm_draining(self, store: ClusterStore) -> None:
        """Make sure the lease says ``draining`` before the others are read (a refresh
        may not have written it yet)."""
        key = lease_key(self.hub_id)
        entry = await store.kv.entry(key)
        if entry is None or entry.op is not KvOp.PUT or lease_state(entry) != "live":
            return
        lease = attrs.evolve(HubLease.decode(entry.value), draining=True)
        with contextlib.suppress(WrongLastRevisionError):  # rewritten meanwhile: ours
            await store.kv.update(key, lease.encode(), last=entry.revision, ttl=self.lease_ttl)

    async def _reap_others(self, store: ClusterStore) -> None:
        """The last one out: what other hubs left online goes offline (``disconnected``;
        ``hub_lost`` for an expired lease). One snapshot, one reap per such hub."""
        claims = await store.snapshot()
        owners = {c.hub for c in claims.values() if c.status == "online"} - {self.hub_id}
        for hub in sorted(owners):
            state = lease_state(await store.kv.entry(lease_key(hub)))
            if state == "live":
                continue  # a hub that started meanwhile: its own
            reason = HUB_LOST if state == "expired" else DISCONNECTED
            reaped = await store.reap(hub, reason=reason)
            if reaped:
                log.warning("hub %s, the last one out, reaped hub %s: %d agent(s) "
                            "offline (%s)", self.hub_id, hub, len(reaped), reason)  # fmt: skip


async def release_leftovers_after(presence: ClaimKeeper, grace: float) -> None:
    """After ``grace``, the claims a drained previous run of this hub left online that
    no session claimed since go offline ``disconnected`` (as the reaper would)."""
    await trio.sleep(grace)
    left = len(presence.leftovers or {})
    presence.release_leftovers(DISCONNECTED)
    if left:
        log.info("hub %s: %d claim(s) its drained run left online released, unless "
                 "claimed again", presence.hub_id, left)  # fmt: skip
