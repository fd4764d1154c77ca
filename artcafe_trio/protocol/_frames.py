"""Protocol v1 frames: frozen value classes, ``encode`` and ``decode``.

One JSON object per WebSocket text frame; every object has a ``type``. This
module is sans-IO: it imports neither trio nor any socket library. See
``docs/protocol.md`` for the normative description; the field kinds and the
strict decoding machinery are in ``_fields``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs

from .._errors import RemoteProtocolError
from ._fields import (
    JSON,
    MAX_ID_LENGTH,
    MAX_NESTING,
    _bad,
    _deeper_than,
    _field,
    _from_object,
    _k_bool,
    _k_capabilities,
    _k_id,
    _k_int,
    _k_json,
    _k_metadata,
    _k_number,
    _k_object,
    _k_pattern,
    _k_str,
    _k_strings,
    _k_subject,
    _k_urls,
    _kind,
    _to_object,
    _too_deep,
)
from ._json import dumps_compact, loads_strict, quote

__all__ = [
    "CLIENT_FRAME_TYPES",
    "DEFAULT_MAX_FRAME_BYTES",
    "FRAME_TYPES",
    "PROTOCOL_VERSION",
    "AdminAuth",
    "Auth",
    "Challenge",
    "Error",
    "Frame",
    "Heartbeat",
    "HeartbeatAck",
    "Leave",
    "Message",
    "PresenceEvent",
    "PresenceQuery",
    "PresenceRecord",
    "PresenceState",
    "Publish",
    "Published",
    "Subscribe",
    "Subscribed",
    "Unsubscribe",
    "Unsubscribed",
    "Welcome",
    "decode",
    "decode_with_id",
    "encode",
    "encode_message",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 1024 * 1024


# --- frames ----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Frame:
    """Base class of every protocol v1 frame."""

    type: ClassVar[str] = ""


@attrs.frozen(kw_only=True)
class Challenge(Frame):
    """Hub → agent, first frame: sign ``nonce`` before ``expires_in`` seconds pass."""

    type: ClassVar[str] = "challenge"
    nonce: str = _field(_k_str)
    expires_in: float = _field(_k_number)
    hub_id: str = _field(_k_str)
    protocol: int = _field(_k_int, default=PROTOCOL_VERSION)


@attrs.frozen(kw_only=True)
class Auth(Frame):
    """Agent → hub: the signed challenge and the agent's declared settings.

    ``heartbeat_interval`` is ``None`` for an agent that sends no heartbeats
    (a ``SimpleAgent``): its presence then ends only when its connection does.
    """

    type: ClassVar[str] = "auth"
    agent_id: str = _field(_k_id)
    tenant_id: str = _field(_k_id)
    algorithm: str = _field(_k_str)
    signature: str = _field(_k_str)
    heartbeat_interval: float | None = _field(_k_number, optional=True)
    heartbeat_timeout_multiplier: float = _field(_k_number, default=3.0)
    capabilities: tuple[str, ...] = _field(_k_capabilities, default=())
    metadata: dict[str, JSON] = _field(_k_metadata, default=attrs.Factory(dict))
    protocol: int = _field(_k_int, default=PROTOCOL_VERSION)


@attrs.frozen(kw_only=True)
class Welcome(Frame):
    """Hub → agent: authenticated. Heartbeat values are the effective (clamped) ones.

    ``connect_urls``: the ws:// or wss:// URLs of the cluster's other hubs (like NATS's
    ``connect_urls``), where the agent may fail over; ``None`` (absent) for a single hub.
    """

    type: ClassVar[str] = "welcome"
    session_id: str = _field(_k_str)
    agent_id: str = _field(_k_str)
    tenant_id: str = _field(_k_str)
    hub_id: str = _field(_k_str)
    hub_time: float = _field(_k_number)
    heartbeat_interval: float | None = _field(_k_number, optional=True)
    heartbeat_timeout: float | None = _field(_k_number, optional=True)
    max_frame_bytes: int = _field(_k_int, default=DEFAULT_MAX_FRAME_BYTES)
    protocol: int = _field(_k_int, default=PROTOCOL_VERSION)
    connect_urls: tuple[str, ...] | None = _field(_k_urls, optional=True)


@attrs.frozen(kw_only=True)
class AdminAuth(Frame):
    """Admin → hub on the admin path: the token from the hub's admin file."""

    type: ClassVar[str] = "admin_auth"
    token: str = _field(_k_str)


