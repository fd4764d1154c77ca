"""Attacks on a running hub, with a bystander watching: the figures of docs/reliability.md.

Starts ``artcafe-trio hub`` as a subprocess on a temporary registry and, from this
process over loopback TCP, runs the attacks of the hardening issue while two
*bystander* agents of another tenant (1 s heartbeats) ping themselves every 100 ms
(publish to their own subject, time until the delivery arrives):

- ``fanout``: one valid agent subscribes 1,000 distinct patterns that all match one
  10-token subject and publishes ~1 MiB to it 3 times a second (reading what it gets);
- ``reconnect``: 12 sessions of one agent in turn, each pipelining 2,000 publishes with
  ids, against the default limit of 1,000/s (burst 2,000);
- ``pipeline``: 1,900 publishes with ids sent at once while reading promptly, then
  3,000 heartbeats at 100 per 5 ms;
- ``preauth``: from one address, slowloris sockets (half an HTTP request), upgraded but
  silent sockets and sockets sending a partial frame, each re-opened when closed;
- ``authparallel``: 50 connections in parallel, each sending an ``auth`` with a wrong
  signature for a registered agent and giving up after 100 ms, again and again;
- ``surrogate``: 10 connections in parallel sending ``admin_auth`` with a lone
  surrogate as the token (``"\\ud800"``), giving up after 100 ms;
- ``registryrm``: the registry file is deleted under the running hub while one agent
  connects and leaves again and again (presence changes to write);
- ``presence``: 100 agents with 8 KB metadata each, then one agent with no heartbeats
  that never reads its socket sends ``presence_query`` until its sends block.

The last three run the hub at ``--log-level INFO`` and report its log bytes and lines
during the attack and its metrics after (``--metrics-port``).

For each: the hub's RSS before and at its peak (sampled every 100 ms), the bystanders'
ping round trip p50/p99/max, their reconnects and lost pings, and what the attack got.
Not part of the test suite::

    python bench/attacks.py               # all, about 2 minutes
    python bench/attacks.py fanout --seconds 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from artcafe_trio import Registry, generate_private_key, load_private_key, open_agent
from artcafe_trio.protocol import (
    Auth,
    Challenge,
    Error,
    Heartbeat,
    HeartbeatAck,
    Message,
    PresenceQuery,
    PrivateKey,
    Publish,
    Published,
    Subscribe,
    Subscribed,
    decode,
    encode,
)

ATTACK, BYSTANDERS = "attack", "byst"
SUBJECT = "a.b.c.d.e.f.g.h.i.j"
MAX_MESSAGE = 16 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Target:
    """What an attacker needs: the hub's port and the attacking agent's key."""

    def __init__(self, port: int, attacker_key: PrivateKey, pid: int, db: str = "") -> None:
        self.port = port
        self.url = f"ws://127.0.0.1:{port}"
        self.keys = {(ATTACK, "attacker"): attacker_key}
        self.pid = pid
        self.db = db


class Setup:
    def __init__(self, workdir: Path, log_level: str = "ERROR") -> None:
        self.db = workdir / "hub.db"
        self.log = workdir / "hub.log"
        self.key_file = workdir / "attacker.pem"
        self.keys: dict[tuple[str, str], PrivateKey] = {}
        registry = Registry.open(self.db)
        for tenant, agent in [(ATTACK, "attacker"), (BYSTANDERS, "b1"), (BYSTANDERS, "b2")]:
            key = generate_private_key()
            registry.add_key(tenant, agent, key.public_key)
            self.keys[(tenant, agent)] = key
        registry.close()
        self.key_file.write_bytes(self.keys[(ATTACK, "attacker")].to_pem())
        self.port = free_port()
        self.metrics_port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        command = shutil.which("artcafe-trio") or str(
            Path(sys.executable).with_name("artcafe-trio")
        )
        self._log_file = self.log.open("wb")
        self.hub = subprocess.Popen(
            [command, "hub", "--db", str(self.db), "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--log-level", log_level],
            stdout=self._log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.hub.terminate()
        self.hub.wait(10)
        self._log_file.close()

    def metrics(self) -> dict[str, float]:
        """The hub's Prometheus metrics, by name (labels kept in the name)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


async def raw_session(
    setup: Target, nursery: trio.Nursery, tenant: str, agent: str, **auth: Any
) -> trio_websocket.WebSocketConnection:
    ws = await trio_websocket.connect_websocket_url(
        nursery,
        f"{setup.url}/api/v1/ws/agent/{agent}?tenant_id={tenant}",
        max_message_size=MAX_MESSAGE,
    )
    challenge = decode(await ws.get_message())
    assert isinstance(challenge, Challenge)
    key = setup.keys[(tenant, agent)]
    signature = key.sign_auth(tenant_id=tenant, agent_id=agent, nonce=challenge.nonce)
    await ws.send_message(
        encode(
            Auth(
                agent_id=agent, tenant_id=tenant, algorithm=key.algorithm, signature=signature,
                **auth,
            )
        )
    )  # fmt: skip
    welcome = decode(await ws.get_message())
    assert welcome.type == "welcome", welcome
    return ws


