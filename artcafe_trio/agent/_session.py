"""One authenticated connection and the tasks that serve it.

A :class:`Session` pairs the WebSocket with its sans-IO
:class:`~artcafe_trio.protocol.client.ClientConnection`; its connection nursery's
cancel scope carries the heartbeat-ACK watchdog deadline. Its tasks::

    connection nursery   (deadline: the ACK watchdog)
    ├── websocket reader (trio-websocket)
    ├── receiver         feeds frames to the ClientConnection and acts on its events
    ├── subscriber       confirms subscriptions added while connected
    ├── sender           writes the outbox's queued publishes, in order
    └── heartbeat        one heartbeat per (jittered) interval
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from .._errors import ConnectionLost, HubError, RemoteProtocolError, SessionReplaced
from .._logsafe import printable
from ..protocol._codes import CloseCode
from ..protocol._frames import Welcome
from ..protocol._heartbeats import heartbeat_delays, period_jitter
from ..protocol.client import (
    Answer,
    ClientConnection,
    ClientEvent,
    ClientState,
    HeartbeatAcked,
    HubErrorReceived,
    MessageReceived,
    PresenceAnswered,
    PublishConfirmed,
    PublishRefused,
    ReplyReceived,
    Request,
    RequestRefused,
    SubscribeConfirmed,
    UnexpectedFrame,
    UnsubscribeConfirmed,
)
from ._health import HealthStats, Link
from ._outbox import Outbox
from ._subscriptions import Subscription, Subscriptions

if TYPE_CHECKING:
    from ._supervisor import Supervisor

__all__ = ["Session", "lost"]

log = logging.getLogger("artcafe_trio.agent")


def lost(exc: ConnectionClosed) -> ConnectionLost:
    """What a closed WebSocket means, as an error (4003: :class:`SessionReplaced`)."""
    reason = exc.reason
    code = getattr(reason, "code", None)
    text = getattr(reason, "reason", None) or ""
    if code == 1006:  # no close frame: a reset, an EOF, or our own side gave up
        message = "connection lost without a close frame (1006)"
    else:
        message = f"the hub closed the connection ({code}{' ' + text if text else ''})"
    if code == CloseCode.REPLACED:
        return SessionReplaced(message, code=code, reason=text)
    return ConnectionLost(message, code=code, reason=text)


class _Waiter:
    """Waits for the hub's answer to one request (subscribe, unsubscribe, presence)."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.answer: Answer | None = None  # None after the event: the connection was lost


