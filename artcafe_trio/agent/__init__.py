"""The agent: a connection supervisor, outbox, subscriptions and dispatch behind
:class:`Agent`, and the ArtCafe SDK-compatible :class:`HeartbeatAgent`/:class:`SimpleAgent`.

Import the public names from :mod:`artcafe_trio`; this subpackage is the implementation.
"""

from __future__ import annotations

from ._agent import Agent, AgentHealth, open_agent
from ._compat import HeartbeatAgent, SimpleAgent

__all__ = ["Agent", "AgentHealth", "HeartbeatAgent", "SimpleAgent", "open_agent"]