class Bystanders:
    """Two agents of another tenant pinging themselves every 100 ms."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.rtts: list[float] = []
        self.sent = self.received = 0
        self.agents: list[Any] = []
        self.measuring = False

    async def run(self, name: str, task_status: trio.TaskStatus[None]) -> None:
        key = self.setup.keys[(BYSTANDERS, name)]
        async with open_agent(
            agent_id=name, tenant_id=BYSTANDERS, private_key=key, url=self.setup.url,
            heartbeat_interval=1.0,
        ) as agent:  # fmt: skip
            sent_at: dict[int, float] = {}  # pings sent while measuring

            async def pong(subject: str, data: Any) -> None:
                started = sent_at.pop(data, None)
                if started is not None:
                    self.received += 1
                    self.rtts.append(trio.current_time() - started)

            await agent.subscribe(f"ping.{name}", pong)
            self.agents.append(agent)
            task_status.started()
            for n in itertools.count():
                if self.measuring:
                    sent_at[n] = trio.current_time()
                    self.sent += 1
                await agent.publish(f"ping.{name}", n)
                await trio.sleep(0.1)

    def reconnects(self) -> int:
        return sum(a.health().total_reconnects for a in self.agents)


async def sample_rss(pid: int, peak: list[float]) -> None:
    while True:
        peak[0] = max(peak[0], rss_mib(pid))
        await trio.sleep(0.1)


async def attack_fanout(setup: Target, nursery: trio.Nursery, seconds: float) -> dict[str, Any]:
    ws = await raw_session(setup, nursery, ATTACK, "attacker")
    patterns = [".".join(mix) for mix in itertools.product(*[(t, "*") for t in "abcdefghij"])]
    for n, pattern in enumerate(patterns[:1000]):
        await ws.send_message(encode(Subscribe(id=f"s{n}", subject=pattern)))
    for _ in range(1000):
        assert isinstance(decode(await ws.get_message()), Subscribed)
    payload = "x" * (1024 * 1024 - 4096)
    deliveries = publishes = 0

    async def read() -> None:
        nonlocal deliveries
        while True:
            frame = decode(await ws.get_message(), max_bytes=MAX_MESSAGE)
            deliveries += isinstance(frame, Message)

    nursery.start_soon(read)
    with trio.move_on_after(seconds):
        while True:
            await ws.send_message(encode(Publish(subject=SUBJECT, data=payload)))
            publishes += 1
            await trio.sleep(1 / 3)
    await trio.sleep(0.5)
    return {"publishes": publishes, "deliveries_to_attacker": deliveries}


async def attack_reconnect(setup: Target, nursery: trio.Nursery, seconds: float) -> dict[str, Any]:
    accepted = refused = 0
    start = trio.current_time()
    for session in range(12):
        ws = await raw_session(setup, nursery, ATTACK, "attacker")
        for n in range(2000):
            await ws.send_message(encode(Publish(subject="flood", data=n, id=f"{session}-{n}")))
        for _ in range(2000):
            frame = decode(await ws.get_message())
            if isinstance(frame, Published):
                accepted += 1
            elif isinstance(frame, Error) and frame.code == "rate_limited":
                refused += 1
        await ws.aclose()
    elapsed = trio.current_time() - start
    return {
        "sessions": 12, "elapsed_s": round(elapsed, 2), "accepted": accepted,
        "refused": refused, "allowed_by_limit": int(2000 + 1000 * elapsed),
    }  # fmt: skip


async def attack_pipeline(setup: Target, nursery: trio.Nursery, seconds: float) -> dict[str, Any]:
    ws = await raw_session(setup, nursery, ATTACK, "attacker")
    answers = acks = 0
    closed: int | None = None

    async def read(total: int) -> None:
        nonlocal answers, acks, closed
        try:
            while answers + acks < total:
                frame = decode(await ws.get_message())
                answers += isinstance(frame, Published)
                acks += isinstance(frame, HeartbeatAck)
        except trio_websocket.ConnectionClosed as exc:
            closed = exc.reason.code

    async with trio.open_nursery() as inner:
        inner.start_soon(read, 1900 + 3000)
        for n in range(1900):
            await ws.send_message(encode(Publish(subject="nowhere", data=n, id=f"p{n}")))
        for seq in range(3000):
            await ws.send_message(encode(Heartbeat(seq=seq)))
            if seq % 100 == 99:
                await trio.sleep(0.005)
    return {"published_answers": answers, "heartbeat_acks": acks, "closed_with": closed}


async def attack_preauth(setup: Target, nursery: trio.Nursery, seconds: float) -> dict[str, Any]:
    opened = closed = 0
    request = (
        f"GET /api/v1/ws/agent/x?tenant_id={ATTACK} HTTP/1.1\r\nHost: h\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()

    async def hold(kind: str) -> None:
        nonlocal opened, closed
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", setup.port)
            except OSError:
                await trio.sleep(0.05)
                continue
            opened += 1
            try:
                if kind == "slowloris":
                    await stream.send_all(request[:40])
                else:
                    await stream.send_all(request)
                    if kind == "partial":
                        await stream.send_all(b"\x81\xfe\x10\x00abcd")  # a frame, never finished
                while await stream.receive_some(65536):
                    pass
            except (OSError, trio.BrokenResourceError):
                pass
            closed += 1
            await stream.aclose()

    async with trio.open_nursery() as attackers:
        for kind in ("slowloris", "silent", "partial"):
            for _ in range(500):
                attackers.start_soon(hold, kind)
        await trio.sleep(seconds)
        fds = len(os.listdir(f"/proc/{setup.pid}/fd"))
        attackers.cancel_scope.cancel()
    return {"sockets_kept_open_by_attacker": 1500, "opened": opened, "closed_by_hub": closed,
            "hub_open_fds_at_end": fds}  # fmt: skip


async def _give_up_loop(
    url: str, first_frame: str, seconds: float, parallel: int, give_up: float
) -> dict[str, Any]:
    """``parallel`` clients, each: connect, read the challenge, send ``first_frame``,
    wait ``give_up`` seconds at most for the answer, close; again until ``seconds``."""
    sent = answered = failed = 0

    async def client() -> None:
        nonlocal sent, answered, failed
        while True:
            try:
                # Cancelled: the connection is dropped without waiting for a close handshake.
                with trio.CancelScope() as scope:
                    async with trio_websocket.open_websocket_url(url) as ws:
                        await ws.get_message()  # the challenge
                        await ws.send_message(first_frame)
                        sent += 1
                        scope.deadline = trio.current_time() + give_up
                        await ws.get_message()
                        answered += 1
                        scope.cancel()
            except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed):
                failed += 1
                await trio.sleep(0.01)

    start = trio.current_time()
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as clients:
            for _ in range(parallel):
                clients.start_soon(client)
    elapsed = trio.current_time() - start
    return {
        "parallel": parallel, "give_up_ms": round(give_up * 1000), "first_frames_sent": sent,
        "attempts_per_s": round(sent / elapsed, 1), "answers_seen": answered,
        "connections_failed": failed,
    }  # fmt: skip


async def attack_authparallel(
    setup: Target, nursery: trio.Nursery, seconds: float
) -> dict[str, Any]:
    wrong = generate_private_key()  # not the attacker's registered key
    frame = encode(
        Auth(
            agent_id="attacker", tenant_id=ATTACK, algorithm=wrong.algorithm,
            signature=wrong.sign_auth(tenant_id=ATTACK, agent_id="attacker", nonce="x"),
        )
    )  # fmt: skip
    url = f"{setup.url}/api/v1/ws/agent/attacker?tenant_id={ATTACK}"
    return await _give_up_loop(url, frame, seconds, parallel=50, give_up=0.1)


async def attack_surrogate(setup: Target, nursery: trio.Nursery, seconds: float) -> dict[str, Any]:
    frame = '{"type": "admin_auth", "token": "\\ud800"}'  # a lone surrogate, JSON-escaped
    url = f"{setup.url}/api/v1/ws/admin"
    return await _give_up_loop(url, frame, seconds, parallel=10, give_up=0.1)


async def attack_registryrm(setup: Target, nursery: trio.Nursery, seconds: float) -> dict[str, Any]:
    os.unlink(setup.db)  # under the running hub
    sessions = 0
    with trio.move_on_after(seconds):
        while True:
            ws = await raw_session(setup, nursery, ATTACK, "attacker")
            sessions += 1
            await ws.aclose()
            await trio.sleep(0.05)
    return {"sessions_after_rm": sessions}


async def attack_presence(setup: Target, nursery: trio.Nursery, seconds: float) -> dict[str, Any]:
    registry = Registry.open(setup.db)  # 100 more agents of the attacker's tenant
    for n in range(100):
        key = generate_private_key()
        registry.add_key(ATTACK, f"peer{n}", key.public_key)
        setup.keys[(ATTACK, f"peer{n}")] = key
    registry.close()
    await trio.sleep(2)  # the hub reloads its keys
    meta = {"blob": "m" * 8000}
    for n in range(100):
        await raw_session(setup, nursery, ATTACK, f"peer{n}", metadata=meta)
    ws = await raw_session(setup, nursery, ATTACK, "attacker")  # no heartbeats, never reads
    sent = 0
    with trio.move_on_after(seconds):
        while True:
            with trio.move_on_after(1) as blocked:
                await ws.send_message(encode(PresenceQuery(id=f"q{sent}")))
            if blocked.cancelled_caught:
                break  # the hub stopped reading and the socket buffers are full
            sent += 1
    await trio.sleep(max(0.0, seconds - 1))
    return {"agents_with_8kb_metadata": 100, "presence_queries_sent": sent}


ATTACKS = {
    "fanout": attack_fanout,
    "reconnect": attack_reconnect,
    "pipeline": attack_pipeline,
    "preauth": attack_preauth,
    "authparallel": attack_authparallel,
    "surrogate": attack_surrogate,
    "registryrm": attack_registryrm,
    "presence": attack_presence,
}
LOGGED = {"authparallel", "surrogate", "registryrm"}  # run the hub at INFO, report its log


async def run_one(name: str, seconds: float) -> dict[str, Any]:
    """The bystanders here; the attack in a process of its own (its CPU is not theirs)."""
    with tempfile.TemporaryDirectory() as tmp:
        setup = Setup(Path(tmp), "INFO" if name in LOGGED else "ERROR")
        try:
            bystanders = Bystanders(setup)
            peak = [0.0]
            async with trio.open_nursery() as nursery:
                for agent in ("b1", "b2"):
                    await nursery.start(bystanders.run, agent)
                await trio.sleep(2)
                before = rss_mib(setup.hub.pid)
                peak[0] = before
                nursery.start_soon(sample_rss, setup.hub.pid, peak)
                bystanders.measuring = True
                log_before = setup.log.read_bytes()
                attack_start = trio.current_time()
                attacker = await trio.run_process(
                    [sys.executable, __file__, "--child", name, "--seconds", str(seconds),
                     "--port", str(setup.port), "--key", str(setup.key_file),
                     "--pid", str(setup.hub.pid), "--db", str(setup.db)],
                    capture_stdout=True,
                )  # fmt: skip
                result: dict[str, Any] = json.loads(attacker.stdout)
                attack_seconds = trio.current_time() - attack_start
                log = setup.log.read_bytes()[len(log_before) :]
                bystanders.measuring = False
                await trio.sleep(2)  # the last pings arrive
                nursery.cancel_scope.cancel()
            if name in LOGGED:
                metrics = await trio.to_thread.run_sync(setup.metrics)
                result |= {
                    "hub_log_bytes_per_s": round(len(log) / attack_seconds),
                    "hub_log_lines": log.count(b"\n"),
                    "hub_log_error_lines": log.count(b" ERROR "),
                    "hub_log_registry_lines": sum(b"registry" in line for line in log.splitlines()),
                    "hub_log_tracebacks": log.count(b"Traceback"),
                    "hub_auth_failures_total": metrics.get("artcafe_auth_failures_total"),
                    "hub_registry_file_lost": metrics.get("artcafe_registry_file_lost"),
                    "hub_presence_writes_pending": metrics.get("artcafe_presence_writes_pending"),
                }
            rtts = [1000 * r for r in bystanders.rtts]
            result |= {
                "hub_rss_mib_before": round(before, 1),
                "hub_rss_mib_peak": round(peak[0], 1),
                "bystander_ping_ms_p50": round(statistics.median(rtts), 2) if rtts else None,
                "bystander_ping_ms_p99": round(percentile(rtts, 0.99), 2),
                "bystander_ping_ms_max": round(max(rtts, default=float("nan")), 2),
                "bystander_pings_lost": bystanders.sent - bystanders.received,
                "bystander_reconnects": bystanders.reconnects(),
            }
            return result
        finally:
            setup.close()


async def run_attack(name: str, target: Target, seconds: float) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        result = await ATTACKS[name](target, nursery, seconds)
        nursery.cancel_scope.cancel()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attacks", nargs="*", metavar="ATTACK", help=f"of {', '.join(ATTACKS)}")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each attack")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one attack, print JSON
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        target = Target(args.port, load_private_key(args.key), args.pid, args.db)
        print(json.dumps(trio.run(run_attack, args.child, target, args.seconds)))
        return 0
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    results = {}
    for name in args.attacks or list(ATTACKS):
        results[name] = trio.run(run_one, name, args.seconds)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
