"""Request/reply with a deadline: a worker answers ``math.double``, a client asks it.

Runs with no setup at all::

    python examples/request_reply.py

It starts a hub inside the process (on a free port, in-memory registry),
registers two freshly generated keys, runs the worker and the client as two
``open_agent`` blocks in one nursery, and prints::

    double(1) = 2
    double(21) = 42
    double(2.5) = 5.0

To use a running hub instead, set ARTCAFE_URL, ORGANIZATION_ID,
WORKER_KEY_PATH and CLIENT_KEY_PATH (for agents WORKER_ID, default
``doubler``, and CLIENT_ID, default ``asker``, registered with those keys).
Exit codes: 0 when every request was answered, 1 otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import trio

from artcafe_trio import (
    Agent,
    ArtcafeError,
    Message,
    PrivateKey,
    generate_private_key,
    load_private_key,
    open_agent,
    open_hub,
)

log = logging.getLogger("request_reply")

NUMBERS: tuple[float, ...] = (1, 21, 2.5)
REQUEST_DEADLINE = 5.0  # seconds: a request without an answer by then fails


async def serve_doubler(
    url: str,
    tenant_id: str,
    agent_id: str,
    key: PrivateKey,
    *,
    task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The worker: answers ``{"value": x}`` on ``math.double`` with ``{"double": 2x}``.

    ``task_status.started`` gives the agent once the hub has confirmed the
    subscription; ``agent.stop()`` ends it gracefully.
    """
    async with open_agent(
        agent_id=agent_id, tenant_id=tenant_id, private_key=key, url=url
    ) as worker:

        async def double(subject: str, data: Any, message: Message) -> None:
            value = data.get("value") if isinstance(data, dict) else None
            if isinstance(value, bool) or not isinstance(value, int | float):
                await worker.reply(message, {"error": 'expected {"value": <number>}'})
                return
            await worker.reply(message, {"value": value, "double": value * 2})

        await worker.subscribe("math.double", double)  # returns once the hub confirmed it
        task_status.started(worker)
        await trio.sleep_forever()


async def ask(
    url: str, tenant_id: str, agent_id: str, key: PrivateKey, numbers: Sequence[float]
) -> list[float]:
    """The client: one request per number, each with a deadline; prints the answers."""
    answers: list[float] = []
    async with open_agent(
        agent_id=agent_id, tenant_id=tenant_id, private_key=key, url=url
    ) as client:
        for number in numbers:
            with trio.fail_after(REQUEST_DEADLINE):
                answer = await client.request("math.double", {"value": number})
            if "error" in answer:
                raise RuntimeError(f"the worker refused {number!r}: {answer['error']}")
            print(f"double({number}) = {answer['double']}", flush=True)
            answers.append(answer["double"])
    return answers


async def run_demo(
    url: str,
    tenant_id: str,
    *,
    worker: tuple[str, PrivateKey],
    client: tuple[str, PrivateKey],
    numbers: Sequence[float] = NUMBERS,
) -> list[float]:
    """Worker and client side by side in one nursery; returns the answers."""
    async with trio.open_nursery() as nursery:
        doubler: Agent = await nursery.start(serve_doubler, url, tenant_id, *worker)
        try:
            return await ask(url, tenant_id, *client, numbers)
        finally:
            doubler.stop()  # graceful: the worker leaves the hub, the nursery ends


async def main() -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING").upper())
    env = os.environ
    worker_id = env.get("WORKER_ID") or "doubler"
    client_id = env.get("CLIENT_ID") or "asker"
    exit_code = 0
    try:
        if env.get("WORKER_KEY_PATH") and env.get("CLIENT_KEY_PATH"):
            worker_key = load_private_key(env["WORKER_KEY_PATH"])
            client_key = load_private_key(env["CLIENT_KEY_PATH"])
            await run_demo(
                env.get("ARTCAFE_URL") or "ws://127.0.0.1:8765",
                env.get("ORGANIZATION_ID") or "demo",
                worker=(worker_id, worker_key),
                client=(client_id, client_key),
            )
        else:
            worker_key, client_key = generate_private_key(), generate_private_key()
            async with open_hub(port=0) as hub:
                assert hub.url is not None
                hub.registry.add_key("demo", worker_id, worker_key.public_key)
                hub.registry.add_key("demo", client_id, client_key.public_key)
                await run_demo(
                    hub.url, "demo", worker=(worker_id, worker_key), client=(client_id, client_key)
                )
    except* trio.TooSlowError:
        log.error("no answer within %g s", REQUEST_DEADLINE)
        exit_code = 1
    except* (ArtcafeError, RuntimeError) as failed:
        log.error("%s", _leaf(failed))
        exit_code = 1
    return exit_code


def _leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception inside a (possibly nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    raise SystemExit(trio.run(main))
