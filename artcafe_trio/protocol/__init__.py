"""The sans-IO protocol core: frames, subjects, keys and signatures, backoff, and the
two connection state machines.

- :class:`ClientConnection` (:mod:`artcafe_trio.protocol.client`): an agent's or an
  admin client's side of one connection — handshake, request ids, confirmations,
  heartbeats and RTT. The agent and the CLI's ``status`` drive it.
- :class:`ServerConnection` (:mod:`artcafe_trio.protocol.server`): the hub's side —
  challenge, first-frame judgement, welcome, per-connection frame policy. The hub's
  connection pump drives it.

Both are fed frame texts and give back frame texts and events; every method that
needs time takes ``now``. Importing this package does not import trio or any socket
library, so a compatible client or hub in another framework can reuse it.
"""

from __future__ import annotations

from ._backoff import Backoff
from ._codes import CloseCode
from ._frames import (
    CLIENT_FRAME_TYPES,
    DEFAULT_MAX_FRAME_BYTES,
    FRAME_TYPES,
    PROTOCOL_VERSION,
    AdminAuth,
    Auth,
    Challenge,
    Error,
    Frame,
    Heartbeat,
    HeartbeatAck,
    Leave,
    Message,
    PresenceEvent,
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
    decode_with_id,
    encode,
    encode_message,
)
from ._keys import (
    ALGORITHM_ED25519,
    ALGORITHM_RSA,
    AUTH_LABEL,
    PrivateKey,
    PublicKey,
    auth_payload,
    generate_private_key,
    load_private_key,
    load_private_key_bytes,
    load_public_key,
    parse_public_key,
)
from ._subjects import (
    MAX_SUBJECT_LENGTH,
    MAX_SUBJECT_TOKENS,
    SubjectIndex,
    is_reserved,
    subject_matches,
    validate_pattern,
    validate_subject,
)
from .client import AdminCredentials, AgentCredentials, ClientConnection, ClientState
from .server import ConnectionState, ServerConnection, ServerLimits

__all__ = [
    "ALGORITHM_ED25519",
    "ALGORITHM_RSA",
    "AUTH_LABEL",
    "CLIENT_FRAME_TYPES",
    "DEFAULT_MAX_FRAME_BYTES",
    "FRAME_TYPES",
    "MAX_SUBJECT_LENGTH",
    "MAX_SUBJECT_TOKENS",
    "PROTOCOL_VERSION",
    "AdminAuth",
    "AdminCredentials",
    "AgentCredentials",
    "Auth",
    "Backoff",
    "Challenge",
    "ClientConnection",
    "ClientState",
    "CloseCode",
    "ConnectionState",
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
    "PrivateKey",
    "PublicKey",
    "Publish",
    "Published",
    "ServerConnection",
    "ServerLimits",
    "SubjectIndex",
    "Subscribe",
    "Subscribed",
    "Unsubscribe",
    "Unsubscribed",
    "Welcome",
    "auth_payload",
    "decode",
    "decode_with_id",
    "encode",
    "encode_message",
    "generate_private_key",
    "is_reserved",
    "load_private_key",
    "load_private_key_bytes",
    "load_public_key",
    "parse_public_key",
    "subject_matches",
    "validate_pattern",
    "validate_subject",
]
