"""The dashboard's live feed and counters, driven through ``Dashboard.handle`` without
sockets (the HTTP server is test_dashboard.py's): under autojump_clock, so ticks,
rates and waits are exact. The hub is real, its agents in memory."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from artcafe_trio.dashboard import Dashboard, DashboardConfig, create_token
from artcafe_trio.dashboard._app import _sampler
from artcafe_trio.dashboard._http import Request, Response, StreamResponse
from artcafe_trio.hub._sessions import Delivery
from artcafe_trio.hub._wsserver import frame_text
from artcafe_trio.protocol import Heartbeat, HeartbeatAck, Leave, Publish, Published
from artcafe_trio.testing import TestHub, open_test_hub

from .conftest import raw_connect

pytestmark = pytest.mark.timeout(30)

Event = tuple[str, dict[str, Any]]


def request(path: str, token: str | None, **query: str) -> Request:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return Request(
        method="GET", path=path, query={k: [v] for k, v in query.items()}, headers=headers,
        remote="test",
    )  # fmt: skip


class Feed:
    """One open ``/api/events``: its parsed events arrive in ``events``; ``ended`` once
    the server ended it."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.ended = trio.Event()
        self._arrived = trio.Condition()

    async def send(self, data: bytes) -> None:
        for block in data.decode().split("\n\n"):
            name, payload = "message", ""
            for line in block.split("\n"):
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    payload += line[6:]
            if payload:
                self.events.append((name, json.loads(payload)))
        async with self._arrived:
            self._arrived.notify_all()
        await trio.lowlevel.checkpoint()

    def named(self, *names: str) -> list[dict[str, Any]]:
        return [data for name, data in self.events if name in names]

    async def wait_for(self, count: int, *names: str) -> list[dict[str, Any]]:
        with trio.fail_after(30):
            async with self._arrived:
                while len(self.named(*names)) < count:
                    await self._arrived.wait()
        return self.named(*names)


async def open_feed(dashboard: Dashboard, nursery: trio.Nursery, token: str, **query: str) -> Feed:
    response = await dashboard.handle(request("/api/events", token, **query))
    assert isinstance(response, StreamResponse), response
    feed = Feed()

    async def run() -> None:
        try:
            await response.produce(feed.send)
        finally:
            assert response.done is not None
            response.done()
            feed.ended.set()

    nursery.start_soon(run)
    await feed.wait_for(1, "snapshot")
    return feed


async def connect(hub: TestHub, nursery: trio.Nursery, agent: str, tenant: str = "t1") -> Any:
    client = await raw_connect(hub, nursery, agent, tenant, hub.register(tenant, agent))
    assert client.welcome is not None
    return client


