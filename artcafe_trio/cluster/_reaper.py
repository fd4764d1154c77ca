"""Watching the other hubs' leases: reap a lost hub's agents.

:func:`run_reaper` follows every hub lease. When one expires it waits out the
disconnect ``grace`` (the lost hub's agents are reconnecting elsewhere meanwhile, and
each reconnection claims its agent at a newer epoch), then races the other hubs for
the reaper key; the one winner marks offline, with reason ``hub_lost``, the agents
the lost hub still owns online. A lease that is *deleted* is a hub that drained
(a graceful stop): its agents were closed with "reconnect elsewhere" and their
claims left online, so it is reaped after the same grace, and what it still owns
then goes offline with reason ``disconnected``, as on one hub (:func:`reap_plan`).

Noticing that another hub took one of our sessions over is the
:class:`~._claims.ClaimKeeper`'s watch of the presence claims.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from ..nats import KvOp, NatsError
from ._records import HUB_LOST, PresenceClaim, lease_key
from ._store import ClusterStore, LeaseChange

__all__ = ["ReapPlan", "reap_plan", "run_reaper"]

log = logging.getLogger("artcafe_trio.cluster")

#: Attempts at reaping one lost lease while NATS errors (1 s apart).
REAP_ATTEMPTS = 5


#: The reason a drained hub's leftover agents go offline with (as on one hub).
DISCONNECTED = "disconnected"


@attrs.frozen
class ReapPlan:
    """What to do about a lease that went away: reap after ``wait`` s with ``reason``."""

    wait: float
    reason: str


def reap_plan(change: LeaseChange, *, me: str, grace: float) -> ReapPlan | None:
    """The reap a lease change calls for, or ``None`` (a live lease, or our own).
    Expired: the hub died (``hub_lost``); deleted or purged: it drained
    (``disconnected``). Either way its agents get the grace to reconnect elsewhere."""
    if change.alive or change.hub == me:
        return None
    return ReapPlan(grace, HUB_LOST if change.expired else DISCONNECTED)


async def run_reaper(
    store: ClusterStore,
    *,
    grace: float,
    on_reaped: Callable[[str, list[PresenceClaim]], None],
    reaper_ttl: float = 60.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reap lost hubs until cancelled; ``on_reaped(hub, claims)`` after each reap
    this hub won (``claims`` may be empty). ``task_status.started()`` once the
    current leases have been read."""
    async with trio.open_nursery() as nursery, store.watch_leases() as leases:
        task_status.started()
        async for change in leases:
            plan = reap_plan(change, me=store.hub_id, grace=grace)
            if plan is not None:
                nursery.start_soon(_reap_after, store, change.hub, change.revision, plan,
                                   reaper_ttl, on_reaped)  # fmt: skip


async def _reap_after(
    store: ClusterStore,
    hub: str,
    revision: int,
    plan: ReapPlan,
    reaper_ttl: float,
    on_reaped: Callable[[str, list[PresenceClaim]], None],
) -> None:
    """After the plan's wait, unless the hub's lease is back (its refreshes resumed
    within the grace: a NATS outage, not a dead hub; or the hub restarted, which
    clears its own leftovers), race for the reaper key and reap. NATS errors (an
    election in the bucket) are retried a few times, then logged."""
    await trio.sleep(plan.wait)
    for attempt in range(REAP_ATTEMPTS):
        try:
            if plan.wait and await _lease_is_back(store, hub, revision):
                log.warning("hub %s's lease came back within the grace: not reaped", hub)
                return
            if not await store.elect_reaper(hub, revision, ttl=reaper_ttl):
                return  # another hub reaps this lease
            if plan.wait and await _lease_is_back(store, hub, revision):
                return  # back (restarted) while we were elected: its claims are its own
            reaped = await store.reap(hub, reason=plan.reason)
        except NatsError as exc:
            log.warning("reaping hub %s failed (%r), attempt %d", hub, exc, attempt + 1)
            await trio.sleep(1.0)
            continue
        if plan.reason == HUB_LOST:
            log.warning("hub %s lost: %d agent(s) marked offline (hub_lost)", hub, len(reaped))
        else:  # a drained hub: its agents that did not reconnect elsewhere
            log.info("hub %s left the cluster: %d agent(s) did not reconnect elsewhere "
                     "(offline, disconnected)", hub, len(reaped))  # fmt: skip
        on_reaped(hub, reaped)
        return
    log.error("hub %s could not be reaped: its agents stay as they are", hub)


async def _lease_is_back(store: ClusterStore, hub: str, revision: int) -> bool:
    entry = await store.kv.entry(lease_key(hub))
    return entry is not None and entry.op is KvOp.PUT and entry.revision > revision
