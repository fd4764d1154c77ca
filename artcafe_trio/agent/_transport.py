"""How the agent reaches a hub: the :class:`Transport` interface (like httpx's
transports) and its implementations.

A transport opens one message connection (a WebSocket) to the hub's ``resource``
(``/api/v1/ws/agent/<id>?tenant_id=<tenant>``); the connection's background task runs
in the nursery it is given. :class:`WebSocketTransport` dials TCP (and TLS for
``wss://``); :class:`MemoryTransport` speaks WebSocket over an in-memory byte stream
(the test kit's); :class:`DialerTransport` adapts a plain ``dial`` function.
"""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeAlias, cast
from urllib.parse import urlsplit

import trio
import trio_websocket
from trio_websocket import WebSocketConnection

from .._errors import AuthenticationError, ConnectionLost

__all__ = [
    "CLOSE_PATIENCE",
    "MAX_RECEIVE_BYTES",
    "Dialer",
    "DialerTransport",
    "MemoryTransport",
    "Transport",
    "Transports",
    "WebSocketTransport",
    "cancelled_here",
    "close_websocket",
    "wrap_client_stream",
]

MAX_RECEIVE_BYTES = 64 * 1024 * 1024
"""What the agent accepts from the hub; the hub bounds what it forwards."""

CLOSE_PATIENCE = 1.0
"""Seconds a client (the agent, ``status``) waits for the hub's reply to its close."""

Dialer: TypeAlias = Callable[[trio.Nursery, str], Awaitable[WebSocketConnection]]
"""Opens a WebSocket to the hub: ``await dial(nursery, resource)``; the connection's
background task runs in ``nursery``."""


class Transport(Protocol):
    """Opens message connections to one hub."""

    async def connect(self, nursery: trio.Nursery, resource: str) -> WebSocketConnection:
        """A WebSocket to ``resource`` on the hub; its reader task runs in ``nursery``."""
        ...


Transport.__module__ = "artcafe_trio"


def wrap_client_stream(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    host: str,
    resource: str,
    *,
    max_message_size: int = MAX_RECEIVE_BYTES,
) -> Awaitable[WebSocketConnection]:
    """trio-websocket's client handshake over any byte stream (its annotation names
    only socket and TLS streams; any :class:`trio.abc.Stream` works).

    The connection's byte stream is remembered, for :func:`close_websocket`."""
    return _wrap_client_stream(nursery, _ClientStream(stream), host, resource, max_message_size)


async def _wrap_client_stream(
    nursery: trio.Nursery, stream: _ClientStream, host: str, resource: str, max_message_size: int
) -> WebSocketConnection:
    socket_like = cast("trio.SocketStream", stream)
    ws = await trio_websocket.wrap_client_stream(
        nursery, socket_like, host, resource, max_message_size=max_message_size
    )
    _client_streams[ws] = stream
    return ws


class _ClientStream(trio.abc.Stream):
    """The byte stream under a connection from :func:`wrap_client_stream`: it tells
    :func:`close_websocket` when the close frame is out. ``hang_up``, during the
    WebSocket handshake: end of stream or an error cancels it (trio-websocket 0.12
    waits forever for a handshake the peer abandoned; this makes it a failed attempt)."""

    def __init__(self, inner: trio.abc.Stream, hang_up: trio.CancelScope | None = None) -> None:
        self.inner = inner
        self.hang_up = hang_up
        self.on_close_frame_sent: trio.CancelScope | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        # trio-websocket sends each frame with one send_all; 0x88: FIN + opcode close.
        if self.on_close_frame_sent is not None and bytes(data[:1]) == b"\x88":
            self.on_close_frame_sent.cancel()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self.hang_up is None:
            return await self.inner.receive_some(max_bytes)
        try:
            data = await self.inner.receive_some(max_bytes)
        except BaseException:
            self.hang_up.cancel()
            raise
        if not data:
            self.hang_up.cancel()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


_client_streams: weakref.WeakKeyDictionary[WebSocketConnection, _ClientStream] = (
    weakref.WeakKeyDictionary()
)


def cancelled_here() -> bool:
    """Whether the calling task is cancelled. In the body of the nursery a connection's
    reader task runs in, that task is cancelled too: nothing will read the peer's reply
    to a close frame (``reader_gone`` of :func:`close_websocket`)."""
    return trio.current_effective_deadline() <= trio.current_time()


async def close_websocket(
    ws: WebSocketConnection,
    code: int = 1000,
    reason: str | None = None,
    *,
    patience: float,
    reader_gone: bool = False,
) -> None:
    """Close ``ws`` within ``patience`` seconds (shielded), then its byte stream.

    trio-websocket 0.12 leaves the stream open when the peer's close came first (its
    ``aclose()`` then returns at once), even when its reader task is cancelled before
    it sends the close reply: the peer would wait for a reply that never comes. So the
    byte stream of a connection made by :func:`wrap_client_stream` (every transport of
    this package) is closed here in any case; a connection dialed otherwise gets
    trio-websocket's own ``aclose()`` only.

    ``reader_gone``: the connection's reader task is cancelled, so nothing would read
    the peer's close reply: stop as soon as the close frame is sent.
    """
    stream = _client_streams.get(ws)
    with trio.CancelScope(shield=True):
        with trio.move_on_after(patience) as waiting:
            if stream is not None and reader_gone:
                stream.on_close_frame_sent = waiting
            await ws.aclose(code, reason)
        if stream is not None:
            stream.on_close_frame_sent = None
            await trio.aclose_forcefully(stream)


