"""Protocol v1 frames: frozen value classes, ``encode`` and ``decode``.

One JSON object per WebSocket text frame; every object has a ``type``. This
module is sans-IO: it imports neither trio nor any socket library. See
``docs/protocol.md`` for the normative description.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeAlias

import attrs

from .._errors import LocalProtocolError, RemoteProtocolError
from ._subjects import validate_pattern, validate_subject

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
MAX_ID_LENGTH = 128
MAX_NESTING = 64
"""Deepest nesting of arrays/objects in a frame (the frame object itself is level 1)."""
MAX_SAFE_INTEGER = 2**53 - 1
"""Largest value of an integer field the hub reads (``seq``, ``protocol``): every client
(JavaScript's numbers included) can represent every such value exactly."""

JSON: TypeAlias = Any
"""Any value that ``json`` can encode: dict, list, str, int, float, bool, None."""


# --- field kinds -----------------------------------------------------------
#
# Each attrs field carries a ``kind`` in its metadata: a function that checks a
# decoded JSON value and converts it to the attribute's Python value. Every
# kind raises RemoteProtocolError("invalid_field") for a wrong type.


def _bad(name: str, expected: str, value: object, frame_id: str | None) -> RemoteProtocolError:
    return RemoteProtocolError(
        "invalid_field",
        f"field {name!r} must be {expected}, got {type(value).__name__}",
        frame_id=frame_id,
    )


def _k_str(name: str, value: object, frame_id: str | None) -> str:
    if not isinstance(value, str):
        raise _bad(name, "a string", value, frame_id)
    return value


def _k_id(name: str, value: object, frame_id: str | None) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} must be a string of 1 to {MAX_ID_LENGTH} characters",
            frame_id=frame_id,
        )
    return value


def _k_int(name: str, value: object, frame_id: str | None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _bad(name, "a non-negative integer", value, frame_id)
    if value > MAX_SAFE_INTEGER:
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} must be at most 2^53 - 1 ({MAX_SAFE_INTEGER})",
            frame_id=frame_id,
        )
    return value


def _k_number(name: str, value: object, frame_id: str | None) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(name, "a non-negative number", value, frame_id)
    try:
        number = float(value)  # a huge int overflows here
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} must be a finite non-negative number",
            frame_id=frame_id,
        )
    return number


def _k_bool(name: str, value: object, frame_id: str | None) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, "true or false", value, frame_id)
    return value


def _k_json(name: str, value: object, frame_id: str | None) -> JSON:
    return value


def _k_object(name: str, value: object, frame_id: str | None) -> dict[str, JSON]:
    if not isinstance(value, dict):
        raise _bad(name, "an object", value, frame_id)
    return value


def _k_strings(name: str, value: object, frame_id: str | None) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _bad(name, "a list of strings", value, frame_id)
    return tuple(value)


MAX_METADATA_BYTES = 8192
MAX_METADATA_DEPTH = 16
MAX_CAPABILITIES = 64


def _depth(value: object) -> int:
    """Nesting depth of a decoded JSON value (iterative: no recursion limit)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _k_metadata(name: str, value: object, frame_id: str | None) -> dict[str, JSON]:
    """An agent's metadata: an object, small and shallow (it is echoed to every watcher)."""
    metadata = _k_object(name, value, frame_id)
    if _depth(metadata) > MAX_METADATA_DEPTH:
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} is nested deeper than {MAX_METADATA_DEPTH} levels",
            frame_id=frame_id,
        )
    try:
        size = len(json.dumps(metadata, allow_nan=False).encode("utf-8"))
    except ValueError:  # 1e999 parses as infinity, which JSON cannot carry back out
        raise RemoteProtocolError(
            "invalid_field", f"field {name!r} holds a number out of range", frame_id=frame_id
        ) from None
    if size > MAX_METADATA_BYTES:
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} is larger than {MAX_METADATA_BYTES} bytes of JSON",
            frame_id=frame_id,
        )
    return metadata


def _k_capabilities(name: str, value: object, frame_id: str | None) -> tuple[str, ...]:
    capabilities = _k_strings(name, value, frame_id)
    if len(capabilities) > MAX_CAPABILITIES or any(len(c) > MAX_ID_LENGTH for c in capabilities):
        raise RemoteProtocolError(
            "invalid_field",
            f"field {name!r} allows at most {MAX_CAPABILITIES} strings of at most "
            f"{MAX_ID_LENGTH} characters",
            frame_id=frame_id,
        )
    return capabilities


