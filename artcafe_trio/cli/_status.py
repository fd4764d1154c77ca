"""``status``: the live presence table from a running hub (admin channel), or the last
known presence from the database (exit code 3)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from artcafe_trio import Registry

from ._admin import _admin_session
from ._common import (
    ADMIN_SUFFIX,
    DEFAULT_DB,
    EXIT_HUB_DOWN,
    EXIT_OK,
    HubUnreachable,
    _err,
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
        _note(f"warning: ignoring unreadable admin file {path}")
        return None
    url, token = (data.get("url"), data.get("token")) if isinstance(data, dict) else (None, None)
    if not isinstance(url, str) or not isinstance(token, str):
        _note(f"warning: ignoring malformed admin file {path}")
        return None
    return url, token


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
    why = f"no admin file {admin_file}"
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
        _err(f"hub not running ({why}) and no registry database at {db!r}")
        return EXIT_HUB_DOWN
    with Registry.open(db) as registry:
        records = registry.list_agents()
    _note(f"hub not running; showing last known presence from DB ({why})")
    printer.watch = False
    printer.show([_registry_presence_json(r) for r in records])
    return EXIT_HUB_DOWN
