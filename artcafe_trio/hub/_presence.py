"""The presence table: status and reason per agent, heartbeat deadlines and the
disconnect grace (on the hub's :class:`DeadlineQueue`), and its listeners.

A transition has one owner per step: the table changes the row and builds one
:class:`PresenceUpdate`; each listener (hub events, the router's ``$presence`` fan-out
and admin copy, the persistence writer, the backplane) then does its own part.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

from ..protocol._codes import CloseCode
from ..protocol._frames import PresenceRecord
from ..registry._registry import PresenceChange
from ..registry._registry import PresenceRow as StoredRow
from ._backplane import PresenceUpdate
from ._config import HubConfig, HubStats
from ._sessions import Session
from ._timers import DeadlineQueue

__all__ = ["PresenceEntry", "PresenceListener", "PresenceTable"]

log = logging.getLogger("artcafe_trio.hub")

PresenceListener = Callable[[PresenceUpdate], None]
"""Called with every transition, in order; must not block."""


@attrs.define
class PresenceEntry:
    """One row of the live presence table."""

    tenant_id: str
    agent_id: str
    status: str = "offline"
    reason: str | None = None
    session: Session | None = None
    session_id: str | None = None
    since: float | None = None
    last_seen: float | None = None
    last_heartbeat: float | None = None
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, Any] = attrs.field(factory=dict)
    grace_deadline: float = math.inf
    heartbeat_timeout: float | None = None
    hub_id: str | None = None  # the hub its session is on (another, in a cluster)

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
            hub_id=self.hub_id,
        )


class _GraceTimer:
    """DeadlineQueue entry for a disconnected agent inside its grace period."""

    def __init__(self, table: PresenceTable, entry: PresenceEntry) -> None:
        self.table = table
        self.entry = entry

    def expire(self, now: float) -> float | None:
        entry = self.entry
        if entry.session is not None or entry.status != "online":
            return None  # came back, or already offline for another reason
        if entry.grace_deadline > now:
            return entry.grace_deadline
        self.table.set_offline(entry, "disconnected")
        return None


class PresenceTable:
    """Every agent's presence row; transitions go to :attr:`listeners`."""

    def __init__(
        self,
        config: HubConfig,
        stats: HubStats,
        timers: DeadlineQueue,
        wall_clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._stats = stats
        self._timers = timers
        self._wall_clock = wall_clock
        self._rows: dict[tuple[str, str], PresenceEntry] = {}
        self.listeners: list[PresenceListener] = []

    def __len__(self) -> int:
        return len(self._rows)

    def records(self, tenant_id: str | None = None) -> list[PresenceRecord]:
        """The table, for one tenant or all, sorted by tenant and agent."""
        return [
            entry.record()
            for key, entry in sorted(self._rows.items())
            if tenant_id is None or key[0] == tenant_id
        ]

    def entry(self, tenant_id: str, agent_id: str) -> PresenceEntry:
        key = (tenant_id, agent_id)
        entry = self._rows.get(key)
        if entry is None:
            entry = self._rows[key] = PresenceEntry(tenant_id, agent_id)
        return entry

    def load(self, rows: Iterable[StoredRow], now: float) -> list[PresenceChange]:
        """Start from the registry's rows, every agent offline. Returns the outages to
        record: agents the previous hub left online when it died."""
        stale: list[PresenceChange] = []
        for row in rows:
            entry = PresenceEntry(
                row.tenant_id,
                row.agent_id,
                status="offline",
                reason=row.reason if row.status == "offline" else "disconnected",
                last_seen=row.last_seen,
                last_heartbeat=row.last_heartbeat,
                since=row.changed_at,
            )
            self._rows[(row.tenant_id, row.agent_id)] = entry
            if row.status == "online":
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
        return stale

    def last_seen_rows(self) -> list[tuple[str, str, float | None, float | None]]:
        """``(tenant, agent, last_seen, last_heartbeat)`` of every online agent."""
        return [
            (e.tenant_id, e.agent_id, e.last_seen, e.last_heartbeat)
            for e in self._rows.values()
            if e.status == "online" and e.last_seen is not None
        ]

    # --- sessions -----------------------------------------------------------------

    def connected(self, session: Session, hub_id: str) -> None:
        """``session`` became its agent's live one: online (unless it already was: a
        take-over or a return within the grace does not flap) and its deadline watched."""
        now = self._wall_clock()
        entry = self.entry(session.tenant_id, session.agent_id)
        was_online = entry.status == "online"
        entry.session = session
        session.presence = entry
        entry.session_id = session.session_id
        entry.hub_id = hub_id
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

    def session_ended(self, session: Session, *, stopping: bool) -> None:
        """The agent's live session ended: offline now (it left), or after the grace."""
        entry = session.owned_presence()
        if entry is None:
            return
        if session.left:
            self.set_offline(entry, "left")
        elif session.timed_out or stopping:
            entry.session = None
        elif self._config.disconnect_grace <= 0:
            self.set_offline(entry, "disconnected")
        else:
            entry.session = None
            entry.grace_deadline = trio.current_time() + self._config.disconnect_grace
            self._timers.add(entry.grace_deadline, _GraceTimer(self, entry))

    def heartbeat_timed_out(self, session: Session) -> None:
        """``session``'s heartbeat deadline passed: offline (``timeout``), then close it."""
        log.warning(
            "%r: no heartbeat for %.1f s, marking offline", session, session.heartbeat_timeout
        )
        session.timed_out = True
        entry = session.owned_presence()
        if entry is not None:
            self.set_offline(entry, "timeout")
        session.close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")

    def set_offline(self, entry: PresenceEntry, reason: str, *, now: float | None = None) -> None:
        if entry.status == "offline":
            return
        entry.session = None
        entry.grace_deadline = math.inf
        self._transition(entry, "offline", reason, self._wall_clock() if now is None else now)

    def all_offline(self, reason: str, now: float, hub_id: str) -> None:
        """Every agent still online on hub ``hub_id`` goes offline (it is shutting down);
        another hub's agents are that hub's to report."""
        for entry in list(self._rows.values()):
            if entry.status == "online" and entry.hub_id in (hub_id, None):
                self.set_offline(entry, reason, now=now)

    def observe(self, update: PresenceUpdate) -> None:
        """Apply another hub's transition (its session is not ours: no deadline here)."""
        entry = self.entry(update.tenant_id, update.agent_id)
        if entry.session is not None and entry.session.session_id != update.session_id:
            entry.session = None  # our session was replaced there
        entry.session_id = update.session_id
        entry.hub_id = update.hub_id
        entry.capabilities = update.capabilities
        entry.metadata = update.metadata
        entry.last_seen = update.last_seen
        entry.last_heartbeat = update.last_heartbeat
        entry.grace_deadline = math.inf
        if entry.status != update.status:
            entry.status, entry.reason, entry.since = update.status, update.reason, update.time
            self._notify(update)

    # --- one transition ---------------------------------------------------------------

    def _transition(self, entry: PresenceEntry, status: str, reason: str, now: float) -> None:
        entry.status = status
        entry.reason = reason
        entry.since = now
        self._stats.transitions[reason] = self._stats.transitions.get(reason, 0) + 1
        log.info("presence %s/%s %s (%s)", entry.tenant_id, entry.agent_id, status, reason)
        self._notify(
            PresenceUpdate(
                tenant_id=entry.tenant_id,
                agent_id=entry.agent_id,
                status=status,
                reason=reason,
                time=now,
                session_id=entry.session_id,
                hub_id=entry.hub_id or "",
                capabilities=entry.capabilities,
                metadata=entry.metadata,
                last_seen=entry.last_seen,
                last_heartbeat=entry.last_heartbeat,
            )
        )

    def _notify(self, update: PresenceUpdate) -> None:
        for listener in self.listeners:
            listener(update)
