"""Routing between hubs over core NATS: subjects, interest and envelopes (sans-IO).

A publish is delivered by its origin hub to its own agents and published *once* on
NATS, on ``ac.<tenant>.<subject>``, for the other hubs. Each hub subscribes on NATS
once per (tenant, pattern) its local agents hold — :class:`InterestTable` says when
the first local subscriber arrives (subscribe) and the last one goes (unsubscribe).

A hub whose agents hold overlapping patterns (``tasks.*`` and ``tasks.>``) gets one
NATS copy per matching subscription; :class:`RecentIds` keeps the first and drops
the rest (by the publisher's frame id, or the message id), and the hub then routes
the message through its own subject index, which gives each agent one delivery
however many of its patterns match and keeps reserved subjects out of plain
wildcards (NATS alone would let ``ac.t.>`` match ``ac.t.$presence.x``).

The origin hub connects with ``echo`` off, so it never receives its own publish.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Mapping

import attrs

from .._errors import ProtocolError
from ..protocol._subjects import validate_subject
from ..registry._registry import validate_id

__all__ = [
    "InterestTable",
    "RecentIds",
    "RouteEnvelope",
    "nats_subject",
    "publish_dedupe_key",
    "split_nats_subject",
]

ROUTE_PREFIX = "ac"

_H_ORIGIN = "Ac-Origin"
_H_ID = "Ac-Msg-Id"
_H_SENDER = "Ac-Sender"
_H_REPLY = "Ac-Reply-To"
_H_TIME = "Ac-Time"
_H_PUBLISH_ID = "Ac-Publish-Id"
_H_REPLY_FROM = "Ac-Reply-From"  # a request's allowed responders, comma-separated


def nats_subject(tenant_id: str, subject_or_pattern: str) -> str:
    """The NATS subject (or pattern) carrying ``tenant_id``'s ``subject_or_pattern``."""
    return f"{ROUTE_PREFIX}.{validate_id(tenant_id, 'tenant id')}.{subject_or_pattern}"


def split_nats_subject(subject: str) -> tuple[str, str] | None:
    """``(tenant_id, subject)`` of a routed NATS subject, or ``None`` for another one."""
    prefix, _, rest = subject.partition(".")
    tenant, _, inner = rest.partition(".")
    if prefix != ROUTE_PREFIX or not tenant or not inner:
        return None
    return tenant, inner


class InterestTable:
    """How many local subscriptions hold each (tenant, pattern)."""

    def __init__(self) -> None:
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, tenant_id: str, pattern: str) -> bool:
        """Count one more local subscription; ``True`` when it is the first (subscribe)."""
        key = (tenant_id, pattern)
        self._counts[key] += 1
        return self._counts[key] == 1

    def remove(self, tenant_id: str, pattern: str) -> bool:
        """Count one fewer; ``True`` when it was the last (unsubscribe). Removing what
        was never added is a bug in the caller: ``KeyError``."""
        key = (tenant_id, pattern)
        if key not in self._counts:
            raise KeyError(key)
        self._counts[key] -= 1
        if self._counts[key] == 0:
            del self._counts[key]
            return True
        return False

    def patterns(self) -> list[tuple[str, str]]:
        """Every (tenant, pattern) held, e.g. to subscribe again after a NATS reconnect."""
        return sorted(self._counts)

    def __len__(self) -> int:
        return len(self._counts)


