"""What the demo sees: the monitor's presence events, the hub's presence table and every
agent's ``health()``, sampled; and waiting for what it expects to see."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from artcafe_trio import AgentHealth, Hub, PresenceEvent, ProtocolError

from ._cast import Member
from ._output import _Output
from ._plan import EARLY, SAMPLE_PERIOD, TENANT

__all__ = ["Observer"]


@attrs.frozen
class _Seen:
    """A presence event as the monitor received it."""

    event: PresenceEvent
    received: float


class Observer:
    """The demo's observations, shared by the script (which waits on them) and the screen."""

    def __init__(self, output: _Output, members: dict[str, Member]) -> None:
        self.out = output
        self.members = members
        self.hub: Hub | None = None
        self.presence: list[_Seen] = []
        self._presence_changed = trio.Event()
        self.alerts: list[tuple[str, str]] = []
        self.last_seen: dict[str, float] = {}  # session id -> hub's last frame time
        self.finished = False

    def on_presence(self, subject: str, data: Any) -> None:
        """The monitor's handler for ``$presence.>``."""
        try:
            event = PresenceEvent.from_data(data)
        except ProtocolError as exc:
            self.out.event("log", f"monitor: unreadable presence event on {subject}: {exc}")
            return
        if self.finished:
            return
        self.presence.append(_Seen(event, time.time()))
        self._presence_changed.set()
        self._presence_changed = trio.Event()
        if event.status == "offline":
            self.alerts.append((event.agent_id, event.reason))
            self.out.event("ALERT", f"{event.agent_id} is offline: {event.reason}")
        else:
            self.out.event("online", f"{event.agent_id} is online ({event.reason})")

    async def sample(self) -> None:
        """Watch the hub's presence table and every agent's health()."""
        assert self.hub is not None
        while True:
            now = time.time()
            for record in self.hub.presence_table(TENANT):
                if record.status == "online" and record.session_id and record.last_seen:
                    self.last_seen[record.session_id] = record.last_seen
            for member in self.members.values():
                if member.agent is not None:
                    self.observe(member, member.agent.health(), now)
            await trio.sleep(SAMPLE_PERIOD)

    def observe(self, member: Member, health: AgentHealth, now: float) -> None:
        before, member.health = member.health, health
        if before is None or self.finished or member.stop.is_set():
            return
        name = member.name
        # A loss and its reconnection can both fall between two samples: a new session
        # id says so, and health() keeps when and why the old connection ended.
        replaced = health.connected and health.session_id != before.session_id
        if before.connected and (not health.connected or replaced):
            ended = health.last_disconnect
            lost_at = ended.timestamp() if ended is not None else now
            ack = before.last_ack.timestamp() if before.last_ack is not None else None
            member.lost_at, member.ack_before_loss = lost_at, ack
            silent = None if ack is None else lost_at - ack
            timeout = before.heartbeat_timeout
            if silent is not None and timeout is not None and silent >= timeout - EARLY:
                why = f"no heartbeat ACK for {silent:.2f} s: its own watchdog drops the connection"
            else:
                why = f"its connection is gone ({health.last_disconnect_reason or 'no reason'})"
            self.out.event("agent", f"{name}: {why} (health(): {health.state})")
        if health.connected and (not before.connected or replaced):
            self.out.event("agent", f"{name}: connected again (session {health.session_id})")

    async def wait_presence(
        self, agent_id: str, status: str, *, after: float, bound: float
    ) -> PresenceEvent | None:
        """The first presence event of ``agent_id`` with ``status`` at or after ``after``."""
        with trio.move_on_after(bound):
            while True:
                changed = self._presence_changed
                for seen in self.presence:
                    event = seen.event
                    if (event.agent_id, event.status) == (agent_id, status) and event.time >= after:
                        return event
                await changed.wait()
        return None

    async def wait_until(self, condition: Callable[[], bool], *, bound: float) -> float | None:
        """Poll ``condition``; the wall time it became true, or None after ``bound`` s."""
        with trio.move_on_after(bound):
            while True:
                if condition():
                    return time.time()
                await trio.sleep(SAMPLE_PERIOD / 2)
        return None

    async def sleep_until(self, wall: float) -> None:
        await trio.sleep(max(0.0, wall - time.time()))

    def alert_delay(self, event: PresenceEvent) -> str:
        for seen in self.presence:
            if seen.event is event:
                return f"{(seen.received - event.time) * 1000:.0f} ms"
        return "?"

    def seen_online(self) -> dict[str, PresenceEvent]:
        """The first online event the monitor saw for each agent."""
        seen: dict[str, PresenceEvent] = {}
        for item in self.presence:
            if item.event.status == "online":
                seen.setdefault(item.event.agent_id, item.event)
        return seen