@attrs.frozen(kw_only=True)
class Subscribe(Frame):
    """Agent → hub: subscribe to a pattern (wildcards allowed). Answered by ``subscribed``."""

    type: ClassVar[str] = "subscribe"
    id: str = _field(_k_id)
    subject: str = _field(_k_pattern)


@attrs.frozen(kw_only=True)
class Subscribed(Frame):
    type: ClassVar[str] = "subscribed"
    id: str = _field(_k_id)
    subject: str = _field(_k_str)


@attrs.frozen(kw_only=True)
class Unsubscribe(Frame):
    """Agent → hub: drop a subscription. Answered by ``unsubscribed`` even if absent."""

    type: ClassVar[str] = "unsubscribe"
    id: str = _field(_k_id)
    subject: str = _field(_k_pattern)


@attrs.frozen(kw_only=True)
class Unsubscribed(Frame):
    type: ClassVar[str] = "unsubscribed"
    id: str = _field(_k_id)
    subject: str = _field(_k_str)


@attrs.frozen(kw_only=True)
class Publish(Frame):
    """Agent → hub: publish ``data`` to a concrete subject.

    With an ``id`` the hub answers ``published`` and de-duplicates re-sends of
    the same id from the same agent. ``reply_from`` (with a ``reply_to`` under the
    publisher's ``$reply.`` inbox) names the only agents whose answer the hub accepts.
    """

    type: ClassVar[str] = "publish"
    subject: str = _field(_k_subject)
    data: JSON = _field(_k_json, default=None)
    id: str | None = _field(_k_id, optional=True)
    reply_to: str | None = _field(_k_subject, optional=True)
    reply_from: tuple[str, ...] | None = _field(_k_capabilities, optional=True)


@attrs.frozen(kw_only=True)
class Published(Frame):
    """Hub → agent: the publish with this ``id`` was accepted (``duplicate``: seen before)."""

    type: ClassVar[str] = "published"
    id: str = _field(_k_id)
    message_id: str = _field(_k_str)
    duplicate: bool = _field(_k_bool, default=False)


@attrs.frozen(kw_only=True)
class Message(Frame):
    """Hub → agent: a delivery (one per publish per connection). ``subject`` is concrete;
    ``subscription`` is not sent by this hub (read if an older hub sends it)."""

    type: ClassVar[str] = "message"
    subject: str = _field(_k_str)
    data: JSON = _field(_k_json, default=None)
    sender: str = _field(_k_str)
    message_id: str = _field(_k_str)
    time: float = _field(_k_number)
    subscription: str | None = _field(_k_str, optional=True)
    reply_to: str | None = _field(_k_str, optional=True)


@attrs.frozen(kw_only=True)
class Heartbeat(Frame):
    """Agent → hub: I am alive. Answered by ``heartbeat_ack`` with the same ``seq``."""

    type: ClassVar[str] = "heartbeat"
    seq: int = _field(_k_int)
    rtt: float | None = _field(_k_number, optional=True)
    """The agent's last measured (smoothed) ACK round trip, seconds; optional."""


@attrs.frozen(kw_only=True)
class HeartbeatAck(Frame):
    type: ClassVar[str] = "heartbeat_ack"
    seq: int = _field(_k_int)
    hub_time: float = _field(_k_number)


@attrs.frozen(kw_only=True)
class PresenceQuery(Frame):
    """Agent or admin → hub: ask for the presence table. Answered by ``presence_state``."""

    type: ClassVar[str] = "presence_query"
    id: str = _field(_k_id)


def _k_records(name: str, value: object, frame_id: str | None) -> tuple[PresenceRecord, ...]:
    if not isinstance(value, list):
        raise _bad(name, "a list of objects", value, frame_id)
    return tuple(_from_object(PresenceRecord, item, frame_id, name) for item in value)


