"""The hub's side of one protocol v1 connection, sans-IO (h11/wsproto style).

:class:`ServerConnection` owns everything about a connection that depends on that
connection only: the handshake (challenge, the first frame, the welcome with clamped
heartbeat settings), the per-frame policy (admin-channel rules, reserved subjects,
the connection's own reply prefix, ``max_subscriptions``, frame size, the publish
token bucket, data encodability, ``already_authenticated``) and its state. It does
no I/O and reads no clock: every method that needs time takes ``now``.

Bytes in and out are protocol frames as text, one per WebSocket text message: the
WebSocket layer (``hub/_wsserver.py``, wsproto driven inline) stays below it, so a
delivery framed once for every receiver still goes out in one ``send_all`` per batch.

States and the one method that owns each transition::

    AWAITING_AUTH --receive_auth()--> AUTHENTICATING --accept()--> OPEN
          |                                 |                        |
       expire()                   refuse() / expire()             close()
          |                                 v                        |
          +--------------------------->  CLOSING  <------------------+
                                            |
                               connection_closed() (from any state)
                                            v
                                          CLOSED

``receive_auth`` decodes the first frame; a claim the connection can judge alone
(invalid frame, not an auth frame, wrong protocol) is refused there and then
(:class:`HandshakeRefused`); otherwise it returns :class:`AuthRequested` and the
driver's authenticator answers with :meth:`accept` or :meth:`refuse`. Once OPEN,
:meth:`receive_text` turns each frame into one event; a refused frame becomes
:class:`FrameRefused` carrying the non-fatal ``error`` frame (its ``id`` echoed).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol, TypeAlias

import attrs

from .._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .._logsafe import printable as _printable
from ._codes import CloseCode
from ._frames import (
    CLIENT_FRAME_TYPES,
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    AdminAuth,
    Auth,
    Challenge,
    Error,
    Frame,
    Heartbeat,
    Leave,
    PresenceQuery,
    Publish,
    Subscribe,
    Unsubscribe,
    Welcome,
    decode_with_id,
    encode,
)
from ._json import dumps_compact
from ._subjects import is_reserved

__all__ = [
    "AuthRequested",
    "ConnectionState",
    "FrameRefused",
    "HandshakeRefused",
    "HeartbeatReceived",
    "LeaveRequested",
    "PeerError",
    "PresenceRequested",
    "PublishRequested",
    "RateLimiter",
    "Refusal",
    "ServerConnection",
    "ServerEvent",
    "ServerLimits",
    "SubscribeRequested",
    "UnsubscribeRequested",
]

PRESENCE_PREFIX = "$presence"
REPLY_PREFIX = "$reply"
ADMIN_AGENT_ID = "$admin"
ADMIN_PATTERN = f"{PRESENCE_PREFIX}.>"


class ConnectionState(enum.Enum):
    """Where a server connection is (see the module docstring for the transitions)."""

    AWAITING_AUTH = "awaiting_auth"
    AUTHENTICATING = "authenticating"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class RateLimiter(Protocol):
    """The publish token bucket injected at :meth:`ServerConnection.accept`."""

    def take(self, now: float) -> bool: ...


@attrs.frozen(kw_only=True)
class ServerLimits:
    """The hub settings a connection applies (a subset of ``HubConfig``)."""

    hub_id: str
    challenge_timeout: float = 30.0
    min_heartbeat_interval: float = 0.5
    max_heartbeat_interval: float = 300.0
    min_timeout_multiplier: float = 1.5
    max_timeout_multiplier: float = 10.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_subscriptions: int = 1000
    publish_rate: float = 1000.0


@attrs.frozen(kw_only=True)
class Refusal:
    """A handshake answer that refuses: the error frame's fields, the close code, and
    the operator-side ``cause`` (logged, never sent). ``identity`` is whose failure the
    authentication throttle counts (empty when the frame named nobody)."""

    code: str
    message: str
    frame_id: str | None
    close: int
    who: str
    cause: str
    identity: str = ""
    reason: str | None = None  # the close reason, if not ``message`` (never client text)

    @property
    def close_reason(self) -> str:
        return self.reason or self.message


# --- events ----------------------------------------------------------------------


@attrs.frozen
class AuthRequested:
    """The first frame is a well-formed claim: the driver verifies it, then calls
    :meth:`ServerConnection.accept` or :meth:`ServerConnection.refuse`."""

    claim: Auth | AdminAuth
    frame_id: str | None
    identity: str  # ``tenant/agent`` or ``$admin``: the throttle's key
    who: str  # for the log: the claim, and the URL's ids when they differ


@attrs.frozen
class HandshakeRefused:
    """The first frame is refused by the connection itself: the driver counts the
    failure and calls :meth:`ServerConnection.refuse` with ``refusal``."""

    refusal: Refusal


@attrs.frozen
class SubscribeRequested:
    """A subscribe the connection allows (``new``: not one of its patterns yet)."""

    frame: Subscribe
    new: bool


@attrs.frozen
class UnsubscribeRequested:
    frame: Unsubscribe


@attrs.frozen
class PublishRequested:
    """A publish past the connection's subject rules. The hub checks what is hub-wide
    (duplicates, reply grants), then calls :meth:`ServerConnection.admit_publish`
    (rate and data) for the encoded data, so a duplicate costs no token."""

    frame: Publish
    is_reply: bool


@attrs.frozen
class PresenceRequested:
    frame: PresenceQuery


@attrs.frozen
class HeartbeatReceived:
    """Answer with a ``heartbeat_ack`` echoing ``frame.seq``."""

    frame: Heartbeat


@attrs.frozen
class LeaveRequested:
    """The agent leaves (``left`` is set): close with 1000 ``left``."""

    reason: str | None


@attrs.frozen
class PeerError:
    """The peer reported an error (logged; nothing is answered)."""

    code: str
    message: str


@attrs.frozen
class FrameRefused:
    """A frame was refused: send ``error`` (non-fatal) back; the connection stays open."""

    error: Error
    text: str


ServerEvent: TypeAlias = (
    SubscribeRequested
    | UnsubscribeRequested
    | PublishRequested
    | PresenceRequested
    | HeartbeatReceived
    | LeaveRequested
    | PeerError
    | FrameRefused
)


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def claimed(frame: Auth, tenant_id: str | None, agent_id: str | None) -> str:
    """Who an auth frame claims to be, for the log."""
    who = f"{_printable(frame.tenant_id)}/{_printable(frame.agent_id)}"
    if (frame.tenant_id, frame.agent_id) != (tenant_id, agent_id):
        who += f" (URL says {_printable(tenant_id)}/{_printable(agent_id)})"
    return who


class ServerConnection:
    """One connection's protocol state on the hub (see the module docstring).

    ``agent_id``/``tenant_id`` are the ids from the connection's URL (both ``None`` on
    the admin path); ``nonce`` is the challenge to sign (the driver draws it).
    """

    def __init__(
        self,
        limits: ServerLimits,
        *,
        agent_id: str | None,
        tenant_id: str | None,
        nonce: str,
    ) -> None:
        self.limits = limits
        self.url_agent_id = agent_id
        self.url_tenant_id = tenant_id
        self.nonce = nonce
        self.state = ConnectionState.AWAITING_AUTH
        self.challenge_deadline: float | None = None
        self.claim: Auth | AdminAuth | None = None
        self.session_id: str | None = None
        self.tenant_id = ""
        self.agent_id = ""
        self.heartbeat_interval: float | None = None
        self.heartbeat_timeout: float | None = None
        self.subscriptions: set[str] = set()
        self.close_code: int | None = None
        self.close_reason = ""
        self.left = False
        self._bucket: RateLimiter | None = None

    @property
    def is_admin(self) -> bool:
        return self.url_agent_id is None

    def __repr__(self) -> str:
        return f"<ServerConnection {self.state.name} {self.tenant_id}/{self.agent_id}>"

    # --- handshake ---------------------------------------------------------------

    def challenge(self, now: float) -> str:
        """The challenge frame to send first; the claim must be checked before
        ``challenge_deadline`` (see :meth:`expire`)."""
        self._expect(ConnectionState.AWAITING_AUTH, "challenge")
        if self.challenge_deadline is not None:
            raise LocalProtocolError("invalid_state", "the challenge was issued already")
        timeout = self.limits.challenge_timeout
        self.challenge_deadline = now + timeout
        return encode(Challenge(nonce=self.nonce, expires_in=timeout, hub_id=self.limits.hub_id))

    def receive_auth(self, text: str | bytes, now: float) -> AuthRequested | HandshakeRefused:
        """Judge the first frame: AWAITING_AUTH → AUTHENTICATING. The driver then calls
        :meth:`accept` or :meth:`refuse` (always :meth:`refuse` after
        :class:`HandshakeRefused`)."""
        self._expect(ConnectionState.AWAITING_AUTH, "receive_auth")
        try:
            frame, raw_id = decode_with_id(text, max_bytes=self.limits.max_frame_bytes)
        except RemoteProtocolError as exc:
            return self._refused(
                Refusal(
                    code=exc.code, message=exc.message, frame_id=exc.frame_id,
                    close=CloseCode.PROTOCOL_VIOLATION, who="?", cause="invalid first frame",
                    reason="expected auth",
                )
            )  # fmt: skip
        if self.is_admin:
            if isinstance(frame, AdminAuth):
                return self._requested(frame, raw_id, ADMIN_AGENT_ID, "admin")
            return self._refused(
                Refusal(
                    code="authentication_failed", message="bad admin token", frame_id=raw_id,
                    close=CloseCode.AUTHENTICATION_FAILED, who="admin",
                    cause=f"a {frame.type} frame", identity=ADMIN_AGENT_ID,
                )
            )  # fmt: skip
        if not isinstance(frame, Auth):
            return self._refused(
                Refusal(
                    code="not_authenticated", message=f"expected an auth frame, got {frame.type!r}",
                    frame_id=raw_id, close=CloseCode.PROTOCOL_VIOLATION, who="?",
                    cause=f"a {frame.type} frame", reason="expected auth",
                )
            )  # fmt: skip
        identity = f"{frame.tenant_id}/{frame.agent_id}"
        who = claimed(frame, self.url_tenant_id, self.url_agent_id)
        if frame.protocol != PROTOCOL_VERSION:
            refusal = Refusal(
                code="unsupported_protocol",
                message=f"this hub speaks protocol {PROTOCOL_VERSION}",
                frame_id=raw_id,
                close=CloseCode.PROTOCOL_VIOLATION,
                who=who,
                cause=f"protocol {frame.protocol}",
                identity=identity,
            )
            return self._refused(refusal)
        return self._requested(frame, raw_id, identity, who)

    def _requested(
        self, claim: Auth | AdminAuth, frame_id: str | None, identity: str, who: str
    ) -> AuthRequested:
        self.claim = claim
        self.state = ConnectionState.AUTHENTICATING
        return AuthRequested(claim, frame_id, identity, who)

    def _refused(self, refusal: Refusal) -> HandshakeRefused:
        self.state = ConnectionState.AUTHENTICATING
        return HandshakeRefused(refusal)

    def refuse(self, refusal: Refusal) -> str:
        """Refuse the handshake: → CLOSING with ``refusal.close``; the fatal error frame."""
        if self.state not in (ConnectionState.AWAITING_AUTH, ConnectionState.AUTHENTICATING):
            raise LocalProtocolError(
                "invalid_state", f"cannot refuse a {self.state.name} connection"
            )
        self._closing(refusal.close, refusal.close_reason)
        error = Error(code=refusal.code, message=refusal.message, id=refusal.frame_id, fatal=True)
        return encode(error)

    def expire(self, now: float) -> str | None:
        """The challenge deadline passed unanswered: → CLOSING 4002 and the fatal error
        frame; ``None`` if the deadline has not passed or the handshake is over."""
        if self.state not in (ConnectionState.AWAITING_AUTH, ConnectionState.AUTHENTICATING):
            return None
        if self.challenge_deadline is None or now < self.challenge_deadline:
            return None
        self._closing(CloseCode.CHALLENGE_EXPIRED, "challenge expired")
        expired = Error(
            code="challenge_expired",
            message="no auth frame checked before the challenge expired",
            fatal=True,
        )
        return encode(expired)

    def accept(
        self,
        *,
        session_id: str,
        hub_time: float,
        bucket: RateLimiter | None = None,
        connect_urls: Sequence[str] = (),
    ) -> str:
        """The claim verified: AUTHENTICATING → OPEN; the welcome frame (heartbeat
        settings clamped to the limits). ``bucket`` limits this connection's publishes;
        ``connect_urls`` (the cluster's other hubs) go into the welcome when not empty."""
        self._expect(ConnectionState.AUTHENTICATING, "accept")
        claim = self.claim
        if claim is None:  # the first frame was refused (HandshakeRefused): refuse() it
            raise LocalProtocolError(
                "invalid_state", "cannot accept a handshake whose first frame was refused"
            )
        limits = self.limits
        if isinstance(claim, Auth):
            self.tenant_id, self.agent_id = claim.tenant_id, claim.agent_id
            if claim.heartbeat_interval is not None:
                interval = _clamp(
                    claim.heartbeat_interval, limits.min_heartbeat_interval,
                    limits.max_heartbeat_interval,
                )  # fmt: skip
                multiplier = _clamp(
                    claim.heartbeat_timeout_multiplier, limits.min_timeout_multiplier,
                    limits.max_timeout_multiplier,
                )  # fmt: skip
                self.heartbeat_interval = interval
                self.heartbeat_timeout = interval * multiplier
        elif isinstance(claim, AdminAuth):
            self.tenant_id, self.agent_id = "*", ADMIN_AGENT_ID
        self.session_id = session_id
        self._bucket = bucket
        self.state = ConnectionState.OPEN
        welcome = Welcome(
            session_id=session_id,
            agent_id=self.agent_id,
            tenant_id=self.tenant_id,
            hub_id=limits.hub_id,
            hub_time=hub_time,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_timeout=self.heartbeat_timeout,
            max_frame_bytes=limits.max_frame_bytes,
            connect_urls=tuple(connect_urls) or None,
        )
        return encode(welcome)

    # --- an open connection ------------------------------------------------------

    def receive_text(self, text: str | bytes, now: float) -> ServerEvent:
        """One frame from the peer of an OPEN connection, as one event."""
        self._expect(ConnectionState.OPEN, "receive_text")
        raw_id = None
        try:
            frame, raw_id = decode_with_id(text, max_bytes=self.limits.max_frame_bytes)
            return self._policy(frame, raw_id)
        except RemoteProtocolError as exc:
            return self.refusal(exc, raw_id)

    def refusal(self, exc: ProtocolError, frame_id: str | None = None) -> FrameRefused:
        """The non-fatal ``error`` answering a refused frame (``frame_id`` when the error
        names none)."""
        error_id = exc.frame_id if exc.frame_id is not None else frame_id
        error = Error(code=exc.code, message=exc.message, id=error_id)
        return FrameRefused(error, encode(error))

    def _policy(self, frame: Frame, raw_id: str | None) -> ServerEvent:
        if frame.type not in CLIENT_FRAME_TYPES:
            raise RemoteProtocolError(
                "unexpected_type", f"a hub does not accept {frame.type!r} frames", frame_id=raw_id
            )
        if isinstance(frame, Publish):
            return PublishRequested(frame, _check_publish(self, frame))
        if isinstance(frame, Heartbeat):
            return HeartbeatReceived(frame)
        if isinstance(frame, Subscribe):
            return SubscribeRequested(frame, _check_subscribe(self, frame))
        if isinstance(frame, Unsubscribe):
            return UnsubscribeRequested(frame)
        if isinstance(frame, PresenceQuery):
            return PresenceRequested(frame)
        if isinstance(frame, Leave):
            self.left = True  # the driver answers with close(NORMAL, "left")
            return LeaveRequested(frame.reason)
        if isinstance(frame, Error):
            return PeerError(frame.code, frame.message)
        # auth, admin_auth
        raise RemoteProtocolError(
            "already_authenticated", "this connection is already authenticated"
        )

    @property
    def reply_prefix(self) -> str:
        """The one reserved prefix this connection may name as ``reply_to``."""
        return f"{REPLY_PREFIX}.{self.session_id}."

    def admit_publish(self, frame: Publish, now: float) -> str:
        """Take a publish token and encode the data once; the data as JSON text.

        Raises :class:`RemoteProtocolError` ``rate_limited`` (over the rate) or
        ``invalid_field`` (a number out of range, data nested too deeply)."""
        self._expect(ConnectionState.OPEN, "admit_publish")
        if self._bucket is not None and not self._bucket.take(now):
            raise RemoteProtocolError(
                "rate_limited",
                f"publish rate above {self.limits.publish_rate:g}/s; slow down and retry",
                frame_id=frame.id,
            )
        try:
            return dumps_compact(frame.data)
        except (ValueError, RecursionError):  # e.g. 1e999, parsed as infinity
            raise RemoteProtocolError(
                "invalid_field",
                "data holds a number out of range or is nested too deeply",
                frame_id=frame.id,
            ) from None

    # --- closing -----------------------------------------------------------------

    def close(self, code: int, reason: str) -> bool:
        """Decide to close with ``code``: → CLOSING. The first decision wins; whether
        this call made it."""
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return False
        self._closing(code, reason)
        return True

    def connection_closed(self) -> None:
        """The socket is closed (either side, or lost): → CLOSED."""
        self.state = ConnectionState.CLOSED

    @property
    def closing(self) -> bool:
        """Whether a close was decided (or the connection is gone)."""
        return self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED)

    def _closing(self, code: int, reason: str) -> None:
        if self.state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
            return
        self.state = ConnectionState.CLOSING
        self.close_code = code
        self.close_reason = reason

    def _expect(self, state: ConnectionState, what: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(
                "invalid_state", f"{what} needs a {state.name} connection, not {self.state.name}"
            )


def _check_subscribe(conn: ServerConnection, frame: Subscribe) -> bool:
    """The subscribe rules of one connection; whether ``frame`` adds a pattern."""
    pattern = frame.subject
    if conn.is_admin and pattern != ADMIN_PATTERN:
        raise RemoteProtocolError(
            "forbidden_subject",
            f"the admin channel can only subscribe to {ADMIN_PATTERN}",
            frame_id=frame.id,
        )
    if is_reserved(pattern) and not pattern.startswith(f"{PRESENCE_PREFIX}."):
        raise RemoteProtocolError(
            "forbidden_subject",
            f"{pattern!r} is reserved; only {PRESENCE_PREFIX}.* may be subscribed to",
            frame_id=frame.id,
        )
    if pattern in conn.subscriptions:
        return False
    if len(conn.subscriptions) >= conn.limits.max_subscriptions:
        raise RemoteProtocolError(
            "too_many_subscriptions",
            f"at most {conn.limits.max_subscriptions} subscriptions per connection",
            frame_id=frame.id,
        )
    return True


def _check_publish(conn: ServerConnection, frame: Publish) -> bool:
    """The subject rules of one connection's publish; whether it answers a request."""
    if conn.is_admin:
        raise RemoteProtocolError(
            "forbidden_subject", "the admin channel cannot publish", frame_id=frame.id
        )
    subject = frame.subject
    is_reply = subject.startswith(f"{REPLY_PREFIX}.")
    if is_reserved(subject) and not is_reply:
        raise RemoteProtocolError(
            "forbidden_subject",
            f"{subject!r} is reserved for the hub; agents may not publish to it",
            frame_id=frame.id,
        )
    reply_to = frame.reply_to
    if reply_to is not None and is_reserved(reply_to):
        own = conn.reply_prefix
        if not reply_to.startswith(own):
            raise RemoteProtocolError(
                "forbidden_subject",
                f"reply_to must be a normal subject or under {own}",
                frame_id=frame.id,
            )
    return is_reply
