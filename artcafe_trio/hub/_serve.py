"""Running a hub: ``serve_hub``/``open_hub`` compose its components and run them.

The composition (``compose_hub``) is the one place that knows every component:
the session directory, the router, the presence table and its listeners, the
registry watch and the presence writer, the backplane. :class:`Hub` is a facade
over them; it is never constructed half-way (``Hub(...)`` raises ``TypeError``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from .._util import collapse_exception_groups, write_private_file
from ..protocol._codes import CloseCode
from ..registry._registry import Registry, RegistryError
from ._backplane import Backplane, LocalBackplane, PresenceUpdate, Route, SessionClaim
from ._config import HubConfig, HubStats
from ._hub import Hub, HubParts
from ._hubevents import HubEvents
from ._persist import PresenceWriter, RegistryWatch, registry_call
from ._presence import PresenceTable
from ._router import Router
from ._sessions import Connections, SessionDirectory
from ._stores import BucketStore
from ._timers import DeadlineQueue

__all__ = ["open_hub", "serve_hub"]

log = logging.getLogger("artcafe_trio.hub")


class _Assembly:
    """A hub's components, wired together, and what runs them (start, shutdown)."""

    def __init__(
        self,
        registry: Registry,
        config: HubConfig,
        backplane: Backplane,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.config = config
        self.backplane = backplane
        self.wall_clock = wall_clock
        self.stats = stats = HubStats()
        self.events = events = HubEvents()
        self.timers = DeadlineQueue()
        # The backplane outlives the shutdown's handover (shielded once started).
        self.backplane_scope = trio.CancelScope()
        self.connections = Connections()
        self.directory = SessionDirectory(events, stats, wall_clock)
        self.router = Router(config, stats, self.directory, backplane, wall_clock)
        self.buckets = BucketStore(config.publish_rate, config.publish_burst)
        self.presence = PresenceTable(config, stats, self.timers, wall_clock)
        self.keys = RegistryWatch(registry, config, stats, self.directory)
        self.writer = PresenceWriter(self.keys, config, stats, self.presence, self._prune)
        self.keys.on_back = self.writer.wake
        # One owner per step of a transition, in this order.
        self.presence.listeners += [
            self._presence_event,  # hub.events (dashboard, webhooks)
            self.router.fan_out_presence,  # $presence.<agent> subscribers, admin copy
            self.writer.queue_update,  # the registry (local transitions)
            self._announce,  # the other hubs (local transitions)
        ]
        self.hub = Hub._compose(
            HubParts(
                registry=registry,
                config=config,
                stats=stats,
                events=events,
                wall_clock=wall_clock,
                backplane=backplane,
                connections=self.connections,
                directory=self.directory,
                router=self.router,
                presence=self.presence,
                keys=self.keys,
                writer=self.writer,
                buckets=self.buckets,
            )
        )

    def _presence_event(self, update: PresenceUpdate) -> None:
        # A draining hub's agent that moves elsewhere (or is reaped by another hub
        # after the grace) is not this hub's to report.
        local = update.local and not self.backplane.holds_back(update)
        reported_here = local or update.reaped_by == self.config.hub_id
        self.events.presence(
            update.tenant_id, update.agent_id, update.status, update.reason,
            update.session_id, update.time, hub_id=update.hub_id or None, local=reported_here,
        )  # fmt: skip

    def _announce(self, update: PresenceUpdate) -> None:
        if update.local:  # another hub's transition is its own to share
            self.backplane.announce_presence(update)

    def _prune(self, now: float) -> None:
        """Housekeeping at each last-seen flush: forget idle per-agent memory."""
        self.buckets.prune(now)
        self.router.dedupe.prune(now)

    # --- BackplanePeer: what other hubs did ---------------------------------------

    async def route_arrived(self, route: Route) -> None:
        await self.router.route_arrived(route)

    def session_claimed(self, claim: SessionClaim) -> None:
        self.directory.claimed_elsewhere(claim.tenant_id, claim.agent_id, claim.session_id)

    def presence_observed(self, update: PresenceUpdate) -> None:
        self.presence.observe(update)

    def use_credentials(
        self, load: Callable[[], Awaitable[tuple[object, dict[tuple[str, str], Any]]]]
    ) -> None:
        self.keys.use_source(load)

    def describe_session(self, session_id: str) -> tuple[tuple[str, ...], dict[str, Any]] | None:
        session = self.directory.find(session_id)
        if session is None:
            return None
        return session.capabilities, session.metadata

    # --- running ----------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Load keys and the last presence, start the timers, the watch, the backplane."""
        registry = self.registry
        await self.keys.reload()
        rows = await registry_call(registry, registry.presence_rows)
        # Written by the presence writer, which starts only once the hub listens: a hub
        # that fails to start (port in use) must not rewrite a running hub's presence.
        self.writer.pending.extend(self.presence.load(rows, self.wall_clock()))
        nursery.start_soon(self.timers.run)
        nursery.start_soon(self.keys.run)
        await nursery.start(self._run_backplane)
        self.backplane_scope.shield = True  # cancelled after shutdown() (_serve_hub)
        if self.keys.source is not None:  # the backplane brought the keys: load them now
            await self.keys.reload()

    async def _run_backplane(self, task_status: trio.TaskStatus[None]) -> None:
        with self.backplane_scope:
            await self.backplane.run(self, task_status=task_status)

    async def shutdown(self) -> None:
        """Close every session with 1012 and flush presence to the registry (the
        backplane told first: it drains)."""
        self.backplane.begin_drain()
        self.connections.stop()
        self.directory.close_all(CloseCode.SERVICE_RESTART, "hub shutting down")
        with trio.move_on_after(self.config.close_timeout + 1):
            await self.connections.wait_closed()
        self.presence.all_offline("disconnected", self.wall_clock(), self.config.hub_id)
        with trio.move_on_after(10):
            try:
                await self.writer.flush()
            except RegistryError as exc:
                log.error("presence not saved at shutdown: %s", exc)


def _load_ssl_context(tls_cert: str, tls_key: str | None) -> ssl.SSLContext:
    """A server TLS context from certificate and key files (blocking: run in a worker)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_cert, tls_key)
    return context


async def serve_hub(
    *,
    registry: Registry | None = None,
    db: str | os.PathLike[str] | None = None,
    host: str | None = "127.0.0.1",
    port: int | None = 0,
    config: HubConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    admin_file: str | os.PathLike[str] | None = None,
    task_status: trio.TaskStatus[Hub] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a hub until cancelled; ``task_status.started`` gives the :class:`Hub`.

    Args:
        registry: the registry to serve (not closed at the end); default: open ``db``.
        db: a registry database path, opened and closed by the hub (default: in memory).
        host: the address to listen on.
        port: the TCP port (0: any free one); ``None``: in-memory connections only.
        config: the hub's settings (default: ``HubConfig()``).
        ssl_context: serve wss:// with this context.
        tls_cert: serve wss:// with this certificate file (and ``tls_key``).
        tls_key: the private key file of ``tls_cert`` (default: in ``tls_cert``).
        admin_file: write the admin URL and token there (readable by the user only),
            removed at the end.
        task_status: given the running :class:`Hub` (``nursery.start``).

    Cancelling the task shuts down gracefully: every agent is closed with 1012
    (service restart) and presence is flushed to the registry, within a bounded time.
    """
    await _serve_hub(
        registry=registry, db=db, host=host, port=port, config=config,
        ssl_context=ssl_context, tls_cert=tls_cert, tls_key=tls_key,
        admin_file=admin_file, backplane=LocalBackplane(), task_status=task_status,
    )  # fmt: skip


async def _serve_hub(
    *,
    registry: Registry | None,
    db: str | os.PathLike[str] | None,
    host: str | None,
    port: int | None,
    config: HubConfig | None,
    ssl_context: ssl.SSLContext | None,
    tls_cert: str | None,
    tls_key: str | None,
    admin_file: str | os.PathLike[str] | None,
    backplane: Backplane,
    task_status: trio.TaskStatus[Hub],
) -> None:
    """``serve_hub`` over a given backplane."""
    # Reading files blocks (TLS key and certificate, registry, admin file): worker threads.
    context = ssl_context
    if context is None and tls_cert is not None:
        context = await trio.to_thread.run_sync(_load_ssl_context, tls_cert, tls_key)
    # Listen first: if the port is taken, fail before touching the registry.
    listeners: list[Any] = []
    if port is not None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        if context is not None:
            listeners = [trio.SSLListener(lst, context) for lst in listeners]
    own_registry = registry is None
    try:
        if registry is None:
            registry = await _open_registry(db)
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    parts = _Assembly(registry, config or HubConfig(), backplane)
    hub, endpoint = parts.hub, parts.connections
    # Connections run under a shielded scope: an outside cancellation first
    # closes every session with 1012, then stops the connection machinery.
    connections_scope = trio.CancelScope(shield=True)

    async def run_connections(task_status: trio.TaskStatus[None]) -> None:
        with connections_scope:
            async with trio.open_nursery() as connections:
                endpoint.nursery = connections
                if listeners:
                    await connections.start(
                        functools.partial(
                            trio.serve_listeners,
                            hub._serve_accepted,  # the connection pump's entry
                            listeners,
                            handler_nursery=connections,
                        )
                    )
                    endpoint.port = _listening_port(listeners[0])
                    scheme = "wss" if context is not None else "ws"
                    shown = host if host not in (None, "", "0.0.0.0") else "127.0.0.1"
                    endpoint.url = f"{scheme}://{shown}:{endpoint.port}"
                task_status.started()
                await trio.sleep_forever()

    try:
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                try:
                    await _run_assembly(
                        parts, nursery, run_connections, connections_scope, admin_file,
                        task_status,
                    )  # fmt: skip
                finally:
                    # After the shutdown: the backplane hands over (releases, lease).
                    parts.backplane_scope.cancel()
    finally:
        if own_registry:
            with trio.CancelScope(shield=True):
                await _close_registry(registry)


async def _run_assembly(
    parts: _Assembly,
    nursery: trio.Nursery,
    run_connections: Callable[..., Any],
    connections_scope: trio.CancelScope,
    admin_file: str | os.PathLike[str] | None,
    task_status: trio.TaskStatus[Hub],
) -> None:
    """Start the components and the connections, serve until cancelled, shut down."""
    hub = parts.hub
    await parts.start(nursery)
    await nursery.start(run_connections)
    await parts.writer.flush()  # an outage the previous hub left behind
    nursery.start_soon(parts.writer.run)
    try:
        if admin_file is not None:
            await trio.to_thread.run_sync(_write_admin_file, admin_file, hub)
        log.info("hub %s serving at %s", hub.config.hub_id, hub.url or "memory")
        task_status.started(hub)
        await trio.sleep_forever()
    finally:
        try:
            with trio.CancelScope(shield=True):
                await parts.shutdown()
        finally:
            connections_scope.cancel()
            if admin_file is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_remove_admin_file, admin_file, hub)


