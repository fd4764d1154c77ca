"""The cluster demo's script: four stages across three hubs, each with its checks."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from artcafe_trio import Agent, PresenceRecord

from ._cast import Member
from ._judge import Check
from ._observe import Observer
from ._output import _Output
from ._plan import CONNECT_BOUND, EARLY, LATE, MIN_PAUSE, MONITOR, Plan

__all__ = ["STRANDED", "ClusterScript", "Topology", "check_cluster_alerts"]

STRANDED = "lost-worker"
"""The killed hub's agent that does not come back (its network stays down)."""
PING_SUBJECT = "across.hubs"
KILLED = "h3"


@attrs.define
class Topology:
    """Where each agent is, and how to reach and kill the hubs."""

    ports: dict[str, int]
    """Hub id -> its WebSocket port."""
    hub_of: dict[str, str]
    """Agent name -> the hub it is connected to."""
    ttl: float
    grace: float
    tables: Callable[[Sequence[str]], Awaitable[dict[str, list[PresenceRecord]]]]
    """The presence table of each named hub."""
    kill: Callable[[], None]
    """SIGKILL the hub process :data:`KILLED`."""


class ClusterScript:
    """Runs the cluster stages (:meth:`run`) and collects their :class:`Check` values."""

    def __init__(
        self,
        plan: Plan,
        output: _Output,
        watch: Observer,
        start: Callable[[Member], Awaitable[None]],
        topology: Topology,
    ) -> None:
        self.plan = plan
        self.out = output
        self.watch = watch
        self.members = watch.members
        self.start = start
        self.topo = topology
        self.checks: list[Check] = []
        self.pings: dict[str, list[float]] = {}
        self.stage_text = "starting"

    def on_ping(self, name: str) -> Callable[[str, object], None]:
        def handler(subject: str, data: object) -> None:
            self.pings.setdefault(name, []).append(time.time())

        return handler

    def stage(self, number: int, name: str, text: str) -> None:
        self.stage_text = f"stage {number}/4 {name}: {text}"
        rule = self.out.glyph_rule * 3
        self.out.event("stage", f"{rule} {number}/4 {name} {rule} {text}")

    async def run(self) -> bool:
        """Run the stages; False if the demo could not get going."""
        if not await self.stage_online():
            self.stage_text = "stopped: not every agent came online"
            return False
        for run in (self.stage_across, self.stage_table, self.stage_kill):
            await trio.sleep(max(self.plan.pause, MIN_PAUSE))
            await run()
        self.stage_text = "done"
        return True

    def monitor(self) -> Agent:
        agent = self.members[MONITOR].agent
        assert agent is not None
        return agent

    async def stage_online(self) -> bool:
        hubs = sorted(self.topo.ports)
        self.stage(1, "online", f"{len(self.members)} agents connect, spread over {hubs}")
        others = [m for m in self.members.values() if m.name != MONITOR]
        began = time.time()
        with trio.move_on_after(CONNECT_BOUND):
            await self.start(self.members[MONITOR])
            async with trio.open_nursery() as starting:
                for member in others:
                    starting.start_soon(self.start, member)
            await self.watch.wait_until(
                lambda: len(self.watch.seen_online()) == len(others), bound=LATE + 1
            )
        seen = self.watch.seen_online()
        far = [m.name for m in others if self.topo.hub_of[m.name] != self.topo.hub_of[MONITOR]]
        self.checks.append(
            Check(
                event="online: monitor sees every agent",
                expectation=f"{len(others)} online events, {len(far)} from other hubs",
                low=len(others),
                high=len(others),
                measured=len(seen),
                unit="",
                note=(
                    f"all online {max(e.time for e in seen.values()) - began:.2f} s after "
                    f"they started connecting; {MONITOR} is on {self.topo.hub_of[MONITOR]}"
                    if len(seen) == len(others)
                    else "missing: " + ", ".join(m.name for m in others if m.name not in seen)
                ),
            )
        )
        return len(seen) == len(others)

    async def stage_across(self) -> None:
        hub = self.topo.hub_of[MONITOR]
        self.stage(2, "across", f"{MONITOR} on {hub} publishes {PING_SUBJECT}: every hub delivers")
        receivers = [name for name in self.members if name != MONITOR]
        self.pings.clear()
        sent = time.time()
        await self.monitor().publish(PING_SUBJECT, {"from": hub})
        await self.watch.wait_until(
            lambda: all(name in self.pings for name in receivers), bound=LATE + 1
        )
        missing = [name for name in receivers if name not in self.pings]
        twice = [name for name, times in self.pings.items() if len(times) > 1]
        latest = max((times[0] for times in self.pings.values()), default=None)
        problems = []
        if missing:
            problems.append("not received by " + ", ".join(missing))
        if twice:
            problems.append("received twice by " + ", ".join(twice))
        self.checks.append(
            Check(
                event="across: one publish reaches every hub",
                expectation=f"{len(receivers)} agents on 3 hubs, once each",
                low=0.0,
                high=LATE,
                measured=None if latest is None or missing else latest - sent,
                note="time from the publish to the last agent's delivery",
                problem="; ".join(problems) or None,
            )
        )

    def expected_online(self) -> set[tuple[str, str | None]]:
        """(agent, session) of every agent connected now, as the agents themselves say."""
        online = set()
        for member in self.members.values():
            if member.agent is not None and member.health is not None and member.health.connected:
                online.add((member.name, member.agent.session_id))
        return online

    async def check_tables(self, event: str, hubs: Sequence[str]) -> None:
        """Every hub of ``hubs`` shows the same table: the agents' own view of who is online."""
        began = time.time()
        agreeing: list[str] = []
        counts: dict[str, int] = {}
        with trio.move_on_after(LATE + 1):
            while True:
                expected = self.expected_online()
                tables = await self.topo.tables(hubs)
                agreeing = []
                for name, records in tables.items():
                    online = {(r.agent_id, r.session_id) for r in records if r.status == "online"}
                    counts[name] = len(online)
                    if online == expected:
                        agreeing.append(name)
                if len(agreeing) == len(hubs):
                    break
                await trio.sleep(0.1)
        detail = ", ".join(f"{name}: {counts.get(name, 0)} online" for name in hubs)
        self.checks.append(
            Check(
                event=event,
                expectation=f"the same table on {len(hubs)} hubs",
                low=len(hubs),
                high=len(hubs),
                measured=len(agreeing),
                unit="",
                note=f"{detail} (agreed {time.time() - began:.2f} s after the first query)",
            )
        )

    async def stage_table(self) -> None:
        hubs = sorted(self.topo.ports)
        self.stage(3, "table", f"the presence table, asked of each of {hubs}")
        await self.check_tables("table: one presence table", hubs)

    async def stage_kill(self) -> None:
        topo = self.topo
        survivors = sorted(h for h in topo.ports if h != KILLED)
        victims = [name for name, hub in topo.hub_of.items() if hub == KILLED]
        movers = [name for name in victims if name != STRANDED]
        self.stage(
            4,
            "kill",
            f"hub {KILLED} is SIGKILLed; {len(movers)} of its agents reconnect to "
            f"{' and '.join(survivors)}, {STRANDED} cannot",
        )
        sessions = {name: self.members[name].agent.session_id for name in victims}  # type: ignore[union-attr]
        for number, name in enumerate(movers):
            target = survivors[number % len(survivors)]
            self.members[name].link.port = topo.ports[target]
            topo.hub_of[name] = target
        self.members[STRANDED].link.network_up = False
        killed = time.time()
        topo.kill()
        self.out.event("fault", f"hub {KILLED} killed (SIGKILL): no handover, its lease lapses")

        def moved() -> bool:
            return all(
                self.members[n].agent.session_id not in (None, sessions[n])  # type: ignore[union-attr]
                for n in movers
            )

        back = await self.watch.wait_until(moved, bound=topo.grace + LATE + 1)
        for name in movers:
            session = self.members[name].agent.session_id  # type: ignore[union-attr]
            self.out.event("agent", f"{name} is now on {topo.hub_of[name]} (session {session})")
        event = await self.watch.wait_presence(
            STRANDED, "offline", after=killed, bound=topo.ttl + topo.grace + LATE + 2
        )
        flaps = [
            s.event
            for s in self.watch.presence
            if s.event.agent_id in movers and s.received >= killed
        ]
        self.checks.append(
            Check(
                event=f"kill: {len(movers)} agents move hubs",
                expectation=f"within the {topo.grace:.2f} s grace, no presence event",
                low=0.0,
                high=topo.grace,
                measured=None if back is None else back - killed,
                note=f"time from the kill until {', '.join(movers)} had new sessions",
                problem=(
                    "presence events: " + ", ".join(f"{e.agent_id} {e.status}" for e in flaps)
                    if flaps
                    else None
                ),
            )
        )
        expected = topo.ttl + topo.grace
        problem = None
        if event is not None and event.reason != "hub_lost":
            problem = f"reason was {event.reason!r}, expected 'hub_lost'"
        self.checks.append(
            Check(
                event=f"kill: {STRANDED} reported offline",
                expectation=f"hub_lost, lease TTL + grace ({expected:.2f} s) after the kill",
                low=topo.ttl * 2 / 3 + topo.grace - EARLY,
                high=expected + LATE,
                measured=None if event is None else event.time - killed,
                note=f"the lease is refreshed every TTL / 3 = {topo.ttl / 3:.2f} s: it lapses "
                f"{topo.ttl * 2 / 3:.2f}..{topo.ttl:.2f} s after the kill; a surviving hub "
                "then waits the grace and reaps"
                + (
                    ""
                    if event is None
                    else f"; the monitor's ALERT came {self.watch.alert_delay(event)} later"
                ),
                problem=problem,
            )
        )
        await self.check_tables("kill: survivors agree", survivors)


def check_cluster_alerts(alerts: list[tuple[str, str]]) -> Check:
    """The monitor raised one ALERT, for the stranded agent (hub_lost), no more."""
    expected = [(STRANDED, "hub_lost")]
    extra = [a for a in alerts if a not in expected or alerts.count(a) > 1]
    missing = [a for a in expected if a not in alerts]
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(f"{a} ({r})" for a, r in missing))
    if extra:
        problems.append("unexpected: " + ", ".join(f"{a} ({r})" for a, r in extra))
    return Check(
        event="monitor: one ALERT per offline",
        expectation=f"1 ALERT: {STRANDED} hub_lost",
        low=1,
        high=1,
        measured=len(alerts),
        unit="",
        problem="; ".join(problems) or None,
    )
