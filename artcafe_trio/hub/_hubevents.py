"""The hub's observation seam: an event feed and per-agent measurements.

:class:`HubEvents` (``hub.events``) is fed by a few one-line calls in the hub
(presence transitions, take-overs, slow consumers cut off, refused
authentications, heartbeats). Everything here is synchronous, never blocks and
is bounded: each subscriber has its own queue of ``max_queued`` events, and a
subscriber that falls behind loses its queue and gets one :class:`Resync`
marker instead (it re-reads the state it needs); the hub's memory never grows
with a slow reader. The dashboard and the alert webhooks are subscribers.

Measurements use the hub's monotonic clock (``trio.current_time``); event
times are the hub's wall clock, as in presence records.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import attrs
import trio

__all__ = [
    "AgentMeasures",
    "AuthFailure",
    "EventSubscription",
    "HubEvent",
    "HubEvents",
    "PresenceTransition",
    "Resync",
    "SlowConsumerCut",
    "TakeOver",
]

WINDOW = 3600.0
"""Reconnects and take-overs are counted over this many seconds (the last hour)."""
_MAX_STAMPS = 4096  # per agent and kind: a flapping agent cannot grow the hub's memory


@attrs.frozen(kw_only=True)
class HubEvent:
    """Something that happened in the hub. ``tenant_id`` is ``None`` for hub-wide events
    (visible to the admin only)."""

    kind: ClassVar[str] = ""
    time: float
    tenant_id: str | None

    def to_json(self) -> dict[str, Any]:
        """The event as a JSON object (``kind`` first)."""
        return {"kind": self.kind, **attrs.asdict(self)}


@attrs.frozen(kw_only=True)
class PresenceTransition(HubEvent):
    """An agent went online or offline (``reason`` as in presence records).

    ``hub_id`` is the hub that owns the agent's session (another one, in a cluster);
    ``local`` is true when this hub reports the transition: it happened here, or this
    hub reaped the lost hub that owned the agent (``hub_lost``). Each transition is
    local on exactly one hub of a cluster (the alert webhooks post only those).
    """

    kind: ClassVar[str] = "presence"
    tenant_id: str
    agent_id: str
    status: str
    reason: str
    session_id: str | None
    hub_id: str | None = None
    local: bool = True


@attrs.frozen(kw_only=True)
class TakeOver(HubEvent):
    """A newer session of the same agent replaced an older one (closed with 4003)."""

    kind: ClassVar[str] = "takeover"
    tenant_id: str
    agent_id: str
    old_session_id: str
    new_session_id: str


@attrs.frozen(kw_only=True)
class SlowConsumerCut(HubEvent):
    """A connection was cut off because its send queue was full (closed with 4004)."""

    kind: ClassVar[str] = "slow_consumer"
    agent_id: str
    session_id: str
    reason: str
    """Which limit it went over (the close reason of the 4004)."""


@attrs.frozen(kw_only=True)
class AuthFailure(HubEvent):
    """An authentication was refused; ``failures`` counts recent ones from ``address``."""

    kind: ClassVar[str] = "auth_failure"
    tenant_id: None = None
    address: str
    code: str
    failures: int


@attrs.frozen
class Resync:
    """Queued in place of events a subscriber lost by falling behind."""

    lost: int


@attrs.frozen
class AgentMeasures:
    """What the hub measured for one agent (``None``: nothing measured yet)."""

    declared_interval: float | None
    """The effective heartbeat interval of its latest session (as sent in ``welcome``)."""

    heartbeat_interval: float | None
    """Seconds between the last two heartbeats the hub received from the current session."""
    heartbeat_interval_avg: float | None
    """Smoothed (EWMA, 1/8) interval between heartbeats of the current session."""
    rtt: float | None
    """The heartbeat ACK round trip the agent last reported in a heartbeat (optional field)."""
    reconnects: int
    """Sessions that began in the last hour after an earlier one of this agent."""
    takeovers: int
    """Sessions replaced by a newer one in the last hour."""


class EventSubscription:
    """One subscriber's bounded queue; iterate it (async) to get events and resyncs."""

    def __init__(self, max_queued: int, tenant_id: str | None) -> None:
        self.tenant_id = tenant_id
        self.max_queued = max_queued
        self.received = 0
        self.lost = 0
        self._send, self._receive = trio.open_memory_channel[HubEvent | Resync](max_queued + 1)

    def _offer(self, event: HubEvent) -> None:
        if self.tenant_id is not None and event.tenant_id != self.tenant_id:
            return
        if self._send.statistics().current_buffer_used >= self.max_queued:
            lost = 1  # this event
            while True:
                try:
                    dropped = self._receive.receive_nowait()
                except trio.WouldBlock:
                    break
                lost += dropped.lost if isinstance(dropped, Resync) else 1
                if not isinstance(dropped, Resync):
                    self.lost += 1
            self.lost += 1
            self._send.send_nowait(Resync(lost=lost))
            return
        self._send.send_nowait(event)

    async def receive(self) -> HubEvent | Resync:
        """The next event (or :class:`Resync`); waits for one."""
        item = await self._receive.receive()
        self.received += 1
        return item

    def receive_nowait(self) -> HubEvent | Resync:
        """The next queued item; raises ``trio.WouldBlock`` if there is none."""
        item = self._receive.receive_nowait()
        self.received += 1
        return item

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> HubEvent | Resync:
        return await self.receive()

    @property
    def queued(self) -> int:
        return self._send.statistics().current_buffer_used


