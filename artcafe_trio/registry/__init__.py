"""The registry of tenants, agents and their public keys (SQLite), with presence history.

Imports no trio: the CLI and the hub share it. Import :class:`Registry` and
:class:`RegistryError` from :mod:`artcafe_trio`.
"""

from __future__ import annotations

from ._registry import AgentRecord, PresenceChange, Registry, RegistryError

__all__ = ["AgentRecord", "PresenceChange", "Registry", "RegistryError"]
