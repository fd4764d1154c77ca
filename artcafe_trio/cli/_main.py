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
    demo                       a self-contained demonstration (artcafe_trio.demo._main)

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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import functools
import importlib
import inspect
import json
import logging
import math
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit

from .. import __version__
from .._errors import (
    ArtcafeError,
    AuthenticationError,
    ConnectFailed,
    ConnectionLost,
    HubError,
    KeyLoadError,
    ProtocolError,
    ReconnectFailed,
)
from .._util import write_private_file
from ..protocol import validate_pattern, validate_subject
from ..protocol._frames import PresenceRecord
from ..protocol._keys import PrivateKey, generate_private_key, load_private_key, load_public_key
from ..registry._registry import AgentRecord, Registry, RegistryError

__all__ = [
    "EXIT_ERROR",
    "EXIT_HUB_DOWN",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
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


# --------------------------------------------------------------------------- helpers


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


def _password_from_env(var: str | None) -> str | None:
    """The password in environment variable ``var`` (never echoed anywhere)."""
    if var is None:
        return None
    value = os.environ.get(var)
    if not value:
        raise CliError(f"--password-env {var}: the environment variable is not set or empty")
    return value


def _ssl_context(url: str, cafile: str | None) -> ssl.SSLContext | None:
    if not url.startswith("wss://"):
        return None
    return ssl.create_default_context(cafile=cafile)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def _not_tls(exc: BaseException | None) -> bool:
    """Whether a TLS handshake failed because the server answered in plain text."""
    while exc is not None:
        if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":
            return True
        exc = exc.__cause__
    return False


def _close_text(reason: Any) -> str:
    """A trio-websocket ``CloseReason`` as ``1012 hub shutting down`` (not its repr)."""
    code = getattr(reason, "code", None)
    text = getattr(reason, "reason", None) or ""
    if code is None:
        return "no close code"
    if code == 1006:
        return "1006, without a close frame"
    return f"{code} {text}".rstrip()


def _connection_problem(exc: BaseException, url: str, *, hint: bool = True) -> str:
    """One line for a failed connection to the hub at ``url``: the library's words.

    ``exc`` is what the agent raised (:class:`ConnectFailed`, ``ReconnectFailed`` with
    ``last_cause``, or ``ConnectionLost`` for an established connection) or a raw cause
    (``status``). ``hint=False`` leaves out "(is the hub running?)" where the caller says
    so already.
    """
    from ..agent._connfail import describe_failure

    if isinstance(exc, ReconnectFailed):
        if exc.last_cause is None:
            return str(exc)
        text = _connection_problem(exc.last_cause, url, hint=hint)
        return f"{text} (gave up after {exc.attempts} attempts over {exc.elapsed:.0f} s)"
    if isinstance(exc, ConnectionLost) and not isinstance(exc, ConnectFailed):
        return str(exc)
    return describe_failure(exc, url, hint=hint)[0]


def _open_existing_registry(path: str) -> Registry:
    """Open a registry that must already exist (list/remove/... never create one)."""
    if path != ":memory:" and not os.path.exists(path):
        raise CliError(
            f"no registry database at {path!r}: create one with 'agents add --create' "
            "(if a running hub uses this path, its file was deleted: restart that hub)"
        )
    return Registry.open(path)


# --------------------------------------------------------------------------- keygen


def _cmd_keygen(args: argparse.Namespace) -> int:
    if args.fingerprint is not None:
        return _print_fingerprint(args.fingerprint, args.password_env)
    if args.out is None:
        raise CliError("keygen needs --out PATH (or --fingerprint PATH)", EXIT_USAGE)
    out: str = os.path.abspath(args.out)
    pub = out + ".pub"
    password = _password_from_env(args.password_env)
    if not args.force:
        for path in (out, pub):
            if os.path.lexists(path):
                raise CliError(f"{path} already exists (use --force to overwrite)")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise CliError(f"directory {directory} does not exist")
    key = generate_private_key(args.type, rsa_bits=args.bits)
    pem = key.to_pem(password)
    _write_private(out, pem, force=args.force)
    line = key.public_key.to_openssh(comment=os.path.basename(out)) + "\n"
    with open(pub, "w", encoding="ascii") as f:
        f.write(line)
    print(key.public_key.fingerprint)
    kind = "encrypted " if password else ""
    _note(f"wrote {kind}{args.type} private key {out} (mode 0600) and public key {pub}")
    return EXIT_OK


def _print_fingerprint(path: str, password_env: str | None) -> int:
    """``keygen --fingerprint PATH``: the fingerprint of a private or public key file,
    as ``agents list`` shows it."""
    absolute = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(absolute):
        raise CliError(f"key file not found: {absolute}")
    if not _looks_private(absolute):
        print(load_public_key(absolute).fingerprint)
        return EXIT_OK
    pub = absolute + ".pub"
    quiet = password_env is None and os.path.exists(pub)
    key = _load_key_for_cli(absolute, password_env, quiet_if_encrypted=quiet)
    if key is None:  # encrypted, no password: its .pub file tells the same
        print(load_public_key(pub).fingerprint)
        _note(f"read from {pub} (the private key is encrypted)")
        return EXIT_OK
    print(key.public_key.fingerprint)
    return EXIT_OK


def _load_key_for_cli(
    path: str, password_env: str | None, *, quiet_if_encrypted: bool = False
) -> PrivateKey | None:
    """Load a private key, telling problems with the command line's own words.

    An encrypted key without ``--password-env`` names the flag; a password given for
    a key that is not encrypted is a warning (``None``: encrypted and ``quiet_if_encrypted``).
    """
    password = _password_from_env(password_env)
    absolute = os.path.abspath(os.path.expanduser(path))
    try:
        key = load_private_key(absolute)
    except KeyLoadError as exc:
        if exc.reason != "password_required":
            raise
        if quiet_if_encrypted and password is None:
            return None
        if password is None:
            raise CliError(
                f"private key {absolute} is encrypted: give its password with"
                " --password-env VAR (VAR: an environment variable that holds it)"
            ) from None
        try:
            return load_private_key(absolute, password)
        except KeyLoadError as wrong:
            if wrong.reason != "wrong_password":
                raise
            raise CliError(
                f"cannot decrypt private key {absolute}: wrong password in"
                f" --password-env {password_env}"
            ) from None
    if password is not None:
        _note(
            f"warning: private key {absolute} is not encrypted;"
            f" --password-env {password_env} is ignored"
        )
    return key


def _write_private(path: str, data: bytes, *, force: bool) -> None:
    """Write ``data`` to a new file created with mode 0600 (atomically replaced with force)."""
    if force:
        write_private_file(path, data)
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, 0o600), "wb") as f:
        f.write(data)


