"""Reaping a lost hub after the grace, and telling a hub its session was taken over
(real 3-node nats-server cluster, 1 s leases)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import trio

from artcafe_trio.cluster._reaper import run_reaper
from artcafe_trio.cluster._records import HUB_LOST, HubLease, PresenceClaim
from artcafe_trio.cluster._store import ClusterStore, open_cluster_store
from artcafe_trio.nats import open_nats

from .servers import API_TIMEOUT, NatsNode

_buckets = itertools.count()
TTL = 1.0
GRACE = 0.5


async def test_a_lost_hub_is_reaped_once_after_the_grace_sparing_agents_that_moved(
    nats_cluster: list[NatsNode],
) -> None:
    async with open_nats([n.url for n in nats_cluster]) as nc:
        a = await open_cluster_store(
            nc, "a", bucket=f"reap{next(_buckets)}", marker_ttl=1, api_timeout=API_TIMEOUT
        )
        b, c = ClusterStore(a.kv, "b"), ClusterStore(a.kv, "c")
        for i in range(4):
            await a.claim("acme", f"w{i}", f"s-{i}")
        reaps: list[tuple[str, str, list[PresenceClaim]]] = []
        done = trio.Event()

        def reaped_by(me: str) -> Callable[[str, list[PresenceClaim]], None]:
            def record(hub: str, claims: list[PresenceClaim]) -> None:
                reaps.append((me, hub, claims))
                done.set()

            return record

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                lease_scope = trio.CancelScope()

                async def hold(task_status: trio.TaskStatus[int]) -> None:
                    with lease_scope:
                        await a.hold_lease(HubLease("a"), ttl=TTL, task_status=task_status)

                await nursery.start(hold)
                for store in (b, c):
                    await nursery.start(
                        functools.partial(
                            run_reaper, store, grace=GRACE, on_reaped=reaped_by(store.hub_id)
                        )
                    )
                lease_scope.cancel()  # hub a dies
                died = trio.current_time()
                # w0 reconnects to hub b at once, well inside the grace.
                moved = await b.claim("acme", "w0", "s-b")
                await done.wait()
                detected = trio.current_time() - died
                await trio.sleep(GRACE + 1.0)  # time enough for a second (wrong) reap
                nursery.cancel_scope.cancel()
        assert len(reaps) == 1, reaps  # exactly one hub reaped
        _, lost, claims = reaps[0]
        assert lost == "a"
        assert sorted(claim.agent_id for claim in claims) == ["w1", "w2", "w3"]
        assert all(claim.reason == HUB_LOST for claim in claims)
        # Lease TTL + grace + 1 s is the promise; the lease was refreshed TTL/3 before.
        assert GRACE <= detected <= TTL + GRACE + 1.0
        assert await c.get("acme", "w0") == moved


async def test_a_hub_that_cannot_refresh_its_lease_fences_itself_and_recovers(
    own_nats_node: NatsNode,
) -> None:
    async with open_nats(own_nats_node.url) as nc:
        a = await open_cluster_store(
            nc,
            "a",
            bucket=f"fence{next(_buckets)}",
            replicas=1,
            marker_ttl=1,
            api_timeout=API_TIMEOUT,
        )
        states: list[tuple[bool, float]] = []
        changed = trio.Event()

        def on_fenced(fenced: bool) -> None:
            nonlocal changed
            states.append((fenced, trio.current_time()))
            changed.set()
            changed = trio.Event()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(a.hold_lease, HubLease("a"), ttl=TTL, on_fenced=on_fenced)
                )
                own_nats_node.stop_signal()  # NATS frozen: no refresh can succeed
                frozen = trio.current_time()
                try:
                    await changed.wait()
                finally:
                    own_nats_node.cont_signal()
                await changed.wait()
                lease = await a.kv.get("h.a")
                nursery.cancel_scope.cancel()
        assert [fenced for fenced, _ in states] == [True, False]
        fenced_after = states[0][1] - frozen
        # Fenced once no refresh landed for one TTL: between TTL - TTL/3 (the last
        # refresh happened up to TTL/3 before the freeze) and TTL + one bounded try.
        assert TTL * 2 / 3 - 0.05 <= fenced_after <= TTL + TTL / 3 + 0.2
        assert lease is not None and HubLease.decode(lease.value) == HubLease("a")
