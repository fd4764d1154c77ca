"""Presence as ``status`` prints it: JSON objects, the table, and the printer that
``--watch`` redraws."""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from artcafe_trio import PresenceRecord
from artcafe_trio.registry import AgentRecord

from ._common import _iso, _table

__all__ = [
    "_StatusPrinter",
    "_hubs_table",
    "_presence_json",
    "_presence_table",
    "_registry_presence_json",
]


def _presence_json(record: PresenceRecord, source: str) -> dict[str, Any]:
    """A ``PresenceRecord`` as the JSON object ``status --json`` prints."""
    return {
        "tenant_id": record.tenant_id,
        "agent_id": record.agent_id,
        "status": record.status,
        "reason": record.reason,
        "session_id": record.session_id,
        "since": _iso(record.since),
        "last_seen": _iso(record.last_seen),
        "last_heartbeat_ack": _iso(record.last_heartbeat),
        "heartbeat_timeout": record.heartbeat_timeout,
        "hub_id": record.hub_id,
        "source": source,
    }


def _registry_presence_json(record: AgentRecord) -> dict[str, Any]:
    """Last known presence from the database; with no hub running nobody is online."""
    if record.status == "offline":
        reason = record.reason
    elif record.status == "online":
        reason = "disconnected"  # the hub died with the agent online (as a restart records it)
    else:
        reason = None  # never seen
    return {
        "tenant_id": record.tenant_id,
        "agent_id": record.agent_id,
        "status": "offline",
        "reason": reason,
        "session_id": None,
        "since": None,
        "last_seen": _iso(record.last_seen),
        "last_heartbeat_ack": _iso(record.last_heartbeat),
        "heartbeat_timeout": None,
        "source": "registry",
    }


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def _shows_hubs(rows: Sequence[dict[str, Any]]) -> bool:
    """A HUB column only when the rows name more than one hub (a cluster's table): a
    single hub's table stays as it always was."""
    return len({row.get("hub_id") for row in rows} - {None}) > 1


def _presence_table(
    rows: Sequence[dict[str, Any]], now: float | None = None, hubs: bool | None = None
) -> str:
    """The presence table; with ``now`` (``--watch``), times also show their age; with
    ``hubs`` (default: :func:`_shows_hubs`), each agent's hub."""
    if hubs is None:
        hubs = _shows_hubs(rows)
    headers: tuple[str, ...] = ("TENANT", "AGENT", "STATUS", "REASON")
    headers += ("HUB",) * hubs + ("LAST SEEN", "LAST HEARTBEAT ACK")

    def short(value: str | None) -> str:
        if not value:
            return "-"
        text = value[:19] + "Z"
        if now is not None:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            text += f" ({_age(now - moment)})"
        return text

    return _table(
        headers,
        [
            (
                row["tenant_id"],
                row["agent_id"],
                row["status"],
                row["reason"] or "-",
                *((row.get("hub_id") or "-",) * hubs),
                short(row["last_seen"]),
                short(row["last_heartbeat_ack"]),
            )
            for row in rows
        ],
    )


def _hubs_table(hubs: Sequence[dict[str, Any]]) -> str:
    """The cluster's hubs (``status --nats``): one row per lease."""

    def age(hub: dict[str, Any]) -> str:
        text = "-" if hub["lease_age"] is None else f"{hub['lease_age']:.1f} s"
        if hub["state"] == "past_ttl":
            text += f" (past its {hub['lease_ttl']:g} s TTL: dead or frozen, expiry pending)"
        elif hub["state"] == "expired":
            text += " (lease expired: the hub is gone)"
        return text

    return _table(
        ("HUB", "URLS", "DRAINING", "LEASE AGE"),
        [
            (hub["hub_id"], ",".join(hub["urls"]) or "-", "yes" if hub["draining"] else "no",
             age(hub))
            for hub in hubs
        ],
    )  # fmt: skip


#: The line ``status`` adds when the hub says its cluster view is degraded.
DEGRADED_NOTE = "cluster view degraded (see docs/cluster.md, 'Degraded mode'): "


class _StatusPrinter:
    def __init__(self, as_json: bool, watch: bool, stream: IO[str]) -> None:
        self.as_json = as_json
        self.watch = watch
        self.stream = stream
        self.tty = stream.isatty()
        #: The cluster's hubs (``status --nats``), shown with the presence table.
        self.hubs: list[dict[str, Any]] | None = None
        #: Where :attr:`hubs` comes from at every redraw (``status --nats``: the
        #: leases as a watch keeps them, their ages as of the redraw).
        self.hubs_source: Callable[[], list[dict[str, Any]]] | None = None
        #: What an empty table says.
        self.nobody = "no agents known to the hub"

    def show(self, rows: Sequence[dict[str, Any]], degraded: Sequence[str] = ()) -> None:
        """Print the table; ``degraded``: why the hub's cluster view is degraded
        (``presence_state.degraded``: ``fenced``, ``claims_pending``), if it is."""
        if self.hubs_source is not None:
            self.hubs = self.hubs_source()
        if self.as_json:
            # One line per table in watch mode (JSON Lines), pretty otherwise.
            shown: object = list(rows)
            if self.hubs is not None:
                shown = {"agents": shown, "hubs": self.hubs, "degraded": list(degraded)}
            elif degraded:  # the list form stays a list: say it on stderr
                print(DEGRADED_NOTE + ", ".join(degraded), file=sys.stderr, flush=True)
            text = json.dumps(shown, indent=None if self.watch else 2)
        else:
            now = time.time()
            hubs = True if self.hubs is not None else None
            table = _presence_table(rows, now if self.watch else None, hubs)
            text = table if rows else self.nobody
            if self.hubs is not None:
                listed = _hubs_table(self.hubs) if self.hubs else "no hub holds a lease"
                text += "\n\n" + listed
            if degraded:
                text += "\n\n" + DEGRADED_NOTE + ", ".join(degraded)
            if self.watch:
                stamp = _iso(now, "seconds")
                text = f"presence at {stamp} (Ctrl+C to stop)\n{text}"
                if self.tty:
                    text = "\x1b[H\x1b[2J" + text
                else:
                    text += "\n"
        print(text, file=self.stream, flush=True)
