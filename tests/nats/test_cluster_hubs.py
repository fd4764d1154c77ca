"""Three hubs over a real 3-node NATS cluster behave as one hub.

Hubs run in this trio process (in-memory agent connections), each on its own NATS
node and its own registry; the hub killed abruptly is a real ``artcafe-trio hub``
process (SIGKILL is the point there). Real clock (NATS is involved), short TTLs.
"""

from __future__ import annotations

import functools
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_websocket

from artcafe_trio import CloseCode, HubConfig, Registry
from artcafe_trio.cluster import (
    ClusterConfig,
    NatsBackplane,
    open_cluster_hub,
    publish_agent,
    serve_cluster_hub,
)
from artcafe_trio.cluster._records import HubLease, PresenceClaim, lease_key
from artcafe_trio.cluster._store import open_cluster_store
from artcafe_trio.dashboard import Webhook, WebhookConfig
from artcafe_trio.nats import KvOp, open_nats
from artcafe_trio.protocol import (
    Auth,
    Challenge,
    Leave,
    Message,
    PresenceEvent,
    PresenceQuery,
    PresenceRecord,
    PresenceState,
    Publish,
    Published,
    Welcome,
)
from artcafe_trio.protocol._keys import PrivateKey, generate_private_key
from artcafe_trio.testing import TestHub

from ..conftest import RawClient
from ..test_webhooks import FakePost
from .servers import API_TIMEOUT, NatsNode

pytestmark = pytest.mark.timeout(60)

LEASE_TTL = 1.0
GRACE = 0.5


class Cluster:
    """Three hubs (``a``, ``b``, ``c``), each with its own registry, one agent key each."""

    def __init__(self, hubs: dict[str, TestHub], nursery: trio.Nursery) -> None:
        self.hubs = hubs
        self.nursery = nursery
        self.keys: dict[tuple[str, str], PrivateKey] = {}

    def key(self, tenant: str, agent: str) -> PrivateKey:
        if (tenant, agent) not in self.keys:
            key = self.keys[tenant, agent] = generate_private_key("ed25519")
            for hub in self.hubs.values():
                hub.registry.add_key(tenant, agent, key.public_key)
        return self.keys[tenant, agent]

    async def connect(self, hub: str, agent: str, tenant: str = "t1", **fields: Any) -> RawClient:
        target = self.hubs[hub]
        resource = f"/api/v1/ws/agent/{agent}?tenant_id={tenant}"
        client = RawClient(await target.dial(self.nursery, resource))
        await authenticate(client, agent, tenant, self.key(tenant, agent), **fields)
        return client

    def backplane(self, hub: str) -> NatsBackplane:
        backplane = self.hubs[hub].hub._backplane  # type: ignore[attr-defined]
        assert isinstance(backplane, NatsBackplane)
        return backplane

    async def settle(self, publisher: RawClient, receivers: Sequence[RawClient]) -> None:
        """Every receiver's patterns are known on the publisher's NATS node.

        Each receiver subscribes one more pattern, ``probe.<n>``, after its real ones;
        interest crosses NATS in order, so once a probe published by ``publisher``
        reaches it, its earlier patterns have too. The probes are then drained."""
        for n, receiver in enumerate(receivers):
            await receiver.subscribe(f"probe.{n}")
        for n, receiver in enumerate(receivers):
            arrived = False
            while not arrived:
                await publisher.send(Publish(subject=f"probe.{n}", data={}))
                with trio.move_on_after(0.1):
                    while not arrived:
                        frame = await receiver.recv()
                        arrived = isinstance(frame, Message) and frame.subject == f"probe.{n}"
        for client in (publisher, *receivers):
            await nothing_more(client, 0.1)  # the probes (some clients match probe.>)


async def authenticate(
    client: RawClient, agent: str, tenant: str, key: PrivateKey, **fields: Any
) -> None:
    challenge = await client.recv()
    assert isinstance(challenge, Challenge)
    signature = key.sign_auth(tenant_id=tenant, agent_id=agent, nonce=challenge.nonce)
    await client.send(
        Auth(agent_id=agent, tenant_id=tenant, algorithm=key.algorithm, signature=signature,
             heartbeat_interval=10.0, heartbeat_timeout_multiplier=3.0, **fields)
    )  # fmt: skip
    welcome = await client.recv()
    assert isinstance(welcome, Welcome), welcome
    client.welcome = welcome


def cluster_config(node: NatsNode, bucket: str) -> ClusterConfig:
    return ClusterConfig(
        servers=[node.url], lease_ttl=LEASE_TTL, bucket=bucket, replicas=3,
        api_timeout=API_TIMEOUT,
    )  # fmt: skip


@asynccontextmanager
async def three_hubs(nodes: Sequence[NatsNode]) -> AsyncIterator[Cluster]:
    bucket = f"hubs_{secrets.token_hex(4)}"
    registries = [Registry.open(":memory:") for _ in nodes]
    try:
        async with AsyncExitStack() as stack:
            hubs: dict[str, TestHub] = {}
            for name, node, registry in zip("abc", nodes, registries, strict=True):
                config = HubConfig(hub_id=f"hub-{name}", disconnect_grace=GRACE, close_timeout=0.5)
                hub = await stack.enter_async_context(
                    open_cluster_hub(registry=registry, port=None, config=config,
                             cluster=cluster_config(node, bucket))
                )  # fmt: skip
                hubs[name] = TestHub(hub)
            async with trio.open_nursery() as nursery:
                yield Cluster(hubs, nursery)
                await hang_up(hubs.values())
                nursery.cancel_scope.cancel()
    finally:
        for registry in registries:
            registry.close()


async def hang_up(hubs: Iterable[TestHub]) -> None:
    """Teardown: close the client end of every in-memory connection to ``hubs``.

    A stopping hub closes each session and waits up to its ``close_timeout`` for the
    peer's half of the close handshake; the test's clients, cancelled with their
    nursery, would never send it. Hung up first, the hubs stop without that wait.
    Shielded: the caller's scope may be cancelled already (the test's nursery)."""
    with trio.CancelScope(shield=True):
        for hub in hubs:
            for stream in hub._streams:
                await trio.aclose_forcefully(stream)


async def nothing_more(client: RawClient, wait: float = 0.3) -> list[Any]:
    """Frames (other than acks) that arrive within ``wait``: expected to be none."""
    extra = []
    with trio.move_on_after(wait):
        while True:
            frame = await client.recv()
            if not isinstance(frame, Published):
                extra.append(frame)
    return extra


async def nothing_more_on(clients: Iterable[RawClient], wait: float = 0.3) -> list[list[Any]]:
    """:func:`nothing_more` for each of ``clients``, all over the same ``wait`` at once
    (not one after another: each client gets the whole ``wait``, as it did first)."""
    clients = list(clients)
    extra: list[list[Any]] = [[] for _ in clients]

    async def one(n: int) -> None:
        extra[n] = await nothing_more(clients[n], wait)

    async with trio.open_nursery() as nursery:
        for n in range(len(clients)):
            nursery.start_soon(one, n)
    return extra


async def presence_events(client: RawClient, count: int) -> list[tuple[str, str, str]]:
    events = []
    for message in await client.messages(count):
        event = PresenceEvent.from_data(message.data)
        events.append((event.agent_id, event.status, event.reason))
    return events


async def query(client: RawClient) -> dict[str, PresenceRecord]:
    frame_id = client.next_id()
    await client.send(PresenceQuery(id=frame_id))
    state = await client.recv_type(PresenceState)
    assert state.id == frame_id
    return {record.agent_id: record for record in state.agents}


