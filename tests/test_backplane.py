"""The Backplane seam: what a hub hands to other hubs, and what it does with theirs.

A recording backplane stands in for a cluster (the NATS one will plug in at the same
place); in memory, under autojump_clock.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from artcafe_trio import CloseCode, HubConfig, Registry
from artcafe_trio.hub._backplane import (
    BackplanePeer,
    LocalBackplane,
    PresenceUpdate,
    Route,
    SessionClaim,
)
from artcafe_trio.hub._serve import _serve_hub
from artcafe_trio.protocol import (
    AdminAuth,
    Challenge,
    Leave,
    Message,
    PresenceQuery,
    PresenceState,
    Publish,
    Published,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    encode,
)
from artcafe_trio.testing import TestHub

from .conftest import RawClient, raw_connect

pytestmark = pytest.mark.timeout(30)


class RecordingBackplane(LocalBackplane):
    """Records every call; ``peer`` lets a test play the other hubs."""

    def __init__(self) -> None:
        self.peer: BackplanePeer | None = None
        self.interests: list[tuple[str, str, bool]] = []
        self.routes: list[Route] = []
        self.claims: list[SessionClaim] = []
        self.announced: list[PresenceUpdate] = []
        self.routed_elsewhere: dict[str, str] = {}  # publish id -> its earlier message id
        #: Per begin_drain call: how many transitions were announced before it, and
        #: which claimed sessions were still open then.
        self.drains: list[tuple[int, list[bool]]] = []

    async def run(
        self, peer: BackplanePeer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.peer = peer
        task_status.started()

    def interest(self, tenant_id: str, pattern: str, present: bool) -> None:
        self.interests.append((tenant_id, pattern, present))

    async def publish_route(self, route: Route) -> str | None:
        self.routes.append(route)
        return self.routed_elsewhere.get(route.publish_id or "")

    async def claim_session(self, claim: SessionClaim) -> None:
        self.claims.append(claim)

    def announce_presence(self, update: PresenceUpdate) -> None:
        self.announced.append(update)

    def begin_drain(self) -> None:
        assert self.peer is not None
        open_sessions = [self.peer.describe_session(c.session_id) is not None for c in self.claims]
        self.drains.append((len(self.announced), open_sessions))


@asynccontextmanager
async def hub_over(backplane: RecordingBackplane, **fields: Any) -> AsyncIterator[TestHub]:
    config = HubConfig(hub_id="hub-a", close_timeout=0.5, **fields)
    with Registry.open(":memory:") as registry:
        async with trio.open_nursery() as nursery:
            serve = functools.partial(
                _serve_hub, registry=registry, db=None, host=None, port=None, config=config,
                ssl_context=None, tls_cert=None, tls_key=None, admin_file=None,
                backplane=backplane,
            )  # fmt: skip
            hub = await nursery.start(serve)
            yield TestHub(hub)
            nursery.cancel_scope.cancel()


async def connect(hub: TestHub, nursery: trio.Nursery, agent: str, tenant: str = "t1") -> RawClient:
    client = await raw_connect(hub, nursery, agent, tenant, hub.register(tenant, agent))
    assert client.welcome is not None
    return client


async def test_a_hub_alone_hands_its_routes_claims_interest_and_presence_to_the_backplane(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    backplane = RecordingBackplane()
    async with hub_over(backplane) as hub:
        a = await connect(hub, nursery, "a")
        b = await connect(hub, nursery, "b")
        await a.subscribe("jobs.*")
        await b.subscribe("jobs.*")  # the same pattern again: interest is already known
        await b.send(Publish(subject="jobs.new", data={"n": 1}, id="p1"))
        confirmed = await b.recv_type(Published)
        [got] = await a.messages(1)
        [route] = backplane.routes
        assert route == Route(
            "t1", "jobs.new", '{"n":1}', "b", confirmed.message_id, got.time, None, "p1"
        )
        assert got.message_id == confirmed.message_id
        assert [(c.agent_id, c.hub_id, c.replaced) for c in backplane.claims] == [
            ("a", "hub-a", None),
            ("b", "hub-a", None),
        ]
        await a.send(Unsubscribe(id="u", subject="jobs.*"))
        await a.recv_type(Unsubscribed)
        assert backplane.interests == [("t1", "jobs.*", True)]
        await b.send(Leave())
        assert await b.close_code() == CloseCode.NORMAL
        await trio.sleep(0.1)
        assert backplane.interests == [("t1", "jobs.*", True), ("t1", "jobs.*", False)]
        announced = [(u.agent_id, u.status, u.reason, u.local) for u in backplane.announced]
        assert announced == [
            ("a", "online", "connected", True),
            ("b", "online", "connected", True),
            ("b", "offline", "left", True),
        ]
        assert all(u.hub_id == "hub-a" for u in backplane.announced)


async def test_a_graceful_stop_tells_the_backplane_it_drains_before_closing_sessions(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    """The backplane learns of the stop while every session is still open, so it can
    decide what to do with the ``disconnected`` transitions that follow."""
    backplane = RecordingBackplane()
    async with hub_over(backplane) as hub:
        a = await connect(hub, nursery, "a")
        b = await connect(hub, nursery, "b")
        assert backplane.drains == []  # not while serving
    assert await a.close_code() == CloseCode.SERVICE_RESTART
    assert await b.close_code() == CloseCode.SERVICE_RESTART
    [(announced_before, open_sessions)] = backplane.drains  # once
    assert open_sessions == [True, True]
    after = [(u.agent_id, u.status, u.reason) for u in backplane.announced[announced_before:]]
    assert sorted(after) == [("a", "offline", "disconnected"), ("b", "offline", "disconnected")]


async def test_a_route_from_another_hub_is_delivered_here_once_and_not_sent_back(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    backplane = RecordingBackplane()
    async with hub_over(backplane) as hub:
        a = await connect(hub, nursery, "a")
        other_tenant = await connect(hub, nursery, "a", tenant="t2")
        await a.subscribe("jobs.*")
        await a.subscribe("jobs.>")  # two matching patterns: still one delivery
        await other_tenant.subscribe("jobs.*")
        assert backplane.peer is not None
        await backplane.peer.route_arrived(
            Route("t1", "jobs.new", '{"n":2}', "far", "hub-b-7", 5.0)
        )
        [got] = await a.messages(1)
        assert (got.subject, got.data, got.sender, got.message_id, got.time) == (
            "jobs.new", {"n": 2}, "far", "hub-b-7", 5.0,
        )  # fmt: skip
        await a.send(Publish(subject="after", data=None, id="p"))
        assert isinstance(await a.recv(), Published)  # nothing else was queued for it
        assert [r.subject for r in backplane.routes] == ["after"]
        await other_tenant.send(Publish(subject="x", data=None, id="q"))
        assert isinstance(await other_tenant.recv(), Published)  # t2 got nothing


async def test_a_claim_won_on_another_hub_closes_ours_as_replaced_without_a_flap(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    backplane = RecordingBackplane()
    async with hub_over(backplane, disconnect_grace=0) as hub:
        watcher = await connect(hub, nursery, "w")
        await watcher.subscribe("$presence.*")
        a = await connect(hub, nursery, "a")
        await watcher.recv_type(Message)  # a online
        assert backplane.peer is not None
        backplane.peer.session_claimed(SessionClaim("t1", "a", "s-elsewhere", "hub-b"))
        assert await a.close_code() == CloseCode.REPLACED
        await trio.sleep(1.0)
        # The other hub owns presence now: no offline here, none announced.
        assert [(u.agent_id, u.status) for u in backplane.announced] == [
            ("w", "online"),
            ("a", "online"),
        ]
        [row] = [r for r in hub.hub.presence_table("t1") if r.agent_id == "a"]
        assert row.status == "online"
        await watcher.send(Publish(subject="x", data=None, id="p"))
        assert isinstance(await watcher.recv(), Published)  # no presence event came first


async def test_presence_observed_from_another_hub_is_shown_not_persisted_or_announced(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    backplane = RecordingBackplane()
    async with hub_over(backplane) as hub:
        watcher = await connect(hub, nursery, "w")
        await watcher.subscribe("$presence.*")
        assert backplane.peer is not None
        with hub.hub.events.subscribe() as events:
            far = PresenceUpdate(
                "t1", "far", "online", "connected", 7.0, "s-far", "hub-b", local=False
            )
            backplane.peer.presence_observed(far)
            backplane.peer.presence_observed(far)  # seen twice: one transition
            [event] = await watcher.messages(1)
            assert (event.subject, event.data["status"], event.data["session_id"]) == (
                "$presence.far", "online", "s-far",
            )  # fmt: skip
            assert events.receive_nowait().agent_id == "far"  # type: ignore[union-attr]
            with pytest.raises(trio.WouldBlock):
                events.receive_nowait()
        [row] = [r for r in hub.hub.presence_table("t1") if r.agent_id == "far"]
        assert (row.status, row.session_id, row.since) == ("online", "s-far", 7.0)
        assert [u.agent_id for u in backplane.announced] == ["w"]
        assert hub.hub._presence_writer.pending == []
        await trio.sleep(30)  # a remote agent has no deadline here: still online
        [row] = [r for r in hub.hub.presence_table("t1") if r.agent_id == "far"]
        assert row.status == "online"
        # Shutting down reports its own agents offline, not another hub's.
        await watcher.send(Leave())
    assert [(u.agent_id, u.status) for u in backplane.announced] == [
        ("w", "online"),
        ("w", "offline"),
    ]
    assert [(r.agent_id, r.status) for r in hub.hub.presence_table("t1")] == [
        ("far", "online"),
        ("w", "offline"),
    ]


async def test_request_reply_across_hubs_grants_the_answer_here_once(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    backplane = RecordingBackplane()
    async with hub_over(backplane) as hub:
        worker = await connect(hub, nursery, "worker")
        await worker.subscribe("work")
        assert backplane.peer is not None
        inbox = "$reply.s-far.1"
        await backplane.peer.route_arrived(
            Route("t1", "work", '{"q":1}', "far", "hub-b-1", 1.0, reply_to=inbox)
        )
        [request] = await worker.messages(1)
        assert request.reply_to == inbox
        await worker.send(Publish(subject=inbox, data={"a": 1}, id="a1"))
        assert isinstance(await worker.recv(), Published)
        assert [(r.subject, r.data_json) for r in backplane.routes] == [(inbox, '{"a":1}')]
        await worker.send(Publish(subject=inbox, data={"a": 2}, id="a2"))
        refused = await worker.recv()
        assert getattr(refused, "code", None) == "reply_not_expected"
        assert len(backplane.routes) == 1


async def test_an_answer_from_another_hub_reaches_the_requester_only_while_open(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    backplane = RecordingBackplane()
    async with hub_over(backplane) as hub:
        requester = await connect(hub, nursery, "requester")
        local = await connect(hub, nursery, "local")
        await local.subscribe("work")
        assert requester.welcome is not None and backplane.peer is not None
        inbox = f"$reply.{requester.welcome.session_id}.1"
        await requester.send(Publish(subject="work", data=None, id="r", reply_to=inbox))
        await requester.recv_type(Published)
        await local.messages(1)
        answer = Route("t1", inbox, '"far"', "far", "hub-b-9", 2.0)
        await backplane.peer.route_arrived(answer)
        [got] = await requester.messages(1)
        assert (got.subject, got.data, got.sender) == (inbox, "far", "far")
        # Answered: the local responder's answer and a second remote one are refused.
        await local.send(Publish(subject=inbox, data="late", id="l"))
        assert getattr(await local.recv(), "code", None) == "reply_not_expected"
        await backplane.peer.route_arrived(answer)
        await requester.send(Publish(subject="x", data=None, id="p"))
        assert isinstance(await requester.recv(), Published)  # nothing came before it


async def test_a_publish_the_cluster_routed_already_is_confirmed_as_a_duplicate_only(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    backplane = RecordingBackplane()
    backplane.routed_elsewhere["p1"] = "hub-b-3"  # sent there first, before a failover
    async with hub_over(backplane) as hub:
        receiver = await connect(hub, nursery, "r")
        await receiver.subscribe("jobs.*")
        publisher = await connect(hub, nursery, "p")
        await publisher.send(Publish(subject="jobs.new", data=1, id="p1"))
        again = await publisher.recv()
        assert again == Published(id="p1", message_id="hub-b-3", duplicate=True)
        await publisher.send(Publish(subject="jobs.new", data=1, id="p1"))
        assert await publisher.recv() == again  # now known here too: not asked again
        assert [r.publish_id for r in backplane.routes] == ["p1"]
        await publisher.send(Publish(subject="jobs.new", data=2, id="p2"))
        fresh = await publisher.recv()
        assert isinstance(fresh, Published) and not fresh.duplicate
        [got] = await receiver.messages(1)  # only the new one was delivered
        assert (got.data, got.message_id) == (2, fresh.message_id)
        assert hub.hub.stats.messages_routed == 1


async def test_the_local_backplane_never_yields_so_a_hub_alone_behaves_as_before() -> None:
    local = LocalBackplane()
    route = Route("t1", "s", "null", "a", "hub-1", 0.0)
    with trio.testing.assert_no_checkpoints():
        assert await local.publish_route(route) is None
        await local.claim_session(SessionClaim("t1", "a", "s-1", "hub"))
        local.interest("t1", "s.*", True)
        local.announce_presence(PresenceUpdate("t1", "a", "online", "connected", 0.0, "s-1", "h"))
        local.begin_drain()


class DegradedBackplane(RecordingBackplane):
    """A cluster view that is degraded for the reasons in ``reasons``."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: tuple[str, ...] = ()

    def degraded(self) -> tuple[str, ...]:
        return self.reasons


