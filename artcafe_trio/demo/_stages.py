"""The script: the five stages, each a fault injected and the checks of what followed."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import trio

from ._cast import Member
from ._judge import Check
from ._observe import Observer
from ._output import _Output
from ._plan import (
    CLOSE_HANDSHAKE,
    CONNECT_BOUND,
    EARLY,
    FLAKY,
    HUNG,
    LATE,
    LEAVER,
    MIN_PAUSE,
    MONITOR,
    Plan,
    stage_estimates,
)

__all__ = ["Script", "check_alerts"]


class Script:
    """Runs the stages in order (:meth:`run`) and collects their :class:`Check` values."""

    def __init__(
        self,
        plan: Plan,
        output: _Output,
        watch: Observer,
        start: Callable[[Member], Awaitable[None]],
    ) -> None:
        self.plan = plan
        self.out = output
        self.watch = watch
        self.members = watch.members
        self.start = start  # starts one member's agent (returns once it is connected)
        self.started = output.started
        self.checks: list[Check] = []
        self.stage_text = "starting"

    def stage(self, number: int, name: str, text: str) -> None:
        self.stage_text = f"stage {number}/5 {name}: {text}"
        rule = self.out.glyph_rule * 3
        self.out.event("stage", f"{rule} {number}/5 {name} {rule} {text}")

    async def run(self) -> bool:
        """Run the stages; False if the demo could not get going."""
        plan = self.plan
        est = stage_estimates(plan.interval)
        next_at = self.started
        if not await self.stage_online():
            self.stage_text = "stopped: not every agent came online"
            return False
        for name, run in (
            ("online", None),
            ("hang", self.stage_hang),
            ("blip", self.stage_blip),
            ("outage", self.stage_outage),
            ("leave", self.stage_leave),
        ):
            if run is not None:
                await run()
            next_at = max(next_at + est[name] + plan.pause, time.time() + MIN_PAUSE)
            await self.watch.sleep_until(next_at)
        self.stage_text = "done"
        return True

    async def stage_online(self) -> bool:
        plan = self.plan
        self.stage(
            1,
            "online",
            f"{len(self.members)} agents connect, authenticate with their keys and "
            f"heartbeat every {plan.interval:g} s",
        )
        monitor = self.members[MONITOR]
        others = [m for m in self.members.values() if m.name != MONITOR]
        began = time.time()
        with trio.move_on_after(CONNECT_BOUND):
            await self.start(monitor)
            self.out.event("online", f"{MONITOR} is online, watching $presence.> for the others")
            async with trio.open_nursery() as starting:
                for member in others:
                    starting.start_soon(self.start, member)

            def all_seen() -> bool:
                return len(self.watch.seen_online()) == len(others)

            await self.watch.wait_until(all_seen, bound=LATE + 1)
        seen = self.watch.seen_online()
        self.checks.append(
            Check(
                event="online: monitor sees every agent",
                expectation=f"{len(others)} online events (within {CONNECT_BOUND:g} s)",
                low=len(others),
                high=len(others),
                measured=len(seen),
                unit="",
                note=(
                    f"all online {max(e.time for e in seen.values()) - began:.2f} s "
                    "after they started connecting"
                    if len(seen) == len(others)
                    else "missing: " + ", ".join(m.name for m in others if m.name not in seen)
                ),
            )
        )
        return len(seen) == len(others)

    async def stage_hang(self) -> None:
        plan = self.plan
        member = self.members[HUNG]
        agent = member.agent
        assert agent is not None
        self.stage(
            2,
            "hang",
            f"{HUNG} hangs: nothing it sends arrives, nothing reaches it, "
            "but its TCP socket stays open",
        )
        # Hang just after a heartbeat was answered: the hub's last frame and the agent's
        # last ACK are then the same heartbeat, so neither deadline races one in flight.
        acked = agent.health().last_ack
        await self.watch.wait_until(
            lambda: agent.health().last_ack != acked, bound=plan.interval + 1
        )
        member.lost_at = None
        silenced = time.time()
        member.link.hang()
        self.out.event("fault", f"{HUNG}: connection blackholed both ways (socket still open)")
        event = await self.watch.wait_presence(
            HUNG, "offline", after=silenced, bound=plan.timeout + LATE + 1
        )
        measured: float | None = None
        note = ""
        problem = None
        if event is not None:
            last_frame = self.watch.last_seen.get(event.session_id or "")
            if last_frame is not None:
                measured = event.time - last_frame
            note = (
                f"offline {event.time - silenced:.2f} s after the hang began; "
                f"the monitor's ALERT came {self.watch.alert_delay(event)} later"
            )
            if event.reason != "timeout":
                problem = f"reason was {event.reason!r}, expected 'timeout'"
        self.checks.append(
            Check(
                event=f"hang: hub says {HUNG} offline",
                expectation=f"timeout, {plan.timeout:.2f} s after its last frame",
                low=plan.timeout - EARLY,
                high=plan.timeout + LATE,
                measured=measured,
                note=note,
                problem=problem,
            )
        )
        lost = await self.watch.wait_until(
            lambda: member.lost_at is not None, bound=plan.timeout + LATE
        )
        watchdog: float | None = None
        if lost is not None and member.lost_at is not None and member.ack_before_loss is not None:
            watchdog = member.lost_at - member.ack_before_loss
        back = await self.watch.wait_presence(
            HUNG, "online", after=silenced, bound=CLOSE_HANDSHAKE + plan.interval * 2 + LATE + 2
        )
        self.checks.append(
            Check(
                event=f"hang: {HUNG}'s own ACK watchdog",
                expectation=f"fires {plan.timeout:.2f} s after its last ACK",
                low=plan.timeout - EARLY,
                high=plan.timeout + LATE,
                measured=watchdog,
                note=(
                    "from health().last_disconnect; "
                    + (
                        f"it was back online {back.time - silenced:.2f} s after the hang began"
                        if back is not None
                        else "it did not come back online"
                    )
                ),
            )
        )

    async def stage_blip(self) -> None:
        plan = self.plan
        member = self.members[FLAKY]
        agent = member.agent
        assert agent is not None
        self.stage(
            3,
            "blip",
            f"{FLAKY}'s TCP connection is reset; it reconnects within the "
            f"{plan.grace:g} s disconnect grace",
        )
        old_session = agent.session_id
        cut = time.time()
        member.link.reset()
        self.out.event("fault", f"{FLAKY}: TCP connection reset (RST); the network stays up")

        def reconnected() -> bool:
            session = agent.session_id
            return session is not None and session != old_session

        back = await self.watch.wait_until(reconnected, bound=plan.grace + LATE + 1)
        await self.watch.sleep_until(cut + plan.grace + 0.25)  # past the grace: would it flap?
        flaps = [
            seen.event
            for seen in self.watch.presence
            if seen.event.agent_id == FLAKY and seen.event.time >= cut
        ]
        self.checks.append(
            Check(
                event="blip: no flap",
                expectation=f"back within the {plan.grace:.2f} s grace",
                low=0.0,
                high=plan.grace,
                measured=None if back is None else back - cut,
                note="time from the reset to its new session; no presence event was sent"
                if not flaps
                else "",
                problem=(
                    "presence flapped: " + ", ".join(f"{e.status} ({e.reason})" for e in flaps)
                    if flaps
                    else None
                ),
            )
        )

    async def stage_outage(self) -> None:
        plan = self.plan
        member = self.members[FLAKY]
        agent = member.agent
        assert agent is not None
        self.stage(
            4,
            "outage",
            f"{FLAKY} loses its network for longer than the {plan.grace:g} s grace",
        )
        member.link.network_up = False
        refused_before = member.link.refused
        cut = time.time()
        member.link.reset()
        self.out.event("fault", f"{FLAKY}: TCP connection reset; network down (dials fail)")
        event = await self.watch.wait_presence(
            FLAKY, "offline", after=cut, bound=plan.grace + LATE + 1
        )
        problem = None
        if event is not None and event.reason != "disconnected":
            problem = f"reason was {event.reason!r}, expected 'disconnected'"
        self.checks.append(
            Check(
                event=f"outage: hub says {FLAKY} offline",
                expectation=f"disconnected, {plan.grace:.2f} s after the reset",
                low=plan.grace - EARLY,
                high=plan.grace + LATE,
                measured=None if event is None else event.time - cut,
                note=""
                if event is None
                else f"the monitor's ALERT came {self.watch.alert_delay(event)} later",
                problem=problem,
            )
        )
        await self.watch.sleep_until(max(time.time(), cut + plan.grace) + plan.interval)
        health = agent.health()
        pending = health.next_retry_in
        attempt = health.reconnect_attempts
        refused = member.link.refused - refused_before
        restored = time.time()
        member.link.network_up = True
        self.out.event(
            "fault",
            f"{FLAKY}: network back after {restored - cut:.1f} s "
            + (
                f"(its attempt {attempt} is due in {pending:.2f} s)"
                if pending is not None
                else "(an attempt is under way)"
            ),
        )
        back = await self.watch.wait_presence(
            FLAKY, "online", after=restored, bound=plan.backoff.cap + LATE + 2
        )
        due = pending if pending is not None else 0.0
        self.checks.append(
            Check(
                event=f"outage: {FLAKY} back online",
                expectation=f"when its backoff ends ({due:.2f} s)",
                low=due - EARLY,
                high=due + LATE,
                measured=None if back is None else back.time - restored,
                note=(
                    f"time from the network's return; {refused} dials had failed while it was "
                    f"down (backoff: full jitter, {plan.backoff.base:g} s doubling up to "
                    f"{plan.backoff.cap:g} s)"
                ),
            )
        )

    async def stage_leave(self) -> None:
        member = self.members[LEAVER]
        self.stage(
            5, "leave", f"{LEAVER} finishes its work and leaves (exits its open_agent block)"
        )
        asked = time.time()
        member.stop.set()
        event = await self.watch.wait_presence(LEAVER, "offline", after=asked, bound=LATE + 2)
        problem = None
        if event is not None and event.reason != "left":
            problem = f"reason was {event.reason!r}, expected 'left'"
        self.checks.append(
            Check(
                event=f"leave: hub says {LEAVER} offline",
                expectation="left, immediately",
                low=0.0,
                high=LATE,
                measured=None if event is None else event.time - asked,
                problem=problem,
            )
        )


def check_alerts(alerts: list[tuple[str, str]]) -> Check:
    """The monitor raised one ALERT per staged offline (agent, reason), no more."""
    expected = [(HUNG, "timeout"), (FLAKY, "disconnected"), (LEAVER, "left")]
    got = list(alerts)
    missing = [e for e in expected if e not in got]
    extra = [a for a in got if a not in expected or got.count(a) > 1]
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(f"{a} ({r})" for a, r in missing))
    if extra:
        problems.append("unexpected: " + ", ".join(f"{a} ({r})" for a, r in extra))
    return Check(
        event="monitor: one ALERT per offline",
        expectation=f"{len(expected)} ALERTs: timeout, disconnected, left",
        low=len(expected),
        high=len(expected),
        measured=len(got),
        unit="",
        problem="; ".join(problems) or None,
    )
