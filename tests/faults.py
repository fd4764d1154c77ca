"""A TCP proxy that injects network faults between agents and a hub, for trio tests.

::

    async with open_fault_proxy(hub.port) as proxy:
        async with open_agent(url=proxy.url, ...) as agent:
            proxy.blackhole()            # half-open: sockets up, every byte dropped
            proxy.blackhole(False)
            proxy.set_latency(0.2)       # delay each chunk by 0.2 s, order preserved
            proxy.reset_all()            # RST both sides of every current connection
            proxy.refuse()               # new connections: accepted, then reset at once
            proxy.refuse(mode="unlisten")  # new connections: ECONNREFUSED (listener closed)
            proxy.refuse(False)

Directions are named from the agent's point of view: ``to_hub`` carries what
agents send, ``to_agents`` what the hub sends. Faults are proxy-wide switches
read for every chunk, so they apply to current and new connections alike.

Task tree (everything lives in the proxy's nursery, cancelled on exit)::

    proxy nursery
    ├── acceptor                 accepts, or refuses while ``refusing``
    └── link (one per connection; its own cancel scope: ``reset_all`` cancels it)
        ├── reader/writer to_hub     reader stamps chunks; writer delays, then forwards
        └── reader/writer to_agents

A reader keeps reading while its direction is blackholed (the bytes vanish,
the sender's kernel sees them acknowledged: a half-open path), and while a
chunk waits out its latency the reader goes on reading (bounded by a small
queue), so latency delays bytes without throttling throughput.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal, TypeAlias

import attrs
import trio

from .ports import free_port

__all__ = ["Direction", "FaultProxy", "LinkStats", "RefuseMode", "open_fault_proxy"]

Direction: TypeAlias = Literal["to_hub", "to_agents"]
RefuseMode: TypeAlias = Literal["close", "unlisten"]
DIRECTIONS: tuple[Direction, Direction] = ("to_hub", "to_agents")
CHUNK = 65536
QUEUE_CHUNKS = 64
"""Chunks a direction holds while they wait out the latency (then the reader pauses:
ordinary TCP back-pressure toward the sender)."""


def _chosen(*, to_hub: bool, to_agents: bool) -> tuple[tuple[Direction, bool], ...]:
    return (("to_hub", to_hub), ("to_agents", to_agents))


def _close_now(stream: trio.SocketStream, *, reset: bool) -> None:
    """Close without a checkpoint (so a cancellation cannot skip it); with ``reset``,
    send an RST instead of a FIN, as when a NAT box or a crashed peer forgets us."""
    if reset:
        with contextlib.suppress(OSError):  # already closed
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@attrs.define
class LinkStats:
    """Byte counters of the whole proxy, per direction."""

    forwarded: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    dropped: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(DIRECTIONS, 0))


class _Link:
    """One proxied connection: agent-side stream ↔ hub-side stream."""

    def __init__(
        self, proxy: FaultProxy, agent_side: trio.SocketStream, hub_side: trio.SocketStream
    ) -> None:
        self.proxy = proxy
        self.agent_side = agent_side
        self.hub_side = hub_side
        self.scope = trio.CancelScope()
        self.reset = False

    def abort(self) -> None:
        """Reset both sides: RST, not FIN, as when a NAT box or a peer's kernel forgets us."""
        self.reset = True
        self.scope.cancel()

    async def run(self) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._direction, "to_hub", self.agent_side, self.hub_side)
                    nursery.start_soon(self._direction, "to_agents", self.hub_side, self.agent_side)
        finally:
            for stream in (self.agent_side, self.hub_side):
                _close_now(stream, reset=self.reset)

    async def _direction(
        self, direction: Direction, source: trio.SocketStream, sink: trio.SocketStream
    ) -> None:
        send, receive = trio.open_memory_channel[tuple[float, bytes]](QUEUE_CHUNKS)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader, direction, source, send)
                await self._writer(direction, sink, receive)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            # One side was reset: pass the reset on to the other side.
            self.reset = True
            self.scope.cancel()

    async def _reader(
        self,
        direction: Direction,
        source: trio.SocketStream,
        send: trio.MemorySendChannel[tuple[float, bytes]],
    ) -> None:
        proxy = self.proxy
        async with send:
            while True:
                data = await source.receive_some(CHUNK)
                if not data:
                    if proxy.blackholed[direction]:
                        # A FIN is a packet too: on a blackholed path it never arrives.
                        await trio.sleep_forever()
                    return  # end of stream: the writer forwards the EOF once drained
                if proxy.blackholed[direction]:
                    proxy.stats.dropped[direction] += len(data)
                    continue
                await send.send((trio.current_time() + proxy.latency[direction], bytes(data)))

    async def _writer(
        self,
        direction: Direction,
        sink: trio.SocketStream,
        receive: trio.MemoryReceiveChannel[tuple[float, bytes]],
    ) -> None:
        proxy = self.proxy
        async with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                if proxy.blackholed[direction]:
                    proxy.stats.dropped[direction] += len(data)
                    continue
                await sink.send_all(data)
                proxy.stats.forwarded[direction] += len(data)
        await sink.send_eof()  # BrokenResourceError if that side is gone already


