"""The trio NATS client: ``open_nats`` and the :class:`NatsClient` it yields.

One manager task owns the connection: it dials, handshakes (``INFO`` ->
``CONNECT`` + ``PING`` -> ``PONG``), then runs a reader, a writer and a pinger
under one cancel scope whose *deadline* is the liveness check: it is the send
time of the oldest unanswered ``PING`` plus ``ping_interval *
max_pings_outstanding`` (no unanswered ping: no deadline). When the deadline
passes, the socket fails or the server closes, the manager reconnects through
the server pool with full-jitter backoff, re-sends every subscription in
creation order, then whatever was published while disconnected.

Publishing appends the encoded command to one outgoing buffer that the writer
sends whole, so bursts of publishes become few large writes.
"""

from __future__ import annotations

import logging
import random
import secrets
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import attrs
import trio

from .. import __version__
from .._util import collapse_exception_groups
from ..protocol._backoff import Backoff
from ._errors import (
    MaxPayloadExceeded,
    NatsAuthError,
    NatsClosed,
    NatsConnectError,
    NatsConnectionLost,
    NatsError,
    NatsReconnectFailed,
    NatsServerError,
    NoRespondersError,
    OutboundBufferFull,
)
from ._protocol import (
    PING,
    PONG,
    Err,
    Event,
    Headers,
    Info,
    Msg,
    NatsParser,
    Ok,
    Ping,
    Pong,
    encode_connect,
    encode_headers,
    encode_pub,
    encode_sub,
    encode_unsub,
)

if TYPE_CHECKING:
    from ._kv import KeyValue

__all__ = [
    "AsyncServerError",
    "Dialer",
    "Disconnected",
    "LameDuckMode",
    "NatsClient",
    "NatsEvent",
    "Reconnected",
    "ServersDiscovered",
    "SlowConsumer",
    "Subscription",
    "new_inbox",
    "open_nats",
]

log = logging.getLogger("artcafe_trio.nats")

#: Opens a byte stream to ``(host, port)``; tests pass one that returns memory streams.
Dialer = Callable[[str, int], Awaitable[trio.abc.Stream]]

_CONNECTION_ERRORS = (OSError, trio.BrokenResourceError, trio.TooSlowError, NatsError)


def new_inbox() -> str:
    """A fresh, unguessable reply subject ``_INBOX.<22 hex digits>``."""
    return "_INBOX." + secrets.token_hex(11)


@attrs.frozen
class Disconnected:
    """The connection to ``server`` was lost; ``cause`` says why."""

    server: str
    cause: str


@attrs.frozen
class Reconnected:
    """A new connection to ``server`` is up; subscriptions have been re-sent."""

    server: str


@attrs.frozen
class LameDuckMode:
    """``server`` announced it is shutting down soon (clients should move away)."""

    server: str


@attrs.frozen
class ServersDiscovered:
    """``INFO connect_urls`` added these servers to the pool."""

    servers: tuple[str, ...]


@attrs.frozen
class AsyncServerError:
    """The server sent a non-fatal ``-ERR`` (e.g. a permissions violation)."""

    server: str
    message: str


@attrs.frozen
class SlowConsumer:
    """A subscription's pending limit was hit; ``dropped`` counts its drops so far."""

    subject: str
    sid: int
    dropped: int


NatsEvent = (
    Disconnected | Reconnected | LameDuckMode | ServersDiscovered | AsyncServerError | SlowConsumer
)


@attrs.frozen
class _Server:
    host: str
    port: int
    tls: bool = False
    user: str | None = None
    password: str | None = None
    token: str | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _parse_server(url: str) -> _Server:
    if "://" not in url:
        url = "nats://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        raise ValueError(f"not a nats:// or tls:// URL: {url!r}")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    token = None
    if user is not None and password is None:
        token, user = user, None
    return _Server(parts.hostname, parts.port or 4222, parts.scheme == "tls", user, password, token)


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


