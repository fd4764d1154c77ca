"""A small, bounded HTTP/1.1 server and client over trio, on h11 (sans-IO).

Server: GET-style requests only, every limit explicit (:class:`HttpLimits`):
header bytes, body bytes, concurrent connections, time to receive a request,
time to write a chunk. A handler returns a :class:`Response` (sent whole) or a
:class:`StreamResponse` (chunked, e.g. server-sent events; the connection
closes after it). Client: :func:`post` for the alert webhooks.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

__all__ = [
    "HttpError",
    "HttpLimits",
    "Request",
    "Response",
    "StreamResponse",
    "post",
    "serve_http",
]

log = logging.getLogger("artcafe_trio.dashboard")

SERVER_NAME = "artcafe-trio-dashboard"


@attrs.frozen
class HttpLimits:
    """Bounds of the dashboard's HTTP server. Durations in seconds."""

    max_connections: int = 64
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 4096
    request_timeout: float = 10.0
    """To receive a whole request (also the keep-alive idle time between requests)."""
    write_timeout: float = 10.0
    """To write one response or one chunk of a stream: a reader that stalls is dropped."""


@attrs.frozen
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    remote: str

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Send = Callable[[bytes], Awaitable[None]]


@attrs.frozen
class StreamResponse:
    """A chunked response written by ``produce(send)``; the connection closes after it.
    ``done`` is called once the response is over, however it ended (even when the
    connection broke before ``produce`` ran): it releases what the handler reserved."""

    status: int
    content_type: str
    produce: Callable[[Send], Awaitable[None]]
    headers: tuple[tuple[str, str], ...] = ()
    done: Callable[[], None] | None = None


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]

_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
)


class _Closed(Exception):
    """The peer went away, or a limit ended the connection."""


