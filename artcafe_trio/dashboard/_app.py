"""The dashboard: the page, the JSON API and the live feed (server-sent events)."""

from __future__ import annotations

import collections
import functools
import importlib.resources
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..hub._hub import Hub
from ..hub._hubevents import HubEvent, PresenceTransition, Resync
from ..registry._registry import validate_id
from ._http import HttpLimits, Request, Response, Send, StreamResponse, serve_http
from ._tokens import Access, resolve_token

__all__ = ["Dashboard", "DashboardConfig", "serve_dashboard", "static_files"]

log = logging.getLogger("artcafe_trio.dashboard")

HISTORY_WINDOW = 24 * 3600.0
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@attrs.frozen
class DashboardConfig:
    """Dashboard settings. Durations in seconds."""

    limits: HttpLimits = HttpLimits()
    feed_queue: int = 256
    """Events queued per open page; a page that falls further behind gets ``resync``."""
    max_feeds: int = 32
    """Live feeds open at once (each is one HTTP connection)."""
    refresh_interval: float = 2.0
    """How often a live feed sends the whole (scoped) table, so measurements stay fresh."""
    keepalive_interval: float = 15.0
    recent_events: int = 100
    """Past events a new feed starts with."""
    rate_window: float = 10.0
    token_recheck: float = 1.0
    """A live feed sends nothing on a token it has not found valid within this many
    seconds (and re-checks it at every refresh): a revoked token's feed ends."""
    """Heartbeats/s and messages/s are averaged over this many seconds."""


def static_files() -> dict[str, bytes]:
    """The page's files, shipped as package data (``artcafe_trio/dashboard/static``)."""
    root = importlib.resources.files("artcafe_trio.dashboard") / "static"
    return {
        entry.name: entry.read_bytes()
        for entry in root.iterdir()
        if entry.is_file() and any(entry.name.endswith(ext) for ext in _CONTENT_TYPES)
    }


def _json(status: int, value: Any) -> Response:
    body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    return Response(status, body, "application/json")


