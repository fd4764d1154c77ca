"""The client side of protocol v1 as a sans-IO state machine, in the style of h11.

:class:`ClientConnection` holds one connection's protocol state: the handshake
(challenge → signed ``auth`` or ``admin_auth`` → ``welcome`` or refusal), which
request ids wait for which answer (subscribe, unsubscribe, presence queries,
publish confirmations, request/reply tokens), heartbeat sequence numbers, the
round-trip time and the ACK deadline. It does no I/O: the caller writes the
texts it returns, feeds it the texts it reads with :meth:`ClientConnection.receive`
and acts on the events that come back. Time is an argument (``now``), never read.

States and the one method that makes each transition::

    AWAITING_CHALLENGE ──receive(challenge)──▶ CHALLENGED ──auth()──▶ AWAITING_WELCOME
            │                                    │                        │    │
            │ bad frame                          │ any frame   refusal,   │    │ receive(welcome)
            ▼                                    ▼             bad frame  │    ▼
          ERROR ◀────────────────────────────────┴────────────────────────┘   OPEN
                                                                        leave() │    │ closed()
                                                                                ▼    │
                                                   (receives, sends nothing) LEAVING │
                                                                       closed() │    │
                                                                                ▼    ▼
                                                                                CLOSED

:meth:`ClientConnection.closed` (the transport ended) moves any state but ``ERROR``
to ``CLOSED`` and abandons every outstanding request.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

import attrs

from .._errors import AuthenticationError, HubError, LocalProtocolError, RemoteProtocolError
from ._frames import (
    AdminAuth,
    Auth,
    Challenge,
    Error,
    Frame,
    Heartbeat,
    HeartbeatAck,
    Leave,
    Message,
    PresenceQuery,
    PresenceRecord,
    PresenceState,
    Publish,
    Published,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    decode,
    encode,
)
from ._keys import PrivateKey

__all__ = [
    "AUTH_REFUSALS",
    "AdminCredentials",
    "AgentCredentials",
    "Answer",
    "ChallengeReceived",
    "ClientConnection",
    "ClientEvent",
    "ClientState",
    "HeartbeatAcked",
    "HubErrorReceived",
    "IdAllocator",
    "MessageReceived",
    "PresenceAnswered",
    "PublishConfirmed",
    "PublishRefused",
    "ReplyAbandoned",
    "ReplyReceived",
    "Request",
    "RequestAbandoned",
    "RequestRefused",
    "SubscribeConfirmed",
    "UnexpectedFrame",
    "UnsubscribeConfirmed",
    "Welcomed",
]

AUTH_REFUSALS = frozenset({"authentication_failed", "unsupported_protocol"})
"""``error`` codes that answer an ``auth`` with a refusal of the credentials."""
REPLY_PREFIX = "$reply."
HEARTBEATS_TRACKED = 16
"""Heartbeats whose send time is kept for the RTT (older ones are forgotten)."""
RTT_GAIN = 0.125
"""Weight of a new sample in the smoothed RTT (as TCP's SRTT)."""


class ClientState(enum.Enum):
    """Where a :class:`ClientConnection` is in its life."""

    AWAITING_CHALLENGE = "awaiting_challenge"
    CHALLENGED = "challenged"
    AWAITING_WELCOME = "awaiting_welcome"
    OPEN = "open"
    LEAVING = "leaving"
    CLOSED = "closed"
    ERROR = "error"


_TRANSITIONS: Mapping[ClientState, frozenset[ClientState]] = {
    ClientState.AWAITING_CHALLENGE: frozenset({ClientState.CHALLENGED}),
    ClientState.CHALLENGED: frozenset({ClientState.AWAITING_WELCOME}),
    ClientState.AWAITING_WELCOME: frozenset({ClientState.OPEN}),
    ClientState.OPEN: frozenset({ClientState.LEAVING, ClientState.CLOSED}),
    ClientState.LEAVING: frozenset({ClientState.CLOSED}),
    ClientState.CLOSED: frozenset(),
    ClientState.ERROR: frozenset(),
}
"""Forward transitions; any state but ``ERROR`` may also end in ``CLOSED``, and a
handshake state in ``ERROR``."""


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen
class AgentCredentials:
    """Who an agent is and what it asks of the hub (the ``auth`` frame)."""

    agent_id: str
    tenant_id: str
    private_key: PrivateKey
    heartbeat_interval: float | None = 30.0
    heartbeat_timeout_multiplier: float = 3.0
    capabilities: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    metadata: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class AdminCredentials:
    """An admin client (the CLI's ``status``, the dashboard): the hub's admin token."""

    token: str = attrs.field(repr=False)


Credentials: TypeAlias = AgentCredentials | AdminCredentials


class IdAllocator:
    """Frame ids ``<prefix>-1``, ``<prefix>-2``...; one allocator may outlive many
    connections (a publish keeps its id when it is re-sent after a reconnect)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}-{next(self._counter)}"


@attrs.frozen
class Request:
    """A request to send: write ``text``; its answer will name ``id``."""

    id: str
    text: str


# --- events ------------------------------------------------------------------------


@attrs.frozen
class ChallengeReceived:
    """The hub's challenge came: call :meth:`ClientConnection.auth` and send the text."""

    challenge: Challenge


@attrs.frozen
class Welcomed:
    """The hub accepted the credentials: the connection is ``OPEN``."""

    welcome: Welcome


@attrs.frozen
class MessageReceived:
    """A message for one of this connection's subscriptions."""

    message: Message


@attrs.frozen
class ReplyReceived:
    """The first reply to the request published with ``token``."""

    token: str
    message: Message


@attrs.frozen
class PublishConfirmed:
    id: str
    message_id: str
    duplicate: bool


@attrs.frozen
class PublishRefused:
    id: str
    error: HubError


@attrs.frozen
class SubscribeConfirmed:
    id: str
    pattern: str


@attrs.frozen
class UnsubscribeConfirmed:
    id: str
    pattern: str


@attrs.frozen
class PresenceAnswered:
    id: str
    records: tuple[PresenceRecord, ...]
    degraded: tuple[str, ...] = ()  # presence_state.degraded (a fenced cluster hub)


@attrs.frozen
class RequestRefused:
    """The hub answered a subscribe, unsubscribe or presence query with an error."""

    id: str
    error: HubError


@attrs.frozen
class RequestAbandoned:
    """The connection closed before the hub answered request ``id``."""

    id: str


@attrs.frozen
class ReplyAbandoned:
    """The connection closed before a reply to ``token`` came."""

    token: str


@attrs.frozen
class HeartbeatAcked:
    """A heartbeat ACK; ``rtt`` is None when its heartbeat is no longer tracked.
    ``deadline`` is the new ACK deadline (None without a heartbeat timeout)."""

    seq: int
    rtt: float | None
    rtt_smoothed: float | None
    deadline: float | None


@attrs.frozen
class HubErrorReceived:
    """An ``error`` frame that answers nothing outstanding."""

    error: Error


@attrs.frozen
class UnexpectedFrame:
    """A valid frame the open connection does not expect (it is ignored)."""

    frame: Frame


Answer: TypeAlias = SubscribeConfirmed | UnsubscribeConfirmed | PresenceAnswered | RequestRefused
ClientEvent: TypeAlias = (
    ChallengeReceived
    | Welcomed
    | MessageReceived
    | ReplyReceived
    | PublishConfirmed
    | PublishRefused
    | SubscribeConfirmed
    | UnsubscribeConfirmed
    | PresenceAnswered
    | RequestRefused
    | RequestAbandoned
    | ReplyAbandoned
    | HeartbeatAcked
    | HubErrorReceived
    | UnexpectedFrame
)


class ClientConnection:
    """One client connection's protocol state (see the module docstring).

    ``ids`` allocates request ids (pass the same allocator to every connection of one
    client); ``rtt_smoothed`` seeds the smoothed RTT from a previous connection.
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        ids: IdAllocator | None = None,
        max_receive_bytes: int = 64 * 1024 * 1024,
        rtt_smoothed: float | None = None,
    ) -> None:
        self.credentials = credentials
        self.ids = ids or IdAllocator("c")
        self.max_receive_bytes = max_receive_bytes
        self.state = ClientState.AWAITING_CHALLENGE
        self.challenge: Challenge | None = None
        self.welcome: Welcome | None = None
        self.rtt: float | None = None
        self.rtt_smoothed = rtt_smoothed
        self.last_ack: float | None = None
        self.ack_deadline: float | None = None
        self._requests: dict[str, Subscribe | Unsubscribe | PresenceQuery] = {}
        self._publishes: set[str] = set()
        self._reply_tokens: set[str] = set()
        self._heartbeats: dict[int, float] = {}
        self._seq = itertools.count(1)

    def __repr__(self) -> str:
        return f"<ClientConnection {self.state.value}>"

    # --- state ---------------------------------------------------------------------

    def _transition(self, new: ClientState) -> None:
        """The one place the state changes."""
        old = self.state
        allowed = _TRANSITIONS[old]
        handshake = old in (
            ClientState.AWAITING_CHALLENGE,
            ClientState.CHALLENGED,
            ClientState.AWAITING_WELCOME,
        )
        if not (
            new in allowed
            or (new is ClientState.CLOSED and old is not ClientState.ERROR)
            or (new is ClientState.ERROR and handshake)
        ):
            raise LocalProtocolError("bad_state", f"cannot go from {old.value} to {new.value}")
        self.state = new

    def _require_open(self, what: str) -> Welcome:
        if self.state is not ClientState.OPEN or self.welcome is None:
            raise LocalProtocolError(
                "not_open", f"cannot {what}: the connection is {self.state.value}"
            )
        return self.welcome

    def _fail(self, code: str, message: str) -> RemoteProtocolError:
        self._transition(ClientState.ERROR)
        return RemoteProtocolError(code, message)

    @property
    def session_id(self) -> str | None:
        return None if self.welcome is None else self.welcome.session_id

    @property
    def heartbeat_interval(self) -> float | None:
        return None if self.welcome is None else self.welcome.heartbeat_interval

    @property
    def heartbeat_timeout(self) -> float | None:
        return None if self.welcome is None else self.welcome.heartbeat_timeout

    @property
    def max_frame_bytes(self) -> int | None:
        return None if self.welcome is None else self.welcome.max_frame_bytes

    @property
    def connect_urls(self) -> tuple[str, ...]:
        """The other hubs' URLs the welcome advertised (``()``: none, or no welcome yet)."""
        return () if self.welcome is None else self.welcome.connect_urls or ()

    # --- handshake -----------------------------------------------------------------

    def auth(self) -> str:
        """The ``auth`` (or ``admin_auth``) frame answering the challenge."""
        if self.state is not ClientState.CHALLENGED or self.challenge is None:
            raise LocalProtocolError("bad_state", f"no challenge to answer ({self.state.value})")
        creds = self.credentials
        frame: Frame
        if isinstance(creds, AdminCredentials):
            frame = AdminAuth(token=creds.token)
        else:
            signature = creds.private_key.sign_auth(
                tenant_id=creds.tenant_id, agent_id=creds.agent_id, nonce=self.challenge.nonce
            )
            frame = Auth(
                agent_id=creds.agent_id,
                tenant_id=creds.tenant_id,
                algorithm=creds.private_key.algorithm,
                signature=signature,
                heartbeat_interval=creds.heartbeat_interval,
                heartbeat_timeout_multiplier=creds.heartbeat_timeout_multiplier,
                capabilities=creds.capabilities,
                metadata=dict(creds.metadata),
            )
        self._transition(ClientState.AWAITING_WELCOME)
        return encode(frame)

    def _receive_handshake(self, frame: Frame, now: float) -> list[ClientEvent]:
        if self.state is ClientState.AWAITING_CHALLENGE:
            if not isinstance(frame, Challenge):
                raise self._fail(
                    "unexpected_frame", f"expected a challenge from the hub, got {frame!r}"
                )
            self.challenge = frame
            self._transition(ClientState.CHALLENGED)
            return [ChallengeReceived(frame)]
        if self.state is ClientState.CHALLENGED:
            raise self._fail("unexpected_frame", f"the hub sent {frame.type!r} before our auth")
        if isinstance(frame, Error):
            self._transition(ClientState.ERROR)
            raise self._refusal(frame)
        if not isinstance(frame, Welcome):
            raise self._fail("unexpected_frame", f"expected a welcome from the hub, got {frame!r}")
        self.welcome = frame
        if frame.heartbeat_timeout is not None:
            self.ack_deadline = now + frame.heartbeat_timeout
        self._transition(ClientState.OPEN)
        return [Welcomed(frame)]

    def _refusal(self, frame: Error) -> AuthenticationError | HubError:
        creds = self.credentials
        if isinstance(creds, AdminCredentials):
            return AuthenticationError(
                f"the hub refused the admin token: {frame.message}", code=frame.code
            )
        if frame.code in AUTH_REFUSALS:
            return AuthenticationError(
                f"the hub refused agent {creds.agent_id!r} of tenant {creds.tenant_id!r}: "
                f"{frame.message}",
                code=frame.code,
            )
        return HubError(frame.code, frame.message)

    # --- receiving -----------------------------------------------------------------

    def receive(self, text: str | bytes, now: float) -> list[ClientEvent]:
        """Feed one frame's text; return what it means.

        During the handshake a bad or unexpected frame raises
        :class:`RemoteProtocolError` and a refusal :class:`AuthenticationError` (or
        :class:`HubError` for another ``error`` code); the state is then ``ERROR``.
        When open, an undecodable frame raises :class:`RemoteProtocolError` and the
        state is unchanged: the caller may ignore it.
        """
        if self.state in (ClientState.CLOSED, ClientState.ERROR):
            raise LocalProtocolError(
                "bad_state", f"cannot receive: the connection is {self.state.value}"
            )
        try:
            frame = decode(text, max_bytes=self.max_receive_bytes)
        except RemoteProtocolError as exc:
            if self.state not in (ClientState.OPEN, ClientState.LEAVING):
                self._transition(ClientState.ERROR)
            raise exc from None
        if self.state not in (ClientState.OPEN, ClientState.LEAVING):
            return self._receive_handshake(frame, now)
        return self._receive_open(frame, now)

    def _receive_open(self, frame: Frame, now: float) -> list[ClientEvent]:
        if isinstance(frame, HeartbeatAck):
            return [self._acked(frame.seq, now)]
        if isinstance(frame, Message):
            if frame.subject.startswith(REPLY_PREFIX):
                token = frame.subject.rsplit(".", 1)[-1]
                if token in self._reply_tokens:
                    self._reply_tokens.discard(token)
                    return [ReplyReceived(token, frame)]
                return []  # a late or second reply: dropped
            return [MessageReceived(frame)]
        if isinstance(frame, Published):
            if frame.id in self._publishes:
                self._publishes.discard(frame.id)
                return [PublishConfirmed(frame.id, frame.message_id, frame.duplicate)]
            return []
        if isinstance(frame, Subscribed | Unsubscribed | PresenceState):
            request = self._requests.pop(frame.id, None)
            if request is None:
                return []
            if isinstance(frame, Subscribed):
                return [SubscribeConfirmed(frame.id, frame.subject)]
            if isinstance(frame, Unsubscribed):
                return [UnsubscribeConfirmed(frame.id, frame.subject)]
            return [PresenceAnswered(frame.id, frame.agents, frame.degraded or ())]
        if isinstance(frame, Error):
            if frame.id is not None and self._requests.pop(frame.id, None) is not None:
                return [RequestRefused(frame.id, HubError(frame.code, frame.message))]
            if frame.id is not None and frame.id in self._publishes:
                self._publishes.discard(frame.id)
                return [PublishRefused(frame.id, HubError(frame.code, frame.message))]
            return [HubErrorReceived(frame)]
        return [UnexpectedFrame(frame)]

    def _acked(self, seq: int, now: float) -> HeartbeatAcked:
        sent = self._heartbeats.pop(seq, None)
        rtt = None
        if sent is not None:
            rtt = self.rtt = now - sent
            smoothed = self.rtt_smoothed
            self.rtt_smoothed = rtt if smoothed is None else smoothed + RTT_GAIN * (rtt - smoothed)
        self.last_ack = now
        timeout = self.heartbeat_timeout
        if timeout is not None:
            self.ack_deadline = now + timeout
        return HeartbeatAcked(seq, rtt, self.rtt_smoothed, self.ack_deadline)

    # --- sending -------------------------------------------------------------------

    def heartbeat(self, now: float) -> str:
        """The next heartbeat (its send time is kept for the RTT)."""
        self._require_open("send a heartbeat")
        seq = next(self._seq)
        self._heartbeats[seq] = now
        if len(self._heartbeats) > HEARTBEATS_TRACKED:
            del self._heartbeats[min(self._heartbeats)]
        return encode(Heartbeat(seq=seq, rtt=self.rtt_smoothed))

    def publish(
        self,
        subject: str,
        data: Any = None,
        *,
        frame_id: str | None = None,
        reply_to: str | None = None,
        reply_token: str | None = None,
        encoded: str | None = None,
        reply_from: tuple[str, ...] | None = None,
    ) -> Request:
        """A ``publish`` the hub will confirm (``PublishConfirmed``/``PublishRefused``).

        ``frame_id`` re-sends a publish under its id (de-duplicated); ``reply_token``
        makes it a request to this session's inbox, answered (by ``reply_from`` only,
        if given) as ``ReplyReceived(token)``; ``encoded``: its text, if already made.
        """
        welcome = self._require_open("publish")
        frame_id = frame_id or self.ids.next()
        if reply_token is not None:
            reply_to = f"{REPLY_PREFIX}{welcome.session_id}.{reply_token}"
        if encoded is None or reply_token is not None:
            frame = Publish(subject=subject, data=data, id=frame_id, reply_to=reply_to)
            encoded = encode(attrs.evolve(frame, reply_from=reply_from))
        self._publishes.add(frame_id)
        if reply_token is not None:
            self._reply_tokens.add(reply_token)
        return Request(frame_id, encoded)

    def subscribe(self, pattern: str) -> Request:
        return self._request("subscribe", Subscribe(id=self.ids.next(), subject=pattern))

    def unsubscribe(self, pattern: str) -> Request:
        return self._request("unsubscribe", Unsubscribe(id=self.ids.next(), subject=pattern))

    def presence_query(self) -> Request:
        return self._request("query presence", PresenceQuery(id=self.ids.next()))

    def _request(self, what: str, frame: Subscribe | Unsubscribe | PresenceQuery) -> Request:
        self._require_open(what)
        text = encode(frame)
        self._requests[frame.id] = frame
        return Request(frame.id, text)

    def forget(self, request_id: str) -> None:
        """Stop waiting for ``request_id`` (its answer, if it comes, is then ignored)."""
        self._requests.pop(request_id, None)

    def leave(self, reason: str | None = None) -> str:
        """The ``leave`` frame; the connection is then ``LEAVING``: nothing more is sent,
        what the hub still sends before it closes is received as usual."""
        self._require_open("leave")
        self._transition(ClientState.LEAVING)
        return encode(Leave(reason=reason))

    def closed(self) -> list[ClientEvent]:
        """The transport ended (or we left): abandon every outstanding request."""
        if self.state is ClientState.ERROR:
            return []
        if self.state is not ClientState.CLOSED:
            self._transition(ClientState.CLOSED)
        events: list[ClientEvent] = [RequestAbandoned(i) for i in self._requests]
        events += [ReplyAbandoned(t) for t in sorted(self._reply_tokens)]
        self._requests.clear()
        self._reply_tokens.clear()
        self._publishes.clear()
        return events
