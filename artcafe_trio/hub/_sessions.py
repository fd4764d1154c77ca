"""The session directory (which session is each agent's live one: take-over) and the
hub's connection count.

:class:`Session` is the meeting point with the per-connection side: exactly what the
hub-wide components (directory, router, presence table, registry watch) use of a
connection's session.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..protocol._codes import CloseCode
from ..protocol._frames import Frame, Publish
from ..protocol._keys import PublicKey
from ._config import HubStats
from ._flow import Delivery, TokenBucket
from ._hubevents import HubEvents

if TYPE_CHECKING:
    from trio_websocket import CloseReason

    from ._presence import PresenceEntry

__all__ = ["Connections", "Session", "SessionDirectory", "how_it_ended"]

log = logging.getLogger("artcafe_trio.hub")


class Session(Protocol):
    """An authenticated connection, as the hub-wide components see it."""

    tenant_id: str  # "*" for the admin channel
    agent_id: str
    session_id: str
    is_admin: bool
    key: PublicKey | None  # the key it authenticated with (None: admin)
    capabilities: tuple[str, ...]
    metadata: dict[str, Any]
    heartbeat_interval: float | None
    heartbeat_timeout: float | None
    deadline: float  # heartbeat deadline (trio clock); moves later on every frame
    subscriptions: set[str]  # its patterns (the router keeps them in the index)
    open_requests: dict[str, None]  # its $reply subjects awaiting an answer (router)
    presence: PresenceEntry | None  # its presence row, set when attached (presence table)
    timed_out: bool  # its heartbeat deadline passed
    bucket: TokenBucket  # its agent's publish rate bucket (BucketStore)

    @property
    def left(self) -> bool:
        """It sent ``leave``."""

    def __hash__(self) -> int: ...  # a key of the subject index and the admin set

    def deliver(self, item: Delivery) -> None:
        """Queue a delivery (never blocks; a slow consumer is cut off)."""

    def send_frame(self, frame: Frame) -> None:
        """Queue an answer to one of its own frames."""

    def close(self, code: int, reason: str, *, drain: bool = False) -> None:
        """End the session with ``code`` (``drain``: send what is queued first)."""

    def admit_publish(self, frame: Publish) -> str:
        """The connection's rate limit and one-time encoding of ``frame.data`` (its
        ``ServerConnection``): the data JSON, or a refusal (``ProtocolError``)."""

    def owned_presence(self) -> PresenceEntry | None:
        """Its presence row while it is the session that row belongs to."""

    def expire(self, now: float) -> float | None:
        """Deadline-queue callback for its heartbeat deadline."""


_NO_CLOSE_FRAME = 1006  # RFC 6455: the connection ended without a close frame


def how_it_ended(hub_close: tuple[int, str] | None, peer_close: CloseReason | None) -> str:
    """How a session ended, for the hub's log (after ``<session ...>``).

    ``hub_close``: the hub's close ``(code, reason)`` if the hub closed it (``leave``
    included). ``peer_close``: the WebSocket's close reason (a ``CloseReason`` with
    ``code`` and ``reason``; ``None`` while open). A close frame from the client (a
    one-shot ``status`` sends 1000) is a clean close; no close frame (1006: the TCP
    connection dropped, or a write failed) is a lost connection.
    """
    if hub_close is not None:
        code, reason = hub_close
        return f"closed: {code} {reason}"
    if peer_close is None or peer_close.code == _NO_CLOSE_FRAME:
        return "connection lost"
    reason = f" {peer_close.reason}" if peer_close.reason else ""
    return f"closed by the client ({peer_close.code}{reason})"


class SessionDirectory:
    """Every authenticated session by id, each agent's live one, and the admins.

    Take-over: the newest session of an agent wins; the older one is closed with
    ``CloseCode.REPLACED`` and, no longer live, changes no presence when it ends.
    """

    def __init__(self, events: HubEvents, stats: HubStats, wall_clock: Callable[[], float]):
        self._events = events
        self._stats = stats
        self._wall_clock = wall_clock
        self._live: dict[tuple[str, str], Session] = {}
        self._by_id: dict[str, Session] = {}
        self._admins: set[Session] = set()

    def __len__(self) -> int:
        return len(self._by_id)

    def live(self, tenant_id: str, agent_id: str) -> Session | None:
        """The agent's live session, if it has one on this hub."""
        return self._live.get((tenant_id, agent_id))

    def find(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def agent_sessions(self) -> Iterator[Session]:
        """The live sessions of agents (not the admins), a snapshot."""
        return iter(list(self._live.values()))

    def attach(self, session: Session) -> Session | None:
        """Register ``session``; make it its agent's live one. Returns the session it
        replaced (already closed with 4003), if any."""
        self._by_id[session.session_id] = session
        if session.is_admin:
            self._admins.add(session)
            return None
        key = (session.tenant_id, session.agent_id)
        older = self._live.get(key)
        self._live[key] = session
        if older is not None:
            log.info("%r replaced by %s", older, session.session_id)
            older.close(CloseCode.REPLACED, f"replaced by a newer session {session.session_id}")
        replaced = older.session_id if older is not None else None
        interval = session.heartbeat_interval
        self._events.attached(*key, session.session_id, replaced, interval, self._wall_clock())
        return older

    def detach(self, session: Session) -> bool:
        """Forget a finished session; return whether it was its agent's live one (then
        it owned presence: the caller ends it)."""
        self._by_id.pop(session.session_id, None)
        if session.is_admin:
            self._admins.discard(session)
            return False
        key = (session.tenant_id, session.agent_id)
        if self._live.get(key) is not session:
            return False  # replaced: the newer session owns presence
        del self._live[key]
        return True

    def claimed_elsewhere(self, tenant_id: str, agent_id: str, session_id: str) -> None:
        """Another hub's session ``session_id`` took the agent over: close ours as
        replaced; it is no longer live, so its end changes no presence."""
        session = self._live.pop((tenant_id, agent_id), None)
        if session is not None:
            log.info("%r replaced by %s on another hub", session, session_id)
            session.close(CloseCode.REPLACED, f"replaced by a newer session {session_id}")

    def copy_to_admins(self, pattern: str, item: Delivery) -> None:
        """Deliver ``item`` to every admin session subscribed to ``pattern``."""
        for admin in self._admins:
            if pattern in admin.subscriptions:
                self._stats.deliveries += 1
                admin.deliver(item)

    def close_all(self, code: int, reason: str) -> None:
        """Close every session (admins too), after what is queued for it."""
        for session in list(self._by_id.values()):
            session.close(code, reason, drain=True)


class Connections:
    """The hub's open connections: counted so that a shutdown can wait for them, and the
    nursery new ones run in. ``url``/``port``: where the listeners are (``None``: none)."""

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        self.url: str | None = None
        self.port: int | None = None
        self.stopping = False
        self._open = 0
        self._gone = trio.Event()
        self._awaiting_auth: set[trio.CancelScope] = set()

    def __len__(self) -> int:
        return self._open

    def opened(self) -> None:
        self._open += 1

    @contextlib.contextmanager
    def awaiting_auth(self) -> Iterator[trio.CancelScope]:
        """A scope around a connection's wait for its auth frame, cancelled by
        :meth:`stop`: a shutdown does not wait out a challenge nobody answers."""
        with trio.CancelScope() as scope:
            if self.stopping:
                scope.cancel()
            self._awaiting_auth.add(scope)
            try:
                yield scope
            finally:
                self._awaiting_auth.discard(scope)

    def stop(self) -> None:
        """No new connection is served; waits for an auth frame end at once."""
        self.stopping = True
        for scope in self._awaiting_auth:
            scope.cancel()

    def closed(self) -> None:
        self._open -= 1
        if not self._open:
            self._gone.set()

    async def wait_closed(self) -> None:
        """Return once no connection is open."""
        while self._open:
            self._gone = trio.Event()
            await self._gone.wait()