# --------------------------------------------------------------------------- agents


def _agent_json(record: AgentRecord) -> dict[str, Any]:
    return {
        "tenant_id": record.tenant_id,
        "agent_id": record.agent_id,
        "disabled": record.disabled,
        "fingerprints": list(record.fingerprints),
        "created_at": _iso(record.created_at),
        "status": record.status,
        "reason": record.reason,
        "last_seen": _iso(record.last_seen),
        "last_heartbeat_ack": _iso(record.last_heartbeat),
    }


def _looks_private(path: str) -> bool:
    """Whether ``path`` holds a private key (PEM or OpenSSH ``... PRIVATE KEY-----``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except OSError:
        return False
    return b"PRIVATE KEY-----" in head


def _cmd_agents_add(args: argparse.Namespace) -> int:
    path: str = args.public_key
    try:
        public_key = load_public_key(path)
    except KeyLoadError:
        if not _looks_private(path):
            raise
        pub = path + ".pub"
        which = f"the .pub file ({pub})" if os.path.exists(pub) else "its public key (.pub) file"
        raise CliError(f"{path}: this looks like a private key; pass {which}") from None
    with (Registry.open if args.create else _open_existing_registry)(args.db) as registry:
        try:
            fingerprint = registry.add_key(args.tenant, args.agent, public_key)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    print(fingerprint)
    _note(f"added key for {args.tenant}/{args.agent} to {args.db}")
    return EXIT_OK


def _cmd_agents_list(args: argparse.Namespace) -> int:
    with _open_existing_registry(args.db) as registry:
        records = registry.list_agents(args.tenant)
    if args.json:
        print(json.dumps([_agent_json(r) for r in records], indent=2))
        return EXIT_OK
    if not records:
        _note("no agents registered")
        return EXIT_OK
    headers = ("TENANT", "AGENT", "DISABLED", "KEYS", "STATUS", "REASON", "LAST SEEN")
    rows = [
        (
            r.tenant_id,
            r.agent_id,
            "yes" if r.disabled else "no",
            ",".join(r.fingerprints) or "-",
            r.status or "-",
            r.reason or "-",
            _iso(r.last_seen, "seconds") or "-",
        )
        for r in records
    ]
    print(_table(headers, rows))
    return EXIT_OK


def _cmd_agents_remove(args: argparse.Namespace) -> int:
    with _open_existing_registry(args.db) as registry:
        if args.purge:
            if not registry.remove_agent(args.tenant, args.agent):
                raise CliError(f"no agent {args.tenant}/{args.agent} in {args.db}")
            _note(f"removed agent {args.tenant}/{args.agent}, its keys and its presence")
            return EXIT_OK
        removed = registry.remove_key(args.tenant, args.agent, args.fingerprint)
        if not removed:
            what = f"key {args.fingerprint}" if args.fingerprint else "keys"
            raise CliError(f"no {what} for agent {args.tenant}/{args.agent} in {args.db}")
        left = registry.keys_for(args.tenant, args.agent)
    _note(f"removed {removed} key(s) of {args.tenant}/{args.agent}")
    if not left:
        _note("the agent has no key left: it can no longer authenticate")
    return EXIT_OK


def _cmd_agents_set_disabled(args: argparse.Namespace, disabled: bool) -> int:
    with _open_existing_registry(args.db) as registry:
        if not registry.set_disabled(args.tenant, args.agent, disabled):
            raise CliError(f"no agent {args.tenant}/{args.agent} in {args.db}")
    _note(f"{'disabled' if disabled else 'enabled'} {args.tenant}/{args.agent}")
    return EXIT_OK


# --------------------------------------------------------------------------- hub


class _HubDefault:
    """The default of a ``hub`` flag: the ``HubConfig`` field's, read when help is shown.

    It stays in the parsed arguments when the flag is not given (the hub then
    uses ``HubConfig``'s own default); only ``str()`` (``--help``) imports the hub,
    so that other commands do not pay for importing trio.
    """

    def __init__(self, field: str) -> None:
        self.field = field

    def __str__(self) -> str:
        return _format_default(_hub_config_default(self.field))


def _hub_config_default(field: str) -> Any:
    import attrs

    from ..hub._hub import HubConfig

    return attrs.fields_dict(HubConfig)[field].default


def _format_default(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


# hub flag (argparse dest) → HubConfig field
_HUB_FLAGS = {
    "heartbeat_min": "min_heartbeat_interval",
    "heartbeat_max": "max_heartbeat_interval",
    "disconnect_grace": "disconnect_grace",
    "max_frame_bytes": "max_frame_bytes",
    "max_subscriptions": "max_subscriptions",
    "send_queue": "send_queue_size",
    "send_queue_bytes": "send_queue_bytes",
    "output_budget": "output_budget_bytes",
    "max_unauthenticated": "max_unauthenticated",
    "max_unauthenticated_per_address": "max_unauthenticated_per_address",
    "handshake_timeout": "handshake_timeout",
    "publish_rate": "publish_rate",
    "publish_burst": "publish_burst",
    "auth_failures_free": "auth_failures_free",
    "auth_failure_delay_cap": "auth_failure_delay_cap",
    "auth_failure_memory": "auth_failure_memory",
}


def _hub_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {
        field: getattr(args, option)
        for option, field in _HUB_FLAGS.items()
        if not isinstance(getattr(args, option), _HubDefault | None)
    }
    low = kwargs.get("min_heartbeat_interval")
    high = kwargs.get("max_heartbeat_interval")
    if low is not None and high is not None and low > high:
        raise CliError("--heartbeat-min must not exceed --heartbeat-max")
    return kwargs


def _load_metrics() -> Callable[..., Any] | None:
    """``artcafe_trio.hub._metrics.start_metrics_server``, or ``None`` (message printed)."""
    try:
        module = importlib.import_module("artcafe_trio.hub._metrics")
        start: Callable[..., Any] = module.start_metrics_server
    except (ImportError, AttributeError) as exc:
        _err(f"{METRICS_HINT} ({exc})")
        return None
    return start


def _dashboard_address(text: str) -> tuple[str, int]:
    """``--dashboard`` value: ``HOST:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or DEFAULT_HOST
    try:
        return host, _port(port)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"--dashboard wants HOST:PORT ({exc})") from None


