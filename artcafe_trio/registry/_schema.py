"""The registry's schema, row classes, id validation and its locked SQLite connection.

Synchronous and trio-free, like the rest of :mod:`artcafe_trio.registry`.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import attrs

from .._errors import ArtcafeError

__all__ = [
    "SCHEMA_VERSION",
    "AgentRecord",
    "PresenceChange",
    "PresenceRow",
    "RegistryError",
    "validate_id",
]

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


# --------------------------------------------------------------------------- the connection


class _Database:
    """One SQLite connection behind a lock, with the credential revision counter.

    The components of a :class:`~artcafe_trio.registry.Registry` share it; every
    query runs in :meth:`transaction`.
    """

    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        self.conn: sqlite3.Connection | None = connection
        self.path = path
        self.lock = threading.Lock()
        self._revision = 0
        self._data_version = _pragma_int(connection, "data_version")

    def connection(self) -> sqlite3.Connection:
        """The open connection; raises :class:`RegistryError` once closed."""
        if self.conn is None:
            raise RegistryError(f"registry {self.path!r} is closed")
        return self.conn

    def error(self, exc: sqlite3.Error) -> RegistryError:
        return RegistryError(f"registry {self.path!r}: {exc}")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self.lock:
            conn, self.conn = self.conn, None
            if conn is not None:
                conn.close()

    def changed(self) -> None:
        """Count a credential write (call inside a transaction)."""
        self._revision += 1

    def revision(self) -> int:
        """Own credential writes plus commits by other connections (``data_version``)."""
        with self.lock:
            conn = self.connection()
            try:
                data_version = _pragma_int(conn, "data_version")
            except sqlite3.Error as exc:
                raise self.error(exc) from exc
            if data_version != self._data_version:
                self._data_version = data_version
                self._revision += 1
            return self._revision

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run the body in one transaction (``BEGIN IMMEDIATE`` if writing)."""
        with self.lock:
            conn = self.connection()
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
                raise self.error(exc) from exc


# --------------------------------------------------------------------------- opening


def _pragma_int(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute(f"PRAGMA {name}").fetchone()[0])


def _create_private_file(path: str) -> None:
    """Create ``path`` empty with mode 0600 unless it exists; its directory must exist."""
    absolute = os.path.abspath(path)
    directory = os.path.dirname(absolute)
    if not os.path.isdir(directory):
        raise RegistryError(
            f"cannot create registry database {absolute!r}: directory {directory!r} does not exist"
        )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise RegistryError(f"cannot create registry database {absolute!r}: {exc}") from exc
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