class _Conn:
    """One live connection: its stream, parser, server and liveness scope."""

    def __init__(self, stream: trio.abc.Stream, server: _Server, info: dict[str, Any]) -> None:
        self.stream = stream
        self.server = server
        self.info = info
        self.parser = NatsParser()
        self.leftover: list[Event] = []
        self.scope = trio.CancelScope()
        self.cause: BaseException | None = None


class _Lost(Exception):
    """Internal: the server closed the connection."""


class NatsClient:
    """A connection to a NATS server pool. Create it with :func:`open_nats`."""

    def __init__(
        self,
        servers: Sequence[str],
        *,
        name: str | None,
        user: str | None,
        password: str | None,
        token: str | None,
        tls: ssl.SSLContext | None,
        tls_hostname: str | None,
        ping_interval: float,
        max_pings_outstanding: int,
        connect_timeout: float,
        backoff: Backoff,
        reconnect_buffer_size: int,
        pending_msgs_limit: int,
        pending_bytes_limit: int,
        write_buffer_size: int,
        echo: bool,
        randomize: bool,
        rng: random.Random,
        dial: Dialer | None,
    ) -> None:
        if not servers:
            raise ValueError("at least one server is needed")
        if ping_interval <= 0 or max_pings_outstanding < 1:
            raise ValueError("ping_interval must be > 0 and max_pings_outstanding >= 1")
        self._pool = [_parse_server(s) for s in servers]
        if randomize:
            rng.shuffle(self._pool)
        self._name = name
        self._user = user
        self._password = password
        self._token = token
        self._tls = tls
        self._tls_hostname = tls_hostname
        self._ping_interval = ping_interval
        self._max_pings = max_pings_outstanding
        self._connect_timeout = connect_timeout
        self._backoff = backoff
        self._reconnect_buffer_size = reconnect_buffer_size
        self._pending_msgs_limit = pending_msgs_limit
        self._pending_bytes_limit = pending_bytes_limit
        self._write_buffer_size = write_buffer_size
        self._echo = echo
        self._rng = rng
        self._dial: Dialer = dial or trio.open_tcp_stream
        self._conn: _Conn | None = None
        self._closed = False
        self._max_payload = 1024 * 1024
        self._info: dict[str, Any] = {}
        self._next_sid = 0
        self._subs: dict[int, Subscription | _ReplyMux] = {}
        self._mux: _ReplyMux | None = None
        self._next_token = 0
        # Outgoing bytes not yet handed to the writer, and the PINGs among them.
        self._out = bytearray()
        self._unsent_pings = 0
        self._out_wake = trio.Event()
        self._space = trio.lowlevel.ParkingLot()
        # One entry per PING in flight or buffered, in order: a waiter or None (pinger).
        self._pongs: deque[_Waiter | None] = deque()
        # Send times of the PINGs actually written on the current connection.
        self._sent_times: deque[float] = deque()
        self._event_channels: list[trio.MemorySendChannel[NatsEvent]] = []
        self._reconnect_hooks: list[Callable[[], None]] = []
        #: Events dropped because an ``events()`` channel was full.
        self.events_dropped = 0
        #: Completed reconnections since the client was opened.
        self.reconnects = 0

    # -- public API ---------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """Whether a connection is currently established."""
        return self._conn is not None

    @property
    def connected_server(self) -> str | None:
        """``host:port`` of the current server, or ``None`` while disconnected."""
        return str(self._conn.server) if self._conn is not None else None

    @property
    def server_info(self) -> Mapping[str, Any]:
        """The latest ``INFO`` of the current (or last) server."""
        return self._info

    @property
    def servers(self) -> list[str]:
        """The server pool, in the order it will be tried, including discovered servers."""
        return [str(s) for s in self._pool]

    def events(self, max_buffer: int = 100) -> trio.MemoryReceiveChannel[NatsEvent]:
        """A channel of connection events from now on (at most ``max_buffer`` queued;
        further events are dropped and counted in :attr:`events_dropped`)."""
        send, receive = trio.open_memory_channel[NatsEvent](max_buffer)
        self._event_channels.append(send)
        return receive

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        reply: str | None = None,
        headers: Headers | Mapping[str, str | Sequence[str]] | None = None,
    ) -> None:
        """Send a message. Returns once it is buffered (use :meth:`flush` to know it arrived).

        Yields to other tasks only when the outgoing buffer is full. While
        disconnected it buffers up to ``reconnect_buffer_size`` bytes, then raises
        :class:`OutboundBufferFull`.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise NatsClosed("the client is closed")
        block = encode_headers(headers) if headers is not None else None
        size = len(payload) + (len(block) if block else 0)
        if size > self._max_payload:
            raise MaxPayloadExceeded(f"{size} bytes > max_payload {self._max_payload}")
        await self._enqueue(encode_pub(subject, payload, reply=reply, headers=block))

    async def subscribe(self, subject: str, *, queue: str | None = None) -> Subscription:
        """Subscribe to ``subject`` (wildcards allowed), optionally in a queue group."""
        if self._closed:
            raise NatsClosed("the client is closed")
        self._next_sid += 1
        command = encode_sub(subject, self._next_sid, queue=queue)
        sub = Subscription(
            self,
            self._next_sid,
            subject,
            queue,
            self._pending_msgs_limit,
            self._pending_bytes_limit,
        )
        self._subs[sub.sid] = sub
        if self._conn is not None:  # else the reconnect re-sends it with the others
            self._write(command)
        await trio.lowlevel.checkpoint()
        return sub

    async def request(
        self,
        subject: str,
        payload: bytes = b"",
        *,
        headers: Headers | Mapping[str, str | Sequence[str]] | None = None,
    ) -> Msg:
        """Publish with a unique reply subject and return the first reply.

        Bounded by the caller's cancel scope (wrap it in ``trio.fail_after``).
        Raises :class:`NoRespondersError` at once when nobody subscribes to ``subject``.
        """
        if self._closed:
            raise NatsClosed("the client is closed")
        mux = self._mux
        if mux is None:
            self._next_sid += 1
            mux = self._mux = _ReplyMux(self._next_sid, new_inbox() + ".")
            self._subs[mux.sid] = mux
            if self._conn is not None:
                self._write(encode_sub(mux.subject, mux.sid))
        self._next_token += 1
        token = f"{self._next_token:x}"
        waiter = _Waiter()
        mux.waiters[token] = waiter
        try:
            await self.publish(subject, payload, reply=mux.prefix + token, headers=headers)
            msg = await waiter.wait()
        finally:
            mux.waiters.pop(token, None)
        assert msg is not None
        if msg.headers is not None and msg.headers.status == 503 and not msg.data:
            raise NoRespondersError(f"no responders on {subject!r}")
        return msg

    async def flush(self) -> None:
        """Wait until the server has processed everything sent before (a PING/PONG round).

        Raises :class:`NatsConnectionLost` if the connection dies first; a flush
        called while disconnected completes after the reconnect.
        """
        if self._closed:
            raise NatsClosed("the client is closed")
        waiter = _Waiter()
        self._queue_ping(waiter)
        await waiter.wait()

    async def key_value(self, bucket: str, **options: Any) -> KeyValue:
        """Bind (or create) a JetStream key-value bucket; see :func:`key_value` for options."""
        from ._kv import key_value

        return await key_value(self, bucket, **options)

    async def close(self) -> None:
        """Flush what is buffered (for up to ``connect_timeout``) and close.

        ``async with open_nats(...)`` calls this on a normal exit.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._conn is not None:
            with trio.move_on_after(self._connect_timeout):
                with suppress(NatsError):
                    await self.flush()
        self._shutdown()

    # -- internals: buffering ------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._out += data
        if not self._out_wake.is_set():
            self._out_wake.set()

    def _queue_ping(self, waiter: _Waiter | None) -> None:
        self._pongs.append(waiter)
        self._unsent_pings += 1
        self._write(PING)

    async def _enqueue(self, data: bytes) -> None:
        if self._conn is None:
            if len(self._out) + len(data) > self._reconnect_buffer_size:
                raise OutboundBufferFull(
                    f"disconnected, and {len(self._out)} bytes already wait "
                    f"(reconnect_buffer_size {self._reconnect_buffer_size})"
                )
            self._out += data
            return
        while len(self._out) >= self._write_buffer_size and self._conn is not None:
            await self._space.park()
        if self._closed:
            raise NatsClosed("the client is closed")
        if self._conn is None:
            await self._enqueue(data)
            return
        self._write(data)

    def _emit(self, event: NatsEvent) -> None:
        log.debug("nats event %r", event)
        for channel in list(self._event_channels):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.events_dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._event_channels.remove(channel)

    def _shutdown(self) -> None:
        self._closed = True
        for sub in self._subs.values():
            sub._close()
        self._subs.clear()
        for waiter in self._pongs:
            if waiter is not None:
                waiter.fail(NatsClosed("the client is closed"))
        self._pongs.clear()
        for channel in self._event_channels:
            channel.close()
        self._event_channels.clear()
        self._space.unpark_all()

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.sid, None) is not None and self._conn is not None:
            self._write(encode_unsub(sub.sid))
        sub._close()
        await trio.lowlevel.checkpoint()

    # -- internals: connection management -------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        last: BaseException | None = None
        conn: _Conn | None = None
        for server in list(self._pool):
            try:
                conn = await self._connect(server)
                self._rotate(server)
                break
            except NatsAuthError:
                raise
            except _CONNECTION_ERRORS as exc:
                log.debug("connect to %s failed: %r", server, exc)
                last = exc
        if conn is None:
            raise NatsConnectError(
                f"could not connect to any of {self.servers}: {last!r}", last_cause=last
            )
        task_status.started()
        try:
            while True:
                await self._serve(conn)
                self._rotate(conn.server)  # try the others first
                conn = await self._reconnect()
                self.reconnects += 1
                self._emit(Reconnected(str(conn.server)))
                for hook in list(self._reconnect_hooks):
                    hook()
        finally:
            self._conn = None
            self._shutdown()

    def _rotate(self, server: _Server) -> None:
        if server in self._pool:
            self._pool.remove(server)
        self._pool.append(server)

    async def _reconnect(self) -> _Conn:
        failures = 0
        last: BaseException | None = None
        for delay in self._backoff.delays(self._rng):
            await trio.sleep(delay)
            server = self._pool[0]
            self._rotate(server)
            try:
                return await self._connect(server)
            except _CONNECTION_ERRORS as exc:
                log.debug("reconnect to %s failed: %r", server, exc)
                last = exc
                failures += 1
        raise NatsReconnectFailed(failures, last)

    async def _connect(self, server: _Server) -> _Conn:
        with trio.fail_after(self._connect_timeout):
            stream = await self._dial(server.host, server.port)
            try:
                return await self._handshake(stream, server)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise

    async def _handshake(self, stream: trio.abc.Stream, server: _Server) -> _Conn:
        parser = NatsParser()
        pending: list[Event] = []

        async def next_event() -> Event:
            while not pending:
                data = await conn.stream.receive_some(65536)
                if not data:
                    raise NatsConnectionLost(f"{server} closed the connection during handshake")
                pending.extend(parser.feed(data))
            return pending.pop(0)

        conn = _Conn(stream, server, {})
        first = await next_event()
        if not isinstance(first, Info):
            raise NatsConnectionLost(f"{server} did not start with INFO but {first!r}")
        info = first.info
        tls = self._tls is not None or server.tls or bool(info.get("tls_required"))
        if tls:
            context = self._tls or ssl.create_default_context()
            ssl_stream = trio.SSLStream(
                stream, context, server_hostname=self._tls_hostname or server.host
            )
            await ssl_stream.do_handshake()
            conn.stream = ssl_stream
        options: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "tls_required": tls,
            "lang": "python-trio",
            "version": __version__,
            "protocol": 1,
            "echo": self._echo,
            "headers": True,
            "no_responders": True,
        }
        if self._name:
            options["name"] = self._name
        user = server.user or self._user
        password = server.password or self._password
        token = server.token or self._token
        if user is not None:
            options["user"] = user
            options["pass"] = password or ""
        if token is not None:
            options["auth_token"] = token
        await conn.stream.send_all(encode_connect(options) + PING)
        while True:
            event = await next_event()
            if isinstance(event, Pong):
                break
            if isinstance(event, Err):
                lowered = event.message.lower()
                if "authoriz" in lowered or "authentic" in lowered:
                    raise NatsAuthError(event.message)
                raise NatsServerError(event.message)
            if isinstance(event, Ping):
                await conn.stream.send_all(PONG)
            elif isinstance(event, Info):
                info = event.info
        conn.parser = parser
        conn.leftover = pending
        self._apply_info(info, conn, announce=False)
        return conn

    def _apply_info(self, info: dict[str, Any], conn: _Conn, *, announce: bool = True) -> None:
        self._info = info
        conn.info = info
        max_payload = info.get("max_payload")
        if isinstance(max_payload, int) and max_payload > 0:
            self._max_payload = max_payload
            conn.parser.max_payload = max_payload + 64 * 1024
        urls = info.get("connect_urls")
        if isinstance(urls, list):
            known = {(s.host, s.port) for s in self._pool}
            added: list[str] = []
            for url in urls:
                try:
                    found = _parse_server(str(url))
                except ValueError:
                    continue
                if (found.host, found.port) not in known:
                    tls_flag = conn.server.tls
                    self._pool.append(attrs.evolve(found, tls=tls_flag))
                    known.add((found.host, found.port))
                    added.append(str(found))
            if added:
                self._emit(ServersDiscovered(tuple(added)))
        if announce and info.get("ldm"):
            self._emit(LameDuckMode(str(conn.server)))

    async def _serve(self, conn: _Conn) -> None:
        # Subscriptions first, in creation order, then what was buffered meanwhile.
        resub = b"".join(encode_sub(s.subject, s.sid, queue=s.queue) for s in self._subs.values())
        self._out[:0] = resub
        self._sent_times.clear()
        self._conn = conn
        self._out_wake = trio.Event()
        if self._out:
            self._out_wake.set()
        log.debug("connected to %s", conn.server)
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._reader, conn)
                    nursery.start_soon(self._guard, self._writer, conn)
                    nursery.start_soon(self._guard, self._pinger, conn)
        finally:
            self._conn = None
            await trio.aclose_forcefully(conn.stream)
            # PINGs written on the dead connection will never be answered.
            for _ in range(len(self._sent_times)):
                waiter = self._pongs.popleft()
                if waiter is not None:
                    waiter.fail(NatsConnectionLost(f"connection to {conn.server} lost"))
            self._sent_times.clear()
            self._space.unpark_all()
        if conn.cause is None:
            limit = self._ping_interval * self._max_pings
            cause = f"stale connection: no PONG within {limit:g} s"
        elif isinstance(conn.cause, _Lost):
            cause = str(conn.cause)
        else:
            cause = f"{type(conn.cause).__name__}: {conn.cause}"
        log.info("disconnected from %s: %s", conn.server, cause)
        self._emit(Disconnected(str(conn.server), cause))

    async def _guard(self, fn: Callable[[_Conn], Awaitable[None]], conn: _Conn) -> None:
        try:
            await fn(conn)
        except (*_CONNECTION_ERRORS, trio.ClosedResourceError, _Lost) as exc:
            if conn.cause is None:
                conn.cause = exc
            conn.scope.cancel()

    async def _reader(self, conn: _Conn) -> None:
        handle = self._handle
        events = conn.leftover
        conn.leftover = []
        for event in events:
            handle(event, conn)
        receive = conn.stream.receive_some
        feed = conn.parser.feed
        while True:
            data = await receive(65536)
            if not data:
                raise _Lost(f"{conn.server} closed the connection")
            for event in feed(data):
                handle(event, conn)

    def _handle(self, event: Event, conn: _Conn) -> None:
        if type(event) is Msg:
            sub = self._subs.get(event.sid)
            if sub is not None:
                sub._deliver(event)
        elif type(event) is Ping:
            self._write(PONG)
        elif type(event) is Pong:
            if self._sent_times:
                self._sent_times.popleft()
                waiter = self._pongs.popleft()
                if waiter is not None:
                    waiter.set()
                self._update_deadline(conn)
        elif type(event) is Info:
            self._apply_info(event.info, conn)
        elif type(event) is Err:
            if event.message.lower().startswith("permissions violation"):
                self._emit(AsyncServerError(str(conn.server), event.message))
            else:
                raise NatsServerError(event.message)
        else:
            assert type(event) is Ok

    def _update_deadline(self, conn: _Conn) -> None:
        if self._sent_times:
            limit = self._ping_interval * self._max_pings
            conn.scope.deadline = self._sent_times[0] + limit
        else:
            conn.scope.deadline = float("inf")

    async def _writer(self, conn: _Conn) -> None:
        send = conn.stream.send_all
        while True:
            if not self._out:
                self._out_wake = trio.Event()
                await self._out_wake.wait()
                continue
            data = self._out
            self._out = bytearray()
            if self._unsent_pings:
                now = trio.current_time()
                self._sent_times.extend([now] * self._unsent_pings)
                self._unsent_pings = 0
                self._update_deadline(conn)
            if self._space:
                self._space.unpark_all()
            await send(data)

    async def _pinger(self, conn: _Conn) -> None:
        while True:
            await trio.sleep(self._ping_interval)
            self._queue_ping(None)