@attrs.frozen(kw_only=True)
class PresenceRecord:
    """One row of the presence table (not a frame: an element of ``presence_state``)."""

    tenant_id: str = _field(_k_str)
    agent_id: str = _field(_k_str)
    status: str = _field(_k_str)
    reason: str | None = _field(_k_str, optional=True)
    session_id: str | None = _field(_k_str, optional=True)
    since: float | None = _field(_k_number, optional=True)
    last_seen: float | None = _field(_k_number, optional=True)
    last_heartbeat: float | None = _field(_k_number, optional=True)
    heartbeat_timeout: float | None = _field(_k_number, optional=True)
    capabilities: tuple[str, ...] = _field(_k_strings, default=())
    metadata: dict[str, JSON] = _field(_k_object, default=attrs.Factory(dict))
    hub_id: str | None = _field(_k_str, optional=True)
    """The hub the agent's current (or last) session is on; absent when unknown."""


@attrs.frozen(kw_only=True)
class PresenceState(Frame):
    """Hub → agent or admin: the presence table asked for by ``presence_query``.

    ``degraded``: why the answering hub's view of its cluster is degraded (e.g.
    ``fenced``: the table may be stale); absent when it is not, and for a hub alone.
    """

    type: ClassVar[str] = "presence_state"
    id: str = _field(_k_id)
    agents: tuple[PresenceRecord, ...] = _field(_k_records, default=())
    degraded: tuple[str, ...] | None = _field(_k_strings, optional=True)


@attrs.frozen(kw_only=True)
class PresenceEvent:
    """The ``data`` of a ``message`` on ``$presence.<agent_id>``: one presence transition.

    ``status`` is ``online`` or ``offline``; ``reason`` is ``connected`` for
    online, and ``timeout``, ``disconnected`` or ``left`` for offline.
    """

    tenant_id: str = _field(_k_str)
    agent_id: str = _field(_k_str)
    status: str = _field(_k_str)
    reason: str = _field(_k_str)
    time: float = _field(_k_number)
    session_id: str | None = _field(_k_str, optional=True)
    capabilities: tuple[str, ...] = _field(_k_strings, default=())
    metadata: dict[str, JSON] = _field(_k_object, default=attrs.Factory(dict))

    def to_data(self) -> dict[str, JSON]:
        """The JSON object sent as a message's ``data``."""
        return _to_object(self)

    @classmethod
    def from_data(cls, data: object) -> PresenceEvent:
        """Parse a presence message's ``data``; raises ``ProtocolError``."""
        event: PresenceEvent = _from_object(cls, data, None, "data")
        return event


@attrs.frozen(kw_only=True)
class Leave(Frame):
    """Agent → hub: graceful shutdown; the hub records ``left`` and closes with 1000."""

    type: ClassVar[str] = "leave"
    reason: str | None = _field(_k_str, optional=True)


@attrs.frozen(kw_only=True)
class Error(Frame):
    """Either direction: a refused frame (``id`` of it, when it had one) or a fatal error."""

    type: ClassVar[str] = "error"
    code: str = _field(_k_str)
    message: str = _field(_k_str, default="")
    id: str | None = _field(_k_str, optional=True)
    fatal: bool = _field(_k_bool, default=False)


FRAME_TYPES: Mapping[str, type[Frame]] = {
    cls.type: cls
    for cls in (
        Challenge,
        Auth,
        Welcome,
        AdminAuth,
        Subscribe,
        Subscribed,
        Unsubscribe,
        Unsubscribed,
        Publish,
        Published,
        Message,
        Heartbeat,
        HeartbeatAck,
        PresenceQuery,
        PresenceState,
        Leave,
        Error,
    )
}

CLIENT_FRAME_TYPES = frozenset(
    {"auth", "admin_auth", "subscribe", "unsubscribe", "publish", "heartbeat"}
    | {"presence_query", "leave", "error"}
)
"""Frame types a hub accepts from a connected peer."""


# --- encode / decode ---------------------------------------------------------


def _encode_published(frame: Published) -> str | None:
    if type(frame.id) is not str or type(frame.message_id) is not str:
        return None
    if type(frame.duplicate) is not bool:
        return None
    tail = ',"duplicate":true}' if frame.duplicate else ',"duplicate":false}'
    return (
        '{"type":"published","id":'
        + quote(frame.id)
        + ',"message_id":'
        + (quote(frame.message_id) + tail)
    )


