"""Load benchmark: many heartbeating agents against a hub in another process.

N agents (default 1000) run in this one trio process and connect over TCP to
``artcafe-trio hub`` started as a subprocess on a temporary registry database
(all keys are registered before the hub starts). Every agent heartbeats every
``--interval`` seconds; a monitor agent subscribed to ``$presence.>`` counts
offline events. After all agents are connected and a short settling time, a
measurement window of ``--duration`` seconds records:

- false offline events (must be 0): presence events with status ``offline`` for
  a benchmark agent, seen by the monitor, from the first connection until the
  agents are told to stop (the hub's own ``timeout`` transition counter is read
  too, when its metrics endpoint is available);
- heartbeat ACK latency, p50/p90/p99/max: every ACK's round trip as the agent
  measures it (send time to ACK receipt, on trio's clock), recorded through a
  small wrapper around the agent's ACK handler (a private hook; the public
  ``health().rtt`` only keeps the last value);
- hub memory per connected agent: VmRSS of the hub process before the agents
  connect and after all are connected, divided by N;
- hub CPU per heartbeat: utime+stime of the hub process over the window,
  divided by the heartbeats it acknowledged in the window (and by the nominal
  N x duration / interval), in microseconds; the agents' process CPU likewise.
  Both processes share the machine's cores.

Not part of the test suite. Prints to stdout (progress to stderr); writes a JSON
summary only with ``--write PATH``. Example (5 minutes)::

    python bench/load.py --agents 1000 --duration 300 --interval 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from artcafe_trio import Backoff, PresenceEvent, Registry, generate_private_key, open_agent
from artcafe_trio.agent._agent import Agent
from artcafe_trio.protocol import HeartbeatAck, PrivateKey

TENANT = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def hub_command() -> list[str]:
    script = shutil.which("artcafe-trio") or str(Path(sys.executable).with_name("artcafe-trio"))
    if Path(script).exists():
        return [script]
    return [
        sys.executable,
        "-c",
        "from artcafe_trio.cli import main; raise SystemExit(main())",
    ]


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def live_tasks() -> int:
    """Every task of this trio run, from the root task down."""
    count, pending = 0, [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def scrape(port: int | None) -> dict[str, float]:
    """The hub's Prometheus counters (empty when it has no metrics endpoint)."""
    if port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(artcafe_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


class AckRecorder:
    """Records the round trip of every heartbeat ACK while ``recording`` is set."""

    def __init__(self) -> None:
        self.recording = False
        self.rtts: list[float] = []
        self.acks = 0
        self.hooked = False

    def install(self) -> None:
        if not hasattr(Agent, "_on_ack"):
            return  # the private hook is gone: fall back to sampling health().rtt
        original: Callable[..., None] = Agent._on_ack
        recorder = self

        def on_ack(agent: Agent, conn: Any, frame: HeartbeatAck) -> None:
            sent_times: dict[int, float] | None = getattr(agent, "_heartbeat_sent", None)
            sent = sent_times.get(frame.seq) if sent_times is not None else None
            original(agent, conn, frame)
            if recorder.recording:
                recorder.acks += 1
                if sent is not None:
                    recorder.rtts.append(trio.current_time() - sent)

        Agent._on_ack = on_ack  # type: ignore[method-assign]
        self.hooked = True


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class HubProcess:
    def __init__(self, db: Path, port: int, metrics_port: int | None, log: Path) -> None:
        self.db = db
        self.port = port
        self.metrics_port = metrics_port
        self.log = log
        self.url = f"ws://127.0.0.1:{port}"
        self.process: trio.Process | None = None

    async def start(self) -> int:
        args = [*hub_command(), "hub", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--db", str(self.db), "--log-level", "WARNING"]
        if self.metrics_port is not None:
            args += ["--metrics-port", str(self.metrics_port)]
        with self.log.open("ab") as log:
            self.process = await trio.lowlevel.open_process(
                args, stdout=subprocess.PIPE, stderr=log
            )
        assert self.process.stdout is not None
        seen = b""
        with trio.fail_after(30):
            while b"hub listening on" not in seen:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    raise RuntimeError(f"the hub exited early; see {self.log}")
                seen += chunk
        return self.process.pid

    async def stop(self) -> int | None:
        if self.process is None or self.process.returncode is not None:
            return None
        self.process.terminate()
        with trio.move_on_after(30):
            return await self.process.wait()
        self.process.kill()
        return await self.process.wait()


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.agents
    recorder = AckRecorder()
    recorder.install()
    workdir = Path(tempfile.mkdtemp(prefix="artcafe-load-"))
    db = workdir / "hub.db"
    progress(f"registering {n} agents in {db}")
    keys: dict[str, PrivateKey] = {}
    with Registry.open(db) as registry:
        for name in ["monitor", *(f"agent-{i:05d}" for i in range(n))]:
            keys[name] = generate_private_key()
            registry.add_key(TENANT, name, keys[name].public_key)
    metrics_port = free_port() if args.metrics else None
    hub = HubProcess(db, args.port or free_port(), metrics_port, workdir / "hub.log")
    pid = await hub.start()
    progress(f"hub pid {pid} at {hub.url}")
    offline: list[PresenceEvent] = []
    offline_in_window = 0
    counting = True
    in_window = False
    agents: list[Agent] = []
    connected = trio.Event()
    stop = trio.Event()
    limiter = trio.CapacityLimiter(args.connect_concurrency)
    backoff = Backoff(base=0.5, cap=5.0)
    result: dict[str, Any] = {}

    async def on_presence(subject: str, data: Any) -> None:
        nonlocal offline_in_window
        event = PresenceEvent.from_data(data)
        if counting and event.status == "offline" and event.agent_id.startswith("agent-"):
            offline.append(event)
            offline_in_window += in_window

    async def run_agent(name: str) -> None:
        await limiter.acquire()
        held = True
        try:
            async with open_agent(
                agent_id=name, organization_id=TENANT, private_key=keys[name], url=hub.url,
                heartbeat_interval=args.interval, backoff=backoff,
            ) as agent:  # fmt: skip
                limiter.release()
                held = False
                agents.append(agent)
                if len(agents) == n:
                    connected.set()
                await stop.wait()
        finally:
            if held:
                limiter.release()

    try:
        async with (
            open_agent(
                agent_id="monitor", organization_id=TENANT, private_key=keys["monitor"],
                url=hub.url, heartbeat_interval=None, backoff=backoff,
            ) as monitor,
            trio.open_nursery() as nursery,
        ):  # fmt: skip
            await monitor.subscribe("$presence.>", on_presence)
            await trio.sleep(1.0)
            rss_before = rss_bytes(pid)
            own_rss_before, tasks_before = rss_bytes(os.getpid()), live_tasks()
            progress(f"hub RSS before agents: {rss_before / 2**20:.1f} MiB; connecting {n}")
            ramp_start = trio.current_time()
            for i in range(n):
                nursery.start_soon(run_agent, f"agent-{i:05d}")
            with trio.fail_after(max(120.0, n * 0.2)):
                await connected.wait()
            ramp = trio.current_time() - ramp_start
            progress(f"{n} agents connected in {ramp:.1f} s; settling {args.settle:.0f} s")
            await trio.sleep(args.settle)
            rss_after = rss_bytes(pid)
            own_rss_after, tasks_after = rss_bytes(os.getpid()), live_tasks()
            hub_cpu0, own_cpu0, metrics0 = cpu_seconds(pid), own_cpu_seconds(), scrape(metrics_port)
            reconnects0 = sum(a.health().total_reconnects for a in agents)
            wall0 = trio.current_time()
            recorder.recording = in_window = True
            samples: list[float] = []  # fallback: health().rtt sampled each second
            next_report = 30.0
            while trio.current_time() - wall0 < args.duration:
                await trio.sleep(1.0)
                if not recorder.hooked:
                    samples.extend(h.rtt for h in map(Agent.health, agents) if h.rtt is not None)
                elapsed = trio.current_time() - wall0
                if elapsed >= next_report:
                    next_report += 30.0
                    progress(f"{elapsed:.0f}/{args.duration:.0f} s: {recorder.acks} ACKs, "
                             f"{len(offline)} offline events")  # fmt: skip
            recorder.recording = in_window = False
            window = trio.current_time() - wall0
            hub_cpu1, own_cpu1, metrics1 = cpu_seconds(pid), own_cpu_seconds(), scrape(metrics_port)
            reconnects = sum(a.health().total_reconnects for a in agents) - reconnects0
            counting = False
            stop.set()
            progress("stopping agents")
        rtts = recorder.rtts if recorder.hooked else samples
        nominal = n * window / args.interval
        acks = recorder.acks if recorder.hooked else nominal
        hub_cpu = hub_cpu1 - hub_cpu0
        own_cpu = own_cpu1 - own_cpu0

        def delta(name: str) -> float | None:
            if name in metrics1 and name in metrics0:
                return metrics1[name] - metrics0[name]
            return None

        result = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}",
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "agents": n,
            "interval_s": args.interval,
            "window_s": round(window, 1),
            "ramp_s": round(ramp, 1),
            "false_offline_events": len(offline),
            "false_offline_events_in_window": offline_in_window,
            "hub_timeout_transitions_in_window": delta(
                'artcafe_presence_transitions_total{reason="timeout"}'
            ),
            "reconnects_in_window": reconnects,
            "acks_in_window": acks,
            "hub_heartbeats_in_window": delta("artcafe_heartbeats_total"),
            "nominal_heartbeats": round(nominal),
            "ack_rtt_source": "every ACK (hook)" if recorder.hooked else "health().rtt sampled 1/s",
            "ack_rtt_ms": {
                "p50": percentile(rtts, 0.50) * 1e3,
                "p90": percentile(rtts, 0.90) * 1e3,
                "p99": percentile(rtts, 0.99) * 1e3,
                "max": max(rtts, default=float("nan")) * 1e3,
                "mean": (statistics.fmean(rtts) if rtts else float("nan")) * 1e3,
                "count": len(rtts),
            },
            "hub_rss_mib": {"before": rss_before / 2**20, "after": rss_after / 2**20},
            "hub_rss_kib_per_agent": (rss_after - rss_before) / n / 1024,
            "agents_rss_kib_per_agent": (own_rss_after - own_rss_before) / n / 1024,
            "agents_tasks_per_agent": (tasks_after - tasks_before) / n,
            "hub_cpu_s": hub_cpu,
            "hub_cpu_percent_of_one_core": 100 * hub_cpu / window,
            "hub_cpu_us_per_heartbeat": 1e6 * hub_cpu / acks if acks else None,
            "hub_cpu_us_per_nominal_heartbeat": 1e6 * hub_cpu / nominal,
            "agents_cpu_s": own_cpu,
            "agents_cpu_percent_of_one_core": 100 * own_cpu / window,
            "agents_cpu_us_per_heartbeat": 1e6 * own_cpu / acks if acks else None,
        }
    finally:
        code = await hub.stop()
        progress(f"hub exited with {code}")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            progress(f"kept {workdir}")
    return result


