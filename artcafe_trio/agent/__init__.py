"""The agent: a connection supervisor, outbox, subscriptions and dispatch behind
:class:`Agent`, and the ArtCafe SDK-compatible :class:`HeartbeatAgent`/:class:`SimpleAgent`.

Import the public names from :mod:`artcafe_trio`; this subpackage is the implementation.
"""

from __future__ import annotations

from ._agent import Agent, AgentHealth, open_agent, run_agent
from ._compat import HeartbeatAgent, SimpleAgent
from ._health import AgentState
from ._subscriptions import FullMessageHandler, Handler, MessageHandler
from ._transport import DialerTransport, MemoryTransport, Transport, WebSocketTransport

__all__ = [
    "Agent",
    "AgentHealth",
    "AgentState",
    "DialerTransport",
    "FullMessageHandler",
    "Handler",
    "HeartbeatAgent",
    "MemoryTransport",
    "MessageHandler",
    "SimpleAgent",
    "Transport",
    "WebSocketTransport",
    "open_agent",
    "run_agent",
]