def _webhook_configs(args: argparse.Namespace) -> list[Any]:
    """The ``--alert-*`` options as ``WebhookConfig`` values (checked before the hub starts)."""
    if not args.alert_webhook:
        for option in ("alert_reason", "alert_tenant", "alert_secret_env"):
            if getattr(args, option):
                flag = "--" + option.replace("_", "-")
                raise CliError(f"{flag} needs --alert-webhook")
        if args.alert_min_offline is not None:
            raise CliError("--alert-min-offline needs --alert-webhook")
        return []
    from ..dashboard._webhooks import AlertFilter, WebhookConfig

    secret = None
    if args.alert_secret_env is not None:
        value = os.environ.get(args.alert_secret_env)
        if not value:
            raise CliError(
                f"--alert-secret-env {args.alert_secret_env}: the environment variable is not set"
                " or empty"
            )
        secret = value.encode()
    rules = AlertFilter(
        reasons=frozenset(args.alert_reason or ()),
        tenants=frozenset(args.alert_tenant or ()),
        min_offline=args.alert_min_offline or 0.0,
    )
    configs = []
    for url in args.alert_webhook:
        split = urlsplit(url)
        if split.scheme not in ("http", "https") or not split.hostname:
            raise CliError(f"--alert-webhook {url!r}: not an http:// or https:// URL")
        configs.append(WebhookConfig(url=url, secret=secret, filter=rules))
    return configs


def _cmd_hub(args: argparse.Namespace) -> int:
    if args.tls_key is not None and args.tls_cert is None:
        raise CliError("--tls-key needs --tls-cert")
    args.webhooks = _webhook_configs(args)
    config_kwargs = _hub_config_kwargs(args)
    start_metrics = None
    if args.metrics_port is not None:
        start_metrics = _load_metrics()
        if start_metrics is None:
            return EXIT_ERROR
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for option, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not os.access(path, os.R_OK):
            raise CliError(f"{option} {path}: no such file or not readable")
    import trio

    try:
        trio.run(functools.partial(_run_hub, args, config_kwargs, start_metrics))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CliError(
                f"cannot listen on {args.host}:{args.port}: address already in use"
                " (is another hub running?)"
            ) from None
        raise
    return EXIT_OK


