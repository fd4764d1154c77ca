"""The hub's side of a WebSocket, driven directly by wsproto over any trio byte stream.

No task of its own: the connection's tasks drive it. Reading (:meth:`ServerWebSocket.
get_message`) feeds received bytes to wsproto inline and returns one message at a time;
a pong goes to ``on_pong`` (the session's outbox) once a session runs; the echo of a
close, and pongs before that (bounded), are kept and sent with the next write. Writes
are never concurrent (the pump makes sure): a write either waits
(:meth:`ServerWebSocket.send_frames`, one ``send_all``) or never does
(:meth:`ServerWebSocket.send_frames_nowait`, plain TCP on POSIX), and what the second
leaves unsent goes first in the next write.

The hub negotiates no extension (no compression), so a text frame's bytes do not depend
on the connection: :func:`frame_text` frames a message once for every receiver.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ._wsframes import FrameSplitter

__all__ = ["ServerWebSocket", "UpgradeRequest", "frame_text", "read_upgrade_request"]

RECEIVE_BYTES = 65536
MAX_PENDING_CONTROL = 16384  # bytes of pongs held for the next write before a session
_STREAM_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def frame_text(text: str) -> bytes:
    """The bytes of one unmasked, unfragmented text frame carrying ``text`` (what
    wsproto's server side sends for it, without its per-frame objects)."""
    payload = text.encode("utf-8")
    size = len(payload)
    if size <= 125:
        return bytes((0x81, size)) + payload
    if size <= 0xFFFF:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


def nowait_socket(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket to write without waiting, for a plain TCP stream on POSIX: ``os.write``
    on its descriptor, which trio keeps non-blocking, takes what the kernel's buffer
    holds and raises ``BlockingIOError`` when it is full. ``None`` for any other stream
    (TLS, in memory, Windows): those are written by a task that may wait."""
    if os.name != "posix" or type(stream) is not trio.SocketStream:
        return None
    return stream.socket


def _closed(code: int, reason: str = "") -> ConnectionClosed:
    return ConnectionClosed(CloseReason(code, reason))


def _at_frame_boundary(ws: Connection) -> bool:
    """Whether wsproto holds no received byte yet, so that the splitter starts at a frame
    boundary. It reads wsproto's internals (checked by tests/test_wsserver.py); if they
    are not as expected, the answer is ``False`` and wsproto alone parses."""
    try:
        proto: Any = getattr(ws, "_proto")  # noqa: B009
        decoder = proto._frame_decoder
        return bool(
            len(decoder.buffer) == 0
            and decoder.header is None
            and proto._message_decoder.opcode is None
        )
    except AttributeError:
        return False


class UpgradeRequest:
    """A client's HTTP upgrade request, to be accepted or rejected."""

    def __init__(
        self, stream: trio.abc.Stream, ws: WSConnection, request: Request, max_message_size: int
    ) -> None:
        self._stream = stream
        self._ws: WSConnection | None = ws
        self._max_message_size = max_message_size
        self.path = request.target

    def _take(self) -> WSConnection:
        """The handshake's connection, once: the request is answered only once, and the
        caller's reference to the request must not keep the handshake's state alive."""
        ws, self._ws = self._ws, None
        if ws is None:
            raise RuntimeError("this upgrade request was answered already")
        return ws

    async def accept(self) -> ServerWebSocket:
        """Answer 101 Switching Protocols; the WebSocket is open."""
        ws = self._take()
        data = ws.send(AcceptConnection())
        websocket = ServerWebSocket(self._stream, ws, self._max_message_size)
        await self._stream.send_all(data)
        return websocket

    async def reject(self, status: int, *, body: bytes = b"") -> None:
        """Answer with an HTTP error status and a plain-text body."""
        ws = self._take()
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        data = ws.send(RejectConnection(status_code=status, headers=headers, has_body=True))
        data += ws.send(RejectData(data=body, body_finished=True))
        await self._stream.send_all(data)


async def read_upgrade_request(
    stream: trio.abc.Stream, *, max_message_size: int
) -> UpgradeRequest | None:
    """Read the HTTP upgrade request; ``None`` if the peer closed or sent no valid one
    (a malformed request is answered with HTTP 400 first)."""
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            return None
        try:
            ws.receive_data(bytes(data))
            for event in ws.events():
                if isinstance(event, Request):
                    return UpgradeRequest(stream, ws, event, max_message_size)
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            if isinstance(hint, RejectConnection):
                with contextlib.suppress(LocalProtocolError):
                    await stream.send_all(ws.send(hint))
            return None


class ServerWebSocket:
    """An open WebSocket, server side. Messages are ``str`` (text) or ``bytes``."""

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection, max_message_size: int) -> None:
        self._stream = stream
        # Once open, only the frame layer is needed: the HTTP handshake's state (h11's
        # connection, wsproto's handshake and their buffers) is let go, ~2 KiB each.
        connection = ws.connection
        if connection is None:
            raise ValueError("the WebSocket handshake is not complete")
        self._ws: Connection = connection
        self._max_message_size = max_message_size
        self._messages: list[str | bytes] = []  # usually one: a list is smaller than a deque
        self._write_broken = False  # a write was cut short: only aclose() is valid
        self._nowait_socket = nowait_socket(stream)
        self._unsent = b""  # what a write that never waits left: sent before anything else
        self._text: list[str] = []  # fragments of the message being received
        self._binary: list[bytes] = []
        self._parts_size = 0
        self._control = bytearray()  # frames to send with the next write
        #: Where a pong goes once a session runs (its outbox: written soon, and bounded
        #: like a delivery); until then it waits for the next write, at most
        #: MAX_PENDING_CONTROL bytes of them.
        self.on_pong: Callable[[bytes], None] | None = None
        self.closed: CloseReason | None = None  # why the connection ended, once it has
        self._failed = False  # the peer broke the protocol: close without waiting for it
        # Whole text frames are decoded by the splitter, everything else by wsproto;
        # wsproto alone if it holds bytes already (sent with the upgrade request).
        self._splitter = FrameSplitter(max_message_size) if _at_frame_boundary(connection) else None

    @property
    def is_open(self) -> bool:
        return self.closed is None and self._ws.state is ConnectionState.OPEN

    def has_message(self) -> bool:
        """Whether :meth:`get_message` would return without reading."""
        return bool(self._messages)

    async def get_message(self) -> str | bytes:
        """The next message; raises ``ConnectionClosed`` once the connection has ended."""
        while not self._messages:
            if self.closed is not None:
                raise ConnectionClosed(self.closed)
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except _STREAM_ERRORS:
                data = b""
            self._receive(bytes(data) if data else None)
        return self._messages.pop(0)

    def _receive(self, data: bytes | None) -> None:
        splitter = self._splitter
        if data is None or splitter is None:
            self._feed(data)
            return
        for item in splitter.split(data):
            if self.closed is not None:
                return
            if type(item) is str:
                self._messages.append(item)
            else:
                self._feed(item)

    def _feed(self, data: bytes | str | None) -> None:
        """Bytes (or the end of the stream) to wsproto, and its events."""
        assert not isinstance(data, str)
        ws = self._ws
        ws.receive_data(data)  # None: end of stream (wsproto reports 1006)
        for event in ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._parts_size += len(event.data)
                if self._parts_size > self._max_message_size:
                    self._fail(1009, f"message larger than {self._max_message_size} bytes")
                    return
                if isinstance(event, TextMessage):
                    self._text.append(event.data)
                else:
                    self._binary.append(bytes(event.data))
                if event.message_finished:
                    self._parts_size = 0
                    if self._text:
                        text, self._text = self._text, []
                        self._messages.append(text[0] if len(text) == 1 else "".join(text))
                    else:
                        binary, self._binary = self._binary, []
                        self._messages.append(b"".join(binary))
            elif isinstance(event, Ping):
                pong = ws.send(event.response())
                if self.on_pong is not None:
                    self.on_pong(pong)
                elif len(self._control) + len(pong) > MAX_PENDING_CONTROL:
                    self._fail(1008, "too many pings left unanswered")
                    return
                else:
                    self._control += pong
            elif isinstance(event, CloseConnection):
                if ws.state is ConnectionState.REMOTE_CLOSING:
                    self._control += ws.send(event.response())  # echo the peer's close
                elif ws.state is ConnectionState.OPEN:  # a protocol error wsproto found
                    self._control += ws.send(CloseConnection(code=event.code))
                    self._failed = True
                self.closed = CloseReason(event.code, event.reason)
                return

    def _fail(self, code: int, reason: str) -> None:
        if self._ws.state is ConnectionState.OPEN:
            self._control += self._ws.send(CloseConnection(code=code, reason=reason))
        self.closed = CloseReason(code, reason)
        self._failed = True

    async def send_message(self, message: str) -> None:
        """Send one text message (and any control frame waiting)."""
        await self.send_frames(frame_text(message))

    @property
    def writes_without_waiting(self) -> bool:
        """Whether :meth:`send_frames_nowait` can write (a plain TCP stream, on POSIX)."""
        return self._nowait_socket is not None

    @property
    def unsent_bytes(self) -> int:
        """Bytes kept for the next write: the rest of a write that never waits, and
        control frames (pong, close echo)."""
        return len(self._unsent) + len(self._control)

    def _after_pending(self, data: bytes) -> bytes:
        """``data`` behind what must go first: the rest of a write that never waited,
        then the control frames kept for the next write (taken: the caller writes them)."""
        if not (self._unsent or self._control):
            return data
        data = self._unsent + bytes(self._control) + data
        self._unsent = b""
        self._control.clear()
        return data

    def send_frames_nowait(self, data: bytes) -> bool:
        """Write already framed messages now, as far as the socket takes them, without
        waiting: ``True`` when all is written. Otherwise the rest is kept and must be
        sent by :meth:`send_frames` (with ``b""`` or more) before anything else; nothing
        may be written while :meth:`send_frames` is in progress. Only where
        :attr:`writes_without_waiting`."""
        sock = self._nowait_socket
        assert sock is not None
        if not self.is_open or self._write_broken:
            raise ConnectionClosed(self.closed or CloseReason(1006, "connection closed"))
        data = self._after_pending(data)
        try:
            fd = sock.fileno()  # -1 once closed: never a descriptor reused since
            if fd < 0:
                raise trio.ClosedResourceError("the socket is closed")
            written = os.write(fd, data)
        except BlockingIOError:
            written = 0
        except _STREAM_ERRORS:
            self._unsent = b""
            self.closed = CloseReason(1006, "connection lost")
            self._write_broken = True  # as after a failed send_frames: only aclose
            raise ConnectionClosed(self.closed) from None
        self._unsent = data[written:] if written < len(data) else b""
        return not self._unsent

    async def send_frames(self, data: bytes) -> None:
        """Send already framed messages (see :func:`frame_text`) in one write."""
        if not self.is_open or self._write_broken:
            raise ConnectionClosed(self.closed or CloseReason(1006, "connection closed"))
        data = self._after_pending(data)
        sent = False
        try:
            await self._stream.send_all(data)
            sent = True
        except _STREAM_ERRORS:
            self.closed = CloseReason(1006, "connection lost")
            raise ConnectionClosed(self.closed) from None
        finally:
            if not sent:
                if self.closed is None:
                    self.closed = CloseReason(1006, "a write was cut short")
                # Cut short (cancelled mid-write, or failed): part of a frame may be on
                # the wire, and trio allows only aclose on such a stream. Nothing more
                # is written to it, not even a close frame: it would follow the
                # half-sent frame and read as garbage.
                self._write_broken = True

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close: send the close frame (or the echo of the peer's), wait for the peer's
        answer (bounded by the caller's cancel scope; not after a protocol violation,
        RFC 6455 §7.1.7), then close the stream."""
        ws = self._ws
        try:
            if self._write_broken:
                return  # only the stream's close (finally): see send_frames
            if self._unsent:  # finish the frame a write that never waits began
                self._control[:0], self._unsent = self._unsent, b""
            if ws.state is ConnectionState.OPEN:
                self._control += ws.send(CloseConnection(code=code, reason=reason))
                if self.closed is None:
                    self.closed = CloseReason(code, reason)
            if self._control:
                data, self._control = bytes(self._control), bytearray()
                await self._stream.send_all(data)
            while ws.state is ConnectionState.LOCAL_CLOSING and not self._failed:
                received = await self._stream.receive_some(RECEIVE_BYTES)
                ws.receive_data(bytes(received) if received else None)
                for _event in ws.events():
                    pass  # only the state matters now
        except (*_STREAM_ERRORS, LocalProtocolError, RemoteProtocolError):
            pass
        finally:
            await self._stream.aclose()
