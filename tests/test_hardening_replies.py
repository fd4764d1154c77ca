"""Hardening: a subscribed agent cannot forge the answer to a request (issue 9, item 12).

Any agent subscribed to a request's subject (``>`` included) is delivered the request
and may answer it; the first answer closes it, so a forger that answers first used to
win, and the real responder was refused ``reply_not_expected``. A requester can now
name the agents it accepts an answer from (``reply_from``); the hub holds every answer
to it, local or routed from another hub, and the reply's ``sender`` is the hub's.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from artcafe_trio.hub._backplane import Route
from artcafe_trio.protocol import Error, Message, Publish, Published
from artcafe_trio.testing import open_test_hub

from .test_hardening_isolation import barrier, connect

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("hub_streams")]


async def forged_scene(hub: Any, nursery: trio.Nursery) -> tuple[Any, Any, Any, str]:
    """A requester, a worker subscribed to ``math.double`` and a forger subscribed to
    ``>``; the requester's reply subject."""
    requester = await connect(hub, nursery, "req")
    worker = await connect(hub, nursery, "worker")
    forger = await connect(hub, nursery, "forger")
    await worker.subscribe("math.double")
    await forger.subscribe(">")
    assert requester.welcome is not None
    return requester, worker, forger, f"$reply.{requester.welcome.session_id}.tok1"


async def test_a_subscribed_forger_cannot_answer_a_request_restricted_by_reply_from() -> None:
    async with open_test_hub(close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            requester, worker, forger, reply_to = await forged_scene(hub, nursery)
            await requester.send(
                Publish(subject="math.double", data=21, reply_to=reply_to, reply_from=("worker",))
            )
            # The forger is delivered the request (it is subscribed) ...
            seen = await forger.recv_type(Message)
            assert seen.reply_to == reply_to
            await worker.recv_type(Message)
            # ... and answers first: refused, and the request stays open.
            await forger.send(Publish(subject=reply_to, data="FORGED", id="f"))
            refusal = await forger.recv_type(Error)
            assert (refusal.code, refusal.id) == ("reply_not_expected", "f")
            # The real responder is not locked out by the forger's attempt.
            await worker.send(Publish(subject=reply_to, data=42, id="w1"))
            await worker.recv_type(Published)
            frames = await barrier(requester)
            assert [(m.data, m.sender) for m in frames if isinstance(m, Message)] == [
                (42, "worker")
            ]
            assert not hub.hub._router.replies.restricted  # forgotten with the answer
            nursery.cancel_scope.cancel()


async def test_without_reply_from_the_first_subscribed_answer_wins() -> None:
    """What ``reply_from`` is for: without it, subscribe rights are answer rights, and
    the reply's ``sender`` (set by the hub, never by the answerer) tells who answered."""
    async with open_test_hub(close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            requester, worker, forger, reply_to = await forged_scene(hub, nursery)
            await requester.send(Publish(subject="math.double", data=21, reply_to=reply_to))
            await forger.recv_type(Message)
            await forger.send(Publish(subject=reply_to, data="FORGED", id="f"))
            await forger.recv_type(Published)
            await worker.recv_type(Message)
            await worker.send(Publish(subject=reply_to, data=42, id="w1"))
            assert (await worker.recv_type(Error)).code == "reply_not_expected"
            frames = await barrier(requester)
            assert [(m.data, m.sender) for m in frames if isinstance(m, Message)] == [
                ("FORGED", "forger")
            ]
            nursery.cancel_scope.cancel()


async def test_an_answer_from_another_hub_is_held_to_reply_from() -> None:
    async with open_test_hub(close_timeout=0.05) as hub:
        async with trio.open_nursery() as nursery:
            requester = await connect(hub, nursery, "req")
            assert requester.welcome is not None
            reply_to = f"$reply.{requester.welcome.session_id}.tok1"
            await requester.send(
                Publish(subject="far.away", data=1, reply_to=reply_to, reply_from=("worker",))
            )
            await barrier(requester)
            router = hub.hub._router

            async def answer(sender: str, data: Any) -> None:
                await router.route_arrived(
                    Route("t1", reply_to, str(data), sender, f"x-{sender}", 1.0, None, None)
                )

            await answer("forger", 666)  # accepted by the forger's hub, dropped here
            await answer("worker", 42)
            await answer("worker", 43)  # a second answer: the request is closed
            frames = await barrier(requester)
            assert [(m.data, m.sender) for m in frames if isinstance(m, Message)] == [
                (42, "worker")
            ]
            nursery.cancel_scope.cancel()


async def test_agent_request_reply_from_gets_the_named_agents_answer(autojump_clock: Any) -> None:
    async with open_test_hub(close_timeout=0.05) as hub:
        async with (
            hub.open_agent("worker", tenant_id="t1") as worker,
            hub.open_agent("forger", tenant_id="t1") as forger,
            hub.open_agent("req", tenant_id="t1") as requester,
        ):

            async def double(subject: str, data: int, message: Message) -> None:
                await trio.sleep(0.5)  # the forger is faster
                await worker.reply(message, data * 2)

            refused: list[BaseException] = []

            async def forge(subject: str, data: Any, message: Message) -> None:
                if message.reply_to is not None:
                    try:
                        await forger.publish(message.reply_to, "FORGED", confirm=True)
                    except Exception as exc:  # refused: reply_not_expected
                        refused.append(exc)

            await worker.subscribe("math.double", double)
            await forger.subscribe(">", forge)
            with trio.fail_after(5):
                reply = await requester.request_message("math.double", 21, reply_from=["worker"])
            assert (reply.data, reply.sender) == (42, "worker")
            assert [getattr(e, "code", None) for e in refused] == ["reply_not_expected"]
            with pytest.raises(TypeError):
                await requester.request("math.double", 1, reply_from="worker")