class Session:
    """One authenticated connection, from the welcome to its loss."""

    def __init__(
        self,
        ws: WebSocketConnection,
        client: ClientConnection,
        scope: trio.CancelScope,
        supervisor: Supervisor,
        url: str,
    ) -> None:
        assert client.welcome is not None
        self.url = url
        self.ws = ws
        self.client = client
        self.scope = scope
        self.welcome: Welcome = client.welcome
        self.session_id = self.welcome.session_id
        self.link = Link(
            self.session_id, self.welcome.heartbeat_interval, self.welcome.heartbeat_timeout, url
        )
        self.proved_healthy = False
        self.lost = trio.Event()
        self.waiters: dict[str, _Waiter] = {}
        self._sup = supervisor
        self._outbox: Outbox = supervisor.outbox
        self._subs: Subscriptions = supervisor.subscriptions
        self._stats: HealthStats = supervisor.stats

    # --- writing -------------------------------------------------------------------

    async def send(self, text: str, *, park_when_closing: bool = True) -> None:
        try:
            await self.ws.send_message(text)
        except ConnectionClosed as exc:
            if park_when_closing:
                await self._sup.unless_closing()
            raise lost(exc) from None

    async def _writable(self) -> ClientConnection:
        """The client connection, open for writing; after ``leave`` the task parks (the
        agent is closing its own connection), as a write to a closing socket does."""
        if self.client.state is not ClientState.OPEN:
            await self._sup.unless_closing()
            raise ConnectionLost("connection closed")
        return self.client

    async def request(self, make: Callable[[ClientConnection], Request]) -> Answer:
        """Send a request with an id and wait for the hub's answer to it."""
        if self.client.state is not ClientState.OPEN:
            raise ConnectionLost("the connection was lost before the hub answered")
        request = make(self.client)
        waiter = self.waiters[request.id] = _Waiter()
        try:
            await self.send(request.text, park_when_closing=False)
            await waiter.event.wait()
        finally:
            del self.waiters[request.id]
            self.client.forget(request.id)
        if waiter.answer is None:
            raise ConnectionLost("the connection was lost before the hub answered")
        return waiter.answer

    def ended(self) -> None:
        """The connection is gone: wake what waited for it."""
        self.client.closed()  # its requests are abandoned: wake their waiters
        for waiter in self.waiters.values():
            waiter.event.set()  # its answer will never come
        self._outbox.fail_replies_sent_on(
            self, ConnectionLost("connection lost before the reply came")
        )
        self.lost.set()

    # --- tasks ---------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def receiver(self) -> None:
        while True:
            try:
                text = await self.ws.get_message()
            except ConnectionClosed as exc:
                await self._sup.unless_closing()
                raise lost(exc) from None
            try:
                events = self.client.receive(text, trio.current_time())
            except RemoteProtocolError as exc:
                log.warning("ignoring an invalid frame from the hub: %s", printable(exc))
                continue
            for event in events:
                self._handle(event)

    def _handle(self, event: ClientEvent) -> None:
        if isinstance(event, HeartbeatAcked):
            self._acked(event)
        elif isinstance(event, MessageReceived):
            self._stats.messages_in += 1
            self._subs.deliver(event.message)
        elif isinstance(event, ReplyReceived):
            self._stats.messages_in += 1
            reply = self._outbox.replies.get(event.token)
            if reply is not None:
                reply.deliver(event.message)
        elif isinstance(event, PublishConfirmed):
            self._outbox.acknowledge(event.id, event.message_id, None)
        elif isinstance(event, PublishRefused):
            self._outbox.acknowledge(event.id, None, event.error)
        elif isinstance(event, HubErrorReceived):
            error = event.error
            log.warning("hub error %s: %s", printable(error.code), printable(error.message))
        elif isinstance(event, UnexpectedFrame):
            log.warning("ignoring unexpected %s frame from the hub", printable(event.frame.type))
        elif isinstance(
            event, SubscribeConfirmed | UnsubscribeConfirmed | PresenceAnswered | RequestRefused
        ):
            waiter = self.waiters.get(event.id)
            if waiter is not None:
                waiter.answer = event
                waiter.event.set()
            elif isinstance(event, RequestRefused):
                log.warning(
                    "hub error %s: %s", printable(event.error.code), printable(event.error.message)
                )

    def _acked(self, event: HeartbeatAcked) -> None:
        self._stats.acked(trio.current_time(), event.rtt, event.rtt_smoothed)
        # Only an ACK moves the watchdog: it alone proves our frames reach the hub and
        # the hub answers (messages may keep coming from a hub that no longer reads us).
        if event.deadline is not None:
            self.scope.deadline = event.deadline
        if not self.proved_healthy:
            self.proved_healthy = True
            self._stats.failures = 0

    @trio.lowlevel.enable_ki_protection
    async def sender(self) -> None:
        outbox = self._outbox
        while True:
            if outbox.has_unsent() and self._subs.dirty:
                # A subscription registered before a publish is confirmed before the
                # publish is sent, so an agent receives what it publishes right after.
                self._subs.dirty = False
                await self.confirm_subscriptions()
            while (pending := outbox.next_unsent()) is not None:
                client = await self._writable()
                request = client.publish(
                    pending.subject,
                    pending.data,
                    frame_id=pending.id,
                    reply_to=pending.reply_to,
                    reply_token=pending.reply_token,
                    reply_from=pending.reply_from,
                    encoded=pending.text,
                )
                await self.send(request.text)
                self._stats.messages_out += 1
                outbox.mark_sent(pending, self)
            await outbox.wait_changed()

    @trio.lowlevel.enable_ki_protection
    async def subscriber(self) -> None:
        while True:
            await self.confirm_subscriptions()
            await self._subs.wait_changed()

    async def heartbeat(self, interval: float, jitter: float, rng: random.Random) -> None:
        """One heartbeat now, then one after each of :func:`heartbeat_delays`' waits."""
        period = period_jitter(jitter, interval, self.welcome.heartbeat_timeout)
        delays = heartbeat_delays(interval, jitter, rng, period=period)
        while True:
            client = await self._writable()
            await self.send(client.heartbeat(trio.current_time()))
            await trio.sleep(next(delays))

    # --- subscriptions -------------------------------------------------------------

    async def confirm_subscriptions(self) -> None:
        """Subscribe, and wait for the hub to confirm, every pattern not yet confirmed
        here (all sent at once, then all answers awaited: one round trip, not one per
        pattern). A refused pattern is logged and dropped (``subscribe()`` raises)."""

        async def confirm(sub: Subscription) -> None:
            try:
                await self.confirm_subscription(sub)
            except HubError as exc:
                log.error(
                    "subscription to %s refused by the hub: %s",
                    printable(sub.pattern),
                    printable(exc),
                )

        async with trio.open_nursery() as nursery:
            for sub in self._subs.all():
                if sub.confirmed_on is not self:
                    nursery.start_soon(confirm, sub)

    async def confirm_subscription(self, sub: Subscription) -> None:
        """Make sure the hub confirmed ``sub`` here: one request per connection, shared
        by every task that needs it."""
        if sub.confirmed_on is self:
            return
        if sub.requested_on is self:
            await sub.settled.wait()
            if sub.confirmed_on is not self:
                raise ConnectionLost("the subscription was not confirmed on this connection")
            return
        sub.requested_on, sub.settled = self, trio.Event()
        pattern = sub.pattern
        try:
            answer = await self.request(lambda client: client.subscribe(pattern))
        except BaseException:
            sub.requested_on = None
            raise
        finally:
            sub.settled.set()
        if isinstance(answer, RequestRefused):
            self._subs.drop(sub)
            raise answer.error
        sub.confirmed_on = self
