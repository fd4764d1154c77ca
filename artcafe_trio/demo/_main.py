"""``artcafe-trio demo``: the whole system in one process, in about 25 seconds.

A real hub on a localhost TCP port, a temporary SQLite registry, fresh
ed25519 keys and a handful of agents, all in one trio process. The script
stages what honest presence is for::

    1/5 online   every agent connects and heartbeats; a monitor watches $presence.>
    2/5 hang     one agent's connection goes silent both ways, socket still open:
                 the hub says offline (timeout); the agent's own ACK watchdog fires too
    3/5 blip     one agent's TCP connection is reset; it is back within the
                 disconnect grace, so presence does not flap
    4/5 outage   the same agent loses its network for longer than the grace:
                 offline (disconnected), then back through exponential backoff
    5/5 leave    one agent leaves: offline (left) at once

On a terminal a live table is redrawn four times a second; otherwise (CI
logs, pipes) only timestamped event lines are printed. The summary compares
each detection time with its configured expectation, and the exit code is 0
only if all of them were met (1 otherwise, 2 for bad options, 130 on Ctrl+C).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import attrs
import trio
import trio_websocket
from trio_websocket import WebSocketConnection

from .._errors import ArtcafeError, ProtocolError
from .._faulty import FaultyStream
from .._util import collapse_exception_groups, flatten_exceptions
from ..agent._agent import MAX_RECEIVE_BYTES, Agent, AgentHealth, open_agent
from ..hub._hub import Hub, HubConfig, open_hub
from ..protocol._backoff import Backoff
from ..protocol._frames import PresenceEvent
from ..protocol._keys import generate_private_key
from ..registry._registry import Registry

__all__ = ["Check", "Plan", "judge", "main", "make_plan"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

TENANT = "demo"
MONITOR = "monitor"
HUNG = "hung-worker"
FLAKY = "flaky-worker"
LEAVER = "leaving-worker"
TASK_SUBJECT = "tasks.new"

MULTIPLIER = 3.0
"""Heartbeat timeout = interval x this (the library's default multiplier)."""
GRACE_INTERVALS = 2.0
"""The hub's disconnect grace, in heartbeat intervals."""
EARLY = 0.1
"""How much earlier than expected a detection may come (clock granularity)."""
LATE = 1.0
"""How much later than expected a detection may come."""
MIN_INTERVAL, MAX_INTERVAL = 0.1, 10.0
MAX_WORKERS = 100
MIN_PAUSE, DEFAULT_PAUSE = 0.5, 2.5
"""Seconds between stages: the least that keeps the story readable, and the default."""
SAMPLE_PERIOD = 0.02
"""How often the hub's presence table and each agent's health() are sampled."""
REDRAW_PERIOD = 0.25
CONNECT_BOUND = 15.0
"""The most the agents may take to come online."""
CLOSE_HANDSHAKE = 1.0
"""How long an agent waits for the close handshake of a connection it gives up
(``_agent._run_connection``): a hung connection never answers it."""


# --------------------------------------------------------------------------- the plan


@attrs.frozen
class Plan:
    """The demo's settings and timeline (every duration in seconds)."""

    interval: float
    workers: int
    duration: float
    pause: float
    requested: float | None = None

    @property
    def multiplier(self) -> float:
        return MULTIPLIER

    @property
    def timeout(self) -> float:
        return self.interval * MULTIPLIER

    @property
    def grace(self) -> float:
        return self.interval * GRACE_INTERVALS

    @property
    def backoff(self) -> Backoff:
        return Backoff(base=self.interval / 2, cap=self.interval * 2, max_attempts=None)

    @property
    def stretched(self) -> bool:
        """True when the requested duration was too short for the stages."""
        return self.requested is not None and self.duration > self.requested + 1e-9


def stage_estimates(interval: float) -> dict[str, float]:
    """How long each stage takes, in seconds, before the pause that follows it."""
    timeout = interval * MULTIPLIER
    grace = interval * GRACE_INTERVALS
    base, cap = interval / 2, interval * 2
    return {
        "online": 0.5,
        "hang": timeout + CLOSE_HANDSHAKE + base,
        "blip": grace + 0.25,
        "outage": grace + interval + cap,
        "leave": 0.2,
    }


def make_plan(duration: float | None, workers: int, interval: float) -> Plan:
    """Validate the options and fit the timeline into ``duration``.

    Raises ``ValueError`` (a usage error) for options the demo cannot honour.
    A duration too short for the stages is stretched to the minimum (see
    :attr:`Plan.stretched`).
    """
    if not (math.isfinite(interval) and MIN_INTERVAL <= interval <= MAX_INTERVAL):
        raise ValueError(
            f"--interval must be between {MIN_INTERVAL:g} and {MAX_INTERVAL:g} seconds "
            f"for the demo, got {interval:g}"
        )
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"--agents must be between 1 and {MAX_WORKERS}, got {workers}")
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"--duration must be a positive number of seconds, got {duration:g}")
    busy = sum(stage_estimates(interval).values())
    pauses = 5  # after each of the five stages
    total: float
    if duration is None:
        total = math.ceil(busy + pauses * DEFAULT_PAUSE)
    else:
        total = max(duration, busy + pauses * MIN_PAUSE)
    return Plan(
        interval=interval,
        workers=workers,
        duration=total,
        pause=(total - busy) / pauses,
        requested=duration,
    )


