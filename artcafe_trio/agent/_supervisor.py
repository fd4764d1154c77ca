"""The connection supervisor: dial → handshake → serve → back off → retry.

With several hub URLs (configured, then advertised by the hubs' ``welcome``), one
*attempt* is a round: each URL still in use tried once, in order, starting from the
one that last connected, until one connects. The backoff sleeps between rounds, and
``max_reconnect_attempts`` counts rounds (one URL: one round is one connection
attempt, as before). A permanent failure of one URL (HTTP 404, a TLS problem) drops
that URL; it ends the agent only when no URL is left.

It owns the agent's :class:`AgentState` (one method changes it), the current
:class:`Session`, and the ACK watchdog: the connection nursery's cancel-scope deadline,
moved by every heartbeat ACK. A connection ends with the error that ended it:
:class:`ConnectTimeout` (no welcome in time), :class:`HeartbeatTimeout` (the watchdog
fired), :class:`SessionReplaced` (4003: never retried), :class:`ConnectionLost`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, WebSocketConnection

from .._errors import (
    AgentClosed,
    AuthenticationError,
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    HeartbeatTimeout,
    HubError,
    LocalProtocolError,
    ReconnectFailed,
    RemoteProtocolError,
    SessionReplaced,
)
from .._logsafe import printable
from .._util import collapse_exception_groups
from ..protocol._frames import Leave, encode
from ..protocol.client import AgentCredentials, ClientConnection, IdAllocator
from ._config import AgentConfig
from ._connfail import connect_failed
from ._health import AgentState, HealthStats
from ._outbox import Outbox
from ._session import Session, lost
from ._subscriptions import Subscriptions
from ._transport import (
    CLOSE_PATIENCE,
    MAX_RECEIVE_BYTES,
    Transports,
    cancelled_here,
    close_websocket,
)
from ._urls import HubUrls

__all__ = ["Supervisor"]

log = logging.getLogger("artcafe_trio.agent")

_CONNECTION_ERRORS = (
    ConnectionLost,
    OSError,
    trio_websocket.HandshakeError,
    trio.BrokenResourceError,
    ConnectionClosed,  # a safety net: converted to ConnectionLost where raised
)


class Supervisor:
    """Keeps the agent connected; see the module docstring."""

    def __init__(
        self,
        config: AgentConfig,
        credentials: AgentCredentials,
        transports: Transports,
        *,
        ids: IdAllocator,
        outbox: Outbox,
        subscriptions: Subscriptions,
        stats: HealthStats,
        rng: random.Random,
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.ids = ids
        self.outbox = outbox
        self.subscriptions = subscriptions
        self.stats = stats
        self.rng = rng
        self.on_reconnect: list[Callable[[], object]] = []
        self.state = AgentState.NOT_STARTED
        self.session: Session | None = None
        self.closing = False  # the agent closes: no reconnect; tasks park on a closed socket
        self.connected = trio.Event()
        self.ever_connected = trio.Event()
        self._last_proved_healthy = False
        self.urls = HubUrls(config.urls, transports)

    def set_state(self, state: AgentState) -> None:
        """The one place the agent's state changes."""
        if self.state is AgentState.CLOSED:
            return  # final
        self.state = state

    def close(self) -> None:
        """The agent stops: no more reconnects; wake ``wait_connection()`` callers."""
        self.closing = True
        self.connected.set()

    async def unless_closing(self) -> None:
        """While the agent closes its own connection, park the task instead of failing:
        the connection must live until the close handshake completes."""
        if self.closing:
            await trio.sleep_forever()

    async def wait_connection(self) -> Session:
        while self.session is None:
            if self.closing:
                raise AgentClosed("the agent is stopped")
            await self.connected.wait()
        return self.session

    # --- the loop ------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def run(self) -> None:
        try:
            await self._supervise()
        finally:
            self.set_state(AgentState.CLOSED)

    async def _supervise(self) -> None:
        config, stats = self.config, self.stats
        loss_started: float | None = None
        last_cause: BaseException | None = None
        delays = config.backoff.delays(self.rng)
        while True:
            if self.ever_connected.is_set():
                self.set_state(AgentState.RECONNECTING)
            cause = await self._round()
            if self.closing:
                return
            if isinstance(cause, SessionReplaced):
                # Another process connected with this agent id. Reconnecting would take
                # the id back from it, and both would flap forever: stop, loudly.
                log.error(
                    "%s/%s: replaced by a newer session with the same agent id; stopping",
                    config.tenant_id,
                    config.agent_id,
                )
                raise cause
            if self._last_proved_healthy:
                self._last_proved_healthy = False
                stats.failures = 0
                delays = config.backoff.delays(self.rng)
                loss_started = None
            if loss_started is None:
                loss_started = trio.current_time()
            last_cause = cause
            if not config.auto_reconnect or (
                not config.retry_first_connect and not self.ever_connected.is_set()
            ):
                self.set_state(AgentState.CLOSED)
                if isinstance(cause, ConnectionLost):
                    raise cause
                raise ConnectionLost(f"connection failed: {cause!r}") from cause
            delay = next(delays, None)
            if delay is None:
                self.set_state(AgentState.CLOSED)
                raise ReconnectFailed(
                    stats.failures, trio.current_time() - loss_started, last_cause
                ) from last_cause
            stats.failures += 1
            self._log_retry(cause, delay)
            stats.next_retry_at = trio.current_time() + delay
            await trio.sleep(delay)
            stats.next_retry_at = None

    def _log_retry(self, cause: BaseException, delay: float) -> None:
        config = self.config
        # A failed attempt was never connected: nothing was lost, it says what failed.
        what = str(cause) if isinstance(cause, ConnectFailed) else f"connection lost ({cause})"
        log.warning(
            "%s/%s: %s; %s %d%s in %.2f s",
            config.tenant_id,
            config.agent_id,
            printable(what, 500),
            "reconnect attempt" if self.ever_connected.is_set() else "retry",
            self.stats.failures,
            f"/{config.backoff.max_attempts}" if config.backoff.max_attempts else "",
            delay,
        )

    async def _round(self) -> BaseException:
        """One attempt (see the module docstring): what ended the connection, or the
        last failure. Raises what no URL left can get past."""
        cause: BaseException | None = None
        for url in self.urls.round():
            try:
                await self._run_connection(url)
            except AuthenticationError as exc:
                if exc.code != "hub_certificate_invalid":
                    raise  # the hubs refused the key: no other hub takes it
                cause = exc
            except _CONNECTION_ERRORS as exc:
                cause = exc
            assert cause is not None
            if self.closing:
                return cause
            if isinstance(cause, AuthenticationError) or (
                isinstance(cause, ConnectFailed) and cause.permanent
            ):
                self._drop(url, cause)  # it would fail the same way again
                continue
            if isinstance(cause, ConnectFailed):
                continue  # the next URL, in this round
            return cause  # connected, then lost: the round ends
        assert cause is not None  # a round has at least one URL
        return cause

    def _drop(self, url: str, cause: BaseException) -> None:
        self.urls.dropped.add(url)
        if not self.urls.round():
            self.set_state(AgentState.CLOSED)
            raise cause  # the last URL failed permanently: never retried
        config = self.config
        log.error(
            "%s/%s: %s; not trying %s again",
            config.tenant_id,
            config.agent_id,
            printable(str(cause), 500),
            url,
        )

    # --- one connection ------------------------------------------------------------

    async def _run_connection(self, url: str) -> None:
        """One connection to ``url`` from dial to loss. Always raises what ended it."""
        box: list[Session] = []
        cause: BaseException
        try:
            await self._connection_nursery(url, box)
            cause = _why_it_ended(box[0])  # no error: its cancel scope was cancelled
        except _CONNECTION_ERRORS as exc:
            if not box:  # no welcome: this attempt failed, nothing was lost
                raise connect_failed(exc, url) from exc
            cause = exc
        self.stats.lost_because(cause)
        raise cause

    async def _connection_nursery(self, url: str, box: list[Session]) -> None:
        """Dial, handshake and serve one connection; ``box`` gets it once welcomed."""
        config = self.config
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(config.connect_timeout) as connect_scope:
                    transport = self.urls.transport(url)
                    ws = await transport.connect(nursery, config.resource)
                    try:
                        client = await self._handshake(ws)
                    except BaseException:
                        await close_websocket(ws, patience=0)  # and the socket, at once
                        raise
                if connect_scope.cancelled_caught:
                    raise ConnectTimeout(
                        f"cannot connect to {url}: no welcome from the hub within "
                        f"{config.connect_timeout:g} s",
                        url=url,
                        timeout=config.connect_timeout,
                    )
                session = Session(ws, client, nursery.cancel_scope, self, url)
                box.append(session)
                self.urls.connected(url, client.connect_urls)
                try:
                    await self._serve(nursery, session)
                finally:
                    self.session = None
                    self.connected = trio.Event()
                    self.stats.disconnected(None if not self.closing else "agent stopped")
                    session.ended()
                    self._last_proved_healthy = session.proved_healthy
                    if not self.closing:
                        self.set_state(AgentState.RECONNECTING)
                    # A hub judged unresponsive gets no time for a close handshake. If this
                    # task is cancelled, so is the reader: no reply to the close is read.
                    patience = 0 if _watchdog_fired(session) else CLOSE_PATIENCE
                    code, gone = (1000 if self.closing else 1001), cancelled_here()
                    await close_websocket(
                        ws, code, "agent reconnecting", patience=patience, reader_gone=gone
                    )

    async def _receive_text(self, ws: WebSocketConnection) -> str | bytes:
        try:
            return await ws.get_message()
        except ConnectionClosed as exc:
            await self.unless_closing()
            raise lost(exc) from None

    async def _handshake(self, ws: WebSocketConnection) -> ClientConnection:
        """Challenge → signed auth → welcome, through a fresh :class:`ClientConnection`."""
        client = ClientConnection(
            self.credentials,
            ids=self.ids,
            max_receive_bytes=MAX_RECEIVE_BYTES,
            rtt_smoothed=self.stats.rtt_smoothed,
        )
        try:
            client.receive(await self._receive_text(ws), trio.current_time())
            try:
                await ws.send_message(client.auth())
            except ConnectionClosed as exc:
                raise lost(exc) from None
            client.receive(await self._receive_text(ws), trio.current_time())
        except RemoteProtocolError as exc:
            raise ConnectionLost(exc.message) from exc
        except HubError as exc:
            raise ConnectionLost(f"hub error during handshake: {exc.code}: {exc.message}") from exc
        return client

    async def _serve(self, nursery: trio.Nursery, session: Session) -> None:
        config, stats = self.config, self.stats
        attempts = stats.failures
        if session.client.ack_deadline is not None:
            session.scope.deadline = session.client.ack_deadline
        else:
            session.proved_healthy = True  # no heartbeats: the welcome is all the proof
            stats.failures = 0
        nursery.start_soon(session.receiver)
        # Restore, in order: subscriptions (confirmed), waiting publishes, callbacks,
        # heartbeats.
        await session.confirm_subscriptions()
        self.outbox.restart()
        nursery.start_soon(session.sender)
        nursery.start_soon(session.subscriber)
        self.session = session
        stats.connected_since_wall = stats.wall_clock()
        self.set_state(AgentState.CONNECTED)
        self.connected.set()
        reconnected = self.ever_connected.is_set()
        self.ever_connected.set()
        if reconnected:
            stats.total_reconnects += 1
        _log_connected(self.config, session, attempts, reconnected)
        if reconnected:
            for callback in list(self.on_reconnect):
                what = f"on_reconnect callback {callback!r}"
                await self.subscriptions.call(callback, (), what)
        interval = session.welcome.heartbeat_interval
        if interval is not None:
            await session.heartbeat(interval, config.heartbeat_jitter, self.rng)
        else:
            await trio.sleep_forever()

    async def leave(self) -> None:
        """Send ``leave`` and close with 1000 (the hub then reports ``left``)."""
        session = self.session
        if session is None:
            return
        try:
            text = session.client.leave("agent stopped")
        except LocalProtocolError:  # not open any more
            text = encode(Leave(reason="agent stopped"))
        try:
            await session.ws.send_message(text)
            await session.ws.aclose(1000, "agent stopped")
        except ConnectionClosed:
            pass


def _watchdog_fired(session: Session) -> bool:
    return trio.current_time() >= session.scope.deadline


def _why_it_ended(session: Session) -> ConnectionLost:
    """What ended a connection whose nursery was cancelled, not failed."""
    if _watchdog_fired(session):
        timeout = session.welcome.heartbeat_timeout
        assert timeout is not None  # the watchdog only has a deadline with a timeout
        return HeartbeatTimeout(timeout)
    return ConnectionLost("connection closed")


def _log_connected(config: AgentConfig, session: Session, attempts: int, reconnected: bool) -> None:
    if attempts:  # the failures were warnings: so is the recovery
        log.warning(
            "%s/%s %s after %d attempt%s (session %s)",
            config.tenant_id,
            config.agent_id,
            "reconnected" if reconnected else "connected",
            attempts,
            "" if attempts == 1 else "s",
            session.session_id,
        )
    else:
        log.info(
            "%s/%s connected (session %s)",
            config.tenant_id,
            config.agent_id,
            session.session_id,
        )
