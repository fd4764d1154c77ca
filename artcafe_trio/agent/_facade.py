"""The :class:`Agent` facade: the public methods over the components (supervisor,
outbox, subscriptions, health) and the agent's lifecycle (run, stop gracefully)."""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, final

import trio

from .._errors import AuthenticationError, ConnectFailed, ConnectionLost, ReconnectFailed
from ..protocol._fields import MAX_CAPABILITIES, MAX_ID_LENGTH
from ..protocol._frames import Message, PresenceRecord
from ..protocol._keys import PrivateKey
from ..protocol._subjects import validate_pattern, validate_subject
from ..protocol.client import AgentCredentials, IdAllocator, PresenceAnswered, RequestRefused
from ._config import AgentConfig
from ._health import AgentHealth, AgentState, HealthStats
from ._lifecycle import Lifecycle
from ._outbox import Outbox, Pending, Reply
from ._subscriptions import Handler, HandlerT, Subscriptions
from ._supervisor import Supervisor
from ._transport import Transports

__all__ = ["Agent", "fresh_copy", "short_traceback"]

log = logging.getLogger("artcafe_trio.agent")


@final
class Agent:
    """A connected agent. Obtain one from :func:`open_agent` or :func:`run_agent`
    (constructing it directly raises :class:`TypeError`).

    Handlers are registered with :meth:`on_message` or :meth:`subscribe`,
    before or after the connection exists. :meth:`publish` waits while the
    agent is disconnected; bound it with a cancel scope if needed.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "Agent cannot be constructed directly: use 'async with open_agent(...)' or "
            "'await nursery.start(run_agent, ...)'"
        )

    @classmethod
    def _create(
        cls,
        config: AgentConfig,
        private_key: PrivateKey,
        transports: Transports,
        *,
        rng: random.Random,
        wall_clock: Callable[[], float],
    ) -> Agent:
        self = cls.__new__(cls)
        self._setup(config, private_key, transports, rng=rng, wall_clock=wall_clock)
        return self

    def _setup(
        self,
        config: AgentConfig,
        private_key: PrivateKey,
        transports: Transports,
        *,
        rng: random.Random,
        wall_clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.agent_id, self.tenant_id, self.url = config.agent_id, config.tenant_id, config.url
        self.heartbeat_interval = config.heartbeat_interval
        self.heartbeat_timeout_multiplier = config.heartbeat_timeout_multiplier
        self.heartbeat_jitter = config.heartbeat_jitter
        self.auto_reconnect = config.auto_reconnect
        self.retry_first_connect = config.retry_first_connect
        self.backoff = config.backoff
        self.capabilities, self.metadata = config.capabilities, dict(config.metadata)
        ids = IdAllocator(secrets.token_hex(4))
        self._stats = HealthStats(wall_clock)
        self._outbox = Outbox(ids, config.max_pending_publishes)
        self._subs = Subscriptions(
            self._stats,
            max_pending_messages=config.max_pending_messages,
            max_concurrent_handlers=config.max_concurrent_handlers,
            raise_handler_errors=config.raise_handler_errors,
        )
        credentials = AgentCredentials(
            agent_id=config.agent_id,
            tenant_id=config.tenant_id,
            private_key=private_key,
            heartbeat_interval=config.heartbeat_interval,
            heartbeat_timeout_multiplier=config.heartbeat_timeout_multiplier,
            capabilities=config.capabilities,
            metadata=dict(config.metadata),
        )
        self._sup = Supervisor(
            config, credentials, transports, ids=ids, outbox=self._outbox,
            subscriptions=self._subs, stats=self._stats, rng=rng,
        )  # fmt: skip
        self._life = Lifecycle(self._sup, self._subs, self._outbox)

    def __repr__(self) -> str:
        return f"<Agent {self.tenant_id}/{self.agent_id} {self.state.value}>"

    # --- public API ------------------------------------------------------------

    @property
    def state(self) -> AgentState:
        """``connecting``, ``connected``, ``reconnecting`` or ``closed`` (a ``str`` enum)."""
        return self._sup.state

    @property
    def session_id(self) -> str | None:
        session = self._sup.session
        return session.session_id if session else None

    def on_message(self, pattern: str) -> Callable[[HandlerT], HandlerT]:
        """Decorator: call the handler for every message matching ``pattern``.

        Works before or after the agent is connected; the subscription is sent
        to the hub in the background (use :meth:`subscribe` to wait for it).
        """
        validate_pattern(pattern)

        def register(handler: HandlerT) -> HandlerT:
            self._subs.add(pattern, handler)
            return handler

        return register

    async def subscribe(self, pattern: str, handler: Handler) -> None:
        """Register ``handler`` for ``pattern``; when connected, wait for the hub's
        confirmation. Raises :class:`HubError` if the hub refuses the subscription."""
        validate_pattern(pattern)
        sub = self._subs.add(pattern, handler)
        session = self._sup.session
        if session is not None and sub.confirmed_on is not session:
            with contextlib.suppress(ConnectionLost):  # the next connection resubscribes it
                await session.confirm_subscription(sub)

    async def unsubscribe(self, pattern: str, handler: Handler | None = None) -> None:
        """Remove ``handler`` (or every handler) for ``pattern``; tell the hub when none
        is left."""
        if not self._subs.remove(pattern, handler):
            return
        session = self._sup.session
        if session is not None:  # also when the subscribe is still in flight: order holds
            try:
                answer = await session.request(lambda client: client.unsubscribe(pattern))
            except ConnectionLost:
                return  # the next connection will not resubscribe it
            if isinstance(answer, RequestRefused):
                raise answer.error

    def on_reconnect(self, callback: Callable[[], object]) -> Callable[[], object]:
        """Register a callback (sync or async) run after every reconnection, before
        heartbeats resume: restore your own state there. Usable as a decorator."""
        self._sup.on_reconnect.append(callback)
        return callback

    async def publish(
        self, subject: str, data: Any = None, *, confirm: bool = False, reply_to: str | None = None
    ) -> str | None:
        """Publish ``data`` (any JSON value) to ``subject``.

        Waits while the agent is disconnected or too many publishes are in
        flight. Returns once the frame is on the wire; with ``confirm=True``,
        once the hub acknowledged it, returning the hub's message id. A publish
        whose acknowledgement was lost is re-sent after a reconnect with the
        same id and de-duplicated by the hub, so it is delivered exactly once.
        Cancelling before the frame was sent withdraws it; after that it is
        still delivered.
        """
        validate_subject(subject)
        if reply_to is not None:
            validate_subject(reply_to)
        pending = await self._enqueue(subject, data, reply_to=reply_to, reply_token=None)
        await self._outbox.wait_sent(pending)  # cancelled before it is sent: withdrawn
        if not confirm:
            return None
        await pending.acked.wait()
        if pending.error is not None:
            raise pending.error
        return pending.message_id

    async def request(
        self, subject: str, data: Any = None, *, reply_from: Iterable[str] | None = None
    ) -> Any:
        """Publish a request and return the ``data`` of the first reply.

        Waits until the reply comes: bound it with ``trio.fail_after``. Replies
        are addressed to the requesting session, so if the connection is lost
        before the reply arrives this raises :class:`ConnectionLost`: retry.

        Any agent of the tenant subscribed to ``subject`` sees the request and may
        answer it first. ``reply_from`` (agent ids) makes the hub accept an answer
        only from those agents: the reply's ``sender`` is authenticated by the hub.
        """
        message = await self.request_message(subject, data, reply_from=reply_from)
        return message.data

    async def request_message(
        self, subject: str, data: Any = None, *, reply_from: Iterable[str] | None = None
    ) -> Message:
        """Like :meth:`request`, but return the whole reply :class:`Message`."""
        validate_subject(subject)
        allowed = None if reply_from is None else _agent_ids(reply_from)
        token = secrets.token_hex(8)
        reply = self._outbox.replies[token] = Reply()
        try:
            pending = await self._enqueue(
                subject, data, reply_to=None, reply_token=token, reply_from=allowed
            )
            await self._outbox.wait_sent(pending)
            await reply.event.wait()
            if reply.error is not None:
                raise reply.error
            assert reply.message is not None
            return reply.message
        finally:
            del self._outbox.replies[token]

    async def reply(self, message: Message, data: Any = None) -> None:
        """Answer a request ``message`` (one whose ``reply_to`` is set)."""
        if message.reply_to is None:
            raise ValueError("this message has no reply_to: it is not a request")
        await self.publish(message.reply_to, data)

    async def presence(self) -> list[PresenceRecord]:
        """The hub's presence table for this agent's tenant."""
        while True:
            session = await self._sup.wait_connection()
            try:
                answer = await session.request(lambda client: client.presence_query())
            except ConnectionLost:
                await session.lost.wait()
                continue  # ask again on the next connection
            if isinstance(answer, PresenceAnswered):
                return list(answer.records)
            if isinstance(answer, RequestRefused):
                raise answer.error

    async def wait_connected(self) -> None:
        """Return when the agent is connected (at once if it is)."""
        await self._sup.wait_connection()

    def health(self) -> AgentHealth:
        """A frozen snapshot of the connection's health.

        Callable from anywhere: before the agent runs, after it stopped, or from
        another thread (ages are then measured on the wall clock).
        """
        try:
            now: float | None = trio.current_time()
        except RuntimeError:  # not inside this agent's trio run
            now = None
        session = self._sup.session
        link = session.link if session else None
        return self._stats.snapshot(self.state, link, now, len(self._outbox))

    def get_connection_health(self) -> dict[str, Any]:
        """The original SDK's health dict (``healthy``, ``connected``, ``last_heartbeat_ack``
        as ISO-8601 or None, ``seconds_since_ack``, ``reconnect_attempts``) plus a few more."""
        health = self.health()
        return {
            "healthy": health.healthy,
            "connected": health.connected,
            "last_heartbeat_ack": health.last_ack.isoformat() if health.last_ack else None,
            "seconds_since_ack": health.seconds_since_ack,
            "reconnect_attempts": health.reconnect_attempts,
            "state": health.state,
            "session_id": health.session_id,
            "rtt": health.rtt,
            "waiting_publishes": health.waiting_publishes,
        }

    def stop(self) -> None:
        """Ask the agent to stop: the ``open_agent`` block is cancelled, ends without error,
        and the agent leaves gracefully. Safe to call at any time, any number of times."""
        self._life.stop()

    async def serve(
        self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run this agent until :meth:`stop` (or until cancelled: it then leaves briefly).

        ``task_status.started(agent)`` is called once the first connection is
        authenticated, so ``await nursery.start(agent.serve)`` returns the connected
        agent. An agent runs once; :func:`run_agent` builds one and serves it.
        """
        async with short_traceback(), self._running():
            task_status.started(self)
            await trio.sleep_forever()

    async def _enqueue(
        self, subject: str, data: Any, *, reply_to: str | None, reply_token: str | None,
        reply_from: tuple[str, ...] | None = None,
    ) -> Pending:  # fmt: skip
        session = self._sup.session
        return await self._outbox.enqueue(
            subject, data, reply_to=reply_to, reply_token=reply_token,
            max_frame_bytes=session.welcome.max_frame_bytes if session else None,
            reply_from=reply_from,
        )  # fmt: skip

    def _running(self) -> contextlib.AbstractAsyncContextManager[Agent]:
        return self._life.running(self)


