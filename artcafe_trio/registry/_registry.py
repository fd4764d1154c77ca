"""The hub's registry: tenants, agents, their public keys and persisted presence.

A small SQLite database (stdlib :mod:`sqlite3`). The module is synchronous and
imports neither trio nor any socket library: the hub calls it from a worker
thread (``trio.to_thread.run_sync``), or directly when :attr:`Registry.inline`
is true (an in-memory database, where every call is fast).

Every public method takes an internal :class:`threading.Lock`, so one
:class:`Registry` may be shared by several worker threads. Several processes
(the hub and the CLI) may open the same file: it uses WAL mode and a 5 s busy
timeout, and :meth:`Registry.revision` notices commits made by other processes.

Times are Unix epoch seconds (``float``) supplied by the caller.

The tables are split between two components that share one locked connection
(``_schema._Database``): ``Credentials`` (tenants, agents, keys) and
``PresenceTables`` (presence, its log, dashboard tokens). :class:`Registry` owns
the file and delegates every query to them.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from types import TracebackType

from ..protocol._keys import PublicKey
from ._credentials import Credentials
from ._presence import PresenceTables
from ._schema import (
    _BUSY_TIMEOUT_MS,
    _MEMORY,
    SCHEMA_VERSION,
    AgentRecord,
    PresenceChange,
    PresenceRow,
    RegistryError,
    _create_private_file,
    _Database,
    _initialise,
    validate_id,
)

__all__ = [
    "SCHEMA_VERSION",
    "AgentRecord",
    "PresenceChange",
    "PresenceRow",
    "Registry",
    "RegistryError",
    "validate_id",
]


class Registry:
    """A handle on the registry database. Open it with :meth:`Registry.open`."""

    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        """Wrap an open, initialised connection. Use :meth:`open` instead."""
        self._db = _Database(connection, path)
        self._credentials = Credentials(self._db)
        self._presence = PresenceTables(self._db)
        self._path = path
        self._file_id: tuple[int, int] | None = None
        self._abspath = path if path == _MEMORY else os.path.abspath(path)
        if path != _MEMORY:
            try:
                st = os.stat(self._abspath)
            except OSError:  # not a plain path (e.g. a URI): nothing to watch
                pass
            else:
                self._file_id = (st.st_dev, st.st_ino)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Registry:
        """Open (creating if needed) the registry at ``path``; ``":memory:"`` for a private one.

        A new database file is created with mode 0600; its directory must exist.
        Raises :class:`RegistryError` if the file is not a usable registry database.
        """
        name = os.fspath(path)
        if not isinstance(name, str):
            raise TypeError("the registry path must be a str or os.PathLike[str]")
        memory = name == _MEMORY
        if not memory:
            _create_private_file(name)
        shown = name if memory else os.path.abspath(name)  # in messages
        try:
            conn = sqlite3.connect(
                name, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open registry database {shown!r}: {exc}") from exc
        try:
            _initialise(conn, memory=memory)
            return cls(conn, name)
        except sqlite3.OperationalError as exc:
            conn.close()
            raise RegistryError(f"cannot open registry database {shown!r}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise RegistryError(
                f"{shown!r} is not a usable registry database (corrupted, or not SQLite): {exc}"
            ) from exc
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        """Close the database. Idempotent; any later call raises :class:`RegistryError`."""
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._db.conn is None else "open"
        return f"<Registry {self._path!r} {state}>"

    @property
    def path(self) -> str:
        """The database path as given to :meth:`open`."""
        return self._path

    @property
    def inline(self) -> bool:
        """True for an in-memory registry: call it directly instead of in a worker thread."""
        return self._path == _MEMORY

    def file_problem(self) -> str | None:
        """Why the file at :attr:`path` is no longer the database this handle opened
        (deleted, or replaced by another file), or ``None`` if it still is.

        A handle keeps using the file it opened: one deleted or replaced underneath it
        is invisible to every other process (the CLI) from then on.
        """
        if self._file_id is None:
            return None
        try:
            st = os.stat(self._abspath)
        except FileNotFoundError:
            return f"registry file {self._abspath!r} was deleted"
        except OSError as exc:
            return f"registry file {self._abspath!r} cannot be checked: {exc}"
        if (st.st_dev, st.st_ino) != self._file_id:
            return f"registry file {self._abspath!r} was replaced by another file"
        return None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._db.conn is None

    @property
    def _conn(self) -> sqlite3.Connection | None:
        """The SQLite connection, ``None`` once closed (for tests)."""
        return self._db.conn

    # ------------------------------------------------------------------ credentials

    def add_key(
        self, tenant_id: str, agent_id: str, public_key: PublicKey, *, now: float | None = None
    ) -> str:
        """Register ``public_key`` for the agent, creating tenant and agent as needed.

        Returns the key's fingerprint. Adding a key that is already there changes nothing.
        """
        return self._credentials.add_key(tenant_id, agent_id, public_key, now=now)

    def remove_key(self, tenant_id: str, agent_id: str, fingerprint: str | None = None) -> int:
        """Remove one key by fingerprint, or all the agent's keys when ``fingerprint`` is None.

        Returns how many keys were removed. The agent itself and its presence stay.
        """
        return self._credentials.remove_key(tenant_id, agent_id, fingerprint)

    def remove_agent(self, tenant_id: str, agent_id: str) -> bool:
        """Remove the agent, its keys and its presence row (the presence log is kept).

        Returns False if there was no such agent.
        """
        return self._credentials.remove_agent(tenant_id, agent_id)

    def set_disabled(self, tenant_id: str, agent_id: str, disabled: bool) -> bool:
        """Disable (or re-enable) an agent; a disabled agent cannot authenticate.

        Returns False if there is no such agent.
        """
        return self._credentials.set_disabled(tenant_id, agent_id, disabled)

    def keys_for(self, tenant_id: str, agent_id: str) -> tuple[PublicKey, ...]:
        """The agent's usable keys; empty if the agent is unknown, disabled or has no keys."""
        return self._credentials.keys_for(tenant_id, agent_id)

    def all_credentials(self) -> dict[tuple[str, str], tuple[PublicKey, ...]]:
        """Every enabled agent's keys, keyed by ``(tenant_id, agent_id)``.

        Agents without keys are left out. Cache the result and reload when
        :meth:`revision` changes.
        """
        return self._credentials.all_credentials()

    def list_agents(self, tenant_id: str | None = None) -> list[AgentRecord]:
        """All agents (of one tenant, if given) with their presence, by tenant then agent."""
        return self._credentials.list_agents(tenant_id)

    def revision(self) -> int:
        """A number that changes whenever agents or keys may have changed.

        Counts this object's own credential writes, plus commits by any other
        connection (another process such as the CLI) seen through ``PRAGMA data_version``.
        """
        return self._db.revision()

    # ------------------------------------------------------------------ presence

    def record_presence(self, changes: Sequence[PresenceChange]) -> None:
        """Persist presence transitions in one transaction: upsert each row and log it."""
        self._presence.record_presence(changes)

    def record_last_seen(self, rows: Sequence[tuple[str, str, float, float | None]]) -> None:
        """Upsert ``(tenant_id, agent_id, last_seen, last_heartbeat)`` rows in one transaction.

        Only those two columns change (``last_heartbeat`` only when not None); a missing
        presence row is created with a ``NULL`` status.
        """
        self._presence.record_last_seen(rows)

    def presence_rows(self) -> list[PresenceRow]:
        """Every persisted presence row, by tenant then agent (the hub loads these at start)."""
        return self._presence.presence_rows()

    def presence_history(
        self, tenant_id: str, agent_id: str, limit: int = 100
    ) -> list[PresenceChange]:
        """The agent's logged presence transitions, newest first, at most ``limit`` of them.

        ``last_seen`` and ``last_heartbeat`` are not logged and are always None here.
        """
        return self._presence.presence_history(tenant_id, agent_id, limit)

    def presence_history_since(
        self, tenant_id: str, agent_id: str, since: float, limit: int = 10_000
    ) -> list[PresenceChange]:
        """The agent's transitions from ``since`` on, oldest first (at most ``limit``),
        preceded by the last one before ``since`` if any (the state the window starts in)."""
        return self._presence.presence_history_since(tenant_id, agent_id, since, limit)

    def add_dashboard_token(
        self, tenant_id: str, token_hash: str, *, now: float | None = None
    ) -> None:
        """Store the hash of a read-only dashboard token for ``tenant_id`` (``"*"``:
        every tenant)."""
        self._presence.add_dashboard_token(tenant_id, token_hash, now=now)

    def dashboard_token_tenant(self, token_hash: str) -> str | None:
        """The tenant whose dashboard token hashes to ``token_hash``, or ``None``."""
        return self._presence.dashboard_token_tenant(token_hash)

    def remove_dashboard_tokens(self, tenant_id: str) -> int:
        """Revoke every dashboard token of ``tenant_id``; returns how many there were."""
        return self._presence.remove_dashboard_tokens(tenant_id)

    def prune_presence_log(self, *, before: float) -> int:
        """Delete presence log entries older than ``before``; returns how many were deleted."""
        return self._presence.prune_presence_log(before=before)
