"""``status``: the live presence table from a running hub (admin channel), or the last
known presence from the database (exit code 3)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from artcafe_trio import Registry

if TYPE_CHECKING:
    from artcafe_trio.nats import KvEntry

from ._admin import _admin_session
from ._common import (
    ADMIN_SUFFIX,
    DEFAULT_DB,
    EXIT_HUB_DOWN,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    HubUnreachable,
    _err,
    _iso,
    _note,
    _ssl_context,
    log,
)
from ._presence import _registry_presence_json, _StatusPrinter

__all__ = ["_cmd_status", "_read_admin_file"]


def _read_admin_file(path: str) -> tuple[str, str] | None:
    """``(url, token)`` from a hub's admin file; ``None`` if there is none (or it is unusable)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.debug("unreadable admin file %s: %s", path, exc)
        _note(f"warning: ignoring unreadable admin file {os.path.abspath(path)}")
        return None
    url, token = (data.get("url"), data.get("token")) if isinstance(data, dict) else (None, None)
    if not isinstance(url, str) or not isinstance(token, str):
        _note(f"warning: ignoring malformed admin file {os.path.abspath(path)}")
        return None
    return url, token


NATS_BOUND = 15.0
"""The most ``status --nats`` waits for NATS (connect, bind the bucket, read the leases)."""


def _lease_row(entry: KvEntry, now: float) -> dict[str, Any] | None:
    """One hub lease (a ``KvEntry`` of ``h.<hub>``) as ``status --nats`` shows it;
    ``None`` for a lease deleted by a graceful stop (that hub has left)."""
    from artcafe_trio.cluster import HubLease
    from artcafe_trio.nats import KvOp

    hub_id = entry.key.removeprefix("h.")
    age = None if entry.time is None else round(max(0.0, now - entry.time), 3)
    row: dict[str, Any] = {
        "hub_id": hub_id, "urls": [], "draining": False, "started": None,
        "lease_age": age, "lease_ttl": entry.ttl, "state": "live",
    }  # fmt: skip
    if entry.op is KvOp.EXPIRED:
        row["state"] = "expired"
        return row
    if entry.op is not KvOp.PUT:
        return None
    try:
        lease = HubLease.decode(entry.value)
    except ValueError as exc:
        log.debug("unreadable lease %s: %s", entry.key, exc)
        _note(f"warning: ignoring an unreadable lease for hub {hub_id!r}")
        return None
    row.update(urls=list(lease.urls), draining=lease.draining, started=_iso(lease.started))
    if age is not None and entry.ttl is not None and age > entry.ttl:
        row["state"] = "past_ttl"  # the server has not removed it yet: dead or frozen
    return row


async def _read_cluster_hubs(servers: Sequence[str], bucket: str) -> list[dict[str, Any]]:
    """The cluster's hubs from their leases (``h.*``) in ``bucket``; lease age is the
    time since the hub last wrote its lease (the server's time of that write, against
    this machine's clock)."""
    from artcafe_trio.nats import open_nats

    async with open_nats(list(servers), name="artcafe-trio status") as nc:
        kv = await nc.key_value(bucket, create=False)
        entries = [await kv.entry(key) for key in await kv.keys("h.*")]
    now = time.time()
    rows = [_lease_row(e, now) for e in entries if e is not None]
    return [row for row in rows if row is not None]


def _cluster_hubs(servers_text: str, bucket: str) -> list[dict[str, Any]]:
    """:func:`_read_cluster_hubs` for the command line (bounded, errors as ``CliError``)."""
    import trio

    from artcafe_trio.nats import BucketNotFoundError, NatsError

    servers = [part.strip() for part in servers_text.split(",") if part.strip()]
    if not servers:
        raise CliError("--nats needs at least one NATS server URL", EXIT_USAGE)

    async def run() -> list[dict[str, Any]]:
        with trio.move_on_after(NATS_BOUND):
            try:
                return await _read_cluster_hubs(servers, bucket)
            except BucketNotFoundError:
                raise CliError(
                    f"no cluster bucket {bucket!r} on {servers_text} (no hub ran with --nats)"
                ) from None
            except NatsError as exc:
                raise CliError(f"NATS ({servers_text}): {exc}") from None
        raise CliError(f"NATS ({servers_text}) did not answer within {NATS_BOUND:g} s")

    return trio.run(run)


def _cmd_status(args: argparse.Namespace) -> int:
    import trio

    db: str | None = args.db
    admin_file: str | None = args.admin_file
    if admin_file is None and db is None:
        db = DEFAULT_DB
    if admin_file is None:
        assert db is not None
        admin_file = db + ADMIN_SUFFIX
    printer = _StatusPrinter(args.json, args.watch, sys.stdout)
    if args.nats is not None:
        if args.watch:
            raise CliError("status --nats does not --watch (yet): run it again", EXIT_USAGE)
        printer.hubs = _cluster_hubs(args.nats, args.nats_bucket)
    admin = _read_admin_file(admin_file)
    why = f"no admin file {os.path.abspath(admin_file)}"
    if admin is not None:
        url, token = admin
        try:
            trio.run(_admin_session, url, token, _ssl_context(url, args.cafile), printer)
        except HubUnreachable as exc:
            why = str(exc)
        except KeyboardInterrupt:
            if not args.watch:
                raise  # a one-shot query interrupted: 130, like the other commands
            return EXIT_OK  # Ctrl+C is how --watch ends
        else:
            return EXIT_OK
    if db is None:
        _err(f"hub not running ({why}); give --db to show the last known presence")
        return EXIT_HUB_DOWN
    if not os.path.exists(db):
        _err(f"hub not running ({why}) and no registry database at {os.path.abspath(db)!r}")
        return EXIT_HUB_DOWN
    with Registry.open(db) as registry:
        records = registry.list_agents()
    _note(f"hub not running; showing last known presence from DB ({why})")
    printer.watch = False
    printer.show([_registry_presence_json(r) for r in records])
    return EXIT_HUB_DOWN