async def test_messages_cross_hubs_once_with_every_wildcard_form(
    nats_cluster: list[NatsNode],
) -> None:
    with trio.fail_after(20):
        async with three_hubs(nats_cluster) as cluster:
            a1 = await cluster.connect("a", "a1")
            await a1.subscribe("jobs.*")
            await a1.subscribe("jobs.>")  # overlapping: still one delivery
            b1 = await cluster.connect("b", "b1")
            await b1.subscribe("jobs.new")
            c1 = await cluster.connect("c", "c1")
            await c1.subscribe(">")
            other = await cluster.connect("c", "c1", tenant="t2")  # the same id, another tenant
            await other.subscribe(">")
            publisher = await cluster.connect("b", "pub")
            await cluster.settle(publisher, [a1, b1, c1])
            await cluster.settle(await cluster.connect("b", "pub", tenant="t2"), [other])

            await publisher.send(Publish(subject="jobs.new", data={"n": 1}, id="p1"))
            confirmed = await publisher.recv_type(Published)
            for client in (a1, b1, c1):
                [got] = await client.messages(1)
                assert (got.subject, got.data, got.sender) == ("jobs.new", {"n": 1}, "pub")
                assert got.message_id == confirmed.message_id
            await publisher.send(Publish(subject="jobs.x.y", data={"n": 2}, id="p2"))
            for client in (a1, c1):  # jobs.> and >, not jobs.new nor jobs.*
                [got] = await client.messages(1)
                assert (got.subject, got.data) == ("jobs.x.y", {"n": 2})
            # Once each; t2 saw nothing.
            assert await nothing_more_on((a1, b1, c1, other, publisher)) == [[]] * 5

            # A re-send of p1 (as after a failover) through hub C: a duplicate, not
            # delivered again anywhere.
            moved = await cluster.connect("c", "pub")
            await moved.send(Publish(subject="jobs.new", data={"n": 1}, id="p1"))
            again = await moved.recv_type(Published)
            assert again.duplicate and again.message_id == confirmed.message_id
            assert await nothing_more_on((a1, b1, c1, other), 0.2) == [[]] * 4


async def test_request_reply_across_hubs(nats_cluster: list[NatsNode]) -> None:
    with trio.fail_after(20):
        async with three_hubs(nats_cluster) as cluster:
            server_b = await cluster.connect("b", "srv-b")
            await server_b.subscribe("svc.echo")
            server_c = await cluster.connect("c", "srv-c")
            await server_c.subscribe("svc.*")
            requester = await cluster.connect("a", "req")
            await cluster.settle(requester, [server_b, server_c])
            assert requester.welcome is not None
            reply_to = f"$reply.{requester.welcome.session_id}.1"
            await requester.send(
                Publish(subject="svc.echo", data={"q": 1}, reply_to=reply_to, id="q1")
            )
            [request_b] = await server_b.messages(1)
            [request_c] = await server_c.messages(1)
            assert request_b.reply_to == request_c.reply_to == reply_to
            await server_b.send(Publish(subject=reply_to, data={"a": "b"}, id="r1"))
            assert not (await server_b.recv_type(Published)).duplicate
            [answer] = await requester.messages(1)
            assert (answer.subject, answer.data, answer.sender) == (reply_to, {"a": "b"}, "srv-b")
            # The first answer closed the request on every hub: a second one is refused.
            await trio.sleep(0.2)
            await server_c.send(Publish(subject=reply_to, data={"a": "c"}, id="r2"))
            refused = await server_c.recv()
            assert getattr(refused, "code", None) == "reply_not_expected"
            assert await nothing_more(requester) == []


async def test_presence_is_one_table_and_one_event_per_transition(
    nats_cluster: list[NatsNode],
) -> None:
    with trio.fail_after(20):
        async with three_hubs(nats_cluster) as cluster:
            watchers = {}
            for hub in "abc":
                watchers[hub] = await cluster.connect(hub, f"watch-{hub}")
                await watchers[hub].subscribe("$presence.x")
            # On every hub, the table holds every watcher.
            for hub in "abc":
                with trio.fail_after(2):
                    while {"watch-a", "watch-b", "watch-c"} - {
                        agent for agent, r in (await query(watchers[hub])).items()
                        if r.status == "online"
                    }:  # fmt: skip
                        await trio.sleep(0.05)

            x = await cluster.connect("a", "x", capabilities=("gpu",), metadata={"v": 1})
            for hub in "abc":
                assert await presence_events(watchers[hub], 1) == [("x", "online", "connected")]
            for hub in "abc":
                record = (await query(watchers[hub]))["x"]
                assert (record.status, record.capabilities, record.metadata) == (
                    "online", ("gpu",), {"v": 1},
                )  # fmt: skip

            # The same agent connects to hub B: A's session is replaced, no flap.
            t0 = time.monotonic()
            x_on_b = await cluster.connect("b", "x", capabilities=("gpu", "tpu"))
            assert await x.close_code() == CloseCode.REPLACED
            took_over = time.monotonic() - t0
            assert took_over < 1.0
            print(f"take-over closed the old session {took_over:.3f} s after the new auth began")
            assert await nothing_more_on(watchers.values(), 0.3) == [[]] * 3
            for hub in "abc":
                record = (await query(watchers[hub]))["x"]
                assert record.status == "online"
                assert x_on_b.welcome is not None
                assert record.session_id == x_on_b.welcome.session_id
                assert (record.capabilities, record.metadata) == (("gpu", "tpu"), {})

            await x_on_b.send(Leave())
            assert await x_on_b.close_code() == CloseCode.NORMAL
            for hub in "abc":
                assert await presence_events(watchers[hub], 1) == [("x", "offline", "left")]
            assert await nothing_more_on(watchers.values(), 0.2) == [[]] * 3
            for hub in "abc":
                assert (await query(watchers[hub]))["x"].status == "offline"


@asynccontextmanager
async def hubs_with_b_stoppable(
    nodes: Sequence[NatsNode], bucket: str, grace: float = GRACE
) -> AsyncIterator[tuple[Cluster, trio.CancelScope, trio.Event]]:
    """Hubs ``a`` and ``c`` for the block; hub ``b`` until the scope is cancelled (a
    graceful stop), the event set once it has stopped (handover done)."""
    registries = {name: Registry.open(":memory:") for name in "abc"}

    def config(name: str) -> HubConfig:
        return HubConfig(hub_id=f"hub-{name}", disconnect_grace=grace, close_timeout=0.5)

    try:
        async with (
            open_cluster_hub(registry=registries["a"], port=None, config=config("a"),
                             cluster=cluster_config(nodes[0], bucket)) as hub_a,
            open_cluster_hub(registry=registries["c"], port=None, config=config("c"),
                             cluster=cluster_config(nodes[2], bucket)) as hub_c,
            trio.open_nursery() as nursery,
        ):  # fmt: skip
            hubs = {"a": TestHub(hub_a), "c": TestHub(hub_c)}
            b_scope, b_stopped = trio.CancelScope(), trio.Event()

            async def run_b(task_status: trio.TaskStatus[TestHub]) -> None:
                with b_scope:
                    async with open_cluster_hub(registry=registries["b"], port=None,
                                                config=config("b"),
                                                cluster=cluster_config(nodes[1], bucket)) as hub_b:  # fmt: skip
                        task_status.started(TestHub(hub_b))
                        await trio.sleep_forever()
                b_stopped.set()

            hubs["b"] = await nursery.start(run_b)
            cluster = Cluster(hubs, nursery)
            # b knows the other hubs' leases before a test stops it (a hub that sees no
            # other live hub stops alone: its agents offline at once, by design). Under
            # load its lease watch can lag its start.
            with trio.fail_after(10):
                while set(cluster.backplane("b")._hub_urls) != {"hub-a", "hub-c"}:
                    await trio.sleep(0.05)
            yield cluster, b_scope, b_stopped
            await hang_up(hubs.values())
            nursery.cancel_scope.cancel()
    finally:
        for registry in registries.values():
            registry.close()


