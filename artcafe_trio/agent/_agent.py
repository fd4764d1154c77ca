"""The agent: ``open_agent`` and the :class:`Agent` it yields.

Task tree while ``async with open_agent(...) as agent:`` runs::

    agent nursery
    ├── supervisor               connect → auth → restore → run → back off → retry
    │   └── connection nursery   its cancel scope's deadline is the heartbeat-ACK watchdog
    │       ├── websocket reader (trio-websocket)
    │       ├── receiver         reads frames; ACKs push the watchdog deadline
    │       ├── subscriber       confirms subscriptions added while connected
    │       ├── sender           sends waiting publishes, in order
    │       └── heartbeat        one heartbeat per interval
    └── dispatch nursery         one ordered dispatcher per subscription; handlers run here,
                                 so a slow handler never stalls the receiver or the heartbeat
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import inspect
import itertools
import logging
import os
import random
import secrets
import signal
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeAlias
from urllib.parse import SplitResult, quote, urlsplit

import attrs
import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from .._errors import (
    AgentClosed,
    ArtcafeError,
    AuthenticationError,
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    HeartbeatTimeout,
    HubError,
    LocalProtocolError,
    ProtocolError,
    ReconnectFailed,
    SessionReplaced,
)
from .._logsafe import printable
from .._util import collapse_exception_groups
from ..protocol._backoff import Backoff
from ..protocol._codes import CloseCode
from ..protocol._frames import (
    DEFAULT_MAX_FRAME_BYTES,
    Auth,
    Challenge,
    Error,
    Frame,
    Heartbeat,
    HeartbeatAck,
    Leave,
    Message,
    PresenceQuery,
    PresenceRecord,
    PresenceState,
    Publish,
    Published,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    decode,
    encode,
)
from ..protocol._heartbeats import MAX_HEARTBEAT_JITTER, heartbeat_delays, period_jitter
from ..protocol._keys import PrivateKey, load_private_key
from ..protocol._subjects import SubjectIndex, validate_pattern, validate_subject
from ._connfail import connect_failed

__all__ = ["Agent", "AgentHealth", "Dialer", "Handler", "open_agent"]

log = logging.getLogger("artcafe_trio.agent")

Handler: TypeAlias = Callable[..., Any]
"""``handler(subject, data)`` or ``handler(subject, data, message)``; sync or async."""

Dialer: TypeAlias = Callable[[trio.Nursery, str], Awaitable[WebSocketConnection]]
"""Opens a WebSocket to the hub: ``await dial(nursery, resource)``; the connection's
background task runs in ``nursery``. The transport seam used by the test kit."""

State: TypeAlias = Literal["connecting", "connected", "reconnecting", "closed"]

DEFAULT_URL = "ws://127.0.0.1:8765"
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
"""What the agent accepts from the hub; the hub bounds what it forwards."""
_CONNECTION_ERRORS = (
    ConnectionLost,
    OSError,
    trio_websocket.HandshakeError,
    trio.BrokenResourceError,
    ConnectionClosed,  # a safety net: converted to ConnectionLost where raised
)
_AUTH_REFUSALS = {"authentication_failed", "unsupported_protocol"}


class _HangUpAlarm(trio.abc.Stream):
    """The agent's byte stream during the WebSocket handshake: end of stream or an error
    cancels ``scope``. (trio-websocket 0.12 waits forever for a handshake that the peer
    abandoned; this turns that into an immediate failed attempt.)"""

    def __init__(self, inner: trio.abc.Stream, scope: trio.CancelScope) -> None:
        self.inner = inner
        self.scope: trio.CancelScope | None = scope

    def disarm(self) -> None:
        self.scope = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except BaseException:
            if self.scope is not None:
                self.scope.cancel()
            raise
        if not data and self.scope is not None:
            self.scope.cancel()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


@attrs.frozen
class AgentHealth:
    """A snapshot of the agent's connection health (``agent.health()``)."""

    state: State
    connected: bool
    healthy: bool
    session_id: str | None
    connected_since: datetime.datetime | None
    last_ack: datetime.datetime | None
    seconds_since_ack: float | None
    rtt: float | None
    rtt_smoothed: float | None
    reconnect_attempts: int
    total_reconnects: int  # successful reconnections since the agent started
    next_retry_in: float | None
    waiting_publishes: int
    messages_in: int
    messages_out: int
    messages_dropped: int
    handler_errors: int
    heartbeat_interval: float | None
    heartbeat_timeout: float | None


class _Pending:
    """A publish accepted by ``publish()`` and not yet acknowledged by the hub."""

    __slots__ = (
        "acked", "data", "error", "id", "message_id", "reply_to", "reply_token", "sent",
        "subject", "text", "transmitted",
    )  # fmt: skip

    def __init__(
        self,
        frame_id: str,
        subject: str,
        data: Any,
        *,
        reply_to: str | None = None,
        reply_token: str | None = None,
    ) -> None:
        self.id = frame_id
        self.subject = subject
        self.data = data
        self.reply_to = reply_to
        self.reply_token = reply_token
        self.text: str | None = None
        self.transmitted = False  # written to a connection at least once
        self.sent = trio.Event()
        self.acked = trio.Event()
        self.message_id: str | None = None
        self.error: ArtcafeError | None = None


class _Subscription:
    def __init__(self, pattern: str, max_pending: int) -> None:
        self.pattern = pattern
        self.handlers: list[tuple[Handler, bool]] = []
        self.confirmed_on: _Connection | None = None
        self.requested_on: _Connection | None = None  # a subscribe is in flight there
        self.settled = trio.Event()  # set when that request got its answer, or failed
        self.send_channel, self.receive_channel = trio.open_memory_channel[Message](max_pending)
        self.dispatching = False


class _Reply:
    """A request waiting for its first reply."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.message: Message | None = None
        self.conn: _Connection | None = None  # where the request was sent
        self.error: ArtcafeError | None = None

    def fail(self, error: ArtcafeError) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


class _Connection:
    """One authenticated WebSocket session."""

    @classmethod
    def placeholder(cls) -> _Connection:
        """A stand-in used to encode frames before a session exists."""
        conn = cls.__new__(cls)
        conn.session_id = "s-" + "0" * 16
        return conn

    def __init__(self, ws: WebSocketConnection, welcome: Welcome, scope: trio.CancelScope) -> None:
        self.ws = ws
        self.welcome = welcome
        self.scope = scope
        self.session_id = welcome.session_id
        self.proved_healthy = False
        self.lost = trio.Event()


class _Waiter:
    """Waits for the hub's answer to one request frame (subscribe, unsubscribe, presence)."""

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.event = trio.Event()
        self.frame: Frame | None = None  # None after the event: the connection was lost


