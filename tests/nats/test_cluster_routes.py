"""Routing between two 'hubs' over a real nats-server: one copy per hub, tenants apart."""

from __future__ import annotations

import trio

from artcafe_trio.cluster._routes import (
    InterestTable,
    RecentIds,
    RouteEnvelope,
    nats_subject,
    split_nats_subject,
)
from artcafe_trio.nats import Subscription, open_nats

from .servers import NatsNode


async def test_overlapping_interest_gives_one_copy_and_the_origin_none(
    nats_node: NatsNode,
) -> None:
    async with (
        open_nats(nats_node.url, echo=False) as hub_a,
        open_nats(nats_node.url, echo=False) as hub_b,
    ):
        # Hub A's agents hold two overlapping patterns of tenant acme, one of "other".
        interest = InterestTable()
        subs: list[Subscription] = []
        for tenant, pattern in (("acme", "tasks.*"), ("acme", "tasks.>"), ("acme", "tasks.*"),
                                ("other", "tasks.>")):  # fmt: skip
            if interest.add(tenant, pattern):
                subs.append(await hub_a.subscribe(nats_subject(tenant, pattern)))
        assert len(subs) == 3  # the repeated acme tasks.* did not subscribe twice
        # Hub B subscribes to what it publishes, too: with echo off it must not see it.
        own = await hub_b.subscribe(nats_subject("acme", ">"))
        await hub_a.flush()
        envelope = RouteEnvelope("hub-b", "hub-b-1", "w9", '{"job":1}', 1.5)
        payload, headers = envelope.to_nats()
        await hub_b.publish(nats_subject("acme", "tasks.new"), payload, headers=headers)
        await hub_b.flush()

        seen = RecentIds()
        received = []
        copies = 0
        with trio.move_on_after(1.0):  # bounded: collect what arrives within a second
            async with trio.open_nursery() as nursery:

                async def drain(sub: Subscription) -> None:
                    nonlocal copies
                    async for msg in sub:
                        copies += 1
                        routed = RouteEnvelope.from_nats(msg.data, msg.headers)
                        if seen.first_time(routed.dedupe_key("acme"), trio.current_time()):
                            received.append((split_nats_subject(msg.subject), routed))

                for sub in [*subs, own]:
                    nursery.start_soon(drain, sub)
        # Two NATS copies reached hub A (tasks.* and tasks.>), one was kept; the other
        # tenant's subscription got nothing; the origin got nothing back.
        assert copies == 2
        assert received == [(("acme", "tasks.new"), envelope)]
        assert own.pending == 0
