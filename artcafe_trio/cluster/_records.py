"""What the cluster keeps per agent and per hub, and the rules that change it (sans-IO).

One key per agent, ``p.<tenant>.<agent>``, holds a :class:`PresenceClaim`: which hub
owns the agent's session and under which ``epoch``. A hub that authenticates the
agent claims it with ``epoch + 1`` by compare-and-set, so of two hubs racing for the
same agent exactly one write lands per epoch and the newest connection wins, as on
one hub. Only the owner at the current epoch may mark the agent offline: an old
owner closing a replaced session changes nothing (no flap).

One key per hub, ``h.<hub>``, holds a :class:`HubLease` written with a short
per-message TTL and refreshed by its hub. When the TTL removes it, one surviving
hub wins ``r.<hub>.<lease revision>`` (create-if-absent) and reaps: every agent the
lost hub still owns online goes offline with reason ``hub_lost``.

Every claim is written with a long per-message TTL (``ClusterConfig.claim_ttl``), a
backstop: its owner rewrites an online claim well before it expires
(:class:`~._refresh.RefreshSchedule`), so only a claim no live hub owns expires, and
every hub that sees its expiry marker reports the agent offline (``hub_lost``,
:func:`expired_claim`). A key's epochs never go back, even across an expiry: a
claim of a key with no claim starts above a revision at least as new as the key's
last (see :func:`next_claim`).

Nothing here imports trio or talks to NATS; :mod:`._store` does.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from ..registry._registry import validate_id

__all__ = [
    "HUB_LOST",
    "HubLease",
    "PresenceClaim",
    "lease_key",
    "next_claim",
    "parse_presence_key",
    "expired_claim",
    "presence_key",
    "reap_claim",
    "refresh_claim",
    "reaper_key",
    "release_claim",
]

#: The reason an agent goes offline when its hub's lease expired.
HUB_LOST = "hub_lost"

PRESENCE_PREFIX = "p."
LEASE_PREFIX = "h."
REAPER_PREFIX = "r."


def presence_key(tenant_id: str, agent_id: str) -> str:
    """The key of one agent's claim (ids as the registry allows them: valid tokens)."""
    tenant, agent = validate_id(tenant_id, "tenant id"), validate_id(agent_id, "agent id")
    return f"{PRESENCE_PREFIX}{tenant}.{agent}"


def parse_presence_key(key: str) -> tuple[str, str] | None:
    """``(tenant_id, agent_id)`` of a presence key, or ``None`` for another key."""
    if not key.startswith(PRESENCE_PREFIX):
        return None
    tenant, _, agent = key[len(PRESENCE_PREFIX) :].partition(".")
    return (tenant, agent) if tenant and agent and "." not in agent else None


def lease_key(hub_id: str) -> str:
    return f"{LEASE_PREFIX}{validate_id(hub_id, 'hub id')}"


def reaper_key(hub_id: str, lease_revision: int) -> str:
    """The key whose creation elects the one hub that reaps ``hub_id``'s lease
    ``lease_revision`` (a hub that comes back gets a new lease, reaped anew)."""
    return f"{REAPER_PREFIX}{validate_id(hub_id, 'hub id')}.{lease_revision}"


def _as_str(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


@attrs.frozen
class PresenceClaim:
    """One agent's presence as the cluster sees it."""

    tenant_id: str
    agent_id: str
    hub: str
    epoch: int
    status: str  # "online" | "offline"
    reason: str
    since: float  # Unix time of the last change
    session_id: str | None = None
    #: What the agent declared at its last authentication (shown by every hub).
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, Any] = attrs.field(factory=dict)
    #: The hub that reaped it (``hub_lost``): the one that reports the transition.
    reaper: str | None = None

    def encode(self) -> bytes:
        obj = attrs.asdict(self)
        obj["capabilities"] = list(self.capabilities)
        if obj["reaper"] is None:
            del obj["reaper"]
        return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> PresenceClaim:
        """Parse a stored claim; raises ``ValueError`` for anything malformed."""
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("a claim is a JSON object")
        epoch, since, session = obj.get("epoch"), obj.get("since"), obj.get("session_id")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise ValueError("epoch must be a positive integer")
        if not isinstance(since, int | float) or isinstance(since, bool):
            raise ValueError("since must be a number")
        if session is not None and not isinstance(session, str):
            raise ValueError("session_id must be a string or null")
        capabilities = obj.get("capabilities", [])
        if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
            raise ValueError("capabilities must be a list of strings")
        metadata = obj.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ValueError("metadata must be an object")
        status = _as_str(obj, "status")
        if status not in ("online", "offline"):
            raise ValueError(f"unknown status {status!r}")
        reaper = obj.get("reaper")
        if reaper is not None and not isinstance(reaper, str):
            raise ValueError("reaper must be a string or null")
        return cls(
            tenant_id=_as_str(obj, "tenant_id"),
            agent_id=_as_str(obj, "agent_id"),
            hub=_as_str(obj, "hub"),
            epoch=epoch,
            status=status,
            reason=_as_str(obj, "reason"),
            since=float(since),
            session_id=session,
            capabilities=tuple(capabilities),
            metadata=metadata,
            reaper=reaper,
        )


