"""The registry's credential tables: tenants, agents and their public keys."""

from __future__ import annotations

import logging
import time

from .._errors import ArtcafeError
from ..protocol._keys import PublicKey, parse_public_key
from ._schema import AgentRecord, _Database, _is_id, validate_id

__all__ = ["Credentials"]

# The name these warnings had before the split (log filters may select it).
logger = logging.getLogger("artcafe_trio.registry._registry")


class Credentials:
    """Agents and keys of a registry database; :class:`Registry` delegates to it.

    Every write that changes a row counts in the database's revision.
    """

    def __init__(self, db: _Database) -> None:
        self._db = db

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
        with self._db.transaction(write=True) as conn:
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
                self._db.changed()
        return fingerprint

    def remove_key(self, tenant_id: str, agent_id: str, fingerprint: str | None = None) -> int:
        """Remove one key by fingerprint, or all the agent's keys when ``fingerprint`` is None.

        Returns how many keys were removed. The agent itself and its presence stay.
        """
        if not (_is_id(tenant_id) and _is_id(agent_id)):
            return 0
        with self._db.transaction(write=True) as conn:
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
                self._db.changed()
        return removed

    def remove_agent(self, tenant_id: str, agent_id: str) -> bool:
        """Remove the agent, its keys and its presence row (the presence log is kept).

        Returns False if there was no such agent.
        """
        if not (_is_id(tenant_id) and _is_id(agent_id)):
            return False
        args = (tenant_id, agent_id)
        with self._db.transaction(write=True) as conn:
            conn.execute("DELETE FROM keys WHERE tenant_id = ? AND agent_id = ?", args)
            conn.execute("DELETE FROM presence WHERE tenant_id = ? AND agent_id = ?", args)
            cur = conn.execute("DELETE FROM agents WHERE tenant_id = ? AND agent_id = ?", args)
            removed = cur.rowcount > 0
            if removed:
                self._db.changed()
        return removed

    def set_disabled(self, tenant_id: str, agent_id: str, disabled: bool) -> bool:
        """Disable (or re-enable) an agent; a disabled agent cannot authenticate.

        Returns False if there is no such agent.
        """
        if not (_is_id(tenant_id) and _is_id(agent_id)):
            return False
        with self._db.transaction(write=True) as conn:
            cur = conn.execute(
                "UPDATE agents SET disabled = ? WHERE tenant_id = ? AND agent_id = ?",
                (1 if disabled else 0, tenant_id, agent_id),
            )
            found = cur.rowcount > 0
            if found:
                self._db.changed()
        return found

    def keys_for(self, tenant_id: str, agent_id: str) -> tuple[PublicKey, ...]:
        """The agent's usable keys; empty if the agent is unknown, disabled or has no keys."""
        if not (_is_id(tenant_id) and _is_id(agent_id)):
            return ()
        with self._db.transaction() as conn:
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
        with self._db.transaction() as conn:
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
        with self._db.transaction() as conn:
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

    def _parse_row_key(self, row: tuple[str, str, str, str]) -> PublicKey | None:
        """Parse a stored key line; skip (with a warning) one that is damaged."""
        tenant_id, agent_id, fingerprint, line = row
        try:
            key = parse_public_key(line)
        except ArtcafeError as exc:
            logger.warning(
                "registry %r: ignoring unreadable key %s of %s/%s: %s",
                self._db.path,
                fingerprint,
                tenant_id,
                agent_id,
                exc,
            )
            return None
        if key.fingerprint != fingerprint:
            logger.warning(
                "registry %r: ignoring key of %s/%s whose fingerprint does not match (%s)",
                self._db.path,
                tenant_id,
                agent_id,
                fingerprint,
            )
            return None
        return key
