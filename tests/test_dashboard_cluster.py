"""The dashboard and the alert webhooks of a hub in a cluster.

The other hubs are played through the backplane seam (the recording backplane of
test_backplane.py): their transitions arrive as ``peer.presence_observed`` with
``local=False``, as the NATS backplane delivers them; in memory, under autojump_clock.
"""

from __future__ import annotations

import trio

from artcafe_trio.dashboard import Access, Dashboard, DashboardConfig
from artcafe_trio.dashboard._webhooks import AlertFilter
from artcafe_trio.hub._backplane import PresenceUpdate
from artcafe_trio.protocol import Leave

from .test_backplane import RecordingBackplane, connect, hub_over
from .test_webhooks import FakePost, fake_webhook


def far(agent: str, status: str, reason: str, at: float, **fields: object) -> PresenceUpdate:
    """A transition of an agent on hub-b, as hub-a observes it."""
    return PresenceUpdate(
        "t1", agent, status, reason, at, f"s-{agent}" if status == "online" else None,
        "hub-b", local=False, **fields,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_each_row_shows_its_owning_hub_and_no_measures_from_another_hub(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    backplane = RecordingBackplane()
    async with hub_over(backplane) as hub:
        await connect(hub, nursery, "near")
        assert backplane.peer is not None
        backplane.peer.presence_observed(far("far", "online", "connected", 7.0))
        dashboard = Dashboard(hub.hub, DashboardConfig())
        document = dashboard.presence_document(Access(None), None)
        rows = {a["agent_id"]: a for a in document["agents"]}
        assert (rows["near"]["hub_id"], rows["far"]["hub_id"]) == ("hub-a", "hub-b")
        assert rows["near"]["heartbeat_interval"] == 10.0  # measured here (raw_connect asks 10 s)
        for field in ("heartbeat_interval", "measured_interval", "measured_interval_avg", "rtt"):
            assert rows["far"][field] is None, field
        assert document["hub_id"] == "hub-a"  # the hub that serves the page
        # The live feed's presence event carries the owner and whether this hub reports it.
        with hub.hub.events.subscribe() as events:
            backplane.peer.presence_observed(far("far", "offline", "left", 8.0))
            event = events.receive_nowait()
        assert event.to_json()["hub_id"] == "hub-b"
        assert event.to_json()["local"] is False


async def test_only_the_hub_that_reports_a_transition_posts_it(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    backplane = RecordingBackplane()
    fake = FakePost()
    async with hub_over(backplane, disconnect_grace=0) as hub:
        webhook = await fake_webhook(hub, nursery, fake)
        assert backplane.peer is not None
        peer = backplane.peer
        # hub-b's own agent: hub-b posts it, not us.
        peer.presence_observed(far("b1", "online", "connected", 1.0))
        peer.presence_observed(far("b1", "offline", "left", 2.0))
        # hub-b died; hub-c reaped it: hub-c reports the hub_lost.
        peer.presence_observed(far("b2", "online", "connected", 3.0))
        peer.presence_observed(far("b2", "offline", "hub_lost", 4.0, reaped_by="hub-c"))
        # hub-b died; we (hub-a) reaped it: we report it, once, as hub-b's agent.
        peer.presence_observed(far("b3", "online", "connected", 5.0))
        peer.presence_observed(far("b3", "offline", "hub_lost", 6.0, reaped_by="hub-a"))
        await connect(hub, nursery, "a1")  # ours
        await trio.sleep(1)
        sent = [(d["agent_id"], d["status"], d["reason"], d["hub_id"]) for _t, d in fake.calls]
        assert sent == [
            ("b3", "offline", "hub_lost", "hub-b"),
            ("a1", "online", "connected", "hub-a"),
        ]
        assert {d["reported_by"] for _t, d in fake.calls} == {"hub-a"}
        assert webhook.stats.elsewhere == 5
        assert webhook.stats.sent == 2


async def test_a_blip_that_ends_on_another_hub_pages_no_one_and_a_return_there_ends_the_alert(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    backplane = RecordingBackplane()
    fake = FakePost()
    async with hub_over(backplane, disconnect_grace=0) as hub:
        webhook = await fake_webhook(hub, nursery, fake, filter=AlertFilter(min_offline=30))
        assert backplane.peer is not None
        peer = backplane.peer
        agent = await connect(hub, nursery, "w")
        await agent.send(Leave())  # offline here (left): held for 30 s
        await agent.close_code()
        await trio.sleep(5)
        peer.presence_observed(far("w", "online", "connected", 100.0))  # back on hub-b
        await trio.sleep(60)
        assert fake.calls == [] and webhook.stats.held == 1  # a blip, whichever hub it ends on
        # The other way round: hub-b's offline lasts, so hub-b pages; the agent comes
        # back here, and this hub sends the online that ends that alert.
        peer.presence_observed(far("w", "offline", "timeout", 200.0))
        await trio.sleep(40)
        assert fake.calls == []  # hub-b's offline is hub-b's to send
        await connect(hub, nursery, "w")
        await trio.sleep(1)
        assert [(d["agent_id"], d["status"]) for _t, d in fake.calls] == [("w", "online")]
