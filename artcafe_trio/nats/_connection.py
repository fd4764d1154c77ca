"""The NATS client's connection manager: dial, handshake, read, write, ping, reconnect.

One manager task (:meth:`_Link.run`) owns the connection: it dials, handshakes
(``INFO`` -> ``CONNECT`` + ``PING`` -> ``PONG``), then runs a reader, a writer
and a pinger under one cancel scope whose *deadline* is the liveness check: it
is the time the oldest unanswered ``PING`` was queued (or the connection
started, for one queued while disconnected) plus ``ping_interval *
max_pings_outstanding`` (no unanswered ping: no deadline). A PING is timed when
it is queued, not when it is written, so the deadline also holds while the
writer is blocked on a server that stopped reading; the cancelled scope then
cancels that write too. When the deadline
passes, the socket fails or the server closes, the manager reconnects through
the server pool with full-jitter backoff, re-sends every subscription in
creation order, then whatever was published while disconnected.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
import trio

from .. import __version__
from ..protocol._backoff import Backoff
from ._errors import (
    NatsAuthError,
    NatsConnectError,
    NatsConnectionLost,
    NatsError,
    NatsReconnectFailed,
    NatsServerError,
)
from ._events import (
    AsyncServerError,
    Disconnected,
    LameDuckMode,
    NatsEvent,
    Reconnected,
    ServersDiscovered,
)
from ._protocol import (
    PING,
    PONG,
    Err,
    Event,
    Info,
    Msg,
    NatsParser,
    Ok,
    Ping,
    Pong,
    encode_connect,
    encode_sub,
)
from ._subscription import Subscription, _ReplyMux, _Waiter

__all__ = ["Dialer"]

log = logging.getLogger("artcafe_trio.nats")

#: Opens a byte stream to ``(host, port)``; tests pass one that returns memory streams.
Dialer = Callable[[str, int], Awaitable[trio.abc.Stream]]

_CONNECTION_ERRORS = (OSError, trio.BrokenResourceError, trio.TooSlowError, NatsError)


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


@attrs.frozen(kw_only=True)
class _ConnectOptions:
    """What the handshake needs: identity, credentials, TLS and the ``echo`` flag."""

    name: str | None
    user: str | None
    password: str | None
    token: str | None
    tls: ssl.SSLContext | None
    tls_hostname: str | None
    echo: bool


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


class _Outgoing:
    """Outgoing bytes not yet handed to the writer, and the unanswered PINGs.

    Publishing appends the encoded command to one buffer that the writer sends
    whole, so bursts of publishes become few large writes.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        #: How many of the last ``pongs`` are still in ``data`` (not yet taken by the writer).
        self.unsent_pings = 0
        self.wake = trio.Event()
        self.space = trio.lowlevel.ParkingLot()
        #: One entry per unanswered PING, in order (the written ones, then those still
        #: in ``data``): a waiter, or None for the pinger's.
        self.pongs: deque[_Waiter | None] = deque()
        #: When each PING in ``pongs`` was queued on the current connection (PINGs
        #: queued while disconnected: when the connection started).
        self.ping_times: deque[float] = deque()
        #: The live connection's liveness scope and its limit (interval x outstanding).
        self.scope: trio.CancelScope | None = None
        self.limit = math.inf

    @property
    def sent_pings(self) -> int:
        """The PINGs handed to the writer on the current connection, still unanswered."""
        return len(self.pongs) - self.unsent_pings

    def write(self, data: bytes) -> None:
        self.data += data
        if not self.wake.is_set():
            self.wake.set()

    def queue_ping(self, waiter: _Waiter | None) -> None:
        self.pongs.append(waiter)
        self.ping_times.append(trio.current_time())
        self.unsent_pings += 1
        self.write(PING)
        if len(self.pongs) == 1:
            self.update_deadline()

    def answered(self) -> _Waiter | None:
        """A PONG came: pop the oldest written PING's waiter and move the deadline."""
        self.ping_times.popleft()
        waiter = self.pongs.popleft()
        self.update_deadline()
        return waiter

    def update_deadline(self) -> None:
        """The live connection dies ``limit`` after its oldest unanswered PING was queued."""
        if self.scope is not None:
            oldest = self.ping_times[0] if self.ping_times else math.inf
            self.scope.deadline = oldest + self.limit


async def _handshake(stream: trio.abc.Stream, server: _Server, options: _ConnectOptions) -> _Conn:
    """``INFO`` -> (TLS) -> ``CONNECT`` + ``PING`` -> ``PONG``; the live connection."""
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
    tls = options.tls is not None or server.tls or bool(info.get("tls_required"))
    if tls:
        context = options.tls or ssl.create_default_context()
        ssl_stream = trio.SSLStream(
            stream, context, server_hostname=options.tls_hostname or server.host
        )
        await ssl_stream.do_handshake()
        conn.stream = ssl_stream
    connect: dict[str, Any] = {
        "verbose": False,
        "pedantic": False,
        "tls_required": tls,
        "lang": "python-trio",
        "version": __version__,
        "protocol": 1,
        "echo": options.echo,
        "headers": True,
        "no_responders": True,
    }
    if options.name:
        connect["name"] = options.name
    user = server.user or options.user
    password = server.password or options.password
    token = server.token or options.token
    if user is not None:
        connect["user"] = user
        connect["pass"] = password or ""
    if token is not None:
        connect["auth_token"] = token
    await conn.stream.send_all(encode_connect(connect) + PING)
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
    conn.info = info
    return conn


