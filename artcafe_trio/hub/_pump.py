"""The connection pump: one WebSocket ↔ one sans-IO :class:`ServerConnection`.

:func:`serve_connection` runs one accepted WebSocket to its end: the handshake
(challenge, the first frame judged by the :class:`~._auth.Authenticator`, welcome or
refusal), then the session: a reader that feeds each message to the connection inline
and acts on its event (no task per frame), and a writer task.

Where the socket allows writes that never wait (plain TCP on POSIX), a frame is
written by the task that queued it, at once: no writer wake-up, no checkpoint. A
reader defers what it queues, for others and for its own connection, until it has
worked through the bytes it received (or for ``HOLD_LIMIT``), so a burst is one write
per receiver. What the socket does not take is handed to the connection's writer
task, which finishes it (bounded by ``write_stall_timeout``) and writes what was
queued meanwhile. Elsewhere (TLS, memory streams) the writer sends the
:class:`~._flow.Outbox` in batches, one ``send_all`` each, and the reader writes its
connection's answers itself when the writer is idle. Either way one batch is written
at a time (``Outbox.busy``), and a close lets the frame being written finish. The
hub-wide side (session directory, routing, presence) is reached only through
:class:`HubSide`.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio
from trio_websocket import ConnectionClosed

from .._errors import ProtocolError
from .._logsafe import printable as _printable
from ..protocol._codes import CloseCode
from ..protocol._frames import (
    Auth,
    Error,
    Frame,
    Heartbeat,
    PresenceQuery,
    Publish,
    Subscribe,
    Unsubscribe,
    encode,
)
from ..protocol.server import (
    ADMIN_AGENT_ID,
    ConnectionState,
    FrameRefused,
    HeartbeatReceived,
    LeaveRequested,
    PeerError,
    PresenceRequested,
    PublishRequested,
    Refusal,
    ServerConnection,
    ServerEvent,
    ServerLimits,
    SubscribeRequested,
    UnsubscribeRequested,
)
from ._flow import (
    Delivery,
    Outbox,
    OutputBudget,
    PreAuthLimiter,
    PreAuthTicket,
    TokenBucket,
    deferring_writes,
    write_deferred,
)
from ._sessions import Connections, how_it_ended
from ._wsserver import ServerWebSocket, frame_text

if TYPE_CHECKING:
    from ..protocol._keys import PublicKey
    from ._auth import Authenticator
    from ._config import HubConfig, HubStats
    from ._hubevents import HubEvents
    from ._presence import PresenceEntry as _Presence

__all__ = ["HubSide", "serve_connection"]

log = logging.getLogger("artcafe_trio.hub")

WRITE_BATCH_BYTES = 256 * 1024  # about the most one write of a connection's writer sends
HOLD_LIMIT = 0.01  # s: the longest a reader holds back answers and deferred writes


class RefusedLog(Protocol):
    def warning(self, message: str, *args: object) -> None: ...


class HubSide(Protocol):
    """What the pump needs from the hub (the hub-wide components)."""

    config: HubConfig
    stats: HubStats
    events: HubEvents
    output_budget: OutputBudget
    unauthenticated: PreAuthLimiter
    _wall_clock: Callable[[], float]
    _authenticator: Authenticator
    _connections: Connections

    @property
    def _auth_log(self) -> RefusedLog: ...
    @property
    def _refused_log(self) -> RefusedLog: ...

    def _connection_opened(self) -> None: ...
    def _connection_closed(self) -> None: ...
    def _publish_bucket(self, tenant_id: str, agent_id: str) -> TokenBucket: ...
    def _connect_urls(self) -> tuple[str, ...]: ...
    async def _attach(self, session: _Session) -> None: ...
    def _detach(self, session: _Session) -> None: ...
    def _handle_subscribe(self, session: _Session, frame: Subscribe) -> None: ...
    def _handle_unsubscribe(self, session: _Session, frame: Unsubscribe) -> None: ...
    async def _handle_publish(self, session: _Session, frame: Publish) -> None: ...
    def _handle_heartbeat(self, session: _Session, frame: Heartbeat) -> None: ...
    def _handle_presence_query(self, session: _Session, frame: PresenceQuery) -> None: ...
    def _slow_consumer_event(self, session: _Session, reason: str) -> None: ...
    def _heartbeat_timed_out(self, session: _Session) -> None: ...


def limits_of(config: HubConfig) -> ServerLimits:
    """The connection-level subset of the hub's settings."""
    return ServerLimits(
        hub_id=config.hub_id,
        challenge_timeout=config.challenge_timeout,
        min_heartbeat_interval=config.min_heartbeat_interval,
        max_heartbeat_interval=config.max_heartbeat_interval,
        min_timeout_multiplier=config.min_timeout_multiplier,
        max_timeout_multiplier=config.max_timeout_multiplier,
        max_frame_bytes=config.max_frame_bytes,
        max_subscriptions=config.max_subscriptions,
        publish_rate=config.publish_rate,
    )


