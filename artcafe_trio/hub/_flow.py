"""Flow control for the hub: outboxes, the output budget, rate buckets, pre-auth slots.

Each piece is small and owns one rule:

- :class:`Delivery` is one encoded message, shared by every receiver's queue.
- :class:`OutputBudget` bounds the memory of everything queued for output, hub-wide:
  deliveries (a message queued for many receivers is counted once), answers, and the
  batches being written. Over the budget, the consumer holding the most is cut off first.
- :class:`Outbox` is one connection's queue. Deliveries (messages from others) are
  bounded in frames and bytes: a consumer that does not read them is cut off.
  Answers to the connection's own frames never count against its delivery bounds;
  instead the hub stops reading the connection while ``reply_window`` answers, or
  ``reply_window_bytes`` of them, are unsent (back-pressure). A write that makes no
  progress for ``write_stall_timeout`` cuts the connection off.
- :class:`TokenBucket` is a publish rate limit, kept per agent across reconnects.
- :class:`PreAuthLimiter` bounds connections that have not authenticated yet, per
  address and in total; the oldest (of the address, or of the address holding the
  most) is closed to make room for a new one.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import trio

__all__ = [
    "Delivery",
    "Outbox",
    "OutputBudget",
    "PreAuthLimiter",
    "PreAuthTicket",
    "TokenBucket",
    "deferring_writes",
    "write_deferred",
]

log = logging.getLogger("artcafe_trio.hub")


#: In a connection's reader task: the outboxes whose writes that never wait it defers
#: until it is about to wait for its peer, so that a burst of frames it works through
#: is written to each receiver in one write (the writes of any other task are at once).
#: A reader writes its list before every await that can block (its peer, its reply
#: window, a backplane that waits, a fan-out's checkpoint), so an outbox is in one
#: task's list only while no other task runs: ``Outbox.deferred`` needs no owner. The
#: list is the owning task's only: a task started from within a reader inherits the
#: variable (trio copies the context) but not the deferral, which :func:`_deferring`
#: checks, so its writes never wait for a reader that may be idle.
_DEFERRED: ContextVar[tuple[trio.lowlevel.Task, list[Outbox]] | None] = ContextVar(
    "artcafe_deferred_writes", default=None
)


@contextmanager
def deferring_writes() -> Iterator[list[Outbox]]:
    """Within, this task defers its writes that never wait until it calls
    :func:`write_deferred` with the list given; on leaving, it writes what is left."""
    deferred: list[Outbox] = []
    token = _DEFERRED.set((trio.lowlevel.current_task(), deferred))
    try:
        yield deferred
    finally:
        _DEFERRED.reset(token)
        write_deferred(deferred)


def _deferring() -> list[Outbox] | None:
    """The current task's deferred writes, if it defers them (a reader)."""
    owned = _DEFERRED.get()
    if owned is None or owned[0] is not trio.lowlevel.current_task():
        return None
    return owned[1]


def write_deferred(deferred: list[Outbox] | None = None) -> None:
    """Write what this task deferred (see :func:`deferring_writes`; by default, whatever the
    current task defers): before it waits, so that nothing it queued waits with it."""
    if deferred is None:
        deferred = _deferring()
    if not deferred:
        return
    outboxes = deferred[:]
    deferred.clear()
    for outbox in outboxes:
        outbox.deferred = False
        if outbox._queue:
            outbox._wake(now=True)


class Delivery:
    """One ``message`` frame, encoded and framed once, shared by every queue holding it."""

    __slots__ = ("frame", "refs", "size")

    def __init__(self, frame: bytes) -> None:
        self.frame = frame  # the WebSocket frame's bytes (the same for every receiver)
        self.size = sys.getsizeof(frame)  # what holding it costs, in bytes
        self.refs = 0  # how many outboxes hold it


