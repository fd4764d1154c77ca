"""Subscriptions and dispatch: the handlers registered per pattern, the subject index
that matches a message to them, and one ordered dispatcher per subscription.

Handlers run in the dispatch nursery, so a slow handler never stalls the receiver or
the heartbeat. User code never runs KI-protected (:func:`call_user`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias, TypeVar

import trio

from .._errors import AgentClosed
from .._logsafe import printable
from ..protocol._frames import Message
from ..protocol._subjects import SubjectIndex
from ._health import HealthStats

__all__ = [
    "FullMessageHandler",
    "Handler",
    "HandlerT",
    "MessageHandler",
    "Subscription",
    "Subscriptions",
    "call_user",
]

log = logging.getLogger("artcafe_trio.agent")


class MessageHandler(Protocol):
    """``handler(subject, data)``: sync, or async (returning an awaitable)."""

    def __call__(self, subject: str, data: Any, /) -> object: ...


class FullMessageHandler(Protocol):
    """``handler(subject, data, message)``: also gets the whole :class:`Message`."""

    def __call__(self, subject: str, data: Any, message: Message, /) -> object: ...


MessageHandler.__module__ = FullMessageHandler.__module__ = "artcafe_trio"

Handler: TypeAlias = MessageHandler | FullMessageHandler
"""What :meth:`Agent.on_message` and :meth:`Agent.subscribe` accept."""
HandlerT = TypeVar("HandlerT", bound=Handler)


def _wants_message(handler: Handler) -> bool:
    """Whether a handler takes a third ``message`` argument."""
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params)


class Subscription:
    """One pattern: its handlers, its queue of messages, where the hub confirmed it."""

    def __init__(self, pattern: str, max_pending: int) -> None:
        self.pattern = pattern
        self.handlers: list[tuple[Handler, bool]] = []
        self.confirmed_on: object | None = None  # the session that confirmed it
        self.requested_on: object | None = None  # a subscribe is in flight there
        self.settled = trio.Event()  # set when that request got its answer, or failed
        self.send_channel, self.receive_channel = trio.open_memory_channel[Message](max_pending)
        self.dispatching = False


@trio.lowlevel.disable_ki_protection
async def call_user(
    function: Callable[..., object],
    args: tuple[Any, ...],
    what: str,
    stats: HealthStats,
    *,
    raise_errors: bool,
) -> None:
    """Call a user's sync or async function; its exception is logged with its traceback
    and counted, and re-raised only with ``raise_errors``.

    The agent's own tasks are KI-protected; user code is not: Ctrl+C interrupts a
    handler or callback where it runs (the ``KeyboardInterrupt`` then stops the agent).
    """
    try:
        result = function(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        stats.handler_errors += 1
        log.exception("%s failed", what)
        if raise_errors:
            raise


class Subscriptions:
    """The agent's subscriptions and their dispatchers."""

    def __init__(
        self,
        stats: HealthStats,
        *,
        max_pending_messages: int,
        max_concurrent_handlers: int,
        raise_handler_errors: bool,
    ) -> None:
        self.stats = stats
        self.max_pending = max_pending_messages
        self.max_concurrent = max_concurrent_handlers
        self.raise_errors = raise_handler_errors
        self.stopping = False  # no new messages or handlers taken
        self.dirty = False  # a subscription was added since the sender last looked
        self._subs: dict[str, Subscription] = {}
        self._index: SubjectIndex[str] = SubjectIndex()  # the keys of _subs
        self._changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._done = trio.Event()

    def get(self, pattern: str) -> Subscription | None:
        return self._subs.get(pattern)

    def all(self) -> list[Subscription]:
        return list(self._subs.values())

    def add(self, pattern: str, handler: Handler) -> Subscription:
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        if self.stopping:
            raise AgentClosed("the agent is stopping; no new handlers")
        sub = self._subs.get(pattern)
        if sub is None:
            sub = self._subs[pattern] = Subscription(pattern, self.max_pending)
            self._index.add(pattern, pattern)
            self._start_dispatcher(sub)
            self.dirty = True
            self._changed.set()
        sub.handlers.append((handler, _wants_message(handler)))
        return sub

    def remove(self, pattern: str, handler: Handler | None) -> bool:
        """Remove ``handler`` (or all); True when the pattern has no handler left (and
        is gone: tell the hub)."""
        sub = self._subs.get(pattern)
        if sub is None:
            return False
        sub.handlers = [h for h in sub.handlers if handler is not None and h[0] is not handler]
        if sub.handlers:
            return False
        self.drop(sub)
        return True

    def drop(self, sub: Subscription) -> None:
        """Forget ``sub`` (removed, or refused by the hub)."""
        if self._subs.get(sub.pattern) is sub:
            del self._subs[sub.pattern]
            self._index.remove(sub.pattern, sub.pattern)
            sub.send_channel.close()

    async def wait_changed(self) -> None:
        """Until a subscription is added (call after looking at all of them)."""
        self._changed = trio.Event()
        await self._changed.wait()

    def deliver(self, message: Message) -> None:
        """Queue ``message`` for every subscription whose pattern matches its subject
        (the hub delivers a message once per connection; each subscription's handlers
        run once)."""
        if self.stopping:
            return  # not taken
        subject = message.subject
        for pattern, _ in self._index.match(subject):
            sub = self._subs[pattern]
            try:
                sub.send_channel.send_nowait(message)
            except trio.WouldBlock:
                self.stats.messages_dropped += 1
                log.error(
                    "handlers for %r are %d messages behind: dropping a message on %r",
                    sub.pattern,
                    self.max_pending,
                    printable(subject),
                )
            except trio.ClosedResourceError:
                pass

    async def call(self, function: Callable[..., object], args: tuple[Any, ...], what: str) -> None:
        await call_user(function, args, what, self.stats, raise_errors=self.raise_errors)

    # --- dispatch --------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def run(self, task_status: trio.TaskStatus[None]) -> None:
        """The dispatch nursery: until :meth:`stop_taking`, then until the dispatchers
        drained their (closed) channels."""
        try:
            async with trio.open_nursery() as dispatch:
                self._nursery = dispatch
                for sub in self._subs.values():
                    self._start_dispatcher(sub)
                task_status.started()
                await self._stop.wait()
        finally:
            self._done.set()

    def stop_taking(self) -> None:
        """Take no more messages or handlers; dispatchers finish what they hold."""
        self.stopping = True
        for sub in self._subs.values():
            sub.send_channel.close()
        self._stop.set()

    async def wait_done(self) -> None:
        await self._done.wait()

    def cancel(self) -> None:
        """Cancel the handlers still running."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _start_dispatcher(self, sub: Subscription) -> None:
        if self._nursery is not None and not sub.dispatching:
            sub.dispatching = True
            self._nursery.start_soon(self._dispatch, sub)

    @trio.lowlevel.enable_ki_protection
    async def _dispatch(self, sub: Subscription) -> None:
        slots = trio.Semaphore(self.max_concurrent)
        async with trio.open_nursery() as concurrent:
            async for message in sub.receive_channel:
                if self.max_concurrent == 1:
                    await self._call_handlers(sub, message)
                else:
                    await slots.acquire()
                    concurrent.start_soon(self._call_and_release, sub, message, slots)

    async def _call_and_release(
        self, sub: Subscription, message: Message, slots: trio.Semaphore
    ) -> None:
        try:
            await self._call_handlers(sub, message)
        finally:
            slots.release()

    async def _call_handlers(self, sub: Subscription, message: Message) -> None:
        for handler, wants_message in list(sub.handlers):
            args: tuple[Any, ...] = (message.subject, message.data)
            if wants_message:
                args += (message,)
            what = f"handler {handler!r} for {sub.pattern!r} on {message.subject!r}"
            await self.call(handler, args, what)
