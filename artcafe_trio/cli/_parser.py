"""The argument parser: every command and option, and the help format (defaults shown)."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from artcafe_trio import __version__

from ._agentio import _cmd_listen, _cmd_publish
from ._agentscmd import (
    _cmd_agents_add,
    _cmd_agents_list,
    _cmd_agents_remove,
    _cmd_agents_set_disabled,
    _cmd_dashboard_token,
)
from ._common import (
    DEFAULT_DB,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEFAULT_URL,
    EXIT_OK,
    EXIT_USAGE,
    _non_negative_float,
    _non_negative_int,
    _port,
    _positive_float,
    _positive_int,
)
from ._democmd import _cmd_demo
from ._hubcmd import _HUB_FLAGS, _cmd_hub, _dashboard_address, _HubDefault
from ._keycmd import _cmd_keygen
from ._natsflags import _add_cluster_flags, _add_nats_tls
from ._status import _cmd_status

__all__ = ["build_parser"]


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


def _add_bucket(parser: argparse.ArgumentParser, *, writes: bool = True) -> None:
    """``agents ... --nats``: the cluster's bucket instead of the SQLite registry."""
    parser.add_argument(
        "--nats", default=None, metavar="URLS",
        help=f"{'write' if writes else 'read'} the cluster's bucket (hubs run with"
        " --nats-shared-credentials) instead of --db: NATS server URLs, comma-separated",
    )  # fmt: skip
    parser.add_argument(
        "--nats-bucket", default="artcafe_cluster", metavar="NAME",
        help="the cluster's key-value bucket (as the hubs' --nats-bucket)",
    )  # fmt: skip
    if writes:
        parser.add_argument(
            "--nats-replicas", type=_positive_int, default=3, metavar="N",
            help="the bucket's replicas if this creates it (as the hubs' --nats-replicas)",
        )  # fmt: skip
    _add_nats_tls(parser)


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

    _add_keygen(commands)
    _add_agents(commands)
    _add_hub(commands)
    _add_dashboard_token(commands)
    _add_status(commands)
    _add_publish_listen(commands)
    _add_demo(commands)

    parser.set_defaults(handler=lambda _args: _print_help(parser))
    return parser


def _add_keygen(commands: Any) -> None:
    """``keygen``."""
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


def _add_agents(commands: Any) -> None:
    """``agents`` and its actions."""
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
    _add_bucket(add)
    add.set_defaults(handler=_cmd_agents_add)

    listing = _command(agent_commands, "list", "list agents, keys and last known presence")
    _add_db(listing, "registry database (SQLite; must exist)")
    listing.add_argument("--tenant", default=None, help="only this tenant (default: all)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    _add_bucket(listing, writes=False)
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
    _add_bucket(remove)
    remove.set_defaults(handler=_cmd_agents_remove)

    disable = _command(agent_commands, "disable", "refuse the agent (sessions are closed)")
    _add_identity(disable)
    _add_bucket(disable)
    disable.set_defaults(handler=functools.partial(_cmd_agents_set_disabled, disabled=True))

    enable = _command(agent_commands, "enable", "accept a disabled agent again")
    _add_identity(enable)
    _add_bucket(enable)
    enable.set_defaults(handler=functools.partial(_cmd_agents_set_disabled, disabled=False))


def _add_hub(commands: Any) -> None:
    """``hub`` (its tuning flags show ``HubConfig``'s defaults)."""
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
        "bytes of output (deliveries, answers, writes in flight) held hub-wide; over it"
        " the connection holding the most is cut off first",
    )
    _add_hub_flag(
        hub,
        "--reply-window-bytes",
        _positive_int,
        "N",
        "bytes of unsent answers to a connection's own frames before the hub stops reading it",
    )
    _add_hub_flag(
        hub,
        "--write-stall-timeout",
        _positive_float,
        "S",
        "seconds one write to a connection may take before it is cut off as a slow consumer",
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
    _add_cluster_flags(hub)  # cluster mode (docs/cluster.md)
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


def _add_dashboard_token(commands: Any) -> None:
    """``dashboard-token``."""
    token = _command(commands, "dashboard-token", "make a read-only dashboard token for one tenant")
    _add_db(token, "registry database (SQLite; must exist)")
    scope = token.add_mutually_exclusive_group(required=True)
    scope.add_argument("--tenant", help="the tenant the token may see")
    scope.add_argument(
        "--all-tenants", action="store_true",
        help="a token that sees every tenant, as the hub's admin token does, but survives"
        " hub restarts",
    )  # fmt: skip
    token.add_argument(
        "--revoke", action="store_true",
        help="revoke every dashboard token of the tenant (or every --all-tenants token) instead",
    )  # fmt: skip
    token.set_defaults(handler=_cmd_dashboard_token)


def _add_status(commands: Any) -> None:
    """``status``."""
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
    status.add_argument(
        "--nats",
        default=None,
        metavar="URLS",
        help="also list the cluster's hubs and their lease ages from NATS (comma-separated"
        " nats://host:port; the hubs' --nats), and with no hub at the admin file the"
        " cluster's presence from the bucket; --json then prints {agents, hubs}",
    )
    status.add_argument(
        "--nats-bucket",
        default="artcafe_cluster",
        metavar="NAME",
        help="the cluster's key-value bucket (as the hubs' --nats-bucket)",
    )
    _add_nats_tls(status)
    status.set_defaults(handler=_cmd_status)


def _add_publish_listen(commands: Any) -> None:
    """``publish`` and ``listen``."""
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


def _add_demo(commands: Any) -> None:
    """``demo``."""
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
    demo.add_argument(
        "--cluster", action="store_true",
        help="three hubs over an embedded nats-server, one SIGKILLed mid-run"
        " (needs pip install 'artcafe-trio[cluster]')",
    )  # fmt: skip
    demo.set_defaults(handler=_cmd_demo)


def _print_help(parser: argparse.ArgumentParser) -> int:
    """No command: the help on stdout, success."""
    parser.print_help()
    return EXIT_OK


def _usage_help(parser: argparse.ArgumentParser) -> int:
    """A command group given without its action: its help on stdout, usage error."""
    parser.print_help()
    return EXIT_USAGE
