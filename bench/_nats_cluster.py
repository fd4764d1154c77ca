"""A 3-node nats-server cluster (JetStream, routed) on free loopback ports, for
``bench/cluster.py`` (the approach of ``tests/nats/servers.py``, in trio, without
importing from the tests)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from peers import Child, nats_server_binary


def free_ports(count: int) -> list[int]:
    import socket

    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


async def _get_json(port: int, what: str) -> dict[str, Any]:
    import urllib.request

    import trio

    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{what}", timeout=1) as r:
            data: dict[str, Any] = json.load(r)
            return data

    return await trio.to_thread.run_sync(get)


async def _cluster_ready(http_ports: list[int], names: list[str], url: str) -> bool:
    """Routes up, the meta leader sees every peer current, an R3 stream can be placed."""
    from artcafe_trio.nats import JetStreamError, NatsError, open_nats
    from artcafe_trio.nats._kv import _api

    try:
        for port in http_ports:
            if int((await _get_json(port, "routez")).get("num_routes", 0)) < len(names) - 1:
                return False
        meta = (await _get_json(http_ports[0], "jsz")).get("meta_cluster") or {}
        if meta.get("leader") not in names:
            return False
        leader = http_ports[names.index(meta["leader"])]
        replicas = ((await _get_json(leader, "jsz")).get("meta_cluster") or {}).get("replicas")
        if not (replicas and len(replicas) == len(names) - 1):
            return False
        if not all(r.get("current") for r in replicas):
            return False
        config = {"name": "PROBE", "subjects": ["probe.r3"], "num_replicas": 3}
        config["storage"] = "memory"
        async with open_nats(url) as nc:
            await _api(nc, "$JS.API.STREAM.CREATE.PROBE", config, 2.0)
            await _api(nc, "$JS.API.STREAM.DELETE.PROBE", None, 2.0)
    except (OSError, JetStreamError, NatsError):
        return False
    return True


@contextlib.asynccontextmanager
async def nats_cluster(workdir: Path, logs: Path) -> AsyncIterator[list[tuple[Child, str]]]:
    """Three routed nats-server nodes with JetStream; yields (child, client URL)."""
    import trio

    ports = free_ports(9)
    groups = [ports[i * 3 : i * 3 + 3] for i in range(3)]
    routes = ",".join(f"nats://127.0.0.1:{g[2]}" for g in groups)
    names = [f"n{i + 1}" for i in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        for name, (port, http, cluster) in zip(names, groups, strict=True):
            args = [
                nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-m", str(http),
                "-n", name, "-js", "-sd", str(workdir / name), "--cluster_name", "bench",
                "--cluster", f"nats://127.0.0.1:{cluster}", "--routes", routes,
            ]  # fmt: skip
            child = Child(f"nats {name}", args, logs / f"nats-{name}.log")
            await child.start()
            stack.push_async_callback(child.stop)
            nodes.append((child, f"nats://127.0.0.1:{port}"))
        with trio.fail_after(30):
            while not await _cluster_ready([g[1] for g in groups], names, nodes[0][1]):
                await trio.sleep(0.1)
        yield nodes