async def _run_hub(
    args: argparse.Namespace,
    config_kwargs: dict[str, Any],
    start_metrics: Callable[..., Any] | None,
) -> None:
    import trio

    from .._util import collapse_exception_groups
    from ..hub._hub import Hub, HubConfig, serve_hub

    db: str = args.db
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        collapse_exception_groups(),
    ):
        async with trio.open_nursery() as nursery:
            hub: Hub = await nursery.start(
                functools.partial(
                    serve_hub,
                    db=db,
                    host=args.host,
                    port=args.port,
                    config=HubConfig(**config_kwargs),
                    tls_cert=args.tls_cert,
                    tls_key=args.tls_key,
                    admin_file=db + ADMIN_SUFFIX,
                )
            )
            if args.dashboard is not None:
                from ..dashboard import serve_dashboard

                host, port = args.dashboard
                try:
                    dashboard_url = await nursery.start(serve_dashboard, hub, host, port)
                except OSError as exc:
                    raise CliError(f"cannot serve the dashboard on {host}:{port}: {exc}") from None
                print(f"dashboard at {dashboard_url} (open with ?token=<token>)", flush=True)
            if args.webhooks:
                from ..dashboard._webhooks import Webhook

                for webhook_config in args.webhooks:
                    await nursery.start(Webhook(hub, webhook_config).run)
                    log.info("alert webhook %s", webhook_config.url)
            if start_metrics is not None:
                started = start_metrics(hub, args.metrics_port)
                if inspect.isawaitable(started):
                    await started
                log.info("metrics on port %d", args.metrics_port)
            print(f"hub listening on {hub.url}", flush=True)
            async for signum in signals:
                log.info("%s received: shutting down", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    log.info("hub stopped")


# --------------------------------------------------------------------------- dashboard-token


def _cmd_dashboard_token(args: argparse.Namespace) -> int:
    from ..dashboard._tokens import create_token

    with _open_existing_registry(args.db) as registry:
        if args.revoke:
            removed = registry.remove_dashboard_tokens(args.tenant)
            _note(f"revoked {removed} dashboard token(s) of tenant {args.tenant}")
            return EXIT_OK
        try:
            token = create_token(registry, args.tenant)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    print(token)
    _note(
        f"read-only dashboard token for tenant {args.tenant} (only its hash is stored in"
        f" {args.db}); open the dashboard with ?token=<it>"
    )
    return EXIT_OK


# --------------------------------------------------------------------------- status


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


def _presence_table(rows: Sequence[dict[str, Any]], now: float | None = None) -> str:
    """The presence table; with ``now`` (``--watch``), times also show their age."""
    headers = ("TENANT", "AGENT", "STATUS", "REASON", "LAST SEEN", "LAST HEARTBEAT ACK")

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
                short(row["last_seen"]),
                short(row["last_heartbeat_ack"]),
            )
            for row in rows
        ],
    )


class _StatusPrinter:
    def __init__(self, as_json: bool, watch: bool, stream: IO[str]) -> None:
        self.as_json = as_json
        self.watch = watch
        self.stream = stream
        self.tty = stream.isatty()

    def show(self, rows: Sequence[dict[str, Any]]) -> None:
        if self.as_json:
            # One line per table in watch mode (JSON Lines), pretty otherwise.
            text = json.dumps(list(rows), indent=None if self.watch else 2)
        else:
            now = time.time()
            table = _presence_table(rows, now if self.watch else None)
            text = table if rows else "no agents known to the hub"
            if self.watch:
                stamp = _iso(now, "seconds")
                text = f"presence at {stamp} (Ctrl+C to stop)\n{text}"
                if self.tty:
                    text = "\x1b[H\x1b[2J" + text
                else:
                    text += "\n"
        print(text, file=self.stream, flush=True)


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