# --------------------------------------------------------------------------- the judgement


@attrs.frozen
class Check:
    """One expectation of the script and what was measured.

    ``low``/``high`` bound the measured value (seconds, or a count when
    ``unit`` is empty). ``measured`` is ``None`` when the event was not
    observed at all; ``problem`` fails the check whatever was measured.
    """

    event: str
    expectation: str
    low: float
    high: float
    measured: float | None
    unit: str = "s"
    note: str = ""
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.problem is None
            and self.measured is not None
            and self.low <= self.measured <= self.high
        )

    def measured_text(self) -> str:
        if self.measured is None:
            return "not seen"
        if self.unit:
            return f"{self.measured:.3f} {self.unit}"
        return f"{self.measured:g}"

    def failure(self) -> str:
        """One line saying why the check failed."""
        if self.problem is not None:
            return f"{self.event}: {self.problem}"
        if self.measured is None:
            return f"{self.event}: not observed (expected {self.expectation})"
        if self.unit:
            window = f"{self.low:.2f}..{self.high:.2f} {self.unit}"
        else:
            window = f"{self.low:g}" if self.low == self.high else f"{self.low:g}..{self.high:g}"
        return (
            f"{self.event}: measured {self.measured_text()}, expected {self.expectation} ({window})"
        )


def judge(checks: Sequence[Check], *, color: bool = False) -> tuple[int, list[str]]:
    """The summary lines for ``checks`` and the exit code: 0 only if every check passed."""
    paint = _Paint(color)
    event_width = max([len("event"), *(len(check.event) for check in checks)])
    expected_width = max([len("expected"), *(len(check.expectation) for check in checks)])
    lines = [
        paint.bold("Summary")
        + ": each staged event, what was configured, what was measured"
        + f" (tolerance: {EARLY:.1f} s early, {LATE:.1f} s late)",
        "",
        f"  {'':6}  {'event':{event_width}}  {'expected':{expected_width}}  {'measured':>9}",
    ]
    for check in checks:
        verdict = paint.green("ok    ") if check.ok else paint.red("FAILED")
        lines.append(
            f"  {verdict}  {check.event:{event_width}}  {check.expectation:{expected_width}}"
            f"  {check.measured_text():>9}"
        )
        for note in textwrap.wrap(check.note, 90):
            lines.append(f"  {'':6}  {paint.dim(note)}")
        if check.problem is not None:
            lines.append(f"  {'':6}  {paint.red(check.problem)}")
    lines.append("")
    failed = [check for check in checks if not check.ok]
    if not checks:
        lines.append(paint.red("FAILED: nothing was checked"))
        return EXIT_FAILED, lines
    if not failed:
        lines.append(
            paint.green(f"All {len(checks)} expectations met.")
            + " Presence was honest: every failure was detected when configured."
        )
        return EXIT_OK, lines
    for check in failed:
        lines.append(paint.red(f"FAILED: {check.failure()}"))
    lines.append(f"{len(failed)} of {len(checks)} expectations not met (exit {EXIT_FAILED}).")
    return EXIT_FAILED, lines


# --------------------------------------------------------------------------- output


