"""WebSocket close codes of protocol v1, shared by the hub and the agent (sans-IO)."""

from __future__ import annotations

import enum

__all__ = ["CloseCode"]


class CloseCode(enum.IntEnum):
    """Close codes the hub sends (see ``docs/protocol.md``). Members are ``int``s."""

    NORMAL = 1000
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    SERVICE_RESTART = 1012
    AUTHENTICATION_FAILED = 4001
    CHALLENGE_EXPIRED = 4002
    REPLACED = 4003
    SLOW_CONSUMER = 4004
    KEY_REVOKED = 4005
    PROTOCOL_VIOLATION = 4006
    HEARTBEAT_TIMEOUT = 4008
