"""The reference hub: authentication, tenant-scoped routing, presence.

``serve_hub`` (for ``nursery.start``) and ``open_hub`` (an async context
manager) run a :class:`Hub` over TCP (ws:// or wss://); ``Hub.serve_stream``
serves one more connection over any byte stream (the test kit's in-memory pairs).

Per connection: challenge → auth → welcome, then one reader loop and one
writer task. Everything a connection sends goes through its bounded outbox;
a consumer whose outbox is full is cut off alone. Presence deadlines live in
one :class:`DeadlineQueue`.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import math
import os
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import trio
from trio_websocket import ConnectionClosed

from .._errors import ProtocolError
from .._util import collapse_exception_groups, write_private_file
from ..protocol._codes import CloseCode
from ..protocol._frames import (
    DEFAULT_MAX_FRAME_BYTES,
    Heartbeat,
    HeartbeatAck,
    PresenceEvent,
    PresenceQuery,
    PresenceRecord,
    PresenceState,
    Publish,
    Published,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    encode_message,
)
from ..protocol._keys import PublicKey
from ..protocol._subjects import SubjectIndex
from ..registry._registry import PresenceChange, Registry, RegistryError
from ._auth import Authenticator
from ._flow import Delivery, OutputBudget, PreAuthLimiter, PreAuthTicket, TokenBucket
from ._hubevents import HubEvents
from ._pump import _Session, serve_connection
from ._throttle import AuthThrottle
from ._timers import DeadlineQueue
from ._wsserver import UpgradeRequest, frame_text, read_upgrade_request

__all__ = ["CloseCode", "Hub", "HubConfig", "HubStats", "open_hub", "serve_hub"]

log = logging.getLogger("artcafe_trio.hub")

AGENT_PATH_PREFIX = "/api/v1/ws/agent/"
ADMIN_PATH = "/api/v1/ws/admin"
PRESENCE_PREFIX = "$presence"
REPLY_PREFIX = "$reply"
ADMIN_AGENT_ID = "$admin"
HUB_SENDER = "$hub"
FANOUT_BATCH = 256  # deliveries between two checkpoints of one publish's fan-out
T = TypeVar("T")


@attrs.frozen
class HubConfig:
    """Hub settings. Every duration is in seconds.

    Heartbeat settings declared by agents are clamped to the ``min_``/``max_``
    bounds; the effective values are sent back in ``welcome``.
    """

    hub_id: str = attrs.field(factory=lambda: "hub-" + secrets.token_hex(4))
    challenge_timeout: float = 30.0
    min_heartbeat_interval: float = 0.5
    max_heartbeat_interval: float = 300.0
    min_timeout_multiplier: float = 1.5
    max_timeout_multiplier: float = 10.0
    disconnect_grace: float = 5.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_subscriptions: int = 1000
    send_queue_size: int = 1024
    send_queue_bytes: int = 16 * 1024 * 1024
    output_budget_bytes: int = 256 * 1024 * 1024
    reply_window: int = 256
    max_open_requests: int = 1024
    max_reply_grants: int = 1_000_000
    max_unauthenticated_per_address: int = 256
    max_unauthenticated: int = 1024
    handshake_timeout: float = 10.0
    publish_rate: float = 1000.0
    publish_burst: int = 2000
    dedupe_window: float = 600.0
    dedupe_max_ids: int = 10_000
    auth_failures_free: int = 3
    auth_failure_delay_cap: float = 10.0
    auth_failure_memory: float = 300.0
    registry_poll_interval: float = 0.5
    last_seen_flush_interval: float = 10.0
    close_timeout: float = 2.0
    refused_log_per_second: float = 5.0


@attrs.define
class HubStats:
    """Counters the hub keeps (exported as Prometheus metrics when enabled)."""

    connections: int = 0
    auth_failures: int = 0
    heartbeats: int = 0
    messages_routed: int = 0
    deliveries: int = 0
    slow_consumers: int = 0
    refused_frames: int = 0
    rate_limited: int = 0
    handshake_timeouts: int = 0
    transitions: dict[str, int] = attrs.field(factory=dict)
    registry_file_lost: int = 0  # 1 while the registry file at its path is not the one opened
    presence_writes_pending: int = 0


class _Dedupe:
    """Recently seen publish ids of one agent, bounded in time and count."""

    def __init__(self, window: float, max_ids: int) -> None:
        self.window = window
        self.max_ids = max_ids
        self.seen: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()

    def lookup(self, frame_id: str, now: float) -> str | None:
        while self.seen:
            oldest = next(iter(self.seen.values()))
            if now - oldest[0] <= self.window and len(self.seen) <= self.max_ids:
                break
            self.seen.popitem(last=False)
        hit = self.seen.get(frame_id)
        return hit[1] if hit else None

    def remember(self, frame_id: str, message_id: str, now: float) -> None:
        self.seen[frame_id] = (now, message_id)


@attrs.define
class _Presence:
    """One row of the live presence table."""

    tenant_id: str
    agent_id: str
    status: str = "offline"
    reason: str | None = None
    session: _Session | None = None
    session_id: str | None = None
    since: float | None = None
    last_seen: float | None = None
    last_heartbeat: float | None = None
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, Any] = attrs.field(factory=dict)
    grace_deadline: float = math.inf
    heartbeat_timeout: float | None = None

    def record(self) -> PresenceRecord:
        return PresenceRecord(
            tenant_id=self.tenant_id,
            agent_id=self.agent_id,
            status=self.status,
            reason=self.reason,
            session_id=self.session_id,
            since=self.since,
            last_seen=self.last_seen,
            last_heartbeat=self.last_heartbeat,
            heartbeat_timeout=self.heartbeat_timeout,
            capabilities=self.capabilities,
            metadata=self.metadata,
        )


class _GraceTimer:
    """DeadlineQueue entry for a disconnected agent inside its grace period."""

    def __init__(self, hub: Hub, entry: _Presence) -> None:
        self.hub = hub
        self.entry = entry

    def expire(self, now: float) -> float | None:
        entry = self.entry
        if entry.session is not None or entry.status != "online":
            return None  # came back, or already offline for another reason
        if entry.grace_deadline > now:
            return entry.grace_deadline
        self.hub._set_offline(entry, "disconnected")
        return None


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


class _HubKeys:
    """The hub's key cache as the authenticator's ``KeyStore``."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    @property
    def credentials(self) -> dict[tuple[str, str], tuple[PublicKey, ...]]:
        return self._hub._credentials

    @property
    def tenants(self) -> frozenset[str]:
        return self._hub._tenants

    @property
    def generation(self) -> int:
        return self._hub._credentials_generation

    async def reload(self) -> bool:
        return await self._hub._reload_credentials_safely()