class _Paint:
    """ANSI styles, or nothing when colour is off."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.on and text else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def red(self, text: str) -> str:
        return self._wrap("31", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def yellow(self, text: str) -> str:
        return self._wrap("33", text)

    def magenta(self, text: str) -> str:
        return self._wrap("35", text)

    def cyan(self, text: str) -> str:
        return self._wrap("36", text)

    def alert(self, text: str) -> str:
        return self._wrap("1;31", text)


@attrs.frozen
class _Line:
    at: float
    tag: str
    text: str


_TAG_STYLE: dict[str, Callable[[_Paint, str], str]] = {
    "stage": _Paint.bold,
    "ALERT": _Paint.alert,
    "online": _Paint.green,
    "agent": _Paint.yellow,
    "fault": _Paint.magenta,
    "hub": _Paint.cyan,
    "log": _Paint.dim,
}


class _Output:
    """Where the demo writes: event lines, and on a terminal a live screen."""

    def __init__(self, stream: TextIO, *, live: bool, color: bool) -> None:
        self.stream = stream
        self.live = live
        self.paint = _Paint(color)
        self.fancy = (getattr(stream, "encoding", None) or "").lower().replace("-", "") in (
            "utf8",
            "utf8sig",
        )
        self.started = time.time()
        self.lines: list[_Line] = []
        self._screen_on = False

    def elapsed(self, at: float | None = None) -> float:
        return (time.time() if at is None else at) - self.started

    def event(self, tag: str, text: str) -> None:
        line = _Line(time.time(), tag, text)
        self.lines.append(line)
        if not self.live:
            self.write(self.format(line))

    def format(self, line: _Line, *, plain: bool = False) -> str:
        text = f"{self.elapsed(line.at):7.2f}s  {line.tag:<6}  {line.text}"
        return text if plain else self.style(line, text)

    def style(self, line: _Line, text: str) -> str:
        style = _TAG_STYLE.get(line.tag)
        return style(self.paint, text) if style else text

    def write(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def enter_screen(self) -> None:
        if self.live and not self._screen_on:
            self._screen_on = True
            self.stream.write("\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J")  # alternate screen, no cursor
            self.stream.flush()

    def leave_screen(self) -> None:
        if self._screen_on:
            self._screen_on = False
            self.stream.write("\x1b[?25h\x1b[?1049l")
            self.stream.flush()

    def draw(self, frame: list[str]) -> None:
        """Redraw the live screen in one write (no blank flash)."""
        self.stream.write("\x1b[H" + "".join(f"{line}\x1b[K\n" for line in frame) + "\x1b[J")
        self.stream.flush()

    @property
    def glyph_x(self) -> str:
        return "\u00d7" if self.fancy else "x"

    @property
    def glyph_rule(self) -> str:
        return "\u2500" if self.fancy else "-"

    @property
    def glyph_none(self) -> str:
        return "\u2014" if self.fancy else "-"


_UNIT = re.compile(r"(\d) (m?s\b)")
"""A number and its unit, kept together when the live view wraps lines."""


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "~"


class _FeedHandler(logging.Handler):
    """Shows the library's warnings as event lines instead of scribbling over the screen."""

    def __init__(self, output: _Output) -> None:
        super().__init__(logging.WARNING)
        self.output = output

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # a broken log call must not break the demo
            text = str(record.msg)
        source = record.name.rsplit(".", 1)[-1]
        level = "" if record.levelno == logging.WARNING else f"{record.levelname}: "
        self.output.event("log", f"{level}{source}: {text}")


@contextlib.contextmanager
def _library_logs_to(output: _Output) -> Iterator[None]:
    logger = logging.getLogger("artcafe_trio")
    handler = _FeedHandler(output)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


# --------------------------------------------------------------------------- transport with faults


