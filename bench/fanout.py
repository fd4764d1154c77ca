"""Fan-out benchmark: the hub's routing cost as ratios against baselines in the same run.

Machines are shared and noisy, so every figure that matters here is a *ratio*
between two things measured back to back, alternately, in the same process;
the absolute rates are printed too but only as context.

1. Routing, in process (no sockets): M publishes from one agent to K
   subscribers, through the hub's own publish handler (validation, rate limit,
   re-encoding the data, subscription matching, encoding the delivery once,
   queueing it on each subscriber's bounded send queue) -- against two baselines that do
   only the unavoidable work:

   - ``naive``: per receiver, ``json.dumps`` of the whole message + a
     memory-channel ``send_nowait`` (what a hub without encode-once does);
   - ``floor``: per publish one ``json.dumps`` of the message, then a
     ``send_nowait`` per receiver (the least any hub can do).

2. Patterns: the same K receivers all on one pattern against each on its own,
   distinct pattern that matches the subject. A delivery is encoded once per
   publish either way (one frame for every receiver), so the difference is the
   cost of subscription matching.

3. End to end over in-memory WebSockets (``open_test_hub``): M publishes from a
   raw client to K raw subscriber clients through the real hub, against a
   minimal relay over the same trio-websocket memory transport (decode, encode
   once, send to each).

This uses the hub's private ``_handle_publish`` / ``_Session`` for (1) and (2):
it is a benchmark, not an API. Not part of the test suite; prints to stdout,
writes a JSON summary only with ``--write PATH``::

    python bench/fanout.py                 # about a minute
    python bench/fanout.py --rounds 9 --write fanout.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio.testing
import trio_websocket

from artcafe_trio import HubConfig, Registry
from artcafe_trio.hub._backplane import LocalBackplane
from artcafe_trio.hub._pump import _Session, limits_of
from artcafe_trio.hub._serve import _Assembly
from artcafe_trio.protocol import (
    Auth,
    Challenge,
    Heartbeat,
    HeartbeatAck,
    Publish,
    SubjectIndex,
    Subscribe,
    decode,
    encode,
)
from artcafe_trio.protocol.server import ServerConnection
from artcafe_trio.testing import TestHub, open_test_hub

TENANT = "bench"
SUBJECT = "bench.orders.eu.west.shop1.created.v1.json.full"
DATA = {"order": 123456, "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}],
        "total": 99.5, "currency": "EUR", "note": "gift wrap"}  # fmt: skip


def all_distinct_patterns() -> list[str]:
    """Different patterns that all match SUBJECT (wildcards over its tokens)."""
    tokens = SUBJECT.split(".")
    patterns: list[str] = []
    for mask in range(2 ** len(tokens)):
        parts = ["*" if mask >> i & 1 else t for i, t in enumerate(tokens)]
        patterns.append(".".join(parts))
        for cut in range(1, len(tokens)):  # and with '>' for the tail
            patterns.append(".".join([*parts[:cut], ">"]))
    return list(dict.fromkeys(patterns))


MAX_DISTINCT = len(all_distinct_patterns())


def distinct_patterns(count: int) -> list[str]:
    """``count`` different patterns that all match SUBJECT."""
    unique = all_distinct_patterns()
    if count > len(unique):
        raise ValueError(f"at most {len(unique)} distinct patterns match {SUBJECT!r}")
    return unique[:count]


# --- 1 and 2: routing in process ----------------------------------------------------------


class Routing:
    """A hub object with K fake sessions subscribed, driven without sockets."""

    def __init__(self, receivers: int, publishes: int, *, distinct: bool) -> None:
        self.registry = Registry.open(":memory:")
        config = HubConfig(
            send_queue_size=publishes + 16, publish_rate=1e12, publish_burst=10**12,
            dedupe_max_ids=10, send_queue_bytes=2**40, output_budget_bytes=2**40,
        )  # fmt: skip
        self.hub = _Assembly(self.registry, config, LocalBackplane()).hub  # not started
        self.index: SubjectIndex[_Session] = SubjectIndex()
        self.hub._router._indexes[TENANT] = self.index
        patterns = distinct_patterns(receivers) if distinct else [SUBJECT] * receivers
        self.sessions = []
        for i, pattern in enumerate(patterns):
            session = self._session(f"r{i}")
            session.subscriptions.add(pattern)
            self.index.add(pattern, session)
            self.sessions.append(session)
        self.publisher = self._session("pub")
        self.frames = [Publish(subject=SUBJECT, data=DATA) for _ in range(publishes)]

    def _session(self, agent_id: str) -> _Session:
        auth = Auth(agent_id=agent_id, tenant_id=TENANT, algorithm="ed25519", signature="-")
        conn = ServerConnection(
            limits_of(self.hub.config), agent_id=agent_id, tenant_id=TENANT, nonce="-"
        )
        conn.receive_auth(encode(auth), 0.0)
        bucket = self.hub._publish_bucket(TENANT, agent_id)
        conn.accept(session_id=f"s-{agent_id}", hub_time=0.0, bucket=bucket)
        return _Session(
            self.hub, None, conn, remote="bench", key=None, bucket=bucket,  # type: ignore[arg-type]
        )  # fmt: skip

    async def run(self) -> float:
        handle = self.hub._handle_publish
        publisher = self.publisher
        start = time.perf_counter()
        for frame in self.frames:
            await handle(publisher, frame)
        elapsed = time.perf_counter() - start
        self.drain(len(self.frames))
        return elapsed

    def match_only(self) -> float:
        match = self.index.match
        start = time.perf_counter()
        for _ in self.frames:
            match(SUBJECT)
        return time.perf_counter() - start

    def drain(self, expected: int) -> None:
        for session in self.sessions:
            got = session.outbox.queued_frames
            session.outbox.discard()
            if got != expected:
                raise RuntimeError(f"{session!r} got {got} messages, not {expected}")

    def close(self) -> None:
        self.registry.close()


class Baseline:
    """The same deliveries without the hub: json.dumps + memory-channel sends."""

    def __init__(self, receivers: int, publishes: int, *, once: bool) -> None:
        self.once = once
        self.publishes = publishes
        channels = [trio.open_memory_channel[str](publishes + 16) for _ in range(receivers)]
        self.senders = [s for s, _ in channels]
        self.receivers = [r for _, r in channels]

    def run(self) -> float:
        dumps = json.dumps
        senders = self.senders
        start = time.perf_counter()
        for n in range(self.publishes):
            message = {"type": "message", "subject": SUBJECT, "subscription": SUBJECT,
                       "data": DATA, "sender": "pub", "message_id": f"hub-{n}",
                       "time": time.time()}  # fmt: skip
            if self.once:
                text = dumps(message, separators=(",", ":"))
                for sender in senders:
                    sender.send_nowait(text)
            else:
                for sender in senders:
                    sender.send_nowait(dumps(message, separators=(",", ":")))
        elapsed = time.perf_counter() - start
        for receiver in self.receivers:
            for _ in range(self.publishes):
                receiver.receive_nowait()
        return elapsed


def publishes_for(receivers: int, deliveries: int) -> int:
    return max(50, deliveries // receivers)


def median_ratio(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Median, min and max of a/b over paired measurements."""
    ratios = [a / b for a, b in pairs]
    return statistics.median(ratios), min(ratios), max(ratios)


