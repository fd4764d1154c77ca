"""The cast: each agent of the demo, and its transport with the faults the demo injects."""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import sys
from typing import Any

import trio

from artcafe_trio import Agent, AgentHealth

from .._faulty import FaultyStream
from ..agent import MemoryTransport

__all__ = ["Link", "Member"]


class Link:
    """One agent's transport (its ``dial``): a real TCP connection to the hub, wrapped in a
    :class:`~artcafe_trio.testing.FaultyStream`, plus the faults the demo injects."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        #: The agent's transport: the WebSocket over :meth:`open_stream`.
        self.transport = MemoryTransport(self.open_stream, host=f"{host}:{port}")
        self.network_up = True
        self.refused = 0
        self.stream: FaultyStream | None = None
        self.tcp: trio.SocketStream | None = None

    async def open_stream(self) -> trio.abc.Stream:
        """A new TCP connection to the hub behind a fault injector (``transport`` dials
        through it)."""
        await trio.lowlevel.checkpoint()
        if not self.network_up:  # decided after the checkpoint: no stale verdict
            self.refused += 1
            raise OSError(errno.ENETUNREACH, "network is unreachable (simulated outage)")
        tcp = await trio.open_tcp_stream(self.host, self.port)
        stream = FaultyStream(tcp)
        self.tcp, self.stream = tcp, stream
        return stream

    def hang(self) -> None:
        """Blackhole the current connection both ways; the socket stays open."""
        if self.stream is not None:
            self.stream.blackholed = True

    def reset(self) -> None:
        """Drop the current TCP connection abruptly: the hub gets a RST, the agent's
        reads fail at once."""
        if self.tcp is None:
            return
        sock = self.tcp.socket
        linger = struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        sock.close()


class Member:
    """One agent of the demo and what the demo saw of it."""

    def __init__(self, name: str, link: Link, key_path: str) -> None:
        self.name = name
        self.link = link
        self.key_path = key_path
        self.agent: Agent | None = None
        self.stop = trio.Event()
        self.tasks = 0
        self.health: AgentHealth | None = None
        self.lost_at: float | None = None
        self.ack_before_loss: float | None = None

    def on_task(self, subject: str, data: Any) -> None:
        self.tasks += 1
