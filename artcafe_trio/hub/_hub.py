"""The :class:`Hub` facade over the hub's components.

``serve_hub`` (for ``nursery.start``) and ``open_hub`` (an async context
manager), in ``_serve``, compose the components and run a :class:`Hub` over TCP
(ws:// or wss://); ``Hub.serve_stream`` serves one more connection over any byte
stream (the test kit's in-memory pairs).

Each connection is driven by the pump (``_pump.serve_connection``: one WebSocket and
one sans-IO ``ServerConnection``); the pump reaches the hub-wide side only through
the small set of methods of :class:`Hub` it names in ``_pump.HubSide``, which hand
each event to its component (session directory, router, presence table).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import trio
from trio_websocket import ConnectionClosed

from ..protocol._codes import CloseCode
from ..protocol._frames import (
    Heartbeat,
    HeartbeatAck,
    PresenceQuery,
    PresenceRecord,
    PresenceState,
    Publish,
    Subscribe,
    Unsubscribe,
    Unsubscribed,
)
from ..registry._registry import Registry
from ._auth import Authenticator
from ._backplane import Backplane, SessionClaim
from ._config import HubConfig, HubStats
from ._flow import OutputBudget, PreAuthLimiter, PreAuthTicket, TokenBucket
from ._hubevents import HubEvents
from ._persist import CredentialSource, PresenceWriter, RegistryWatch
from ._presence import PresenceTable
from ._pump import _Session, serve_connection
from ._router import Router
from ._sessions import Connections, SessionDirectory
from ._stores import BucketStore
from ._throttle import AuthThrottle
from ._wsserver import UpgradeRequest, read_upgrade_request

__all__ = ["CloseCode", "Hub", "HubConfig", "HubParts", "HubStats"]

log = logging.getLogger("artcafe_trio.hub")

AGENT_PATH_PREFIX = "/api/v1/ws/agent/"
ADMIN_PATH = "/api/v1/ws/admin"


@attrs.frozen
class HubParts:
    """The components a :class:`Hub` is a facade over, composed by ``_serve.compose_hub``."""

    registry: Registry
    config: HubConfig
    stats: HubStats
    events: HubEvents
    wall_clock: Callable[[], float]
    backplane: Backplane
    connections: Connections
    directory: SessionDirectory
    router: Router
    presence: PresenceTable
    keys: RegistryWatch
    writer: PresenceWriter
    buckets: BucketStore


class _RateLimitedLog:
    """Logs refused frames at a bounded rate, counting what it suppressed."""

    def __init__(self, per_second: float) -> None:
        self.per_second = per_second
        self.window_start = -math.inf
        self.count = 0
        self.suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = trio.current_time()
        if now - self.window_start >= 1.0:
            if self.suppressed:
                log.warning("%d refused-frame log lines suppressed", self.suppressed)
            self.window_start, self.count, self.suppressed = now, 0, 0
        if self.count < self.per_second:
            self.count += 1
            log.warning(message, *args)
        else:
            self.suppressed += 1


class Hub:
    """A running hub: a facade over its components (session directory, router,
    presence table, registry watch and presence writer, backplane).

    Made only by :func:`open_hub` and :func:`serve_hub`, which compose and run it:
    ``Hub(...)`` raises ``TypeError``, so there is never a hub that is not running
    (or, after its block, stopped).
    """

    registry: Registry
    """The registry it authenticates agents with and writes presence to."""
    config: HubConfig
    """Its settings."""
    stats: HubStats
    """Its counters (exported as Prometheus metrics when enabled)."""
    events: HubEvents
    """The observation seam: event feed and per-agent measurements."""
    admin_token: str
    """The admin channel's token (in the admin file, for ``artcafe-trio status``)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise TypeError(
            "Hub is not constructed directly: run one with open_hub() (async with) or "
            "serve_hub() (nursery.start)"
        )

    @classmethod
    def _compose(cls, parts: HubParts) -> Hub:
        """The factories' way in (``_serve.compose_hub``): a hub over its components."""
        hub = object.__new__(cls)
        hub._setup(parts)
        return hub

    def _setup(self, parts: HubParts) -> None:
        self.registry = parts.registry
        self.config = config = parts.config
        self.stats = parts.stats
        self.events = parts.events
        self.admin_token = secrets.token_urlsafe(32)
        self._wall_clock = parts.wall_clock
        self._connections = parts.connections
        self._directory = parts.directory
        self._router = parts.router
        self._presence = parts.presence
        self._keys: CredentialSource = parts.keys
        self._presence_writer = parts.writer
        self._buckets = parts.buckets
        self._backplane = parts.backplane
        # The per-connection side's own state (authenticator, limits, logs).
        self.output_budget = OutputBudget(config.output_budget_bytes)
        self.unauthenticated = PreAuthLimiter(
            config.max_unauthenticated_per_address, config.max_unauthenticated
        )
        self._auth_throttle = AuthThrottle(
            free=config.auth_failures_free,
            cap=config.auth_failure_delay_cap,
            memory=config.auth_failure_memory,
        )
        self._auth_log = _RateLimitedLog(config.refused_log_per_second)
        self._refused_log = _RateLimitedLog(config.refused_log_per_second)
        self._authenticator = Authenticator(self._keys, self.admin_token, self._auth_throttle)

    @property
    def url(self) -> str | None:
        """The ws:// or wss:// base URL agents connect to (``None``: memory only)."""
        return self._connections.url

    @property
    def port(self) -> int | None:
        """The TCP port it listens on (``None``: memory only)."""
        return self._connections.port

    @property
    def cluster_degraded(self) -> tuple[str, ...]:
        """Why this hub's view of the cluster is degraded, empty when it is not (always
        empty for a hub alone); e.g. ``("fenced",)``. See ``docs/cluster.md``."""
        return self._backplane.degraded()

    def presence_table(self, tenant_id: str | None = None) -> list[PresenceRecord]:
        """The live presence table, for one tenant or all, sorted by tenant and agent."""
        return self._presence.records(tenant_id)

    def close_all(self, code: int = CloseCode.SERVICE_RESTART, reason: str = "") -> None:
        """Close every authenticated session with ``code`` (agents will reconnect), after
        sending what is already queued for it (within ``close_timeout``)."""
        self._directory.close_all(code, reason)

    def _slow_consumer_event(self, session: _Session, reason: str) -> None:
        self.events.slow_consumer(
            session.tenant_id, session.agent_id, session.session_id, reason, self._wall_clock()
        )

    # --- a session's place in the hub: directory, backplane claim, presence, router ----

    async def _attach(self, session: _Session) -> None:
        """Make ``session`` the agent's live session: take-over, claim, presence."""
        older = self._directory.attach(session)
        if session.is_admin:
            return
        replaced = older.session_id if older is not None else None
        claim = SessionClaim(
            session.tenant_id, session.agent_id, session.session_id, self.config.hub_id, replaced
        )
        await self._backplane.claim_session(claim)  # LocalBackplane: no checkpoint
        self._presence.connected(session, self.config.hub_id)

    def _detach(self, session: _Session) -> None:
        """Forget a finished session; its presence ends unless it was replaced."""
        session.ended = True
        session.outbox.discard()
        self._router.forget_session(session)
        if self._directory.detach(session):
            self._presence.session_ended(session, stopping=self._connections.stopping)

    # --- what the connection pump calls (HubSide in _pump.py) ---------------------

    def _connection_opened(self) -> None:
        self._connections.opened()

    def _connection_closed(self) -> None:
        self._connections.closed()

    def _publish_bucket(self, tenant_id: str, agent_id: str) -> TokenBucket:
        return self._buckets.bucket(tenant_id, agent_id)

    def _connect_urls(self) -> tuple[str, ...]:
        """The other hubs' URLs for a welcome (the backplane's live view)."""
        return self._backplane.connect_urls()

    def _heartbeat_timed_out(self, session: _Session) -> None:
        self._presence.heartbeat_timed_out(session)

    def _handle_heartbeat(self, session: _Session, frame: Heartbeat) -> None:
        self.stats.heartbeats += 1
        self.events.heartbeat(session.presence, session.session_id, frame.rtt)
        wall = session.last_frame_wall
        entry = session.owned_presence()
        if entry is not None:
            entry.last_heartbeat = wall
        session.send_frame(HeartbeatAck(seq=frame.seq, hub_time=wall))

    def _handle_subscribe(self, session: _Session, frame: Subscribe) -> None:
        self._router.subscribe(session, frame)

    def _handle_unsubscribe(self, session: _Session, frame: Unsubscribe) -> None:
        self._router.unsubscribe(session, frame.subject)
        session.send_frame(Unsubscribed(id=frame.id, subject=frame.subject))

    async def _handle_publish(self, session: _Session, frame: Publish) -> None:
        await self._router.publish(session, frame)

    def _handle_presence_query(self, session: _Session, frame: PresenceQuery) -> None:
        tenant = None if session.is_admin else session.tenant_id
        agents = tuple(self.presence_table(tenant))
        degraded = self.cluster_degraded or None  # absent unless degraded
        session.send_frame(PresenceState(id=frame.id, agents=agents, degraded=degraded))

    # --- connections ----------------------------------------------------------

    async def handle_request(
        self, request: UpgradeRequest, remote: str = "?", ticket: PreAuthTicket | None = None
    ) -> None:
        """Serve one WebSocket handshake request to its end (the server handler).

        A barrier: nothing that happens on one connection escapes to the hub.
        ``ticket`` is the connection's unauthenticated slot, given up once it authenticates.
        """
        try:
            await self._handle_request(request, remote, ticket)
        except (ConnectionClosed, OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away
        except Exception:
            log.exception("unexpected error on a connection from %s; connection dropped", remote)

    async def _handle_request(
        self, request: UpgradeRequest, remote: str, ticket: PreAuthTicket | None
    ) -> None:
        if self._connections.stopping:
            await request.reject(503, body=b"hub shutting down")
            return
        split = urlsplit(request.path)
        path = split.path
        self.stats.connections += 1
        agent_part = path[len(AGENT_PATH_PREFIX) :]
        if path == ADMIN_PATH:
            ws = await request.accept()
            await serve_connection(self, ws, None, None, remote, ticket)
        elif path.startswith(AGENT_PATH_PREFIX) and agent_part and "/" not in agent_part:
            agent_id = unquote(agent_part)
            tenant_ids = parse_qs(split.query).get("tenant_id", [])
            ws = await request.accept()
            await serve_connection(
                self, ws, agent_id, tenant_ids[0] if tenant_ids else "", remote, ticket
            )
        else:
            await request.reject(404, body=b"unknown path; agents use /api/v1/ws/agent/{id}")

    # --- in-memory transport ---------------------------------------------------

    def serve_stream(self, stream: trio.abc.Stream, remote: str = "memory") -> None:
        """Serve one more connection over ``stream``, a byte stream to an agent (e.g. the
        server end of an in-memory pair: see ``TestHub.connect_in_memory``), as the
        listeners serve TCP: HTTP upgrade, then the session, in the hub's own tasks.

        ``remote`` is the address the hub sees (its limits and logs are per address).
        """
        nursery = self._connections.nursery
        if nursery is None:
            raise RuntimeError("the hub is not running")
        nursery.start_soon(self._serve_stream, stream, remote)

    async def _serve_stream(self, stream: trio.abc.Stream, remote: str) -> None:
        """Serve one byte stream (TCP, TLS or in-memory): HTTP upgrade, then the session.

        Until it authenticates, the connection holds one of the limited unauthenticated
        slots; the upgrade must finish within ``handshake_timeout``.
        """
        ticket = self.unauthenticated.admit(remote)
        try:
            with ticket.scope:
                request = None
                with trio.move_on_after(self.config.handshake_timeout) as upgrade:
                    request = await read_upgrade_request(
                        stream, max_message_size=self._hard_frame_limit
                    )
                if upgrade.cancelled_caught:
                    self.stats.handshake_timeouts += 1
                elif request is not None:
                    await self.handle_request(request, remote=remote, ticket=ticket)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away during the upgrade
        finally:
            self.unauthenticated.release(ticket)
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.close_timeout):
                await stream.aclose()

    async def _serve_accepted(self, stream: trio.SocketStream | trio.SSLStream[Any]) -> None:
        """Serve a TCP (or TLS over TCP) connection from the listeners."""
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        try:
            address = str(transport.socket.getpeername()[0])
        except OSError:  # reset before we asked who it was
            address = "?"
        await self._serve_stream(stream, address)

    @property
    def _hard_frame_limit(self) -> int:
        """Frames above ``max_frame_bytes`` get an error; above this, close 1009."""
        return self.config.max_frame_bytes * 4 + 65536
