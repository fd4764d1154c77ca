"""``status``: the live presence table from a running hub (admin channel), or the last
known presence from the database (exit code 3); with ``--nats``, the cluster's hubs from
their leases, and without a reachable hub the cluster's presence from the bucket."""

from __future__ import annotations

import argparse
import json
import os
import sys
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
    WATCH_TICK,
    HubUnreachable,
    _err,
    _note,
    _ssl_context,
    log,
)
from ._natscli import CLAIMS, LEASES, BucketView, follow_bucket, open_bucket, read_bucket
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


async def _read_cluster_hubs(servers: Sequence[str], bucket: str) -> list[dict[str, Any]]:
    """The cluster's hubs from their leases (``h.*``) in ``bucket``; lease age is the
    time since the hub last wrote its lease (the server's time of that write, against
    this machine's clock)."""
    from artcafe_trio.nats import open_nats

    view = BucketView((LEASES,))
    async with open_nats(list(servers), name="artcafe-trio status") as nc:
        await read_bucket(await nc.key_value(bucket, create=False), view)
    return view.hub_rows()


class _Changed:
    """Set when a claim changes (``status --nats --watch`` from the bucket redraws)."""

    def __init__(self) -> None:
        import trio

        self.event = trio.Event()

    def on_entry(self, entry: KvEntry) -> None:
        if entry.key.startswith(CLAIMS):
            self.event.set()

    async def wait(self) -> None:
        """Until a claim changes, or :data:`WATCH_TICK` (ages and lease ages tick)."""
        import trio

        with trio.move_on_after(WATCH_TICK):
            await self.event.wait()
        self.event = trio.Event()


def _status_cluster(
    args: argparse.Namespace, printer: _StatusPrinter, admin: tuple[str, str] | None, why: str
) -> int:
    """``status --nats``: the hubs from their leases, refreshed at every redraw, with
    the presence table of the hub in the admin file, or — no hub there — the cluster's
    presence from the bucket's claims (exit 3 if no hub holds a live lease)."""
    import trio

    from .._util import collapse_exception_groups

    view = BucketView((LEASES, CLAIMS))
    printer.hubs_source = view.hub_rows
    changed = _Changed()

    async def show() -> int:
        nonlocal why
        if admin is not None:
            url, token = admin
            try:
                await _admin_session(url, token, _ssl_context(url, args.cafile), printer)
                return EXIT_OK
            except HubUnreachable as exc:
                why = str(exc)
        _note(f"presence from the cluster's claims in bucket {args.nats_bucket!r} ({why})")
        printer.nobody = "no agents known to the cluster"
        while True:
            printer.show(view.presence_rows())
            if not printer.watch:
                break
            await changed.wait()
        if view.live_hubs():
            return EXIT_OK
        _note("no hub holds a live lease: the claims are as the hubs left them")
        return EXIT_HUB_DOWN

    async def run() -> int:
        async with open_bucket(args, "artcafe-trio status", create=False) as bucket:
            with collapse_exception_groups():
                async with trio.open_nursery() as nursery:
                    if printer.watch:
                        await nursery.start(follow_bucket, bucket.kv, view, changed.on_entry)
                    else:
                        await read_bucket(bucket.kv, view)
                    bucket.answered()
                    code = await show()
                    nursery.cancel_scope.cancel()
        return code

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
    admin = _read_admin_file(admin_file)
    why = f"no admin file {os.path.abspath(admin_file)}"
    if args.nats is not None:
        try:
            return _status_cluster(args, printer, admin, why)
        except KeyboardInterrupt:
            if not args.watch:
                raise
            return EXIT_OK  # Ctrl+C is how --watch ends
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