class Link:
    """One agent's transport (its ``dial``): a real TCP connection to the hub, wrapped in a
    :class:`~artcafe_trio.testing.FaultyStream`, plus the faults the demo injects."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.network_up = True
        self.refused = 0
        self.stream: FaultyStream | None = None
        self.tcp: trio.SocketStream | None = None

    async def dial(self, nursery: trio.Nursery, resource: str) -> WebSocketConnection:
        await trio.lowlevel.checkpoint()
        if not self.network_up:  # decided after the checkpoint: no stale verdict
            self.refused += 1
            raise OSError(errno.ENETUNREACH, "network is unreachable (simulated outage)")
        tcp = await trio.open_tcp_stream(self.host, self.port)
        stream = FaultyStream(tcp)
        self.tcp, self.stream = tcp, stream
        return await trio_websocket.wrap_client_stream(
            nursery,
            stream,  # type: ignore[arg-type]
            f"{self.host}:{self.port}",
            resource,
            max_message_size=MAX_RECEIVE_BYTES,
        )

    def hang(self) -> None:
        """Blackhole the current connection both ways; the socket stays open."""
        if self.stream is not None:
            self.stream.blackholed = True

    def reset(self) -> None:
        """Drop the current TCP connection abruptly: the hub gets a RST, the agent's
        reads fail at once."""
        if self.tcp is None:
            return
        sock = self.tcp.socket
        linger = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.close()


# --------------------------------------------------------------------------- the cast


class Member:
    """One agent of the demo and what the demo saw of it."""

    def __init__(self, name: str, link: Link, key_path: str) -> None:
        self.name = name
        self.link = link
        self.key_path = key_path
        self.agent: Agent | None = None
        self.stop = trio.Event()
        self.tasks = 0
        self.health: AgentHealth | None = None
        self.lost_at: float | None = None
        self.ack_before_loss: float | None = None

    def on_task(self, subject: str, data: Any) -> None:
        self.tasks += 1


@attrs.frozen
class _Seen:
    """A presence event as the monitor received it."""

    event: PresenceEvent
    received: float


class Demo:
    """The running demo: hub, cast, observations, checks."""

    def __init__(self, plan: Plan, output: _Output, tmp: str) -> None:
        self.plan = plan
        self.out = output
        self.tmp = tmp
        self.paint = output.paint
        self.hub: Hub | None = None
        self.dashboard_url: str | None = None
        self.members: dict[str, Member] = {}
        self.presence: list[_Seen] = []
        self._presence_changed = trio.Event()
        self.alerts: list[tuple[str, str]] = []
        self.last_seen: dict[str, float] = {}  # session id -> hub's last frame time
        self.checks: list[Check] = []
        self.final_rows: list[str] = []
        self.stage_text = "starting"
        self.finished = False
        self.started = output.started
        self._nursery: trio.Nursery | None = None

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    # --- setup -------------------------------------------------------------------

    def cast(self) -> list[str]:
        """Every agent's name: the monitor, the plain workers, the three staged ones."""
        workers = [f"worker-{n}" for n in range(1, self.plan.workers + 1)]
        return [MONITOR, *workers, HUNG, FLAKY, LEAVER]

    def write_keys(self, db: str, host: str) -> None:
        """Generate an ed25519 key per agent (PEM file, mode 0600) and register it."""
        with Registry.open(db) as registry:
            for name in self.cast():
                key = generate_private_key("ed25519")
                path = os.path.join(self.tmp, f"{name}.pem")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key.to_pem())
                registry.add_key(TENANT, name, key.public_key)
                # The port is known once the hub listens.
                self.members[name] = Member(name, Link(host, 0), path)

    # --- agents ------------------------------------------------------------------

    async def run_member(
        self, member: Member, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.hub is not None and self.hub.url is not None
        async with open_agent(
            agent_id=member.name,
            tenant_id=TENANT,
            private_key_path=member.key_path,
            url=self.hub.url,
            heartbeat_interval=self.plan.interval,
            heartbeat_timeout_multiplier=self.plan.multiplier,
            backoff=self.plan.backoff,
            max_reconnect_attempts=None,
            dial=member.link.dial,
        ) as agent:
            member.agent = agent
            member.health = agent.health()
            if member.name == MONITOR:
                await agent.subscribe("$presence.>", self.on_presence)
                task_status.started()
                await self.hand_out_tasks(agent, member.stop)
            else:
                await agent.subscribe("tasks.*", member.on_task)
                task_status.started()
                await member.stop.wait()

    async def hand_out_tasks(self, agent: Agent, stop: trio.Event) -> None:
        """The monitor also publishes one task per interval: pub/sub at work."""
        number = 0
        while not stop.is_set():
            number += 1
            with trio.move_on_after(self.plan.interval):
                await agent.publish(TASK_SUBJECT, {"task": number})
            with trio.move_on_after(self.plan.interval):
                await stop.wait()

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

    # --- observation ---------------------------------------------------------------

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
        if before.connected and not health.connected:
            member.lost_at = now
            member.ack_before_loss = before.last_ack.timestamp() if before.last_ack else None
            silent = health.seconds_since_ack
            timeout = before.heartbeat_timeout
            if silent is not None and timeout is not None and silent >= timeout - EARLY:
                why = f"no heartbeat ACK for {silent:.2f} s: its own watchdog drops the connection"
            else:
                why = "its connection is gone"
            self.out.event("agent", f"{name}: {why} (health(): {health.state})")
        if health.connected and not before.connected:
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

    # --- the script ----------------------------------------------------------------

    def stage(self, number: int, name: str, text: str) -> None:
        self.stage_text = f"stage {number}/5 {name}: {text}"
        rule = self.out.glyph_rule * 3
        self.out.event("stage", f"{rule} {number}/5 {name} {rule} {text}")

    async def script(self) -> bool:
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
            await self.sleep_until(next_at)
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
            await self.nursery.start(self.run_member, monitor)
            self.out.event("online", f"{MONITOR} is online, watching $presence.> for the others")
            async with trio.open_nursery() as starting:
                for member in others:
                    starting.start_soon(self.nursery.start, self.run_member, member)

            def all_seen() -> bool:
                return len(self.seen_online()) == len(others)

            await self.wait_until(all_seen, bound=LATE + 1)
        seen = self.seen_online()
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

    def seen_online(self) -> dict[str, PresenceEvent]:
        """The first online event the monitor saw for each agent."""
        seen: dict[str, PresenceEvent] = {}
        for item in self.presence:
            if item.event.status == "online":
                seen.setdefault(item.event.agent_id, item.event)
        return seen

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
        await self.wait_until(lambda: agent.health().last_ack != acked, bound=plan.interval + 1)
        member.lost_at = None
        silenced = time.time()
        member.link.hang()
        self.out.event("fault", f"{HUNG}: connection blackholed both ways (socket still open)")
        event = await self.wait_presence(
            HUNG, "offline", after=silenced, bound=plan.timeout + LATE + 1
        )
        measured: float | None = None
        note = ""
        problem = None
        if event is not None:
            last_frame = self.last_seen.get(event.session_id or "")
            if last_frame is not None:
                measured = event.time - last_frame
            note = (
                f"offline {event.time - silenced:.2f} s after the hang began; "
                f"the monitor's ALERT came {self.alert_delay(event)} later"
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
        lost = await self.wait_until(lambda: member.lost_at is not None, bound=plan.timeout + LATE)
        watchdog: float | None = None
        if lost is not None and member.lost_at is not None and member.ack_before_loss is not None:
            watchdog = member.lost_at - member.ack_before_loss
        back = await self.wait_presence(
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
                    f"seen via health(), sampled every {SAMPLE_PERIOD * 1000:.0f} ms; "
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

        back = await self.wait_until(reconnected, bound=plan.grace + LATE + 1)
        await self.sleep_until(cut + plan.grace + 0.25)  # past the grace: would it flap?
        flaps = [
            seen.event
            for seen in self.presence
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
        event = await self.wait_presence(FLAKY, "offline", after=cut, bound=plan.grace + LATE + 1)
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
                else f"the monitor's ALERT came {self.alert_delay(event)} later",
                problem=problem,
            )
        )
        await self.sleep_until(max(time.time(), cut + plan.grace) + plan.interval)
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
        back = await self.wait_presence(
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
        event = await self.wait_presence(LEAVER, "offline", after=asked, bound=LATE + 2)
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

    def check_alerts(self) -> None:
        expected = [(HUNG, "timeout"), (FLAKY, "disconnected"), (LEAVER, "left")]
        got = list(self.alerts)
        missing = [e for e in expected if e not in got]
        extra = [a for a in got if a not in expected or got.count(a) > 1]
        problems = []
        if missing:
            problems.append("missing: " + ", ".join(f"{a} ({r})" for a, r in missing))
        if extra:
            problems.append("unexpected: " + ", ".join(f"{a} ({r})" for a, r in extra))
        self.checks.append(
            Check(
                event="monitor: one ALERT per offline",
                expectation=f"{len(expected)} ALERTs: timeout, disconnected, left",
                low=len(expected),
                high=len(expected),
                measured=len(got),
                unit="",
                problem="; ".join(problems) or None,
            )
        )

    # --- the live screen -----------------------------------------------------------

    def header(self, width: int) -> list[str]:
        """The live screen's top lines."""
        plan = self.plan
        hub_url = self.hub.url if self.hub is not None and self.hub.url else "(starting)"
        clock = f"{self.out.elapsed():5.1f} s of ~{self.plan.duration:.0f} s"
        title = f"artcafe-trio demo · hub {hub_url} · tenant {TENANT}"
        if len(title) + len(clock) + len("  (Ctrl+C stops)") + 2 <= width:
            clock += "  (Ctrl+C stops)"
        gap = max(2, width - len(title) - len(clock))
        settings = (
            f"heartbeat {plan.interval:g} s · timeout {plan.timeout:g} s "
            f"({plan.interval:g} s {self.out.glyph_x} {plan.multiplier:g}) · "
            f"disconnect grace {plan.grace:g} s · "
            f"backoff {plan.backoff.base:g}..{plan.backoff.cap:g} s, full jitter"
        )
        dashboard = [f"dashboard {self.dashboard_url}"] if self.dashboard_url else []
        return [
            self.paint.bold(_fit(title, width)) + _fit(" " * gap + clock, width - len(title)),
            *(self.paint.dim(line) for line in textwrap.wrap(settings, width)),
            *(_fit(line, width) for line in dashboard),
        ]

    def table(self, width: int, *, max_workers: int | None = None) -> list[str]:
        """Presence from the hub, health from each agent: one row per agent."""
        assert self.hub is not None
        none = self.out.glyph_none
        paint = self.paint
        records = {r.agent_id: r for r in self.hub.presence_table(TENANT)}
        layout = _layout(width)
        lines = [
            paint.dim(_fit(layout.groups(self.out.glyph_rule), width)),
            paint.bold(_fit(layout.row({c.name: c.name for c in COLUMNS}), width)),
        ]
        members = list(self.members.values())
        workers = [m for m in members if m.name.startswith("worker-")]
        hidden: list[Member] = []
        anchor: Member | None = None
        if max_workers is not None and len(workers) > max_workers:
            hidden = workers[max_workers:]
            members = [m for m in members if m not in hidden]
            anchor = workers[max_workers - 1] if max_workers >= 1 else members[0]
        for member in members:
            record = records.get(member.name)
            health = member.health
            status = record.status if record else none
            cells = {
                "AGENT": member.name,
                "STATUS": status,
                "REASON": (record.reason or none) if record else none,
                "ACK AGE": none,
                "RTT": none,
                "RECONNECTS": none,
                "STATE": none,
                "TASKS": none if member.name == MONITOR else str(member.tasks),
            }
            if health is not None:
                if health.seconds_since_ack is not None:
                    cells["ACK AGE"] = f"{health.seconds_since_ack:.1f} s"
                if health.rtt is not None:
                    cells["RTT"] = _milliseconds(health.rtt)
                cells["RECONNECTS"] = str(health.total_reconnects)
                cells["STATE"] = _state_text(health, self.plan.interval)
            paint_status = {"online": paint.green, "offline": paint.red}.get(status)
            styles: dict[str, Callable[[str], str]] = {}
            if paint_status is not None:
                styles["STATUS"] = paint_status
                if status == "offline":
                    styles["REASON"] = paint_status
            row = layout.row(cells, styles)
            lines.append(row if _strip_len(row) <= width else _fit(_unstyled(row), width))
            if hidden and member is anchor:
                online = sum(
                    1 for m in hidden if (r := records.get(m.name)) and r.status == "online"
                )
                more = f"... and {len(hidden)} more workers, {online} online"
                lines.append(paint.dim(_fit(" " * 16 + more, width)))
        return lines

    def frame(self) -> list[str]:
        """One screenful of the live view."""
        size = shutil.get_terminal_size((100, 30))
        width, height = max(40, size.columns), max(12, size.lines)
        lines = self.header(width)
        lines.append("")
        title, _, text = self.stage_text.partition(": ")
        lines.append(self.paint.bold(_fit(title, width)))
        lines.extend(textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="  "))
        lines.append("")
        max_workers = None if height - len(lines) - self.plan.workers - 12 >= 0 else 2
        lines.extend(self.table(width, max_workers=max_workers))
        lines.append("")
        lines.append(
            self.paint.dim(_fit("events (latest last; ALERTs come from the monitor)", width))
        )
        room = max(3, height - len(lines) - 1)
        shown: list[str] = []
        for line in reversed(self.out.lines):
            text = self.out.format(line, plain=True)
            if line.tag == "log":  # the library's own words: one dim line is enough here
                pieces = [_fit(text, width)]
            else:
                text = _UNIT.sub("\\1\xa0\\2", text)
                pieces = textwrap.wrap(text, width, subsequent_indent=" " * 18)
            if len(shown) + len(pieces) > room and shown:
                break
            shown[:0] = [self.out.style(line, piece.replace("\xa0", " ")) for piece in pieces]
        lines.extend(shown[-room:])
        return lines

    async def redraw(self) -> None:
        while True:
            self.out.draw(self.frame())
            await trio.sleep(REDRAW_PERIOD)

    # --- the whole run ---------------------------------------------------------------

    async def run(self) -> int:
        plan = self.plan
        db = os.path.join(self.tmp, "registry.db")
        host = "127.0.0.1"
        # Register the keys first; the hub reads the registry when it starts.
        self.write_keys(db, host)
        config = HubConfig(
            min_heartbeat_interval=min(plan.interval, HubConfig().min_heartbeat_interval),
            disconnect_grace=plan.grace,
        )
        failure: str | None = None
        bound = plan.duration + 30 + 10 * plan.interval
        self.out.enter_screen()
        try:
            with trio.fail_after(bound):
                async with open_hub(db=db, host=host, port=0, config=config) as hub:
                    self.hub = hub
                    assert hub.port is not None
                    for member in self.members.values():
                        member.link.port = hub.port
                    if not self.out.live:
                        for line in self.intro():
                            self.out.write(line)
                    self.out.event("hub", f"listening on {hub.url}")
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        await self.open_dashboard(nursery, hub, host)
                        nursery.start_soon(self.sample)
                        if self.out.live:
                            nursery.start_soon(self.redraw)
                        completed = await self.script()
                        self.final_rows = self.table(10_000, max_workers=10)
                        self.finished = True
                        if completed:
                            self.check_alerts()
                        nursery.cancel_scope.cancel()  # agents leave, then the hub stops
        except trio.TooSlowError:
            failure = f"the demo did not finish within {bound:.0f} s"
        finally:
            self.finished = True
            self.out.leave_screen()
        return self.report(failure)

    async def open_dashboard(self, nursery: trio.Nursery, hub: Hub, host: str) -> None:
        """Serve the live dashboard on a free port; print its URL with a read-only
        token for the demo's tenant (made for this run's throw-away registry)."""
        from ..dashboard import create_token, serve_dashboard

        token = await trio.to_thread.run_sync(create_token, hub.registry, TENANT)
        url = await nursery.start(serve_dashboard, hub, host, 0)
        self.dashboard_url = f"{url}?token={token}"
        self.out.event("web", f"dashboard at {self.dashboard_url} (open it in a browser)")

    def intro(self) -> list[str]:
        """What is about to happen, for readers of the plain output and the transcript."""
        plan = self.plan
        hub_url = self.hub.url if self.hub is not None and self.hub.url else "(not started)"
        workers = f"worker-1..{plan.workers}" if plan.workers > 1 else "worker-1"
        x = self.out.glyph_x
        lines = [
            self.paint.bold(
                f"artcafe-trio demo: a hub and {len(self.members)} agents in this process, "
                "over real TCP"
            ),
            f"  hub        {hub_url}, tenant {TENANT!r}, registry in a temporary SQLite file",
            f"  agents     {MONITOR} (watches $presence.>, hands out {TASK_SUBJECT}), {workers},",
            f"             {HUNG}, {FLAKY}, {LEAVER}; each with its own ed25519 key",
            f"  heartbeat  every {plan.interval:g} s; no heartbeat for {plan.timeout:g} s "
            f"({plan.interval:g} s {x} {plan.multiplier:g}) means offline (timeout)",
            f"  grace      a dropped connection back within {plan.grace:g} s is not an outage",
            f"  backoff    full jitter, {plan.backoff.base:g} s doubling up to "
            f"{plan.backoff.cap:g} s",
            f"  timeline   about {plan.duration:.0f} s: online, hang, blip, outage, leave; "
            "then a summary",
            "  table      STATUS, REASON: the hub's presence table; ACK AGE to STATE: the",
            f"             agent's health(); TASKS: {TASK_SUBJECT} messages it has handled",
        ]
        if plan.stretched and plan.requested is not None:
            lines.append(
                f"  note       --duration {plan.requested:g} is too short for --interval "
                f"{plan.interval:g}: the stages need {plan.duration:.1f} s"
            )
        lines.append("")
        return lines

    def report(self, failure: str | None) -> int:
        out = self.out
        if out.live:
            for text in self.intro():
                out.write(text)
            for line in out.lines:
                out.write(out.format(line))
        out.write()
        if self.final_rows:
            out.write(self.paint.bold("At the end: presence (hub) and health (agents)"))
            for row in self.final_rows:
                out.write("  " + row)
            out.write()
        code, summary = judge(self.checks, color=self.paint.on)
        for text in summary:
            out.write(text)
        if failure is not None:
            out.write(self.paint.red(f"FAILED: {failure}"))
            code = EXIT_FAILED
        return code


@attrs.frozen
class _Column:
    name: str
    width: int
    right: bool = False
    group: str = ""


COLUMNS = (
    _Column("AGENT", 14),
    _Column("STATUS", 7, group="hub presence"),
    _Column("REASON", 12, group="hub presence"),
    _Column("ACK AGE", 7, right=True, group="agent.health()"),
    _Column("RTT", 7, right=True, group="agent.health()"),
    _Column("RECONNECTS", 10, right=True, group="agent.health()"),
    _Column("STATE", 17, group="agent.health()"),
    _Column("TASKS", 5, right=True),
)


@attrs.frozen
class _Layout:
    columns: tuple[_Column, ...]
    gap: int

    def row(
        self, cells: dict[str, str], styles: dict[str, Callable[[str], str]] | None = None
    ) -> str:
        parts = []
        for column in self.columns:
            text = cells.get(column.name, "")
            text = text.rjust(column.width) if column.right else text.ljust(column.width)
            style = (styles or {}).get(column.name)
            parts.append(style(text) if style else text)
        return (" " * self.gap).join(parts).rstrip()

    def groups(self, rule: str) -> str:
        """A line naming where each group of columns comes from."""
        out = ""
        position = 0
        for group in ("hub presence", "agent.health()"):
            members = [c for c in self.columns if c.group == group]
            if not members:
                continue
            start = 0
            for column in self.columns:
                if column is members[0]:
                    break
                start += column.width + self.gap
            span = sum(c.width for c in members) + self.gap * (len(members) - 1)
            out += " " * (start - position) + f"{rule * 2} {group} ".ljust(span, rule)
            position = start + span
        return out


def _layout(width: int) -> _Layout:
    """The widest table layout that fits ``width`` columns (the last one if none does)."""
    without_tasks = tuple(c for c in COLUMNS if c.name != "TASKS")
    for columns, gap in ((COLUMNS, 2), (without_tasks, 2), (without_tasks, 1)):
        layout = _Layout(columns, gap)
        if sum(c.width for c in columns) + gap * (len(columns) - 1) <= width:
            return layout
    return _Layout(without_tasks, 1)


def _milliseconds(seconds: float) -> str:
    ms = seconds * 1000
    if ms < 10:
        return f"{ms:.2f} ms"
    if ms < 100:
        return f"{ms:.1f} ms"
    return f"{ms:.0f} ms"


def _state_text(health: AgentHealth, interval: float) -> str:
    if health.state == "reconnecting":
        if health.next_retry_in is not None:
            return f"retry #{health.reconnect_attempts} in {health.next_retry_in:.1f} s"
        return "reconnecting"
    if health.state == "connected":
        silent = health.seconds_since_ack
        if silent is not None and silent > interval * 1.5:
            return "ACK overdue!"
        return "connected"
    return health.state


def _unstyled(text: str) -> str:
    out = []
    i = 0
    while i < len(text):
        if text[i] == "\x1b":
            end = text.find("m", i)
            i = len(text) if end < 0 else end + 1
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _strip_len(text: str) -> int:
    return len(_unstyled(text))


# --------------------------------------------------------------------------- entry point


def _interrupted(exc: BaseException) -> bool:
    return any(isinstance(e, KeyboardInterrupt) for e in flatten_exceptions(exc))


def main(args: argparse.Namespace) -> int:
    """Run the demo (``artcafe-trio demo``); returns the exit code."""
    try:
        plan = make_plan(
            duration=getattr(args, "duration", None),
            workers=getattr(args, "agents", 3),
            interval=getattr(args, "interval", 1.0),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stream = sys.stdout
    live = _is_terminal(stream)
    output = _Output(stream, live=live, color=live and "NO_COLOR" not in os.environ)
    try:
        with (
            _library_logs_to(output),
            tempfile.TemporaryDirectory(prefix="artcafe-demo-") as tmp,
        ):
            demo = Demo(plan, output, tmp)
            try:
                with collapse_exception_groups():
                    return trio.run(demo.run)
            except BrokenPipeError:
                _silence_stdout()  # the reader went away (``| head``): stop quietly
                return EXIT_FAILED
            except (ArtcafeError, OSError) as exc:
                output.leave_screen()
                print(f"error: the demo failed: {exc}", file=sys.stderr)
                return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        if not _interrupted(group):
            raise
    finally:
        output.leave_screen()
    print("interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's final flush does not complain again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False
