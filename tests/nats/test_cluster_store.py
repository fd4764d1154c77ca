"""Presence claims and hub leases in an R3 bucket of a real 3-node nats-server cluster."""

from __future__ import annotations

import itertools

import trio

from artcafe_trio.cluster._records import HUB_LOST, HubLease, presence_key
from artcafe_trio.cluster._store import ClusterStore, LeaseChange, open_cluster_store
from artcafe_trio.nats import KvOp, open_nats

from .servers import API_TIMEOUT, NatsNode

_buckets = itertools.count()


def bucket() -> str:
    return f"cluster{next(_buckets)}"


async def stores(nc: object, name: str, hubs: list[str]) -> list[ClusterStore]:
    first = await open_cluster_store(
        nc, hubs[0], bucket=name, marker_ttl=1, api_timeout=API_TIMEOUT
    )  # type: ignore[arg-type]
    return [first] + [ClusterStore(first.kv, hub) for hub in hubs[1:]]


async def test_racing_claims_land_one_per_epoch_and_the_last_owner_wins(
    nats_cluster: list[NatsNode],
) -> None:
    async with open_nats([n.url for n in nats_cluster]) as nc:
        a, b, c = await stores(nc, bucket(), ["a", "b", "c"])
        written = []

        async def claim(store: ClusterStore, session: str) -> None:
            written.append(await store.claim("acme", "w1", session))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for store, session in ((a, "s-a"), (b, "s-b"), (c, "s-c")):
                    nursery.start_soon(claim, store, session)
        # Every claim landed at its own epoch (compare-and-set retried the losers).
        first = min(w.epoch for w in written)  # above the bucket's last revision
        assert sorted(w.epoch for w in written) == [first, first + 1, first + 2]
        last = max(written, key=lambda w: w.epoch)
        assert await a.get("acme", "w1") == last
        # A hub that was taken over cannot mark the agent offline: no flap.
        stale = min(written, key=lambda w: w.epoch)
        owner = {"a": a, "b": b, "c": c}
        assert await owner[stale.hub].release(stale, "disconnected") is False
        assert (await a.get("acme", "w1")) == last
        assert await owner[last.hub].release(last, "left") is True
        gone = await a.get("acme", "w1")
        assert gone is not None
        assert (gone.status, gone.reason, gone.epoch, gone.hub) == (
            "offline", "left", first + 2, last.hub
        )  # fmt: skip


async def test_a_lost_lease_is_seen_expiring_and_reaped_by_exactly_one_hub(
    nats_cluster: list[NatsNode],
) -> None:
    async with open_nats([n.url for n in nats_cluster]) as nc:
        a, b, c = await stores(nc, bucket(), ["a", "b", "c"])
        on_a = [await a.claim("acme", f"w{i}", f"s-{i}") for i in range(5)]
        moved = await b.claim("acme", "w0", "s-moved")  # w0 reconnected to hub b in time
        changes: list[LeaseChange] = []
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery, b.watch_leases() as leases:
                lease_scope = trio.CancelScope()

                async def hold() -> None:
                    with lease_scope:
                        await a.hold_lease(HubLease("a", ("ws://a:1",)), ttl=1.0)

                nursery.start_soon(hold)
                async for change in leases:
                    changes.append(change)
                    if change.alive and change.hub == "a" and len(changes) == 1:
                        lease_scope.cancel()  # hub a dies: its lease is no longer refreshed
                        died = trio.current_time()
                    if not change.alive:
                        detected = trio.current_time() - died
                        break
        assert changes[0].alive and changes[0].lease == HubLease("a", ("ws://a:1",))
        assert changes[-1].expired and changes[-1].hub == "a"
        assert 0.6 <= detected <= 2.5  # TTL 1 s, refreshed every 1/3 s; the marker follows

        votes = []

        async def vote(store: ClusterStore) -> None:
            votes.append(await store.elect_reaper("a", changes[-1].revision, ttl=5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(vote, b)
            nursery.start_soon(vote, c)
        assert sorted(votes) == [False, True]
        reaped = await b.reap("a")
        assert sorted(r.agent_id for r in reaped) == ["w1", "w2", "w3", "w4"]
        assert all(r.reason == HUB_LOST and r.status == "offline" for r in reaped)
        assert {r.reaper for r in reaped} == {"b"}  # b reports these hub_lost transitions
        # Read back from the stream's leader (``get``): a snapshot is a watch whose
        # consumer may sit on a replica that has not applied b's last write yet (it
        # showed w4 online once in about six runs with four workers).
        table = {("acme", f"w{i}"): await c.get("acme", f"w{i}") for i in range(5)}
        assert table[("acme", "w0")] == moved  # claimed elsewhere before the reap: untouched
        assert {k[1]: v.status for k, v in table.items()} == {
            "w0": "online", "w1": "offline", "w2": "offline", "w3": "offline", "w4": "offline"
        }  # fmt: skip
        # A reap keeps each claim's epoch (a hub claiming meanwhile wins).
        assert {k[1]: v.epoch for k, v in table.items() if k[1] != "w0"} == {
            c.agent_id: c.epoch for c in on_a[1:]
        }
        assert await c.reap("a") == []  # a second reap finds nothing left to do


async def test_claims_carry_the_ttl_and_a_key_s_epochs_never_go_back_across_expiry(
    nats_cluster: list[NatsNode],
) -> None:
    """Every claim write carries the claim TTL. A claim that expired leaves a marker:
    the next claim goes above the marker's revision; once the marker is gone too,
    above the bucket's last revision — never back to a smaller epoch (an old owner's
    epoch must never match a newer claim)."""
    async with open_nats([n.url for n in nats_cluster]) as nc:
        a = await open_cluster_store(
            nc, "a", bucket=bucket(), marker_ttl=1, api_timeout=API_TIMEOUT, claim_ttl=2
        )
        with trio.fail_after(30):
            first = await a.claim("acme", "w1", "s-1")
            assert first.epoch == await a.kv.last_revision()  # the bucket's first write
            second = await a.claim("acme", "w1", "s-2")
            assert second.epoch == first.epoch + 1
            entry = await a.kv.entry(presence_key("acme", "w1"))
            assert entry is not None and entry.ttl == 2
            assert await a.refresh(second) is True
            assert await a.refresh(first) is False  # an older epoch: not ours to refresh
            assert await a.release(second, "left") is True
            assert await a.refresh(second) is False  # offline: nothing to refresh
            entry = await a.kv.entry(presence_key("acme", "w1"))
            assert entry is not None and entry.ttl == 2  # the offline claim too
            while (entry := await a.kv.entry(presence_key("acme", "w1"))) is not None and (
                entry.op is KvOp.PUT
            ):
                await trio.sleep(0.05)
            assert entry is not None and entry.op is KvOp.EXPIRED
            for n in range(3):  # writes elsewhere in the bucket
                await a.claim("acme", f"other-{n}", "s")
            third = await a.claim("acme", "w1", "s-3")
            assert third.epoch == entry.revision + 1 > second.epoch
            while (entry := await a.kv.entry(presence_key("acme", "w1"))) is None or (
                entry.op is KvOp.PUT
            ):
                await trio.sleep(0.05)  # expired again
            while await a.kv.entry(presence_key("acme", "w1")) is not None:
                await trio.sleep(0.1)  # and its marker removed (marker TTL 1 s)
            last = await a.kv.last_revision()
            fourth = await a.claim("acme", "w1", "s-4")
            assert fourth.epoch == last + 1 > third.epoch