@asynccontextmanager
async def open_hub(
    *,
    registry: Registry | None = None,
    db: str | os.PathLike[str] | None = None,
    host: str | None = "127.0.0.1",
    port: int | None = 0,
    config: HubConfig | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    admin_file: str | os.PathLike[str] | None = None,
) -> AsyncIterator[Hub]:
    """Run a hub for the duration of the block (arguments as :func:`serve_hub`)."""
    with collapse_exception_groups():
        async with trio.open_nursery() as nursery:
            hub: Hub = await nursery.start(
                functools.partial(
                    serve_hub,
                    registry=registry,
                    db=db,
                    host=host,
                    port=port,
                    config=config,
                    ssl_context=ssl_context,
                    tls_cert=tls_cert,
                    tls_key=tls_key,
                    admin_file=admin_file,
                )
            )
            try:
                yield hub
            finally:
                nursery.cancel_scope.cancel()


async def _open_registry(db: str | os.PathLike[str] | None) -> Registry:
    """Open the registry: an in-memory one inline (no I/O), a file in a worker thread."""
    if db is None or os.fspath(db) == ":memory:":
        return Registry.open(":memory:")
    return await trio.to_thread.run_sync(Registry.open, db)


async def _close_registry(registry: Registry) -> None:
    """Close the registry, in a worker thread unless it is in memory (as ``registry_call``)."""
    if registry.inline:
        registry.close()
    else:
        await trio.to_thread.run_sync(registry.close)


def _listening_port(listener: trio.SocketListener | trio.SSLListener[trio.SocketStream]) -> int:
    if isinstance(listener, trio.SSLListener):
        listener = listener.transport_listener  # type: ignore[assignment]
    assert isinstance(listener, trio.SocketListener)
    port: int = listener.socket.getsockname()[1]
    return port


def _write_admin_file(path: str | os.PathLike[str], hub: Hub) -> None:
    """Write the admin file (the admin token) atomically, readable by the hub's user only."""
    payload = json.dumps({"url": hub.url, "token": hub.admin_token, "pid": os.getpid()})
    write_private_file(path, payload.encode())


def _remove_admin_file(path: str | os.PathLike[str], hub: Hub) -> None:
    try:
        with open(path) as f:
            if json.load(f).get("token") != hub.admin_token:
                return  # another hub took over the file
        os.remove(path)
    except (OSError, ValueError):
        pass
