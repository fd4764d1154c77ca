"""The router: per-tenant subject index, publish and fan-out, request/reply grants.

A publish is delivered once per connection however many of its patterns match, as
one frame encoded once for every receiver; a long fan-out yields every
``FANOUT_BATCH`` deliveries (shielded: once begun it completes). Accepted publishes
also go to the :class:`Backplane` (other hubs' agents); routes from other hubs arrive
in :meth:`Router.route_arrived`.
"""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Callable, Sequence

import trio

from .._errors import ProtocolError
from ..protocol._frames import (
    PresenceEvent,
    Publish,
    Published,
    Subscribe,
    Subscribed,
    encode_message,
)
from ..protocol._subjects import SubjectIndex
from ._backplane import Backplane, LocalBackplane, PresenceUpdate, Route
from ._config import HubConfig, HubStats
from ._flow import Delivery, write_deferred
from ._replies import ReplyTable, requester_id
from ._sessions import Session, SessionDirectory
from ._stores import DedupeStore
from ._wsserver import frame_text

__all__ = ["FANOUT_BATCH", "HUB_SENDER", "PRESENCE_PREFIX", "REPLY_PREFIX", "Router"]

PRESENCE_PREFIX = "$presence"
REPLY_PREFIX = "$reply"
HUB_SENDER = "$hub"
FANOUT_BATCH = 256  # deliveries between two checkpoints of one publish's fan-out


