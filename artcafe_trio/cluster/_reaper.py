"""Watching the other hubs' leases: reap a lost hub's agents.

:func:`run_reaper` follows every hub lease. When one expires it waits out the
disconnect ``grace`` (the lost hub's agents are reconnecting elsewhere meanwhile, and
each reconnection claims its agent at a newer epoch), then races the other hubs for
the reaper key; the one winner marks offline, with reason ``hub_lost``, the agents
the lost hub still owns online. A lease that is *deleted* (a graceful shutdown that
already handed its agents over) is reaped at once, without the grace.

Noticing that another hub took one of our sessions over is the
:class:`~._claims.ClaimKeeper`'s watch of the presence claims.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..nats import KvOp, NatsError
from ._records import PresenceClaim, lease_key
from ._store import ClusterStore

__all__ = ["run_reaper"]

log = logging.getLogger("artcafe_trio.cluster")

#: Attempts at reaping one lost lease while NATS errors (1 s apart).
REAP_ATTEMPTS = 5


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
            if change.alive or change.hub == store.hub_id:
                continue
            wait = grace if change.expired else 0.0
            nursery.start_soon(_reap_after, store, change.hub, change.revision, wait,
                               reaper_ttl, on_reaped)  # fmt: skip


async def _reap_after(
    store: ClusterStore,
    hub: str,
    revision: int,
    wait: float,
    reaper_ttl: float,
    on_reaped: Callable[[str, list[PresenceClaim]], None],
) -> None:
    """After ``wait``, unless the hub's lease is back (its refreshes resumed within the
    grace: a NATS outage, not a dead hub), race for the reaper key and reap. NATS
    errors (an election in the bucket) are retried a few times, then logged."""
    await trio.sleep(wait)
    for attempt in range(REAP_ATTEMPTS):
        try:
            if wait and await _lease_is_back(store, hub, revision):
                log.warning("hub %s's lease came back within the grace: not reaped", hub)
                return
            if not await store.elect_reaper(hub, revision, ttl=reaper_ttl):
                return  # another hub reaps this lease
            reaped = await store.reap(hub)
        except NatsError as exc:
            log.warning("reaping hub %s failed (%r), attempt %d", hub, exc, attempt + 1)
            await trio.sleep(1.0)
            continue
        if wait or reaped:  # an expired lease, or a stop that left agents online
            log.warning("hub %s lost: %d agent(s) marked offline (hub_lost)", hub, len(reaped))
        else:  # a graceful stop that had handed everything over: routine
            log.info("hub %s left the cluster", hub)
        on_reaped(hub, reaped)
        return
    log.error("hub %s could not be reaped: its agents stay as they are", hub)


async def _lease_is_back(store: ClusterStore, hub: str, revision: int) -> bool:
    entry = await store.kv.entry(lease_key(hub))
    return entry is not None and entry.op is KvOp.PUT and entry.revision > revision