async def _presence_state(client: RawClient, frame_id: str) -> PresenceState:
    await client.send(PresenceQuery(id=frame_id))
    state: PresenceState = await client.recv_type(PresenceState)
    assert state.id == frame_id
    return state


async def test_a_degraded_cluster_view_is_in_the_presence_answers_and_metrics(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    """What ``artcafe-trio status`` reads (the admin channel's ``presence_state``), an
    agent's answer and the Prometheus gauges say so while the backplane is degraded,
    and stop saying it when it is not."""
    pytest.importorskip("prometheus_client")
    from artcafe_trio.hub._metrics import collector

    def gauges() -> dict[str, float]:
        return {
            family.name: family.samples[0].value
            for family in collector(hub.hub).collect()
            if family.name.startswith("artcafe_cluster_")
        }

    backplane = DegradedBackplane()
    async with hub_over(backplane) as hub:
        agent = await connect(hub, nursery, "a")
        admin = RawClient(await hub.dial(nursery, "/api/v1/ws/admin"))
        assert isinstance(await admin.recv(), Challenge)
        await admin.send(AdminAuth(token=hub.hub.admin_token))
        assert isinstance(await admin.recv_type(Welcome), Welcome)
        for client in (admin, agent):
            state = await _presence_state(client, "q1")
            assert state.degraded is None and '"degraded"' not in encode(state)
        assert hub.hub.cluster_degraded == ()
        assert gauges() == {"artcafe_cluster_fenced": 0, "artcafe_cluster_claims_pending": 0}

        backplane.reasons = ("fenced",)
        for client in (admin, agent):
            state = await _presence_state(client, "q2")
            assert state.degraded == ("fenced",)
            assert [r.agent_id for r in state.agents] == ["a"]  # still the table
        assert gauges() == {"artcafe_cluster_fenced": 1, "artcafe_cluster_claims_pending": 0}
        backplane.reasons = ("fenced", "claims_pending")
        assert gauges() == {"artcafe_cluster_fenced": 1, "artcafe_cluster_claims_pending": 1}

        backplane.reasons = ()  # the lease is held again
        assert (await _presence_state(admin, "q3")).degraded is None
        assert gauges() == {"artcafe_cluster_fenced": 0, "artcafe_cluster_claims_pending": 0}


async def test_a_long_fan_out_of_a_route_from_another_hub_lets_other_tasks_run(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A routed publish is fanned out in batches too (issue 9): between two batches of
    :data:`FANOUT_BATCH` deliveries, other tasks of the hub run."""
    from artcafe_trio.hub import _router

    monkeypatch.setattr(_router, "FANOUT_BATCH", 2)
    backplane = RecordingBackplane()
    async with hub_over(backplane) as hub:
        receivers = [await connect(hub, nursery, f"r{i}") for i in range(6)]
        for receiver in receivers:
            await receiver.subscribe("fan")
        seen: list[int] = []

        async def watch() -> None:
            while True:
                seen.append(hub.hub.stats.deliveries)
                await trio.lowlevel.checkpoint()

        nursery.start_soon(watch)
        before = hub.hub.stats.deliveries
        assert backplane.peer is not None
        await backplane.peer.route_arrived(Route("t1", "fan", "1", "far", "hub-b-1", 1.0))
        for receiver in receivers:
            [got] = await receiver.messages(1)
            assert (got.subject, got.sender) == ("fan", "far")
        assert hub.hub.stats.deliveries == before + 6
        assert any(before < n < before + 6 for n in seen), seen
