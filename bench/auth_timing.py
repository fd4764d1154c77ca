"""Auth refusal timing: does the time to a refusal tell which agents exist?

A hub on 127.0.0.1 (TCP, a registry file in a temporary directory, the slow-down
disabled with ``auth_failures_free`` so that only the check itself is timed) and, in
the same trio process, a raw client that opens a connection, reads the challenge,
sends a signed ``auth`` and times from sending it to receiving the ``error``. Three
causes, interleaved so that drift affects all alike, ``--tries`` each (default 200):

- ``wrong signature``: a registered agent, signed with another key;
- ``unknown agent``: an agent id not in the registry (its tenant exists);
- ``unknown tenant``: a tenant not in the registry.

Prints median and interquartile range (microseconds) per cause, and whether the
IQRs overlap. Not part of the test suite. Example::

    python bench/auth_timing.py --tries 200 --algorithm ed25519
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio
import trio_websocket

from artcafe_trio import HubConfig, Registry, generate_private_key, open_hub
from artcafe_trio.protocol import Auth, Challenge, Error, PrivateKey, decode, encode

CAUSES = {
    "wrong signature": ("acme", "worker"),
    "unknown agent": ("acme", "ghost"),
    "unknown tenant": ("nowhere", "worker"),
}


async def attempt(url: str, tenant: str, agent: str, key: PrivateKey) -> float:
    """Seconds from sending ``auth`` to receiving the refusal."""
    async with trio_websocket.open_websocket_url(
        f"{url}/api/v1/ws/agent/{agent}?tenant_id={tenant}"
    ) as ws:
        challenge = decode(await ws.get_message())
        assert isinstance(challenge, Challenge)
        signature = key.sign_auth(tenant_id=tenant, agent_id=agent, nonce=challenge.nonce)
        text = encode(
            Auth(agent_id=agent, tenant_id=tenant, algorithm=key.algorithm, signature=signature)
        )
        start = time.perf_counter()
        await ws.send_message(text)
        answer = decode(await ws.get_message())
        took = time.perf_counter() - start
        assert isinstance(answer, Error) and answer.code == "authentication_failed", answer
        return took


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return q1, median, q3


async def run(tries: int, algorithm: str) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "hub.db"
        registered = generate_private_key(algorithm)
        with Registry.open(db) as registry:
            registry.add_key("acme", "worker", registered.public_key)
            registry.add_key("acme", "other", generate_private_key(algorithm).public_key)
        intruder = generate_private_key(algorithm)
        config = HubConfig(auth_failures_free=10**9)
        async with open_hub(db=db, port=0, config=config) as hub:
            assert hub.url is not None
            times: dict[str, list[float]] = {cause: [] for cause in CAUSES}
            for _ in range(10):  # warm up
                for tenant, agent in CAUSES.values():
                    await attempt(hub.url, tenant, agent, intruder)
            for i in range(tries):
                for cause, (tenant, agent) in CAUSES.items():
                    times[cause].append(await attempt(hub.url, tenant, agent, intruder))
                if (i + 1) % 50 == 0:
                    print(f"{i + 1}/{tries}", file=sys.stderr)
    summary: dict[str, dict[str, float]] = {}
    for cause, values in times.items():
        q1, median, q3 = quartiles(values)
        summary[cause] = {"median_us": median * 1e6, "q1_us": q1 * 1e6, "q3_us": q3 * 1e6}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=200)
    parser.add_argument("--algorithm", choices=("ed25519", "rsa"), default="ed25519")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    summary = trio.run(run, args.tries, args.algorithm)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{args.algorithm}, {args.tries} tries per cause (microseconds, send auth -> error)")
    print(f"{'cause':<16} {'median':>8} {'Q1':>8} {'Q3':>8} {'IQR':>8}")
    for cause, s in summary.items():
        iqr = s["q3_us"] - s["q1_us"]
        print(f"{cause:<16} {s['median_us']:8.0f} {s['q1_us']:8.0f} {s['q3_us']:8.0f} {iqr:8.0f}")
    ranges = [(s["q1_us"], s["q3_us"]) for s in summary.values()]
    overlap = max(low for low, _ in ranges) <= min(high for _, high in ranges)
    print(f"interquartile ranges {'overlap' if overlap else 'DO NOT overlap'}")


if __name__ == "__main__":
    main()
