"""The live screen: a header, the presence/health table and the latest events, redrawn
four times a second on a terminal; the table is also the run's final summary."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Callable

import attrs
import trio

from artcafe_trio import AgentHealth

from ._cast import Member
from ._observe import Observer
from ._output import _UNIT, _fit, _Output
from ._plan import MONITOR, REDRAW_PERIOD, TENANT, Plan
from ._stages import Script

__all__ = ["Screen"]


class Screen:
    """Draws what the observer and the script know (it changes nothing)."""

    def __init__(self, plan: Plan, output: _Output, watch: Observer, script: Script) -> None:
        self.plan = plan
        self.out = output
        self.paint = output.paint
        self.watch = watch
        self.script = script
        self.dashboard_url: str | None = None

    def header(self, width: int) -> list[str]:
        """The live screen's top lines."""
        plan = self.plan
        hub_url = (
            self.watch.hub.url
            if self.watch.hub is not None and self.watch.hub.url
            else "(starting)"
        )
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
        assert self.watch.hub is not None
        none = self.out.glyph_none
        paint = self.paint
        records = {r.agent_id: r for r in self.watch.hub.presence_table(TENANT)}
        layout = _layout(width)
        lines = [
            paint.dim(_fit(layout.groups(self.out.glyph_rule), width)),
            paint.bold(_fit(layout.row({c.name: c.name for c in COLUMNS}), width)),
        ]
        members = list(self.watch.members.values())
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
        title, _, text = self.script.stage_text.partition(": ")
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