def _iso(moment: float | None) -> datetime.datetime | None:
    if moment is None:
        return None
    return datetime.datetime.fromtimestamp(moment, tz=datetime.UTC)


def _wants_message(handler: Handler) -> bool:
    """Whether a handler takes a third ``message`` argument."""
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params)


class Agent:
    """A connected agent. Obtain one from :func:`open_agent`.

    Handlers are registered with :meth:`on_message` or :meth:`subscribe`,
    before or after the connection exists. :meth:`publish` waits while the
    agent is disconnected; bound it with a cancel scope if needed.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        tenant_id: str,
        private_key: PrivateKey,
        url: str = DEFAULT_URL,
        heartbeat_interval: float | None = 30.0,
        heartbeat_timeout_multiplier: float = 3.0,
        heartbeat_jitter: float = 0.1,
        auto_reconnect: bool = True,
        retry_first_connect: bool = True,
        backoff: Backoff | None = None,
        ssl_context: ssl.SSLContext | None = None,
        capabilities: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
        dial: Dialer | None = None,
        connect_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        max_concurrent_handlers: int = 1,
        max_pending_messages: int = 10_000,
        max_pending_publishes: int = 10_000,
        raise_handler_errors: bool = False,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0 (or None for no heartbeats)")
        if heartbeat_timeout_multiplier < 1:
            raise ValueError("heartbeat_timeout_multiplier must be >= 1")
        if not 0 <= heartbeat_jitter <= MAX_HEARTBEAT_JITTER:
            raise ValueError(
                f"heartbeat_jitter must be between 0 and {MAX_HEARTBEAT_JITTER:g}, "
                f"got {heartbeat_jitter!r}"
            )
        if max_concurrent_handlers < 1:
            raise ValueError("max_concurrent_handlers must be >= 1")
        self.agent_id = agent_id
        self.tenant_id = tenant_id
        self.url = url.rstrip("/")
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout_multiplier = heartbeat_timeout_multiplier
        self.heartbeat_jitter = heartbeat_jitter
        self.auto_reconnect = auto_reconnect
        self.retry_first_connect = retry_first_connect
        self.backoff = backoff or Backoff()
        self.capabilities = tuple(capabilities)
        self.metadata = dict(metadata or {})
        self._private_key = private_key
        self._ssl_context = ssl_context
        self._dial = self._dial_url if dial is None else _without_ki_protection(dial)
        self._connect_timeout = connect_timeout
        self._stop_timeout = stop_timeout
        self._max_concurrent = max_concurrent_handlers
        self._max_pending_messages = max_pending_messages
        self._raise_handler_errors = raise_handler_errors
        self._rng = rng or random.Random()
        self._wall_clock = wall_clock
        self._publish_slots = trio.Semaphore(max_pending_publishes)
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)

        self._state: State = "connecting"
        self._conn: _Connection | None = None
        self._connected = trio.Event()
        self._ever_connected = trio.Event()
        self._stopping = False  # no new messages taken; handlers may still publish
        self._closed = False  # no more publishing; the supervisor will not reconnect
        self._stop_early = False
        self._body_scope: trio.CancelScope | None = None
        self._entry_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._dispatch_nursery: trio.Nursery | None = None
        self._dispatch_stop = trio.Event()
        self._dispatch_done = trio.Event()
        self._flushed = trio.Event()
        self._conn_proved_healthy = False

        self._subscriptions: dict[str, _Subscription] = {}
        self._patterns: SubjectIndex[str] = SubjectIndex()  # the keys of _subscriptions
        self._subscriptions_changed = trio.Event()
        self._subscriptions_dirty = False
        self._pending: dict[str, _Pending] = {}
        self._unsent: collections.deque[_Pending] = collections.deque()
        self._unsent_changed = trio.Event()
        self._waiters: dict[str, _Waiter] = {}
        self._replies: dict[str, _Reply] = {}
        self._on_reconnect: list[Callable[[], Any]] = []
        self._heartbeat_sent: dict[int, float] = {}

        self._failures = 0
        self._total_reconnects = 0
        self._next_retry_at: float | None = None
        self._last_ack: float | None = None
        self._last_ack_wall: float | None = None
        self._connected_since_wall: float | None = None
        self._rtt: float | None = None
        self._rtt_smoothed: float | None = None
        self._messages_in = 0
        self._messages_out = 0
        self._messages_dropped = 0
        self._handler_errors = 0

    def __repr__(self) -> str:
        return f"<Agent {self.tenant_id}/{self.agent_id} {self._state}>"

    # --- public API ------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def session_id(self) -> str | None:
        return self._conn.session_id if self._conn else None

    def on_message(self, pattern: str) -> Callable[[Handler], Handler]:
        """Decorator: call the handler for every message matching ``pattern``.

        Works before or after the agent is connected; the subscription is sent
        to the hub in the background (use :meth:`subscribe` to wait for it).
        """
        validate_pattern(pattern)

        def register(handler: Handler) -> Handler:
            self._add_handler(pattern, handler)
            return handler

        return register

    async def subscribe(self, pattern: str, handler: Handler) -> None:
        """Register ``handler`` for ``pattern``; when connected, wait for the hub's confirmation.

        Raises :class:`HubError` if the hub refuses the subscription.
        """
        validate_pattern(pattern)
        sub = self._add_handler(pattern, handler)
        conn = self._conn
        if conn is not None and sub.confirmed_on is not conn:
            with contextlib.suppress(ConnectionLost):  # the next connection resubscribes it
                await self._confirm_subscription(conn, sub)

    async def unsubscribe(self, pattern: str, handler: Handler | None = None) -> None:
        """Remove ``handler`` (or every handler) for ``pattern``; tell the hub when none is left."""
        sub = self._subscriptions.get(pattern)
        if sub is None:
            return
        sub.handlers = [h for h in sub.handlers if handler is not None and h[0] is not handler]
        if sub.handlers:
            return
        del self._subscriptions[pattern]
        self._patterns.remove(pattern, pattern)
        sub.send_channel.close()
        conn = self._conn
        if conn is not None:  # also when the subscribe is still in flight: order holds
            try:
                answer = await self._request(conn, Unsubscribe(id=self._next_id(), subject=pattern))
            except ConnectionLost:
                return  # the next connection will not resubscribe it
            if isinstance(answer, Error):
                raise HubError(answer.code, answer.message)

    def on_reconnect(self, callback: Callable[[], Any]) -> Callable[[], Any]:
        """Register a callback (sync or async) run after every reconnection, before heartbeats
        resume: restore your own state there. Usable as a decorator."""
        self._on_reconnect.append(callback)
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
        await self._wait_sent(pending)  # cancelled before it is sent: withdrawn
        if not confirm:
            return None
        await pending.acked.wait()
        if pending.error is not None:
            raise pending.error
        return pending.message_id

    async def request(self, subject: str, data: Any = None) -> Any:
        """Publish a request and return the ``data`` of the first reply.

        Waits until the reply comes: bound it with ``trio.fail_after``. Replies
        are addressed to the requesting session, so if the connection is lost
        before the reply arrives this raises :class:`ConnectionLost`: retry.
        """
        message = await self.request_message(subject, data)
        return message.data

    async def request_message(self, subject: str, data: Any = None) -> Message:
        """Like :meth:`request`, but return the whole reply :class:`Message`."""
        validate_subject(subject)
        token = secrets.token_hex(8)
        reply = self._replies[token] = _Reply()
        try:
            pending = await self._enqueue(subject, data, reply_to=None, reply_token=token)
            await self._wait_sent(pending)
            await reply.event.wait()
            if reply.error is not None:
                raise reply.error
            assert reply.message is not None
            return reply.message
        finally:
            del self._replies[token]

    async def reply(self, message: Message, data: Any = None) -> None:
        """Answer a request ``message`` (one whose ``reply_to`` is set)."""
        if message.reply_to is None:
            raise ValueError("this message has no reply_to: it is not a request")
        await self.publish(message.reply_to, data)

    async def presence(self) -> list[PresenceRecord]:
        """The hub's presence table for this agent's tenant."""
        while True:
            conn = await self._wait_connection()
            try:
                answer = await self._request(conn, PresenceQuery(id=self._next_id()))
            except ConnectionLost:
                await conn.lost.wait()
                continue  # ask again on the next connection
            if isinstance(answer, PresenceState):
                return list(answer.agents)
            if isinstance(answer, Error):
                raise HubError(answer.code, answer.message)

    async def wait_connected(self) -> None:
        """Return when the agent is connected (at once if it is)."""
        await self._wait_connection()

    def health(self) -> AgentHealth:
        """A frozen snapshot of the connection's health.

        Callable from anywhere: before the agent runs, after it stopped, or from
        another thread (ages are then measured on the wall clock).
        """
        try:
            now: float | None = trio.current_time()
        except RuntimeError:  # not inside this agent's trio run
            now = None
        conn = self._conn
        if now is not None:
            last_ack = self._last_ack
            moment = now
        else:
            last_ack, moment = self._last_ack_wall, self._wall_clock()
        since = None if last_ack is None else max(0.0, moment - last_ack)
        timeout = conn.welcome.heartbeat_timeout if conn else None
        healthy = conn is not None and (timeout is None or (since is not None and since < timeout))
        return AgentHealth(
            state=self._state,
            connected=conn is not None,
            healthy=healthy,
            session_id=conn.session_id if conn else None,
            connected_since=_iso(self._connected_since_wall) if conn else None,
            last_ack=_iso(self._last_ack_wall),
            seconds_since_ack=since,
            rtt=self._rtt,
            rtt_smoothed=self._rtt_smoothed,
            reconnect_attempts=self._failures,
            total_reconnects=self._total_reconnects,
            next_retry_in=None
            if self._next_retry_at is None or now is None
            else max(0.0, self._next_retry_at - now),
            waiting_publishes=len(self._pending),
            messages_in=self._messages_in,
            messages_out=self._messages_out,
            messages_dropped=self._messages_dropped,
            handler_errors=self._handler_errors,
            heartbeat_interval=conn.welcome.heartbeat_interval if conn else None,
            heartbeat_timeout=timeout,
        )

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
        if self._body_scope is not None:
            self._body_scope.cancel()
        else:
            self._stop_early = True
            self._entry_scope.cancel()

    # --- registration ----------------------------------------------------------

    def _add_handler(self, pattern: str, handler: Handler) -> _Subscription:
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        if self._stopping:
            raise AgentClosed("the agent is stopping; no new handlers")
        sub = self._subscriptions.get(pattern)
        if sub is None:
            sub = self._subscriptions[pattern] = _Subscription(pattern, self._max_pending_messages)
            self._patterns.add(pattern, pattern)
            self._start_dispatcher(sub)
            self._subscriptions_dirty = True
            self._subscriptions_changed.set()
        sub.handlers.append((handler, _wants_message(handler)))
        return sub

    def _next_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    # --- publishing ------------------------------------------------------------

    async def _enqueue(
        self, subject: str, data: Any, *, reply_to: str | None, reply_token: str | None
    ) -> _Pending:
        if self._closed:
            raise AgentClosed("the agent is stopped; publish refused")
        pending = _Pending(
            self._next_id(), subject, data, reply_to=reply_to, reply_token=reply_token
        )
        # Encode now: a value JSON cannot encode, or a frame the hub would refuse as too
        # large, fails here, in the caller, instead of after it was accepted.
        placeholder = _Connection.placeholder()
        text = self._publish_text(pending, placeholder)
        limit = self._conn.welcome.max_frame_bytes if self._conn else DEFAULT_MAX_FRAME_BYTES
        if len(text.encode("utf-8")) > limit:
            raise LocalProtocolError("frame_too_large", f"publish frame exceeds {limit} bytes")
        if reply_token is None:
            pending.text = text
        await self._publish_slots.acquire()
        if self._closed:
            self._publish_slots.release()
            raise AgentClosed("the agent is stopped; publish refused")
        self._pending[pending.id] = pending
        self._unsent.append(pending)
        self._unsent_changed.set()
        return pending

    async def _wait_sent(self, pending: _Pending) -> None:
        try:
            await pending.sent.wait()
            if not pending.transmitted and pending.error is not None:
                raise pending.error
        except BaseException:
            if not pending.sent.is_set() and self._pending.pop(pending.id, None) is not None:
                # Withdrawn before it reached the hub: not accepted, nothing lost.
                with contextlib.suppress(ValueError):
                    self._unsent.remove(pending)
                self._publish_slots.release()
            raise

    def _publish_text(self, pending: _Pending, conn: _Connection) -> str:
        if pending.text is not None:
            return pending.text
        reply_to = pending.reply_to
        if pending.reply_token is not None:
            reply_to = f"$reply.{conn.session_id}.{pending.reply_token}"
        return encode(
            Publish(subject=pending.subject, data=pending.data, id=pending.id, reply_to=reply_to)
        )

    def _acknowledge(
        self, frame_id: str, message_id: str | None, error: ArtcafeError | None
    ) -> bool:
        pending = self._pending.pop(frame_id, None)
        if pending is None:
            return False
        pending.message_id = message_id
        pending.error = error
        pending.sent.set()
        pending.acked.set()
        self._publish_slots.release()
        if not self._pending:
            self._flushed.set()
        if isinstance(error, HubError):
            log.error(
                "publish to %s refused by the hub: %s", printable(pending.subject), printable(error)
            )
        return True

    # --- connection supervisor -------------------------------------------------

    async def _dial_url(self, nursery: trio.Nursery, resource: str) -> WebSocketConnection:
        split = urlsplit(self.url)  # checked by build_agent
        assert split.hostname is not None
        secure = split.scheme == "wss"
        port = split.port or (443 if secure else 80)
        stream: trio.abc.Stream = await trio.open_tcp_stream(split.hostname, port)
        try:
            return await self._upgrade(nursery, stream, split.hostname, port, split, resource)
        except BaseException:
            # Cancelled (connect_timeout) or failed: do not leave the socket to the GC.
            await trio.aclose_forcefully(stream)
            raise

    async def _upgrade(
        self,
        nursery: trio.Nursery,
        stream: trio.abc.Stream,
        hostname: str,
        port: int,
        split: SplitResult,
        resource: str,
    ) -> WebSocketConnection:
        """TLS (for wss://) and the WebSocket handshake over a connected TCP stream."""
        secure = split.scheme == "wss"
        if secure:
            context = self._ssl_context
            if context is None:  # it reads the system's CA certificates: off the loop
                context = await trio.to_thread.run_sync(_default_client_context)
            tls = trio.SSLStream(stream, context, server_hostname=hostname)
            try:
                # Handshake here, not lazily inside the WebSocket reader, so that a
                # certificate problem is an immediate, precise error.
                await tls.do_handshake()
            except trio.BrokenResourceError as exc:
                if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                    reason = exc.__cause__.verify_message
                    raise AuthenticationError(
                        f"the hub's TLS certificate does not verify: {reason}",
                        code="hub_certificate_invalid",
                    ) from exc
                raise
            stream = tls
        host = hostname if split.port is None else f"{hostname}:{port}"
        with trio.CancelScope() as handshake:
            watched = _HangUpAlarm(stream, handshake)
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                watched,  # type: ignore[arg-type]
                host,
                (split.path.rstrip("/") or "") + resource,
                max_message_size=MAX_RECEIVE_BYTES,
            )
            watched.disarm()
            return ws
        raise ConnectionLost("the hub hung up during the WebSocket handshake")

    def _resource(self) -> str:
        agent, tenant = quote(self.agent_id, safe=""), quote(self.tenant_id, safe="")
        return f"/api/v1/ws/agent/{agent}?tenant_id={tenant}"

    async def _supervise(self) -> None:
        loss_started: float | None = None
        last_cause: BaseException | None = None
        delays = self.backoff.delays(self._rng)
        while True:
            if self._ever_connected.is_set():
                self._state = "reconnecting"
            try:
                await self._run_connection()
            except AuthenticationError:
                raise
            except _CONNECTION_ERRORS as exc:
                cause: BaseException = exc
            if self._closed:
                return
            if isinstance(cause, SessionReplaced):
                # Another process connected with this agent id. Reconnecting would take
                # the id back from it, and both would flap forever: stop, loudly.
                log.error(
                    "%s/%s: replaced by a newer session with the same agent id; stopping",
                    self.tenant_id,
                    self.agent_id,
                )
                raise cause
            if isinstance(cause, ConnectFailed) and cause.permanent:
                self._state = "closed"
                raise cause  # it would fail the same way again: never retried
            was_healthy = self._conn_proved_healthy
            self._conn_proved_healthy = False
            if was_healthy:
                self._failures = 0
                delays = self.backoff.delays(self._rng)
                loss_started = None
            if loss_started is None:
                loss_started = trio.current_time()
            last_cause = cause
            if not self.auto_reconnect or (
                not self.retry_first_connect and not self._ever_connected.is_set()
            ):
                self._state = "closed"
                if isinstance(cause, ConnectionLost):
                    raise cause
                raise ConnectionLost(f"connection failed: {cause!r}") from cause
            delay = next(delays, None)
            if delay is None:
                self._state = "closed"
                raise ReconnectFailed(
                    self._failures, trio.current_time() - loss_started, last_cause
                ) from last_cause
            self._failures += 1
            # A failed attempt was never connected: nothing was lost, it says what failed.
            what = str(cause) if isinstance(cause, ConnectFailed) else f"connection lost ({cause})"
            log.warning(
                "%s/%s: %s; %s %d%s in %.2f s",
                self.tenant_id,
                self.agent_id,
                printable(what, 500),
                "reconnect attempt" if self._ever_connected.is_set() else "retry",
                self._failures,
                f"/{self.backoff.max_attempts}" if self.backoff.max_attempts else "",
                delay,
            )
            self._next_retry_at = trio.current_time() + delay
            await trio.sleep(delay)
            self._next_retry_at = None

    async def _run_connection(self) -> None:
        """One connection from dial to loss. Always raises what ended it."""
        conn_box: list[_Connection] = []
        try:
            await self._connection_nursery(conn_box)
        except _CONNECTION_ERRORS as exc:
            if not conn_box:  # no welcome: this attempt failed, nothing was lost
                raise connect_failed(exc, self.url) from exc
            raise
        conn = conn_box[0]
        # The nursery ended without an error: its cancel scope was cancelled.
        if self._watchdog_fired(conn):
            timeout = conn.welcome.heartbeat_timeout
            assert timeout is not None  # the watchdog only has a deadline with a timeout
            raise HeartbeatTimeout(timeout)
        raise ConnectionLost("connection closed")

    async def _connection_nursery(self, conn_box: list[_Connection]) -> None:
        """Dial, handshake and serve one connection; ``conn_box`` gets it once welcomed."""
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(self._connect_timeout) as connect_scope:
                    ws = await self._dial(nursery, self._resource())
                    try:
                        welcome = await self._handshake(ws)
                    except BaseException:
                        with trio.CancelScope(shield=True), trio.move_on_after(0):
                            await ws.aclose()  # closes the socket even when cut short
                        raise
                if connect_scope.cancelled_caught:
                    raise ConnectTimeout(
                        f"cannot connect to {self.url}: no welcome from the hub within "
                        f"{self._connect_timeout:g} s",
                        url=self.url,
                        timeout=self._connect_timeout,
                    )
                conn = _Connection(ws, welcome, nursery.cancel_scope)
                conn_box.append(conn)
                try:
                    await self._serve_connection(nursery, conn)
                finally:
                    self._conn = None
                    self._connected = trio.Event()
                    for waiter in self._waiters.values():
                        if waiter.conn is conn:
                            waiter.event.set()  # its answer will never come
                    for reply in self._replies.values():
                        if reply.conn is conn:
                            reply.fail(ConnectionLost("connection lost before the reply came"))
                    conn.lost.set()
                    self._conn_proved_healthy = conn.proved_healthy
                    if not self._closed:
                        self._state = "reconnecting"
                    # A hub judged unresponsive gets no time for a close handshake.
                    patience = 0 if self._watchdog_fired(conn) else 1
                    with trio.CancelScope(shield=True), trio.move_on_after(patience):
                        await ws.aclose(1000 if self._closed else 1001, "agent reconnecting")

    @staticmethod
    def _watchdog_fired(conn: _Connection) -> bool:
        return trio.current_time() >= conn.scope.deadline

    async def _leave(self, ws: WebSocketConnection) -> None:
        """Send ``leave`` and close with 1000 (the hub then reports ``left``)."""
        try:
            await ws.send_message(encode(Leave(reason="agent stopped")))
            await ws.aclose(1000, "agent stopped")
        except ConnectionClosed:
            pass

    async def _handshake(self, ws: WebSocketConnection) -> Welcome:
        challenge = await self._receive_frame(ws)
        if not isinstance(challenge, Challenge):
            raise ConnectionLost(f"expected a challenge from the hub, got {challenge!r}")
        signature = self._private_key.sign_auth(
            tenant_id=self.tenant_id, agent_id=self.agent_id, nonce=challenge.nonce
        )
        await self._send_raw(
            ws,
            encode(
                Auth(
                    agent_id=self.agent_id,
                    tenant_id=self.tenant_id,
                    algorithm=self._private_key.algorithm,
                    signature=signature,
                    heartbeat_interval=self.heartbeat_interval,
                    heartbeat_timeout_multiplier=self.heartbeat_timeout_multiplier,
                    capabilities=self.capabilities,
                    metadata=self.metadata,
                )
            ),
        )
        answer = await self._receive_frame(ws)
        if isinstance(answer, Error):
            if answer.code in _AUTH_REFUSALS:
                raise AuthenticationError(
                    f"the hub refused agent {self.agent_id!r} of tenant {self.tenant_id!r}: "
                    f"{answer.message}",
                    code=answer.code,
                )
            raise ConnectionLost(f"hub error during handshake: {answer.code}: {answer.message}")
        if not isinstance(answer, Welcome):
            raise ConnectionLost(f"expected a welcome from the hub, got {answer!r}")
        return answer

    async def _receive_frame(self, ws: WebSocketConnection) -> Frame | None:
        """The next frame, or ``None`` for an invalid one (logged)."""
        try:
            text = await ws.get_message()
        except ConnectionClosed as exc:
            await self._unless_closing()
            raise _lost(exc) from None
        try:
            return decode(text, max_bytes=MAX_RECEIVE_BYTES)
        except ProtocolError as exc:
            log.warning("ignoring an invalid frame from the hub: %s", printable(exc))
            return None

    async def _serve_connection(self, nursery: trio.Nursery, conn: _Connection) -> None:
        welcome = conn.welcome
        now = trio.current_time()
        attempts = self._failures
        if welcome.heartbeat_timeout is not None:
            conn.scope.deadline = now + welcome.heartbeat_timeout
        else:
            conn.proved_healthy = True  # no heartbeats: the welcome is all the proof there is
            self._failures = 0
        self._heartbeat_sent.clear()
        nursery.start_soon(self._receiver, conn)
        # Restore, in order: subscriptions (confirmed), waiting publishes, callbacks, heartbeats.
        await self._confirm_subscriptions(conn)
        self._unsent = collections.deque(self._pending.values())
        self._unsent_changed.set()
        nursery.start_soon(self._sender, conn)
        nursery.start_soon(self._subscriber, conn)
        self._conn = conn
        self._connected_since_wall = self._wall_clock()
        self._state = "connected"
        self._connected.set()
        reconnected = self._ever_connected.is_set()
        self._ever_connected.set()
        if reconnected:
            self._total_reconnects += 1
        if attempts:  # the failures were warnings: so is the recovery
            log.warning(
                "%s/%s %s after %d attempt%s (session %s)",
                self.tenant_id,
                self.agent_id,
                "reconnected" if reconnected else "connected",
                attempts,
                "" if attempts == 1 else "s",
                conn.session_id,
            )
        else:
            log.info("%s/%s connected (session %s)", self.tenant_id, self.agent_id, conn.session_id)
        if reconnected:
            for callback in list(self._on_reconnect):
                await self._call_user(callback, (), f"on_reconnect callback {callback!r}")
        if welcome.heartbeat_interval is not None:
            await self._heartbeat(conn, welcome.heartbeat_interval)
        else:
            await trio.sleep_forever()

    async def _heartbeat(self, conn: _Connection, interval: float) -> None:
        """One heartbeat now, then one after each of :func:`heartbeat_delays`' waits."""
        jitter = self.heartbeat_jitter
        period = period_jitter(jitter, interval, conn.welcome.heartbeat_timeout)
        delays = heartbeat_delays(interval, jitter, self._rng, period=period)
        for seq in itertools.count(1):
            self._heartbeat_sent[seq] = trio.current_time()
            if len(self._heartbeat_sent) > 16:
                del self._heartbeat_sent[min(self._heartbeat_sent)]
            await self._send(conn, encode(Heartbeat(seq=seq, rtt=self._rtt_smoothed)))
            await trio.sleep(next(delays))

    async def _send(self, conn: _Connection, text: str, *, park_when_closing: bool = True) -> None:
        try:
            await conn.ws.send_message(text)
        except ConnectionClosed as exc:
            if park_when_closing:
                await self._unless_closing()
            raise _lost(exc) from None

    @staticmethod
    async def _send_raw(ws: WebSocketConnection, text: str) -> None:
        try:
            await ws.send_message(text)
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    async def _unless_closing(self) -> None:
        """While the agent closes its own connection, park the task instead of failing:
        the connection must live until the close handshake completes."""
        if self._closed:
            await trio.sleep_forever()

    @trio.lowlevel.enable_ki_protection
    async def _sender(self, conn: _Connection) -> None:
        while True:
            self._unsent_changed = trio.Event()
            if self._unsent and self._subscriptions_dirty:
                # A subscription registered before a publish is confirmed before the
                # publish is sent, so an agent receives what it publishes right after.
                self._subscriptions_dirty = False
                await self._confirm_subscriptions(conn)
            while self._unsent:
                pending = self._unsent.popleft()
                if pending.id not in self._pending:
                    continue
                await self._send(conn, self._publish_text(pending, conn))
                self._messages_out += 1
                pending.transmitted = True
                if pending.reply_token is not None and pending.reply_token in self._replies:
                    self._replies[pending.reply_token].conn = conn
                pending.sent.set()
            await self._unsent_changed.wait()

    @trio.lowlevel.enable_ki_protection
    async def _subscriber(self, conn: _Connection) -> None:
        while True:
            self._subscriptions_changed = trio.Event()
            await self._confirm_subscriptions(conn)
            await self._subscriptions_changed.wait()

    async def _confirm_subscriptions(self, conn: _Connection) -> None:
        """Subscribe, and wait for the hub to confirm, every pattern not yet confirmed on
        ``conn`` (all sent at once, then all answers awaited: one round trip, not one per
        pattern). A refused pattern is logged and dropped (``subscribe()`` raises instead)."""

        async def confirm(sub: _Subscription) -> None:
            try:
                await self._confirm_subscription(conn, sub)
            except HubError as exc:
                log.error(
                    "subscription to %s refused by the hub: %s",
                    printable(sub.pattern),
                    printable(exc),
                )

        async with trio.open_nursery() as nursery:
            for sub in list(self._subscriptions.values()):
                if sub.confirmed_on is not conn:
                    nursery.start_soon(confirm, sub)

    async def _confirm_subscription(self, conn: _Connection, sub: _Subscription) -> None:
        """Make sure the hub confirmed ``sub`` on ``conn``: one request per connection,
        shared by every task that needs it."""
        if sub.confirmed_on is conn:
            return
        if sub.requested_on is conn:
            await sub.settled.wait()
            if sub.confirmed_on is not conn:
                raise ConnectionLost("the subscription was not confirmed on this connection")
            return
        sub.requested_on, sub.settled = conn, trio.Event()
        try:
            answer = await self._request(conn, Subscribe(id=self._next_id(), subject=sub.pattern))
        except BaseException:
            sub.requested_on = None
            raise
        finally:
            sub.settled.set()
        if isinstance(answer, Error):
            if self._subscriptions.get(sub.pattern) is sub:
                del self._subscriptions[sub.pattern]
                self._patterns.remove(sub.pattern, sub.pattern)
                sub.send_channel.close()
            raise HubError(answer.code, answer.message)
        sub.confirmed_on = conn

    async def _request(
        self, conn: _Connection, frame: Subscribe | Unsubscribe | PresenceQuery
    ) -> Frame:
        """Send a frame with an id and wait for the hub's answer to it."""
        waiter = self._waiters[frame.id] = _Waiter(conn)
        try:
            await self._send(conn, encode(frame), park_when_closing=False)
            await waiter.event.wait()
        finally:
            del self._waiters[frame.id]
        if waiter.frame is None:
            raise ConnectionLost("the connection was lost before the hub answered")
        return waiter.frame

    async def _wait_connection(self) -> _Connection:
        while self._conn is None:
            if self._closed:
                raise AgentClosed("the agent is stopped")
            await self._connected.wait()
        return self._conn

    # --- receiving ---------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def _receiver(self, conn: _Connection) -> None:
        while True:
            frame = await self._receive_frame(conn.ws)
            if frame is None:
                continue
            if isinstance(frame, HeartbeatAck):
                self._on_ack(conn, frame)
            elif isinstance(frame, Message):
                self._messages_in += 1
                self._on_message(frame)
            elif isinstance(frame, Published):
                self._acknowledge(frame.id, frame.message_id, None)
            elif isinstance(frame, Subscribed | Unsubscribed | PresenceState):
                self._resolve(frame.id, frame)
            elif isinstance(frame, Error):
                self._on_error(frame)
            else:
                log.warning("ignoring unexpected %s frame from the hub", printable(frame.type))

    def _on_ack(self, conn: _Connection, frame: HeartbeatAck) -> None:
        now = trio.current_time()
        sent = self._heartbeat_sent.pop(frame.seq, None)
        if sent is not None:
            rtt = now - sent
            self._rtt = rtt
            self._rtt_smoothed = (
                rtt if self._rtt_smoothed is None else (0.875 * self._rtt_smoothed + 0.125 * rtt)
            )
        self._last_ack = now
        self._last_ack_wall = self._wall_clock()
        # Only an ACK moves the watchdog: it alone proves our frames reach the hub and
        # the hub answers (messages may keep coming from a hub that no longer reads us).
        timeout = conn.welcome.heartbeat_timeout
        if timeout is not None:
            conn.scope.deadline = now + timeout
        if not conn.proved_healthy:
            conn.proved_healthy = True
            self._failures = 0

    def _resolve(self, frame_id: str, frame: Frame) -> None:
        waiter = self._waiters.get(frame_id)
        if waiter is not None:
            waiter.frame = frame
            waiter.event.set()

    def _on_error(self, frame: Error) -> None:
        if frame.id is not None:
            if frame.id in self._waiters:
                self._resolve(frame.id, frame)
                return
            if self._acknowledge(frame.id, None, HubError(frame.code, frame.message)):
                return
        log.warning("hub error %s: %s", printable(frame.code), printable(frame.message))

    def _on_message(self, message: Message) -> None:
        subject = message.subject
        if subject.startswith("$reply."):
            token = subject.rsplit(".", 1)[-1]
            reply = self._replies.get(token)
            if reply is not None and reply.message is None:
                reply.message = message
                reply.event.set()
            return
        if self._stopping:
            return  # not taken
        # The hub delivers a message once per connection: every local subscription whose
        # pattern matches gets it (each subscription's handlers run once).
        for pattern, _ in self._patterns.match(subject):
            sub = self._subscriptions[pattern]
            try:
                sub.send_channel.send_nowait(message)
            except trio.WouldBlock:
                self._messages_dropped += 1
                log.error(
                    "handlers for %r are %d messages behind: dropping a message on %r",
                    sub.pattern,
                    self._max_pending_messages,
                    printable(subject),
                )
            except trio.ClosedResourceError:
                pass

    # --- dispatch --------------------------------------------------------------------

    def _start_dispatcher(self, sub: _Subscription) -> None:
        if self._dispatch_nursery is not None and not sub.dispatching:
            sub.dispatching = True
            self._dispatch_nursery.start_soon(self._dispatch, sub)

    @trio.lowlevel.enable_ki_protection
    async def _dispatch(self, sub: _Subscription) -> None:
        slots = trio.Semaphore(self._max_concurrent)
        async with trio.open_nursery() as concurrent:
            async for message in sub.receive_channel:
                if self._max_concurrent == 1:
                    await self._call_handlers(sub, message)
                else:
                    await slots.acquire()
                    concurrent.start_soon(self._call_and_release, sub, message, slots)

    async def _call_and_release(
        self, sub: _Subscription, message: Message, slots: trio.Semaphore
    ) -> None:
        try:
            await self._call_handlers(sub, message)
        finally:
            slots.release()

    async def _call_handlers(self, sub: _Subscription, message: Message) -> None:
        for handler, wants_message in list(sub.handlers):
            args: tuple[Any, ...] = (message.subject, message.data)
            if wants_message:
                args += (message,)
            what = f"handler {handler!r} for {sub.pattern!r} on {message.subject!r}"
            await self._call_user(handler, args, what)

    @trio.lowlevel.disable_ki_protection
    async def _call_user(
        self, function: Callable[..., Any], args: tuple[Any, ...], what: str
    ) -> None:
        """Call a user's sync or async function; its exception is logged with its traceback
        and counted, and re-raised only with ``raise_handler_errors``.

        The agent's own tasks are KI-protected; user code is not: Ctrl+C interrupts a
        handler or callback where it runs (the ``KeyboardInterrupt`` then stops the agent).
        """
        try:
            result = function(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self._handler_errors += 1
            log.exception("%s failed", what)
            if self._raise_handler_errors:
                raise

    # --- lifecycle -----------------------------------------------------------------------

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[Agent]:
        if self._nursery is not None:
            raise RuntimeError("an Agent can run only once")
        # The agent's own tasks run under a shielded scope: a cancellation from
        # outside reaches only the user's block, so the agent can still leave
        # gracefully (briefly) before its tasks are cancelled.
        internals = trio.CancelScope(shield=True)
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._run_internals, internals)
                try:
                    # stop() or an outside cancellation may end the wait for a first
                    # connection; the shielded internals must then be stopped by hand.
                    with self._entry_scope:
                        await self._ever_connected.wait()
                except BaseException:
                    internals.cancel()
                    raise
                cancelled_from_outside = False
                try:
                    with trio.CancelScope() as self._body_scope:
                        if self._stop_early:
                            self._body_scope.cancel()
                        yield self
                except trio.Cancelled:
                    cancelled_from_outside = True
                    raise
                finally:
                    try:
                        with trio.CancelScope(shield=True):
                            await self._graceful_stop(quick=cancelled_from_outside)
                    finally:
                        internals.cancel()

    @trio.lowlevel.enable_ki_protection
    async def _run_internals(
        self, scope: trio.CancelScope, task_status: trio.TaskStatus[None]
    ) -> None:
        with scope:
            async with trio.open_nursery() as internals:
                await internals.start(self._run_dispatch)
                internals.start_soon(self._supervise_and_close)
                task_status.started()

    @trio.lowlevel.enable_ki_protection
    async def _supervise_and_close(self) -> None:
        try:
            await self._supervise()
        finally:
            self._state = "closed"

    @trio.lowlevel.enable_ki_protection
    async def _run_dispatch(self, task_status: trio.TaskStatus[None]) -> None:
        try:
            async with trio.open_nursery() as dispatch:
                self._dispatch_nursery = dispatch
                for sub in self._subscriptions.values():
                    self._start_dispatcher(sub)
                task_status.started()
                await self._dispatch_stop.wait()
                # Dispatchers drain their (now closed) channels and return.
        finally:
            self._dispatch_done.set()

    async def _graceful_stop(self, *, quick: bool) -> None:
        """Stop taking messages, let handlers finish, flush publishes, leave, close.

        All the waiting together is bounded by ``stop_timeout``. When the block was cancelled
        from outside (``quick``), only the one-second ``leave`` is attempted;
        the caller re-raises the ``Cancelled``.
        """
        self._stopping = True
        for sub in self._subscriptions.values():
            sub.send_channel.close()
        self._dispatch_stop.set()
        try:
            with trio.move_on_after(0 if quick else self._stop_timeout) as grace:
                await self._dispatch_done.wait()
                while self._pending and self._state != "closed":
                    self._flushed = trio.Event()
                    await self._flushed.wait()
            if grace.cancelled_caught and self._dispatch_nursery is not None:
                self._dispatch_nursery.cancel_scope.cancel()
                if not quick:
                    log.warning(
                        "stop: handlers or publishes still busy after %g s", self._stop_timeout
                    )
        finally:
            self._closed = True
            if self._pending:
                log.error(
                    "%s/%s stopped with %d publishes not acknowledged by the hub",
                    self.tenant_id,
                    self.agent_id,
                    len(self._pending),
                )
                for frame_id in list(self._pending):
                    self._acknowledge(frame_id, None, AgentClosed("the agent stopped first"))
            for reply in self._replies.values():
                reply.fail(AgentClosed("the agent stopped before the reply came"))
            self._connected.set()  # wake wait_connected() callers: they see _closed
            conn = self._conn
            if conn is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await self._leave(conn.ws)
            self._state = "closed"