class OutputBudget:
    """The hub-wide bound on memory held by queued output: deliveries (a message queued
    for many receivers counted once), answers, and each writer's batch in flight."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.cut_offs = 0
        self._consumers: set[Outbox] = set()  # outboxes holding anything

    def make_room(self, size: int) -> bool:
        """Cut off the consumers holding the most until ``size`` more bytes fit; whether
        they do (not when what is left is only in flight, freed once written)."""
        while self.used + size > self.limit and self._consumers:
            victim = max(self._consumers, key=_held_bytes)
            self.cut_offs += 1
            victim.overflow(
                f"slow consumer: hub output budget of {self.limit} bytes exceeded and "
                f"this connection held the most output ({victim.held_bytes} bytes)"
            )
        return self.used + size <= self.limit

    def add(self, size: int) -> None:
        self.used += size
        if self.used > self.peak:
            self.peak = self.used

    def hold(self, item: Delivery) -> bool:
        """Count ``item`` as queued once more; make room first if it is new to the queues.
        ``False``: no room could be made (the item is not held)."""
        if item.refs == 0:
            if self.used + item.size > self.limit and not self.make_room(item.size):
                return False
            self.add(item.size)
        item.refs += 1
        return True

    def release(self, item: Delivery) -> None:
        item.refs -= 1
        if item.refs == 0:
            self.used -= item.size


def _held_bytes(outbox: Outbox) -> int:
    return outbox.held_bytes


def answer_size(text: str) -> int:
    """What holding one answer costs, in bytes."""
    return sys.getsizeof(text)


class Outbox:
    """One connection's frames waiting to be written, in order."""

    def __init__(
        self,
        budget: OutputBudget,
        *,
        max_frames: int,
        max_bytes: int,
        reply_window: int,
        reply_window_bytes: int,
        on_overflow: Callable[[str], None],
    ) -> None:
        self._budget = budget
        self._max_frames = max_frames
        self._max_bytes = max_bytes
        self.reply_window = reply_window
        self.reply_window_bytes = reply_window_bytes
        self._on_overflow = on_overflow
        # str: an answer. A list, not a deque: most connections are idle, and an empty
        # deque holds a 64-slot block (~0.7 KiB); the writer takes the queue in batches.
        self._queue: list[str | Delivery] = []
        self._ready = trio.Event()
        self._replies_drained = trio.Event()
        self._closed = False
        self._discarded = False
        self.queued_frames = 0  # deliveries only, not in flight
        self.queued_bytes = 0  # deliveries only, not in flight
        self.replies = 0  # answers to the connection's own frames, not yet written
        self.reply_bytes = 0  # their size (queued or in flight)
        self.flight_bytes = 0  # deliveries in the batch being written
        self.busy = False  # a batch is being written (by the writer, or by the reader)
        self.hold = False  # the reader writes its answers itself: do not wake the writer
        # Set by a connection whose socket takes writes that never wait: new frames are
        # written at once by whoever queues them (write_now), not by a woken writer.
        self.write_now: Callable[[], None] | None = None
        self._handed_off: list[str | Delivery] | None = None
        self.handed_off = False  # the batch take() returned was begun by write_now
        self.deferred = False  # in a reader task's deferred writes

    @property
    def held_bytes(self) -> int:
        """Everything this connection holds: queued deliveries, unsent answers, and the
        deliveries being written (what choosing whom to cut off goes by)."""
        return self.queued_bytes + self.reply_bytes + self.flight_bytes

    @property
    def reply_window_full(self) -> bool:
        """``reply_window`` answers, or ``reply_window_bytes`` of them, are unsent."""
        return self.replies >= self.reply_window or self.reply_bytes >= self.reply_window_bytes

    def reply(self, text: str) -> None:
        """Queue an answer to one of the connection's own frames. Counted in the output
        budget; over it, the consumers holding the most are cut off (this one too)."""
        if self._discarded:
            return
        size = answer_size(text)
        budget = self._budget
        if budget.used + size > budget.limit and not budget.make_room(size):
            if not self._discarded:
                self.overflow(
                    f"slow consumer: hub output budget of {budget.limit} bytes exhausted"
                    " (only output in flight is left)"
                )
            return
        if self._discarded:  # cut off to make room
            return
        budget.add(size)
        budget._consumers.add(self)
        self._queue.append(text)
        self.replies += 1
        self.reply_bytes += size
        if not self.hold:
            self._wake()

    def deliver(self, item: Delivery) -> bool:
        """Queue a delivery; a consumer over its limits is cut off (returns ``False``)."""
        if self._discarded:
            return False
        queued_bytes = self.queued_bytes
        if self.queued_frames >= self._max_frames:
            self.overflow(f"slow consumer: {self.queued_frames} deliveries waiting")
            return False
        if queued_bytes + item.size > self._max_bytes:
            self.overflow(f"slow consumer: {queued_bytes} bytes of deliveries waiting")
            return False
        if item.refs:  # already queued elsewhere: counted in the budget once
            item.refs += 1
        else:
            held = self._budget.hold(item)  # may cut off the largest consumer, even this one
            if self._discarded:
                if held:
                    self._budget.release(item)
                return False
            if not held:
                self.overflow(
                    f"slow consumer: hub output budget of {self._budget.limit} bytes"
                    " exhausted (only output in flight is left)"
                )
                return False
            queued_bytes = self.queued_bytes
        self._budget._consumers.add(self)
        self._queue.append(item)
        self.queued_frames += 1
        self.queued_bytes = queued_bytes + item.size
        self._wake()
        return True

    def _wake(self, *, now: bool = False) -> None:
        """Something new is queued: written at once where the socket allows it and no
        batch is being written (at the end of its burst, in a reader task that defers
        its writes, unless ``now``), else the writer is woken."""
        write_now = self.write_now
        if write_now is None or self.busy:
            self._ready.set()
            return
        if not now:
            if self.deferred:
                return  # in the list of the reader that runs now (see _DEFERRED)
            deferred = _deferring()
            if deferred is not None:
                self.deferred = True
                deferred.append(self)
                return
        write_now()

    def hand_off(self, batch: list[str | Delivery]) -> None:
        """A write that never waits left part of ``batch`` unsent: the writer finishes
        it (:meth:`take` returns it next, with :attr:`handed_off` set)."""
        self._handed_off = batch
        self._ready.set()

    def overflow(self, reason: str) -> None:
        """Cut this consumer off: drop what it has queued and tell its owner."""
        self.discard()
        self._on_overflow(reason)

    def stalled(self, unsent: int, seconds: float) -> None:
        """A write made no progress for ``seconds``: cut this consumer off."""
        if not self._discarded:
            self.overflow(
                f"slow consumer: a write of {unsent} bytes did not complete in {seconds:g} s"
            )

    def drop_handed_off(self) -> None:
        """The writer ends: account for a batch handed off to it and not taken."""
        batch, self._handed_off = self._handed_off, None
        if batch is not None:
            self.sent(batch)

    async def take(self, max_bytes: int) -> list[str | Delivery]:
        """The next frames to write, in order: answers' texts and deliveries, about
        ``max_bytes`` at most (at least one). Call :meth:`sent` once they are written
        (or not). Empty once the outbox is closed and empty."""
        while self._handed_off is None and (self.busy or not self._queue):
            if not self.busy and (self._closed or self._discarded):
                return []
            self._ready = trio.Event()
            await self._ready.wait()
        batch, self._handed_off = self._handed_off, None
        self.handed_off = batch is not None
        return batch if batch is not None else self._take(max_bytes)

    def take_nowait(self, max_bytes: int) -> list[str | Delivery]:
        """:meth:`take` without waiting: empty if a batch is being written already or
        nothing is queued."""
        if self.busy or not self._queue:
            return []
        return self._take(max_bytes)

    def release(self) -> None:
        """Stop holding answers back: wake the writer if anything is queued."""
        self.hold = False
        if self._queue:
            self._wake(now=True)

    def _take(self, max_bytes: int) -> list[str | Delivery]:
        queue = self._queue
        self.busy = True
        size = taken = flight = 0
        for entry in queue:
            taken += 1
            if isinstance(entry, Delivery):  # in flight: no longer queued, still held
                size += entry.size
                flight += entry.size
                self.queued_frames -= 1
                self.queued_bytes -= entry.size
            else:
                size += len(entry)
            if size >= max_bytes:
                break
        if taken == len(queue):
            batch, self._queue = queue, []
        else:
            batch = queue[:taken]
            del queue[:taken]
        self.flight_bytes += flight
        return batch

    def sent(self, batch: list[str | Delivery]) -> None:
        """Account for frames taken by :meth:`take`, written or not."""
        self.busy = False
        if self._queue or self._closed or self._discarded:
            self._ready.set()  # a writer that waited while the reader wrote
        budget = self._budget
        replies = reply_bytes = flight = 0
        for entry in batch:
            if isinstance(entry, Delivery):
                budget.release(entry)
                flight += entry.size
            else:
                replies += 1
                reply_bytes += answer_size(entry)
        budget.used -= reply_bytes
        if self._discarded:
            return
        self.flight_bytes -= flight
        if replies:
            self.replies -= replies
            self.reply_bytes -= reply_bytes
            if (
                self.replies <= self.reply_window // 2
                and self.reply_bytes <= self.reply_window_bytes // 2
            ):
                self._replies_drained.set()
        if not self.held_bytes:
            budget._consumers.discard(self)

    async def wait_for_reply_window(self) -> None:
        """Back-pressure: return once fewer than ``reply_window`` answers, and fewer than
        ``reply_window_bytes`` of them, are unsent."""
        while self.reply_window_full and not self._discarded:
            self._replies_drained = trio.Event()
            await self._replies_drained.wait()

    def close(self) -> None:
        """No more frames: :meth:`next` returns ``None`` once the queue is empty."""
        self._closed = True
        self._ready.set()

    def discard(self) -> None:
        """Drop every queued frame (the connection is going away) and release its budget
        (a batch in flight is released once :meth:`sent`)."""
        if self._discarded:
            return
        self._discarded = True
        budget = self._budget
        for entry in self._queue:
            if isinstance(entry, Delivery):
                budget.release(entry)
            else:
                budget.used -= answer_size(entry)
        self._queue.clear()
        self.queued_frames = self.queued_bytes = self.replies = self.reply_bytes = 0
        self.flight_bytes = 0
        budget._consumers.discard(self)
        self._ready.set()
        self._replies_drained.set()


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; times from ``trio.current_time``."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = trio.current_time()

    def take(self, now: float | None = None) -> bool:
        """Take one token at ``now`` (default: ``trio.current_time()``); whether there was one."""
        if now is None:
            now = trio.current_time()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def is_full(self, now: float) -> bool:
        """Whether it has refilled completely (forgetting it changes nothing)."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class PreAuthTicket:
    """One connection that has not authenticated yet; ``scope`` ends it if evicted."""

    __slots__ = ("address", "scope")

    def __init__(self, address: str) -> None:
        self.address = address
        self.scope = trio.CancelScope()


class PreAuthLimiter:
    """Bounds unauthenticated connections per address and in total.

    A new connection over a bound closes the oldest unauthenticated one of the same
    address, or, over the total, the oldest of the address holding the most: an
    attacker's idle sockets are the oldest of their address, and an agent's handshake
    (one slot, however slow its round trips) is not what makes room, so it gets
    through even while the bound is reached, and the sockets held never exceed the
    bounds.
    """

    def __init__(self, per_address: int, total: int, *, log_per_second: float = 1.0) -> None:
        self.per_address = per_address
        self.total = total
        self.evicted = 0
        self._all: dict[PreAuthTicket, None] = {}  # insertion order = age
        self._by_address: dict[str, dict[PreAuthTicket, None]] = {}
        self._log_per_second = log_per_second
        self._last_log = -float("inf")
        self._unlogged = 0

    def __len__(self) -> int:
        return len(self._all)

    def count(self, address: str) -> int:
        return len(self._by_address.get(address, ()))

    def admit(self, address: str) -> PreAuthTicket:
        ticket = PreAuthTicket(address)
        same = self._by_address.setdefault(address, {})
        if len(same) >= self.per_address:
            self._evict(next(iter(same)), "per address")
        if len(self._all) >= self.total:
            # The oldest of the address holding the most: churn from many addresses
            # cannot close the slow handshake of an agent that holds one slot.
            most = max(self._by_address.values(), key=len)
            self._evict(next(iter(most)), "in total")
        self._by_address.setdefault(address, same)[ticket] = None
        self._all[ticket] = None
        return ticket

    def release(self, ticket: PreAuthTicket) -> None:
        """The connection authenticated or ended: it no longer holds a slot."""
        if self._all.pop(ticket, 0) is None:
            same = self._by_address[ticket.address]
            del same[ticket]
            if not same:
                del self._by_address[ticket.address]

    def _evict(self, ticket: PreAuthTicket, bound: str) -> None:
        self.release(ticket)
        ticket.scope.cancel()
        self.evicted += 1
        now = trio.current_time()
        if now - self._last_log >= 1.0 / self._log_per_second:
            limit = self.per_address if bound == "per address" else self.total
            log.warning(
                "unauthenticated connections at the limit (%d %s): closed the oldest, from %s"
                " (%d more since the last such line)",
                limit,
                bound,
                ticket.address,
                self._unlogged,
            )
            self._last_log, self._unlogged = now, 0
        else:
            self._unlogged += 1