async def test_a_hub_stopped_gracefully_drains_its_agents_to_other_hubs_without_a_flap(
    nats_cluster: list[NatsNode],
) -> None:
    """Hub b stops gracefully (a deploy): y reconnects to hub a within the grace and no
    hub shows any presence event for it; z does not come back and is offline
    (``disconnected``) exactly once, everywhere, after about the grace."""
    bucket = f"hubs_{secrets.token_hex(4)}"
    with trio.fail_after(30):
        async with (
            hubs_with_b_stoppable(nats_cluster, bucket) as (cluster, b_scope, b_stopped),
            open_nats(nats_cluster[0].url) as nc,
        ):
            probe = await open_cluster_store(nc, "probe", bucket=bucket, api_timeout=API_TIMEOUT)
            watchers = {hub: await cluster.connect(hub, f"w-{hub}") for hub in "ac"}
            for watcher in watchers.values():
                await watcher.subscribe("$presence.y")
                await watcher.subscribe("$presence.z")
            y = await cluster.connect("b", "y")
            z = await cluster.connect("b", "z")
            for watcher in watchers.values():
                assert sorted(await presence_events(watcher, 2)) == [
                    ("y", "online", "connected"), ("z", "online", "connected"),
                ]  # fmt: skip
            assert y.welcome is not None
            before = await probe.get("t1", "y")
            assert before is not None and before.hub == "hub-b"
            handed_over = 0.0

            async def time_the_handover() -> None:
                nonlocal handed_over
                await b_stopped.wait()
                handed_over = trio.current_time() - stopped

            async with probe.watch_leases() as leases:
                stopped = trio.current_time()
                cluster.nursery.start_soon(time_the_handover)
                b_scope.cancel()  # a graceful stop of hub b
                assert await y.close_code() == CloseCode.SERVICE_RESTART
                assert await z.close_code() == CloseCode.SERVICE_RESTART
                y_back = await cluster.connect("a", "y")  # y reconnects elsewhere at once
                reconnected = trio.current_time() - stopped
                await b_stopped.wait()
                b_leases = []
                async for change in leases:
                    if change.hub == "hub-b":
                        b_leases.append(change)
                        if not change.alive:
                            break
            # The lease said "draining" before it was deleted (not expired).
            assert [(c.alive, c.lease and c.lease.draining) for c in b_leases][-2:] == [
                (True, True), (False, None),
            ]  # fmt: skip
            assert not b_leases[-1].expired
            assert await presence_events(watchers["a"], 1) == [("z", "offline", "disconnected")]
            z_offline = trio.current_time() - stopped
            assert await presence_events(watchers["c"], 1) == [("z", "offline", "disconnected")]
            # The grace after the deleted lease, not at once, and within the bound.
            assert GRACE <= z_offline <= GRACE + LEASE_TTL + 1.0, z_offline
            print(
                f"\ngraceful stop: y back on hub a {reconnected:.3f} s, handover done "
                f"{handed_over:.3f} s, z offline (disconnected) {z_offline:.3f} s after the stop"
            )
            # y: nothing.
            assert await nothing_more_on(watchers.values(), LEASE_TTL + GRACE) == [[]] * 2
            assert y_back.welcome is not None
            for watcher in watchers.values():
                table = await query(watcher)
                assert (table["y"].status, table["y"].hub_id) == ("online", "hub-a")
                assert table["y"].session_id == y_back.welcome.session_id
                assert (table["z"].status, table["z"].reason) == ("offline", "disconnected")
            after = await probe.get("t1", "y")
            assert after is not None and after.hub == "hub-a" and after.epoch == before.epoch + 1
            assert after.since == before.since  # one stretch online, never interrupted


async def test_a_hub_stopped_gracefully_alone_marks_its_agents_offline_at_once(
    nats_cluster: list[NatsNode],
) -> None:
    """No other live hub would reap them: the lone hub releases its agents itself."""
    bucket = f"hubs_{secrets.token_hex(4)}"
    config = HubConfig(hub_id="hub-b", disconnect_grace=GRACE, close_timeout=0.5)
    with trio.fail_after(20), Registry.open(":memory:") as reg_b:
        async with open_nats(nats_cluster[0].url) as nc, trio.open_nursery() as nursery:
            with trio.CancelScope() as b_scope:
                async with open_cluster_hub(registry=reg_b, port=None, config=config,
                                    cluster=cluster_config(nats_cluster[1], bucket)) as hub_b:  # fmt: skip
                    b = TestHub(hub_b)
                    probe = await open_cluster_store(
                        nc, "probe", bucket=bucket, api_timeout=API_TIMEOUT
                    )
                    y_key = b.register("t1", "y")
                    y = RawClient(await b.dial(nursery, "/api/v1/ws/agent/y?tenant_id=t1"))
                    await authenticate(y, "y", "t1", y_key)
                    online = await probe.get("t1", "y")
                    assert online is not None and online.status == "online"
                    stopped = trio.current_time()
                    b_scope.cancel()
            handed_over = trio.current_time() - stopped
            assert await y.close_code() == CloseCode.SERVICE_RESTART
            # Written by the hub itself before its lease was deleted: no grace waited.
            offline = await probe.get("t1", "y")
            assert offline is not None
            assert (offline.status, offline.reason, offline.hub) == (
                "offline", "disconnected", "hub-b",
            )  # fmt: skip
            lease = await probe.kv.entry(lease_key("hub-b"))
            assert lease is not None and lease.op is KvOp.DELETE  # deleted, not expired
            assert handed_over < GRACE + LEASE_TTL
            print(f"\nlone hub graceful stop: offline (disconnected) within {handed_over:.3f} s")
            nursery.cancel_scope.cancel()


async def test_hubs_stopped_together_each_mark_their_agents_offline_at_once(
    nats_cluster: list[NatsNode],
) -> None:
    """The whole cluster (three hubs) stopped at the same moment: each sees the others'
    leases say ``draining`` before its handover, so none counts on another to reap,
    and no agent is left online in the bucket."""
    bucket = f"hubs_{secrets.token_hex(4)}"
    registries = {name: Registry.open(":memory:") for name in "abc"}
    with trio.fail_after(30), closing_all(registries.values()):
        async with open_nats(nats_cluster[0].url) as nc, trio.open_nursery() as clients:
            probe = await open_cluster_store(nc, "probe", bucket=bucket, api_timeout=API_TIMEOUT)
            async with trio.open_nursery() as hubs_nursery:
                hubs: dict[str, TestHub] = {}
                for name, node in zip("abc", nats_cluster, strict=True):
                    serve = functools.partial(
                        serve_cluster_hub, registry=registries[name], port=None,
                        config=HubConfig(hub_id=f"hub-{name}", disconnect_grace=GRACE,
                                         close_timeout=0.5),
                        cluster=cluster_config(node, bucket),
                    )  # fmt: skip
                    hubs[name] = TestHub(await hubs_nursery.start(serve))
                cluster = Cluster(hubs, clients)
                for name in "abc":
                    await cluster.connect(name, f"agent-{name}")
                backplanes = [cluster.backplane(name) for name in "abc"]
                while any(len(bp._hub_urls) != 2 for bp in backplanes):  # all see all
                    await trio.sleep(0.05)
                stopped = trio.current_time()
                hubs_nursery.cancel_scope.cancel()  # the three stop at the same moment
            took = trio.current_time() - stopped
            claims = {name: await probe.get("t1", f"agent-{name}") for name in "abc"}
            assert {name: (c.status, c.reason) for name, c in claims.items() if c is not None} == {
                name: ("offline", "disconnected") for name in "abc"
            }, claims
            print(f"\nthree hubs stopped together: all agents offline within {took:.3f} s")
            clients.cancel_scope.cancel()