async def test_the_feed_limit_is_taken_when_a_feed_is_accepted_not_when_it_starts(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub() as hub:
        dashboard = Dashboard(hub.hub, DashboardConfig(max_feeds=1))
        admin = hub.hub.admin_token
        first = await dashboard.handle(request("/api/events", admin))
        assert isinstance(first, StreamResponse)  # accepted; its stream has not started
        second = await dashboard.handle(request("/api/events", admin))
        assert isinstance(second, Response) and second.status == 503
        assert dashboard.feeds == 1
        assert first.done is not None
        first.done()  # over (e.g. the connection broke before the stream started)
        third = await dashboard.handle(request("/api/events", admin))
        assert isinstance(third, StreamResponse)


async def test_a_revoked_token_ends_its_open_feed_at_the_next_tick(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with open_test_hub() as hub:
        config = DashboardConfig(refresh_interval=2.0, token_recheck=1.0)
        dashboard = Dashboard(hub.hub, config)
        t1, t2 = create_token(hub.registry, "t1"), create_token(hub.registry, "t2")
        idle = await open_feed(dashboard, nursery, t2)  # no t2 traffic: ends at a tick
        busy = await open_feed(dashboard, nursery, t1)  # t1 traffic: ends before sending
        kept = await open_feed(dashboard, nursery, create_token(hub.registry, "t3"))
        admin = await open_feed(dashboard, nursery, hub.hub.admin_token)
        await trio.sleep(2.1)
        assert not idle.ended.is_set() and not busy.ended.is_set()  # valid at the first tick
        assert hub.registry.remove_dashboard_tokens("t2") == 1
        with trio.fail_after(2.0):  # the next tick (at 4 s)
            await idle.ended.wait()
        assert trio.current_time() == pytest.approx(4.0)
        assert hub.registry.remove_dashboard_tokens("t1") == 1
        await trio.sleep(1.5)  # 5.5 s: the last check (the 4 s tick) is over 1 s old
        await connect(hub, nursery, "a")  # an event: the token is re-read before it is sent
        with trio.fail_after(0.1):
            await busy.ended.wait()
        assert busy.named("presence") == []  # nothing was sent on the revoked token
        assert [e["agent_id"] for e in admin.named("presence")] == ["a"]
        assert dashboard.revoked == 2
        await trio.sleep(10)
        assert not kept.ended.is_set() and not admin.ended.is_set()
        for token in (t1, t2):
            again = await dashboard.handle(request("/api/events", token))
            assert isinstance(again, Response) and again.status == 401
        assert dashboard.feeds == 2


async def test_feeds_of_one_scope_share_one_snapshot_per_tick(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with open_test_hub() as hub:
        dashboard = Dashboard(hub.hub, DashboardConfig(refresh_interval=2.0))
        token = create_token(hub.registry, "t1")
        tenant_feeds = [await open_feed(dashboard, nursery, token) for _ in range(3)]
        admin_feeds = [await open_feed(dashboard, nursery, hub.hub.admin_token) for _ in range(2)]
        await connect(hub, nursery, "a")
        await trio.sleep(2 * 2.0 + 0.5)  # two ticks
        assert dashboard.snapshots_built == 2 * 2  # per tick: one per scope (t1, every tenant)
        refreshes = [f.named("snapshot")[1:] for f in tenant_feeds + admin_feeds]
        assert [len(r) for r in refreshes] == [2] * 5
        assert refreshes[0] == refreshes[1] == refreshes[2]  # the same document
        assert [a["agent_id"] for a in refreshes[0][-1]["agents"]] == ["a"]
        assert refreshes[0][-1]["scope"] == "t1" and refreshes[3][-1]["scope"] == "*"


async def test_take_overs_slow_consumers_and_auth_failures_reach_the_feeds_in_scope(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with open_test_hub(send_queue_size=4) as hub:
        dashboard = Dashboard(hub.hub, DashboardConfig(refresh_interval=60))
        admin = await open_feed(dashboard, nursery, hub.hub.admin_token)
        t1 = await open_feed(dashboard, nursery, create_token(hub.registry, "t1"))
        t2 = await open_feed(dashboard, nursery, create_token(hub.registry, "t2"))
        # A take-over: the same agent authenticates again.
        key = hub.register("t1", "a")
        await raw_connect(hub, nursery, "a", "t1", key)
        first = hub.hub._directory.live("t1", "a").session_id
        await raw_connect(hub, nursery, "a", "t1", key)
        second = hub.hub._directory.live("t1", "a").session_id
        # A slow consumer: deliveries pile up faster than its writer can send them.
        await connect(hub, nursery, "b")
        session = hub.hub._directory.live("t1", "b")
        for _ in range(10):  # no checkpoint: the writer cannot drain in between
            session.deliver(Delivery(frame_text('{"type":"heartbeat_ack","seq":1,"hub_time":0}')))
        # Two refused authentications from the same address.
        wrong = hub.register("t1", "other")
        for _ in range(2):
            refused = await raw_connect(hub, nursery, "x", "t1", wrong)
            assert refused.welcome is None
        kinds = ("takeover", "slow_consumer", "auth_failure")
        seen = await admin.wait_for(4, *kinds)
        assert [e["kind"] for e in seen] == [
            "takeover", "slow_consumer", "auth_failure", "auth_failure",
        ]  # fmt: skip
        takeover, cut, fail1, fail2 = seen
        assert (takeover["agent_id"], takeover["old_session_id"], takeover["new_session_id"]) == (
            "a", first, second,
        )  # fmt: skip
        assert (cut["tenant_id"], cut["agent_id"], cut["session_id"]) == (
            "t1", "b", session.session_id,
        )  # fmt: skip
        assert cut["reason"] == "slow consumer: 4 deliveries waiting"
        assert [(f["address"], f["failures"], f["tenant_id"]) for f in (fail1, fail2)] == [
            ("memory", 1, None), ("memory", 2, None),
        ]  # fmt: skip
        # The tenant's own feed: its take-over and its cut-off, no auth failure.
        assert [e["kind"] for e in t1.named(*kinds)] == ["takeover", "slow_consumer"]
        with trio.move_on_after(5):
            await t2.wait_for(1, *kinds, "presence")
        assert t2.named(*kinds, "presence") == []  # nothing of t1 reaches t2
        # A feed opened now starts with the recent events in its scope.
        late = await open_feed(dashboard, nursery, create_token(hub.registry, "t1"))
        recent = [e["kind"] for e in late.named("snapshot")[0]["events"]]
        assert "takeover" in recent and "slow_consumer" in recent
        assert "auth_failure" not in recent
        admin_recent = await open_feed(dashboard, nursery, hub.hub.admin_token)
        assert "auth_failure" in [e["kind"] for e in admin_recent.named("snapshot")[0]["events"]]


async def test_rates_and_offline_by_reason(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with open_test_hub(disconnect_grace=0) as hub:
        dashboard = Dashboard(hub.hub, DashboardConfig(rate_window=10.0))
        admin = request("/api/presence", hub.hub.admin_token)
        beater = await connect(hub, nursery, "beater")
        sink = await connect(hub, nursery, "sink")
        await sink.subscribe("jobs")
        nursery.start_soon(_sampler, dashboard)
        await trio.sleep(0.5)
        for i in range(20):  # 2 heartbeats/s and 4 messages/s for 10 s
            await beater.send(Heartbeat(seq=i))
            await beater.recv_type(HeartbeatAck)
            for j in range(2):
                await beater.send(Publish(subject="jobs", data=j, id=f"p{i}.{j}"))
                await beater.recv_type(Published)
            await trio.sleep(0.5)
        counters = _json(await dashboard.handle(admin))["counters"]
        assert counters["heartbeats_per_s"] == pytest.approx(2.0, rel=0.1)
        assert counters["messages_per_s"] == pytest.approx(4.0, rel=0.1)
        await trio.sleep(12)  # quiet for longer than the window
        counters = _json(await dashboard.handle(admin))["counters"]
        assert (counters["heartbeats_per_s"], counters["messages_per_s"]) == (0.0, 0.0)
        # Offline by reason: one left, one timed out, one lost its connection.
        await sink.send(Leave())
        await sink.close_code()
        await connect(hub, nursery, "mute", tenant="t2")  # sends no heartbeat: times out
        dropped = await connect(hub, nursery, "dropped")
        await dropped.ws.aclose()
        await beater.ws.aclose()
        await trio.sleep(40)
        counters = _json(await dashboard.handle(admin))["counters"]
        assert counters["online"] == 0
        assert counters["offline"] == {"left": 1, "timeout": 1, "disconnected": 2}
        token = create_token(hub.registry, "t2")
        mine = _json(await dashboard.handle(request("/api/presence", token)))["counters"]
        assert mine == {"online": 0, "offline": {"timeout": 1}}


def _json(response: Response | StreamResponse) -> dict[str, Any]:
    assert isinstance(response, Response) and response.status == 200, response
    document: dict[str, Any] = json.loads(response.body)
    return document