class Router:
    """Subscriptions and deliveries of every tenant."""

    def __init__(
        self,
        config: HubConfig,
        stats: HubStats,
        directory: SessionDirectory,
        backplane: Backplane,
        wall_clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._stats = stats
        self._directory = directory
        self._backplane = backplane
        # Any other backplane's publish_route may wait (a cluster's round trip to NATS).
        self._backplane_waits = type(backplane) is not LocalBackplane
        self._wall_clock = wall_clock
        self._indexes: dict[str, SubjectIndex[Session]] = {}
        self._interest: collections.Counter[tuple[str, str]] = collections.Counter()
        self._message_ids = itertools.count(1)
        self.replies = ReplyTable(config.max_open_requests, config.max_reply_grants, directory.find)
        self.dedupe = DedupeStore(config.dedupe_window, config.dedupe_max_ids)

    # --- subscriptions ----------------------------------------------------------

    def subscribe(self, session: Session, frame: Subscribe) -> None:
        pattern = frame.subject
        if pattern not in session.subscriptions:
            session.subscriptions.add(pattern)
            if not session.is_admin:
                index = self._indexes.get(session.tenant_id)
                if index is None:
                    index = self._indexes[session.tenant_id] = SubjectIndex()
                if index.add(pattern, session):
                    self._interest_changed(session.tenant_id, pattern, +1)
        session.send_frame(Subscribed(id=frame.id, subject=pattern))

    def unsubscribe(self, session: Session, pattern: str) -> None:
        if pattern in session.subscriptions:
            session.subscriptions.discard(pattern)
            index = self._indexes.get(session.tenant_id)
            if index is not None and index.remove(pattern, session):
                self._interest_changed(session.tenant_id, pattern, -1)

    def forget_session(self, session: Session) -> None:
        """A session ended: its subscriptions and open requests go."""
        self.replies.forget_session(session)
        if session.is_admin:
            return
        index = self._indexes.get(session.tenant_id)
        if index is not None:
            for pattern in session.subscriptions:
                if index.remove(pattern, session):
                    self._interest_changed(session.tenant_id, pattern, -1)
            if not len(index):
                del self._indexes[session.tenant_id]

    def _interest_changed(self, tenant_id: str, pattern: str, delta: int) -> None:
        key = (tenant_id, pattern)
        count = self._interest[key] + delta
        if count > 0:
            self._interest[key] = count
            if count == 1 and delta > 0:
                self._backplane.interest(tenant_id, pattern, True)
        else:
            del self._interest[key]
            self._backplane.interest(tenant_id, pattern, False)

    # --- publishing -----------------------------------------------------------------

    async def publish(self, session: Session, frame: Publish) -> None:
        subject = frame.subject
        is_reply = subject.startswith(f"{REPLY_PREFIX}.")
        reply_to = frame.reply_to
        now = trio.current_time()
        dedupe = None
        if frame.id is not None:
            dedupe = self.dedupe.cache(session.tenant_id, session.agent_id)
            seen = dedupe.lookup(frame.id, now)
            if seen is not None:
                session.send_frame(Published(id=frame.id, message_id=seen, duplicate=True))
                return
        if is_reply and not self.replies.may_answer(subject, session.agent_id):
            raise ProtocolError(
                "reply_not_expected",
                "no request waiting for an answer on this subject was delivered to you"
                " (or it was answered already, or its reply_from names other agents)",
                frame_id=frame.id,
            )
        # The connection's rate limit, then its data encoded once (after the hub-wide
        # checks: a duplicate or an unexpected answer costs no token).
        data_json = session.admit_publish(frame)
        route = Route(
            session.tenant_id, subject, data_json, session.agent_id,
            self._next_message_id(), self._wall_clock(), reply_to, frame.id,
            None if frame.reply_from is None else tuple(frame.reply_from),
        )  # fmt: skip
        if self._backplane_waits:
            write_deferred()  # what the reader's burst queued does not wait with it
        earlier = await self._backplane.publish_route(route)
        if earlier is not None:  # routed already, through another hub (a re-send)
            if dedupe is not None and frame.id is not None:
                dedupe.remember(frame.id, earlier, now)
                session.send_frame(Published(id=frame.id, message_id=earlier, duplicate=True))
            return
        if dedupe is not None and frame.id is not None:
            dedupe.remember(frame.id, route.message_id, now)
            session.send_frame(Published(id=frame.id, message_id=route.message_id))
        self._stats.messages_routed += 1
        item = self._frame(route)
        if is_reply:
            self._answer(subject, session.tenant_id, item)
            return
        targets = self.targets(session.tenant_id, subject)
        if reply_to is not None and reply_to.startswith(f"{REPLY_PREFIX}."):
            self.replies.expect(
                session, reply_to, (target.agent_id for target in targets), frame.reply_from
            )
        await self._fan_out(targets, item)

    async def _fan_out(self, targets: Sequence[Session], item: Delivery) -> None:
        """``item`` to every target; a long fan-out lets other connections run every
        :data:`FANOUT_BATCH` deliveries, and once begun it always completes."""
        stats = self._stats
        for count, target in enumerate(targets, 1):
            stats.deliveries += 1
            target.deliver(item)
            if count % FANOUT_BATCH == 0:
                write_deferred()  # the deliveries so far go out before others run
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def route_arrived(self, route: Route) -> None:
        """A route published on another hub: deliver it to this hub's agents."""
        item = self._frame(route)
        if route.subject.startswith(f"{REPLY_PREFIX}."):
            # An answer accepted there to a request made here: the first answer only,
            # from an agent its reply_from allows.
            if self.replies.accepts(route.subject, route.sender):
                self._answer(route.subject, route.tenant_id, item)
            return
        targets = self.targets(route.tenant_id, route.subject)
        reply_to = route.reply_to
        if reply_to is not None and reply_to.startswith(f"{REPLY_PREFIX}."):
            self.replies.expect_remote(
                reply_to, (target.agent_id for target in targets), route.reply_from
            )
        await self._fan_out(targets, item)

    def fan_out_presence(self, update: PresenceUpdate) -> None:
        """Presence listener: the ``$presence.<agent>`` event to the tenant's subscribers,
        and the same frame to the admins watching ``$presence.>``."""
        event = PresenceEvent(
            tenant_id=update.tenant_id,
            agent_id=update.agent_id,
            status=update.status,
            reason=update.reason,
            time=update.time,
            session_id=update.session_id,
            capabilities=update.capabilities,
            metadata=update.metadata,
        )
        subject = f"{PRESENCE_PREFIX}.{update.agent_id}"
        item = self.delivery(subject, json.dumps(event.to_data()), HUB_SENDER)
        targets = self.targets(update.tenant_id, subject)
        self._stats.deliveries += len(targets)
        for target in targets:  # bounded by the tenant's connections
            target.deliver(item)
        self._directory.copy_to_admins(f"{PRESENCE_PREFIX}.>", item)

    def delivery(self, subject: str, data_json: str, sender: str) -> Delivery:
        """A hub-made ``message`` frame (a new message id, the hub's time now)."""
        return self._frame(
            Route("", subject, data_json, sender, self._next_message_id(), self._wall_clock())
        )

    def targets(self, tenant_id: str, subject: str) -> list[Session]:
        """The tenant's connections with a pattern matching ``subject``, each once."""
        index = self._indexes.get(tenant_id)
        if index is None:
            return []
        return list({session: None for _pattern, session in index.match(subject)})

    def tenants(self) -> int:
        """How many tenants have a subscription (the indexes held)."""
        return len(self._indexes)

    def _next_message_id(self) -> str:
        return f"{self._config.hub_id}-{next(self._message_ids)}"

    @staticmethod
    def _frame(route: Route) -> Delivery:
        """One ``message`` frame, encoded and framed once for every receiver."""
        text = encode_message(
            subject=route.subject,
            subscription=None,
            data_json=route.data_json,
            sender=route.sender,
            message_id=route.message_id,
            time=route.time,
            reply_to=route.reply_to,
        )
        return Delivery(frame_text(text))

    def _answer(self, reply_subject: str, tenant_id: str, item: Delivery) -> None:
        """Deliver the one accepted answer to its requester and close the request."""
        self.replies.forget(reply_subject)
        target = self._directory.find(requester_id(reply_subject))
        if target is not None and target.tenant_id == tenant_id:
            self._stats.deliveries += 1
            target.deliver(item)
