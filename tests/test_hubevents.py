"""The hub's observation seam (hub.events): events, bounded subscribers, measurements.

In memory, under autojump_clock: exact times.
"""

from __future__ import annotations

import pytest
import trio

from artcafe_trio.hub._flow import Delivery
from artcafe_trio.hub._hubevents import (
    AuthFailure,
    HubEvents,
    PresenceTransition,
    Resync,
    SlowConsumerCut,
    TakeOver,
)
from artcafe_trio.hub._wsserver import frame_text
from artcafe_trio.protocol import Error, Heartbeat, HeartbeatAck, Leave
from artcafe_trio.testing import TestHub, open_test_hub

from .conftest import RawClient, raw_connect

pytestmark = pytest.mark.timeout(30)


def drain(subscription: object) -> list[object]:
    items = []
    while True:
        try:
            items.append(subscription.receive_nowait())  # type: ignore[attr-defined]
        except trio.WouldBlock:
            return items


async def connect(hub: TestHub, nursery: trio.Nursery, agent: str, tenant: str = "t1") -> RawClient:
    key = hub.registry.keys_for(tenant, agent)
    private = getattr(hub, "_keys", {}).get((tenant, agent))
    if not key or private is None:
        private = hub.register(tenant, agent)
        hub._keys = {**getattr(hub, "_keys", {}), (tenant, agent): private}  # type: ignore[attr-defined]
    client = await raw_connect(hub, nursery, agent, tenant, private)
    assert client.welcome is not None
    return client


