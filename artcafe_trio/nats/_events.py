"""Connection events of the NATS client and their fan-out to ``events()`` channels."""

from __future__ import annotations

import logging

import attrs
import trio

__all__ = [
    "AsyncServerError",
    "Disconnected",
    "LameDuckMode",
    "NatsEvent",
    "Reconnected",
    "ServersDiscovered",
    "SlowConsumer",
]

log = logging.getLogger("artcafe_trio.nats")


@attrs.frozen
class Disconnected:
    """The connection to ``server`` was lost; ``cause`` says why."""

    server: str
    cause: str


@attrs.frozen
class Reconnected:
    """A new connection to ``server`` is up; subscriptions have been re-sent."""

    server: str


@attrs.frozen
class LameDuckMode:
    """``server`` announced it is shutting down soon (clients should move away)."""

    server: str


@attrs.frozen
class ServersDiscovered:
    """``INFO connect_urls`` added these servers to the pool."""

    servers: tuple[str, ...]


@attrs.frozen
class AsyncServerError:
    """The server sent a non-fatal ``-ERR`` (e.g. a permissions violation)."""

    server: str
    message: str


@attrs.frozen
class SlowConsumer:
    """A subscription's pending limit was hit; ``dropped`` counts its drops so far."""

    subject: str
    sid: int
    dropped: int


NatsEvent = (
    Disconnected | Reconnected | LameDuckMode | ServersDiscovered | AsyncServerError | SlowConsumer
)


class _EventFanout:
    """The ``events()`` channels: each event goes to every open one, never blocking."""

    def __init__(self) -> None:
        self._channels: list[trio.MemorySendChannel[NatsEvent]] = []
        #: Events dropped because a channel was full.
        self.dropped = 0

    def open(self, max_buffer: int) -> trio.MemoryReceiveChannel[NatsEvent]:
        send, receive = trio.open_memory_channel[NatsEvent](max_buffer)
        self._channels.append(send)
        return receive

    def emit(self, event: NatsEvent) -> None:
        log.debug("nats event %r", event)
        for channel in list(self._channels):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._channels.remove(channel)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
