"""``hub``: its options → :class:`~artcafe_trio.HubConfig` (defaults shown in ``--help``),
the dashboard, alert webhooks and metrics beside it, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ._common import (
    ADMIN_SUFFIX,
    DEFAULT_HOST,
    EXIT_ERROR,
    EXIT_OK,
    METRICS_HINT,
    CliError,
    _err,
    _port,
    log,
)

__all__ = ["_HUB_FLAGS", "_HubDefault", "_cmd_hub", "_dashboard_address", "_hub_config_kwargs"]


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

    from artcafe_trio import HubConfig

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
    "reply_window_bytes": "reply_window_bytes",
    "write_stall_timeout": "write_stall_timeout",
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
    from artcafe_trio.dashboard import AlertFilter, WebhookConfig

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


def _cluster_config(args: argparse.Namespace) -> Any:
    """``--nats`` and its options as a ``ClusterConfig``, or ``None`` (a hub alone)."""
    if args.nats is None:
        if getattr(args, "advertise_url", None) is not None:
            raise CliError("--advertise-url needs --nats (it is for a cluster of hubs)")
        return None
    from artcafe_trio.cluster import ClusterConfig

    from ._natscli import nats_tls

    tls = nats_tls(args)
    advertise = getattr(args, "advertise_url", None)
    if advertise is not None and not advertise.startswith(("ws://", "wss://")):
        raise CliError(f"--advertise-url must be a ws:// or wss:// URL, not {advertise!r}")
    try:
        return ClusterConfig(
            servers=args.nats, lease_ttl=args.nats_lease_ttl, replicas=args.nats_replicas,
            bucket=args.nats_bucket, shared_credentials=args.nats_shared_credentials,
            tls=tls, advertise_url=advertise, api_timeout=args.nats_api_timeout,
            claim_ttl=args.nats_claim_ttl,
        )  # fmt: skip
    except ValueError as exc:
        raise CliError(f"--nats: {exc}") from None


def _cmd_hub(args: argparse.Namespace) -> int:
    if args.tls_key is not None and args.tls_cert is None:
        raise CliError("--tls-key needs --tls-cert")
    args.webhooks = _webhook_configs(args)
    config_kwargs = _hub_config_kwargs(args)
    if args.nats is not None and args.hub_id is None:
        raise CliError("--nats needs --hub-id (a stable, unique name for this hub)")
    if args.hub_id is not None:
        config_kwargs["hub_id"] = args.hub_id
    args.cluster = _cluster_config(args)
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
            raise CliError(f"{option} {os.path.abspath(path)}: no such file or not readable")
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

    from artcafe_trio import Hub, HubConfig, serve_hub

    from .._util import collapse_exception_groups

    db: str = args.db
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        collapse_exception_groups(),
    ):
        async with trio.open_nursery() as nursery:
            serve: Callable[..., Any] = serve_hub
            if args.cluster is not None:
                from artcafe_trio.cluster import serve_cluster_hub

                serve = functools.partial(serve_cluster_hub, cluster=args.cluster)
            hub: Hub = await nursery.start(
                functools.partial(
                    serve,
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
                from artcafe_trio.dashboard import serve_dashboard

                host, port = args.dashboard
                try:
                    dashboard_url = await nursery.start(serve_dashboard, hub, host, port)
                except OSError as exc:
                    raise CliError(f"cannot serve the dashboard on {host}:{port}: {exc}") from None
                print(f"dashboard at {dashboard_url} (open with ?token=<token>)", flush=True)
            webhooks: list[Any] = []
            if args.webhooks:
                from artcafe_trio.dashboard import Webhook

                for webhook_config in args.webhooks:
                    webhooks.append(Webhook(hub, webhook_config))
                    await nursery.start(webhooks[-1].run)
                    log.info("alert webhook %s", webhook_config.url)
            if start_metrics is not None:
                extra = []
                if webhooks:
                    from artcafe_trio.dashboard._alertmetrics import WebhookCollector

                    extra.append(WebhookCollector(webhooks))
                started = start_metrics(hub, args.metrics_port, extra=extra)
                if inspect.isawaitable(started):
                    await started
                log.info("metrics on port %d", args.metrics_port)
            print(f"hub listening on {hub.url}", flush=True)
            async for signum in signals:
                log.info("%s received: shutting down", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    log.info("hub stopped")
