"""The hub and its registry: the keys it serves with (reloaded when the registry
changes, watched for a file deleted under it) and the presence writer (history and
last-seen, written behind and coalesced)."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

from ..protocol._codes import CloseCode
from ..protocol._keys import PublicKey
from ..registry._registry import PresenceChange, Registry, RegistryError
from ._backplane import PresenceUpdate
from ._config import HubConfig, HubStats
from ._presence import PresenceTable
from ._sessions import SessionDirectory

__all__ = ["CredentialSource", "PresenceWriter", "RegistryWatch", "registry_call"]

log = logging.getLogger("artcafe_trio.hub")

T = TypeVar("T")

FAILURE_LOG_INTERVAL = 60.0  # seconds between two "cannot write presence" lines

CredentialTable = dict[tuple[str, str], tuple[PublicKey, ...]]
#: Loads ``(revision, credentials)`` from somewhere other than the registry.
CredentialLoader = Callable[[], Awaitable[tuple[object, CredentialTable]]]


async def registry_call(registry: Registry, fn: Callable[..., T], *args: Any) -> T:
    """Run a registry call: inline for an in-memory registry, else in a worker thread."""
    if registry.inline:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


class CredentialSource(Protocol):
    """What the authenticator reads: the keys loaded last. :class:`RegistryWatch` is
    the single-hub one (SQLite); a cluster's would mirror a key-value bucket."""

    credentials: dict[tuple[str, str], tuple[PublicKey, ...]]
    tenants: frozenset[str]
    generation: int  # bumped at each load: a refused key may be retried after one

    async def reload_safely(self) -> bool:
        """Load the keys again if they changed (never raises); whether they did."""


class RegistryWatch:
    """The credentials the hub authenticates with, and the watch on the registry.

    ``credentials``/``tenants`` are what was loaded last; ``generation`` counts the
    loads. ``lost`` names a problem with the registry file (deleted or replaced under
    the running hub) while there is one; ``on_back`` is called when it is solved.
    """

    def __init__(
        self, registry: Registry, config: HubConfig, stats: HubStats, directory: SessionDirectory
    ) -> None:
        self.registry = registry
        self._config = config
        self._stats = stats
        self._directory = directory
        self.credentials: dict[tuple[str, str], tuple[PublicKey, ...]] = {}
        self.tenants: frozenset[str] = frozenset()
        self.generation = 0  # bumped each time keys are loaded
        self.lost: str | None = None
        self.on_back: Callable[[], None] = lambda: None
        self._revision: object = -1
        #: Where the keys come from instead of the registry, when set: an async
        #: ``() -> (revision, credentials)`` (a cluster's shared key-value mirror).
        self.source: CredentialLoader | None = None
        self._lock = trio.Lock()
        self._lost_logged = -math.inf

    async def reload(self) -> bool:
        """Reload keys if the registry changed; close sessions whose key went away.

        One reload at a time; the revision is recorded only once its keys are loaded,
        so a check that sees "no change" already has them.
        """
        async with self._lock:
            revision: object
            if self.source is not None:
                revision, credentials = await self.source()
                if revision == self._revision:
                    return False
            else:
                revision = await registry_call(self.registry, self.registry.revision)
                if revision == self._revision:
                    return False
                credentials = await registry_call(self.registry, self.registry.all_credentials)
            self.credentials = credentials
            self.tenants = frozenset(tenant for tenant, _ in credentials)
            self._revision = revision
            self.generation += 1
        for session in self._directory.agent_sessions():
            keys = self.credentials.get((session.tenant_id, session.agent_id), ())
            if session.key is not None and session.key not in keys:
                log.warning("%r: key removed or agent disabled, closing", session)
                session.close(CloseCode.KEY_REVOKED, "key removed or agent disabled")
        return True

    def use_source(self, source: CredentialLoader) -> None:
        """Serve with the keys of ``source`` from now on (loaded at the next reload)."""
        self.source = source
        self._revision = object()  # whatever it reports first is a change

    async def reload_safely(self) -> bool:
        try:
            return await self.reload()
        except RegistryError as exc:
            log.error("registry unavailable, using the keys loaded before: %s", exc)
            return False

    async def run(self) -> None:
        """Poll the registry forever (run it as a task)."""
        while True:
            await trio.sleep(self._config.registry_poll_interval)
            await self.check_file()
            await self.reload_safely()

    async def check_file(self) -> None:
        """Notice a registry file deleted or replaced under the running hub, loudly.

        The hub then keeps serving with the keys it has loaded, but writes no presence
        (changes wait, one per agent) and sees no registry change, until the file is back
        or the hub is restarted: see ``docs/security.md``.
        """
        try:
            problem = await registry_call(self.registry, self.registry.file_problem)
        except RegistryError:  # closed under us: nothing to check
            return
        now = trio.current_time()
        if problem is not None:
            if self.lost is None or now >= self._lost_logged + 60.0:
                log.error(
                    "%s: the running hub keeps the keys it loaded and writes no presence; "
                    "'agents' commands on that path no longer reach it. Restore the file "
                    "or restart the hub.",
                    problem,
                )
                self._lost_logged = now
            self.lost = problem
            self._stats.registry_file_lost = 1
        elif self.lost is not None:
            log.warning("registry file %r is back; presence writes resume", self.registry.path)
            self.lost = None
            self._stats.registry_file_lost = 0
            self.on_back()