class _Link:
    """The connection manager of one :class:`NatsClient`: the pool, the live
    connection and its reader, writer and pinger.

    It shares the client's subscriptions (``subs``, by reference), outgoing
    buffer, event fan-out and reconnect hooks; ``on_stop`` runs when it ends.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        options: _ConnectOptions,
        ping_interval: float,
        max_pings_outstanding: int,
        connect_timeout: float,
        backoff: Backoff,
        randomize: bool,
        rng: random.Random,
        dial: Dialer | None,
        subs: Mapping[int, Subscription | _ReplyMux],
        out: _Outgoing,
        emit: Callable[[NatsEvent], None],
        reconnect_hooks: list[Callable[[], None]],
        on_stop: Callable[[], None],
    ) -> None:
        self.pool = [_parse_server(s) for s in servers]
        if randomize:
            rng.shuffle(self.pool)
        self._options = options
        self._ping_interval = ping_interval
        self._max_pings = max_pings_outstanding
        self.connect_timeout = connect_timeout
        self._backoff = backoff
        self._rng = rng
        self._dial: Dialer = dial or trio.open_tcp_stream
        self._subs = subs
        self._out = out
        self._emit = emit
        self._reconnect_hooks = reconnect_hooks
        self._on_stop = on_stop
        self.conn: _Conn | None = None
        self.info: dict[str, Any] = {}
        self.max_payload = 1024 * 1024
        #: Completed reconnections since the client was opened.
        self.reconnects = 0

    @property
    def servers(self) -> list[str]:
        return [str(s) for s in self.pool]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (each server once), report started, then serve and reconnect until
        cancelled or the reconnect gives up."""
        last: BaseException | None = None
        conn: _Conn | None = None
        for server in list(self.pool):
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
            self.conn = None
            self._on_stop()

    def _rotate(self, server: _Server) -> None:
        if server in self.pool:
            self.pool.remove(server)
        self.pool.append(server)

    async def _reconnect(self) -> _Conn:
        failures = 0
        last: BaseException | None = None
        for delay in self._backoff.delays(self._rng):
            await trio.sleep(delay)
            server = self.pool[0]
            self._rotate(server)
            try:
                return await self._connect(server)
            except _CONNECTION_ERRORS as exc:
                log.debug("reconnect to %s failed: %r", server, exc)
                last = exc
                failures += 1
        raise NatsReconnectFailed(failures, last)

    async def _connect(self, server: _Server) -> _Conn:
        with trio.fail_after(self.connect_timeout):
            stream = await self._dial(server.host, server.port)
            try:
                conn = await _handshake(stream, server, self._options)
                self._apply_info(conn.info, conn, announce=False)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return conn

    def _apply_info(self, info: dict[str, Any], conn: _Conn, *, announce: bool = True) -> None:
        self.info = info
        conn.info = info
        max_payload = info.get("max_payload")
        if isinstance(max_payload, int) and max_payload > 0:
            self.max_payload = max_payload
            conn.parser.max_payload = max_payload + 64 * 1024
        urls = info.get("connect_urls")
        if isinstance(urls, list):
            known = {(s.host, s.port) for s in self.pool}
            added: list[str] = []
            for url in urls:
                try:
                    found = _parse_server(str(url))
                except ValueError:
                    continue
                if (found.host, found.port) not in known:
                    tls_flag = conn.server.tls
                    self.pool.append(attrs.evolve(found, tls=tls_flag))
                    known.add((found.host, found.port))
                    added.append(str(found))
            if added:
                self._emit(ServersDiscovered(tuple(added)))
        if announce and info.get("ldm"):
            self._emit(LameDuckMode(str(conn.server)))

    async def _serve(self, conn: _Conn) -> None:
        out = self._out
        # Subscriptions first, in creation order, then what was buffered meanwhile.
        resub = b"".join(encode_sub(s.subject, s.sid, queue=s.queue) for s in self._subs.values())
        out.data[:0] = resub
        # PINGs queued while disconnected (flushes) are timed from now.
        assert out.sent_pings == 0
        out.ping_times = deque([trio.current_time()] * len(out.pongs))
        out.scope = conn.scope
        out.limit = self._ping_interval * self._max_pings
        out.update_deadline()
        self.conn = conn
        out.wake = trio.Event()
        if out.data:
            out.wake.set()
        log.debug("connected to %s", conn.server)
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._reader, conn)
                    nursery.start_soon(self._guard, self._writer, conn)
                    nursery.start_soon(self._guard, self._pinger, conn)
        finally:
            self.conn = None
            out.scope = None
            await trio.aclose_forcefully(conn.stream)
            # PINGs written on the dead connection will never be answered.
            for _ in range(out.sent_pings):
                out.ping_times.popleft()
                waiter = out.pongs.popleft()
                if waiter is not None:
                    waiter.fail(NatsConnectionLost(f"connection to {conn.server} lost"))
            out.space.unpark_all()
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
            self._out.write(PONG)
        elif type(event) is Pong:
            out = self._out
            if out.sent_pings:
                waiter = out.answered()
                if waiter is not None:
                    waiter.set()
        elif type(event) is Info:
            self._apply_info(event.info, conn)
        elif type(event) is Err:
            if event.message.lower().startswith("permissions violation"):
                self._emit(AsyncServerError(str(conn.server), event.message))
            else:
                raise NatsServerError(event.message)
        else:
            assert type(event) is Ok

    async def _writer(self, conn: _Conn) -> None:
        send = conn.stream.send_all
        out = self._out
        while True:
            if not out.data:
                out.wake = trio.Event()
                await out.wake.wait()
                continue
            data = out.data
            out.data = bytearray()
            out.unsent_pings = 0  # taken: written now, or lost with this connection
            if out.space:
                out.space.unpark_all()
            await send(data)

    async def _pinger(self, conn: _Conn) -> None:
        while True:
            await trio.sleep(self._ping_interval)
            self._out.queue_ping(None)
