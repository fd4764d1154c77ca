"""Subscriptions of the NATS client, the reply mux that carries request replies,
and the one-shot waiter a PONG or a reply completes."""

from __future__ import annotations

import secrets
from collections import deque
from typing import TYPE_CHECKING

import trio

from ._errors import NatsClosed
from ._events import SlowConsumer
from ._protocol import Msg

if TYPE_CHECKING:
    from ._client import NatsClient

__all__ = ["Subscription", "new_inbox"]


def new_inbox() -> str:
    """A fresh, unguessable reply subject ``_INBOX.<22 hex digits>``."""
    return "_INBOX." + secrets.token_hex(11)


class _Waiter:
    """A one-shot result (a PONG or a reply) that a task waits for."""

    __slots__ = ("_event", "error", "value")

    def __init__(self) -> None:
        self._event = trio.Event()
        self.value: Msg | None = None
        self.error: BaseException | None = None

    def set(self, value: Msg | None = None) -> None:
        if not self._event.is_set():
            self.value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self.error = error
            self._event.set()

    async def wait(self) -> Msg | None:
        await self._event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class Subscription:
    """Messages on ``subject`` (optionally in ``queue`` group); ``async for msg in sub``.

    Up to ``pending_msgs_limit`` messages and ``pending_bytes_limit`` payload
    bytes wait for the consumer; beyond that new messages are dropped, counted
    in :attr:`dropped`, and a :class:`SlowConsumer` event is emitted once per
    run of drops. Iteration ends after :meth:`unsubscribe` or when the client
    closes, once the messages already received have been consumed.
    """

    def __init__(
        self,
        client: NatsClient,
        sid: int,
        subject: str,
        queue: str | None,
        max_msgs: int,
        max_bytes: int,
    ) -> None:
        self.sid = sid
        self.subject = subject
        self.queue = queue
        #: Messages dropped because the pending limits were reached.
        self.dropped = 0
        self._client = client
        self._max_msgs = max_msgs
        self._max_bytes = max_bytes
        self._queue: deque[Msg] = deque()
        self._bytes = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self._slow = False
        self._poked = False

    @property
    def pending(self) -> int:
        """Messages received and not yet consumed."""
        return len(self._queue)

    def _deliver(self, msg: Msg) -> None:
        if self._closed:
            return
        size = len(msg.data)
        if len(self._queue) >= self._max_msgs or self._bytes + size > self._max_bytes:
            self.dropped += 1
            if not self._slow:
                self._slow = True
                self._client._emit(SlowConsumer(self.subject, self.sid, self.dropped))
            return
        self._slow = False
        self._queue.append(msg)
        self._bytes += size
        if self._lot:
            self._lot.unpark()

    def _close(self) -> None:
        self._closed = True
        self._lot.unpark_all()

    def _poke(self) -> None:
        self._poked = True
        self._lot.unpark_all()

    async def _get(self, *, pokeable: bool = False) -> Msg | None:
        if self._queue:
            await trio.lowlevel.checkpoint()
        while not self._queue:
            if pokeable and self._poked:
                self._poked = False
                return None
            if self._closed:
                await trio.lowlevel.checkpoint()
                return None
            await self._lot.park()
        msg = self._queue.popleft()
        self._bytes -= len(msg.data)
        return msg

    async def next_msg(self) -> Msg:
        """The next message; raises :class:`NatsClosed` once the subscription has ended."""
        msg = await self._get()
        if msg is None:
            raise NatsClosed(f"subscription {self.sid} on {self.subject!r} has ended")
        return msg

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Msg:
        msg = await self._get()
        if msg is None:
            raise StopAsyncIteration
        return msg

    async def unsubscribe(self) -> None:
        """Stop the subscription (``UNSUB``); iteration ends after the pending messages."""
        await self._client._unsubscribe(self)


class _ReplyMux:
    """The one wildcard subscription on ``<inbox>.*`` that carries every request's reply."""

    queue = None

    def __init__(self, sid: int, prefix: str) -> None:
        self.sid = sid
        self.prefix = prefix
        self.subject = prefix + "*"
        self.waiters: dict[str, _Waiter] = {}

    def _deliver(self, msg: Msg) -> None:
        waiter = self.waiters.pop(msg.subject[len(self.prefix) :], None)
        if waiter is not None:
            waiter.set(msg)

    def _close(self) -> None:
        for waiter in self.waiters.values():
            waiter.fail(NatsClosed("the client is closed"))
        self.waiters.clear()