class _Session:
    """One authenticated connection: its protocol state (``conn``) and its I/O."""

    def __init__(
        self, hub: HubSide, ws: ServerWebSocket, conn: ServerConnection, *, remote: str,
        key: PublicKey | None, bucket: TokenBucket,
    ) -> None:  # fmt: skip
        assert conn.session_id is not None
        self.hub = hub
        self.ws = ws
        self.conn = conn
        self.session_id = conn.session_id
        self.tenant_id = conn.tenant_id
        self.agent_id = conn.agent_id
        self.remote = remote
        self.key = key
        claim = conn.claim
        self.capabilities = claim.capabilities if isinstance(claim, Auth) else ()
        self.metadata = dict(claim.metadata) if isinstance(claim, Auth) else {}
        self.heartbeat_interval = conn.heartbeat_interval
        self.heartbeat_timeout = conn.heartbeat_timeout
        self.is_admin = conn.is_admin
        self.subscriptions = conn.subscriptions  # the same set: the hub indexes it
        self.bucket = bucket
        config = hub.config
        self.outbox = Outbox(
            hub.output_budget,
            max_frames=config.send_queue_size,
            max_bytes=config.send_queue_bytes,
            reply_window=config.reply_window,
            reply_window_bytes=config.reply_window_bytes,
            on_overflow=self._cut_off,
        )
        self.open_requests: dict[str, None] = {}  # its $reply subjects awaiting an answer
        self.scope = trio.CancelScope()
        self.reader_scope = trio.CancelScope()
        # I/O state only (the protocol state is ``conn.state``):
        self.reading = True  # the reader has not ended
        self.writing = False  # a batch is being written (by the writer or the reader)
        self.reader_writing = False  # ... by the reader: a close lets it finish
        self.draining = False  # closing after what is queued is written
        self.timed_out = False  # set by the presence side
        self.ended = False  # detached from the hub
        self.presence: _Presence | None = None  # its presence row, set when attached
        self.writer_alive = False  # its writer task runs (finishes writes handed off)
        if ws.writes_without_waiting:
            self.outbox.write_now = self._write_now
        ws.on_pong = self._pong
        self.last_frame_wall = 0.0
        now = trio.current_time()
        timeout = self.heartbeat_timeout
        self.deadline = now + timeout if timeout is not None else math.inf

    def __repr__(self) -> str:
        return f"<session {self.session_id} {self.tenant_id}/{self.agent_id} from {self.remote}>"

    @property
    def closing(self) -> bool:
        return self.conn.closing

    @property
    def left(self) -> bool:
        return self.conn.left

    @property
    def close_code(self) -> int:
        return self.conn.close_code if self.conn.close_code is not None else CloseCode.NORMAL

    @property
    def close_reason(self) -> str:
        return self.conn.close_reason

    def send_frame(self, frame: Frame) -> None:
        """Queue an answer to this connection's own frame (bounded by back-pressure)."""
        if not self.closing:
            self.outbox.reply(encode(frame))

    def deliver(self, item: Delivery) -> None:
        """Queue a delivery; a consumer over its limits is cut off (never blocks the caller)."""
        if not self.closing:
            self.outbox.deliver(item)

    def _pong(self, frame: bytes) -> None:
        """A pong, queued like a delivery: written soon even on an idle connection, and a
        peer that pings without reading is cut off like any slow consumer."""
        self.deliver(Delivery(frame))
        # Its reader may not return from get_message (pings only) to write what it
        # deferred: write it now.
        write_deferred()

    def admit_publish(self, frame: Publish) -> str:
        """The publish's data as JSON, after the rate limit (``ProtocolError`` if refused)."""
        try:
            return self.conn.admit_publish(frame, trio.current_time())
        except ProtocolError as exc:
            if exc.code == "rate_limited":
                self.hub.stats.rate_limited += 1
            raise

    def _cut_off(self, reason: str) -> None:
        self.hub.stats.slow_consumers += 1
        self.hub._slow_consumer_event(self, reason)
        log.warning("%r: cutting off slow consumer: %s", self, reason)
        self.close(CloseCode.SLOW_CONSUMER, reason)

    def close(self, code: int, reason: str, *, drain: bool = False) -> None:
        """End the session with ``code``. A frame being written is finished first (within
        ``close_timeout``): cutting one in half would corrupt the stream, and the peer
        would never see the close code. With ``drain`` (a graceful shutdown), every
        frame already queued is sent too, within the same bound: a delivery the hub
        confirmed to its publisher is not dropped."""
        if self.conn.close(code, reason):
            if drain:
                self.draining = True
                self.outbox.close()  # the writer ends once the queue is empty
            else:
                self.outbox.discard()  # never to be written: free it now
        if not self.reader_writing:
            self.reader_scope.cancel()
        # else: the reader finishes its frame (within close_timeout, see _bound_writer)
        # and then sees the connection closing.
        self._bound_writer()

    def _bound_writer(self) -> None:
        """Reading is over: let the writer finish within ``close_timeout``, or stop it."""
        if self.writing or self.draining:
            deadline = trio.current_time() + self.hub.config.close_timeout
            self.scope.deadline = min(self.scope.deadline, deadline)
        else:
            self.scope.cancel()

    def may_write(self) -> bool:
        return self.draining or (self.reading and not self.closing)

    def _write_now(self) -> None:
        """Write what is queued at once, from the task that queued it, as far as the
        socket takes it without waiting; the writer task finishes the rest (and sends
        whatever is queued meanwhile). No task wake-up, no checkpoint: the hot path."""
        outbox = self.outbox
        if not (self.writer_alive and self.may_write()):
            return  # not yet attached, or ending: the writer (if any) decides
        batch = outbox.take_nowait(WRITE_BATCH_BYTES)
        if not batch:
            return
        try:
            done = self.ws.send_frames_nowait(_framed(batch))
        except ConnectionClosed:
            outbox.sent(batch)
            self.scope.cancel()  # the peer is gone: the session ends
            return
        if done:
            outbox.sent(batch)
        else:
            outbox.hand_off(batch)

    def owned_presence(self) -> _Presence | None:
        """Its presence row, while this session is the one that row belongs to."""
        entry = self.presence
        return entry if entry is not None and entry.session is self else None

    def touch(self, now: float) -> None:
        if self.heartbeat_timeout is not None:
            self.deadline = now + self.heartbeat_timeout

    def expire(self, now: float) -> float | None:
        """DeadlineQueue callback: the heartbeat deadline came due."""
        if self.closing or self.ended:
            return None
        if self.deadline > now:
            return self.deadline
        if self.reader_writing and self.heartbeat_timeout is not None:
            # The reader is in a write of this connection's own (bounded by
            # write_stall_timeout), not reading: its heartbeats may be waiting unread.
            self.deadline = now + self.heartbeat_timeout
            return self.deadline
        self.hub._heartbeat_timed_out(self)
        return None


