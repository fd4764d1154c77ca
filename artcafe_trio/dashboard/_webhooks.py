"""Alert webhooks: POST presence transitions to URLs, never stalling the hub.

Per webhook, a collector task takes the hub's events from a bounded
subscription, filters them, holds an ``offline`` until it has lasted
``min_offline`` seconds, and queues the JSON document in a bounded queue (a
full queue drops the document and counts it). A sender task POSTs queued
documents one by one, each attempt bounded by ``timeout``, retrying failures
(no answer, 5xx, 429) after full-jitter backoff (:class:`~artcafe_trio.Backoff`).

In a cluster every hub sees every transition, but only the hub that reports it
(``PresenceTransition.local``: the owner's hub, or the reaper of a lost hub for
``hub_lost``) posts it: one POST per transition, whichever hub the webhook is on.
The others still follow it (a blip ended on another hub is still a blip).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import math
import random
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from ..hub._hub import Hub
from ..hub._hubevents import PresenceTransition, Resync
from ..protocol._backoff import Backoff
from ._http import HttpError, post

__all__ = ["SIGNATURE_HEADER", "AlertFilter", "Webhook", "WebhookConfig", "WebhookStats", "sign"]

log = logging.getLogger("artcafe_trio.alerts")

SIGNATURE_HEADER = "X-Artcafe-Signature"
"""``sha256=<hex HMAC-SHA256 of the raw body with the secret>``."""

Post = Callable[..., Awaitable[int]]


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value for ``body``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@attrs.frozen
class AlertFilter:
    """Which transitions page anyone. Empty sets match everything."""

    reasons: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    """Offline reasons that alert (``disconnected``, ``timeout``, ``left``); an online
    transition passes when it ends an offline that was alerted."""
    tenants: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    min_offline: float = 0.0
    """An offline alerts only once it has lasted this long; a shorter blip sends nothing
    (neither the offline nor the online that ends it)."""

    def __attrs_post_init__(self) -> None:
        if not (math.isfinite(self.min_offline) and self.min_offline >= 0):
            raise ValueError("min_offline must be a finite number >= 0")


@attrs.frozen
class WebhookConfig:
    """One webhook: where to POST, how to sign, what to send, and its bounds."""

    url: str
    secret: bytes | None = None
    filter: AlertFilter = AlertFilter()
    queue_size: int = 1000
    timeout: float = 5.0
    """Bound of one POST attempt (connect, send, answer)."""
    backoff: Backoff = Backoff(base=0.5, cap=30.0, max_attempts=6)
    """Retries of one document; ``max_attempts`` retries after the first try."""
    ssl_context: ssl.SSLContext | None = None


@attrs.define
class WebhookStats:
    """Counters of one webhook (``Webhook.stats``)."""

    queued: int = 0
    sent: int = 0
    failed: int = 0
    """Documents given up on (retries exhausted, or a 4xx answer)."""
    dropped: int = 0
    """Documents not queued because the queue was full (or events the feed lost)."""
    retries: int = 0
    held: int = 0
    """Offline blips shorter than ``min_offline`` that sent nothing."""
    elsewhere: int = 0
    """Documents not sent because another hub of the cluster reports the transition."""


class Webhook:
    """One alert webhook for a hub. Run :meth:`run` in a nursery (until cancelled)."""

    def __init__(
        self,
        hub: Hub,
        config: WebhookConfig,
        *,
        post: Post = post,
        rng: random.Random | None = None,
    ) -> None:
        if not config.url.startswith(("http://", "https://")):
            raise ValueError(f"a webhook URL must be http:// or https://, not {config.url!r}")
        self.hub = hub
        self.config = config
        self.stats = WebhookStats()
        self._post = post
        self._rng = rng or random.Random()
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](config.queue_size)
        self._held: dict[tuple[str, str], tuple[float, PresenceTransition]] = {}
        self._alerted: set[tuple[str, str]] = set()
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)

    @property
    def waiting(self) -> int:
        """Documents queued and not yet being sent."""
        return self._send.statistics().current_buffer_used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Subscribe before reporting started: no event is missed after start() returns.
        with self.hub.events.subscribe(max(self.config.queue_size, 64)) as subscription:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender)
                task_status.started()
                await self._collect(subscription)

    # --- collecting --------------------------------------------------------

    async def _collect(self, subscription: Any) -> None:
        while True:
            item = None
            due = min((d for d, _ in self._held.values()), default=math.inf)
            with trio.move_on_at(due):
                item = await subscription.receive()
            self._release(trio.current_time())
            if isinstance(item, Resync):
                self.stats.dropped += item.lost
                log.warning("webhook %s: %d events lost", self.config.url, item.lost)
            elif isinstance(item, PresenceTransition):
                self._consider(item)

    def _consider(self, event: PresenceTransition) -> None:
        rules = self.config.filter
        if rules.tenants and event.tenant_id not in rules.tenants:
            return
        key = (event.tenant_id, event.agent_id)
        if event.status == "offline":
            if rules.reasons and event.reason not in rules.reasons:
                return
            if rules.min_offline > 0:
                self._held[key] = (trio.current_time() + rules.min_offline, event)
                return
            self._alerted.add(key)
            self._queue(event, None)
            return
        if key in self._held:  # back before the offline lasted min_offline: a blip
            _, held = self._held.pop(key)
            if held.local:
                self.stats.held += 1
            return
        if (rules.reasons or rules.min_offline > 0) and key not in self._alerted:
            return
        self._alerted.discard(key)
        self._queue(event, None)

    def _release(self, now: float) -> None:
        for key, (due, event) in list(self._held.items()):
            if due <= now:
                del self._held[key]
                self._alerted.add(key)
                self._queue(event, self.config.filter.min_offline)

    def _queue(self, event: PresenceTransition, offline_for: float | None) -> None:
        if not event.local:  # another hub of the cluster posts it
            self.stats.elsewhere += 1
            return
        document: dict[str, Any] = {
            "id": f"{self._prefix}-{next(self._ids)}",
            "type": "presence",
            "hub_id": event.hub_id or self.hub.config.hub_id,
            "reported_by": self.hub.config.hub_id,
            "tenant_id": event.tenant_id,
            "agent_id": event.agent_id,
            "status": event.status,
            "reason": event.reason,
            "time": event.time,
            "session_id": event.session_id,
        }
        if offline_for is not None:
            document["offline_for_at_least"] = offline_for
        try:
            self._send.send_nowait(document)
            self.stats.queued += 1
        except trio.WouldBlock:
            self.stats.dropped += 1
            log.warning("webhook %s: queue full, alert dropped", self.config.url)

    # --- sending -----------------------------------------------------------

    async def _sender(self) -> None:
        async for document in self._receive:
            await self._deliver(document)

    async def _deliver(self, document: dict[str, Any]) -> None:
        body = json.dumps(document, separators=(",", ":")).encode()
        headers = [
            ("Content-Type", "application/json"),
            ("X-Artcafe-Event", document["type"]),
            ("X-Artcafe-Delivery", document["id"]),
        ]
        if self.config.secret is not None:
            headers.append((SIGNATURE_HEADER, sign(self.config.secret, body)))
        delays = self.config.backoff.delays(self._rng)
        while True:
            try:
                await self._post(
                    self.config.url,
                    body,
                    headers,
                    time_limit=self.config.timeout,
                    ssl_context=self.config.ssl_context,
                )
                self.stats.sent += 1
                return
            except HttpError as exc:
                retryable = exc.status == 0 or exc.status == 429 or exc.status >= 500
                delay = next(delays, None) if retryable else None
                if delay is None:
                    self.stats.failed += 1
                    log.warning(
                        "webhook %s: giving up on %s: %s", self.config.url, document["id"], exc
                    )
                    return
                self.stats.retries += 1
                log.info("webhook %s: %s; retrying in %.2f s", self.config.url, exc, delay)
                await trio.sleep(delay)
