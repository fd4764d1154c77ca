"""A tiny in-memory NATS server for driver tests under ``autojump_clock``.

It speaks just enough of the server side: INFO, CONNECT, PING/PONG, and it
records SUB/UNSUB/PUB/HPUB commands. Tests make it refuse dials, stop
answering (a frozen server), stop reading altogether (a stalled server: with
``lockstep=True`` the client's writes then block, as on a full TCP window),
close connections, or send messages.
"""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing


class FakeConnection:
    def __init__(self, server: FakeServer, stream: trio.abc.Stream, host: str, port: int) -> None:
        self.server = server
        self.stream = stream
        self.address = f"{host}:{port}"
        self.commands: list[tuple[Any, ...]] = []
        self.frozen = False
        self.stalled = False
        self.connected = trio.Event()
        self._buf = bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()

    async def run(self) -> None:
        info = {
            "server_id": "fake",
            "version": "2.15.1",
            "proto": 1,
            "headers": True,
            "max_payload": 1 << 20,
        }
        info.update(self.server.info)
        try:
            await self.stream.send_all(b"INFO " + json.dumps(info).encode() + b"\r\n")
            while True:
                if self.stalled:  # like SIGSTOP: nothing is read any more
                    await trio.sleep_forever()
                data = await self.stream.receive_some(65536)
                if not data:
                    return
                if self.frozen:
                    continue
                self._buf += data
                await self._process()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _process(self) -> None:
        while True:
            nl = self._buf.find(b"\r\n")
            if nl < 0:
                return
            line = bytes(self._buf[:nl])
            op, *args = line.split(b" ")
            if op in (b"PUB", b"HPUB"):
                size = int(args[-1])
                if len(self._buf) < nl + 2 + size + 2:
                    return
                payload = bytes(self._buf[nl + 2 : nl + 2 + size])
                del self._buf[: nl + 2 + size + 2]
                self.commands.append((op.decode(), args[0].decode(), payload))
                continue
            del self._buf[: nl + 2]
            if op == b"CONNECT":
                self.commands.append(("CONNECT", json.loads(line[8:])))
            elif op == b"PING":
                self.commands.append(("PING",))
                if not self.frozen:
                    await self.stream.send_all(b"PONG\r\n")
                    self.connected.set()
            elif op == b"PONG":
                self.commands.append(("PONG",))
            elif op == b"SUB":
                self.commands.append(("SUB", *(a.decode() for a in args)))
            elif op == b"UNSUB":
                self.commands.append(("UNSUB", *(a.decode() for a in args)))
            else:
                raise AssertionError(f"unexpected command {line!r}")

    def pubs(self) -> list[bytes]:
        return [c[2] for c in self.commands if c[0] in ("PUB", "HPUB")]


class FakeServer:
    """``dial`` for ``open_nats``; every dial makes a new :class:`FakeConnection`."""

    def __init__(self, nursery: trio.Nursery, *, lockstep: bool = False, **info: Any) -> None:
        self.nursery = nursery
        #: Streams whose ``send_all`` waits until the other side has received it all.
        self.lockstep = lockstep
        self.info = info
        self.connections: list[FakeConnection] = []
        self.dials: list[tuple[float, str]] = []
        self.refuse = False
        self.new_connection = trio.Event()

    async def dial(self, host: str, port: int) -> trio.abc.Stream:
        self.dials.append((trio.current_time(), f"{host}:{port}"))
        await trio.lowlevel.checkpoint()
        if self.refuse:
            raise ConnectionRefusedError("refused by the fake")
        if self.lockstep:
            client, server = trio.testing.lockstep_stream_pair()
        else:
            client, server = trio.testing.memory_stream_pair()
        conn = FakeConnection(self, server, host, port)
        self.connections.append(conn)
        self.nursery.start_soon(conn.run)
        self.new_connection.set()
        self.new_connection = trio.Event()
        return client

    @property
    def current(self) -> FakeConnection:
        return self.connections[-1]