async def serve_connection(
    hub: HubSide,
    ws: ServerWebSocket,
    agent_id: str | None,
    tenant_id: str | None,
    remote: str,
    ticket: PreAuthTicket | None,
) -> None:
    """Serve one accepted WebSocket (``agent_id`` ``None``: the admin path) to its end."""
    conn = ServerConnection(
        limits_of(hub.config), agent_id=agent_id, tenant_id=tenant_id,
        nonce=secrets.token_urlsafe(32),
    )  # fmt: skip
    hub._connection_opened()
    try:
        session = await _handshake(hub, ws, conn, remote)
        if session is not None:
            if ticket is not None:
                hub.unauthenticated.release(ticket)
            await _run_session(hub, session)
    finally:
        # The only close of a connection, always bounded: a peer that never answers
        # the close handshake cannot hold a hub task. One closed to make room for
        # newer unauthenticated connections is dropped at once (its socket closes).
        code = conn.close_code if conn.close_code is not None else CloseCode.NORMAL
        try:
            if ticket is None or not ticket.scope.cancel_called:
                with trio.CancelScope(shield=True), trio.move_on_after(hub.config.close_timeout):
                    await ws.aclose(code, conn.close_reason)
        finally:
            conn.connection_closed()
            hub._connection_closed()


async def _handshake(
    hub: HubSide, ws: ServerWebSocket, conn: ServerConnection, remote: str
) -> _Session | None:
    """Challenge, then judge the answer: the session, or ``None`` once refused (the
    error frame sent). The whole check (waiting for the frame, the slow-down, the
    registry) is bounded by the challenge's expiry: past it, ``challenge_expired``/4002."""
    await ws.send_message(conn.challenge(trio.current_time()))
    assert conn.challenge_deadline is not None
    outcome = None
    with trio.move_on_at(conn.challenge_deadline):
        with hub._connections.awaiting_auth() as stop:
            text = await ws.get_message()
        if not stop.cancelled_caught:
            outcome = await hub._authenticator.authenticate(conn, text, remote, trio.current_time())
    if hub._connections.stopping and not isinstance(outcome, Refusal):
        # The hub began to stop during the handshake: no session now (the shutdown's
        # close of every session is past), the agent retries elsewhere or later.
        conn.close(CloseCode.SERVICE_RESTART, "hub shutting down")
        return None
    if outcome is None:
        expired = conn.expire(trio.current_time())
        assert expired is not None  # the deadline has passed
        await ws.send_message(expired)
        return None
    if isinstance(outcome, Refusal):
        await _refuse(hub, ws, conn, remote, outcome)
        return None
    claim = conn.claim
    connect_urls: tuple[str, ...] = ()
    if isinstance(claim, Auth):
        tenant, agent = claim.tenant_id, claim.agent_id
        connect_urls = hub._connect_urls()  # where the agent may fail over
    else:
        tenant, agent = "*", ADMIN_AGENT_ID
    bucket = hub._publish_bucket(tenant, agent)
    session_id = "s-" + secrets.token_hex(8)
    welcome = conn.accept(
        session_id=session_id,
        hub_time=hub._wall_clock(),
        bucket=bucket,
        connect_urls=connect_urls,
    )
    session = _Session(hub, ws, conn, remote=remote, key=outcome.key, bucket=bucket)
    session.outbox.reply(welcome)
    return session