class FaultProxy:
    """A running proxy; create it with :func:`open_fault_proxy`.

    Switches (safe to flip at any time from the test's task):

    - ``latency[direction]`` / :meth:`set_latency`: seconds each chunk is held.
    - ``blackholed[direction]`` / :meth:`blackhole`: bytes dropped, sockets kept open.
    - :meth:`reset_all`: reset (RST) both sides of every current connection.
    - ``refusing`` / :meth:`refuse`: new connections are reset at once (``"close"``)
      or find no listener at all (``"unlisten"``: ECONNREFUSED).

    Counters: ``accepted``, ``refused``, ``resets``, ``active`` (links now open),
    ``stats`` (bytes forwarded and dropped per direction).
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.latency: dict[Direction, float] = dict.fromkeys(DIRECTIONS, 0.0)
        self.blackholed: dict[Direction, bool] = dict.fromkeys(DIRECTIONS, False)
        self.refusing = False
        self.refuse_mode: RefuseMode = "close"
        self.accepted = 0
        self.refused = 0
        self.resets = 0
        self.stats = LinkStats()
        self._links: set[_Link] = set()
        self._nursery: trio.Nursery | None = None
        self._listener: trio.SocketListener | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def active(self) -> int:
        return len(self._links)

    def __repr__(self) -> str:
        return (
            f"<FaultProxy :{self.port}→:{self.target_port} links={self.active} "
            f"latency={self.latency} blackholed={self.blackholed} refusing={self.refusing}>"
        )

    # --- switches ------------------------------------------------------------

    def set_latency(self, seconds: float, *, to_hub: bool = True, to_agents: bool = True) -> None:
        """Hold every chunk ``seconds`` before forwarding it (0: no delay). Order is kept."""
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        for direction, chosen in _chosen(to_hub=to_hub, to_agents=to_agents):
            if chosen:
                self.latency[direction] = seconds

    def blackhole(self, on: bool = True, *, to_hub: bool = True, to_agents: bool = True) -> None:
        """Drop every byte in the chosen direction(s); the sockets stay up (half-open).

        Chunks already waiting out their latency are dropped too."""
        for direction, chosen in _chosen(to_hub=to_hub, to_agents=to_agents):
            if chosen:
                self.blackholed[direction] = on

    def reset_all(self) -> int:
        """Reset both sides of every current connection; returns how many were reset."""
        links = list(self._links)
        for link in links:
            link.abort()
        self.resets += len(links)
        return len(links)

    def refuse(self, on: bool = True, *, mode: RefuseMode = "close") -> None:
        """Refuse new connections (current ones are not touched; see :meth:`reset_all`).

        ``"close"``: accept, then reset at once (the client's handshake fails);
        ``"unlisten"``: close the listening socket now (the client gets ECONNREFUSED);
        the proxy listens again on the same port when refusing stops.
        """
        if mode not in ("close", "unlisten"):
            raise ValueError(f"unknown refuse mode {mode!r}")
        self.refusing = on
        self.refuse_mode = mode
        unlisten = on and mode == "unlisten"
        if unlisten and self._listener is not None:
            self._listener.socket.close()  # the acceptor sees ClosedResourceError and ends
            self._listener = None
        elif not unlisten and self._listener is None and self._nursery is not None:
            self._listener = self._listen(self.port)
            self._nursery.start_soon(self._acceptor, self._listener)

    # --- machinery -------------------------------------------------------------

    @staticmethod
    def _listen(port: int) -> trio.SocketListener:
        """A listener on 127.0.0.1:``port``, bound synchronously (so a switch takes effect
        before the test's next line)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(1024)
        except BaseException:
            sock.close()
            raise
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def _acceptor(self, listener: trio.SocketListener) -> None:
        try:
            while True:
                stream = await listener.accept()
                if self.refusing:
                    self.refused += 1
                    _close_now(stream, reset=True)
                    continue
                self.accepted += 1
                assert self._nursery is not None
                self._nursery.start_soon(self._serve, stream)
        except trio.ClosedResourceError:
            return  # unlisten
        finally:
            listener.socket.close()

    async def _serve(self, agent_side: trio.SocketStream) -> None:
        try:
            hub_side = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            # The hub is down: pass that on as a reset.
            _close_now(agent_side, reset=True)
            return
        link = _Link(self, agent_side, hub_side)
        self._links.add(link)
        try:
            await link.run()
        finally:
            self._links.discard(link)


@asynccontextmanager
async def open_fault_proxy(
    target_port: int, *, target_host: str = "127.0.0.1"
) -> AsyncIterator[FaultProxy]:
    """Run a :class:`FaultProxy` on 127.0.0.1 (a free port) forwarding to ``target_port``.

    Leaving the block resets every connection and stops the proxy; nothing in it
    blocks, so the cleanup is immediate.
    """
    proxy = FaultProxy(target_port, target_host)
    async with trio.open_nursery() as nursery:
        proxy._nursery = nursery
        # A reserved port: while the proxy is unlistened nobody else is handed it.
        proxy.port = free_port()
        proxy._listener = proxy._listen(proxy.port)
        nursery.start_soon(proxy._acceptor, proxy._listener)
        try:
            yield proxy
        finally:
            proxy.reset_all()
            nursery.cancel_scope.cancel()
