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
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType

import attrs

from .._errors import ArtcafeError
from ..protocol._keys import PublicKey, parse_public_key

__all__ = [
    "SCHEMA_VERSION",
    "AgentRecord",
    "PresenceChange",
    "PresenceRow",
    "Registry",
    "RegistryError",
    "validate_id",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""The value of ``PRAGMA user_version`` for the schema this module writes."""

_APPLICATION_ID = 0x41435452  # "ACTR", stamped into the database header
_MEMORY = ":memory:"
_BUSY_TIMEOUT_MS = 5000
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS tenants (
        tenant_id  TEXT NOT NULL PRIMARY KEY,
        created_at REAL NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS agents (
        tenant_id  TEXT NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
        agent_id   TEXT NOT NULL,
        disabled   INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        PRIMARY KEY (tenant_id, agent_id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS keys (
        tenant_id   TEXT NOT NULL,
        agent_id    TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        public_key  TEXT NOT NULL,
        added_at    REAL NOT NULL,
        PRIMARY KEY (tenant_id, agent_id, fingerprint),
        FOREIGN KEY (tenant_id, agent_id)
            REFERENCES agents (tenant_id, agent_id) ON DELETE CASCADE
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS presence (
        tenant_id      TEXT NOT NULL,
        agent_id       TEXT NOT NULL,
        status         TEXT,
        reason         TEXT,
        session_id     TEXT,
        last_seen      REAL,
        last_heartbeat REAL,
        changed_at     REAL,
        PRIMARY KEY (tenant_id, agent_id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS presence_log (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant_id  TEXT NOT NULL,
        agent_id   TEXT NOT NULL,
        status     TEXT NOT NULL,
        reason     TEXT,
        session_id TEXT,
        time       REAL NOT NULL
    )
    """,
    """
    CREATE INDEX IF NOT EXISTS presence_log_agent
        ON presence_log (tenant_id, agent_id, id)
    """,
    """
    CREATE TABLE IF NOT EXISTS dashboard_tokens (
        token_hash TEXT NOT NULL PRIMARY KEY,
        tenant_id  TEXT NOT NULL,
        created_at REAL NOT NULL
    )
    """,
)


class RegistryError(ArtcafeError):
    """The registry database could not be opened or used (corrupt file, missing directory...)."""


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a valid tenant or agent id, else raise :class:`ValueError`.

    A valid id is 1 to 128 characters of ``A-Z a-z 0-9 _ -`` not starting with ``_`` or ``-``.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    if _ID_RE.fullmatch(value) is None:
        raise ValueError(
            f"invalid {what} {value[:140]!r}: use 1 to 128 characters of A-Z, a-z, 0-9, "
            "'_' and '-', starting with a letter or digit"
        )
    return value


def _is_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


# --------------------------------------------------------------------------- row classes


@attrs.frozen
class AgentRecord:
    """One agent as :meth:`Registry.list_agents` reports it, joined with its presence."""

    tenant_id: str
    agent_id: str
    disabled: bool
    fingerprints: tuple[str, ...]
    created_at: float
    status: str | None
    reason: str | None
    last_seen: float | None
    last_heartbeat: float | None


@attrs.frozen
class PresenceChange:
    """A presence transition to persist (and, from the log, a past one)."""

    tenant_id: str
    agent_id: str
    status: str
    reason: str | None
    session_id: str | None
    time: float
    last_seen: float | None = None
    last_heartbeat: float | None = None


@attrs.frozen
class PresenceRow:
    """The persisted presence of one agent; ``status`` is ``None`` if only last-seen is known."""

    tenant_id: str
    agent_id: str
    status: str | None
    reason: str | None
    session_id: str | None
    last_seen: float | None
    last_heartbeat: float | None
    changed_at: float | None


# --------------------------------------------------------------------------- the registry