async def test_hubs_stopped_one_after_another_leave_no_agent_online(
    nats_cluster: list[NatsNode],
) -> None:
    """b, then c, then a, each within the grace of the one before: b and c drain to
    the hubs still live and leave their agents online for a reaper; a, the last one
    out, reaps what they left (``disconnected``) before it deletes its lease."""
    bucket = f"hubs_{secrets.token_hex(4)}"
    grace = 3.0  # longer than the stops take (a hub may wait 0.5 s for a client that never closes)
    with trio.fail_after(30):
        async with hubs_with_b_stoppable(nats_cluster, bucket, grace) as (cluster, b_scope,
                                                                          b_stopped):  # fmt: skip
            for name in "abc":
                await cluster.connect(name, f"agent-{name}")
            while cluster.backplane("a")._hub_urls.keys() != {"hub-b", "hub-c"}:
                await trio.sleep(0.05)
            b_scope.cancel()
            await b_stopped.wait()
            b_done = trio.current_time()
            cluster.nursery.cancel_scope.cancel()  # then c, then a, as the block exits
        # Before any reaper's grace ended: what follows is the last hub's doing.
        assert trio.current_time() - b_done < grace
        async with open_nats(nats_cluster[0].url) as nc:
            probe = await open_cluster_store(nc, "probe", bucket=bucket, api_timeout=API_TIMEOUT)
            claims = {name: await probe.get("t1", f"agent-{name}") for name in "abc"}
        assert {name: (c.status, c.reason) for name, c in claims.items() if c is not None} == {
            name: ("offline", "disconnected") for name in "abc"
        }, claims


@contextmanager
def closing_all(registries: Iterable[Registry]) -> Iterator[None]:
    try:
        yield
    finally:
        for registry in registries:
            registry.close()


async def test_status_nats_lists_the_hubs_with_their_lease_ages(
    nats_cluster: list[NatsNode],
) -> None:
    import io

    from artcafe_trio.cli._presence import _presence_json, _StatusPrinter
    from artcafe_trio.cli._status import _read_cluster_hubs

    bucket = f"hubs_{secrets.token_hex(4)}"
    servers = [node.url for node in nats_cluster]
    with (
        trio.fail_after(20),
        Registry.open(":memory:") as reg_a,
        Registry.open(":memory:") as reg_b,
    ):
        config_a = HubConfig(hub_id="hub-a", disconnect_grace=GRACE, close_timeout=0.5)
        config_b = HubConfig(hub_id="hub-b", disconnect_grace=GRACE, close_timeout=0.5)
        async with (
            open_cluster_hub(registry=reg_a, port=None, config=config_a,
                     cluster=cluster_config(nats_cluster[0], bucket)) as hub_a,
            trio.open_nursery() as nursery,
        ):  # fmt: skip
            a = TestHub(hub_a)
            with trio.CancelScope() as b_scope:
                async with open_cluster_hub(registry=reg_b, port=None, config=config_b,
                                    cluster=cluster_config(nats_cluster[1], bucket)) as hub_b:  # fmt: skip
                    b = TestHub(hub_b)
                    x_key, y_key = a.register("t1", "x"), b.register("t1", "y")
                    x = RawClient(await a.dial(nursery, "/api/v1/ws/agent/x?tenant_id=t1"))
                    await authenticate(x, "x", "t1", x_key)
                    await x.subscribe("$presence.y")
                    y = RawClient(await b.dial(nursery, "/api/v1/ws/agent/y?tenant_id=t1"))
                    await authenticate(y, "y", "t1", y_key)
                    assert await presence_events(x, 1) == [("y", "online", "connected")]
                    table = await query(x)  # hub a's table names each agent's hub
                    assert {agent: r.hub_id for agent, r in table.items()} == {
                        "x": "hub-a", "y": "hub-b",
                    }  # fmt: skip
                    hubs = await _read_cluster_hubs(servers, bucket)
                    assert [(h["hub_id"], h["state"], h["draining"]) for h in hubs] == [
                        ("hub-a", "live", False), ("hub-b", "live", False),
                    ]  # fmt: skip
                    assert all(0 <= h["lease_age"] < LEASE_TTL for h in hubs), hubs
                    assert all(h["lease_ttl"] == LEASE_TTL for h in hubs)
                    out = io.StringIO()
                    printer = _StatusPrinter(False, False, out)
                    printer.hubs = hubs
                    printer.show([_presence_json(r, "hub") for r in table.values()])
                    lines = out.getvalue().splitlines()
                    assert lines[0].split()[4] == "HUB"
                    assert [line.split()[4] for line in lines[1:3]] == ["hub-a", "hub-b"]
                    assert lines[4].split() == ["HUB", "URLS", "DRAINING", "LEASE", "AGE"]
                    assert [line.split()[0] for line in lines[5:]] == ["hub-a", "hub-b"]
                    b_scope.cancel()  # a graceful stop: hub b deletes its lease
            hubs = await _read_cluster_hubs(servers, bucket)
            assert [h["hub_id"] for h in hubs] == ["hub-a"]
            await hang_up([a])
            nursery.cancel_scope.cancel()


def test_status_nats_says_when_there_is_no_cluster_bucket(
    nats_cluster: list[NatsNode], capsys: pytest.CaptureFixture[str]
) -> None:
    from artcafe_trio.cli import main

    url = nats_cluster[0].url
    assert main(["status", "--nats", url, "--nats-bucket", "no_such_bucket"]) == 1
    assert "no cluster bucket 'no_such_bucket'" in capsys.readouterr().err


# --- a hub killed: a real process --------------------------------------------------


async def real_connect(url: str, nursery: trio.Nursery, agent: str, key: PrivateKey) -> RawClient:
    ws = await trio_websocket.connect_websocket_url(
        nursery, f"{url}/api/v1/ws/agent/{agent}?tenant_id=t1"
    )
    client = RawClient(ws)
    await authenticate(client, agent, "t1", key)
    return client


def start_hub_process(
    db: Path, node: NatsNode, bucket: str, *extra: str
) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from artcafe_trio.cli import main; sys.exit(main())", "hub", "--db", str(db), "--port", "0",
         "--nats", node.url, "--hub-id", "hub-k", "--nats-lease-ttl", str(LEASE_TTL),
         "--disconnect-grace", str(GRACE), "--log-level", "warning", "--nats-bucket", bucket,
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "hub listening on ws://127.0.0.1:PORT"
    assert line.startswith("hub listening on "), line
    return proc, line.split()[-1]


@asynccontextmanager
async def hub_process_and_hub_a(
    nodes: list[NatsNode],
    tmp_path: Path,
    agents: Sequence[str],
    *,
    grace_a: float = GRACE,
    listen_a: bool = False,
) -> AsyncIterator[tuple[subprocess.Popen[str], str, TestHub, dict[str, PrivateKey]]]:
    """A real ``artcafe-trio hub`` (hub-k, on node 3) and hub-a in this process (node
    1, its disconnect grace ``grace_a``, on a loopback port if ``listen_a``), sharing a
    bucket; ``agents`` registered on both."""
    bucket = f"hubs_{secrets.token_hex(4)}"
    db = tmp_path / "k.db"
    keys = {agent: generate_private_key("ed25519") for agent in agents}
    with Registry.open(db) as registry:
        for agent, key in keys.items():
            registry.add_key("t1", agent, key.public_key)
    proc, url = await trio.to_thread.run_sync(start_hub_process, db, nodes[2], bucket)
    try:
        with Registry.open(":memory:") as registry:
            for agent, key in keys.items():
                registry.add_key("t1", agent, key.public_key)
            config = HubConfig(hub_id="hub-a", disconnect_grace=grace_a, close_timeout=0.5)
            async with open_cluster_hub(
                registry=registry, host="127.0.0.1", port=0 if listen_a else None,
                config=config, cluster=cluster_config(nodes[0], bucket),
            ) as hub_a:  # fmt: skip
                test_hub = TestHub(hub_a)
                yield proc, url, test_hub, keys
                await hang_up([test_hub])
    finally:
        if proc.poll() is None:
            proc.kill()
        await trio.to_thread.run_sync(proc.wait)


