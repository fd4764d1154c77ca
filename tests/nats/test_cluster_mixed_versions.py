"""A rolling upgrade's mixed cluster: a "newer" hub whose records carry fields this
version does not know and an "older" hub whose records lack the optional ones,
over a real nats-server, interoperate (docs/cluster.md, "Upgrades").

Both hubs run this code; the version difference is in what they write: the records'
``encode`` is patched by owner hub id, so hub-new's claims and lease carry extra fields
and hub-old's are written as the first cluster release wrote them (claims without
capabilities and metadata, a lease without URLs). The credentials are written in a
newer and an older shape too. The sans-IO half: tests/test_cluster_upgrade.py.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

import pytest
import trio

from artcafe_trio import CloseCode, HubConfig, Registry
from artcafe_trio.cli._status import _read_cluster_hubs
from artcafe_trio.cluster import ClusterConfig, HubLease, PresenceClaim, open_cluster_hub
from artcafe_trio.cluster._credentials import credentials_key
from artcafe_trio.cluster._records import presence_key
from artcafe_trio.cluster._store import open_cluster_store
from artcafe_trio.nats import open_nats
from artcafe_trio.protocol import Message, Publish
from artcafe_trio.protocol._keys import generate_private_key
from artcafe_trio.testing import TestHub

from ..conftest import RawClient
from .servers import NatsNode
from .test_cluster_hubs import authenticate, hang_up, nothing_more, presence_events, query

pytestmark = pytest.mark.timeout(60)

FUTURE = {"zone": "eu-1", "schema": 7, "hint": {"ttl": 30, "tags": ["a"]}}


def _by_owner(
    original: Callable[[object], bytes], owner: Callable[[object], str], old_fields: set[str]
) -> Callable[[object], bytes]:
    def encode(self: object) -> bytes:
        obj = json.loads(original(self))
        if owner(self) == "hub-new":
            obj.update(FUTURE)
        elif owner(self) == "hub-old":
            obj = {name: value for name, value in obj.items() if name in old_fields}
        return json.dumps(obj).encode()

    return encode


OLD_CLAIM_FIELDS = {"tenant_id", "agent_id", "hub", "epoch", "status", "reason", "since",
                    "session_id"}  # fmt: skip


async def test_a_newer_and_an_older_hub_interoperate(
    nats_node: NatsNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PresenceClaim, "encode", _by_owner(
        PresenceClaim.encode, lambda claim: claim.hub, OLD_CLAIM_FIELDS  # type: ignore[attr-defined]
    ))  # fmt: skip
    monkeypatch.setattr(HubLease, "encode", _by_owner(
        HubLease.encode, lambda lease: lease.hub, {"hub", "started", "draining"}  # type: ignore[attr-defined]
    ))  # fmt: skip
    bucket = f"mixed_{secrets.token_hex(4)}"
    keys = {agent: generate_private_key("ed25519") for agent in ("n1", "o1", "watcher")}

    def opened(key: str) -> str:
        return keys[key].public_key.to_openssh()

    with (
        trio.fail_after(30),
        Registry.open(":memory:") as reg_new,
        Registry.open(":memory:") as reg_old,
    ):
        async with open_nats(nats_node.url) as nc, trio.open_nursery() as nursery:
            kv = (await open_cluster_store(nc, "admin", bucket=bucket, replicas=1)).kv
            # Credentials: a newer writer's extra fields; an older one's without "disabled".
            await kv.put(
                credentials_key("t1", "n1"),
                json.dumps({"keys": [opened("n1")], "disabled": False, **FUTURE}).encode(),
            )
            await kv.put(credentials_key("t1", "o1"), json.dumps({"keys": [opened("o1")]}).encode())
            await kv.put(credentials_key("t1", "watcher"),
                         json.dumps({"keys": [opened("watcher")], "disabled": False}).encode())  # fmt: skip
            scopes: dict[str, trio.CancelScope] = {}

            async def run_hub(
                name: str, registry: Registry, *, task_status: trio.TaskStatus[TestHub]
            ) -> None:
                cluster = ClusterConfig(servers=nats_node.url, bucket=bucket, replicas=1,
                                        lease_ttl=1.0, shared_credentials=True)  # fmt: skip
                config = HubConfig(hub_id=name, disconnect_grace=0.5, close_timeout=0.5)
                with trio.CancelScope() as scopes[name]:
                    async with open_cluster_hub(
                        registry=registry, port=None, config=config, cluster=cluster
                    ) as hub:
                        task_status.started(TestHub(hub))
                        await trio.sleep_forever()

            hubs = {name: await nursery.start(run_hub, name, registry)
                    for name, registry in (("hub-new", reg_new), ("hub-old", reg_old))}  # fmt: skip

            async def connect(hub: str, agent: str, **fields: object) -> RawClient:
                resource = f"/api/v1/ws/agent/{agent}?tenant_id=t1"
                client = RawClient(await hubs[hub].dial(nursery, resource))
                await authenticate(client, agent, "t1", keys[agent], **fields)
                return client

            watcher = await connect("hub-old", "watcher")
            await watcher.subscribe("$presence.*")
            n1 = await connect("hub-new", "n1", capabilities=("gpu",))
            assert await presence_events(watcher, 1) == [("n1", "online", "connected")]
            o1 = await connect("hub-old", "o1", capabilities=("cpu",))
            assert await presence_events(watcher, 1) == [("o1", "online", "connected")]

            # The patch is in force: the records really are in the two shapes.
            async def stored(key: str) -> dict[str, object]:
                entry = await kv.get(key)
                assert entry is not None
                return json.loads(entry.value)  # type: ignore[no-any-return]

            assert FUTURE.items() <= (await stored(presence_key("t1", "n1"))).items()
            assert set(await stored(presence_key("t1", "o1"))) == OLD_CLAIM_FIELDS
            assert FUTURE.items() <= (await stored("h.hub-new")).items()
            assert set(await stored("h.hub-old")) == {"hub", "started", "draining"}

            # One table on both hubs; an older claim has no capabilities to show.
            for client in (n1, watcher):
                table = await query(client)
                assert {a: (r.hub_id, r.status, r.capabilities) for a, r in table.items()} == {
                    "n1": ("hub-new", "online", ("gpu",)),
                    "o1": ("hub-old", "online", ("cpu",) if client is watcher else ()),
                    "watcher": ("hub-old", "online", ()),
                }  # fmt: skip

            # Messages cross from the newer hub to the older one, once.
            await o1.subscribe("jobs.*")
            arrived = False
            while not arrived:  # until o1's interest has reached hub-new over NATS
                await n1.send(Publish(subject="jobs.probe", data={}))
                with trio.move_on_after(0.1):
                    arrived = isinstance(await o1.recv_type(Message), Message)
            await nothing_more(o1, 0.2)
            await n1.send(Publish(subject="jobs.real", data={"n": 1}))
            (message,) = await o1.messages(1)
            assert (message.subject, message.data, message.sender) == ("jobs.real", {"n": 1}, "n1")
            assert [f for f in await nothing_more(o1, 0.3) if isinstance(f, Message)] == []

            # status --nats lists both leases.
            listed = await _read_cluster_hubs([nats_node.url], bucket)
            assert [(h["hub_id"], h["state"], h["urls"]) for h in listed] == [
                ("hub-new", "live", []), ("hub-old", "live", []),
            ]  # fmt: skip

            # Take-over across versions: o1 moves to hub-new, whose claim (newer shape)
            # the older hub reads as a take-over: session closed 4003, no presence event.
            o1_moved = await connect("hub-new", "o1", capabilities=("cpu",))
            assert await o1.close_code() == CloseCode.REPLACED
            assert FUTURE.items() <= (await stored(presence_key("t1", "o1"))).items()
            assert await nothing_more(watcher, 0.5) == []

            # And the other way: n1 moves to hub-old, whose claim (older shape) hub-new
            # reads as a take-over.
            n1_moved = await connect("hub-old", "n1", capabilities=("gpu",))
            assert await n1.close_code() == CloseCode.REPLACED
            assert set(await stored(presence_key("t1", "n1"))) == OLD_CLAIM_FIELDS
            assert await nothing_more(watcher, 0.5) == []

            # hub-new stops gracefully (it drains: o1 stays online for hub-old to take
            # over or reap): o1 does not come back, so hub-old's reaper reports it
            # offline after the grace.
            scopes["hub-new"].cancel()
            assert await presence_events(watcher, 1) == [("o1", "offline", "disconnected")]
            assert await o1_moved.close_code() == CloseCode.SERVICE_RESTART
            assert (await query(n1_moved))["n1"].status == "online"  # still, on hub-old
            await hang_up(hubs.values())
            nursery.cancel_scope.cancel()
