"""Watching the other hubs: reap a lost hub's agents, notice a session taken over.

:func:`run_reaper` follows every hub lease. When one expires it waits out the
disconnect ``grace`` (the lost hub's agents are reconnecting elsewhere meanwhile, and
each reconnection claims its agent at a newer epoch), then races the other hubs for
the reaper key; the one winner marks offline, with reason ``hub_lost``, the agents
the lost hub still owns online. A lease that is *deleted* (a graceful shutdown that
already handed its agents over) is reaped at once, without the grace.

:func:`watch_ownership` tells a hub which of its sessions another hub took over, so
it closes them as replaced (4003) with no presence event of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..nats import KvOp, NatsError
from ._records import HUB_LOST, PRESENCE_PREFIX, PresenceClaim, lease_key, parse_presence_key
from ._store import ClusterStore

__all__ = ["run_reaper", "watch_ownership"]

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


async def watch_ownership(
    store: ClusterStore,
    on_taken_over: Callable[[PresenceClaim], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Until cancelled, call ``on_taken_over(claim)`` whenever an agent this hub
    owned online stops being its own: another hub claimed it (the session here must
    close as replaced), or a reaper marked it ``hub_lost`` because this hub's lease
    lapsed (a frozen or fenced hub: its sessions must close too).
    ``task_status.started()`` once the current claims have been read."""
    owned: set[tuple[str, str]] = set()
    async with store.kv.watch(PRESENCE_PREFIX + ">") as watcher:
        if watcher.caught_up:
            task_status.started()
        started = watcher.caught_up
        async for entry in watcher:
            ids = parse_presence_key(entry.key)
            if ids is not None and entry.op is KvOp.PUT:
                try:
                    claim = PresenceClaim.decode(entry.value)
                except ValueError:
                    claim = None
                mine = claim is not None and claim.hub == store.hub_id
                if claim is not None and mine and claim.status == "online":
                    owned.add(ids)
                elif claim is not None and ids in owned:
                    owned.discard(ids)
                    if not mine or claim.reason == HUB_LOST:
                        on_taken_over(claim)
            if not started and watcher.caught_up:
                started = True
                task_status.started()