async def _admin_session(
    url: str,
    token: str,
    ssl_context: ssl.SSLContext | None,
    printer: _StatusPrinter,
) -> None:
    """Query (and with ``printer.watch`` follow) the hub's presence table."""
    import trio
    import trio_websocket

    from ..protocol._frames import (
        AdminAuth,
        Challenge,
        Error,
        Frame,
        Message,
        PresenceQuery,
        PresenceState,
        Subscribe,
        Welcome,
        decode,
        encode,
    )

    async def send(ws: trio_websocket.WebSocketConnection, frame: Frame) -> None:
        try:
            await ws.send_message(encode(frame))
        except trio_websocket.ConnectionClosed as exc:
            raise HubUnreachable(
                f"hub closed the admin connection ({_close_text(exc.reason)})"
            ) from None

    async def receive(ws: trio_websocket.WebSocketConnection) -> Frame:
        try:
            return decode(await ws.get_message(), max_bytes=64 * 1024 * 1024)
        except trio_websocket.ConnectionClosed as exc:
            raise HubUnreachable(
                f"hub closed the admin connection ({_close_text(exc.reason)})"
            ) from None

    try:
        with trio.fail_after(STATUS_TIMEOUT) as handshake_scope:
            if ssl_context is not None:
                await _tls_preflight(url, ssl_context)
            async with trio_websocket.open_websocket_url(
                url.rstrip("/") + ADMIN_PATH,
                ssl_context,
                max_message_size=64 * 1024 * 1024,
            ) as ws:
                challenge = await receive(ws)
                if not isinstance(challenge, Challenge):
                    raise CliError(f"unexpected first frame from the hub: {challenge.type!r}")
                await send(ws, AdminAuth(token=token))
                answer = await receive(ws)
                if isinstance(answer, Error):
                    raise AuthenticationError(
                        f"the hub refused the admin token from the admin file: {answer.message}"
                    )
                if not isinstance(answer, Welcome):
                    raise CliError(f"unexpected answer from the hub: {answer.type!r}")
                if printer.watch:
                    await send(ws, Subscribe(id="watch", subject=PRESENCE_SUBJECT))
                query = 0
                await send(ws, PresenceQuery(id=f"q{query}"))
                next_tick = trio.current_time() + WATCH_TICK
                while True:
                    # --watch redraws at every presence change and every WATCH_TICK s, so
                    # that LAST SEEN, LAST HEARTBEAT ACK and their ages stay current.
                    with trio.move_on_at(next_tick if printer.watch else math.inf) as tick:
                        frame = await receive(ws)
                    if tick.cancelled_caught:
                        next_tick = trio.current_time() + WATCH_TICK
                        query += 1
                        await send(ws, PresenceQuery(id=f"q{query}"))
                        continue
                    if isinstance(frame, PresenceState):  # answers come in order: show each
                        printer.show([_presence_json(r, "hub") for r in frame.agents])
                        if not printer.watch:
                            return
                        handshake_scope.deadline = math.inf  # watching: wait forever
                    elif isinstance(frame, Message) and frame.subject.startswith("$presence."):
                        query += 1
                        await send(ws, PresenceQuery(id=f"q{query}"))
                    elif isinstance(frame, Error):
                        raise HubError(frame.code, frame.message)
    except trio.TooSlowError:
        raise HubUnreachable(
            f"the hub at {url} did not answer within {STATUS_TIMEOUT:g} s"
        ) from None
    except (OSError, trio_websocket.HandshakeError) as exc:
        raise HubUnreachable(_connection_problem(exc, url, hint=False)) from None


async def _tls_preflight(url: str, ssl_context: ssl.SSLContext) -> None:
    """Fail fast on a TLS error: trio-websocket only times out on one (its issue #199)."""
    import trio

    split = urlsplit(url)
    host, port = split.hostname or "127.0.0.1", split.port or 443
    try:
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
    except OSError:
        return  # unreachable: the caller's own connection attempt reports (or retries) that
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ or exc
        if _not_tls(cause):
            raise CliError(_connection_problem(exc, url)) from None
        hint = " (pass --cafile to trust its CA)"
        if not isinstance(cause, ssl.SSLCertVerificationError):
            hint = ""
        raise CliError(f"TLS handshake with {host}:{port} failed: {cause}{hint}") from None
    finally:
        with trio.move_on_after(1, shield=True):
            await stream.aclose()


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


# --------------------------------------------------------------------------- publish / listen


def _agent_url(args: argparse.Namespace) -> str:
    """The hub URL the agent will use (as ``open_agent`` resolves it)."""
    url: str = args.url or os.environ.get("ARTCAFE_URL") or DEFAULT_URL
    return url


def _valid(check: Callable[[str], str], value: str) -> str:
    """``value`` checked before connecting: one ``error:`` line instead of a hub refusal."""
    try:
        return check(value)
    except ProtocolError as exc:
        raise CliError(exc.message) from None


def _run_agent(args: argparse.Namespace, run: Callable[[], Any]) -> Any:
    """``trio.run(run)``, with a failed connection told in words, not reprs, and a refused
    key followed by what to check."""
    import trio

    try:
        return trio.run(run)
    except ConnectionLost as exc:
        raise CliError(_connection_problem(exc, _agent_url(args))) from None
    except AuthenticationError as exc:
        if exc.code == "hub_certificate_invalid":
            raise CliError(f"{exc} (pass --cafile to trust its CA)") from None
        key = os.path.abspath(os.path.expanduser(args.key))
        raise CliError(
            f"{exc}\nhint: check 'artcafe-trio agents list --tenant {args.tenant}' on the hub"
            f" and the key's fingerprint ('artcafe-trio keygen --fingerprint {key}')"
        ) from None


def _agent_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    key = _load_key_for_cli(args.key, args.password_env)
    assert key is not None
    kwargs: dict[str, Any] = {
        "url": _agent_url(args),
        "tenant_id": args.tenant,
        "agent_id": args.agent,
        "private_key": key,
        "heartbeat_interval": 30,
    }
    context = _ssl_context(_agent_url(args), args.cafile)
    if context is not None:
        kwargs["ssl_context"] = context
    return kwargs


