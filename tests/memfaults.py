"""The fault proxy's switches over in-memory streams, for ``autojump_clock`` tests.

:class:`MemoryFaultProxy` sits between agents and a :class:`~artcafe_trio.testing.TestHub`
the way :class:`tests.faults.FaultProxy` sits between agents and a hub's TCP port, with
the same switches and counters, but nothing touches a socket and nothing waits on the
real clock::

    async with open_test_hub() as hub:
        proxy = MemoryFaultProxy(hub)
        async with hub.open_agent("a", dial=proxy.dial) as agent:
            proxy.blackhole()            # half-open: connections up, every byte dropped
            proxy.reset_all()            # both ends of every connection: "connection reset"
            proxy.refuse()               # new connections: accepted, then reset at once
            proxy.refuse(mode="unlisten")  # new connections: ECONNREFUSED
            proxy.refuse(False)

Each direction of a connection is a pipe that holds at most ``capacity`` bytes (a socket
buffer): a peer that stops reading back-pressures the sender, as over TCP. Bytes take
no time to cross, so under ``autojump_clock`` every delay a test measures is the
library's own (a timeout, a backoff), exactly. Every dial attempt and every end closed
is stamped with ``trio.current_time()`` (``attempts``, ``links``).

Directions are named from the agent's point of view, as in :mod:`tests.faults`:
``to_hub`` carries what agents send, ``to_agents`` what the hub sends. Switches are
proxy-wide and read for every write, so they apply to current and new connections.
A blackholed direction swallows bytes and end-of-stream alike (a half-open path).
"""

from __future__ import annotations

import errno

import attrs
import trio
import trio_websocket
from trio_websocket import WebSocketConnection

from artcafe_trio import ConnectionLost
from artcafe_trio.testing import TestHub

from .faults import DIRECTIONS, Direction, LinkStats, RefuseMode, _chosen

__all__ = ["MemoryFaultProxy", "MemoryLink"]

CAPACITY = 64 * 1024
MAX_MESSAGE = 64 * 1024 * 1024


class _Pipe:
    """One direction: up to ``capacity`` bytes in flight; then the writer waits."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        self.eof = False  # the writer closed: the reader gets b"" once drained
        self.broken = False  # reset, or the reader is gone: writes fail, reads fail
        self._lot = trio.lowlevel.ParkingLot()

    def wake(self) -> None:
        self._lot.unpark_all()

    def break_(self) -> None:
        self.broken = True
        self.buffer.clear()
        self.wake()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(bytes(data))
        while True:
            if self.broken:
                raise trio.BrokenResourceError("connection reset by peer")
            if not view:
                break
            room = self.capacity - len(self.buffer)
            if room > 0:
                self.buffer += view[:room]
                view = view[room:]
                self.wake()
            else:
                await self._lot.park()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def read(self, max_bytes: int | None) -> bytes:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.buffer and not self.eof and not self.broken:
            await self._lot.park()
        if self.broken:
            raise trio.BrokenResourceError("connection reset by peer")
        size = len(self.buffer) if max_bytes is None else min(max_bytes, len(self.buffer))
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        self.wake()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data


class _End(trio.abc.Stream):
    """One end of a :class:`MemoryLink` (the agent's or the hub's)."""

    def __init__(self, link: MemoryLink, out: Direction, incoming: _Pipe, outgoing: _Pipe) -> None:
        self.link = link
        self.out = out
        self.incoming = incoming
        self.outgoing = outgoing
        self.closed_at: float | None = None
        self.handshake: trio.CancelScope | None = None
        """While set, end of stream or a reset cancels it (as the agent's own dialer does:
        trio-websocket would wait forever for an upgrade the peer abandoned)."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed_at is not None:
            raise trio.ClosedResourceError("this end is closed")
        proxy = self.link.proxy
        if proxy.blackholed[self.out]:
            proxy.stats.dropped[self.out] += len(data)
            await trio.lowlevel.checkpoint()
            return
        try:
            await self.outgoing.write(data)
        except trio.BrokenResourceError:
            self._hung_up()
            raise
        proxy.stats.forwarded[self.out] += len(data)

    def _hung_up(self) -> None:
        if self.handshake is not None:
            self.handshake.cancel()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.closed_at is not None:
            raise trio.ClosedResourceError("this end is closed")
        try:
            data = await self.incoming.read(max_bytes)
        except trio.BrokenResourceError:
            self._hung_up()
            raise
        if not data:
            self._hung_up()
        return data

    async def aclose(self) -> None:
        self._hung_up()
        if self.closed_at is None:
            self.closed_at = trio.current_time()
            if not self.link.proxy.blackholed[self.out]:
                self.outgoing.eof = True  # a FIN; on a blackholed path it never arrives
                self.outgoing.wake()
            self.incoming.break_()  # what the peer sends from now on meets a reset
            self.link.ended()
        await trio.lowlevel.checkpoint()