@attrs.frozen
class HubLease:
    """A hub's lease value: who it is and where agents can reach it."""

    hub: str
    urls: tuple[str, ...] = ()
    started: float = 0.0
    draining: bool = False

    def encode(self) -> bytes:
        return json.dumps(
            {"hub": self.hub, "urls": list(self.urls), "started": self.started,
             "draining": self.draining},
            separators=(",", ":"),
        ).encode()  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> HubLease:
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("a lease is a JSON object")
        urls = obj.get("urls", [])
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ValueError("urls must be a list of strings")
        started = obj.get("started", 0.0)
        if not isinstance(started, int | float) or isinstance(started, bool):
            raise ValueError("started must be a number")
        return cls(_as_str(obj, "hub"), tuple(urls), float(started), obj.get("draining") is True)


def next_claim(
    current: PresenceClaim | None,
    *,
    tenant_id: str,
    agent_id: str,
    hub: str,
    session_id: str,
    now: float,
    capabilities: tuple[str, ...] = (),
    metadata: dict[str, Any] | None = None,
    above: int = 0,
) -> PresenceClaim:
    """The claim a hub writes when ``session_id`` of the agent authenticates on it:
    online, owned by ``hub``, at the next epoch. ``since`` keeps the moment the agent
    came online when it already was (a take-over is not a new arrival).

    ``above``, when the key holds no claim, is a revision at least as new as
    anything the key had (its expiry marker's, or the bucket's last revision when
    even the marker is gone): the epoch is then above it. Every epoch ever written to
    a key is at most the revision it was written at (each claim's epoch is one more
    than the last, or above such a revision, and each write takes a new revision),
    so an epoch above that revision is above every epoch the key had: a key's
    epochs never go back, even across expiry."""
    epoch = max(1 if current is None else current.epoch + 1, above + 1)
    already_online = current is not None and current.status == "online"
    return PresenceClaim(
        tenant_id=tenant_id,
        agent_id=agent_id,
        hub=hub,
        epoch=epoch,
        status="online",
        reason="connected",
        since=current.since if already_online and current is not None else now,
        session_id=session_id,
        capabilities=capabilities,
        metadata=dict(metadata or {}),
    )


def release_claim(
    current: PresenceClaim | None, *, hub: str, epoch: int, reason: str, now: float
) -> PresenceClaim | None:
    """The claim that marks the agent offline, or ``None`` when ``hub`` at ``epoch``
    no longer owns it (a newer session elsewhere took over: nothing to write)."""
    if current is None or current.hub != hub or current.epoch != epoch:
        return None
    if current.status == "offline":
        return None
    return attrs.evolve(current, status="offline", reason=reason, since=now, session_id=None)


def reap_claim(
    current: PresenceClaim,
    *,
    lost_hub: str,
    now: float,
    reaper: str | None = None,
    reason: str = HUB_LOST,
    epoch: int | None = None,
) -> PresenceClaim | None:
    """The claim a reaper writes for an agent the lost hub still owns online, else
    ``None``. The epoch is unchanged: a hub that claims the agent meanwhile wins.
    ``reaper`` (the reaping hub) is the one hub that reports the transition;
    ``reason``: ``hub_lost`` for an expired lease, ``disconnected`` for a drained hub.
    ``epoch``: the epoch the reaper saw; a newer claim (the lost hub, restarted under
    its id, claimed the agent again) is left alone."""
    if current.hub != lost_hub or current.status != "online":
        return None
    if epoch is not None and current.epoch != epoch:
        return None
    return attrs.evolve(
        current, status="offline", reason=reason, since=now, session_id=None, reaper=reaper
    )


def refresh_claim(current: PresenceClaim | None, *, hub: str, epoch: int) -> PresenceClaim | None:
    """The claim an owner rewrites to restart its TTL: ``current`` unchanged while
    ``hub`` owns it online at ``epoch``; else ``None`` (taken over, reaped, released:
    nothing to refresh)."""
    if current is None or current.hub != hub or current.epoch != epoch:
        return None
    return current if current.status == "online" else None


def expired_claim(latest: PresenceClaim, *, now: float) -> PresenceClaim | None:
    """What a hub reports when the last claim it saw of an agent expired: offline,
    ``hub_lost``, when that claim was online (no live hub refreshed it: its owner is
    gone); ``None`` for an offline claim (nothing changes)."""
    if latest.status != "online":
        return None
    return attrs.evolve(latest, status="offline", reason=HUB_LOST, since=now, session_id=None)
