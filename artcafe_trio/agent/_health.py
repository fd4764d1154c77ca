"""The agent's state and health: :class:`AgentState`, the counters the components
update, and the frozen :class:`AgentHealth` snapshot users read."""

from __future__ import annotations

import datetime
import enum
from collections.abc import Callable

import attrs

__all__ = ["AgentHealth", "AgentState", "HealthStats", "Link"]


class AgentState(enum.StrEnum):
    """Where the agent is in its life (a ``str``: ``agent.state == "connected"`` works)."""

    NOT_STARTED = "not_started"  # built, not running yet (before ``run()``)
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@attrs.frozen
class AgentHealth:
    """A snapshot of the agent's connection health (``agent.health()``).

    ``state`` is one of ``"not_started"`` (before the agent runs), ``"connecting"``,
    ``"connected"``, ``"reconnecting"``, ``"closed"`` (the values of :class:`AgentState`).
    ``last_disconnect`` and ``last_disconnect_reason`` say when and why the last
    connection ended; they stay after the reconnection, so a poll that missed a short
    outage still sees it (with a new ``session_id``).
    """

    state: str
    connected: bool
    healthy: bool
    session_id: str | None
    connected_since: datetime.datetime | None
    last_ack: datetime.datetime | None
    seconds_since_ack: float | None
    rtt: float | None
    rtt_smoothed: float | None
    reconnect_attempts: int
    total_reconnects: int  # successful reconnections since the agent started
    next_retry_in: float | None
    waiting_publishes: int
    messages_in: int
    messages_out: int
    messages_dropped: int
    handler_errors: int
    heartbeat_interval: float | None
    heartbeat_timeout: float | None
    url: str | None = None  # the hub URL of the current connection
    last_disconnect: datetime.datetime | None = None  # when the last connection ended
    last_disconnect_reason: str | None = None  # why, e.g. "no heartbeat ACK for 90 s"


AgentHealth.__module__ = AgentState.__module__ = "artcafe_trio"


def _iso(moment: float | None) -> datetime.datetime | None:
    if moment is None:
        return None
    return datetime.datetime.fromtimestamp(moment, tz=datetime.UTC)


@attrs.define
class Link:
    """What the snapshot needs of the current connection."""

    session_id: str
    heartbeat_interval: float | None
    heartbeat_timeout: float | None
    url: str


class HealthStats:
    """The counters and clocks behind :class:`AgentHealth`, updated by the supervisor,
    the receiver, the sender and the dispatchers."""

    def __init__(self, wall_clock: Callable[[], float]) -> None:
        self.wall_clock = wall_clock
        self.failures = 0  # failed attempts since the last healthy connection
        self.total_reconnects = 0
        self.next_retry_at: float | None = None
        self.last_ack: float | None = None
        self.last_ack_wall: float | None = None
        self.connected_since_wall: float | None = None
        self.disconnected_wall: float | None = None
        self.disconnect_reason: str | None = None
        self.rtt: float | None = None
        self.rtt_smoothed: float | None = None
        self.messages_in = 0
        self.messages_out = 0
        self.messages_dropped = 0
        self.handler_errors = 0

    def acked(self, now: float, rtt: float | None, rtt_smoothed: float | None) -> None:
        if rtt is not None:
            self.rtt, self.rtt_smoothed = rtt, rtt_smoothed
        self.last_ack = now
        self.last_ack_wall = self.wall_clock()

    def disconnected(self, reason: str | None) -> None:
        """A connection that was welcomed has ended (``reason`` None until it is known)."""
        self.disconnected_wall = self.wall_clock()
        self.disconnect_reason = reason

    def lost_because(self, cause: BaseException) -> None:
        """What ended it, once known; a stopping agent's reason stays "agent stopped"."""
        if self.disconnect_reason is None:
            self.disconnect_reason = str(cause) or type(cause).__name__

    def snapshot(
        self, state: AgentState, link: Link | None, now: float | None, waiting_publishes: int
    ) -> AgentHealth:
        """``now`` is trio's clock, or None outside the agent's trio run (ages are then
        measured on the wall clock)."""
        if now is not None:
            last_ack, moment = self.last_ack, now
        else:
            last_ack, moment = self.last_ack_wall, self.wall_clock()
        since = None if last_ack is None else max(0.0, moment - last_ack)
        timeout = link.heartbeat_timeout if link else None
        healthy = link is not None and (timeout is None or (since is not None and since < timeout))
        return AgentHealth(
            state=state.value,
            connected=link is not None,
            healthy=healthy,
            session_id=link.session_id if link else None,
            connected_since=_iso(self.connected_since_wall) if link else None,
            last_ack=_iso(self.last_ack_wall),
            seconds_since_ack=since,
            rtt=self.rtt,
            rtt_smoothed=self.rtt_smoothed,
            reconnect_attempts=self.failures,
            total_reconnects=self.total_reconnects,
            next_retry_in=None
            if self.next_retry_at is None or now is None
            else max(0.0, self.next_retry_at - now),
            waiting_publishes=waiting_publishes,
            messages_in=self.messages_in,
            messages_out=self.messages_out,
            messages_dropped=self.messages_dropped,
            handler_errors=self.handler_errors,
            heartbeat_interval=link.heartbeat_interval if link else None,
            heartbeat_timeout=timeout,
            url=link.url if link else None,
            last_disconnect=_iso(self.disconnected_wall),
            last_disconnect_reason=self.disconnect_reason,
        )