class MemoryLink:
    """One connection through the proxy: ``agent`` end ↔ ``hub`` end."""

    def __init__(self, proxy: MemoryFaultProxy, resource: str, capacity: int) -> None:
        self.proxy = proxy
        self.resource = resource
        self.opened_at = trio.current_time()
        self.reset_at: float | None = None
        to_hub, to_agents = _Pipe(capacity), _Pipe(capacity)
        self.agent = _End(self, "to_hub", incoming=to_agents, outgoing=to_hub)
        self.hub = _End(self, "to_agents", incoming=to_hub, outgoing=to_agents)

    @property
    def open(self) -> bool:
        return self.agent.closed_at is None or self.hub.closed_at is None

    def reset(self) -> None:
        """Both ends: every pending and later read or write fails (an RST)."""
        if self.reset_at is None:
            self.reset_at = trio.current_time()
        self.agent.incoming.break_()
        self.hub.incoming.break_()
        self.proxy._active.discard(self)  # gone, whenever its ends notice

    def ended(self) -> None:
        if not self.open:
            self.proxy._active.discard(self)


@attrs.define(eq=False)
class MemoryFaultProxy:
    """In-memory connections from agents to ``test_hub``, with fault switches.

    Give agents ``dial=proxy.dial``. Switches and counters as :class:`tests.faults.FaultProxy`
    (no latency: bytes cross in no time); ``attempts`` holds the time of every dial,
    ``links`` every connection made (with its ends' close times).
    """

    test_hub: TestHub
    capacity: int = CAPACITY
    blackholed: dict[Direction, bool] = attrs.field(
        factory=lambda: dict.fromkeys(DIRECTIONS, False)
    )
    refusing: bool = False
    refuse_mode: RefuseMode = "close"
    accepted: int = 0
    refused: int = 0
    resets: int = 0
    stats: LinkStats = attrs.field(factory=LinkStats)
    attempts: list[float] = attrs.field(factory=list)
    links: list[MemoryLink] = attrs.field(factory=list)
    _active: set[MemoryLink] = attrs.field(factory=set)

    @property
    def active(self) -> int:
        return len(self._active)

    def blackhole(self, on: bool = True, *, to_hub: bool = True, to_agents: bool = True) -> None:
        """Drop every byte written in the chosen direction(s); connections stay up."""
        for direction, chosen in _chosen(to_hub=to_hub, to_agents=to_agents):
            if chosen:
                self.blackholed[direction] = on

    def reset_all(self) -> int:
        """Reset both ends of every current connection; returns how many were reset."""
        links = list(self._active)
        for link in links:
            link.reset()
        self.resets += len(links)
        return len(links)

    def refuse(self, on: bool = True, *, mode: RefuseMode = "close") -> None:
        """Refuse new connections: ``"close"`` accepts and resets at once (the handshake
        fails), ``"unlisten"`` fails the connect itself (ECONNREFUSED)."""
        if mode not in ("close", "unlisten"):
            raise ValueError(f"unknown refuse mode {mode!r}")
        self.refusing = on
        self.refuse_mode = mode

    async def connect(
        self, resource: str = "", remote: str = "memory", *, serve: bool = True
    ) -> trio.abc.Stream:
        """A new connection's agent end; the hub serves the other end (unless not ``serve``:
        then the caller plays the hub, on ``links[-1].hub``)."""
        self.attempts.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if self.refusing and self.refuse_mode == "unlisten":
            self.refused += 1
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        link = MemoryLink(self, resource, self.capacity)
        self.links.append(link)
        self._active.add(link)
        if self.refusing:
            self.refused += 1
            link.reset()
        else:
            self.accepted += 1
            if serve:
                self.test_hub.hub.serve_stream(link.hub, remote)
        return link.agent

    async def dial(self, nursery: trio.Nursery, resource: str) -> WebSocketConnection:
        """The agents' dialer (``open_agent(dial=proxy.dial)``), like ``TestHub.dial``."""
        stream = await self.connect(resource)
        assert isinstance(stream, _End)
        try:
            with trio.CancelScope() as stream.handshake:
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,  # type: ignore[arg-type]
                    "memory",
                    resource,
                    max_message_size=MAX_MESSAGE,
                )
                stream.handshake = None
                return ws
        except BaseException:
            await trio.aclose_forcefully(stream)  # e.g. cancelled by connect_timeout
            raise
        stream.handshake = None
        await stream.aclose()
        raise ConnectionLost("the hub hung up during the WebSocket handshake")

    def links_of(self, agent_id: str) -> list[MemoryLink]:
        """Every connection an agent made, oldest first."""
        return [link for link in self.links if f"/agent/{agent_id}?" in link.resource]
