"""A nats-py peer under asyncio, run as a subprocess by the interop tests.

It echoes ``interop.to_py`` to ``interop.from_py`` (data and headers, as
nats-py re-encodes them), answers requests on ``interop.py_svc``, works in
queue group ``w`` on ``interop.work`` (forwarding what it got to
``interop.worked``), and on ``interop.ask`` makes a request to our
``interop.trio_svc`` and publishes the answer to ``interop.answer``.
"""

from __future__ import annotations

import asyncio
import sys

import nats


async def main(url: str) -> None:
    nc = await nats.connect(url)

    async def echo(msg: nats.aio.msg.Msg) -> None:
        await nc.publish("interop.from_py", msg.data, headers=msg.headers)

    async def service(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"py:" + msg.data)

    async def work(msg: nats.aio.msg.Msg) -> None:
        await nc.publish("interop.worked", msg.data)

    async def ask(msg: nats.aio.msg.Msg) -> None:
        answer = await nc.request(
            "interop.trio_svc", msg.data, timeout=5, headers={"Asked-By": "py"}
        )
        await nc.publish("interop.answer", answer.data)

    await nc.subscribe("interop.to_py", cb=echo)
    await nc.subscribe("interop.py_svc", cb=service)
    await nc.subscribe("interop.work", queue="w", cb=work)
    await nc.subscribe("interop.ask", cb=ask)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