async def bench_routing(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for k in args.receivers:
        m = publishes_for(k, args.deliveries)
        hub_same, hub_distinct, naive, floor, match_same, match_distinct = [], [], [], [], [], []
        for _ in range(args.rounds):  # alternate, so drift hits every variant alike
            for variant, sink in (("same", hub_same), ("distinct", hub_distinct)):
                if variant == "distinct" and k > MAX_DISTINCT:
                    continue
                routing = Routing(k, m, distinct=variant == "distinct")
                sink.append(await routing.run())
                (match_same if variant == "same" else match_distinct).append(routing.match_only())
                routing.close()
            naive.append(Baseline(k, m, once=False).run())
            floor.append(Baseline(k, m, once=True).run())
        deliveries = k * m
        row: dict[str, Any] = {
            "receivers": k, "publishes": m, "deliveries": deliveries, "rounds": args.rounds,
            "hub_same_pattern_us_per_delivery": 1e6 * statistics.median(hub_same) / deliveries,
            "naive_us_per_delivery": 1e6 * statistics.median(naive) / deliveries,
            "floor_us_per_delivery": 1e6 * statistics.median(floor) / deliveries,
            "hub_deliveries_per_s": deliveries / statistics.median(hub_same),
            "hub_publishes_per_s": m / statistics.median(hub_same),
            "ratio_hub_to_naive": median_ratio(list(zip(hub_same, naive, strict=True))),
            "ratio_hub_to_floor": median_ratio(list(zip(hub_same, floor, strict=True))),
            "match_same_us_per_publish": 1e6 * statistics.median(match_same) / m,
        }  # fmt: skip
        if hub_distinct:
            row |= {
                "hub_distinct_patterns_us_per_delivery":
                    1e6 * statistics.median(hub_distinct) / deliveries,
                "match_distinct_us_per_publish": 1e6 * statistics.median(match_distinct) / m,
                "ratio_distinct_to_same": median_ratio(
                    list(zip(hub_distinct, hub_same, strict=True))
                ),
            }  # fmt: skip
        rows.append(row)
        print(format_routing(row), flush=True)
    return rows


def format_routing(row: dict[str, Any]) -> str:
    def ratio(key: str) -> str:
        median, low, high = row[key]
        return f"{median:.2f} ({low:.2f}-{high:.2f})"

    text = (
        f"K={row['receivers']:>4} M={row['publishes']:>6}: hub "
        f"{row['hub_same_pattern_us_per_delivery']:.2f} us/delivery "
        f"({row['hub_deliveries_per_s']:,.0f} deliveries/s, "
        f"{row['hub_publishes_per_s']:,.0f} publishes/s); "
        f"naive {row['naive_us_per_delivery']:.2f}, floor {row['floor_us_per_delivery']:.2f} "
        f"us/delivery | hub/naive {ratio('ratio_hub_to_naive')}, "
        f"hub/floor {ratio('ratio_hub_to_floor')}"
    )
    if "ratio_distinct_to_same" in row:
        text += (
            f"\n        distinct patterns: {row['hub_distinct_patterns_us_per_delivery']:.2f} "
            f"us/delivery, distinct/same {ratio('ratio_distinct_to_same')}; matching "
            f"{row['match_same_us_per_publish']:.1f} us/publish (same) vs "
            f"{row['match_distinct_us_per_publish']:.1f} (distinct)"
        )
    return text


# --- 3: end to end over in-memory WebSockets -------------------------------------------------


async def raw_client(hub: TestHub, nursery: trio.Nursery, agent_id: str) -> Any:
    key = hub.register(TENANT, agent_id)
    ws = await hub.dial(nursery, f"/api/v1/ws/agent/{agent_id}?tenant_id={TENANT}")
    challenge = decode(await ws.get_message())
    assert isinstance(challenge, Challenge)
    signature = key.sign_auth(tenant_id=TENANT, agent_id=agent_id, nonce=challenge.nonce)
    auth = Auth(agent_id=agent_id, tenant_id=TENANT, algorithm=key.algorithm, signature=signature)
    await ws.send_message(encode(auth))
    assert decode(await ws.get_message()).type == "welcome"
    return ws


async def through_hub(receivers: int, publishes: int) -> float:
    config = {"publish_rate": 1e12, "publish_burst": 10**12, "send_queue_size": publishes + 16}
    async with open_test_hub(**config) as hub, trio.open_nursery() as nursery:
        subscribers = [await raw_client(hub, nursery, f"s{i}") for i in range(receivers)]
        for ws in subscribers:
            await ws.send_message(encode(Subscribe(id="s", subject=SUBJECT)))
            assert decode(await ws.get_message()).type == "subscribed"
        publisher = await raw_client(hub, nursery, "pub")
        text = encode(Publish(subject=SUBJECT, data=DATA))
        elapsed = await timed_fanout(publisher, subscribers, text, publishes)
        # the publisher's connection is still healthy afterwards
        await publisher.send_message(encode(Heartbeat(seq=1)))
        assert isinstance(decode(await publisher.get_message()), HeartbeatAck)
        nursery.cancel_scope.cancel()
    return elapsed


async def through_relay(receivers: int, publishes: int) -> float:
    """A minimal relay over the same trio-websocket memory transport: decode the publish,
    encode the message once, send it to every subscriber."""
    async with trio.open_nursery() as nursery:

        async def pair() -> tuple[Any, Any]:
            client_stream, server_stream = trio.testing.memory_stream_pair()
            server_ready: trio.Event = trio.Event()
            holder: list[Any] = []

            async def serve() -> None:
                request = await trio_websocket.wrap_server_stream(nursery, server_stream)
                holder.append(await request.accept())
                server_ready.set()

            nursery.start_soon(serve)
            client = await trio_websocket.wrap_client_stream(nursery, client_stream, "memory", "/")
            await server_ready.wait()
            return client, holder[0]

        subscribers, outgoing = [], []
        for _ in range(receivers):
            client, server = await pair()
            subscribers.append(client)
            outgoing.append(server)
        publisher, incoming = await pair()

        async def relay() -> None:
            n = 0
            while True:
                frame = json.loads(await incoming.get_message())
                n += 1
                message = {
                    "type": "message", "subject": frame["subject"],
                    "subscription": frame["subject"], "data": frame["data"],
                    "sender": "pub", "message_id": f"relay-{n}", "time": time.time(),
                }  # fmt: skip
                text = json.dumps(message, separators=(",", ":"))
                for ws in outgoing:
                    await ws.send_message(text)

        nursery.start_soon(relay)
        text = encode(Publish(subject=SUBJECT, data=DATA))
        elapsed = await timed_fanout(publisher, subscribers, text, publishes)
        nursery.cancel_scope.cancel()
    return elapsed


async def timed_fanout(publisher: Any, subscribers: list[Any], text: str, publishes: int) -> float:
    async def read_all(ws: Any) -> None:
        for _ in range(publishes):
            await ws.get_message()

    start = trio.current_time()
    async with trio.open_nursery() as readers:
        for ws in subscribers:
            readers.start_soon(read_all, ws)
        for _ in range(publishes):
            await publisher.send_message(text)
    return trio.current_time() - start


async def bench_end_to_end(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for k in args.e2e_receivers:
        m = publishes_for(k, args.e2e_deliveries)
        hub_times, relay_times = [], []
        for _ in range(args.rounds):
            hub_times.append(await through_hub(k, m))
            relay_times.append(await through_relay(k, m))
        deliveries = k * m
        row = {
            "receivers": k, "publishes": m, "deliveries": deliveries,
            "hub_us_per_delivery": 1e6 * statistics.median(hub_times) / deliveries,
            "relay_us_per_delivery": 1e6 * statistics.median(relay_times) / deliveries,
            "hub_deliveries_per_s": deliveries / statistics.median(hub_times),
            "ratio_hub_to_relay": median_ratio(list(zip(hub_times, relay_times, strict=True))),
        }  # fmt: skip
        median, low, high = row["ratio_hub_to_relay"]
        print(
            f"K={k:>4} M={m:>6}: hub {row['hub_us_per_delivery']:.1f} us/delivery "
            f"({row['hub_deliveries_per_s']:,.0f} deliveries/s), minimal relay "
            f"{row['relay_us_per_delivery']:.1f} us/delivery | hub/relay {median:.2f} "
            f"({low:.2f}-{high:.2f})",
            flush=True,
        )
        rows.append(row)
    return rows


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(f"date: {started}")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")  # fmt: skip
    print(f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(f"payload: {len(json.dumps(DATA, separators=(',', ':')))} bytes of JSON data; "
          f"medians of {args.rounds} alternating rounds; ratios as median (min-max)")  # fmt: skip
    print("\n1+2. routing in process (no sockets):")
    routing = await bench_routing(args)
    print("\n3. end to end over in-memory WebSockets:")
    e2e = await bench_end_to_end(args)
    return {"date": started, "rounds": args.rounds, "routing": routing, "end_to_end": e2e}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--receivers", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--deliveries", type=int, default=200_000, help="per routing case")
    parser.add_argument("--e2e-receivers", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--e2e-deliveries", type=int, default=20_000)
    parser.add_argument("--write", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    result = trio.run(main_async, args)
    if args.write:
        Path(args.write).write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return 0


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    raise SystemExit(main())
