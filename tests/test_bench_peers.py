"""The pure helpers of ``bench/peers.py`` (statistics, tables, targets, /proc parsing,
arguments). No server or client is started: the benchmark itself never runs here."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "peers.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module
    spec.loader.exec_module(module)
    return module


peers = load()


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unsorted
    assert peers.percentile(values, 0.5) == 50.0
    assert peers.percentile(values, 0.99) == 99.0
    assert peers.percentile(values, 1.0) == 100.0
    assert peers.percentile(values, 0.0) == 1.0
    assert peers.percentile([7.0], 0.99) == 7.0
    assert math.isnan(peers.percentile([], 0.5))


def test_summarize_and_round_ratios() -> None:
    assert peers.summarize([3.0, 1.0, 2.0, math.nan]) == {
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
        "n": 3,
    }
    assert peers.summarize([]) is None
    # Ratios pair rounds by index: 2/1, 4/2, 6/4 -> 2, 2, 1.5.
    assert peers.round_ratios([2.0, 4.0, 6.0], [1.0, 2.0, 4.0]) == {
        "median": 2.0,
        "min": 1.5,
        "max": 2.0,
        "n": 3,
    }
    # A zero reference (e.g. a CPU delta below resolution) is left out, not divided by.
    assert peers.round_ratios([2.0, 3.0], [0.0, 1.0]) == {
        "median": 3.0,
        "min": 3.0,
        "max": 3.0,
        "n": 1,
    }


def test_fmt_three_significant_digits() -> None:
    assert peers.fmt(12345.6) == "12,346"
    assert peers.fmt(123.4) == "123"
    assert peers.fmt(12.34) == "12.3"
    assert peers.fmt(1.234) == "1.23"
    assert peers.fmt(0.012345) == "0.0123"
    assert peers.fmt(None) == "-"
    assert peers.fmt(math.nan) == "-"
    assert peers.fmt_summary({"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}) == "2.00 (1.00–3.00)"
    assert peers.fmt_summary({"median": 2.0, "min": 2.0, "max": 2.0, "n": 1}) == "2.00"


def per_round() -> dict[str, dict[str, list[float]]]:
    return {
        "throughput_msg_s": {
            peers.ARTCAFE: [3000.0, 2000.0],
            peers.WS_ECHO: [30000.0, 40000.0],
            peers.NATS: [100000.0, 100000.0],
        },
        "server_cpu_us_per_msg": {peers.ARTCAFE: [25.0, 30.0], peers.WS_ECHO: [10.0, 10.0]},
        "rtt_p50_ms": {peers.ARTCAFE: [0.3], peers.NATS: [0.1]},
    }


def test_summary_tables_and_markdown() -> None:
    summary = peers.summary_tables(per_round())
    tp = summary["throughput_msg_s"]
    assert tp["values"][peers.ARTCAFE]["median"] == 2500.0
    assert tp["ratios"][peers.WS_ECHO] == pytest.approx(
        {"median": 0.075, "min": 0.05, "max": 0.1, "n": 2}
    )
    assert tp["values"][peers.TRIO_ECHO] is None
    assert tp["ratios"][peers.TRIO_ECHO] is None
    table = peers.markdown_table(summary)
    lines = table.splitlines()
    assert lines[0].startswith("| case | artcafe-trio | websockets-echo |")
    assert len(lines) == 2 + len(peers.METRICS)
    row = next(line for line in lines if line.startswith("| 1 -> 1 throughput"))
    assert "2,500 (2,000–3,000)" in row
    assert "0.075 (0.05–0.1)" in row
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_target_checks() -> None:
    summary = peers.summary_tables(per_round())
    heartbeat: dict[str, Any] = {
        "unacked": 0,
        "ack_ms": {"p50": 5.0, "p99": 80.0, "max": 90.0},
        "hub_cpu_us_per_heartbeat": 40.0,
    }
    idle = {
        "connections": 10000,
        "agents": 10000,
        "agents_acked": 9999,
        "kib_per_conn": 11.0,
        "reconnects": 0,
    }
    checks = {c["target"]: c for c in peers.target_checks(summary, heartbeat, idle)}
    cpu = checks["hub CPU per routed publish / websockets echo CPU per message"]
    assert cpu["achieved"] == 2.75
    assert cpu["met"] is True
    tp = checks["1 -> 1 throughput / websockets echo"]
    assert tp["met"] is False
    assert checks["fan-out 1 -> 100: hub CPU per delivery, µs"]["met"] is None  # not measured
    assert checks["confirmed publish p50 / nats publish+flush p50"]["achieved"] == pytest.approx(3)
    assert checks["heartbeats: unACKed in the window"]["met"] is True
    assert checks["heartbeats: ACK p99, ms"]["met"] is False
    assert checks["heartbeats: hub CPU per heartbeat, µs"]["met"] is True
    assert checks["10,000 idle agents: hub KiB per agent"]["met"] is True
    assert checks["idle agents: agents without an ACK"]["met"] is False
    text = peers.markdown_targets(list(checks.values()))
    assert "| 1 -> 1 throughput / websockets echo | 0.075 | ≥ 0.25 | **no** |" in text
    assert len(peers.target_checks(summary, None, None)) == 4


def test_proc_parsing() -> None:
    # comm may hold spaces and parentheses; utime and stime are fields 14 and 15.
    stat = "4242 (artcafe (trio) hub) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0 3 0"
    assert peers.parse_cpu_ticks(stat) == 1234 + 567
    status = "Name:\tpython\nVmPeak:\t  99999 kB\nVmRSS:\t   51200 kB\nThreads:\t3\n"
    assert peers.parse_vmrss(status) == 51200 * 1024
    with pytest.raises(ValueError, match="VmRSS"):
        peers.parse_vmrss("Name:\tx\n")
    assert peers.parse_schedstat_ns("123456789 2043488 3\n") == 123456789


def test_arguments_and_settings() -> None:
    quick = peers.settings(peers.build_parser().parse_args(["--quick"]))
    assert quick["mode"] == "quick"
    assert quick["messages"] == peers.MODES["quick"]["messages"]
    assert quick["peers"] == list(peers.PEERS)
    full = peers.settings(
        peers.build_parser().parse_args(
            ["--rounds", "2", "--idle-agents", "500", "--peers", "nats,artcafe-trio"]
        )
    )
    assert full["mode"] == "full"
    assert full["rounds"] == 2
    assert full["messages"] == 20_000
    assert full["idle_artcafe"] == full["idle_peers"] == 500
    assert full["peers"] == [peers.ARTCAFE, peers.NATS]  # always in the interleaving order
    with pytest.raises(SystemExit, match="unknown peer"):
        peers.settings(peers.build_parser().parse_args(["--peers", "redis"]))
    with pytest.raises(SystemExit, match="--rounds must be at least 1"):
        peers.settings(peers.build_parser().parse_args(["--rounds", "0"]))
