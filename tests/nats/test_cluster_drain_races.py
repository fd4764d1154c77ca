"""Races around a drained hub, found in review (each failed before its fix), against a
real nats-server: a reap by another hub is never mistaken for our own write; the last
hub out releases what its drained previous run left; a draining hub does not report
the transitions it holds back."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import trio

from artcafe_trio.cluster._claims import ClaimKeeper
from artcafe_trio.cluster._config import ClusterConfig
from artcafe_trio.cluster._drain import Drain
from artcafe_trio.cluster._reaper import DISCONNECTED
from artcafe_trio.cluster._records import HubLease, lease_key
from artcafe_trio.cluster._store import ClusterStore, open_cluster_store
from artcafe_trio.hub import _hubevents
from artcafe_trio.nats import open_nats

from . import test_cluster_hubs
from .servers import API_TIMEOUT, NatsNode


class Peer:
    """The hub side of a ClaimKeeper: records what it is told."""

    def __init__(self) -> None:
        self.claimed: list[object] = []
        self.observed: list[object] = []

    def session_claimed(self, claim: object) -> None:
        self.claimed.append(claim)

    def presence_observed(self, update: object) -> None:
        self.observed.append(update)

    def describe_session(self, session_id: str) -> tuple[tuple[str, ...], dict[str, Any]]:
        return ((), {})


def keeper_for(hub: str) -> ClaimKeeper:
    return ClaimKeeper(ClusterConfig(servers="nats://127.0.0.1:1", claim_ttl=60), hub)


async def test_a_disconnected_reap_by_another_hub_closes_our_live_session(
    nats_node: NatsNode,
) -> None:
    """Hub a (restarted under its id) holds w0's new session when hub b reaps a's
    drained run as ``disconnected``: a must close the session (the agent claims
    again), not take the reap for its own write and serve an agent shown offline."""
    async with open_nats(nats_node.url) as nc:
        a = await open_cluster_store(
            nc, "a", bucket=f"race{secrets.token_hex(3)}", replicas=1,
            api_timeout=API_TIMEOUT, claim_ttl=60,
        )  # fmt: skip
        b = ClusterStore(a.kv, "b", claim_ttl=60)
        keeper, peer = keeper_for("a"), Peer()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                keeper.bind(peer, a, nursery)  # type: ignore[arg-type]
                new = await a.claim("acme", "w0", "s-new")
                keeper._keep(("acme", "w0"), new)
                [reaped] = await b.reap("a", reason=DISCONNECTED)
                assert reaped.reaper == "b"
                keeper._claim_changed(("acme", "w0"), reaped, initial=False)
                assert len(peer.claimed) == 1  # the session is closed, to claim again
                assert ("acme", "w0") not in keeper._claims
                nursery.cancel_scope.cancel()


async def test_the_last_hub_out_releases_what_its_drained_previous_run_left(
    nats_node: NatsNode,
) -> None:
    async with open_nats(nats_node.url) as nc:
        store = await open_cluster_store(
            nc, "a", bucket=f"left{secrets.token_hex(3)}", replicas=1,
            api_timeout=API_TIMEOUT, claim_ttl=60,
        )  # fmt: skip
        left = await store.claim("acme", "y", "s-run1")  # run 1 drained: y left online
        await store.kv.put(lease_key("a"), HubLease("a").encode())
        await store.kv.delete(lease_key("a"))  # run 1's lease, deleted by its drain
        keeper = keeper_for("a")
        drain = Drain(keeper, grace=30.0, lease_ttl=1.0)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                keeper.bind(Peer(), store, nursery)  # type: ignore[arg-type]
                await drain.after_previous_run(store, nursery)  # run 2 starts
                await nursery.start(keeper.watch, store)
                assert ("acme", "y") in (keeper.leftovers or {})
                drain.begin()  # run 2 stops within the grace, the last hub out
                await drain.hand_over(store, [])
                nursery.cancel_scope.cancel()
        now = await store.get("acme", "y")
        assert now is not None and now.epoch == left.epoch
        assert (now.status, now.reason) == ("offline", "disconnected")


async def test_a_draining_hub_reports_only_what_it_does_not_hold_back(
    nats_cluster: list[NatsNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain test, with every hub's events about hub b's agents recorded: the agent
    that moved (y) is never reported offline by any hub; the one that did not (z),
    once (by the reaper). Before, the draining hub reported both at its stop."""
    seen: list[tuple[str, str, bool]] = []
    presence = _hubevents.HubEvents.presence

    def record(self: Any, tenant_id: str, agent_id: str, status: str, *rest: Any, **kw: Any) -> Any:
        if kw.get("hub_id") == "hub-b":  # the drained hub's agents (not the others' stops)
            seen.append((agent_id, status, kw.get("local", True)))
        return presence(self, tenant_id, agent_id, status, *rest, **kw)

    monkeypatch.setattr(_hubevents.HubEvents, "presence", record)
    await test_cluster_hubs.test_a_hub_stopped_gracefully_drains_its_agents_to_other_hubs_without_a_flap(
        nats_cluster
    )
    reported = [(agent, status) for agent, status, local in seen if local and agent in "yz"]
    assert ("y", "offline") not in reported
    assert reported.count(("z", "offline")) == 1
