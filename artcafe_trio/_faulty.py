"""A byte stream that can be blackholed: the test kit's and the demo's fault injection.

It lives outside :mod:`artcafe_trio.testing` so that the demo (production code) never
imports the test kit; ``artcafe_trio.testing.FaultyStream`` is the public name.
"""

from __future__ import annotations

import trio

__all__ = ["FaultyStream"]


class FaultyStream(trio.abc.Stream):
    """An agent's byte stream that can be blackholed: bytes are silently dropped
    but the stream stays open (a half-open connection). ``drop_outgoing`` loses
    what the agent sends, ``drop_incoming`` what the hub sends."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.closed = False
        self.drop_outgoing = False
        self.drop_incoming = False

    @property
    def blackholed(self) -> bool:
        return self.drop_outgoing and self.drop_incoming

    @blackholed.setter
    def blackholed(self, on: bool) -> None:
        self.drop_outgoing = self.drop_incoming = on

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.drop_outgoing:
            await trio.lowlevel.checkpoint()
            return
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while True:
            data = await self.inner.receive_some(max_bytes)
            if not data or not self.drop_incoming:
                return data

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()