async def presence_watcher(hub: TestHub, nursery: trio.Nursery) -> RawClient:
    key = hub.register("t1", "watcher")
    watcher = RawClient(await hub.dial(nursery, "/api/v1/ws/agent/watcher?tenant_id=t1"))
    await authenticate(watcher, "watcher", "t1", key)
    await watcher.subscribe("$presence.*")
    return watcher


async def test_a_killed_hub_s_agents_go_offline_hub_lost_unless_they_moved(
    nats_cluster: list[NatsNode], tmp_path: Path
) -> None:
    stays = [f"stays-{i}" for i in range(50)]  # 100 agents on the killed hub
    moves = [f"moves-{i}" for i in range(50)]
    async with (
        hub_process_and_hub_a(nats_cluster, tmp_path, stays + moves) as (proc, url, a, keys),
        trio.open_nursery() as nursery,
    ):
        with trio.fail_after(30):
            alerts = FakePost()  # hub A's alert webhook: what it would POST
            await nursery.start(Webhook(a.hub, WebhookConfig(url="http://x/"), post=alerts).run)
            watcher = await presence_watcher(a, nursery)
            for agent, key in keys.items():
                await real_connect(url, nursery, agent, key)
            online = await presence_events(watcher, len(keys))
            assert sorted(online) == sorted((agent, "online", "connected") for agent in keys)
            proc.send_signal(signal.SIGKILL)
            killed = trio.current_time()
            for agent in moves:  # they reconnect to hub A within the grace
                moved = RawClient(await a.dial(nursery, f"/api/v1/ws/agent/{agent}?tenant_id=t1"))
                await authenticate(moved, agent, "t1", keys[agent])
            events = await presence_events(watcher, len(stays))
            detected = trio.current_time() - killed
            assert sorted(events) == sorted((agent, "offline", "hub_lost") for agent in stays)
            assert detected <= LEASE_TTL + GRACE + 1.0, detected
            print(f"hub_lost reported for {len(stays)} agents {detected:.2f} s after SIGKILL")
            assert await nothing_more(watcher, 0.5) == []  # the moved agents never flapped
            table = await query(watcher)
            assert {table[agent].reason for agent in stays} == {"hub_lost"}
            assert {table[agent].status for agent in moves} == {"online"}
            assert {table[agent].hub_id for agent in moves} == {"hub-a"}
            # Hub A posted its own watcher's online and, as the reaper, each hub_lost
            # once; hub-k's onlines were hub-k's to post, and the moves were no change.
            sent = [(d["agent_id"], d["reason"], d["hub_id"]) for _t, d in alerts.calls]
            assert sorted(sent) == sorted(
                [("watcher", "connected", "hub-a")] + [(s, "hub_lost", "hub-k") for s in stays]
            )
            assert {d["reported_by"] for _t, d in alerts.calls} == {"hub-a"}
            nursery.cancel_scope.cancel()


async def test_a_frozen_hub_is_reaped_and_closes_its_sessions_when_it_thaws(
    nats_cluster: list[NatsNode], tmp_path: Path
) -> None:
    """SIGSTOP: sockets stay open, the lease lapses, a reaper reports ``hub_lost``
    once; on SIGCONT the hub sees its agents reaped and closes their sessions (so
    they reconnect and claim again) without reporting anything itself."""
    async with (
        hub_process_and_hub_a(nats_cluster, tmp_path, ["frozen"]) as (proc, url, a, keys),
        trio.open_nursery() as nursery,
    ):
        with trio.fail_after(30):
            watcher = await presence_watcher(a, nursery)
            frozen = await real_connect(url, nursery, "frozen", keys["frozen"])
            assert await presence_events(watcher, 1) == [("frozen", "online", "connected")]
            proc.send_signal(signal.SIGSTOP)
            stopped = trio.current_time()
            assert await presence_events(watcher, 1) == [("frozen", "offline", "hub_lost")]
            detected = trio.current_time() - stopped
            assert detected <= LEASE_TTL + GRACE + 1.0, detected
            proc.send_signal(signal.SIGCONT)
            thawed = trio.current_time()
            assert await frozen.close_code() == CloseCode.REPLACED
            print(f"frozen hub: hub_lost after {detected:.2f} s; its session closed "
                  f"{trio.current_time() - thawed:.2f} s after SIGCONT")  # fmt: skip
            assert await nothing_more(watcher, 1.0) == []  # no flap back online
            assert (await query(watcher))["frozen"].reason == "hub_lost"
            nursery.cancel_scope.cancel()


