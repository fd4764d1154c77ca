"""The ``--nats*`` options: the hub's cluster flags and the NATS TLS options that
``hub``, ``agents`` and ``status`` share (docs/cluster.md)."""

from __future__ import annotations

import argparse

from ._common import _positive_float, _positive_int

__all__ = ["_add_cluster_flags", "_add_nats_tls"]


def _add_nats_tls(parser: argparse.ArgumentParser, who: str = "this command's") -> None:
    """``--nats-ca``, ``--nats-cert``, ``--nats-key`` (``hub``, ``agents``, ``status``)."""
    parser.add_argument(
        "--nats-ca", metavar="PEM",
        help="CA bundle to verify tls:// NATS servers (default: system CAs; NATS user,"
        " password or token go in the URLs: nats://user:pass@host:4222)",
    )  # fmt: skip
    parser.add_argument(
        "--nats-cert", metavar="PEM",
        help=f"{who} client certificate for NATS servers that require mutual TLS"
        " (default: none; needs --nats-key)",
    )  # fmt: skip
    parser.add_argument(
        "--nats-key", metavar="PEM", help="the private key of --nats-cert (default: none)"
    )


def _add_cluster_flags(hub: argparse.ArgumentParser) -> None:
    """``hub --nats ... --hub-id ...`` and the options of cluster mode."""
    hub.add_argument(
        "--nats",
        metavar="URLS",
        help="join a cluster of hubs over these NATS servers (comma-separated"
        " nats://host:port; default: a hub alone)",
    )
    hub.add_argument(
        "--hub-id",
        metavar="NAME",
        help="this hub's id, unique in the cluster and stable across restarts"
        " (default: a random one; needed with --nats)",
    )
    hub.add_argument(
        "--nats-lease-ttl",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="the hub's lease TTL in the cluster, s: a dead hub is noticed within it",
    )
    hub.add_argument(
        "--nats-claim-ttl",
        type=_positive_float,
        default=3600.0,
        metavar="S",
        help="TTL of each presence claim in the cluster bucket, s (longer than"
        " --nats-lease-ttl, at least 2): a backstop; an online claim that no hub"
        " refreshes (every hub that could reap it gone) expires and is reported hub_lost",
    )
    hub.add_argument(
        "--nats-bucket",
        default="artcafe_cluster",
        metavar="NAME",
        help="the cluster's key-value bucket (the same on every hub of one cluster)",
    )
    _add_nats_tls(hub, "this hub's")
    hub.add_argument(
        "--nats-api-timeout",
        type=_positive_float,
        default=5.0,
        metavar="S",
        help="how long one JetStream call (bucket, claim) may take, s; raise it on a"
        " slow NATS cluster",
    )
    hub.add_argument(
        "--advertise-url",
        metavar="URL",
        help="the ws:// or wss:// URL agents should use to reach this hub, advertised"
        " to the other hubs' agents for failover (default: the listening URL)",
    )
    hub.add_argument(
        "--nats-shared-credentials",
        action="store_true",
        help="authenticate from the agents' keys in the cluster's bucket (the same on"
        " every hub) instead of --db's",
    )
    hub.add_argument(
        "--nats-replicas",
        type=_positive_int,
        default=3,
        metavar="N",
        help="replicas of the cluster's key-value bucket (1 on a single NATS node)",
    )