async def test_transitions_reach_a_subscriber_in_order_with_reasons(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with open_test_hub(disconnect_grace=2.0) as hub:
        with (
            hub.hub.events.subscribe() as everything,
            hub.hub.events.subscribe(tenant_id="t2") as only_t2,
        ):
            a = await connect(hub, nursery, "a")
            b = await connect(hub, nursery, "b", tenant="t2")
            await a.send(Leave())
            await trio.sleep(0.1)
            started = trio.current_time()
            await b.ws.aclose()  # closed without a leave: offline after the grace
            await trio.sleep(2.5)
            assert trio.current_time() - started >= 2.0
            seen = [
                (e.tenant_id, e.agent_id, e.status, e.reason)
                for e in drain(everything)
                if isinstance(e, PresenceTransition)
            ]
            assert seen == [
                ("t1", "a", "online", "connected"),
                ("t2", "b", "online", "connected"),
                ("t1", "a", "offline", "left"),
                ("t2", "b", "offline", "disconnected"),
            ]
            assert [e.tenant_id for e in drain(only_t2)] == ["t2", "t2"]
    assert hub.hub.events.subscribers == 0


async def test_take_over_is_an_event_and_counted_for_an_hour(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with open_test_hub() as hub:
        with hub.hub.events.subscribe() as sub:
            await connect(hub, nursery, "a")
            first = hub.hub._directory.live("t1", "a").session_id
            assert hub.hub.events.measures("t1", "a").reconnects == 0
            await connect(hub, nursery, "a")
            second = hub.hub._directory.live("t1", "a").session_id
            takeovers = [e for e in drain(sub) if isinstance(e, TakeOver)]
            assert [(t.old_session_id, t.new_session_id) for t in takeovers] == [(first, second)]
            measures = hub.hub.events.measures("t1", "a")
            assert (measures.reconnects, measures.takeovers) == (1, 1)
            await trio.sleep(3599)
            assert hub.hub.events.measures("t1", "a").takeovers == 1
            await trio.sleep(2)
            measures = hub.hub.events.measures("t1", "a")
            assert (measures.reconnects, measures.takeovers) == (0, 0)


async def test_the_hub_measures_the_actual_heartbeat_interval_and_keeps_the_reported_rtt(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with open_test_hub() as hub:
        client = await connect(hub, nursery, "a")
        assert hub.hub.events.measures("t1", "a").declared_interval == 10.0
        await client.send(Heartbeat(seq=1))
        await client.recv_type(HeartbeatAck)
        assert hub.hub.events.measures("t1", "a").heartbeat_interval is None  # one beat only
        await trio.sleep(2.5)
        await client.send(Heartbeat(seq=2, rtt=0.042))
        await client.recv_type(HeartbeatAck)
        measures = hub.hub.events.measures("t1", "a")
        assert measures.heartbeat_interval == pytest.approx(2.5)
        assert measures.heartbeat_interval_avg == pytest.approx(2.5)
        assert measures.rtt == 0.042
        await client.send(Heartbeat(seq=3, rtt=-1.0))  # refused, and not kept
        refusal = await client.recv_type(Error)
        assert refusal.code == "invalid_field"
        await trio.sleep(4.5)
        await client.send(Heartbeat(seq=4))  # an agent that reports nothing is fine too
        await client.recv_type(HeartbeatAck)
        measures = hub.hub.events.measures("t1", "a")
        assert measures.heartbeat_interval == pytest.approx(4.5)
        assert measures.heartbeat_interval_avg == pytest.approx(0.875 * 2.5 + 0.125 * 4.5)
        assert measures.rtt == 0.042


async def test_the_reference_agent_reports_its_rtt(autojump_clock: trio.abc.Clock) -> None:
    async with (
        open_test_hub() as hub,
        hub.open_agent("w", heartbeat_interval=1.0, heartbeat_jitter=0),
    ):
        await trio.sleep(3.5)
        measures = hub.hub.events.measures("test", "w")
        assert measures.heartbeat_interval == pytest.approx(1.0, abs=0.01)
        assert measures.rtt is not None and measures.rtt >= 0


async def test_auth_failures_and_slow_consumers_are_events(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    async with open_test_hub(send_queue_size=4) as hub:
        with hub.hub.events.subscribe() as sub:
            wrong = hub.register("t1", "other")
            refused = await raw_connect(hub, nursery, "a", "t1", wrong)
            assert refused.welcome is None
            await connect(hub, nursery, "b")
            session = hub.hub._directory.live("t1", "b")
            for _ in range(10):  # no checkpoint: the writer cannot drain in between
                session.deliver(
                    Delivery(frame_text('{"type":"heartbeat_ack","seq":1,"hub_time":0}'))
                )
            items = drain(sub)
            failures = [e for e in items if isinstance(e, AuthFailure)]
            assert [(f.address, f.code, f.failures, f.tenant_id) for f in failures] == [
                ("memory", "authentication_failed", 1, None)
            ]
            cuts = [e for e in items if isinstance(e, SlowConsumerCut)]
            assert [(c.tenant_id, c.agent_id, c.session_id, c.reason) for c in cuts] == [
                ("t1", "b", session.session_id, "slow consumer: 4 deliveries waiting")
            ]


def test_a_slow_subscriber_gets_resync_and_never_holds_more_than_its_bound() -> None:
    async def main() -> None:
        events = HubEvents(recent=5)
        with events.subscribe(max_queued=3) as sub:
            for i in range(10):
                events.presence("t", f"a{i}", "online", "connected", None, float(i))
                assert sub.queued <= 4
            items = drain(sub)
            assert isinstance(items[0], Resync)
            assert (
                sum(x.lost for x in items if isinstance(x, Resync))
                + sum(1 for x in items if isinstance(x, PresenceTransition))
                == 10
            )
            events.presence("t", "late", "offline", "left", None, 11.0)
            assert drain(sub)[-1].agent_id == "late"  # type: ignore[union-attr]
        assert len(events.recent) == 5

    trio.run(main)


def test_subscribers_are_bounded() -> None:
    async def main() -> None:
        events = HubEvents(max_subscribers=2)
        with events.subscribe(), events.subscribe():
            with pytest.raises(RuntimeError, match="at most 2"), events.subscribe():
                pass
        with events.subscribe():
            assert events.subscribers == 1

    trio.run(main)


async def test_metrics_export_the_largest_reported_ack_rtt_per_tenant(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    pytest.importorskip("prometheus_client")
    from artcafe_trio.hub._metrics import collector

    async with open_test_hub() as hub:
        clients = {}
        for agent, tenant in (("a", "t1"), ("b", "t1"), ("c", "t2")):
            clients[agent] = await connect(hub, nursery, agent, tenant=tenant)
        for agent, rtt in (("a", 0.25), ("b", 0.5), ("c", 0.125)):
            await clients[agent].send(Heartbeat(seq=1, rtt=rtt))
            await clients[agent].recv_type(HeartbeatAck)
        samples = {
            sample.labels["tenant"]: sample.value
            for family in collector(hub.hub).collect()
            if family.name == "artcafe_heartbeat_ack_rtt_seconds"
            for sample in family.samples
        }
        assert samples == {"t1": 0.5, "t2": 0.125}
