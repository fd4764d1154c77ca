"""``reply_from`` across hubs of a cluster (issue 9, item 12), over real nats-servers.

A request's ``reply_from`` crosses hubs with it (the ``Ac-Reply-From`` header), so
every hub holds answers to it: a forger subscribed on another hub is refused there,
and the named responders answer from any hub.
"""

from __future__ import annotations

import pytest
import trio

from artcafe_trio.protocol import Publish, Published

from .servers import NatsNode
from .test_cluster_hubs import nothing_more, three_hubs

pytestmark = pytest.mark.timeout(60)


async def test_a_forger_on_another_hub_never_answers_a_request_with_reply_from(
    nats_cluster: list[NatsNode],
) -> None:
    with trio.fail_after(30):
        async with three_hubs(nats_cluster) as cluster:
            near = await cluster.connect("a", "near")  # on the requester's hub
            await near.subscribe("svc.echo")
            far = await cluster.connect("b", "far")
            await far.subscribe("svc.echo")
            forger = await cluster.connect("c", "forger")
            await forger.subscribe("svc.*")
            requester = await cluster.connect("a", "req")
            await cluster.settle(requester, [near, far, forger])
            assert requester.welcome is not None
            inbox = f"$reply.{requester.welcome.session_id}"
            for token, responders in (("1", ("near",)), ("2", ("far",))):
                await requester.send(
                    Publish(subject="svc.echo", data=token, reply_to=f"{inbox}.{token}",
                            reply_from=responders)
                )  # fmt: skip
            for client in (near, far, forger):
                assert len(await client.messages(2)) == 2
            # The forger answers both first: its own hub refuses both (reply_from came
            # with the request), so nothing reaches the requester and nothing closes.
            for token in ("1", "2"):
                await forger.send(Publish(subject=f"{inbox}.{token}", data="FORGED", id=token))
                refused = await forger.recv()
                assert getattr(refused, "code", None) == "reply_not_expected", refused
            await trio.sleep(0.5)
            assert await nothing_more(requester) == []
            # The named responders answer, on the requester's hub and on another one.
            await near.send(Publish(subject=f"{inbox}.1", data="near", id="n"))
            await near.recv_type(Published)
            [answer] = await requester.messages(1)
            assert (answer.data, answer.sender) == ("near", "near")
            await far.send(Publish(subject=f"{inbox}.2", data="far", id="f"))
            await far.recv_type(Published)
            [answer] = await requester.messages(1)
            assert (answer.data, answer.sender) == ("far", "far")
            assert await nothing_more(requester) == []
