"""``bench/nats_client.py`` runs end to end with tiny parameters and prints its figures.

A smoke test: it checks the script works (server start, both clients, the
summary with per-round ranges, the JSON), not how fast anything is."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "nats_client.py"


def test_the_nats_benchmark_runs_and_prints_medians_with_ranges(tmp_path: Path) -> None:
    out = tmp_path / "nats.json"
    args = ["--rounds", "2", "--messages", "2000", "--requests", "20", "--write", str(out)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("round")] == [
        "round 1",
        "round 2",
    ]
    number = r"[\d,.]+"
    spread = rf"{number} \({number}-{number}\)"
    publish = next(line for line in lines if line.startswith("publish (128 B)"))
    assert re.fullmatch(
        rf"publish \(128 B\): ours {spread} msg/s, nats-py {spread} msg/s; "
        rf"median per-round ratio {number}x \({number}-{number}\)",
        publish,
    ), publish
    request = next(line for line in lines if line.startswith("request round trip"))
    assert re.fullmatch(
        rf"request round trip: ours {spread} µs, nats-py {spread} µs; "
        rf"median per-round ratio {spread} \(lower is better\)",
        request,
    ), request
    summary = json.loads(out.read_text())
    assert (summary["messages"], summary["requests"], summary["rounds"]) == (2000, 20, 2)
    for key in ("pub_ours", "pub_theirs", "req_ours", "req_theirs"):
        rounds = summary["per_round"][key]
        assert len(rounds) == 2 and all(v > 0 for v in rounds)
        figure = summary["spread"][key]
        assert figure["min"] <= figure["median"] <= figure["max"]
        assert (figure["min"], figure["max"]) == (min(rounds), max(rounds))
    assert summary["publish_ratio"] == summary["spread"]["publish_ratio"]["median"] > 0
    assert summary["request_ratio"] == summary["spread"]["request_ratio"]["median"] > 0
