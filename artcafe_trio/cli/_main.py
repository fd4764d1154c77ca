"""The ``artcafe-trio`` command line.

Sub-commands::

    keygen                     generate an agent key pair (private PEM 0600 + OpenSSH .pub),
                               or print a key file's fingerprint (--fingerprint)
    agents add|list|remove|disable|enable
                               manage the registry database (works while a hub runs)
    hub                        run a hub until SIGINT/SIGTERM (graceful: agents get 1012);
                               --dashboard serves the live dashboard, --alert-webhook alerts
    dashboard-token            a read-only dashboard token for one tenant
    status                     the live presence table from a running hub (admin channel),
                               or the last known presence from the database (exit code 3)
    publish / listen           poke at a running hub as an agent
    demo                       a self-contained demonstration (artcafe_trio.demo)

Exit codes: 0 success, 1 error (one ``error: ...`` line on stderr, sometimes followed by
a ``hint: ...`` line; no traceback),
2 usage error (or ``demo`` not available), 3 hub not running (``status``),
130 interrupted by Ctrl+C. Ctrl+C is the normal way to end ``listen`` and
``status --watch``, so those exit 0; ``hub`` stops gracefully on SIGINT/SIGTERM
and exits 0 too. ``artcafe-trio`` without a command prints the help on stdout
and exits 0; ``artcafe-trio agents`` without an action prints the ``agents``
help on stdout and exits 2 (usage).
Private keys, signatures and the admin token are never printed. Times are
printed as ISO-8601 in UTC with a ``Z`` suffix.

The commands are thin layers over the public API (``artcafe_trio``, ``artcafe_trio.protocol``,
``artcafe_trio.registry``, ``artcafe_trio.dashboard``), one module each: ``_keycmd``,
``_agentscmd`` (agents, dashboard-token), ``_hubcmd``, ``_status`` (with ``_presence``, the
printer, and ``_admin``, the admin client), ``_agentio`` (publish, listen), ``_democmd``;
``_parser`` builds the argument parser; this module runs it and reports errors. The few
private helpers still needed are listed in ``tests/test_cli_layout.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from artcafe_trio import ArtcafeError, HubError, KeyLoadError, RegistryError

from ._common import (
    EXIT_ERROR,
    EXIT_HUB_DOWN,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    _err,
    _note,
)
from ._parser import build_parser

__all__ = [
    "EXIT_ERROR",
    "EXIT_HUB_DOWN",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CliError as exc:
        _err(str(exc))
        return exc.code
    except (KeyLoadError, RegistryError, ArtcafeError, OSError, ValueError) as exc:
        _err(_describe(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _note("interrupted")
        return 130


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, HubError):
        return f"the hub refused the request: {text}"
    return text


if __name__ == "__main__":
    raise SystemExit(main())