@attrs.frozen
class RouteEnvelope:
    """One publish as it crosses NATS: the ``data`` JSON as the payload (encoded once
    by the origin), the rest in headers."""

    origin_hub: str
    message_id: str
    sender: str
    data_json: str
    time: float
    reply_to: str | None = None
    #: The publisher's frame ``id`` (it re-sends an unconfirmed publish with the same
    #: one, possibly to another hub after a failover).
    publish_id: str | None = None
    #: A request's ``reply_from`` (agent ids): every hub holds answers to it.
    reply_from: tuple[str, ...] | None = None

    def dedupe_key(self, tenant_id: str) -> str:
        """What identifies this publish on every hub: the publisher's frame id when it
        sent one (a re-send through another hub has a new message id but the same
        key), else the message id."""
        if self.publish_id is not None:
            return publish_dedupe_key(tenant_id, self.sender, self.publish_id)
        return self.message_id

    def to_nats(self) -> tuple[bytes, dict[str, str]]:
        headers = {
            _H_ORIGIN: self.origin_hub,
            _H_ID: self.message_id,
            _H_SENDER: self.sender,
            _H_TIME: repr(self.time),
        }
        if self.reply_to is not None:
            headers[_H_REPLY] = self.reply_to
        if self.publish_id is not None:
            headers[_H_PUBLISH_ID] = self.publish_id
        if self.reply_from is not None:
            # Only ids an agent can have (no commas): another string in a request's
            # reply_from matches no agent on any hub, so it is left out, not sent.
            headers[_H_REPLY_FROM] = ",".join(i for i in self.reply_from if _is_agent_id(i))
        return self.data_json.encode(), headers

    @classmethod
    def from_nats(cls, payload: bytes, headers: Mapping[str, str] | None) -> RouteEnvelope:
        """Parse a routed message; ``ValueError`` when a header is missing or bad."""
        if headers is None:
            raise ValueError("a routed message has headers")

        def need(name: str) -> str:
            value = headers.get(name)
            if value is None:
                raise ValueError(f"missing header {name}")
            return value

        try:
            moment = float(need(_H_TIME))
        except ValueError as exc:
            raise ValueError(f"bad header {_H_TIME}: {exc}") from None
        if not math.isfinite(moment):
            raise ValueError(f"bad header {_H_TIME}: not a finite number")
        # What crosses NATS is spliced into message frames: it must be what the origin
        # hub would have produced (strict JSON data, a valid reply subject), whoever
        # published it on ``ac.>``.
        try:
            data_json = payload.decode()
            json.loads(data_json, parse_constant=_not_json)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"the payload is not strict JSON: {exc}") from None
        reply_to = headers.get(_H_REPLY)
        if reply_to is not None:
            try:
                validate_subject(reply_to)
            except ProtocolError as exc:
                raise ValueError(f"bad header {_H_REPLY}: {exc}") from None
        return cls(
            origin_hub=need(_H_ORIGIN),
            message_id=need(_H_ID),
            sender=need(_H_SENDER),
            data_json=data_json,
            time=moment,
            reply_to=reply_to,
            publish_id=headers.get(_H_PUBLISH_ID),
            reply_from=_reply_from(headers.get(_H_REPLY_FROM)),
        )


def _is_agent_id(value: str) -> bool:
    try:
        validate_id(value)
    except ValueError:
        return False
    return True


def _reply_from(header: str | None) -> tuple[str, ...] | None:
    """The ``Ac-Reply-From`` header's agent ids; ``ValueError`` for one that is not an id."""
    if header is None:
        return None
    ids = tuple(header.split(",")) if header else ()
    for agent_id in ids:
        validate_id(agent_id, f"{_H_REPLY_FROM} agent id")
    return ids


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def publish_dedupe_key(tenant_id: str, sender: str, publish_id: str) -> str:
    """The cluster-wide key of an agent's publish ``publish_id`` (ids cannot hold
    ``/``, so the parts cannot run into each other)."""
    return f"{tenant_id}/{sender}/{publish_id}"


class RecentIds:
    """Publishes seen recently, by :meth:`RouteEnvelope.dedupe_key`.

    :meth:`first_time` is ``True`` once per key while it is remembered: for
    ``window`` seconds and among the last ``size`` keys, whichever forgets first, so
    memory is bounded whatever arrives. A hub runs every routed copy through it —
    the ones it publishes and the ones NATS brings — so a publish re-sent through
    another hub after a failover is recognised there, or dropped by the hubs that
    saw the first copy.
    """

    def __init__(self, *, window: float = 600.0, size: int = 65536) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        if window <= 0:
            raise ValueError("window must be > 0")
        self._size = size
        self._window = window
        self._seen: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()

    def first_time(self, key: str, now: float) -> bool:
        return self.earlier(key, now, key) is None

    def earlier(self, key: str, now: float, message_id: str) -> str | None:
        """The message id ``key`` was first seen with, or ``None`` (and ``key`` is
        remembered with ``message_id``) when it is new."""
        seen = self._seen
        while seen:
            oldest, (when, _id) = next(iter(seen.items()))
            if now - when < self._window:
                break
            del seen[oldest]
        first = seen.get(key)
        if first is not None:
            return first[1]
        seen[key] = (now, message_id)
        if len(seen) > self._size:
            seen.popitem(last=False)
        return None

    def __len__(self) -> int:
        return len(self._seen)