def _encode_heartbeat_ack(frame: HeartbeatAck) -> str | None:
    seq, hub_time = frame.seq, frame.hub_time
    if type(seq) is int and type(hub_time) is float and math.isfinite(hub_time):
        return (
            '{"type":"heartbeat_ack","seq":' + int.__repr__(seq)
            + ',"hub_time":' + float.__repr__(hub_time) + "}"
        )  # fmt: skip
    return None


_TEMPLATES: dict[type[Frame], Callable[[Any], str | None]] = {
    Published: _encode_published,
    HeartbeatAck: _encode_heartbeat_ack,
}
"""The hub's most frequent answers, written without building a dict: each returns
exactly what the generic path would (``None``: a value it does not handle, e.g. a
non-finite time, goes the generic way and is refused there as before)."""


def encode(frame: Frame) -> str:
    """The JSON text of ``frame`` (compact; optional fields that are ``None`` omitted)."""
    template = _TEMPLATES.get(type(frame))
    if template is not None:
        text = template(frame)
        if text is not None:
            return text
    obj = {"type": frame.type, **_to_object(frame)}
    return dumps_compact(obj)


def encode_message(
    *,
    subject: str,
    subscription: str | None,
    data_json: str,
    sender: str,
    message_id: str,
    time: float,
    reply_to: str | None = None,
) -> str:
    """The text of a ``message`` frame around already-encoded ``data``.

    Lets a hub encode a published payload once and reuse it for every receiver.
    """
    # ``json.dumps`` of the head and the tail, spelled out (the same text): strings as
    # ``json`` quotes them, a float as its repr (a non-finite or non-float time the
    # standard way, as before: ``Infinity`` is not refused here).
    head = '{"type":"message","subject":' + quote(subject)
    if subscription is not None:
        head += ',"subscription":' + quote(subscription)
    if type(time) is float and math.isfinite(time):
        stamp = float.__repr__(time)
    else:
        stamp = json.dumps(time)
    tail = ',"sender":' + quote(sender) + ',"message_id":' + quote(message_id) + ',"time":' + stamp
    if reply_to is not None:
        tail += ',"reply_to":' + quote(reply_to)
    return head + ',"data":' + data_json + tail + "}"


def decode(text: str | bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Parse one frame; raise :class:`RemoteProtocolError` with a precise ``code``
    on any defect.

    Unknown extra fields are ignored (forward compatibility); wrong types are not.
    """
    return decode_with_id(text, max_bytes=max_bytes)[0]


def decode_with_id(
    text: str | bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[Frame, str | None]:
    """:func:`decode`, also returning the frame's ``id`` as sent, whether or not its
    type has an ``id`` field (so a refusal can name the frame it refers to)."""
    if not isinstance(text, str):
        raise RemoteProtocolError(
            "binary_frame", "binary frames are not supported: send JSON in a text frame"
        )
    if len(text) > max_bytes or (
        len(text) * 4 > max_bytes and len(text.encode("utf-8", "surrogatepass")) > max_bytes
    ):
        raise RemoteProtocolError("frame_too_large", f"frame exceeds {max_bytes} bytes")
    try:
        obj = loads_strict(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:
        raise RemoteProtocolError("invalid_json", f"not valid JSON: {exc}") from None
    if text.count("[") + text.count("{") > MAX_NESTING and _deeper_than(obj, MAX_NESTING):
        raise _too_deep()
    if not isinstance(obj, dict):
        raise RemoteProtocolError(
            "not_an_object", f"a frame must be a JSON object, not {_kind(obj)}"
        )
    raw_id = obj.get("id")
    frame_id = raw_id if isinstance(raw_id, str) and len(raw_id) <= MAX_ID_LENGTH else None
    if "type" not in obj:
        raise RemoteProtocolError("missing_field", "frame has no 'type'", frame_id=frame_id)
    frame_type = obj["type"]
    if not isinstance(frame_type, str):
        raise _bad("type", "a string", frame_type, frame_id)
    cls = FRAME_TYPES.get(frame_type)
    if cls is None:
        raise RemoteProtocolError(
            "unknown_type", f"unknown frame type {frame_type[:64]!r}", frame_id=frame_id
        )
    frame: Frame = _from_object(cls, obj, frame_id, frame_type)
    return frame, frame_id