class _Conn:
    def __init__(self, stream: trio.abc.Stream, limits: HttpLimits) -> None:
        self.stream = stream
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)

    async def send(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            with trio.move_on_after(self.limits.write_timeout) as scope:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise _Closed from exc
            if scope.cancelled_caught:
                raise _Closed("write timeout")

    async def next_event(self) -> h11.Event:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = await self.stream.receive_some(16 * 1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _Closed from exc
            self.h11.receive_data(bytes(data))

    async def read_request(self) -> tuple[h11.Request, bytes] | None:
        """The next request and its body; ``None`` if the peer closed between requests."""
        event = await self.next_event()
        if isinstance(event, h11.ConnectionClosed):
            return None
        if not isinstance(event, h11.Request):
            raise h11.RemoteProtocolError("expected a request", 400)
        size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if size > self.limits.max_header_bytes:  # h11 bounds only what is still incomplete
            raise h11.RemoteProtocolError("request header too large", 431)
        length = next((v for k, v in event.headers if k == b"content-length"), b"0")
        if int(length) > self.limits.max_body_bytes:
            raise _TooLarge
        body = b""
        while True:
            part = await self.next_event()
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > self.limits.max_body_bytes:
                    raise _TooLarge
            elif isinstance(part, h11.EndOfMessage):
                return event, body
            else:
                raise h11.RemoteProtocolError("incomplete request", 400)

    async def respond(self, response: Response, *, close: bool = False, head: bool = False) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Server", SERVER_NAME),
            *_SECURITY_HEADERS,
            *response.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        await self.send(h11.Response(status_code=response.status, headers=headers))
        if not head:  # a HEAD answer has the headers of the GET, and no body
            await self.send(h11.Data(data=response.body))
        await self.send(h11.EndOfMessage())


class _TooLarge(Exception):
    pass


def _decode_request(event: h11.Request, remote: str) -> Request:
    target = event.target.decode("ascii", "replace")
    split = urlsplit(target)
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("ascii", "replace").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(
        method=event.method.decode("ascii", "replace"),
        path=split.path,
        query=parse_qs(split.query, max_num_fields=20),
        headers=headers,
        remote=remote,
    )


def _text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


class _Server:
    def __init__(self, handler: Handler, limits: HttpLimits) -> None:
        self.handler = handler
        self.limits = limits
        self.open = 0
        self.refused = 0

    async def serve(self, stream: trio.abc.Stream) -> None:
        remote = _remote(stream)
        conn = _Conn(stream, self.limits)
        try:
            if self.open >= self.limits.max_connections:
                self.refused += 1
                with trio.move_on_after(self.limits.request_timeout):
                    await _quietly(conn.respond(_text(503, "too many connections"), close=True))
                return
            self.open += 1
            try:
                await self._requests(conn, remote)
            except (_Closed, h11.ProtocolError):
                pass  # the peer went away, or broke the protocol after we answered
            except Exception:  # a barrier: one connection never takes the server down
                log.exception("dashboard: unexpected error on a connection from %s", remote)
            finally:
                self.open -= 1
        finally:
            with trio.move_on_after(1, shield=True):
                await trio.aclose_forcefully(stream)

    async def _requests(self, conn: _Conn, remote: str) -> None:
        while True:
            with trio.move_on_after(self.limits.request_timeout) as scope:
                try:
                    got = await conn.read_request()
                except _TooLarge:
                    await _quietly(conn.respond(_text(413, "request too large"), close=True))
                    return
                except (h11.RemoteProtocolError, ValueError) as exc:
                    status = getattr(exc, "error_status_hint", 400)
                    if conn.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await _quietly(conn.respond(_text(status, "bad request"), close=True))
                    return
                except _Closed:
                    return
            if scope.cancelled_caught:
                started = conn.h11.their_state is not h11.IDLE or conn.h11.trailing_data[0]
                if started and conn.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _quietly(conn.respond(_text(408, "request timeout"), close=True))
                return
            if got is None:
                return
            event, _body = got
            try:
                request = _decode_request(event, remote)
            except ValueError:  # e.g. more query fields than parse_qs allows
                await _quietly(conn.respond(_text(400, "bad request"), close=True))
                return
            try:
                response = await self.handler(request)
            except Exception:
                log.exception("dashboard: error serving %s %s", request.method, request.path)
                response = _text(500, "internal error")
            try:
                if isinstance(response, StreamResponse):
                    try:
                        await self._stream(conn, response)
                    finally:
                        if response.done is not None:
                            response.done()
                    return
                await conn.respond(response, head=request.method == "HEAD")
            except _Closed:
                return
            if conn.h11.our_state is h11.MUST_CLOSE or conn.h11.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _stream(self, conn: _Conn, response: StreamResponse) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Server", SERVER_NAME),
            ("Connection", "close"),
            *_SECURITY_HEADERS,
            *response.headers,
        ]
        await conn.send(h11.Response(status_code=response.status, headers=headers))

        async def send(data: bytes) -> None:
            await conn.send(h11.Data(data=data))

        await response.produce(send)
        await conn.send(h11.EndOfMessage())


async def _quietly(call: Awaitable[None]) -> None:
    with contextlib.suppress(_Closed, h11.LocalProtocolError):
        await call


def _remote(stream: trio.abc.Stream) -> str:
    try:
        sock = stream.socket  # type: ignore[attr-defined]
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except (AttributeError, OSError, ValueError):
        return "?"


async def serve_http(
    handler: Handler,
    listeners: list[trio.SocketListener],
    limits: HttpLimits,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``listeners`` until cancelled."""
    server = _Server(handler, limits)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept, listener, server, nursery)
        task_status.started()


async def _accept(listener: trio.SocketListener, server: _Server, nursery: trio.Nursery) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # e.g. EMFILE: wait and go on
                log.warning("dashboard: accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(server.serve, stream)


# --------------------------------------------------------------------------- client


class HttpError(Exception):
    """A POST that did not get a 2xx answer (``status`` 0: no answer at all)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


async def post(
    url: str,
    body: bytes,
    headers: list[tuple[str, str]],
    *,
    time_limit: float,
    ssl_context: ssl.SSLContext | None = None,
    max_response_bytes: int = 64 * 1024,
) -> int:
    """POST ``body`` to an ``http://`` or ``https://`` URL; return the 2xx status.

    Raises :class:`HttpError` for a non-2xx answer, a connection failure or a
    timeout (the whole exchange is bounded by ``time_limit`` seconds).
    """
    split = urlsplit(url)
    if split.scheme not in ("http", "https") or not split.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    https = split.scheme == "https"
    port = split.port or (443 if https else 80)
    target = (split.path or "/") + (f"?{split.query}" if split.query else "")
    host_header = split.netloc.rsplit("@", 1)[-1]
    with trio.move_on_after(time_limit) as scope:
        try:
            return await _post(
                split.hostname, port, https, ssl_context, host_header, target, body, headers,
                max_response_bytes,
            )  # fmt: skip
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise HttpError(f"POST {url} failed: {exc or type(exc).__name__}") from None
    assert scope.cancelled_caught
    raise HttpError(f"POST {url}: no answer within {time_limit:g} s")


async def _post(
    host: str,
    port: int,
    https: bool,
    ssl_context: ssl.SSLContext | None,
    host_header: str,
    target: str,
    body: bytes,
    headers: list[tuple[str, str]],
    max_response_bytes: int,
) -> int:
    stream: trio.abc.Stream
    if https:
        context = ssl_context or ssl.create_default_context()
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context)
    else:
        stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="POST",
            target=target,
            headers=[
                ("Host", host_header),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                ("User-Agent", SERVER_NAME),
                *headers,
            ],
        )
        await stream.send_all(conn.send(request) + conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        status = 0
        received = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(16 * 1024)
                received += len(data)
                if received > max_response_bytes:
                    break  # the status is known by then; the rest is not our business
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if not 200 <= status < 300:
            raise HttpError(f"POST answered HTTP {status or 'nothing'}", status)
        return status