class _Measure:
    __slots__ = (
        "attaches",
        "avg",
        "declared",
        "interval",
        "last_beat",
        "rtt",
        "seen",
        "session",
        "takeovers",
    )

    def __init__(self) -> None:
        self.declared: float | None = None
        self.session: str | None = None
        self.last_beat = -math.inf
        self.interval: float | None = None
        self.avg: float | None = None
        self.rtt: float | None = None
        self.seen = False
        # Made on first use: an agent that never reconnects holds no deque (~0.7 KiB each).
        self.attaches: collections.deque[float] | None = None
        self.takeovers: collections.deque[float] | None = None


class HubEvents:
    """The feed and the measurements (``hub.events``). Every method is non-blocking."""

    def __init__(self, recent: int = 500, max_subscribers: int = 256) -> None:
        self.recent: collections.deque[HubEvent] = collections.deque(maxlen=recent)
        self.max_subscribers = max_subscribers
        self._subscribers: set[EventSubscription] = set()
        self._measures: dict[tuple[str, str], _Measure] = {}
        self.emitted = 0

    # --- subscribing --------------------------------------------------------

    @contextmanager
    def subscribe(
        self, max_queued: int = 256, *, tenant_id: str | None = None
    ) -> Iterator[EventSubscription]:
        """A bounded subscription for the block (only ``tenant_id``'s events, if given).

        Raises :class:`RuntimeError` when ``max_subscribers`` are already subscribed.
        """
        if max_queued < 1:
            raise ValueError("max_queued must be >= 1")
        if len(self._subscribers) >= self.max_subscribers:
            raise RuntimeError(f"at most {self.max_subscribers} event subscribers")
        subscription = EventSubscription(max_queued, tenant_id)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def emit(self, event: HubEvent) -> None:
        """Record ``event`` and offer it to every subscriber."""
        self.emitted += 1
        self.recent.append(event)
        for subscription in self._subscribers:
            subscription._offer(event)

    # --- the hub's calls -------------------------------------------------------

    def presence(
        self,
        tenant_id: str,
        agent_id: str,
        status: str,
        reason: str,
        session_id: str | None,
        time: float,
        *,
        hub_id: str | None = None,
        local: bool = True,
    ) -> None:
        self.emit(
            PresenceTransition(
                time=time,
                tenant_id=tenant_id,
                agent_id=agent_id,
                status=status,
                reason=reason,
                session_id=session_id,
                hub_id=hub_id,
                local=local,
            )
        )

    def attached(
        self,
        tenant_id: str,
        agent_id: str,
        session_id: str,
        replaced: str | None,
        interval: float | None,
        time: float,
    ) -> None:
        """A session became the agent's live one (``replaced``: the session it took over;
        ``interval``: its effective heartbeat interval)."""
        now = trio.current_time()
        measure = self._measure(tenant_id, agent_id)
        if measure.seen:
            if measure.attaches is None:
                measure.attaches = collections.deque(maxlen=_MAX_STAMPS)
            measure.attaches.append(now)
        measure.seen = True
        measure.session = session_id
        measure.last_beat = -math.inf
        measure.interval = measure.avg = None
        measure.declared = interval
        if replaced is not None:
            if measure.takeovers is None:
                measure.takeovers = collections.deque(maxlen=_MAX_STAMPS)
            measure.takeovers.append(now)
            self.emit(
                TakeOver(
                    time=time,
                    tenant_id=tenant_id,
                    agent_id=agent_id,
                    old_session_id=replaced,
                    new_session_id=session_id,
                )
            )

    def heartbeat(self, row: Any, session_id: str, rtt: float | None) -> None:
        """A heartbeat arrived on the session whose presence ``row`` (with ``tenant_id``
        and ``agent_id``; ``None`` for the admin) it is; ``rtt``: what the agent reported."""
        if row is None:
            return
        measure = self._measures.get((row.tenant_id, row.agent_id))
        if measure is None or measure.session != session_id:
            return  # not the live session (admin, or already replaced)
        now = trio.current_time()
        if measure.last_beat > -math.inf:
            interval = now - measure.last_beat
            measure.interval = interval
            avg = measure.avg
            measure.avg = interval if avg is None else 0.875 * avg + 0.125 * interval
        measure.last_beat = now
        if rtt is not None and math.isfinite(rtt) and rtt >= 0:
            measure.rtt = rtt

    def slow_consumer(
        self, tenant_id: str, agent_id: str, session_id: str, reason: str, time: float
    ) -> None:
        tenant = None if tenant_id == "*" else tenant_id  # "*": the admin channel
        self.emit(
            SlowConsumerCut(
                time=time,
                tenant_id=tenant,
                agent_id=agent_id,
                session_id=session_id,
                reason=reason,
            )
        )

    def auth_failure(self, address: str, code: str, failures: int, time: float) -> None:
        self.emit(AuthFailure(time=time, address=address, code=code, failures=failures))

    # --- reading -------------------------------------------------------------

    def measures(self, tenant_id: str, agent_id: str) -> AgentMeasures:
        """The agent's measurements now (zero counts for an agent never seen)."""
        measure = self._measures.get((tenant_id, agent_id))
        if measure is None:
            return AgentMeasures(None, None, None, None, 0, 0)
        since = trio.current_time() - WINDOW
        for stamps in (measure.attaches, measure.takeovers):
            while stamps and stamps[0] < since:
                stamps.popleft()
        attaches, takeovers = measure.attaches, measure.takeovers
        return AgentMeasures(
            declared_interval=measure.declared,
            heartbeat_interval=measure.interval,
            heartbeat_interval_avg=measure.avg,
            rtt=measure.rtt,
            reconnects=len(attaches) if attaches is not None else 0,
            takeovers=len(takeovers) if takeovers is not None else 0,
        )

    def _measure(self, tenant_id: str, agent_id: str) -> _Measure:
        key = (tenant_id, agent_id)
        measure = self._measures.get(key)
        if measure is None:
            measure = self._measures[key] = _Measure()
        return measure
