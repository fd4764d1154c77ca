"""The agent's validated settings (what ``open_agent``'s keywords become)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

import attrs

from ..protocol._backoff import Backoff
from ..protocol._heartbeats import MAX_HEARTBEAT_JITTER

__all__ = ["DEFAULT_URL", "AgentConfig"]

DEFAULT_URL = "ws://127.0.0.1:8765"


def _positive_or_none(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value <= 0:
        raise ValueError("heartbeat_interval must be > 0 (or None for no heartbeats)")


def _multiplier(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 1:
        raise ValueError("heartbeat_timeout_multiplier must be >= 1")


def _jitter(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value <= MAX_HEARTBEAT_JITTER:
        raise ValueError(
            f"heartbeat_jitter must be between 0 and {MAX_HEARTBEAT_JITTER:g}, got {value!r}"
        )


def _at_least_one(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1")


def _strip_slash(url: str) -> str:
    return url.rstrip("/")


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen(kw_only=True)
class AgentConfig:
    """Every setting of one agent, checked when it is built."""

    agent_id: str
    tenant_id: str
    url: str = attrs.field(default=DEFAULT_URL, converter=_strip_slash)
    heartbeat_interval: float | None = attrs.field(default=30.0, validator=_positive_or_none)
    heartbeat_timeout_multiplier: float = attrs.field(default=3.0, validator=_multiplier)
    heartbeat_jitter: float = attrs.field(default=0.1, validator=_jitter)
    auto_reconnect: bool = True
    retry_first_connect: bool = True
    backoff: Backoff = attrs.field(factory=Backoff)
    capabilities: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    metadata: Mapping[str, Any] = attrs.field(factory=dict, converter=dict)
    connect_timeout: float = 10.0
    stop_timeout: float = 10.0
    max_concurrent_handlers: int = attrs.field(default=1, validator=_at_least_one)
    max_pending_messages: int = 10_000
    max_pending_publishes: int = 10_000
    raise_handler_errors: bool = False

    @property
    def resource(self) -> str:
        """The hub's agent endpoint for this agent."""
        agent, tenant = quote(self.agent_id, safe=""), quote(self.tenant_id, safe="")
        return f"/api/v1/ws/agent/{agent}?tenant_id={tenant}"