class Hub:
    """The hub's state and connection handling. Create it with ``open_hub``/``serve_hub``.

    Attributes of interest: ``url`` (ws:// or wss:// base URL, ``None`` for a
    memory-only hub), ``port``, ``stats``, ``registry``, and
    :meth:`presence_table`.
    """

    def __init__(
        self,
        registry: Registry,
        config: HubConfig | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.config = config or HubConfig()
        self.stats = HubStats()
        self.url: str | None = None
        self.port: int | None = None
        self.admin_token = secrets.token_urlsafe(32)
        self._wall_clock = wall_clock
        self._nursery: trio.Nursery | None = None
        self._credentials: dict[tuple[str, str], tuple[PublicKey, ...]] = {}
        self._tenants: frozenset[str] = frozenset()
        self._credentials_generation = 0  # bumped each time keys are loaded
        self._revision = -1
        self._reload_lock = trio.Lock()
        self._sessions: dict[tuple[str, str], _Session] = {}
        self._sessions_by_id: dict[str, _Session] = {}
        self._admins: set[_Session] = set()
        self._indexes: dict[str, SubjectIndex[_Session]] = {}
        self._presence: dict[tuple[str, str], _Presence] = {}
        self._dedupe: dict[tuple[str, str], _Dedupe] = {}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        # $reply subject -> agents (of the requester's tenant) delivered that request
        self._reply_grants: dict[str, set[str]] = {}  # insertion order = age
        self._granted = 0  # responders held in all _reply_grants together
        self.output_budget = OutputBudget(self.config.output_budget_bytes)
        self.unauthenticated = PreAuthLimiter(
            self.config.max_unauthenticated_per_address, self.config.max_unauthenticated
        )
        self._timers = DeadlineQueue()
        self._message_ids = itertools.count(1)
        self._auth_throttle = AuthThrottle(
            free=self.config.auth_failures_free,
            cap=self.config.auth_failure_delay_cap,
            memory=self.config.auth_failure_memory,
        )
        self._auth_log = _RateLimitedLog(self.config.refused_log_per_second)
        self._authenticator = Authenticator(_HubKeys(self), self.admin_token, self._auth_throttle)
        self._pending_changes: list[PresenceChange] = []
        self._registry_lost: str | None = None
        self._presence_flush_lock = trio.Lock()
        self._registry_lost_logged = -math.inf
        self._changes_waiting = trio.Event()
        self._refused_log = _RateLimitedLog(self.config.refused_log_per_second)
        self._stopping = False
        self._open_connections = 0
        self._connections_gone = trio.Event()
        self.events = HubEvents()
        """The observation seam: event feed and per-agent measurements (``_hubevents``)."""

    def _slow_consumer_event(self, session: _Session, reason: str) -> None:
        self.events.slow_consumer(
            session.tenant_id, session.agent_id, session.session_id, reason, self._wall_clock()
        )

    # --- lifecycle -------------------------------------------------------

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a registry call: inline for an in-memory registry, else in a worker thread."""
        if self.registry.inline:
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args)

    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        await self._reload_credentials()
        now = self._wall_clock()
        stale: list[PresenceChange] = []
        for row in await self._db(self.registry.presence_rows):
            entry = _Presence(
                row.tenant_id,
                row.agent_id,
                status="offline",
                reason=row.reason if row.status == "offline" else "disconnected",
                last_seen=row.last_seen,
                last_heartbeat=row.last_heartbeat,
                since=row.changed_at,
            )
            self._presence[(row.tenant_id, row.agent_id)] = entry
            if row.status == "online":
                # The previous hub died with this agent online: record the outage.
                entry.since = row.last_seen or now
                stale.append(
                    PresenceChange(
                        row.tenant_id,
                        row.agent_id,
                        "offline",
                        "disconnected",
                        row.session_id,
                        row.last_seen or now,
                    )
                )
        # Written by the presence writer, which starts only once the hub listens: a hub
        # that fails to start (port in use) must not rewrite a running hub's presence.
        self._pending_changes.extend(stale)
        nursery.start_soon(self._timers.run)
        nursery.start_soon(self._watch_registry)

    async def _shutdown(self) -> None:
        """Close every session with 1012 and flush presence to the registry."""
        self._stopping = True
        self.close_all(CloseCode.SERVICE_RESTART, "hub shutting down")
        with trio.move_on_after(self.config.close_timeout + 1):
            while self._open_connections:
                self._connections_gone = trio.Event()
                await self._connections_gone.wait()
        now = self._wall_clock()
        for entry in self._presence.values():
            if entry.status == "online":
                self._set_offline(entry, "disconnected", now=now)
        with trio.move_on_after(10):
            try:
                await self._flush_presence()
            except RegistryError as exc:
                log.error("presence not saved at shutdown: %s", exc)

    async def _reload_credentials(self) -> bool:
        """Reload keys if the registry changed; close sessions whose key went away.

        One reload at a time; the revision is recorded only once its keys are loaded,
        so a check that sees "no change" already has them.
        """
        async with self._reload_lock:
            revision = await self._db(self.registry.revision)
            if revision == self._revision:
                return False
            credentials = await self._db(self.registry.all_credentials)
            self._credentials = credentials
            self._tenants = frozenset(tenant for tenant, _ in credentials)
            self._revision = revision
            self._credentials_generation += 1
        for (tenant_id, agent_id), session in list(self._sessions.items()):
            keys = self._credentials.get((tenant_id, agent_id), ())
            if session.key is not None and session.key not in keys:
                log.warning("%r: key removed or agent disabled, closing", session)
                session.close(CloseCode.KEY_REVOKED, "key removed or agent disabled")
        return True

    async def _reload_credentials_safely(self) -> bool:
        try:
            return await self._reload_credentials()
        except RegistryError as exc:
            log.error("registry unavailable, using the keys loaded before: %s", exc)
            return False

    async def _watch_registry(self) -> None:
        while True:
            await trio.sleep(self.config.registry_poll_interval)
            await self._check_registry_file()
            await self._reload_credentials_safely()

    async def _check_registry_file(self) -> None:
        """Notice a registry file deleted or replaced under the running hub, loudly.

        The hub then keeps serving with the keys it has loaded, but writes no presence
        (changes wait, one per agent) and sees no registry change, until the file is back
        or the hub is restarted: see ``docs/security.md``.
        """
        try:
            problem = await self._db(self.registry.file_problem)
        except RegistryError:  # closed under us: nothing to check
            return
        now = trio.current_time()
        if problem is not None:
            if self._registry_lost is None or now >= self._registry_lost_logged + 60.0:
                log.error(
                    "%s: the running hub keeps the keys it loaded and writes no presence; "
                    "'agents' commands on that path no longer reach it. Restore the file "
                    "or restart the hub.",
                    problem,
                )
                self._registry_lost_logged = now
            self._registry_lost = problem
            self.stats.registry_file_lost = 1
        elif self._registry_lost is not None:
            log.warning("registry file %r is back; presence writes resume", self.registry.path)
            self._registry_lost = None
            self.stats.registry_file_lost = 0
            self._changes_waiting.set()

    async def _write_presence(self) -> None:
        next_flush = trio.current_time() + self.config.last_seen_flush_interval
        while True:
            with trio.move_on_at(next_flush):
                await self._changes_waiting.wait()
            if self._registry_lost is not None:
                # Nothing written would reach the file at the registry's path: keep them.
                await trio.sleep(self.config.registry_poll_interval)
                continue
            try:
                if trio.current_time() >= next_flush:
                    next_flush = trio.current_time() + self.config.last_seen_flush_interval
                    self._prune_dedupe(trio.current_time())
                    await self._flush_last_seen()
                await self._flush_presence()
            except RegistryError as exc:
                # Keep serving; the changes stay queued and are written on the next try.
                log.error("cannot write presence to the registry (will retry): %s", exc)
                await trio.sleep(1.0)

    def _prune_dedupe(self, now: float) -> None:
        """Forget the publish-id caches of agents that published nothing within the window,
        and the rate buckets that have refilled (a new bucket would be the same)."""
        self._buckets = {
            key: bucket for key, bucket in self._buckets.items() if not bucket.is_full(now)
        }
        window = self.config.dedupe_window
        self._dedupe = {
            key: cache
            for key, cache in self._dedupe.items()
            if cache.seen and now - next(reversed(cache.seen.values()))[0] <= window
        }

    async def _flush_presence(self) -> None:
        # One flush at a time: the shutdown's final flush must not overtake a write still
        # in its worker thread, or an older change would land last (e.g. online after left).
        async with self._presence_flush_lock:
            self._changes_waiting = trio.Event()
            changes, self._pending_changes = self._pending_changes, []
            if changes:
                try:
                    await self._db(self.registry.record_presence, changes)
                except BaseException:
                    # Not written: keep them, in order, before the ones queued since.
                    queued, self._pending_changes = self._pending_changes, changes
                    for change in queued:
                        self._queue_change(change)
                    raise
                finally:
                    self.stats.presence_writes_pending = len(self._pending_changes)

    async def _flush_last_seen(self) -> None:
        rows = [
            (e.tenant_id, e.agent_id, e.last_seen, e.last_heartbeat)
            for e in self._presence.values()
            if e.status == "online" and e.last_seen is not None
        ]
        if rows:
            await self._db(self.registry.record_last_seen, rows)

    def close_all(self, code: int = CloseCode.SERVICE_RESTART, reason: str = "") -> None:
        """Close every authenticated session with ``code`` (agents will reconnect), after
        sending what is already queued for it (within ``close_timeout``)."""
        for session in list(self._sessions_by_id.values()):
            session.close(code, reason, drain=True)

    # --- presence ----------------------------------------------------------

    def presence_table(self, tenant_id: str | None = None) -> list[PresenceRecord]:
        """The live presence table, for one tenant or all, sorted by tenant and agent."""
        return [
            entry.record()
            for key, entry in sorted(self._presence.items())
            if tenant_id is None or key[0] == tenant_id
        ]

    def _publish_bucket(self, tenant_id: str, agent_id: str) -> TokenBucket:
        """The agent's publish rate bucket: one per agent, kept across its sessions."""
        key = (tenant_id, agent_id)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(
                self.config.publish_rate, self.config.publish_burst
            )
        return bucket

    def _entry(self, tenant_id: str, agent_id: str) -> _Presence:
        key = (tenant_id, agent_id)
        entry = self._presence.get(key)
        if entry is None:
            entry = self._presence[key] = _Presence(tenant_id, agent_id)
        return entry

    def _transition(self, entry: _Presence, status: str, reason: str, now: float) -> None:
        entry.status = status
        entry.reason = reason
        entry.since = now
        self.stats.transitions[reason] = self.stats.transitions.get(reason, 0) + 1
        event = PresenceEvent(
            tenant_id=entry.tenant_id,
            agent_id=entry.agent_id,
            status=status,
            reason=reason,
            time=now,
            session_id=entry.session_id,
            capabilities=entry.capabilities,
            metadata=entry.metadata,
        )
        log.info("presence %s/%s %s (%s)", entry.tenant_id, entry.agent_id, status, reason)
        self.events.presence(entry.tenant_id, entry.agent_id, status, reason, entry.session_id, now)
        subject = f"{PRESENCE_PREFIX}.{entry.agent_id}"
        item = self._delivery(subject, json.dumps(event.to_data()), HUB_SENDER)
        targets = self._targets(entry.tenant_id, subject)
        targets += [a for a in self._admins if f"{PRESENCE_PREFIX}.>" in a.subscriptions]
        self.stats.deliveries += len(targets)
        for target in targets:  # bounded by the tenant's connections plus the admins
            target.deliver(item)
        self._queue_change(
            PresenceChange(
                entry.tenant_id,
                entry.agent_id,
                status,
                reason,
                entry.session_id,
                now,
                last_seen=entry.last_seen,
                last_heartbeat=entry.last_heartbeat,
            )
        )

    def _queue_change(self, change: PresenceChange) -> None:
        """Queue a presence write. While writes fail, the queue is coalesced to the latest
        change per agent, so it never holds more than twice the number of agents (the
        presence log then misses the transitions in between)."""
        pending = self._pending_changes
        pending.append(change)
        if len(pending) > 2 * len(self._presence) + 16:
            latest: dict[tuple[str, str], PresenceChange] = {}
            for queued in pending:  # ordered by each agent's latest change
                latest.pop((queued.tenant_id, queued.agent_id), None)
                latest[(queued.tenant_id, queued.agent_id)] = queued
            pending[:] = latest.values()
        self.stats.presence_writes_pending = len(pending)
        self._changes_waiting.set()

    def _set_offline(self, entry: _Presence, reason: str, *, now: float | None = None) -> None:
        if entry.status == "offline":
            return
        entry.session = None
        entry.grace_deadline = math.inf
        self._transition(entry, "offline", reason, self._wall_clock() if now is None else now)

    def _heartbeat_timed_out(self, session: _Session) -> None:
        log.warning(
            "%r: no heartbeat for %.1f s, marking offline", session, session.heartbeat_timeout
        )
        session.timed_out = True
        entry = session.owned_presence()
        if entry is not None:
            self._set_offline(entry, "timeout")
        session.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")

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
        if self._stopping:
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

    def _attach(self, session: _Session) -> None:
        """Make ``session`` the agent's live session: take-over and presence."""
        self._sessions_by_id[session.session_id] = session
        if session.is_admin:
            self._admins.add(session)
            return
        key = (session.tenant_id, session.agent_id)
        older = self._sessions.get(key)
        self._sessions[key] = session
        if older is not None:
            log.info("%r replaced by %s", older, session.session_id)
            older.close(CloseCode.REPLACED, f"replaced by a newer session {session.session_id}")
        now = self._wall_clock()
        replaced = older.session_id if older is not None else None
        interval = session.heartbeat_interval
        self.events.attached(*key, session.session_id, replaced, interval, now)
        entry = self._entry(*key)
        was_online = entry.status == "online"
        entry.session = session
        session.presence = entry
        entry.session_id = session.session_id
        entry.grace_deadline = math.inf
        entry.capabilities = session.capabilities
        entry.metadata = session.metadata
        entry.heartbeat_timeout = session.heartbeat_timeout
        entry.last_seen = now
        entry.last_heartbeat = None  # per session: an older session's ACK says nothing now
        if not was_online:
            self._transition(entry, "online", "connected", now)
        if session.heartbeat_timeout is not None:
            self._timers.add(session.deadline, session)

    def _detach(self, session: _Session) -> None:
        """Forget a finished session; start the disconnect grace unless it left or was replaced."""
        session.ended = True
        session.outbox.discard()
        self._sessions_by_id.pop(session.session_id, None)
        for reply_subject in list(session.open_requests):
            self._forget_request(reply_subject)
        session.open_requests.clear()
        if session.is_admin:
            self._admins.discard(session)
            return
        index = self._indexes.get(session.tenant_id)
        if index is not None:
            index.remove_subscriber(session, session.subscriptions)
            if not len(index):
                del self._indexes[session.tenant_id]
        key = (session.tenant_id, session.agent_id)
        if self._sessions.get(key) is not session:
            return  # replaced: the newer session owns presence
        del self._sessions[key]
        entry = session.owned_presence()
        if entry is None:
            return
        if session.left:
            self._set_offline(entry, "left")
        elif session.timed_out or self._stopping:
            entry.session = None
        elif self.config.disconnect_grace <= 0:
            self._set_offline(entry, "disconnected")
        else:
            entry.session = None
            entry.grace_deadline = trio.current_time() + self.config.disconnect_grace
            self._timers.add(entry.grace_deadline, _GraceTimer(self, entry))

    # --- the pump's side (HubSide in _pump.py) ---------------------------------

    def _connection_opened(self) -> None:
        self._open_connections += 1

    def _connection_closed(self) -> None:
        self._open_connections -= 1
        if not self._open_connections:
            self._connections_gone.set()

    def _handle_heartbeat(self, session: _Session, frame: Heartbeat) -> None:
        self.stats.heartbeats += 1
        self.events.heartbeat(session.presence, session.session_id, frame.rtt)
        wall = session.last_frame_wall
        entry = session.owned_presence()
        if entry is not None:
            entry.last_heartbeat = wall
        session.send_frame(HeartbeatAck(seq=frame.seq, hub_time=wall))

    def _handle_unsubscribe(self, session: _Session, frame: Unsubscribe) -> None:
        if frame.subject in session.subscriptions:
            session.subscriptions.discard(frame.subject)
            index = self._indexes.get(session.tenant_id)
            if index is not None:
                index.remove(frame.subject, session)
        session.send_frame(Unsubscribed(id=frame.id, subject=frame.subject))

    def _handle_presence_query(self, session: _Session, frame: PresenceQuery) -> None:
        tenant = None if session.is_admin else session.tenant_id
        session.send_frame(PresenceState(id=frame.id, agents=tuple(self.presence_table(tenant))))

    def _handle_subscribe(self, session: _Session, frame: Subscribe) -> None:
        pattern = frame.subject
        if pattern not in session.subscriptions:
            session.subscriptions.add(pattern)
            if not session.is_admin:
                index = self._indexes.get(session.tenant_id)
                if index is None:
                    index = self._indexes[session.tenant_id] = SubjectIndex()
                index.add(pattern, session)
        session.send_frame(Subscribed(id=frame.id, subject=pattern))

    async def _handle_publish(self, session: _Session, frame: Publish) -> None:
        subject = frame.subject
        is_reply = subject.startswith(f"{REPLY_PREFIX}.")
        reply_to = frame.reply_to
        now = trio.current_time()
        dedupe = None
        if frame.id is not None:
            key = (session.tenant_id, session.agent_id)
            dedupe = self._dedupe.get(key)
            if dedupe is None:
                dedupe = self._dedupe[key] = _Dedupe(
                    self.config.dedupe_window, self.config.dedupe_max_ids
                )
            seen = dedupe.lookup(frame.id, now)
            if seen is not None:
                session.send_frame(Published(id=frame.id, message_id=seen, duplicate=True))
                return
        if is_reply:
            responders = self._reply_grants.get(subject)
            if responders is None or session.agent_id not in responders:
                raise ProtocolError(
                    "reply_not_expected",
                    "no request waiting for an answer on this subject was delivered to you"
                    " (or it was answered already)",
                    frame_id=frame.id,
                )
        data_json = session.admit_publish(frame)  # rate limit, then encoded once
        message_id = f"{self.config.hub_id}-{next(self._message_ids)}"
        if dedupe is not None and frame.id is not None:
            dedupe.remember(frame.id, message_id, now)
            session.send_frame(Published(id=frame.id, message_id=message_id))
        self.stats.messages_routed += 1
        item = self._delivery(subject, data_json, session.agent_id, message_id, reply_to)
        if is_reply:
            self._answer(subject, session.tenant_id, item)
            return
        targets = self._targets(session.tenant_id, subject)
        if reply_to is not None and reply_to.startswith(f"{REPLY_PREFIX}."):
            self._expect_replies(session, reply_to, targets)
        stats = self.stats
        for count, target in enumerate(targets, 1):
            stats.deliveries += 1
            target.deliver(item)
            if count % FANOUT_BATCH == 0:
                # A long fan-out lets other connections run; once begun it always completes.
                await trio.lowlevel.cancel_shielded_checkpoint()

    def _delivery(
        self,
        subject: str,
        data_json: str,
        sender: str,
        message_id: str | None = None,
        reply_to: str | None = None,
    ) -> Delivery:
        """One ``message`` frame, encoded and framed once for every receiver."""
        text = encode_message(
            subject=subject,
            subscription=None,
            data_json=data_json,
            sender=sender,
            message_id=message_id or f"{self.config.hub_id}-{next(self._message_ids)}",
            time=self._wall_clock(),
            reply_to=reply_to,
        )
        return Delivery(frame_text(text))

    def _targets(self, tenant_id: str, subject: str) -> list[_Session]:
        """The tenant's connections with a pattern matching ``subject``, each once."""
        index = self._indexes.get(tenant_id)
        if index is None:
            return []
        return list({session: None for _pattern, session in index.match(subject)})

    def _expect_replies(self, requester: _Session, reply_to: str, targets: list[_Session]) -> None:
        """Allow one answer on ``reply_to``, from an agent the request is delivered to.

        Bounded per requester session (``max_open_requests``) and hub-wide in responders
        held (``max_reply_grants``): over either, the oldest open requests are forgotten.
        """
        self._forget_request(reply_to)  # re-used: it becomes the newest
        open_requests = requester.open_requests
        if len(open_requests) >= self.config.max_open_requests:
            self._forget_request(next(iter(open_requests)))
        responders = {target.agent_id for target in targets}
        while self._reply_grants and self._granted + len(responders) > self.config.max_reply_grants:
            self._forget_request(next(iter(self._reply_grants)))
        open_requests[reply_to] = None
        self._reply_grants[reply_to] = responders
        self._granted += len(responders)

    def _forget_request(self, reply_subject: str) -> None:
        """Close an open request (answered, evicted, or its requester gone)."""
        responders = self._reply_grants.pop(reply_subject, None)
        if responders is None:
            return
        self._granted -= len(responders)
        requester = self._sessions_by_id.get(reply_subject.split(".", 2)[1])
        if requester is not None:
            requester.open_requests.pop(reply_subject, None)

    def _answer(self, reply_subject: str, tenant_id: str, item: Delivery) -> None:
        """Deliver the one accepted answer to its requester and close the request."""
        self._forget_request(reply_subject)
        target = self._sessions_by_id.get(reply_subject.split(".", 2)[1])
        if target is not None and target.tenant_id == tenant_id:
            self.stats.deliveries += 1
            target.deliver(item)

    # --- in-memory transport ---------------------------------------------------

    def serve_stream(self, stream: trio.abc.Stream, remote: str = "memory") -> None:
        """Serve one more connection over ``stream``, a byte stream to an agent (e.g. the
        server end of an in-memory pair: see ``TestHub.connect_in_memory``), as the
        listeners serve TCP: HTTP upgrade, then the session, in the hub's own tasks.

        ``remote`` is the address the hub sees (its limits and logs are per address).
        """
        if self._nursery is None:
            raise RuntimeError("the hub is not running")
        self._nursery.start_soon(self._serve_stream, stream, remote)

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


def _load_ssl_context(tls_cert: str, tls_key: str | None) -> ssl.SSLContext:
    """A server TLS context from certificate and key files (blocking: run in a worker)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_cert, tls_key)
    return context


async def serve_hub(
    *,
    registry: Registry | None = None,
    db: str | os.PathLike[str] | None = None,
    host: str | None = "127.0.0.1",
    port: int | None = 0,
    config: HubConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    admin_file: str | os.PathLike[str] | None = None,
    task_status: trio.TaskStatus[Hub] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a hub until cancelled; ``task_status.started`` gives the :class:`Hub`.

    Give ``registry`` or a ``db`` path (default: an in-memory registry). With
    ``port=None`` the hub serves only in-memory connections. Cancelling the
    task shuts down gracefully: every agent is closed with 1012 (service
    restart) and presence is flushed to the registry, within a bounded time.
    """
    # Reading files blocks (TLS key and certificate, registry, admin file): worker threads.
    context = ssl_context
    if context is None and tls_cert is not None:
        context = await trio.to_thread.run_sync(_load_ssl_context, tls_cert, tls_key)
    # Listen first: if the port is taken, fail before touching the registry.
    listeners: list[Any] = []
    if port is not None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        if context is not None:
            listeners = [trio.SSLListener(lst, context) for lst in listeners]
    own_registry = registry is None
    try:
        if registry is None:
            registry = await _open_registry(db)
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    hub = Hub(registry, config)
    # Connections run under a shielded scope: an outside cancellation first
    # closes every session with 1012, then stops the connection machinery.
    connections_scope = trio.CancelScope(shield=True)

    async def run_connections(task_status: trio.TaskStatus[None]) -> None:
        with connections_scope:
            async with trio.open_nursery() as connections:
                hub._nursery = connections
                if listeners:
                    await connections.start(
                        functools.partial(
                            trio.serve_listeners,
                            hub._serve_accepted,
                            listeners,
                            handler_nursery=connections,
                        )
                    )
                    hub.port = _listening_port(listeners[0])
                    scheme = "wss" if context is not None else "ws"
                    shown = host if host not in (None, "", "0.0.0.0") else "127.0.0.1"
                    hub.url = f"{scheme}://{shown}:{hub.port}"
                task_status.started()
                await trio.sleep_forever()

    try:
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                await hub._start(nursery)
                await nursery.start(run_connections)
                await hub._flush_presence()  # an outage the previous hub left behind
                nursery.start_soon(hub._write_presence)
                try:
                    if admin_file is not None:
                        await trio.to_thread.run_sync(_write_admin_file, admin_file, hub)
                    log.info("hub %s serving at %s", hub.config.hub_id, hub.url or "memory")
                    task_status.started(hub)
                    await trio.sleep_forever()
                finally:
                    try:
                        with trio.CancelScope(shield=True):
                            await hub._shutdown()
                    finally:
                        connections_scope.cancel()
                        if admin_file is not None:
                            with trio.CancelScope(shield=True):
                                await trio.to_thread.run_sync(_remove_admin_file, admin_file, hub)
    finally:
        if own_registry:
            with trio.CancelScope(shield=True):
                await _close_registry(registry)


async def _open_registry(db: str | os.PathLike[str] | None) -> Registry:
    """Open the registry: an in-memory one inline (no I/O), a file in a worker thread."""
    if db is None or os.fspath(db) == ":memory:":
        return Registry.open(":memory:")
    return await trio.to_thread.run_sync(Registry.open, db)


async def _close_registry(registry: Registry) -> None:
    """Close the registry, in a worker thread unless it is in memory (as ``Hub._db``)."""
    if registry.inline:
        registry.close()
    else:
        await trio.to_thread.run_sync(registry.close)


def _listening_port(listener: trio.SocketListener | trio.SSLListener[trio.SocketStream]) -> int:
    if isinstance(listener, trio.SSLListener):
        listener = listener.transport_listener  # type: ignore[assignment]
    assert isinstance(listener, trio.SocketListener)
    port: int = listener.socket.getsockname()[1]
    return port


def _write_admin_file(path: str | os.PathLike[str], hub: Hub) -> None:
    """Write the admin file (the admin token) atomically, readable by the hub's user only."""
    payload = json.dumps({"url": hub.url, "token": hub.admin_token, "pid": os.getpid()})
    write_private_file(path, payload.encode())


def _remove_admin_file(path: str | os.PathLike[str], hub: Hub) -> None:
    try:
        with open(path) as f:
            if json.load(f).get("token") != hub.admin_token:
                return  # another hub took over the file
        os.remove(path)
    except (OSError, ValueError):
        pass


@asynccontextmanager
async def open_hub(**kwargs: Any) -> AsyncIterator[Hub]:
    """Run a hub for the duration of the block (arguments as :func:`serve_hub`)."""
    with collapse_exception_groups():
        async with trio.open_nursery() as nursery:
            hub: Hub = await nursery.start(functools.partial(serve_hub, **kwargs))
            try:
                yield hub
            finally:
                nursery.cancel_scope.cancel()
