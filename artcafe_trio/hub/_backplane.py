"""The seam between one hub and the others: the :class:`Backplane` interface.

Everything a cluster of hubs would share goes through it, and only that:

- **routes** — a publish leaves through :meth:`Backplane.publish_route` once it has
  been accepted here, and a route published on another hub arrives through
  :meth:`BackplanePeer.route_arrived`; :meth:`Backplane.interest` tells which
  patterns this hub's agents subscribe to (the first and the last subscriber);
- **presence** — each local transition is announced with
  :meth:`Backplane.announce_presence`; another hub's transitions are observed through
  :meth:`BackplanePeer.presence_observed`;
- **sessions** — an agent's new session claims it with :meth:`Backplane.claim_session`;
  a claim won on another hub arrives through :meth:`BackplanePeer.session_claimed`
  (the local session is closed as replaced, with no presence change);
- **draining** — a graceful stop calls :meth:`Backplane.begin_drain` before it
  closes the hub's sessions: the agents are told to reconnect elsewhere, and their
  offline transitions that follow may be held back (the other hubs see them come
  back, or mark them offline after the grace).
- **health** — :meth:`Backplane.degraded` says whether (and why) this hub's view of
  the others is degraded (a cluster hub that lost its lease: ``fenced``).

The hub's components call the backplane; the backplane calls the hub back only
through the :class:`BackplanePeer` given to :meth:`Backplane.run`. The methods that
would need a network round trip are ``async`` (publishing may wait for flow control
or a flush, claiming waits for a compare-and-set); the others must not block: an
implementation queues (bounded) and writes from its own task, started by ``run``.

:class:`LocalBackplane` is the single-process implementation: there is no other hub,
so every method does nothing (and never yields to the scheduler, so the hub's
behaviour is exactly that of a hub without a backplane).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

__all__ = [
    "Backplane",
    "BackplanePeer",
    "LocalBackplane",
    "PresenceUpdate",
    "Route",
    "SessionClaim",
]


@attrs.frozen
class Route:
    """One accepted publish, as another hub needs it to deliver it to its own agents.

    ``data_json`` is the payload already encoded (compact JSON); ``time`` the origin
    hub's wall clock when it framed the message. A ``reply_to`` under ``$reply.``
    names the requester's session: answers to it are routed back the same way.
    ``publish_id`` is the publisher's frame id (kept by a re-send through another hub
    after a failover: the cluster-wide de-duplication key, with tenant and sender).
    ``reply_from``: a request's allowed responders (every hub holds answers to it).
    """

    tenant_id: str
    subject: str
    data_json: str
    sender: str
    message_id: str
    time: float
    reply_to: str | None = None
    publish_id: str | None = None
    reply_from: tuple[str, ...] | None = None


@attrs.frozen
class SessionClaim:
    """A session becoming the live one of its agent (``replaced``: the local session it
    took over, if any)."""

    tenant_id: str
    agent_id: str
    session_id: str
    hub_id: str
    replaced: str | None = None


@attrs.frozen(eq=False)
class PresenceUpdate:
    """One presence transition, as every listener sees it.

    ``local`` is true when it happened on this hub (it is then persisted and announced
    to the backplane); an update observed from another hub is only applied and shown.
    ``reaped_by`` names the hub that reaped the lost owner (reason ``hub_lost``): that
    hub reports the transition (alert webhooks), as the owner would have.
    """

    tenant_id: str
    agent_id: str
    status: str
    reason: str
    time: float
    session_id: str | None
    hub_id: str
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, Any] = attrs.field(factory=dict)
    last_seen: float | None = None
    last_heartbeat: float | None = None
    local: bool = True
    reaped_by: str | None = None


class BackplanePeer(Protocol):
    """The hub side of the seam: what a backplane calls when another hub did something.

    Every method but :meth:`route_arrived` is synchronous; none blocks (they only
    queue deliveries and change in-memory state); they are called from the backplane's
    own tasks.
    """

    async def route_arrived(self, route: Route) -> None:
        """A publish accepted on another hub: deliver it to this hub's matching agents
        (a long fan-out checkpoints between batches, as a local publish does)."""

    def session_claimed(self, claim: SessionClaim) -> None:
        """Another hub's session now owns ``claim``'s agent: close the local one, if any,
        as replaced (no presence change: the other hub owns presence now)."""

    def presence_observed(self, update: PresenceUpdate) -> None:
        """Another hub's agent changed presence (``update.local`` is false)."""

    def use_credentials(
        self, load: Callable[[], Awaitable[tuple[object, dict[tuple[str, str], Any]]]]
    ) -> None:
        """Authenticate from ``load`` (``() -> (revision, {(tenant, agent): keys})``,
        polled like the registry) instead of the registry: a cluster's shared keys.
        Sessions whose key it no longer holds are closed (4005)."""

    def describe_session(self, session_id: str) -> tuple[tuple[str, ...], dict[str, Any]] | None:
        """The capabilities and metadata a local session declared, for a claim that
        shows them on every hub; ``None`` when the session is gone."""