class PresenceWriter:
    """Writes presence transitions (the history) and last-seen times to the registry,
    behind the hub: queued, coalesced while writes fail, one flush at a time."""

    def __init__(
        self,
        watch: RegistryWatch,
        config: HubConfig,
        stats: HubStats,
        table: PresenceTable,
        housekeeping: Callable[[float], None] = lambda now: None,
    ) -> None:
        self._watch = watch
        self._registry = watch.registry
        self._config = config
        self._stats = stats
        self._table = table
        self._housekeeping = housekeeping  # run at each last-seen flush (pruning)
        self.pending: list[PresenceChange] = []
        self._changes_waiting = trio.Event()
        self._flush_lock = trio.Lock()
        self.write_failures = 0  # failed tries since the last successful write
        self._failure_logged = -math.inf
        self._unlogged_failures = 0

    def wake(self) -> None:
        self._changes_waiting.set()

    def queue_update(self, update: PresenceUpdate) -> None:
        """Presence listener: persist a local transition (another hub persists its own)."""
        if not update.local:
            return
        change = PresenceChange(
            update.tenant_id, update.agent_id, update.status, update.reason,
            update.session_id, update.time,
            last_seen=update.last_seen, last_heartbeat=update.last_heartbeat,
        )  # fmt: skip
        self.queue(change)

    def queue(self, change: PresenceChange) -> None:
        """Queue a presence write. While writes fail, the queue is coalesced to the latest
        change per agent, so it never holds more than twice the number of agents (the
        presence log then misses the transitions in between)."""
        pending = self.pending
        pending.append(change)
        if len(pending) > 2 * len(self._table) + 16:
            latest: dict[tuple[str, str], PresenceChange] = {}
            for queued in pending:  # ordered by each agent's latest change
                latest.pop((queued.tenant_id, queued.agent_id), None)
                latest[(queued.tenant_id, queued.agent_id)] = queued
            pending[:] = latest.values()
        self._stats.presence_writes_pending = len(pending)
        self._changes_waiting.set()

    async def run(self) -> None:
        """Write forever (run it as a task, once the hub listens)."""
        next_flush = trio.current_time() + self._config.last_seen_flush_interval
        while True:
            with trio.move_on_at(next_flush):
                await self._changes_waiting.wait()
            if self._watch.lost is not None:
                # Nothing written would reach the file at the registry's path: keep them.
                await trio.sleep(self._config.registry_poll_interval)
                continue
            try:
                if trio.current_time() >= next_flush:
                    next_flush = trio.current_time() + self._config.last_seen_flush_interval
                    self._housekeeping(trio.current_time())
                    await self._flush_last_seen()
                await self.flush()
            except RegistryError as exc:
                # Keep serving; the changes stay queued and are written on the next try.
                self._write_failed(exc)
                await trio.sleep(1.0)
            else:
                if self.write_failures:
                    log.warning(
                        "presence writes to the registry work again (after %d failed tries)",
                        self.write_failures,
                    )
                    self.write_failures = self._unlogged_failures = 0
                    self._failure_logged = -math.inf

    def _write_failed(self, exc: RegistryError) -> None:
        """Log a failed write: the first at once, then one line a minute with a count."""
        self.write_failures += 1
        now = trio.current_time()
        if now < self._failure_logged + FAILURE_LOG_INTERVAL:
            self._unlogged_failures += 1
            return
        if self.write_failures == 1:
            log.error("cannot write presence to the registry (will retry): %s", exc)
        else:
            log.error(
                "still cannot write presence to the registry (will retry; %d more failed"
                " tries since the last such line, %d in all): %s",
                self._unlogged_failures, self.write_failures, exc,
            )  # fmt: skip
        self._failure_logged, self._unlogged_failures = now, 0

    async def flush(self) -> None:
        """Write what is queued. One flush at a time: the shutdown's final flush must not
        overtake a write still in its worker thread, or an older change would land last
        (e.g. online after left)."""
        async with self._flush_lock:
            self._changes_waiting = trio.Event()
            changes, self.pending = self.pending, []
            if changes:
                try:
                    await registry_call(self._registry, self._registry.record_presence, changes)
                except BaseException:
                    # Not written: keep them, in order, before the ones queued since.
                    queued, self.pending = self.pending, changes
                    for change in queued:
                        self.queue(change)
                    raise
                finally:
                    self._stats.presence_writes_pending = len(self.pending)

    async def _flush_last_seen(self) -> None:
        rows = self._table.last_seen_rows()
        if rows:
            await registry_call(self._registry, self._registry.record_last_seen, rows)
