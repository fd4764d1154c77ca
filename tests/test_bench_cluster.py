"""The pure helpers of ``bench/cluster.py`` (placement, round order, ratios, the table,
arguments) and its ``--from-json`` path. No hub or nats-server is started here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "cluster.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cluster", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_cluster"] = module
    spec.loader.exec_module(module)
    return module


cluster = load()


def test_subscribers_spread_round_robin_and_rounds_rotate() -> None:
    assert cluster.placement("standalone") == [0, 0, 0]
    assert cluster.placement("1 hub") == [0, 0, 0]
    assert cluster.placement("2 hubs") == [0, 1, 0]
    assert cluster.placement("3 hubs") == [0, 1, 2]
    assert cluster.round_order(0) == list(cluster.CONFIGS)
    assert cluster.round_order(1) == ["1 hub", "2 hubs", "3 hubs", "standalone"]
    assert cluster.round_order(4) == cluster.round_order(0)


def test_derived_ratios() -> None:
    row = {
        "throughput_msg_s": 900.0,
        "origin_cpu_us_per_msg": 400.0,
        "same_p50_ms": 2.0,
        "cross_p50_ms": 3.0,
        "same_p99_ms": 4.0,
        "cross_p99_ms": 10.0,
        "detect_last_s": 2.7,
    }
    standalone = {"throughput_msg_s": 1200.0, "origin_cpu_us_per_msg": 160.0, "same_p50_ms": 0.5}
    assert cluster.derived(row, standalone, 3.0) == pytest.approx(
        {
            "throughput_vs_standalone": 0.75,
            "origin_cpu_vs_standalone": 2.5,
            "same_p50_vs_standalone": 4.0,
            "cross_over_same_p50": 1.5,
            "cross_over_same_p99": 2.5,
            "detect_over_bound": 0.9,
        }
    )
    # One hub: no cross-hub figures, no detection, nothing divided by a missing value.
    assert cluster.derived({"throughput_msg_s": 5.0, "same_p50_ms": 1.0}, None, 3.0) == {}


def raw_rows() -> list[dict[str, Any]]:
    """Two rounds as ``rounds_raw`` holds them (a stale ratio in it is recomputed)."""
    return [
        {"round": 1, "config": "standalone", "throughput_msg_s": 1000.0},
        {"round": 1, "config": "1 hub", "throughput_msg_s": 800.0},
        {"round": 1, "config": "3 hubs", "throughput_msg_s": 400.0, "detect_last_s": 2.7},
        {"round": 2, "config": "3 hubs", "throughput_msg_s": 900.0, "detect_last_s": 3.3},
        {"round": 2, "config": "1 hub", "throughput_msg_s": 1000.0},
        {"round": 2, "config": "standalone", "throughput_msg_s": 2000.0},
        {"round": 2, "config": "2 hubs", "throughput_vs_standalone": 99.0},
    ]


def test_collect_pairs_each_configuration_with_its_round_s_standalone() -> None:
    per_round = cluster.collect(raw_rows(), 3.0)
    assert per_round["throughput_msg_s"]["3 hubs"] == [400.0, 900.0]
    assert per_round["throughput_vs_standalone"] == {
        "standalone": [1.0, 1.0],
        "1 hub": [0.8, 0.5],
        "3 hubs": [0.4, 0.45],
    }
    assert per_round["detect_over_bound"]["3 hubs"] == pytest.approx([0.9, 1.1])
    result = cluster.summarize_run(
        {"settings": {"lease_ttl": 2.0, "grace": 1.0}, "rounds_raw": raw_rows()}
    )
    # 3 hubs / 1 hub per round: 400/800 and 900/1000.
    assert result["ratios"]["throughput_3_over_1_hub"]["median"] == pytest.approx(0.7)
    assert result["summary"]["throughput_vs_standalone"]["2 hubs"] is None


def per_round() -> dict[str, dict[str, list[float]]]:
    return {
        "throughput_msg_s": {"standalone": [1000.0, 1400.0, 1200.0], "3 hubs": [900.0]},
        "detect_last_s": {"2 hubs": [2.6, 2.8], "3 hubs": [2.7]},
    }


def test_table_has_a_row_per_metric_and_a_column_per_configuration() -> None:
    summary = cluster.summary_table(per_round())
    assert summary["throughput_msg_s"]["standalone"] == {
        "median": 1200.0,
        "min": 1000.0,
        "max": 1400.0,
        "n": 3,
    }
    assert summary["throughput_msg_s"]["1 hub"] is None
    lines = cluster.markdown_table(summary).splitlines()
    assert lines[0] == "| case | standalone | 1 hub | 2 hubs | 3 hubs |"
    assert len(lines) == 2 + len(cluster.METRICS)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    row = next(line for line in lines if line.startswith("| routing throughput"))
    assert "| 1,200 (1,000–1,400) | - | - | 900 |" in row
    row = next(line for line in lines if line.startswith("| hub killed -> last"))
    assert "| - | - | 2.70 (2.60–2.80) | 2.70 |" in row


def test_arguments_and_settings() -> None:
    quick = cluster.settings(cluster.build_parser().parse_args(["--quick"]))
    assert quick["mode"] == "quick"
    assert quick["messages"] == cluster.MODES["quick"]["messages"]
    assert (quick["lease_ttl"], quick["grace"]) == (2.0, 1.0)
    full = cluster.settings(
        cluster.build_parser().parse_args(["--rounds", "2", "--victims", "7", "--grace", "0.5"])
    )
    assert (full["mode"], full["rounds"], full["victims"], full["grace"]) == ("full", 2, 7, 0.5)
    assert full["messages"] == cluster.MODES["full"]["messages"]
    with pytest.raises(SystemExit, match="--lat-count must be at least 1"):
        cluster.settings(cluster.build_parser().parse_args(["--lat-count", "0"]))
    with pytest.raises(SystemExit, match="--lease-ttl must be positive"):
        cluster.settings(cluster.build_parser().parse_args(["--lease-ttl", "0"]))


def test_from_json_prints_the_table_and_draws_the_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    result: dict[str, Any] = {
        "date": "2026-12-02 00:00:00 UTC",
        "machine": "x86_64, 2 cores",
        "command": "bench/cluster.py --quick",
        "duration_s": 1.0,
        "settings": {
            **cluster.MODES["quick"],
            "mode": "quick",
            "lease_ttl": 2.0,
            "grace": 1.0,
        },
        "rounds_raw": raw_rows(),
    }
    source = tmp_path / "cluster.json"
    source.write_text(json.dumps(result))
    chart = tmp_path / "cluster.png"
    assert cluster.main(["--from-json", str(source), "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "| routing throughput, 1 -> 3 subscribers, pipelined, msg/s |" in out
    assert "throughput, 3 hubs / 1 hub (same round): 0.7 (0.5–0.9)" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
