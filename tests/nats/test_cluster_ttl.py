"""The claim TTL backstop and the degraded view, against real nats-server.

Short TTLs: leases 1 s, claims 2 s, expiry markers kept 1 s. Hubs run in this trio
process (in-memory agent connections), each on its own NATS node.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from artcafe_trio import HubConfig, Registry
from artcafe_trio.cluster import ClusterConfig, NatsBackplane, open_cluster_hub
from artcafe_trio.cluster._records import HUB_LOST, PresenceClaim, presence_key
from artcafe_trio.cluster._store import open_cluster_store
from artcafe_trio.nats import KvOp, open_nats
from artcafe_trio.protocol import Heartbeat, HeartbeatAck, PresenceQuery, PresenceState
from artcafe_trio.testing import TestHub

from ..conftest import RawClient
from .servers import API_TIMEOUT, NatsNode
from .test_cluster_hubs import (
    authenticate,
    hang_up,
    nothing_more,
    nothing_more_on,
    presence_events,
)

pytestmark = pytest.mark.timeout(90)

LEASE_TTL = 1.0
GRACE = 0.5
CLAIM_TTL = 2.0


def config_for(node: NatsNode, bucket: str, *, replicas: int = 3) -> ClusterConfig:
    return ClusterConfig(
        servers=[node.url], lease_ttl=LEASE_TTL, claim_ttl=CLAIM_TTL, bucket=bucket,
        replicas=replicas, api_timeout=API_TIMEOUT,
    )  # fmt: skip


@asynccontextmanager
async def hubs_on(
    nodes: Sequence[NatsNode], bucket: str, *, replicas: int = 3
) -> AsyncIterator[dict[str, TestHub]]:
    """Hubs ``hub-a``, ``hub-b``, … one per node, each with its own registry."""
    registries = [Registry.open(":memory:") for _ in nodes]
    try:
        async with AsyncExitStack() as stack:
            hubs: dict[str, TestHub] = {}
            for name, node, registry in zip("abc", nodes, registries, strict=False):
                config = HubConfig(hub_id=f"hub-{name}", disconnect_grace=GRACE, close_timeout=0.5)
                hub = await stack.enter_async_context(
                    open_cluster_hub(registry=registry, port=None, config=config,
                                     cluster=config_for(node, bucket, replicas=replicas))
                )  # fmt: skip
                hubs[name] = TestHub(hub)
            yield hubs
            await hang_up(hubs.values())
    finally:
        for registry in registries:
            registry.close()


def backplane(hub: TestHub) -> NatsBackplane:
    plane = hub.hub._backplane  # type: ignore[attr-defined]
    assert isinstance(plane, NatsBackplane)
    return plane


async def agent(hub: TestHub, nursery: trio.Nursery, name: str) -> RawClient:
    key = hub.register("t1", name)
    client = RawClient(await hub.dial(nursery, f"/api/v1/ws/agent/{name}?tenant_id=t1"))
    await authenticate(client, name, "t1", key)
    return client


async def presence_state(client: RawClient) -> PresenceState:
    frame_id = client.next_id()
    await client.send(PresenceQuery(id=frame_id))
    state: PresenceState = await client.recv_type(PresenceState)
    assert state.id == frame_id
    return state


async def test_a_claim_no_hub_refreshes_expires_and_is_offline_once_on_every_hub(
    nats_cluster: list[NatsNode],
) -> None:
    """A claim whose hub is gone without a lease for a reaper to notice (every hub of
    a cluster died; this one never comes back): its TTL removes it, and each hub that
    is up reports the agent offline ``hub_lost`` once — no ghost anywhere."""
    bucket = f"ttl_{secrets.token_hex(4)}"
    async with open_nats([n.url for n in nats_cluster]) as nc:
        gone = await open_cluster_store(
            nc, "gone-hub", bucket=bucket, marker_ttl=1, api_timeout=API_TIMEOUT,
            claim_ttl=CLAIM_TTL,
        )  # fmt: skip
        async with hubs_on(nats_cluster[:2], bucket) as hubs, trio.open_nursery() as nursery:
            with trio.fail_after(40):
                watchers = {}
                for name, hub in hubs.items():
                    watchers[name] = await agent(hub, nursery, f"watcher-{name}")
                    await watchers[name].subscribe("$presence.ghost")
                claimed = await gone.claim("t1", "ghost", "s-ghost")  # no lease, no refresh
                written = trio.current_time()
                for watcher in watchers.values():
                    assert await presence_events(watcher, 1) == [("ghost", "online", "connected")]
                for hub in hubs.values():
                    [row] = [r for r in hub.hub.presence_table() if r.agent_id == "ghost"]
                    assert (row.status, row.hub_id) == ("online", "gone-hub")
                seen = {}
                for name, watcher in watchers.items():
                    assert await presence_events(watcher, 1) == [("ghost", "offline", HUB_LOST)]
                    seen[name] = trio.current_time() - written
                # Once: nothing more.
                assert await nothing_more_on(watchers.values(), 1.5) == [[]] * len(watchers)
                for name, hub in hubs.items():
                    [row] = [r for r in hub.hub.presence_table() if r.agent_id == "ghost"]
                    assert (row.status, row.reason, row.session_id) == ("offline", HUB_LOST, None)
                    [record] = [
                        r for r in (await presence_state(watchers[name])).agents
                        if r.agent_id == "ghost"
                    ]  # fmt: skip
                    assert record.status == "offline"
                    assert backplane(hub).claims.expired == 1
                assert await gone.get("t1", "ghost") is None  # expired (its marker may be gone)
                # The agent comes back (on hub a): its epoch goes on from the old one.
                await agent(hubs["a"], nursery, "ghost")
                for watcher in watchers.values():
                    assert await presence_events(watcher, 1) == [("ghost", "online", "connected")]
                now = await gone.get("t1", "ghost")
                assert now is not None and now.hub == "hub-a"
                assert now.epoch > claimed.epoch
                nursery.cancel_scope.cancel()
    # The server removes an expired message up to ~1.5 s after its TTL.
    assert all(CLAIM_TTL - 0.1 <= after <= CLAIM_TTL + 3.0 for after in seen.values()), seen
    print(f"an unrefreshed {CLAIM_TTL:g} s claim reported offline after "
          + ", ".join(f"{after:.2f} s on hub-{name}" for name, after in seen.items()))  # fmt: skip


async def test_a_live_hub_s_claims_outlive_many_ttls_at_about_two_writes_per_ttl(
    nats_cluster: list[NatsNode],
) -> None:
    """20 agents on hub a, heartbeating about 8 times a second, for 5 claim TTLs: nobody is
    reported offline, each claim is rewritten about twice per TTL (not per
    heartbeat), and every claim is still online, with its epoch, at the end."""
    bucket = f"ttl_{secrets.token_hex(4)}"
    count, ttls = 20, 5
    async with open_nats([n.url for n in nats_cluster]) as nc:
        reader = await open_cluster_store(
            nc, "reader", bucket=bucket, marker_ttl=1, api_timeout=API_TIMEOUT
        )
        async with hubs_on(nats_cluster[:2], bucket) as hubs, trio.open_nursery() as nursery:
            with trio.fail_after(60):
                watcher = await agent(hubs["b"], nursery, "watcher")
                await watcher.subscribe("$presence.*")
                agents = [await agent(hubs["a"], nursery, f"live-{n}") for n in range(count)]
                online = await presence_events(watcher, count)
                assert sorted(online) == sorted(
                    (f"live-{n}", "online", "connected") for n in range(count)
                )
                epochs: dict[str, PresenceClaim] = {}
                for n in range(count):
                    found = await reader.get("t1", f"live-{n}")
                    assert found is not None
                    epochs[found.agent_id] = found
                before = backplane(hubs["a"]).claims.refreshes
                start = trio.current_time()
                heartbeats, seq = 0, 0
                while trio.current_time() - start < ttls * CLAIM_TTL:
                    seq += 1
                    for client in agents:
                        await client.send(Heartbeat(seq=seq))
                    for client in agents:
                        await client.recv_type(HeartbeatAck)
                    heartbeats += count
                    await trio.sleep(0.1)
                elapsed = trio.current_time() - start
                refreshes = backplane(hubs["a"]).claims.refreshes - before
                assert await nothing_more(watcher, 0.5) == []  # no offline, no flap
                for n in range(count):
                    entry = await reader.kv.entry(presence_key("t1", f"live-{n}"))
                    assert entry is not None and entry.op is KvOp.PUT
                    assert entry.ttl == CLAIM_TTL
                    assert PresenceClaim.decode(entry.value) == epochs[f"live-{n}"]
                assert backplane(hubs["a"]).claims.refresh_failures == 0
                assert backplane(hubs["b"]).claims.expired == 0
                nursery.cancel_scope.cancel()
    per_claim_per_ttl = refreshes / count / (elapsed / CLAIM_TTL)
    print(f"{refreshes} claim refreshes for {count} agents over {elapsed:.1f} s "
          f"({elapsed / CLAIM_TTL:.1f} TTLs, {heartbeats} heartbeats): "
          f"{per_claim_per_ttl:.2f} writes per claim per TTL")  # fmt: skip
    # 1 / 0.45 = 2.2 per TTL, give or take a refresh per claim at the window's edges.
    assert 1.6 <= per_claim_per_ttl <= 2.8, per_claim_per_ttl
    assert refreshes < heartbeats / 4  # ~10 heartbeats per agent per TTL


async def test_a_fenced_hub_says_its_view_is_degraded_until_its_lease_is_held_again(
    own_nats_node: NatsNode,
) -> None:
    """NATS frozen under a hub: once its lease could not be refreshed for a lease TTL
    the hub is fenced, keeps serving, and says so (``presence_state.degraded``, the
    ``artcafe_cluster_fenced`` gauge); after NATS is back and the lease is written
    again, it no longer does."""
    pytest.importorskip("prometheus_client")
    from artcafe_trio.hub._metrics import collector

    def fenced_gauge(hub: TestHub) -> float:
        for family in collector(hub.hub).collect():
            if family.name == "artcafe_cluster_fenced":
                return float(family.samples[0].value)
        raise AssertionError("no artcafe_cluster_fenced gauge")

    bucket = f"fence_{secrets.token_hex(4)}"
    async with hubs_on([own_nats_node], bucket, replicas=1) as hubs, trio.open_nursery() as nursery:
        hub = hubs["a"]
        with trio.fail_after(60):
            client = await agent(hub, nursery, "w1")
            assert (await presence_state(client)).degraded is None
            assert hub.hub.cluster_degraded == () and fenced_gauge(hub) == 0
            own_nats_node.stop_signal()
            frozen = trio.current_time()
            try:
                while hub.hub.cluster_degraded != ("fenced",):
                    await trio.sleep(0.05)
                fenced_after = trio.current_time() - frozen
                state = await presence_state(client)  # served locally meanwhile
                assert state.degraded == ("fenced",)
                assert [(r.agent_id, r.status) for r in state.agents] == [("w1", "online")]
                assert fenced_gauge(hub) == 1
            finally:
                own_nats_node.cont_signal()
            thawed = trio.current_time()
            while hub.hub.cluster_degraded:
                await trio.sleep(0.05)
            cleared_after = trio.current_time() - thawed
            assert (await presence_state(client)).degraded is None
            assert fenced_gauge(hub) == 0
            nursery.cancel_scope.cancel()
    # Fenced once no refresh landed for a TTL (the last one up to TTL/3 before the freeze).
    assert LEASE_TTL * 2 / 3 - 0.05 <= fenced_after <= LEASE_TTL + LEASE_TTL / 3 + 0.5
    print(f"fenced {fenced_after:.2f} s after NATS froze; cleared {cleared_after:.2f} s after")
