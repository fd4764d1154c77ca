"""``reply_from`` across hubs of a cluster (issue 9, item 12), over real nats-servers.

The requester's hub holds every answer to ``reply_from``: a forger on another hub never
reaches the requester. What it cannot do (the route between hubs does not carry
``reply_from``): keep the forger's answer from closing the request on the hubs it
passes through, so a real responder on a third hub is then refused; one on the
requester's own hub is not. Both are pinned here, as docs/protocol.md §8 says.
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
            # The forger answers both first; its hub accepts them (it does not know
            # reply_from), the requester's hub drops them.
            for token in ("1", "2"):
                await forger.send(Publish(subject=f"{inbox}.{token}", data="FORGED", id=token))
                assert isinstance(await forger.recv_type(Published), Published)
            await trio.sleep(0.5)
            assert await nothing_more(requester) == []
            # The responder on the requester's hub still answers its request ...
            await near.send(Publish(subject=f"{inbox}.1", data="near", id="n"))
            await near.recv_type(Published)
            [answer] = await requester.messages(1)
            assert (answer.data, answer.sender) == ("near", "near")
            # ... but the forged answer passing through hub b closed request 2 there.
            await far.send(Publish(subject=f"{inbox}.2", data="far", id="f"))
            refused = await far.recv()
            assert getattr(refused, "code", None) == "reply_not_expected"
            assert await nothing_more(requester) == []