def _cmd_publish(args: argparse.Namespace) -> int:
    subject = _valid(validate_subject, args.subject)
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        raise CliError(
            f"JSON_DATA is not valid JSON ({exc}); quote a string like this: '\"text\"'"
        ) from None
    kwargs = _agent_kwargs(args)

    async def run() -> str | None:
        from ..agent._agent import open_agent

        # One shot: fail at once if the hub is unreachable instead of backing off.
        async with open_agent(auto_reconnect=False, **kwargs) as agent:
            # Always wait for the hub's answer, so a refusal is an exit code, not a log line.
            return await agent.publish(subject, data, confirm=True)

    message_id = _run_agent(args, run)
    if args.confirm and message_id is not None:
        print(message_id)
    return EXIT_OK


def _cmd_listen(args: argparse.Namespace) -> int:
    pattern = _valid(validate_pattern, args.pattern)
    kwargs = _agent_kwargs(args)

    async def run() -> None:
        import trio

        from ..agent._agent import open_agent
        from ..protocol._frames import Message

        done = trio.Event()
        seen = 0

        def handler(subject: str, data: Any, message: Message) -> None:
            # Handlers of one subscription run in order: the lines come out in order.
            nonlocal seen
            if done.is_set():
                return
            line = {
                "subject": message.subject,
                "data": message.data,
                "sender": message.sender,
                "time": _iso(message.time),
            }
            print(json.dumps(line), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                done.set()

        # The first connection fails fast (nothing to resume yet); once listening, a lost
        # connection is retried with backoff like any agent's.
        async with open_agent(retry_first_connect=False, **kwargs) as agent:
            await agent.subscribe(pattern, handler)
            _note(f"listening on {pattern!r} (Ctrl+C to stop)")
            await done.wait()

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl+C is how listen ends: exit 0
        _run_agent(args, run)
    return EXIT_OK


# --------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module("artcafe_trio.demo._main")
    except ModuleNotFoundError as exc:
        if exc.name != "artcafe_trio.demo._main":
            raise
        _err("demo not available yet")
        return EXIT_USAGE
    result = module.main(args)
    return int(result) if isinstance(result, int) else EXIT_OK


# --------------------------------------------------------------------------- parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help, unless it has no default worth showing.

    Left alone: help that already names its default, required options, and
    options whose default is ``None`` or ``False`` (absent, off).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or action.required
            or default is None
            or default is False
            or default == argparse.SUPPRESS
        ):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"error: {message}\n")


def _command(commands: Any, name: str, text: str) -> _Parser:
    """A sub-command whose ``--help`` starts with its one-line description."""
    parser: _Parser = commands.add_parser(name, help=text, description=text)
    return parser


def _add_db(parser: argparse.ArgumentParser, text: str = "registry database (SQLite)") -> None:
    parser.add_argument("--db", default=DEFAULT_DB, metavar="PATH", help=text)


def _add_identity(
    parser: argparse.ArgumentParser, db_text: str = "registry database (SQLite; must exist)"
) -> None:
    _add_db(parser, db_text)
    parser.add_argument("--tenant", required=True, help="tenant (organization) id")
    parser.add_argument("--agent", required=True, help="agent id")


def _add_agent_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=None, help=f"hub URL (default: $ARTCAFE_URL, else {DEFAULT_URL})"
    )
    parser.add_argument("--tenant", required=True, help="tenant (organization) id")
    parser.add_argument(
        "--agent",
        required=True,
        help="agent id (a registered one; a running agent with the same id is replaced)",
    )
    parser.add_argument("--key", required=True, metavar="PATH", help="the agent's private key")
    parser.add_argument(
        "--password-env", metavar="VAR", help="environment variable holding the key's password"
    )
    parser.add_argument(
        "--cafile", metavar="PEM", help="CA bundle to verify a wss:// hub (default: system CAs)"
    )