def show(result: dict[str, Any]) -> None:
    rtt = result["ack_rtt_ms"]
    rss = result["hub_rss_mib"]
    lines = [
        f"date: {result['date']}",
        f"machine: {result['machine']}",
        f"command: {result['command']}",
        f"agents: {result['agents']}, heartbeat interval {result['interval_s']} s, "
        f"window {result['window_s']} s (connect ramp {result['ramp_s']} s)",
        f"false offline events: {result['false_offline_events']} "
        f"(in window: {result['false_offline_events_in_window']}; "
        f"hub timeout transitions in window: {result['hub_timeout_transitions_in_window']}); "
        f"reconnects in window: {result['reconnects_in_window']}",
        f"heartbeats ACKed in window: {result['acks_in_window']} "
        f"(hub counted {result['hub_heartbeats_in_window']}, "
        f"nominal {result['nominal_heartbeats']})",
        f"ACK RTT ({result['ack_rtt_source']}, {rtt['count']} samples): p50 {rtt['p50']:.2f} ms, "
        f"p90 {rtt['p90']:.2f} ms, p99 {rtt['p99']:.2f} ms, max {rtt['max']:.2f} ms",
        f"hub RSS: {rss['before']:.1f} MiB before, {rss['after']:.1f} MiB with all agents: "
        f"{result['hub_rss_kib_per_agent']:.1f} KiB per agent",
        f"agents' process: {result['agents_rss_kib_per_agent']:.1f} KiB and "
        f"{result['agents_tasks_per_agent']:.1f} trio tasks per agent",
        f"hub CPU: {result['hub_cpu_s']:.2f} s ({result['hub_cpu_percent_of_one_core']:.1f} % of "
        f"one core): {result['hub_cpu_us_per_heartbeat']:.1f} us per heartbeat",
        f"agents' process CPU: {result['agents_cpu_s']:.2f} s "
        f"({result['agents_cpu_percent_of_one_core']:.1f} % of one core): "
        f"{result['agents_cpu_us_per_heartbeat']:.1f} us per heartbeat",
    ]
    print("\n".join(lines), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=300.0, help="measurement window, s")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, s")
    parser.add_argument("--settle", type=float, default=5.0, help="wait after connecting, s")
    parser.add_argument("--port", type=int, default=0, help="hub port (default: a free one)")
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument(
        "--no-metrics", dest="metrics", action="store_false",
        help="do not start the hub's Prometheus endpoint (used for cross-checks)",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--write", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    result = trio.run(run, args)
    show(result)
    if args.write:
        Path(args.write).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["false_offline_events"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
