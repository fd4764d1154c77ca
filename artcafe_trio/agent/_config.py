"""The agent's validated settings (what ``open_agent``'s keywords become)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

import attrs

from ..protocol._backoff import Backoff
from ..protocol._heartbeats import MAX_HEARTBEAT_JITTER

__all__ = ["DEFAULT_URL", "MAX_URLS", "AgentConfig", "check_url", "hub_urls"]

DEFAULT_URL = "ws://127.0.0.1:8765"
MAX_URLS = 16
"""The most hub URLs an agent fails over through: the configured ones first, then
those the hubs advertise (``welcome.connect_urls``) up to this bound."""


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


def check_url(url: object) -> str:
    """``url`` without its trailing ``/``; ValueError unless it is ``ws://host[:port]``
    or ``wss://host[:port]`` (with an optional path)."""
    if not isinstance(url, str):
        raise ValueError(f"a hub url must be a string, got {url!r}")
    try:
        split = urlsplit(url)
        split.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"bad hub url {url!r}: {exc}") from None
    if split.scheme not in ("ws", "wss") or not split.hostname:
        raise ValueError(f"hub url must look like ws://host:port or wss://host:port, got {url!r}")
    return url.rstrip("/")


def hub_urls(value: str | Sequence[str]) -> tuple[str, ...]:
    """One URL, or a sequence of them (comma-separated in one string also works):
    checked, de-duplicated, in order."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    urls: list[str] = []
    for url in value:
        checked = check_url(url)
        if checked not in urls:
            urls.append(checked)
    if not urls:
        raise ValueError("give at least one hub url")
    if len(urls) > MAX_URLS:
        raise ValueError(f"give at most {MAX_URLS} hub urls, got {len(urls)}")
    return tuple(urls)


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen(kw_only=True)
class AgentConfig:
    """Every setting of one agent, checked when it is built."""

    agent_id: str
    tenant_id: str
    urls: tuple[str, ...] = attrs.field(default=(DEFAULT_URL,), converter=hub_urls)
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
    def url(self) -> str:
        """The first configured hub URL."""
        return self.urls[0]

    @property
    def resource(self) -> str:
        """The hub's agent endpoint for this agent."""
        agent, tenant = quote(self.agent_id, safe=""), quote(self.tenant_id, safe="")
        return f"/api/v1/ws/agent/{agent}?tenant_id={tenant}"