class Registry:
    """A handle on the registry database. Open it with :meth:`Registry.open`."""

    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        """Wrap an open, initialised connection. Use :meth:`open` instead."""
        self._conn: sqlite3.Connection | None = connection
        self._path = path
        self._lock = threading.Lock()
        self._revision = 0
        self._data_version = _pragma_int(connection, "data_version")
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
        try:
            conn = sqlite3.connect(
                name, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open registry database {name!r}: {exc}") from exc
        try:
            _initialise(conn, memory=memory)
            return cls(conn, name)
        except sqlite3.OperationalError as exc:
            conn.close()
            raise RegistryError(f"cannot open registry database {name!r}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise RegistryError(
                f"{name!r} is not a usable registry database (corrupted, or not SQLite): {exc}"
            ) from exc
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        """Close the database. Idempotent; any later call raises :class:`RegistryError`."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

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
        state = "closed" if self._conn is None else "open"
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
        return self._conn is None

    # ------------------------------------------------------------------ credentials

    def add_key(
        self, tenant_id: str, agent_id: str, public_key: PublicKey, *, now: float | None = None
    ) -> str:
        """Register ``public_key`` for the agent, creating tenant and agent as needed.

        Returns the key's fingerprint. Adding a key that is already there changes nothing.
        """
        validate_id(tenant_id, "tenant id")
        validate_id(agent_id, "agent id")
        if not isinstance(public_key, PublicKey):
            raise TypeError(f"public_key must be a PublicKey, not {type(public_key).__name__}")
        stamp = time.time() if now is None else float(now)
        fingerprint = public_key.fingerprint
        line = public_key.to_openssh()
        with self._transaction(write=True) as conn:
            before = conn.total_changes
            conn.execute(
                "INSERT OR IGNORE INTO tenants (tenant_id, created_at) VALUES (?, ?)",
                (tenant_id, stamp),
            )
            conn.execute(
                "INSERT OR IGNORE INTO agents (tenant_id, agent_id, created_at) VALUES (?, ?, ?)",
                (tenant_id, agent_id, stamp),
            )
            conn.execute(
                "INSERT OR IGNORE INTO keys"
                " (tenant_id, agent_id, fingerprint, public_key, added_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (tenant_id, agent_id, fingerprint, line, stamp),
            )
            if conn.total_changes != before:
                self._revision += 1
        return fingerprint

    def remove_key(self, tenant_id: str, agent_id: str, fingerprint: str | None = None) -> int:
        """Remove one key by fingerprint, or all the agent's keys when ``fingerprint`` is None.

        Returns how many keys were removed. The agent itself and its presence stay.
        """
        if not (_is_id(tenant_id) and _is_id(agent_id)):
            return 0
        with self._transaction(write=True) as conn:
            if fingerprint is None:
                cur = conn.execute(
                    "DELETE FROM keys WHERE tenant_id = ? AND agent_id = ?", (tenant_id, agent_id)
                )
            else:
                cur = conn.execute(
                    "DELETE FROM keys WHERE tenant_id = ? AND agent_id = ? AND fingerprint = ?",
                    (tenant_id, agent_id, fingerprint),
                )
            removed = cur.rowcount
            if removed:
                self._revision += 1
        return removed

    def remove_agent(self, tenant_id: str, agent_id: str) -> bool:
        """Remove the agent, its keys and its presence row (the presence log is kept).

        Returns False if there was no such agent.
        """
        if not (_is_id(tenant_id) and _is_id(agent_id)):
            return False
        args = (tenant_id, agent_id)
        with self._transaction(write=True) as conn:
            conn.execute("DELETE FROM keys WHERE tenant_id = ? AND agent_id = ?", args)
            conn.execute("DELETE FROM presence WHERE tenant_id = ? AND agent_id = ?", args)
            cur = conn.execute("DELETE FROM agents WHERE tenant_id = ? AND agent_id = ?", args)
            removed = cur.rowcount > 0
            if removed:
                self._revision += 1
        return removed

    def set_disabled(self, tenant_id: str, agent_id: str, disabled: bool) -> bool:
        """Disable (or re-enable) an agent; a disabled agent cannot authenticate.

        Returns False if there is no such agent.
        """
        if not (_is_id(tenant_id) and _is_id(agent_id)):
            return False
        with self._transaction(write=True) as conn:
            cur = conn.execute(
                "UPDATE agents SET disabled = ? WHERE tenant_id = ? AND agent_id = ?",
                (1 if disabled else 0, tenant_id, agent_id),
            )
            found = cur.rowcount > 0
            if found:
                self._revision += 1
        return found

    def keys_for(self, tenant_id: str, agent_id: str) -> tuple[PublicKey, ...]:
        """The agent's usable keys; empty if the agent is unknown, disabled or has no keys."""
        if not (_is_id(tenant_id) and _is_id(agent_id)):
            return ()
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT k.tenant_id, k.agent_id, k.fingerprint, k.public_key"
                " FROM keys AS k JOIN agents AS a USING (tenant_id, agent_id)"
                " WHERE k.tenant_id = ? AND k.agent_id = ? AND a.disabled = 0"
                " ORDER BY k.added_at, k.fingerprint",
                (tenant_id, agent_id),
            ).fetchall()
        return tuple(key for row in rows if (key := self._parse_row_key(row)) is not None)

    def all_credentials(self) -> dict[tuple[str, str], tuple[PublicKey, ...]]:
        """Every enabled agent's keys, keyed by ``(tenant_id, agent_id)``.

        Agents without keys are left out. Cache the result and reload when
        :meth:`revision` changes.
        """
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT k.tenant_id, k.agent_id, k.fingerprint, k.public_key"
                " FROM keys AS k JOIN agents AS a USING (tenant_id, agent_id)"
                " WHERE a.disabled = 0"
                " ORDER BY k.tenant_id, k.agent_id, k.added_at, k.fingerprint"
            ).fetchall()
        found: dict[tuple[str, str], list[PublicKey]] = {}
        for row in rows:
            key = self._parse_row_key(row)
            if key is not None:
                found.setdefault((row[0], row[1]), []).append(key)
        return {ident: tuple(keys) for ident, keys in found.items()}

    def list_agents(self, tenant_id: str | None = None) -> list[AgentRecord]:
        """All agents (of one tenant, if given) with their presence, by tenant then agent."""
        agent_sql = (
            "SELECT a.tenant_id, a.agent_id, a.disabled, a.created_at,"
            " p.status, p.reason, p.last_seen, p.last_heartbeat"
            " FROM agents AS a LEFT JOIN presence AS p USING (tenant_id, agent_id)"
        )
        key_sql = "SELECT tenant_id, agent_id, fingerprint FROM keys"
        args: tuple[str, ...] = ()
        if tenant_id is not None:
            agent_sql += " WHERE a.tenant_id = ?"
            key_sql += " WHERE tenant_id = ?"
            args = (tenant_id,)
        with self._transaction() as conn:
            agents = conn.execute(agent_sql + " ORDER BY a.tenant_id, a.agent_id", args).fetchall()
            key_rows = conn.execute(key_sql + " ORDER BY added_at, fingerprint", args).fetchall()
        fingerprints: dict[tuple[str, str], list[str]] = {}
        for t, a, fp in key_rows:
            fingerprints.setdefault((t, a), []).append(fp)
        return [
            AgentRecord(
                tenant_id=t,
                agent_id=a,
                disabled=bool(disabled),
                fingerprints=tuple(fingerprints.get((t, a), ())),
                created_at=created_at,
                status=status,
                reason=reason,
                last_seen=last_seen,
                last_heartbeat=last_heartbeat,
            )
            for t, a, disabled, created_at, status, reason, last_seen, last_heartbeat in agents
        ]

    def revision(self) -> int:
        """A number that changes whenever agents or keys may have changed.

        Counts this object's own credential writes, plus commits by any other
        connection (another process such as the CLI) seen through ``PRAGMA data_version``.
        """
        with self._lock:
            conn = self._connection()
            try:
                data_version = _pragma_int(conn, "data_version")
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            if data_version != self._data_version:
                self._data_version = data_version
                self._revision += 1
            return self._revision

    # ------------------------------------------------------------------ presence

    def record_presence(self, changes: Sequence[PresenceChange]) -> None:
        """Persist presence transitions in one transaction: upsert each row and log it."""
        if not changes:
            return
        with self._transaction(write=True) as conn:
            conn.executemany(
                "INSERT INTO presence (tenant_id, agent_id, status, reason, session_id,"
                " last_seen, last_heartbeat, changed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant_id, agent_id) DO UPDATE SET"
                " status = excluded.status, reason = excluded.reason,"
                " session_id = excluded.session_id, changed_at = excluded.changed_at,"
                " last_seen = coalesce(excluded.last_seen, presence.last_seen),"
                " last_heartbeat = coalesce(excluded.last_heartbeat, presence.last_heartbeat)",
                [
                    (
                        c.tenant_id,
                        c.agent_id,
                        c.status,
                        c.reason,
                        c.session_id,
                        c.last_seen,
                        c.last_heartbeat,
                        c.time,
                    )
                    for c in changes
                ],
            )
            conn.executemany(
                "INSERT INTO presence_log (tenant_id, agent_id, status, reason, session_id, time)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (c.tenant_id, c.agent_id, c.status, c.reason, c.session_id, c.time)
                    for c in changes
                ],
            )

    def record_last_seen(self, rows: Sequence[tuple[str, str, float, float | None]]) -> None:
        """Upsert ``(tenant_id, agent_id, last_seen, last_heartbeat)`` rows in one transaction.

        Only those two columns change (``last_heartbeat`` only when not None); a missing
        presence row is created with a ``NULL`` status.
        """
        if not rows:
            return
        with self._transaction(write=True) as conn:
            conn.executemany(
                "INSERT INTO presence (tenant_id, agent_id, last_seen, last_heartbeat)"
                " VALUES (?, ?, ?, ?)"
                " ON CONFLICT (tenant_id, agent_id) DO UPDATE SET"
                " last_seen = excluded.last_seen,"
                " last_heartbeat = coalesce(excluded.last_heartbeat, presence.last_heartbeat)",
                list(rows),
            )

    def presence_rows(self) -> list[PresenceRow]:
        """Every persisted presence row, by tenant then agent (the hub loads these at start)."""
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT tenant_id, agent_id, status, reason, session_id,"
                " last_seen, last_heartbeat, changed_at"
                " FROM presence ORDER BY tenant_id, agent_id"
            ).fetchall()
        return [PresenceRow(*row) for row in rows]

    def presence_history(
        self, tenant_id: str, agent_id: str, limit: int = 100
    ) -> list[PresenceChange]:
        """The agent's logged presence transitions, newest first, at most ``limit`` of them.

        ``last_seen`` and ``last_heartbeat`` are not logged and are always None here.
        """
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT tenant_id, agent_id, status, reason, session_id, time"
                " FROM presence_log WHERE tenant_id = ? AND agent_id = ?"
                " ORDER BY id DESC LIMIT ?",
                (tenant_id, agent_id, limit),
            ).fetchall()
        return [PresenceChange(*row) for row in rows]

    def presence_history_since(
        self, tenant_id: str, agent_id: str, since: float, limit: int = 10_000
    ) -> list[PresenceChange]:
        """The agent's transitions from ``since`` on, oldest first (at most ``limit``),
        preceded by the last one before ``since`` if any (the state the window starts in)."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        columns = "tenant_id, agent_id, status, reason, session_id, time"
        with self._transaction() as conn:
            before = conn.execute(
                f"SELECT {columns} FROM presence_log WHERE tenant_id = ? AND agent_id = ?"
                " AND time < ? ORDER BY id DESC LIMIT 1",
                (tenant_id, agent_id, since),
            ).fetchall()
            rows = conn.execute(
                f"SELECT {columns} FROM presence_log WHERE tenant_id = ? AND agent_id = ?"
                " AND time >= ? ORDER BY id DESC LIMIT ?",
                (tenant_id, agent_id, since, limit),
            ).fetchall()
        return [PresenceChange(*row) for row in before + rows[::-1]]

    def add_dashboard_token(
        self, tenant_id: str, token_hash: str, *, now: float | None = None
    ) -> None:
        """Store the hash of a read-only dashboard token for ``tenant_id``."""
        validate_id(tenant_id, "tenant id")
        stamp = time.time() if now is None else float(now)
        with self._transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO dashboard_tokens (token_hash, tenant_id, created_at) VALUES (?, ?, ?)",
                (token_hash, tenant_id, stamp),
            )

    def dashboard_token_tenant(self, token_hash: str) -> str | None:
        """The tenant whose dashboard token hashes to ``token_hash``, or ``None``."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT tenant_id FROM dashboard_tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        return None if row is None else str(row[0])

    def remove_dashboard_tokens(self, tenant_id: str) -> int:
        """Revoke every dashboard token of ``tenant_id``; returns how many there were."""
        with self._transaction(write=True) as conn:
            return conn.execute(
                "DELETE FROM dashboard_tokens WHERE tenant_id = ?", (tenant_id,)
            ).rowcount

    def prune_presence_log(self, *, before: float) -> int:
        """Delete presence log entries older than ``before``; returns how many were deleted."""
        with self._transaction(write=True) as conn:
            return conn.execute("DELETE FROM presence_log WHERE time < ?", (before,)).rowcount

    # ------------------------------------------------------------------ internals

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RegistryError(f"registry {self._path!r} is closed")
        return self._conn

    def _error(self, exc: sqlite3.Error) -> RegistryError:
        return RegistryError(f"registry {self._path!r}: {exc}")

    @contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run the body in one transaction (``BEGIN IMMEDIATE`` if writing)."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.rollback()
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.rollback()
                raise self._error(exc) from exc

    def _parse_row_key(self, row: tuple[str, str, str, str]) -> PublicKey | None:
        """Parse a stored key line; skip (with a warning) one that is damaged."""
        tenant_id, agent_id, fingerprint, line = row
        try:
            key = parse_public_key(line)
        except ArtcafeError as exc:
            logger.warning(
                "registry %r: ignoring unreadable key %s of %s/%s: %s",
                self._path,
                fingerprint,
                tenant_id,
                agent_id,
                exc,
            )
            return None
        if key.fingerprint != fingerprint:
            logger.warning(
                "registry %r: ignoring key of %s/%s whose fingerprint does not match (%s)",
                self._path,
                tenant_id,
                agent_id,
                fingerprint,
            )
            return None
        return key


def _pragma_int(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute(f"PRAGMA {name}").fetchone()[0])


def _create_private_file(path: str) -> None:
    """Create ``path`` empty with mode 0600 unless it exists; its directory must exist."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise RegistryError(
            f"cannot create registry database {path!r}: directory {directory!r} does not exist"
        )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise RegistryError(f"cannot create registry database {path!r}: {exc}") from exc
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _initialise(conn: sqlite3.Connection, *, memory: bool) -> None:
    """Configure the connection and create or check the schema."""
    conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    if not memory:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        application_id = _pragma_int(conn, "application_id")
        version = _pragma_int(conn, "user_version")
        if application_id not in (0, _APPLICATION_ID):
            raise sqlite3.DatabaseError(
                f"application_id is {application_id:#x}, not an artcafe-trio registry"
            )
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this artcafe-trio supports "
                f"({SCHEMA_VERSION})"
            )
        for statement in _SCHEMA:
            conn.execute(statement)
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if application_id == 0:
            conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