Agent.__module__ = "artcafe_trio"


def fresh_copy(exc: BaseException) -> BaseException:
    """A copy of ``exc`` (same type, args and attributes) without its traceback, to raise
    from the caller's frame: contextlib, outcome and trio.to_thread would give the same
    object its old frames back."""
    copy = type(exc).__new__(type(exc), *exc.args)
    copy.__dict__.update(exc.__dict__)
    return copy


@asynccontextmanager
async def short_traceback() -> AsyncIterator[None]:
    """Errors caused by the user's input (a refused key, a wrong URL) or by a hub that
    cannot be reached leave ``open_agent`` without the agent's internal frames: the
    message says what to fix.

    A :class:`ReconnectFailed` is raised without its chain of causes (the last one's
    message is in its own; the exception is ``.last_cause``, its cause chain intact):
    with the hub down, the chain is trio's ExceptionGroup of every address tried.
    """
    try:
        yield
    except ReconnectFailed as exc:
        raise fresh_copy(exc) from None
    except (AuthenticationError, ConnectFailed) as exc:
        if isinstance(exc, ConnectFailed) and not exc.permanent:
            raise
        cause = exc.__cause__
        while cause is not None:  # kept for programs, printed as one line each
            cause.__traceback__ = None
            cause = cause.__cause__
        raise fresh_copy(exc) from exc.__cause__


def _agent_ids(reply_from: Iterable[str]) -> tuple[str, ...]:
    """``reply_from`` as the frame carries it, checked here rather than by the hub."""
    if isinstance(reply_from, str):
        raise TypeError("reply_from is a collection of agent ids, not one string")
    ids = tuple(reply_from)
    if not 0 < len(ids) <= MAX_CAPABILITIES or not all(
        isinstance(i, str) and 0 < len(i) <= MAX_ID_LENGTH for i in ids
    ):
        raise ValueError(
            f"reply_from must name 1 to {MAX_CAPABILITIES} agent ids of 1 to"
            f" {MAX_ID_LENGTH} characters"
        )
    return ids
