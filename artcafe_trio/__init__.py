"""artcafe-trio: agents and a hub with honest presence, for trio.

The sans-IO protocol core (:mod:`artcafe_trio.protocol`) imports no trio;
the names that need trio (agent, hub) are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import (
    AgentClosed,
    ArtcafeError,
    AuthenticationError,
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    HeartbeatTimeout,
    HubError,
    KeyLoadError,
    LocalProtocolError,
    ProtocolError,
    ReconnectFailed,
    RemoteProtocolError,
    SessionReplaced,
)
from .protocol._backoff import Backoff
from .protocol._codes import CloseCode
from .protocol._frames import Message, PresenceEvent, PresenceRecord
from .protocol._keys import (
    PrivateKey,
    PublicKey,
    generate_private_key,
    load_private_key,
    parse_public_key,
)
from .registry._registry import Registry, RegistryError

if TYPE_CHECKING:
    from .agent import (
        Agent,
        AgentHealth,
        AgentState,
        FullMessageHandler,
        Handler,
        HeartbeatAgent,
        MessageHandler,
        SimpleAgent,
        Transport,
        open_agent,
        run_agent,
    )
    from .hub import Hub, HubConfig, open_hub, serve_hub

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentClosed",
    "AgentHealth",
    "AgentState",
    "ArtcafeError",
    "AuthenticationError",
    "Backoff",
    "CloseCode",
    "ConnectFailed",
    "ConnectTimeout",
    "ConnectionLost",
    "FullMessageHandler",
    "Handler",
    "HeartbeatAgent",
    "HeartbeatTimeout",
    "Hub",
    "HubConfig",
    "HubError",
    "KeyLoadError",
    "LocalProtocolError",
    "Message",
    "MessageHandler",
    "PresenceEvent",
    "PresenceRecord",
    "PrivateKey",
    "ProtocolError",
    "PublicKey",
    "ReconnectFailed",
    "Registry",
    "RegistryError",
    "RemoteProtocolError",
    "SessionReplaced",
    "SimpleAgent",
    "Transport",
    "generate_private_key",
    "load_private_key",
    "open_agent",
    "open_hub",
    "parse_public_key",
    "run_agent",
    "serve_hub",
]

# The names defined in the trio-free core report their public home too (tracebacks,
# reprs and pickles say ``artcafe_trio.ConnectionLost``); the lazy ones set it in
# their own subpackage.
for _name in __all__:
    _obj = globals().get(_name)
    if _obj is not None and getattr(_obj, "__module__", "").startswith("artcafe_trio."):
        _obj.__module__ = __name__
del _name, _obj

_LAZY = {
    "Agent": "agent",
    "AgentHealth": "agent",
    "AgentState": "agent",
    "FullMessageHandler": "agent",
    "Handler": "agent",
    "MessageHandler": "agent",
    "Transport": "agent",
    "open_agent": "agent",
    "run_agent": "agent",
    "HeartbeatAgent": "agent",
    "SimpleAgent": "agent",
    "Hub": "hub",
    "HubConfig": "hub",
    "open_hub": "hub",
    "serve_hub": "hub",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'artcafe_trio' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