class Backplane(Protocol):
    """What a hub shares with other hubs (see the module docstring)."""

    async def run(
        self, peer: BackplanePeer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, then serve ``peer`` until cancelled (``task_status.started()`` once
        remote events may arrive). Started before the hub listens."""

    def interest(self, tenant_id: str, pattern: str, present: bool) -> None:
        """``pattern`` got its first local subscriber in ``tenant_id`` (``present``) or
        lost its last one. Must not block."""

    async def publish_route(self, route: Route) -> str | None:
        """Hand an accepted publish to the other hubs, before it is confirmed to its
        publisher and delivered locally. Returns ``None``, or, when the cluster routed
        this publish already (the same ``publish_id`` through another hub), the message
        id to confirm it with as a duplicate: it is then not delivered again."""

    async def claim_session(self, claim: SessionClaim) -> None:
        """Make ``claim``'s session the agent's owner across hubs (newest wins), before
        its presence goes online."""

    def announce_presence(self, update: PresenceUpdate) -> None:
        """Share a local presence transition (queued, in order per agent). Must not block."""

    def connect_urls(self) -> tuple[str, ...]:
        """The other live hubs' agent URLs, advertised in every agent's ``welcome`` so it
        can fail over to them. Cheap and synchronous (called once per connection)."""

    def begin_drain(self) -> None:
        """A graceful stop begins: the hub is about to close every session with 1012
        (reconnect elsewhere), then announce their agents offline (``disconnected``).
        A cluster may keep those agents online under this hub instead, for the other
        hubs to take over or reap after the grace. Must not block."""

    def holds_back(self, update: PresenceUpdate) -> bool:
        """Whether this local transition is held back from the cluster (a draining
        hub's agent that another hub takes over or reaps): then it is not this hub's
        to report (events, alerts). Cheap and synchronous."""

    def degraded(self) -> tuple[str, ...]:
        """Why this hub's view of the other hubs is degraded right now (short reason
        words, e.g. ``fenced``), empty when it is not: shown in the ``presence_state``
        answer and the metrics. Cheap and synchronous."""


class LocalBackplane:
    """A hub alone: nothing to share, so every method does nothing."""

    async def run(
        self, peer: BackplanePeer, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()

    def interest(self, tenant_id: str, pattern: str, present: bool) -> None:
        pass

    async def publish_route(self, route: Route) -> str | None:
        return None  # no checkpoint: the publish continues as if there were no backplane

    async def claim_session(self, claim: SessionClaim) -> None:
        pass

    def announce_presence(self, update: PresenceUpdate) -> None:
        pass

    def connect_urls(self) -> tuple[str, ...]:
        return ()

    def begin_drain(self) -> None:
        pass

    def holds_back(self, update: PresenceUpdate) -> bool:
        return False

    def degraded(self) -> tuple[str, ...]:
        return ()
