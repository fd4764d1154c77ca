"""The admin client: one session on the hub's admin channel (``status``, ``status --watch``).

Its own module: it is the CLI's only client of the wire protocol besides the agent.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from artcafe_trio import AuthenticationError, ConnectionLost, HubError, RemoteProtocolError
from artcafe_trio.protocol.client import MessageReceived

from ._common import (
    ADMIN_PATH,
    PRESENCE_SUBJECT,
    STATUS_TIMEOUT,
    WATCH_TICK,
    CliError,
    HubUnreachable,
)
from ._presence import _presence_json, _StatusPrinter
from ._problems import _close_text, _connection_problem, _not_tls

__all__ = ["_admin_session", "_tls_preflight"]

if TYPE_CHECKING:
    import trio_websocket

MAX_ADMIN_FRAME = 64 * 1024 * 1024  # a whole presence table in one frame (= the WebSocket's)


async def _admin_session(
    url: str,
    token: str,
    ssl_context: ssl.SSLContext | None,
    printer: _StatusPrinter,
) -> None:
    """Query (and with ``printer.watch`` follow) the hub's presence table.

    The protocol is the sans-IO :class:`ClientConnection` with admin credentials (the
    handshake the agent uses too); this function only moves its frames.
    """
    import trio
    import trio_websocket

    from artcafe_trio.protocol.client import (
        AdminCredentials,
        ClientConnection,
        ClientEvent,
        HubErrorReceived,
        PresenceAnswered,
        RequestRefused,
    )

    client = ClientConnection(AdminCredentials(token=token), max_receive_bytes=MAX_ADMIN_FRAME)

    async def send(ws: trio_websocket.WebSocketConnection, text: str) -> None:
        try:
            await ws.send_message(text)
        except trio_websocket.ConnectionClosed as exc:
            raise HubUnreachable(
                f"hub closed the admin connection ({_close_text(exc.reason)})"
            ) from None

    async def receive(ws: trio_websocket.WebSocketConnection) -> list[ClientEvent]:
        try:
            text = await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise HubUnreachable(
                f"hub closed the admin connection ({_close_text(exc.reason)})"
            ) from None
        try:
            return client.receive(text, trio.current_time())
        except RemoteProtocolError as exc:
            raise CliError(f"the hub broke the protocol: {exc}") from None
        except AuthenticationError as exc:
            raise AuthenticationError(
                f"{exc} (the token from the admin file)", code=exc.code
            ) from None

    try:
        with trio.fail_after(STATUS_TIMEOUT) as handshake_scope:
            if ssl_context is not None:
                await _tls_preflight(url, ssl_context)
            async with _open_admin_websocket(url, ssl_context) as ws:
                await receive(ws)  # the challenge
                await send(ws, client.auth())
                await receive(ws)  # the welcome (or a refusal, raised)
                if printer.watch:
                    await send(ws, client.subscribe(PRESENCE_SUBJECT).text)
                await send(ws, client.presence_query().text)
                next_tick = trio.current_time() + WATCH_TICK
                while True:
                    # --watch redraws at every presence change and every WATCH_TICK s, so
                    # that LAST SEEN, LAST HEARTBEAT ACK and their ages stay current.
                    with trio.move_on_at(next_tick if printer.watch else math.inf) as tick:
                        events = await receive(ws)
                    if tick.cancelled_caught:
                        next_tick = trio.current_time() + WATCH_TICK
                        await send(ws, client.presence_query().text)
                        continue
                    for event in events:
                        if isinstance(event, PresenceAnswered):  # in order: show each
                            printer.show(
                                [_presence_json(r, "hub") for r in event.records],
                                event.degraded,
                            )
                            if not printer.watch:
                                return
                            handshake_scope.deadline = math.inf  # watching: wait forever
                        elif isinstance(
                            event, MessageReceived
                        ) and event.message.subject.startswith("$presence."):
                            await send(ws, client.presence_query().text)
                        elif isinstance(event, RequestRefused):
                            raise event.error
                        elif isinstance(event, HubErrorReceived):
                            raise HubError(event.error.code, event.error.message)
    except trio.TooSlowError:
        raise HubUnreachable(
            f"the hub at {url} did not answer within {STATUS_TIMEOUT:g} s"
        ) from None
    except (
        OSError,
        trio_websocket.HandshakeError,
        trio.BrokenResourceError,
        ConnectionLost,
    ) as exc:
        raise HubUnreachable(_connection_problem(exc, url, hint=False)) from None


@asynccontextmanager
async def _open_admin_websocket(
    url: str, ssl_context: ssl.SSLContext | None
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """The admin WebSocket, dialed like the agent's, and closed like it: its socket
    is closed on the way out in every case (trio-websocket's ``open_websocket_url``
    can leave it open when the hub closed first: the hub then waits ``close_timeout``
    for a close reply)."""
    import trio

    from artcafe_trio._util import collapse_exception_groups
    from artcafe_trio.agent import WebSocketTransport
    from artcafe_trio.agent._transport import CLOSE_PATIENCE, cancelled_here, close_websocket

    transport = WebSocketTransport(url, ssl_context)
    with collapse_exception_groups():
        async with trio.open_nursery() as nursery:
            ws = await transport.connect(nursery, ADMIN_PATH)
            try:
                yield ws
            finally:
                # Cancelled here (the status timeout), so is the reader: no reply
                # would be read; then the close frame is sent, and that is all.
                await close_websocket(ws, patience=CLOSE_PATIENCE, reader_gone=cancelled_here())
                nursery.cancel_scope.cancel()


def _is_presence(event: MessageReceived) -> bool:
    return event.message.subject.startswith("$presence.")


async def _tls_preflight(url: str, ssl_context: ssl.SSLContext) -> None:
    """Fail fast on a TLS error: trio-websocket only times out on one (its issue #199)."""
    import trio

    split = urlsplit(url)
    host, port = split.hostname or "127.0.0.1", split.port or 443
    try:
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
    except OSError:
        return  # unreachable: the caller's own connection attempt reports (or retries) that
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ or exc
        if _not_tls(cause):
            raise CliError(_connection_problem(exc, url)) from None
        hint = " (pass --cafile to trust its CA)"
        if not isinstance(cause, ssl.SSLCertVerificationError):
            hint = ""
        raise CliError(f"TLS handshake with {host}:{port} failed: {cause}{hint}") from None
    finally:
        with trio.move_on_after(1, shield=True):
            await stream.aclose()