def _k_subject(name: str, value: object, frame_id: str | None) -> str:
    try:
        return validate_subject(value, frame_id=frame_id)
    except LocalProtocolError as exc:  # the validator speaks to callers; this came in
        raise _remote(exc) from None


def _k_pattern(name: str, value: object, frame_id: str | None) -> str:
    try:
        return validate_pattern(value, frame_id=frame_id)
    except LocalProtocolError as exc:
        raise _remote(exc) from None


def _remote(exc: LocalProtocolError) -> RemoteProtocolError:
    return RemoteProtocolError(exc.code, exc.message, frame_id=exc.frame_id)


_Kind: TypeAlias = Callable[[str, object, "str | None"], Any]


def _field(kind: _Kind, *, optional: bool = False, default: object = attrs.NOTHING) -> Any:
    """An attrs field decoded with ``kind``; ``optional`` fields may be absent or null."""
    if optional and default is attrs.NOTHING:
        default = None
    return attrs.field(default=default, metadata={"kind": kind, "optional": optional})


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
    """Hub → agent: authenticated. Heartbeat values are the effective (clamped) ones."""

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
    the same id from the same agent.
    """

    type: ClassVar[str] = "publish"
    subject: str = _field(_k_subject)
    data: JSON = _field(_k_json, default=None)
    id: str | None = _field(_k_id, optional=True)
    reply_to: str | None = _field(_k_subject, optional=True)


@attrs.frozen(kw_only=True)
class Published(Frame):
    """Hub → agent: the publish with this ``id`` was accepted (``duplicate``: seen before)."""

    type: ClassVar[str] = "published"
    id: str = _field(_k_id)
    message_id: str = _field(_k_str)
    duplicate: bool = _field(_k_bool, default=False)


@attrs.frozen(kw_only=True)
class Message(Frame):
    """Hub → agent: a delivery. ``subject`` is concrete; ``subscription`` is the pattern
    that matched (``None`` for a reply delivered to its requester)."""

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


@attrs.frozen(kw_only=True)
class PresenceState(Frame):
    type: ClassVar[str] = "presence_state"
    id: str = _field(_k_id)
    agents: tuple[PresenceRecord, ...] = _field(_k_records, default=())


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


def _to_object(value: Any) -> dict[str, JSON]:
    out: dict[str, JSON] = {}
    for field in attrs.fields(type(value)):
        item = getattr(value, field.name)
        if item is None and field.metadata.get("optional"):
            continue
        if isinstance(item, tuple):
            item = [_to_object(x) if attrs.has(type(x)) else x for x in item]
        out[field.name] = item
    return out


def encode(frame: Frame) -> str:
    """The JSON text of ``frame`` (compact; optional fields that are ``None`` omitted)."""
    obj = {"type": frame.type, **_to_object(frame)}
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


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
    head = {"type": "message", "subject": subject}
    if subscription is not None:
        head["subscription"] = subscription
    tail: dict[str, JSON] = {"sender": sender, "message_id": message_id, "time": time}
    if reply_to is not None:
        tail["reply_to"] = reply_to
    dump = json.dumps
    return (
        dump(head, separators=(",", ":"))[:-1]
        + ',"data":'
        + data_json
        + ","
        + dump(tail, separators=(",", ":"))[1:]
    )


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _from_object(cls: type[Any], obj: object, frame_id: str | None, where: str) -> Any:
    if not isinstance(obj, dict):
        raise RemoteProtocolError("invalid_field", f"{where} must be an object", frame_id=frame_id)
    kwargs: dict[str, Any] = {}
    for field in attrs.fields(cls):
        name = field.name
        optional = field.metadata["optional"]
        if name not in obj:
            if field.default is attrs.NOTHING:
                raise RemoteProtocolError(
                    "missing_field",
                    f"{cls.type if issubclass(cls, Frame) else where} "
                    f"frame is missing field {name!r}",
                    frame_id=frame_id,
                )
            continue
        value = obj[name]
        if value is None and optional:
            continue
        kwargs[name] = field.metadata["kind"](name, value, frame_id)
    return cls(**kwargs)


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
        obj = json.loads(text, parse_constant=_reject_constant)
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


def _too_deep() -> RemoteProtocolError:
    return RemoteProtocolError("invalid_json", f"JSON is nested deeper than {MAX_NESTING} levels")


def _deeper_than(value: object, limit: int) -> bool:
    """Whether arrays/objects nest deeper than ``limit`` (iterative: no recursion limit)."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = []
    if isinstance(value, dict | list):
        stack.append((value, 1))
    while stack:
        item, level = stack.pop()
        if level > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return False


def _kind(obj: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number"
    )