def _lost(exc: ConnectionClosed) -> ConnectionLost:
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


class _Unset:
    pass


_UNSET = _Unset()


def _backoff_policy(backoff: Backoff | None, max_attempts: int | _Unset | None) -> Backoff:
    """``max_reconnect_attempts`` when given, else the policy's own ``max_attempts``."""
    policy = backoff or Backoff()
    if isinstance(max_attempts, _Unset):
        return policy
    return attrs.evolve(policy, max_attempts=max_attempts)


def _resolve_tenant(organization_id: str | None, tenant_id: str | None) -> str:
    if organization_id and tenant_id and organization_id != tenant_id:
        raise ValueError("organization_id and tenant_id are aliases; give one of them")
    tenant = organization_id or tenant_id
    if not tenant:
        raise ValueError("organization_id (or its alias tenant_id) is required")
    return tenant


def build_agent(
    *,
    agent_id: str,
    organization_id: str | None = None,
    tenant_id: str | None = None,
    private_key_path: str | os.PathLike[str] | None = None,
    private_key: PrivateKey | None = None,
    private_key_password: str | bytes | None = None,
    url: str | None = None,
    heartbeat_interval: float | None = 30.0,
    heartbeat_timeout_multiplier: float = 3.0,
    auto_reconnect: bool = True,
    max_reconnect_attempts: int | _Unset | None = _UNSET,
    backoff: Backoff | None = None,
    **options: Any,
) -> Agent:
    """Validate ``open_agent``'s arguments and create the (not yet running) :class:`Agent`."""
    if not agent_id:
        raise ValueError("agent_id is required")
    if (private_key is None) == (private_key_path is None):
        raise ValueError("give exactly one of private_key_path and private_key")
    if private_key is None:
        assert private_key_path is not None
        private_key = load_private_key(private_key_path, private_key_password)
    url = url or os.environ.get("ARTCAFE_URL") or DEFAULT_URL
    if options.get("dial") is None:
        split = urlsplit(url)
        if split.scheme not in ("ws", "wss") or not split.hostname:
            raise ValueError(
                f"hub url must look like ws://host:port or wss://host:port, got {url!r}"
            )
    return Agent(
        agent_id=agent_id,
        tenant_id=_resolve_tenant(organization_id, tenant_id),
        private_key=private_key,
        url=url,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout_multiplier=heartbeat_timeout_multiplier,
        auto_reconnect=auto_reconnect,
        backoff=_backoff_policy(backoff, max_reconnect_attempts),
        **options,
    )