async def _refuse(
    hub: HubSide, ws: ServerWebSocket, conn: ServerConnection, remote: str, refusal: Refusal
) -> None:
    """Count and log a refused handshake, then send its fatal error frame."""
    hub.stats.auth_failures += 1
    hub._auth_log.warning(
        "authentication refused for %s from %s: %s (%s)",
        refusal.who, _printable(remote), refusal.code, refusal.cause,
    )  # fmt: skip
    failures = hub._authenticator.throttle.failures(remote)
    hub.events.auth_failure(remote, refusal.code, failures, hub._wall_clock())
    await ws.send_message(conn.refuse(refusal))


async def _run_session(hub: HubSide, session: _Session) -> None:
    # Admin sessions (``status``: one query, then close) are routine: DEBUG.
    level = logging.DEBUG if session.is_admin else logging.INFO
    log.log(level, "%r connected", session)
    try:
        await hub._attach(session)
        with session.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_writer, session)
                with session.reader_scope:
                    await _reader(hub, session)
                # Reading is over (peer gone, left, or closed by the hub): the writer
                # may finish the frame it is writing, within close_timeout, no more.
                session.reading = False
                session._bound_writer()
    finally:
        hub._detach(session)
        closed = (session.close_code, session.close_reason) if session.closing else None
        log.log(level, "%r %s", session, how_it_ended(closed, session.ws.closed))


def _framed(batch: list[str | Delivery]) -> bytes:
    """A batch's bytes for one write: answers framed now, deliveries as they were framed
    once for every receiver."""
    return b"".join(frame_text(entry) if isinstance(entry, str) else entry.frame for entry in batch)


async def _write_batch(
    session: _Session, batch: list[str | Delivery], *, by_reader: bool, handed_off: bool = False
) -> bool:
    """Write ``batch`` (taken from the outbox) in one send, bounded by
    ``write_stall_timeout``, and account for it, written or not. ``True`` when the write
    stalled: the connection is cut off (4004). ``handed_off``: a write that never waits
    began the batch; only its rest (kept by the WebSocket) is sent."""
    outbox = session.outbox
    data = b"" if handed_off else _framed(batch)
    size = session.ws.unsent_bytes + len(data)  # what this write sends, for a stall's reason
    stall_timeout = session.hub.config.write_stall_timeout
    session.writing, session.reader_writing = True, by_reader
    try:
        with trio.move_on_after(stall_timeout) as stall:
            await session.ws.send_frames(data)
    finally:
        session.writing = session.reader_writing = False
        outbox.sent(batch)
    if stall.cancelled_caught and not session.closing:
        outbox.stalled(size, stall_timeout)
        return True
    return False