def _default_client_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class WebSocketTransport:
    """WebSocket over TCP to ``url`` (``ws://host:port[/path]``, or ``wss://`` with TLS:
    ``ssl_context``, default the system's CAs, built in a worker thread)."""

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None = None) -> None:
        split = urlsplit(url)
        if split.scheme not in ("ws", "wss") or not split.hostname:
            raise ValueError(
                f"hub url must look like ws://host:port or wss://host:port, got {url!r}"
            )
        self.url = url
        self.ssl_context = ssl_context
        self._secure = split.scheme == "wss"
        self._hostname = split.hostname
        self._port = split.port or (443 if self._secure else 80)
        self._host = split.hostname if split.port is None else f"{split.hostname}:{self._port}"
        self._path = split.path.rstrip("/") or ""

    async def connect(self, nursery: trio.Nursery, resource: str) -> WebSocketConnection:
        stream: trio.abc.Stream = await trio.open_tcp_stream(self._hostname, self._port)
        try:
            return await self._upgrade(nursery, stream, resource)
        except BaseException:
            # Cancelled (connect_timeout) or failed: do not leave the socket to the GC.
            await trio.aclose_forcefully(stream)
            raise

    async def _upgrade(
        self, nursery: trio.Nursery, stream: trio.abc.Stream, resource: str
    ) -> WebSocketConnection:
        """TLS (for wss://) and the WebSocket handshake over a connected TCP stream."""
        if self._secure:
            stream = await self._tls(stream)
        with trio.CancelScope() as handshake:
            watched = _ClientStream(stream, hang_up=handshake)
            ws = await _wrap_client_stream(
                nursery, watched, self._host, self._path + resource, MAX_RECEIVE_BYTES
            )
            watched.hang_up = None
            return ws
        raise ConnectionLost("the hub hung up during the WebSocket handshake")

    async def _tls(self, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream]:
        context = self.ssl_context
        if context is None:  # it reads the system's CA certificates: off the loop
            context = await trio.to_thread.run_sync(_default_client_context)
        tls = trio.SSLStream(stream, context, server_hostname=self._hostname)
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
        return tls


class MemoryTransport:
    """WebSocket over byte streams from ``open_stream()`` (an in-memory pair, a fault
    injector...): the test kit's transport."""

    def __init__(
        self,
        open_stream: Callable[[], Awaitable[trio.abc.Stream]],
        *,
        host: str = "memory",
        max_message_size: int = MAX_RECEIVE_BYTES,
    ) -> None:
        self.open_stream = open_stream
        self.host = host
        self.max_message_size = max_message_size

    async def connect(self, nursery: trio.Nursery, resource: str) -> WebSocketConnection:
        stream = await self.open_stream()
        try:
            return await wrap_client_stream(
                nursery, stream, self.host, resource, max_message_size=self.max_message_size
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise


class DialerTransport:
    """A plain ``dial(nursery, resource)`` function as a transport. The function is the
    user's code: it runs without the supervisor's KI protection."""

    def __init__(self, dial: Dialer) -> None:
        self.dial = dial

    @trio.lowlevel.disable_ki_protection
    async def connect(self, nursery: trio.Nursery, resource: str) -> WebSocketConnection:
        return await self.dial(nursery, resource)


class Transports:
    """Which :class:`Transport` reaches each hub URL of an agent.

    ``by_url``: the agent dials each URL itself (the default WebSocket transports, or a
    mapping URL → transport), so URLs advertised by the hubs can be used too; otherwise
    (one ``transport`` or ``dial`` for every URL) advertised URLs are ignored.
    """

    def __init__(self, make: Callable[[str], Transport | None], *, by_url: bool) -> None:
        self._make = make
        self.by_url = by_url
        self._made: dict[str, Transport | None] = {}

    @classmethod
    def one(cls, transport: Transport) -> Transports:
        return cls(lambda url: transport, by_url=False)

    @classmethod
    def mapping(cls, transports: Mapping[str, Transport]) -> Transports:
        table = {url.rstrip("/"): transport for url, transport in transports.items()}
        return cls(table.get, by_url=True)

    @classmethod
    def websocket(cls, ssl_context: ssl.SSLContext | None) -> Transports:
        return cls(lambda url: WebSocketTransport(url, ssl_context), by_url=True)

    def get(self, url: str) -> Transport | None:
        """The transport to ``url`` (made once), or None when none reaches it."""
        if url not in self._made:
            self._made[url] = self._make(url)
        return self._made[url]