def _error(status: int, code: str, message: str) -> Response:
    headers = (("WWW-Authenticate", 'Bearer realm="artcafe-trio"'),) if status == 401 else ()
    body = json.dumps({"error": code, "message": message}).encode()
    return Response(status, body, "application/json", headers)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class Dashboard:
    """Request handling for one hub (create it with :func:`serve_dashboard`)."""

    def __init__(
        self,
        hub: Hub,
        config: DashboardConfig,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.hub = hub
        self.config = config
        self.files = static_files()
        self.feeds = 0
        self.resyncs = 0
        self.revoked = 0
        """Live feeds ended because their token was no longer valid."""
        self.snapshots_built = 0
        self._snapshots: dict[tuple[str | None, str | None], tuple[float, bytes]] = {}
        self._wall_clock = wall_clock
        self._samples: collections.deque[tuple[float, int, int]] = collections.deque(
            maxlen=max(2, int(config.rate_window) + 2)
        )

    # --- access ------------------------------------------------------------

    @staticmethod
    def _token(request: Request, *, allow_query: bool = False) -> str | None:
        auth = request.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return request.arg("token") if allow_query else None

    async def _access(self, request: Request, *, allow_query: bool = False) -> Access | None:
        token = self._token(request, allow_query=allow_query)
        if token is None:
            return None
        return await self._resolve(token)

    async def _resolve(self, token: str) -> Access | None:
        registry = self.hub.registry
        lookup = functools.partial(resolve_token, registry, self.hub.admin_token, token)
        if registry.inline:
            return lookup()
        return await trio.to_thread.run_sync(lookup)

    # --- routing -----------------------------------------------------------

    async def handle(self, request: Request) -> Response | StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _error(405, "method_not_allowed", "only GET is served")
        path = request.path
        if path == "/favicon.ico":
            return Response(204)
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if path in ("/", "/index.html"):
            access = await self._access(request, allow_query=True)
            if access is None:
                return self._page(401, "refused.html")
            return self._page(200, "index.html")
        if not path.startswith("/api/"):
            return _error(404, "not_found", f"no such page: {path[:100]}")
        access = await self._access(request)
        if access is None:
            why = "bad token" if "authorization" in request.headers else "no token"
            return _error(401, "unauthorized", f"{why}: send 'Authorization: Bearer <token>'")
        tenant = request.arg("tenant")
        if tenant is not None and not access.may_see(tenant):
            return _error(403, "forbidden", "this token may not see that tenant")
        scope = access.tenant_id or tenant
        if path == "/api/presence":
            return _json(200, self.presence_document(access, scope))
        if path == "/api/history":
            return await self._history(request, access, scope)
        if path == "/api/events":
            return self._feed(access, scope, self._token(request) or "")
        return _error(404, "not_found", f"no such API: {path[:100]}")

    def _page(self, status: int, name: str) -> Response:
        csp = (("Content-Security-Policy", _CSP),)
        return Response(status, self.files[name], _CONTENT_TYPES[".html"], csp)

    def _static(self, name: str) -> Response:
        body = self.files.get(name)
        if body is None or name == "index.html":
            return _error(404, "not_found", "no such file")
        suffix = name[name.rfind(".") :]
        return Response(200, body, _CONTENT_TYPES[suffix], (("Cache-Control", "no-cache"),))

    # --- documents ---------------------------------------------------------

    def agent_json(self, record: Any) -> dict[str, Any]:
        local_hub = self.hub.config.hub_id
        owner = record.hub_id or local_hub
        measures = self.hub.events.measures(record.tenant_id, record.agent_id)
        if owner != local_hub:  # measured by the hub its session is on, not here
            measures = attrs.evolve(
                measures,
                declared_interval=None,
                heartbeat_interval=None,
                heartbeat_interval_avg=None,
                rtt=None,
            )
        return {
            "tenant_id": record.tenant_id,
            "agent_id": record.agent_id,
            "status": record.status,
            "reason": record.reason,
            "since": record.since,
            "last_seen": record.last_seen,
            "last_heartbeat": record.last_heartbeat,
            "heartbeat_interval": measures.declared_interval,
            "heartbeat_timeout": record.heartbeat_timeout,
            "measured_interval": _finite(measures.heartbeat_interval),
            "measured_interval_avg": _finite(measures.heartbeat_interval_avg),
            "rtt": _finite(measures.rtt),
            "reconnects_1h": measures.reconnects,
            "takeovers_1h": measures.takeovers,
            "capabilities": list(record.capabilities),
            "metadata": record.metadata,
            "session_id": record.session_id,
            "hub_id": owner,
        }

    def presence_document(self, access: Access, tenant: str | None) -> dict[str, Any]:
        agents = [self.agent_json(r) for r in self.hub.presence_table(tenant)]
        online = sum(1 for a in agents if a["status"] == "online")
        offline: dict[str, int] = {}
        for agent in agents:
            if agent["status"] != "online":
                reason = agent["reason"] or "unknown"
                offline[reason] = offline.get(reason, 0) + 1
        counters: dict[str, Any] = {"online": online, "offline": offline}
        if access.is_admin:  # hub-wide rates would tell one tenant about the others
            counters.update(self.rates())
        return {
            "now": self._wall_clock(),
            "hub_id": self.hub.config.hub_id,
            "scope": access.tenant_id or "*",
            "tenant": tenant,
            "agents": agents,
            "counters": counters,
        }

    def sample(self) -> None:
        """Record the hub's counters (the sampler calls this once a second)."""
        stats = self.hub.stats
        self._samples.append((trio.current_time(), stats.heartbeats, stats.messages_routed))

    def rates(self) -> dict[str, float | None]:
        if len(self._samples) < 2:
            return {"heartbeats_per_s": None, "messages_per_s": None}
        (t0, h0, m0), (t1, h1, m1) = self._samples[0], self._samples[-1]
        span = max(t1 - t0, 1e-9)
        return {"heartbeats_per_s": (h1 - h0) / span, "messages_per_s": (m1 - m0) / span}

    async def _history(self, request: Request, access: Access, tenant: str | None) -> Response:
        agent = request.arg("agent")
        if agent is None:
            return _error(400, "missing_agent", "give ?agent=<agent id>")
        if tenant is None:
            owners = {r.tenant_id for r in self.hub.presence_table() if r.agent_id == agent}
            if len(owners) != 1:
                return _error(400, "missing_tenant", "give ?tenant= as well (admin token)")
            tenant = owners.pop()
        try:
            validate_id(agent, "agent id")
            validate_id(tenant, "tenant id")
        except ValueError as exc:
            return _error(400, "invalid_id", str(exc))
        until = self._wall_clock()
        since = until - HISTORY_WINDOW
        registry = self.hub.registry
        query = functools.partial(registry.presence_history_since, tenant, agent, since)
        changes = query() if registry.inline else await trio.to_thread.run_sync(query)
        live = [r for r in self.hub.presence_table(tenant) if r.agent_id == agent]
        if not changes and not live:
            return _error(404, "unknown_agent", f"no agent {agent!r} in tenant {tenant!r}")
        segments = _segments(changes, since, until, live[0].status if live else None)
        up = sum(s["end"] - s["start"] for s in segments if s["status"] == "online")
        known = sum(s["end"] - s["start"] for s in segments if s["status"] != "unknown")
        return _json(
            200,
            {
                "tenant_id": tenant,
                "agent_id": agent,
                "since": since,
                "until": until,
                "segments": segments,
                "uptime": (up / known) if known > 0 else None,
                "transitions": [
                    {"status": c.status, "reason": c.reason, "time": c.time}
                    for c in changes
                    if c.time >= since
                ],
            },
        )

    # --- live feed ---------------------------------------------------------

    def _feed(self, access: Access, tenant: str | None, token: str) -> Response | StreamResponse:
        if self.feeds >= self.config.max_feeds:
            return _error(503, "too_many_feeds", f"at most {self.config.max_feeds} live feeds")
        self.feeds += 1  # reserved now: the check and the count cannot be raced

        def done() -> None:
            self.feeds -= 1

        checked = trio.current_time()  # the handler just resolved the token

        async def still_valid(*, within: float) -> bool:
            """Whether the token still grants ``access`` (re-read when the last check
            is older than ``within`` seconds); counts a feed ended for it."""
            nonlocal checked
            if trio.current_time() - checked < within:
                return True
            checked = trio.current_time()
            if await self._resolve(token) == access:
                return True
            self.revoked += 1
            return False  # revoked (or the admin token of another hub run)

        async def produce(send: Send) -> None:
            recheck = self.config.token_recheck
            with self.hub.events.subscribe(self.config.feed_queue, tenant_id=tenant) as sub:
                await send(b"retry: 1000\n\n")
                await send(self._snapshot_event(access, tenant, recent=True))
                next_refresh = self._next_tick()
                while True:
                    item: HubEvent | Resync | None = None
                    deadline = min(
                        next_refresh, trio.current_time() + self.config.keepalive_interval
                    )
                    with trio.move_on_at(deadline):
                        item = await sub.receive()
                    # Nothing is sent on a token not found valid within `recheck` s,
                    # and every tick re-checks it: a revoked token's feed ends.
                    if not await still_valid(within=0.0 if item is None else recheck):
                        return  # the page reconnects and is refused
                    if item is None:
                        if trio.current_time() >= next_refresh:
                            tick, next_refresh = next_refresh, self._next_tick()
                            await send(self._tick_snapshot(access, tenant, tick))
                        else:
                            await send(b": keepalive\n\n")
                    elif isinstance(item, Resync):
                        self.resyncs += 1
                        await send(_sse("resync", {"lost": item.lost}))
                        await send(self._snapshot_event(access, tenant, recent=True))
                    elif access.may_see(item.tenant_id):
                        await send(self._event_sse(item))

        return StreamResponse(200, "text/event-stream", produce, done=done)

    def _next_tick(self) -> float:
        """The next refresh tick: every feed refreshes at the same moments, so one
        snapshot per scope is built per tick, however many feeds show it."""
        interval = self.config.refresh_interval
        return (math.floor(trio.current_time() / interval) + 1) * interval

    def _tick_snapshot(self, access: Access, tenant: str | None, tick: float) -> bytes:
        key = (access.tenant_id, tenant)
        cached = self._snapshots.get(key)
        if cached is not None and cached[0] == tick:
            return cached[1]
        for old in [k for k, (t, _) in self._snapshots.items() if t < tick]:
            del self._snapshots[old]
        body = self._snapshot_event(access, tenant, recent=False)
        self._snapshots[key] = (tick, body)
        self.snapshots_built += 1
        return body

    def _snapshot_event(self, access: Access, tenant: str | None, *, recent: bool) -> bytes:
        document = self.presence_document(access, tenant)
        if recent:
            events = [e for e in self.hub.events.recent if access.may_see(e.tenant_id)]
            if tenant is not None:
                events = [e for e in events if e.tenant_id == tenant]
            document["events"] = [e.to_json() for e in events[-self.config.recent_events :]]
        return _sse("snapshot", document)

    def _event_sse(self, event: HubEvent) -> bytes:
        data = event.to_json()
        if isinstance(event, PresenceTransition):
            rows = [
                r for r in self.hub.presence_table(event.tenant_id) if r.agent_id == event.agent_id
            ]
            if rows:
                data["agent"] = self.agent_json(rows[0])
        return _sse(event.kind, data)


def _sse(name: str, data: Any) -> bytes:
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"event: {name}\ndata: {text}\n\n".encode()


def _segments(
    changes: list[Any], since: float, until: float, live_status: str | None
) -> list[dict[str, Any]]:
    """Consecutive ``{start, end, status, reason}`` spans covering ``[since, until]``."""
    segments: list[dict[str, Any]] = []
    status, reason, start = "unknown", None, since
    for change in changes:
        at = max(change.time, since)
        if at > start and at <= until:
            segments.append({"start": start, "end": at, "status": status, "reason": reason})
            start = at
        status, reason = change.status, change.reason
    if live_status is not None:
        status = live_status  # the hub's live state beats a write still in flight
    if until > start:
        segments.append({"start": start, "end": until, "status": status, "reason": reason})
    return segments


async def serve_dashboard(
    hub: Hub,
    host: str = "127.0.0.1",
    port: int = 8766,
    *,
    config: DashboardConfig | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dashboard of ``hub`` until cancelled; ``task_status.started`` gives its URL
    (``http://host:port/``; open it with ``?token=`` and a token)."""
    config = config or DashboardConfig()
    dashboard = Dashboard(hub, config)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    shown = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    if ":" in shown:
        shown = f"[{shown}]"
    url = f"http://{shown}:{bound}/"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_http, dashboard.handle, listeners, config.limits)
        nursery.start_soon(_sampler, dashboard)
        log.info("dashboard at %s", url)
        task_status.started(url)


async def _sampler(dashboard: Dashboard) -> None:
    while True:
        dashboard.sample()
        await trio.sleep(1.0)
