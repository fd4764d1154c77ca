"""The run: keys and registry, a real hub on a localhost port, the agents, the dashboard;
the script and the screen on top; the report at the end."""

from __future__ import annotations

import os

import trio

from artcafe_trio import (
    Agent,
    Hub,
    HubConfig,
    Registry,
    generate_private_key,
    open_agent,
    open_hub,
)

from ._cast import Link, Member
from ._judge import judge
from ._observe import Observer
from ._output import _Output
from ._plan import (
    EXIT_FAILED,
    FLAKY,
    HUNG,
    LEAVER,
    MONITOR,
    TASK_SUBJECT,
    TENANT,
    Plan,
)
from ._screen import Screen
from ._stages import Script, check_alerts

__all__ = ["Demo"]


class Demo:
    """The running demo: hub, cast, observations (:class:`Observer`), stages
    (:class:`Script`), live screen (:class:`Screen`)."""

    def __init__(self, plan: Plan, output: _Output, tmp: str) -> None:
        self.plan = plan
        self.out = output
        self.tmp = tmp
        self.paint = output.paint
        self.members: dict[str, Member] = {}
        self.watch = Observer(output, self.members)
        self.script = Script(plan, output, self.watch, self.start_member)
        self.screen = Screen(plan, output, self.watch, self.script)
        self.final_rows: list[str] = []
        self._nursery: trio.Nursery | None = None

    @property
    def hub(self) -> Hub | None:
        return self.watch.hub

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None
        return self._nursery

    async def start_member(self, member: Member) -> None:
        """Run ``member``'s agent in the demo's nursery; returns once it is connected."""
        await self.nursery.start(self.run_member, member)

    # --- setup -------------------------------------------------------------------

    def cast(self) -> list[str]:
        """Every agent's name: the monitor, the plain workers, the three staged ones."""
        workers = [f"worker-{n}" for n in range(1, self.plan.workers + 1)]
        return [MONITOR, *workers, HUNG, FLAKY, LEAVER]

    def write_keys(self, db: str) -> dict[str, str]:
        """Generate an ed25519 key per agent (PEM file, mode 0600) and register it; each
        agent's key file, in cast order (blocking: run in a worker thread)."""
        paths: dict[str, str] = {}
        with Registry.open(db) as registry:
            for name in self.cast():
                key = generate_private_key("ed25519")
                path = os.path.join(self.tmp, f"{name}.pem")
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key.to_pem())
                registry.add_key(TENANT, name, key.public_key)
                paths[name] = path
        return paths

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
            transport=member.link.transport,
        ) as agent:
            member.agent = agent
            member.health = agent.health()
            if member.name == MONITOR:
                await agent.subscribe("$presence.>", self.watch.on_presence)
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

    # --- the whole run ---------------------------------------------------------------

    async def run(self) -> int:
        plan = self.plan
        db = os.path.join(self.tmp, "registry.db")
        host = "127.0.0.1"
        # Register the keys first; the hub reads the registry when it starts.
        for name, path in (await trio.to_thread.run_sync(self.write_keys, db)).items():
            # The port is known once the hub listens.
            self.members[name] = Member(name, Link(host, 0), path)
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
                    self.watch.hub = hub
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
                        nursery.start_soon(self.watch.sample)
                        if self.out.live:
                            nursery.start_soon(self.screen.redraw)
                        completed = await self.script.run()
                        self.final_rows = self.screen.table(10_000, max_workers=10)
                        self.watch.finished = True
                        if completed:
                            self.script.checks.append(check_alerts(self.watch.alerts))
                        nursery.cancel_scope.cancel()  # agents leave, then the hub stops
        except trio.TooSlowError:
            failure = f"the demo did not finish within {bound:.0f} s"
        finally:
            self.watch.finished = True
            self.out.leave_screen()
        return self.report(failure)

    async def open_dashboard(self, nursery: trio.Nursery, hub: Hub, host: str) -> None:
        """Serve the live dashboard on a free port; print its URL with a read-only
        token for the demo's tenant (made for this run's throw-away registry)."""
        from artcafe_trio.dashboard import create_token, serve_dashboard

        token = await trio.to_thread.run_sync(create_token, hub.registry, TENANT)
        url = await nursery.start(serve_dashboard, hub, host, 0)
        self.screen.dashboard_url = f"{url}?token={token}"
        self.out.event("web", f"dashboard at {self.screen.dashboard_url} (open it in a browser)")

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
        code, summary = judge(self.script.checks, color=self.paint.on)
        for text in summary:
            out.write(text)
        if failure is not None:
            out.write(self.paint.red(f"FAILED: {failure}"))
            code = EXIT_FAILED
        return code
