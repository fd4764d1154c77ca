"""The hub's settings (:class:`HubConfig`) and counters (:class:`HubStats`)."""

from __future__ import annotations

import secrets

import attrs

from ..protocol._frames import DEFAULT_MAX_FRAME_BYTES

__all__ = ["HubConfig", "HubStats"]


@attrs.frozen
class HubConfig:
    """Hub settings. Every duration is in seconds.

    Heartbeat settings declared by agents are clamped to the ``min_``/``max_``
    bounds; the effective values are sent back in ``welcome``.
    """

    hub_id: str = attrs.field(factory=lambda: "hub-" + secrets.token_hex(4))
    challenge_timeout: float = 30.0
    min_heartbeat_interval: float = 0.5
    max_heartbeat_interval: float = 300.0
    min_timeout_multiplier: float = 1.5
    max_timeout_multiplier: float = 10.0
    disconnect_grace: float = 5.0
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_subscriptions: int = 1000
    send_queue_size: int = 1024
    send_queue_bytes: int = 16 * 1024 * 1024
    output_budget_bytes: int = 256 * 1024 * 1024
    reply_window: int = 256
    reply_window_bytes: int = 1024 * 1024
    write_stall_timeout: float = 60.0
    max_open_requests: int = 1024
    max_reply_grants: int = 1_000_000
    max_unauthenticated_per_address: int = 256
    max_unauthenticated: int = 1024
    handshake_timeout: float = 10.0
    publish_rate: float = 1000.0
    publish_burst: int = 2000
    dedupe_window: float = 600.0
    dedupe_max_ids: int = 10_000
    auth_failures_free: int = 3
    auth_failure_delay_cap: float = 10.0
    auth_failure_memory: float = 300.0
    registry_poll_interval: float = 0.5
    last_seen_flush_interval: float = 10.0
    close_timeout: float = 2.0
    refused_log_per_second: float = 5.0


@attrs.define
class HubStats:
    """Counters the hub keeps (exported as Prometheus metrics when enabled)."""

    connections: int = 0
    auth_failures: int = 0
    heartbeats: int = 0
    messages_routed: int = 0
    deliveries: int = 0
    slow_consumers: int = 0
    refused_frames: int = 0
    rate_limited: int = 0
    handshake_timeouts: int = 0
    transitions: dict[str, int] = attrs.field(factory=dict)
    registry_file_lost: int = 0  # 1 while the registry file at its path is not the one opened
    presence_writes_pending: int = 0
