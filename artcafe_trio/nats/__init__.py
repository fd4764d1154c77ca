"""A trio-native NATS client: core protocol, reconnect, and a JetStream key-value subset.

``artcafe_trio.nats`` imports neither the hub nor the agent. The errors and
the sans-IO protocol core (:mod:`artcafe_trio.nats._protocol`) import no trio;
the driver (:func:`open_nats`) and the key-value names load on first use.
See ``docs/nats.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
from ._protocol import Headers, Msg

if TYPE_CHECKING:
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
    from ._kv import KeyValue, KvEntry, KvOp, KvWatcher, key_value

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

_LAZY = {
    **dict.fromkeys(
        [
            "AsyncServerError",
            "Dialer",
            "Disconnected",
            "LameDuckMode",
            "NatsClient",
            "NatsEvent",
            "Reconnected",
            "ServersDiscovered",
            "SlowConsumer",
            "Subscription",
            "new_inbox",
            "open_nats",
        ],
        "_client",
    ),
    **dict.fromkeys(["KeyValue", "KvEntry", "KvOp", "KvWatcher", "key_value"], "_kv"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'artcafe_trio.nats' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
