"""The outbox: every publish ``publish()`` accepted and the hub has not confirmed yet,
and the requests waiting for their first reply.

One class owns the publish bookkeeping, so its parts cannot drift apart: ``_entries``
(every accepted, unconfirmed publish, in acceptance order: the hub's confirmation or
refusal removes it), ``_queue`` (the entries still to write on the current connection,
in the same order: a new connection re-queues every entry, and the hub de-duplicates
by id) and ``_slots`` (``max_pending_publishes``: ``publish()`` waits for a slot).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from typing import Any

import trio

from .._errors import AgentClosed, ArtcafeError, HubError, LocalProtocolError
from .._logsafe import printable
from ..protocol._frames import DEFAULT_MAX_FRAME_BYTES, Message, Publish, encode
from ..protocol.client import IdAllocator

__all__ = ["Outbox", "Pending", "Reply"]

log = logging.getLogger("artcafe_trio.agent")

_PLACEHOLDER_SESSION = "s-" + "0" * 16
"""Stands for the session id in a request's ``reply_to`` when its size is checked."""


class Pending:
    """A publish accepted by ``publish()`` and not yet acknowledged by the hub."""

    __slots__ = (
        "acked", "data", "error", "id", "message_id", "reply_from", "reply_to", "reply_token",
        "sent", "subject", "text", "transmitted",
    )  # fmt: skip

    def __init__(
        self,
        frame_id: str,
        subject: str,
        data: Any,
        *,
        reply_to: str | None = None,
        reply_token: str | None = None,
        reply_from: tuple[str, ...] | None = None,
    ) -> None:
        self.id = frame_id
        self.subject = subject
        self.data = data
        self.reply_to = reply_to
        self.reply_token = reply_token
        self.reply_from = reply_from  # a request's only allowed responders
        self.text: str | None = None  # the encoded frame (not for requests: per session)
        self.transmitted = False  # written to a connection at least once
        self.sent = trio.Event()
        self.acked = trio.Event()
        self.message_id: str | None = None
        self.error: ArtcafeError | None = None


class Reply:
    """A request waiting for its first reply."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.message: Message | None = None
        self.session: object | None = None  # where the request was written
        self.error: ArtcafeError | None = None

    def fail(self, error: ArtcafeError) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    def deliver(self, message: Message) -> None:
        if self.message is None:
            self.message = message
            self.event.set()


class Outbox:
    """Accepted publishes until the hub confirms them; requests until their reply."""

    def __init__(self, ids: IdAllocator, max_pending: int) -> None:
        self.ids = ids
        self.closed = False  # no more publishing
        self.replies: dict[str, Reply] = {}
        self._entries: dict[str, Pending] = {}
        self._queue: collections.deque[Pending] = collections.deque()
        self._slots = trio.Semaphore(max_pending)
        self._changed = trio.Event()
        self._flushed = trio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    async def enqueue(
        self,
        subject: str,
        data: Any,
        *,
        reply_to: str | None,
        reply_token: str | None,
        max_frame_bytes: int | None,
        reply_from: tuple[str, ...] | None = None,
    ) -> Pending:
        if self.closed:
            raise AgentClosed("the agent is stopped; publish refused")
        pending = Pending(
            self.ids.next(), subject, data, reply_to=reply_to, reply_token=reply_token,
            reply_from=reply_from,
        )  # fmt: skip
        # Encode now: a value JSON cannot encode, or a frame the hub would refuse as too
        # large, fails here, in the caller, instead of after it was accepted.
        if reply_token is not None:
            reply_to = f"$reply.{_PLACEHOLDER_SESSION}.{reply_token}"
        text = encode(
            Publish(
                subject=subject, data=data, id=pending.id, reply_to=reply_to,
                reply_from=reply_from,
            )
        )  # fmt: skip
        limit = max_frame_bytes or DEFAULT_MAX_FRAME_BYTES
        if len(text.encode("utf-8")) > limit:
            raise LocalProtocolError("frame_too_large", f"publish frame exceeds {limit} bytes")
        if reply_token is None:
            pending.text = text
        await self._slots.acquire()
        if self.closed:
            self._slots.release()
            raise AgentClosed("the agent is stopped; publish refused")
        self._entries[pending.id] = pending
        self._queue.append(pending)
        self._changed.set()
        return pending

    async def wait_sent(self, pending: Pending) -> None:
        """Until ``pending`` is on the wire; cancelled before that, it is withdrawn."""
        try:
            await pending.sent.wait()
            if not pending.transmitted and pending.error is not None:
                raise pending.error
        except BaseException:
            if not pending.sent.is_set() and self._entries.pop(pending.id, None) is not None:
                # Withdrawn before it reached the hub: not accepted, nothing lost.
                with contextlib.suppress(ValueError):
                    self._queue.remove(pending)
                self._slots.release()
            raise

    def restart(self) -> None:
        """A new connection: every unconfirmed publish is to be written again, in order."""
        self._queue = collections.deque(self._entries.values())
        self._changed.set()

    def has_unsent(self) -> bool:
        return bool(self._queue)

    def next_unsent(self) -> Pending | None:
        while self._queue:
            pending = self._queue.popleft()
            if pending.id in self._entries:
                return pending
        return None

    def mark_sent(self, pending: Pending, session: object) -> None:
        pending.transmitted = True
        if pending.reply_token is not None and pending.reply_token in self.replies:
            self.replies[pending.reply_token].session = session
        pending.sent.set()

    async def wait_changed(self) -> None:
        """Until a publish is queued (call after taking every queued one)."""
        self._changed = trio.Event()
        if not self._queue:
            await self._changed.wait()

    async def wait_flushed(self) -> None:
        """Until the hub confirmed (or refused) every accepted publish."""
        while self._entries:
            self._flushed = trio.Event()
            await self._flushed.wait()

    def acknowledge(
        self, frame_id: str, message_id: str | None, error: ArtcafeError | None
    ) -> bool:
        """The hub confirmed (or refused, ``error``) publish ``frame_id``."""
        pending = self._entries.pop(frame_id, None)
        if pending is None:
            return False
        pending.message_id = message_id
        pending.error = error
        pending.sent.set()
        pending.acked.set()
        self._slots.release()
        if not self._entries:
            self._flushed.set()
        if isinstance(error, HubError):
            log.error(
                "publish to %s refused by the hub: %s", printable(pending.subject), printable(error)
            )
        return True

    def fail_all(self) -> None:
        """The agent stopped: fail every unconfirmed publish and waiting request."""
        for frame_id in list(self._entries):
            self.acknowledge(frame_id, None, AgentClosed("the agent stopped first"))
        for reply in self.replies.values():
            reply.fail(AgentClosed("the agent stopped before the reply came"))

    def fail_replies_sent_on(self, session: object, error: ArtcafeError) -> None:
        for reply in self.replies.values():
            if reply.session is session:
                reply.fail(error)