def _default_client_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _without_ki_protection(dial: Dialer) -> Dialer:
    """A user's ``dial`` (user code, like handlers) run without the supervisor's KI
    protection."""

    @trio.lowlevel.disable_ki_protection
    async def unprotected_dial(nursery: trio.Nursery, resource: str) -> WebSocketConnection:
        return await dial(nursery, resource)

    return unprotected_dial


async def _load_key_in_thread(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``private_key_path`` loaded (the KDF of an encrypted key takes
    a while) in a worker thread, off the event loop. Arguments ``build_agent`` refuses
    before loading are left for it to refuse."""
    if not kwargs.get("agent_id") or kwargs.get("private_key") is not None:
        return kwargs
    options = dict(kwargs)
    path = options.pop("private_key_path", None)
    if path is None:
        return kwargs
    password = options.pop("private_key_password", None)
    options["private_key"] = await trio.to_thread.run_sync(load_private_key, path, password)
    return options


@asynccontextmanager
async def open_agent(*, stop_on_signals: bool = False, **kwargs: Any) -> AsyncIterator[Agent]:
    """Connect an agent to a hub for the duration of the block.

    Keyword arguments (all keyword-only):

    - ``agent_id``, ``organization_id`` (alias ``tenant_id``): who the agent is.
    - ``private_key_path`` (+ ``private_key_password``) or ``private_key``: its key.
    - ``url``: the hub's base URL (default ``$ARTCAFE_URL`` or ``ws://127.0.0.1:8765``);
      ``ssl_context`` for ``wss://``; ``dial`` replaces the transport (test kit).
    - ``heartbeat_interval`` (30 s; ``None``: no heartbeats), ``heartbeat_timeout_multiplier``
      (3.0): the hub-ACK watchdog fires after interval x multiplier without an ACK;
      ``heartbeat_jitter`` (0.1): a random phase for the second heartbeat and +/-10 %
      per period, so a fleet does not beat in step (0: exactly every interval).
    - ``auto_reconnect`` (True), ``max_reconnect_attempts`` (10), ``backoff``
      (:class:`Backoff`, full jitter, base 1 s, cap 60 s), ``rng`` (the source of the
      backoff and heartbeat jitter).
    - ``capabilities``, ``metadata``: announced to the hub and in presence events.
    - ``connect_timeout`` (10 s), ``stop_timeout`` (10 s), ``max_concurrent_handlers``
      (1: ordered per subscription), ``max_pending_messages``, ``max_pending_publishes``,
      ``raise_handler_errors`` (False).
    - ``retry_first_connect`` (True): with False, a failed first connection raises at once
      (:class:`ConnectFailed`) instead of backing off; later losses still reconnect.
    - ``stop_on_signals`` (False): with True, SIGTERM and SIGINT (Ctrl+C) stop the agent
      as :meth:`Agent.stop` does, so it leaves gracefully (presence ``left``, not
      ``disconnected``): the block is cancelled and ends; after SIGINT, leaving it raises
      ``KeyboardInterrupt``. Needs trio to run in the main thread.

    Entering returns once the first connection is authenticated. If the hub is
    unreachable, entering retries with backoff like any reconnect and raises
    :class:`ReconnectFailed` when the attempts run out (or
    :class:`ConnectionLost` at once with ``auto_reconnect=False``). A refused
    key raises :class:`AuthenticationError`, and a ``permanent`` :class:`ConnectFailed`
    (a TLS handshake with a plain hub, an HTTP 404...) raises, at once: never retried.
    Leaving the block stops gracefully: handlers finish, publishes flush, the
    agent sends ``leave``.
    """
    if stop_on_signals and threading.current_thread() is not threading.main_thread():
        raise RuntimeError("stop_on_signals=True needs trio running in the main thread")
    agent = build_agent(**await _load_key_in_thread(kwargs))
    if not stop_on_signals:
        async with _short_traceback(), agent._running():
            yield agent
        return
    interrupted = False

    async def stop_on(signals: AsyncIterator[int]) -> None:
        nonlocal interrupted
        async for signum in signals:
            interrupted = interrupted or signum == signal.SIGINT
            agent.stop()

    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        collapse_exception_groups(),
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on, signals)
            async with _short_traceback(), agent._running():
                yield agent
            nursery.cancel_scope.cancel()
    if interrupted:
        raise KeyboardInterrupt


@asynccontextmanager
async def _short_traceback() -> AsyncIterator[None]:
    """Errors caused by the user's input (a refused key, a wrong URL) leave ``open_agent``
    without the agent's internal frames: the message says what to fix."""
    try:
        yield
    except (AuthenticationError, ConnectFailed) as exc:
        if isinstance(exc, ConnectFailed) and not exc.permanent:
            raise
        cause = exc.__cause__
        while cause is not None:  # kept for programs, printed as one line each
            cause.__traceback__ = None
            cause = cause.__cause__
        # A fresh copy: contextlib would give the same object its old traceback back.
        short = type(exc).__new__(type(exc), *exc.args)
        short.__dict__.update(exc.__dict__)
        raise short from exc.__cause__