async def test_a_frozen_hub_s_agents_time_out_by_their_own_watchdog_and_move_without_a_flap(
    nats_cluster: list[NatsNode], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Real agents (``open_agent`` with both hubs' URLs) on a hub that is SIGSTOPped:
    each agent's heartbeat-ACK watchdog fires at its timeout, it moves to the other
    hub within the reaper's grace, and nobody is told it was ever offline — not on the
    move, not when the frozen hub's lease lapses, not when it thaws."""
    from artcafe_trio import Backoff, open_agent

    names = [f"w{i}" for i in range(3)]
    interval, multiplier = 0.5, 3.0  # the hub's shortest interval; the watchdog: 1.5 s
    grace_a = 6.0  # the reaper's grace: the agents move well within it
    async with (
        hub_process_and_hub_a(
            nats_cluster, tmp_path, names, grace_a=grace_a, listen_a=True
        ) as (proc, url_k, a, keys),
        trio.open_nursery() as nursery,
    ):  # fmt: skip
        assert a.hub.url is not None
        with trio.fail_after(40):
            async with AsyncExitStack() as agents:
                watcher = await presence_watcher(a, nursery)
                opened = [
                    await agents.enter_async_context(
                        open_agent(
                            agent_id=name,
                            tenant_id="t1",
                            private_key=keys[name],
                            url=[url_k, a.hub.url],
                            heartbeat_interval=interval,
                            heartbeat_timeout_multiplier=multiplier,
                            heartbeat_jitter=0.0,
                            connect_timeout=2.0,  # first try: the frozen hub, then the other
                            backoff=Backoff(base=0.05, cap=0.1),
                        )
                    )
                    for name in names
                ]
                assert {agent.health().url for agent in opened} == {url_k}
                assert sorted(await presence_events(watcher, len(names))) == sorted(
                    (name, "online", "connected") for name in names
                )
                caplog.clear()
                stopped_wall = time.time()
                proc.send_signal(signal.SIGSTOP)
                try:
                    while not all(
                        agent.health().connected and agent.health().url == a.hub.url
                        for agent in opened
                    ):
                        await trio.sleep(0.02)
                    moved = time.time() - stopped_wall
                    # Past the lease's TTL and hub-a's grace: the reaper found the
                    # frozen hub's agents owned by hub-a and reported nothing. Watched
                    # until hub-a has reaped (its log says so, after the reap's writes),
                    # and a second more for anything the reap wrote to arrive.
                    reaps: list[str] = []
                    while not reaps:
                        assert await nothing_more(watcher, 0.1) == []
                        reaps = [
                            r.getMessage() for r in caplog.records
                            if r.getMessage().startswith("hub hub-k lost:")
                        ]  # fmt: skip
                    reaped = time.time() - stopped_wall
                    assert reaps == ["hub hub-k lost: 0 agent(s) marked offline (hub_lost)"]
                    assert reaped >= grace_a, reaped
                    assert await nothing_more(watcher, 1.0) == []
                finally:
                    proc.send_signal(signal.SIGCONT)
                assert await nothing_more(watcher, 1.0) == []  # the thaw changes nothing
                table = await query(watcher)
                assert {(table[n].status, table[n].hub_id) for n in names} == {("online", "hub-a")}
                timeouts = [
                    r.created - stopped_wall for r in caplog.records
                    if "no heartbeat ACK for" in r.getMessage()
                ]  # fmt: skip
                assert len(timeouts) == len(names), [r.getMessage() for r in caplog.records]
                # Each watchdog fired within its timeout of the last ACK (which came at most
                # one interval before the freeze), give or take scheduling on a busy machine.
                timeout = interval * multiplier
                assert all(timeout - interval - 0.05 <= t <= timeout + 0.5 for t in timeouts), (
                    timeouts
                )
                print(f"frozen hub: watchdogs fired {min(timeouts):.2f}-{max(timeouts):.2f} s, "
                      f"all {len(names)} agents on hub-a {moved:.2f} s after SIGSTOP, "
                      f"reaped {reaped:.2f} s after it")  # fmt: skip
                nursery.cancel_scope.cancel()


def test_cluster_config_parses_a_server_list() -> None:
    config = ClusterConfig(servers="nats://a:4222, nats://b:4222")
    assert config.servers == ("nats://a:4222", "nats://b:4222")
    with pytest.raises(ValueError, match="at least one"):
        ClusterConfig(servers=" , ")
    with pytest.raises(ValueError, match="lease_ttl"):
        ClusterConfig(servers="nats://a:4222", lease_ttl=0)
    assert json.dumps(list(config.servers))


def test_the_hub_command_wants_a_hub_id_with_nats(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from artcafe_trio.cli import main

    code = main(["hub", "--db", str(tmp_path / "x.db"), "--nats", "nats://127.0.0.1:1"])
    assert code != 0
    assert "--nats needs --hub-id" in capsys.readouterr().err


async def test_a_nats_node_killed_under_a_hub(own_nats_cluster: list[NatsNode]) -> None:
    """The hub reconnects to another node: routing and presence go on, nobody is
    reported offline (the lease TTL outlasts the bucket's leader election). Hub b is
    given only the nodes hub a is not on: the node that dies is under the publishing
    hub alone. (When it was under both, as a fresh-clone run drew, publishes confirmed
    while hub b was reconnecting were lost, as documented: no hub b, no interest.)"""
    bucket = f"hubs_{secrets.token_hex(4)}"
    urls = [node.url for node in own_nats_cluster]
    registries = [Registry.open(":memory:") for _ in range(2)]
    with trio.fail_after(40):
        async with AsyncExitStack() as stack:
            hubs: dict[str, TestHub] = {}
            for name, registry in zip("ab", registries, strict=True):
                if name == "b":
                    backplane_a = hubs["a"].hub._backplane  # type: ignore[attr-defined]
                    assert isinstance(backplane_a, NatsBackplane) and backplane_a._nc
                    under_a = backplane_a._nc.connected_server
                    assert under_a is not None
                    urls = [u for u in urls if not u.endswith(under_a)]
                    assert len(urls) == 2
                config = HubConfig(hub_id=f"hub-{name}", disconnect_grace=3.0, close_timeout=0.5)
                cluster = ClusterConfig(
                    servers=urls, lease_ttl=5.0, bucket=bucket, api_timeout=API_TIMEOUT
                )
                opened = open_cluster_hub(
                    registry=registry, port=None, config=config, cluster=cluster
                )
                hubs[name] = TestHub(await stack.enter_async_context(opened))
            nursery = await stack.enter_async_context(trio.open_nursery())
            c = Cluster(hubs, nursery)
            watcher = await c.connect("a", "watcher")
            await watcher.subscribe("$presence.*")
            await watcher.subscribe("jobs.*")
            worker = await c.connect("b", "worker")
            assert await presence_events(watcher, 1) == [("worker", "online", "connected")]
            await c.settle(worker, [watcher])
            # A stream of confirmed publishes from hub-a (whose node dies) to hub-b.
            near, far = await c.connect("a", "near"), await c.connect("b", "far")
            await far.subscribe("flow.*")
            await c.settle(near, [far])
            confirmed: dict[int, str] = {}  # publish number -> the phase it was confirmed in
            phase = "before"

            async def stream(stop: trio.Event) -> None:
                n = 0
                while not stop.is_set():
                    await near.send(Publish(subject=f"flow.{n}", data={"n": n}, id=f"f{n}"))
                    await near.recv_type(Published)
                    confirmed[n] = phase
                    n += 1
                    await trio.sleep(0.005)

            stop_stream = trio.Event()
            nursery.start_soon(stream, stop_stream)
            while len(confirmed) < 40:
                await trio.sleep(0.01)
            phase = "quiet"  # a pause: what was confirmed before has crossed the routes
            await trio.sleep(0.2)
            nc = c.backplane("a")._nc
            assert nc is not None
            server = nc.connected_server
            [victim] = [n for n in own_nats_cluster if server == f"127.0.0.1:{n.port}"]
            reconnects = nc.reconnects
            phase = "failing"
            await trio.to_thread.run_sync(victim.kill)
            killed = trio.current_time()
            while nc.reconnects == reconnects or not nc.is_connected:
                await trio.sleep(0.05)
            print(f"hub-a reconnected {trio.current_time() - killed:.2f} s after its node died")
            phase = "after"  # (far's interest is on its own, living node: no settling)
            after_from = len(confirmed)
            while len(confirmed) < after_from + 40:
                await trio.sleep(0.01)
            stop_stream.set()
            wanted = {n for n, when in confirmed.items() if when in ("before", "quiet", "after")}
            received: list[int] = []
            with trio.fail_after(10):
                while not wanted <= set(received):
                    [msg] = await far.messages(1)
                    if msg.subject.startswith("flow."):
                        received.append(msg.data["n"])  # type: ignore[index]
            assert received == sorted(set(received))  # in order, no duplicates
            failing = [n for n, when in confirmed.items() if when == "failing"]
            lost = sorted(set(failing) - set(received))
            print(f"confirmed publishes: {len(wanted)} outside the failure, all delivered; "
                  f"{len(failing)} during it, {len(lost)} of them lost; hub-a counted "
                  f"{c.backplane('a').routes_unconfirmed} unconfirmed")  # fmt: skip
            await nothing_more(far, 0.2)
            await c.settle(worker, [watcher])  # routes again (the subscriptions were re-sent)
            await worker.send(Publish(subject="jobs.one", data={"n": 1}, id="j1"))
            await worker.recv_type(Published)
            [got] = await watcher.messages(1)
            assert (got.subject, got.data) == ("jobs.one", {"n": 1})
            # Presence still flows through the bucket; nobody went offline meanwhile.
            late = await c.connect("b", "late")
            assert await presence_events(watcher, 1) == [("late", "online", "connected")]
            print(f"presence seen again {trio.current_time() - killed:.2f} s after the kill")
            assert await nothing_more(watcher, 1.0) == []  # no hub_lost, no flap
            table = await query(watcher)
            assert {agent: r.status for agent, r in table.items()} == {
                "watcher": "online", "worker": "online", "late": "online",
                "near": "online", "far": "online",
            }  # fmt: skip
            assert late.welcome is not None
            await hang_up(hubs.values())
            nursery.cancel_scope.cancel()
    for registry in registries:
        registry.close()


async def test_a_hub_restarted_after_a_crash_waits_for_its_lease_and_clears_its_claims(
    nats_cluster: list[NatsNode],
) -> None:
    """What a SIGKILLed hub leaves behind — its lease (until the TTL) and its agents'
    claims online — does not outlive its restart under the same id."""
    bucket = f"hubs_{secrets.token_hex(4)}"
    with trio.fail_after(20), Registry.open(":memory:") as registry:
        async with open_nats(nats_cluster[0].url) as nc:
            store = await open_cluster_store(nc, "hub-r", bucket=bucket, api_timeout=API_TIMEOUT)
            await store.kv.create(
                lease_key("hub-r"), HubLease("hub-r").encode(), ttl=LEASE_TTL
            )  # the crashed run's lease, no longer refreshed
            left = await store.claim("t1", "ghost", "s-old")
            assert left.status == "online"
            began = trio.current_time()
            config = HubConfig(hub_id="hub-r", disconnect_grace=GRACE, close_timeout=0.5)
            async with open_cluster_hub(
                registry=registry, port=None, config=config,
                cluster=cluster_config(nats_cluster[1], bucket),
            ):  # fmt: skip
                waited = trio.current_time() - began
                assert 0.3 < waited < LEASE_TTL + 3.0, waited  # the old lease expired first
                while (claim := await store.get("t1", "ghost")) is None or claim.status == "online":
                    await trio.sleep(0.05)
                assert (claim.hub, claim.reason, claim.epoch) == ("hub-r", "hub_lost", left.epoch)
                entry = await store.kv.entry(lease_key("hub-r"))
                assert entry is not None and HubLease.decode(entry.value).hub == "hub-r"


async def test_a_hub_restarted_after_draining_reports_what_it_left_online_disconnected(
    nats_cluster: list[NatsNode],
) -> None:
    """What a drained run left online, with the hub restarted under the same id before
    any reaper's grace ended (a rolling restart): an agent that comes back within the
    grace is never marked offline; one that does not is marked ``disconnected`` after
    the grace, as a reaper would have (not ``hub_lost``: that run did not crash)."""
    bucket = f"hubs_{secrets.token_hex(4)}"
    with trio.fail_after(20), Registry.open(":memory:") as registry:
        async with open_nats(nats_cluster[0].url) as nc, trio.open_nursery() as nursery:
            store = await open_cluster_store(nc, "hub-r", bucket=bucket, api_timeout=API_TIMEOUT)
            await store.kv.create(lease_key("hub-r"), HubLease("hub-r").encode(), ttl=LEASE_TTL)
            stranded = await store.claim("t1", "stranded", "s-old-1")
            returning_before = await store.claim("t1", "returning", "s-old-2")
            await store.drop_lease()  # the drained run's handover: claims left online
            writes: list[tuple[str, str, str, float]] = []

            async def record_writes() -> None:
                async with store.kv.watch("p.>") as watcher:
                    async for entry in watcher:
                        claim = PresenceClaim.decode(entry.value)
                        writes.append(
                            (claim.agent_id, claim.status, claim.reason, trio.current_time())
                        )

            nursery.start_soon(record_writes)
            config = HubConfig(hub_id="hub-r", disconnect_grace=GRACE, close_timeout=0.5)
            began = trio.current_time()
            async with open_cluster_hub(
                registry=registry, port=None, config=config,
                cluster=cluster_config(nats_cluster[1], bucket),
            ) as hub_r:  # fmt: skip
                started = trio.current_time()
                r = TestHub(hub_r)
                key = r.register("t1", "returning")
                back = RawClient(await r.dial(nursery, "/api/v1/ws/agent/returning?tenant_id=t1"))
                await authenticate(back, "returning", "t1", key)
                while (claim := await store.get("t1", "stranded")) == stranded:
                    await trio.sleep(0.05)
                assert claim is not None
                assert (claim.status, claim.reason) == ("offline", "disconnected")
                assert claim.epoch == stranded.epoch  # released at the drained run's epoch
                # After the grace (which began while the hub started), not at once.
                assert trio.current_time() - began >= GRACE
                returning = await store.get("t1", "returning")
                assert returning is not None
                assert (returning.status, returning.hub) == ("online", "hub-r")
                assert returning.epoch == returning_before.epoch + 1
                await trio.sleep(0.2)  # time for a wrong write to show
                seen = list(writes)  # (its stop, alone, then marks "returning" offline)
            nursery.cancel_scope.cancel()
        offline_at = [at for a, st, _, at in seen if (a, st) == ("stranded", "offline")]
        print(f"\nrestart after a drain: hub up {started - began:.2f} s; stranded offline "
              f"{offline_at[0] - started:.2f} s after it")  # fmt: skip
        # Never offline for the agent that came back: no write but its two claims.
        assert [(a, st) for a, st, _, _ in seen if a == "returning"] == [
            ("returning", "online"), ("returning", "online"),
        ]  # fmt: skip


async def test_shared_credentials_admit_and_revoke_on_every_hub(
    nats_cluster: list[NatsNode],
) -> None:
    """With ``shared_credentials`` the hubs authenticate from the bucket (their own
    registries are empty): a key published once admits the agent on every hub, and
    disabling it closes the agent's session wherever it is, within a second."""
    bucket = f"hubs_{secrets.token_hex(4)}"
    key = generate_private_key("ed25519")
    with (
        trio.fail_after(20),
        Registry.open(":memory:") as reg_a,
        Registry.open(":memory:") as reg_b,
    ):
        async with open_nats(nats_cluster[0].url) as nc, AsyncExitStack() as stack:
            kv = (await open_cluster_store(nc, "cli", bucket=bucket, api_timeout=API_TIMEOUT)).kv
            await publish_agent(kv, "t1", "x", (key.public_key,))
            hubs = {}
            for name, registry, node in (
                ("a", reg_a, nats_cluster[0]),
                ("b", reg_b, nats_cluster[1]),
            ):
                config = HubConfig(hub_id=f"hub-{name}", disconnect_grace=GRACE, close_timeout=0.5)
                cluster = attrs.evolve(cluster_config(node, bucket), shared_credentials=True)
                opened = open_cluster_hub(
                    registry=registry, port=None, config=config, cluster=cluster
                )
                hubs[name] = TestHub(await stack.enter_async_context(opened))
            nursery = await stack.enter_async_context(trio.open_nursery())
            on_a = RawClient(await hubs["a"].dial(nursery, "/api/v1/ws/agent/x?tenant_id=t1"))
            await authenticate(on_a, "x", "t1", key)
            await on_a.send(Leave())
            assert await on_a.close_code() == CloseCode.NORMAL
            on_b = RawClient(await hubs["b"].dial(nursery, "/api/v1/ws/agent/x?tenant_id=t1"))
            await authenticate(on_b, "x", "t1", key)
            await publish_agent(kv, "t1", "x", (key.public_key,), disabled=True)
            disabled = trio.current_time()
            assert await on_b.close_code() == CloseCode.KEY_REVOKED
            revoked = trio.current_time() - disabled
            assert revoked < 1.0, revoked
            print(f"a disabled agent's session closed {revoked:.2f} s after the bucket write")
            nursery.cancel_scope.cancel()


async def test_the_hub_command_serves_the_bucket_s_credentials(
    nats_cluster: list[NatsNode], tmp_path: Path
) -> None:
    bucket = f"hubs_{secrets.token_hex(4)}"
    key = generate_private_key("ed25519")
    async with open_nats(nats_cluster[0].url) as nc:
        kv = (await open_cluster_store(nc, "cli", bucket=bucket, api_timeout=API_TIMEOUT)).kv
        await publish_agent(kv, "t1", "x", (key.public_key,))
        proc, url = await trio.to_thread.run_sync(
            start_hub_process, tmp_path / "empty.db", nats_cluster[2], bucket,
            "--nats-shared-credentials",
        )  # fmt: skip
        try:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    client = await real_connect(url, nursery, "x", key)  # not in empty.db
                    assert client.welcome is not None
                    assert client.welcome.hub_id == "hub-k"
                    # Closed, not just cancelled: the stopping hub would wait its
                    # close_timeout (2 s) for a close handshake from a dead client.
                    await client.ws.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            proc.terminate()
            await trio.to_thread.run_sync(proc.wait)


def test_the_hub_command_s_nats_options_make_the_cluster_config(tmp_path: Path) -> None:
    import ssl

    import trustme

    from artcafe_trio.cli._hubcmd import CliError, _cluster_config
    from artcafe_trio.cli._parser import build_parser

    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    args = build_parser().parse_args(
        ["hub", "--nats", "tls://u:p@n1:4222,tls://n2:4222", "--hub-id", "h1",
         "--nats-ca", str(ca), "--nats-lease-ttl", "3", "--nats-bucket", "b1",
         "--nats-replicas", "1", "--nats-shared-credentials", "--nats-claim-ttl", "600"]
    )  # fmt: skip
    config = _cluster_config(args)
    assert config.claim_ttl == 600.0
    assert config.servers == ("tls://u:p@n1:4222", "tls://n2:4222")
    assert (config.lease_ttl, config.bucket, config.replicas) == (3.0, "b1", 1)
    assert config.shared_credentials and isinstance(config.tls, ssl.SSLContext)
    args.nats_ca = str(tmp_path / "missing.pem")
    with pytest.raises(CliError, match="--nats-ca"):
        _cluster_config(args)


def test_the_hub_command_s_advertise_url_goes_into_the_cluster_config() -> None:
    from artcafe_trio.cli._hubcmd import CliError, _cluster_config
    from artcafe_trio.cli._parser import build_parser

    def parse(*extra: str) -> Any:
        return build_parser().parse_args(["hub", "--hub-id", "h1", *extra])

    args = parse("--nats", "nats://n1:4222", "--advertise-url", "wss://hub1.example:443")
    config = _cluster_config(args)
    assert config is not None and config.advertise_url == "wss://hub1.example:443"
    with pytest.raises(CliError, match="--advertise-url must be"):
        _cluster_config(parse("--nats", "nats://n1:4222", "--advertise-url", "http://x"))
    with pytest.raises(CliError, match="--advertise-url needs --nats"):
        _cluster_config(parse("--advertise-url", "ws://x:1"))


async def test_an_agent_given_one_hub_learns_the_others_and_fails_over_to_them(
    nats_cluster: list[NatsNode],
) -> None:
    """A real agent on hub A, which stops gracefully (drains): the agent moves to B
    (learnt from A's welcome) within B's grace, and no presence event is emitted."""
    bucket = f"hubs_{secrets.token_hex(4)}"
    url_a, url_b = "ws://hub-a.test:8765", "ws://hub-b.test:8765"
    key = generate_private_key("ed25519")
    with (
        trio.fail_after(30),
        Registry.open(":memory:") as reg_a,
        Registry.open(":memory:") as reg_b,
    ):
        for registry in (reg_a, reg_b):
            registry.add_key("t1", "mover", key.public_key)
        config_a = HubConfig(hub_id="hub-a", disconnect_grace=GRACE, close_timeout=0.5)
        # B's grace is its reaper's for A's deleted lease: longer than the agent's
        # first backoff (up to 1 s) plus its attempt at A, as the 5 s default is.
        config_b = HubConfig(hub_id="hub-b", disconnect_grace=3.0, close_timeout=0.5)
        cluster_a = attrs.evolve(cluster_config(nats_cluster[0], bucket), advertise_url=url_a)
        cluster_b = attrs.evolve(cluster_config(nats_cluster[1], bucket), advertise_url=url_b)
        # The agent and the watcher live in a nursery outside hub A's scope: stopping
        # A must not cancel the rest of the test.
        async with (
            open_cluster_hub(registry=reg_b, port=None, config=config_b,
                             cluster=cluster_b) as hub_b,
            trio.open_nursery() as nursery,
        ):  # fmt: skip
            b = TestHub(hub_b)
            watcher = RawClient(await b.dial(nursery, "/api/v1/ws/agent/watcher?tenant_id=t1"))
            await authenticate(watcher, "watcher", "t1", b.register("t1", "watcher"))
            await watcher.subscribe("$presence.mover")
            with trio.CancelScope() as a_scope:
                async with open_cluster_hub(
                    registry=reg_a, port=None, config=config_a, cluster=cluster_a
                ) as hub_a:
                    a = TestHub(hub_a)
                    backplane_a = hub_a._backplane  # type: ignore[attr-defined]
                    assert isinstance(backplane_a, NatsBackplane)
                    while backplane_a.connect_urls() != (url_b,):  # B's lease, watched
                        await trio.sleep(0.05)
                    transports = {url_a: a.transport, url_b: b.transport}
                    agent = await nursery.start(
                        functools.partial(
                            run_agent_until_stopped, key=key, url=url_a, transports=transports
                        )
                    )
                    assert agent.health().url == url_a
                    assert agent._sup.urls.all == (url_a, url_b)  # from A's welcome
                    assert await presence_events(watcher, 1) == [("mover", "online", "connected")]
                    stopped = trio.current_time()
                    a.down = True  # from now on A refuses connections, as a closed port
                    a_scope.cancel()  # A stops: its agents are closed with 1012
            with trio.fail_after(10):
                while agent.health().url != url_b or not agent.health().connected:
                    await trio.sleep(0.05)
            moved = trio.current_time() - stopped
            print(f"\nreal agent drained from hub a to hub b in {moved:.2f} s")
            await agent.publish("moved", {"to": "b"})
            # Past B's grace for A's deleted lease: no offline, no online.
            assert await nothing_more(watcher, 3.0 + 0.5) == []
            record = (await query(watcher))["mover"]
            assert (record.status, record.hub_id) == ("online", "hub-b")
            agent.stop()
            await hang_up([b])
            nursery.cancel_scope.cancel()


async def run_agent_until_stopped(
    *, key: PrivateKey, url: str, transports: dict[str, Any], task_status: Any
) -> None:
    from artcafe_trio import run_agent

    await run_agent(
        agent_id="mover", tenant_id="t1", private_key=key, url=url, transport=transports,
        task_status=task_status,
    )  # fmt: skip


async def test_a_listening_hub_advertises_its_url_without_advertise_url(
    nats_cluster: list[NatsNode],
) -> None:
    bucket = f"hubs_{secrets.token_hex(4)}"
    with (
        trio.fail_after(20),
        Registry.open(":memory:") as reg_a,
        Registry.open(":memory:") as reg_b,
    ):
        async with (
            open_cluster_hub(
                registry=reg_a, host="127.0.0.1", port=0, config=HubConfig(hub_id="hub-a"),
                cluster=cluster_config(nats_cluster[0], bucket),
            ) as hub_a,
            open_cluster_hub(
                registry=reg_b, port=None, config=HubConfig(hub_id="hub-b"),
                cluster=cluster_config(nats_cluster[1], bucket),
            ) as hub_b,
        ):  # fmt: skip
            assert hub_a.url is not None and hub_a.url.startswith("ws://127.0.0.1:")
            backplane_b = hub_b._backplane  # type: ignore[attr-defined]
            assert isinstance(backplane_b, NatsBackplane)
            with trio.fail_after(LEASE_TTL * 2):  # written with A's next lease refresh
                while backplane_b.connect_urls() != (hub_a.url,):
                    await trio.sleep(0.05)
            backplane_a = hub_a._backplane  # type: ignore[attr-defined]
            assert backplane_a.connect_urls() == ()  # B listens nowhere: nothing to advertise
