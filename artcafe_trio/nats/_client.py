"""The trio NATS client: ``open_nats`` and the :class:`NatsClient` it yields.

The public API lives here. The connection manager (dial, handshake, read,
write, ping, reconnect) is ``_connection._Link``; subscriptions and the reply
mux are in ``_subscription``, connection events in ``_events``.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

import trio

from .._util import collapse_exception_groups
from ..protocol._backoff import Backoff
from ._connection import Dialer, _ConnectOptions, _Link, _Outgoing
from ._errors import (
    MaxPayloadExceeded,
    NatsClosed,
    NatsError,
    NoRespondersError,
    OutboundBufferFull,
)
from ._events import (
    AsyncServerError,
    Disconnected,
    LameDuckMode,
    NatsEvent,
    Reconnected,
    ServersDiscovered,
    SlowConsumer,
    _EventFanout,
)
from ._protocol import Headers, Msg, encode_headers, encode_pub, encode_sub, encode_unsub
from ._subscription import Subscription, _ReplyMux, _Waiter, new_inbox

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
        self._reconnect_buffer_size = reconnect_buffer_size
        self._pending_msgs_limit = pending_msgs_limit
        self._pending_bytes_limit = pending_bytes_limit
        self._write_buffer_size = write_buffer_size
        self._closed = False
        self._next_sid = 0
        self._subs: dict[int, Subscription | _ReplyMux] = {}
        self._mux: _ReplyMux | None = None
        self._next_token = 0
        self._out = _Outgoing()
        self._events = _EventFanout()
        self._reconnect_hooks: list[Callable[[], None]] = []
        options = _ConnectOptions(
            name=name,
            user=user,
            password=password,
            token=token,
            tls=tls,
            tls_hostname=tls_hostname,
            echo=echo,
        )
        self._link = _Link(
            servers,
            options=options,
            ping_interval=ping_interval,
            max_pings_outstanding=max_pings_outstanding,
            connect_timeout=connect_timeout,
            backoff=backoff,
            randomize=randomize,
            rng=rng,
            dial=dial,
            subs=self._subs,
            out=self._out,
            emit=self._emit,
            reconnect_hooks=self._reconnect_hooks,
            on_stop=self._shutdown,
        )

    # -- public API ---------------------------------------------------------

    @property
    def events_dropped(self) -> int:
        """Events dropped because an ``events()`` channel was full."""
        return self._events.dropped

    @property
    def reconnects(self) -> int:
        """Completed reconnections since the client was opened."""
        return self._link.reconnects

    @property
    def is_connected(self) -> bool:
        """Whether a connection is currently established."""
        return self._link.conn is not None

    @property
    def connected_server(self) -> str | None:
        """``host:port`` of the current server, or ``None`` while disconnected."""
        conn = self._link.conn
        return str(conn.server) if conn is not None else None

    @property
    def server_info(self) -> Mapping[str, Any]:
        """The latest ``INFO`` of the current (or last) server."""
        return self._link.info

    @property
    def servers(self) -> list[str]:
        """The server pool, in the order it will be tried, including discovered servers."""
        return self._link.servers

    def events(self, max_buffer: int = 100) -> trio.MemoryReceiveChannel[NatsEvent]:
        """A channel of connection events from now on (at most ``max_buffer`` queued;
        further events are dropped and counted in :attr:`events_dropped`)."""
        return self._events.open(max_buffer)

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
        max_payload = self._link.max_payload
        if size > max_payload:
            raise MaxPayloadExceeded(f"{size} bytes > max_payload {max_payload}")
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
        if self._link.conn is not None:  # else the reconnect re-sends it with the others
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
            if self._link.conn is not None:
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
        self._out.queue_ping(waiter)
        await waiter.wait()

    async def key_value(
        self,
        bucket: str,
        *,
        create: bool = True,
        history: int = 1,
        replicas: int = 1,
        max_age: float | None = None,
        allow_msg_ttl: bool = False,
        limit_marker_ttl: float | None = None,
        storage: str = "file",
        api_timeout: float = 5.0,
    ) -> KeyValue:
        """Bind (or create) a JetStream key-value bucket; see :func:`key_value` for options."""
        from ._kv import key_value

        return await key_value(
            self, bucket, create=create, history=history, replicas=replicas,
            max_age=max_age, allow_msg_ttl=allow_msg_ttl,
            limit_marker_ttl=limit_marker_ttl, storage=storage, api_timeout=api_timeout,
        )  # fmt: skip

    async def close(self) -> None:
        """Flush what is buffered (for up to ``connect_timeout``) and close.

        ``async with open_nats(...)`` calls this on a normal exit.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._link.conn is not None:
            with trio.move_on_after(self._link.connect_timeout):
                with suppress(NatsError):
                    await self.flush()
        self._shutdown()

    # -- internals ------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._out.write(data)

    async def _enqueue(self, data: bytes) -> None:
        out = self._out
        if self._link.conn is None:
            if len(out.data) + len(data) > self._reconnect_buffer_size:
                raise OutboundBufferFull(
                    f"disconnected, and {len(out.data)} bytes already wait "
                    f"(reconnect_buffer_size {self._reconnect_buffer_size})"
                )
            out.data += data
            return
        while len(out.data) >= self._write_buffer_size and self._link.conn is not None:
            await out.space.park()
        if self._closed:
            raise NatsClosed("the client is closed")
        if self._link.conn is None:
            await self._enqueue(data)
            return
        out.write(data)

    def _emit(self, event: NatsEvent) -> None:
        self._events.emit(event)

    def _shutdown(self) -> None:
        self._closed = True
        for sub in self._subs.values():
            sub._close()
        self._subs.clear()
        for waiter in self._out.pongs:
            if waiter is not None:
                waiter.fail(NatsClosed("the client is closed"))
        self._out.pongs.clear()
        self._out.ping_times.clear()
        self._out.unsent_pings = 0
        self._events.close()
        self._out.space.unpark_all()

    async def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.sid, None) is not None and self._link.conn is not None:
            self._write(encode_unsub(sub.sid))
        sub._close()
        await trio.lowlevel.checkpoint()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._link.run(task_status=task_status)


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