@asynccontextmanager
async def open_nats(
    servers: str | Sequence[str] = "nats://127.0.0.1:4222",
    *,
    name: str | None = None,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    tls: ssl.SSLContext | None = None,
    tls_hostname: str | None = None,
    ping_interval: float = 120.0,
    max_pings_outstanding: int = 2,
    connect_timeout: float = 2.0,
    backoff: Backoff | None = None,
    reconnect_buffer_size: int = 8 * 1024 * 1024,
    pending_msgs_limit: int = 65536,
    pending_bytes_limit: int = 64 * 1024 * 1024,
    write_buffer_size: int = 256 * 1024,
    echo: bool = True,
    randomize: bool = True,
    rng: random.Random | None = None,
    dial: Dialer | None = None,
) -> AsyncIterator[NatsClient]:
    """Connect to a NATS server pool; close (after a flush) when the block exits.

    ``servers`` is one URL or a list (``nats://[user:pass@|token@]host:port``,
    ``tls://`` for TLS). The first connection tries each server once and raises
    :class:`NatsConnectError` if none answers; later losses reconnect with
    ``backoff`` (default: full jitter from 50 ms, capped at 2 s, 60 attempts),
    and :class:`NatsReconnectFailed` is raised out of the block when it gives up.
    """
    client = NatsClient(
        [servers] if isinstance(servers, str) else list(servers),
        name=name,
        user=user,
        password=password,
        token=token,
        tls=tls,
        tls_hostname=tls_hostname,
        ping_interval=ping_interval,
        max_pings_outstanding=max_pings_outstanding,
        connect_timeout=connect_timeout,
        backoff=backoff or Backoff(base=0.05, factor=2.0, cap=2.0, max_attempts=60),
        reconnect_buffer_size=reconnect_buffer_size,
        pending_msgs_limit=pending_msgs_limit,
        pending_bytes_limit=pending_bytes_limit,
        write_buffer_size=write_buffer_size,
        echo=echo,
        randomize=randomize,
        rng=rng or random.Random(),
        dial=dial,
    )
    with collapse_exception_groups():
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
                await client.close()
            finally:
                client._shutdown()
                nursery.cancel_scope.cancel()
