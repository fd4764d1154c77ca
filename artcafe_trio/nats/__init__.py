"""A trio-native NATS client: core protocol, reconnect, and a JetStream key-value subset.

``artcafe_trio.nats`` imports neither the hub nor the agent. The sans-IO
protocol core lives in :mod:`artcafe_trio.nats._protocol` (no trio); the
driver is :func:`open_nats`. See ``docs/nats.md``.
"""

from __future__ import annotations

from ._client import (
    AsyncServerError,
    Dialer,
    Disconnected,
    LameDuckMode,
    NatsClient,
    NatsEvent,
    Reconnected,
    ServersDiscovered,
    SlowConsumer,
    Subscription,
    new_inbox,
    open_nats,
)
from ._errors import (
    BadSubjectError,
    BucketNotFoundError,
    JetStreamError,
    KeyExistsError,
    MaxPayloadExceeded,
    NatsAuthError,
    NatsClosed,
    NatsConnectError,
    NatsConnectionLost,
    NatsError,
    NatsProtocolError,
    NatsReconnectFailed,
    NatsServerError,
    NatsTimeoutError,
    NoRespondersError,
    OutboundBufferFull,
    WrongLastRevisionError,
)
from ._kv import KeyValue, KvEntry, KvOp, KvWatcher, key_value
from ._protocol import Headers, Msg

__all__ = [
    "AsyncServerError",
    "BadSubjectError",
    "BucketNotFoundError",
    "Dialer",
    "Disconnected",
    "Headers",
    "JetStreamError",
    "KeyExistsError",
    "KeyValue",
    "KvEntry",
    "KvOp",
    "KvWatcher",
    "LameDuckMode",
    "MaxPayloadExceeded",
    "Msg",
    "NatsAuthError",
    "NatsClient",
    "NatsClosed",
    "NatsConnectError",
    "NatsConnectionLost",
    "NatsError",
    "NatsEvent",
    "NatsProtocolError",
    "NatsReconnectFailed",
    "NatsServerError",
    "NatsTimeoutError",
    "NoRespondersError",
    "OutboundBufferFull",
    "Reconnected",
    "ServersDiscovered",
    "SlowConsumer",
    "Subscription",
    "WrongLastRevisionError",
    "key_value",
    "new_inbox",
    "open_nats",
]