def _add_hub_flag(
    parser: argparse.ArgumentParser, flag: str, kind: Callable[[str], Any], metavar: str, text: str
) -> None:
    """A hub tuning flag whose default (shown in ``--help``) is ``HubConfig``'s."""
    dest = flag.removeprefix("--").replace("-", "_")
    field = _HUB_FLAGS[dest]
    parser.add_argument(
        flag,
        type=kind,
        default=_HubDefault(field),
        metavar=metavar,
        help=f"{text}; HubConfig.{field}",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``artcafe-trio`` argument parser."""
    parser = _Parser(
        prog="artcafe-trio",
        description="Agents, a hub and honest presence, for trio.",
        epilog=(
            "exit codes: 0 ok, 1 error, 2 usage, 3 hub not running (status),"
            " 130 interrupted (listen and status --watch: Ctrl+C exits 0)"
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # keygen
    keygen = _command(commands, "keygen", "generate an agent key pair")
    keygen.add_argument(
        "--type",
        choices=("ed25519", "rsa"),
        default="ed25519",
        help="key type: ed25519 (small, fast) or rsa (compatibility)",
    )
    keygen.add_argument("--bits", type=int, default=3072, help="RSA key size, at least 2048")
    keygen_what = keygen.add_mutually_exclusive_group(required=True)
    keygen_what.add_argument(
        "--out", metavar="PATH", help="private key file to write (public key: PATH.pub)"
    )
    keygen_what.add_argument(
        "--fingerprint",
        metavar="PATH",
        help="print the fingerprint of this private or public key file, as 'agents list'"
        " shows it, and write nothing",
    )
    keygen.add_argument(
        "--password-env",
        metavar="VAR",
        help="encrypt with (--fingerprint: decrypt with) the password in this env variable",
    )
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")
    keygen.set_defaults(handler=_cmd_keygen)

    # agents
    agents = _command(commands, "agents", "manage registered agents and their keys")
    agent_commands = agents.add_subparsers(
        dest="agents_command", metavar="ACTION", parser_class=_Parser
    )
    agents.set_defaults(handler=lambda _args: _usage_help(agents))

    add = _command(agent_commands, "add", "register a public key for an agent")
    _add_identity(add, "registry database (SQLite; must exist unless --create)")
    add.add_argument(
        "--public-key", required=True, metavar="PATH", help="OpenSSH public key file (.pub)"
    )
    add.add_argument(
        "--create",
        action="store_true",
        help="create the registry database if it is missing (default: refuse, since a "
        "running hub would never see a new file)",
    )
    add.set_defaults(handler=_cmd_agents_add)

    listing = _command(agent_commands, "list", "list agents, keys and last known presence")
    _add_db(listing, "registry database (SQLite; must exist)")
    listing.add_argument("--tenant", default=None, help="only this tenant (default: all)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_cmd_agents_list)

    remove = _command(
        agent_commands, "remove", "remove one key or all keys (connected sessions are closed)"
    )
    _add_identity(remove)
    which = remove.add_mutually_exclusive_group()
    which.add_argument(
        "--fingerprint", metavar="FP", help="remove only this key (default: all keys)"
    )
    which.add_argument(
        "--purge", action="store_true", help="remove the agent itself with its keys and presence"
    )
    remove.set_defaults(handler=_cmd_agents_remove)

    disable = _command(agent_commands, "disable", "refuse the agent (sessions are closed)")
    _add_identity(disable)
    disable.set_defaults(handler=functools.partial(_cmd_agents_set_disabled, disabled=True))

    enable = _command(agent_commands, "enable", "accept a disabled agent again")
    _add_identity(enable)
    enable.set_defaults(handler=functools.partial(_cmd_agents_set_disabled, disabled=False))

    # hub
    hub = _command(commands, "hub", "run a hub (SIGINT/SIGTERM stop it gracefully)")
    hub.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (0.0.0.0: all interfaces)",
    )
    hub.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help="TCP port to listen on; 0 picks a free one"
    )
    _add_db(hub, "registry database (SQLite; created if missing; admin file: PATH.admin)")
    hub.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="certificate chain: serve wss:// (default: plain ws://)",
    )
    hub.add_argument(
        "--tls-key",
        metavar="PEM",
        help="private key of --tls-cert (default: read from the --tls-cert file)",
    )
    _add_hub_flag(
        hub, "--heartbeat-min", _positive_float, "S", "lowest heartbeat interval agents get, s"
    )
    _add_hub_flag(
        hub, "--heartbeat-max", _positive_float, "S", "highest heartbeat interval agents get, s"
    )
    _add_hub_flag(
        hub,
        "--disconnect-grace",
        _non_negative_float,
        "S",
        "seconds before a dropped agent is reported offline (0: at once)",
    )
    _add_hub_flag(hub, "--max-frame-bytes", _positive_int, "N", "largest frame accepted, bytes")
    _add_hub_flag(hub, "--max-subscriptions", _positive_int, "N", "patterns per connection")
    _add_hub_flag(
        hub,
        "--send-queue",
        _positive_int,
        "N",
        "deliveries queued per connection before it is closed as a slow consumer (4004)",
    )
    _add_hub_flag(
        hub,
        "--send-queue-bytes",
        _positive_int,
        "N",
        "bytes of deliveries queued per connection before it is closed as a slow consumer",
    )
    _add_hub_flag(
        hub,
        "--output-budget",
        _positive_int,
        "N",
        "bytes of deliveries queued hub-wide; over it the largest backlog is cut off first",
    )
    _add_hub_flag(
        hub, "--max-unauthenticated", _positive_int, "N", "unauthenticated connections in total"
    )
    _add_hub_flag(
        hub,
        "--max-unauthenticated-per-address",
        _positive_int,
        "N",
        "unauthenticated connections per client address (the oldest is closed for a new one)",
    )
    _add_hub_flag(
        hub, "--handshake-timeout", _positive_float, "S", "seconds to finish the HTTP upgrade"
    )
    _add_hub_flag(
        hub, "--publish-rate", _positive_float, "R", "sustained publishes per second per agent"
    )
    _add_hub_flag(hub, "--publish-burst", _positive_int, "N", "publishes allowed in a burst")
    _add_hub_flag(
        hub,
        "--auth-failures-free",
        _non_negative_int,
        "N",
        "refused handshakes per address before its checks are slowed down",
    )
    _add_hub_flag(
        hub,
        "--auth-failure-delay-cap",
        _non_negative_float,
        "S",
        "longest wait between two checks of a slowed-down address, s (0: no slow-down)",
    )
    _add_hub_flag(
        hub,
        "--auth-failure-memory",
        _positive_float,
        "S",
        "seconds after its last refusal an address is forgiven",
    )
    hub.add_argument(
        "--metrics-port",
        type=_port,
        metavar="P",
        help="serve Prometheus metrics on this port (default: off; needs the [metrics] extra)",
    )
    hub.add_argument(
        "--dashboard",
        nargs="?",
        const=f"{DEFAULT_HOST}:8766",
        type=_dashboard_address,
        metavar="HOST:PORT",
        help="serve the live dashboard over HTTP (default: off; without a value:"
        f" {DEFAULT_HOST}:8766)",
    )
    hub.add_argument(
        "--alert-webhook",
        action="append",
        metavar="URL",
        help="POST presence transitions as JSON to this URL (repeatable; default: none)",
    )
    hub.add_argument(
        "--alert-reason",
        action="append",
        metavar="REASON",
        help="alert only offline transitions with this reason (repeatable; default: any)",
    )
    hub.add_argument(
        "--alert-tenant",
        action="append",
        metavar="T",
        help="alert only for this tenant (repeatable; default: every tenant)",
    )
    hub.add_argument(
        "--alert-min-offline",
        type=_non_negative_float,
        metavar="S",
        help="alert an offline only once it lasted S seconds (default: at once)",
    )
    hub.add_argument(
        "--alert-secret-env",
        metavar="VAR",
        help="sign webhook bodies (HMAC-SHA256, X-Artcafe-Signature) with the secret in VAR",
    )
    hub.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="log level of the hub's log on stderr",
    )
    hub.set_defaults(handler=_cmd_hub)

    # dashboard-token
    token = _command(commands, "dashboard-token", "make a read-only dashboard token for one tenant")
    _add_db(token, "registry database (SQLite; must exist)")
    token.add_argument("--tenant", required=True, help="the tenant the token may see")
    token.add_argument(
        "--revoke", action="store_true", help="revoke every dashboard token of the tenant instead"
    )
    token.set_defaults(handler=_cmd_dashboard_token)

    # status
    status = _command(commands, "status", "presence table of a running hub (or last known, exit 3)")
    status.add_argument(
        "--db",
        default=None,
        metavar="PATH",
        help=f"registry database; the admin file is PATH.admin (default: {DEFAULT_DB})",
    )
    status.add_argument(
        "--admin-file", metavar="PATH", help="the hub's admin file (default: <db>.admin)"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--watch",
        action="store_true",
        help="redraw at every presence change and every second until Ctrl+C (exit 0)",
    )
    status.add_argument(
        "--cafile", metavar="PEM", help="CA bundle to verify a wss:// hub (default: system CAs)"
    )
    status.set_defaults(handler=_cmd_status)

    # publish / listen
    publish = _command(commands, "publish", "publish one message as an agent")
    _add_agent_options(publish)
    publish.add_argument(
        "subject", metavar="SUBJECT", help="concrete subject (no wildcards), e.g. 'tasks.new'"
    )
    publish.add_argument("data", metavar="JSON_DATA", help="any JSON value, e.g. '{\"x\": 1}'")
    publish.add_argument(
        "--confirm", action="store_true", help="wait for the hub's ack; print the message id"
    )
    publish.set_defaults(handler=_cmd_publish)

    listen = _command(
        commands, "listen", "print matching messages as JSON lines (until Ctrl+C: exit 0)"
    )
    _add_agent_options(listen)
    listen.add_argument(
        "pattern", metavar="PATTERN", help="subject pattern, e.g. 'tasks.>' or '$presence.>'"
    )
    listen.add_argument(
        "--count", type=_positive_int, metavar="N", help="exit after N messages (default: never)"
    )
    listen.set_defaults(handler=_cmd_listen)

    # demo
    demo = _command(
        commands,
        "demo",
        "a hub and agents in one process: staged failures, measured detection times",
    )
    demo.add_argument(
        "--duration", type=_positive_float, default=None, metavar="S",
        help="total seconds (default: about 25 at --interval 1; never shorter than the stages)",
    )  # fmt: skip
    demo.add_argument(
        "--agents", type=_positive_int, default=3, metavar="N",
        help="plain workers besides the staged ones (default 3, at most 100)",
    )  # fmt: skip
    demo.add_argument(
        "--interval", type=_positive_float, default=1.0, metavar="S",
        help="heartbeat interval in seconds, 0.1 to 10 (default 1.0; timeout = 3 x interval)",
    )  # fmt: skip
    demo.set_defaults(handler=_cmd_demo)

    parser.set_defaults(handler=lambda _args: _print_help(parser))
    return parser


def _print_help(parser: argparse.ArgumentParser) -> int:
    """No command: the help on stdout, success."""
    parser.print_help()
    return EXIT_OK


def _usage_help(parser: argparse.ArgumentParser) -> int:
    """A command group given without its action: its help on stdout, usage error."""
    parser.print_help()
    return EXIT_USAGE


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