async def _writer(session: _Session) -> None:
    outbox = session.outbox
    session.writer_alive = True
    try:
        while session.may_write():
            batch = await outbox.take(WRITE_BATCH_BYTES)
            if not batch:
                break
            if not session.may_write():
                outbox.sent(batch)  # not written, released all the same (budget, busy)
                break
            if await _write_batch(session, batch, by_reader=False, handed_off=outbox.handed_off):
                break
    except ConnectionClosed:
        pass
    finally:
        session.writer_alive = False
        session.writing = False
        outbox.drop_handed_off()  # its rest is never written now (aclose may finish it)
        session.scope.cancel()


async def _reader(hub: HubSide, session: _Session) -> None:
    try:
        await _read(hub, session)
    finally:
        session.outbox.release()  # whatever is still held back goes to the writer


async def _write_answers(session: _Session) -> None:
    """The reader writes what its connection's frames produced, itself, when the writer
    is idle: no writer wake-up per answer. Otherwise the writer is woken for it."""
    outbox = session.outbox
    if outbox.write_now is not None:
        outbox.release()  # written at once (or by the writer, if the socket is full)
        return
    batch = outbox.take_nowait(WRITE_BATCH_BYTES)
    if not batch:
        outbox.release()
        return
    outbox.hold = False
    await _write_batch(session, batch, by_reader=True)


async def _read(hub: HubSide, session: _Session) -> None:
    with deferring_writes() as deferred:  # what it queues for others, written per burst
        await _read_frames(hub, session, deferred)


async def _read_frames(hub: HubSide, session: _Session, deferred: list[Outbox]) -> None:
    ws, conn, outbox = session.ws, session.conn, session.outbox
    held_since = 0.0
    while conn.state is ConnectionState.OPEN:
        if not ws.has_message():
            # About to wait for the peer: write what the burst queued for others,
            # then this connection's answers.
            if deferred:
                write_deferred(deferred)
            if outbox.hold:
                try:
                    await _write_answers(session)
                except ConnectionClosed:
                    return
                if conn.state is not ConnectionState.OPEN:
                    return  # closed while writing
        # Back-pressure: answers to this connection's own frames that it has not read
        # yet pause reading it; they never count against it as a slow consumer.
        if outbox.reply_window_full:
            outbox.release()
            write_deferred(deferred)  # what it queued for others does not wait with it
            await outbox.wait_for_reply_window()
        try:
            text = await ws.get_message()
        except ConnectionClosed:
            return
        if conn.state is not ConnectionState.OPEN:
            return  # closed while waiting (by the hub, or another task)
        now = trio.current_time()
        if not outbox.hold:
            outbox.hold, held_since = True, now
        elif now - held_since >= HOLD_LIMIT:
            # A long burst (publishes waiting for the backplane, say): what it queued
            # is written now, not when the reader is done with the burst.
            outbox.release()
            write_deferred(deferred)
            held_since = now
        session.touch(now)
        session.last_frame_wall = hub._wall_clock()
        entry = session.owned_presence()
        if entry is not None:
            entry.last_seen = session.last_frame_wall
        event = conn.receive_text(text, now)
        try:
            if isinstance(event, PublishRequested):  # the hot path: no extra coroutine
                await hub._handle_publish(session, event.frame)
            else:
                _act(hub, session, event)
        except ProtocolError as exc:  # refused hub-wide (or by the rate limit)
            frame_id = event.frame.id if isinstance(event, PublishRequested) else None
            _refused(hub, session, conn.refusal(exc, frame_id).error)


def _act(hub: HubSide, session: _Session, event: ServerEvent) -> None:
    """Carry out one event (other than a publish) of an open connection."""
    if isinstance(event, HeartbeatReceived):
        hub._handle_heartbeat(session, event.frame)
    elif isinstance(event, SubscribeRequested):
        hub._handle_subscribe(session, event.frame)
    elif isinstance(event, UnsubscribeRequested):
        hub._handle_unsubscribe(session, event.frame)
    elif isinstance(event, PresenceRequested):
        hub._handle_presence_query(session, event.frame)
    elif isinstance(event, LeaveRequested):
        session.close(CloseCode.NORMAL, "left")
    elif isinstance(event, PeerError):
        log.info(
            "%r reported error %s: %s", session, _printable(event.code), _printable(event.message)
        )
    elif isinstance(event, FrameRefused):
        _refused(hub, session, event.error)


def _refused(hub: HubSide, session: _Session, error: Error) -> None:
    hub.stats.refused_frames += 1
    hub._refused_log.warning(
        "%r: refused frame: %s", session, _printable(f"{error.code}: {error.message}")
    )
    session.send_frame(error)
