"""The registry's presence tables: current presence, the presence log, dashboard tokens."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ._schema import PresenceChange, PresenceRow, _Database, validate_id

__all__ = ["PresenceTables"]


class PresenceTables:
    """Persisted presence, its history and the dashboard tokens; :class:`Registry`
    delegates to it."""

    def __init__(self, db: _Database) -> None:
        self._db = db

    def record_presence(self, changes: Sequence[PresenceChange]) -> None:
        """Persist presence transitions in one transaction: upsert each row and log it."""
        if not changes:
            return
        with self._db.transaction(write=True) as conn:
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
        with self._db.transaction(write=True) as conn:
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
        with self._db.transaction() as conn:
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
        with self._db.transaction() as conn:
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
        with self._db.transaction() as conn:
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

    def prune_presence_log(self, *, before: float) -> int:
        """Delete presence log entries older than ``before``; returns how many were deleted."""
        with self._db.transaction(write=True) as conn:
            return conn.execute("DELETE FROM presence_log WHERE time < ?", (before,)).rowcount

    def add_dashboard_token(
        self, tenant_id: str, token_hash: str, *, now: float | None = None
    ) -> None:
        """Store the hash of a read-only dashboard token for ``tenant_id`` (``"*"``:
        every tenant, as the hub's admin token sees them)."""
        if tenant_id != "*":
            validate_id(tenant_id, "tenant id")
        stamp = time.time() if now is None else float(now)
        with self._db.transaction(write=True) as conn:
            conn.execute(
                "INSERT INTO dashboard_tokens (token_hash, tenant_id, created_at) VALUES (?, ?, ?)",
                (token_hash, tenant_id, stamp),
            )

    def dashboard_token_tenant(self, token_hash: str) -> str | None:
        """The tenant whose dashboard token hashes to ``token_hash``, or ``None``."""
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT tenant_id FROM dashboard_tokens WHERE token_hash = ?", (token_hash,)
            ).fetchone()
        return None if row is None else str(row[0])

    def remove_dashboard_tokens(self, tenant_id: str) -> int:
        """Revoke every dashboard token of ``tenant_id``; returns how many there were."""
        with self._db.transaction(write=True) as conn:
            return conn.execute(
                "DELETE FROM dashboard_tokens WHERE tenant_id = ?", (tenant_id,)
            ).rowcount
