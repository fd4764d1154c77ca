"""What every command shares: exit codes, defaults, the error to report, output helpers,
argument value types, the registry opener."""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import re
import ssl
import sys
from collections.abc import Sequence

from artcafe_trio import Registry

__all__ = [
    "ADMIN_PATH",
    "ADMIN_SUFFIX",
    "DEFAULT_DB",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_URL",
    "EXIT_ERROR",
    "EXIT_HUB_DOWN",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CliError",
    "HubUnreachable",
]

log = logging.getLogger("artcafe_trio.cli")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_HUB_DOWN = 3
EXIT_INTERRUPTED = 130

DEFAULT_DB = "artcafe-hub.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_URL = f"ws://{DEFAULT_HOST}:{DEFAULT_PORT}"  # the agent's default too
ADMIN_SUFFIX = ".admin"
ADMIN_PATH = "/api/v1/ws/admin"
STATUS_TIMEOUT = 10.0
WATCH_TICK = 1.0  # status --watch redraws at least this often, seconds
PRESENCE_SUBJECT = "$presence.>"
METRICS_HINT = "metrics need: pip install 'artcafe-trio[metrics]'"


class CliError(Exception):
    """A failure to report as one ``error: ...`` line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


class HubUnreachable(Exception):
    """``status``: no hub answered on the admin channel."""


# --------------------------------------------------------------------------- output


def _err(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _iso(moment: float | None, timespec: str = "milliseconds") -> str | None:
    """Unix time → ISO-8601 in UTC with a ``Z`` suffix (``None`` stays ``None``).

    The one time format of the command line: tables, JSON and ``listen`` lines.
    """
    if moment is None:
        return None
    stamp = datetime.datetime.fromtimestamp(moment, tz=datetime.UTC)
    return stamp.replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- argument types


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, not {text!r}")
    return value


# --------------------------------------------------------------------------- options


def _password_from_env(var: str | None) -> str | None:
    """The password in environment variable ``var`` (never echoed anywhere)."""
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise CliError(f"--password-env {var}: the environment variable is not set or empty")
    return value


def _ssl_context(url: str, cafile: str | None) -> ssl.SSLContext | None:
    """The client TLS context for a ``wss://`` hub (``--cafile``), ``None`` for ``ws://``."""
    if not url.startswith("wss://"):
        return None
    return _client_tls_context("--cafile", cafile)


def _client_tls_context(flag: str, cafile: str | None) -> ssl.SSLContext:
    """``ssl.create_default_context(cafile=...)``, a file it cannot use told in one line
    that names ``flag`` and the file's absolute path (not ``[Errno 2]`` or ``_ssl.c``)."""
    if cafile is None:
        return ssl.create_default_context()
    path = os.path.abspath(os.path.expanduser(cafile))
    try:
        return ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        problem = "no such file"
    except ssl.SSLError as exc:
        if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            problem = "no certificate found (a PEM CA bundle is expected)"
        else:
            reason = re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc))
            problem = f"not a usable PEM CA bundle ({reason})"
    except OSError as exc:
        problem = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    raise CliError(f"{flag} {path}: {problem}")


def _open_existing_registry(path: str) -> Registry:
    """Open a registry that must already exist (list/remove/... never create one)."""
    if path != ":memory:" and not os.path.exists(path):
        raise CliError(
            f"no registry database at {os.path.abspath(path)!r}: create one with"
            " 'agents add --create' (if a running hub uses this path, its file was deleted:"
            " restart that hub)"
        )
    return Registry.open(path)
