"""How a hub joins a cluster: :class:`ClusterConfig` (``serve_hub(cluster=...)``)."""

from __future__ import annotations

import math
import ssl

import attrs

__all__ = ["MIN_CLAIM_TTL", "ClusterConfig"]

#: The shortest claim TTL: NATS counts message TTLs in whole seconds, and a claim is
#: refreshed at 0.4-0.5 of its TTL.
MIN_CLAIM_TTL = 2.0


def _servers(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",")]
    servers = tuple(part for part in value if part)
    if not servers:
        raise ValueError("a cluster needs at least one NATS server URL")
    return servers


def _advertise(_inst: object, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and (
        not value.startswith(("ws://", "wss://")) or not value.split("://", 1)[1].strip("/")
    ):
        raise ValueError(f"advertise_url must be a ws:// or wss:// URL, not {value!r}")


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


@attrs.frozen(kw_only=True)
class ClusterConfig:
    """A hub's place in a cluster of hubs over NATS (see ``docs/cluster.md``).

    Every hub of one cluster uses the same NATS cluster and ``bucket``, and its own
    ``HubConfig.hub_id`` (stable across restarts). The reaper waits
    ``HubConfig.disconnect_grace`` after a lost lease before marking its agents
    offline.

    Attributes:
        servers: NATS URLs (a list, or one comma-separated string).
        lease_ttl: the hub lease's TTL, s: a dead hub is noticed within about this
            (refreshed every third of it).
        claim_ttl: the TTL of every presence claim, s (longer than ``lease_ttl``): a
            backstop, so that no online claim outlives every hub that could clean it
            (a claim's hub rewrites it every 0.4-0.5 of this while the agent is
            online; one nobody rewrites expires, and every hub reports the agent
            offline ``hub_lost``). An offline claim expires after it too.
        bucket: the JetStream key-value bucket shared by the hubs.
        replicas: the bucket's replicas (3 on a 3-node NATS cluster; 1 on one node).
        flush_timeout: how long a publish waits for NATS to have it before it is
            confirmed anyway (the loss is logged).
        claim_timeout: how long a session's claim may take before the session is
            served without it (logged; the cluster view is then degraded).
        stop_timeout: the bound on the graceful handover at shutdown.
        api_timeout: how long one JetStream API call (creating or binding the
            bucket, a claim, a lease refresh) may take before it fails; raise it
            on a slow or busy NATS cluster.
        dedupe_window: how long a routed publish id is remembered, s.
        dedupe_size: how many routed publish ids are remembered at most.
        shared_credentials: authenticate from the keys in the cluster's bucket
            (``publish_agent``/``remove_agent``), the same on every hub, instead of
            this hub's registry; a key removed or an agent disabled there closes its
            sessions on every hub (within the registry poll interval).
        advertise_url: the URL agents should use to reach this hub (``ws://`` or
            ``wss://``), advertised to agents of the other hubs in their ``welcome``
            (``connect_urls``); default: the URL the hub listens on.
        user, password, token, tls: NATS credentials and TLS context.
    """

    servers: tuple[str, ...] = attrs.field(converter=_servers)
    lease_ttl: float = attrs.field(default=10.0, validator=_positive)
    claim_ttl: float = attrs.field(default=3600.0)
    bucket: str = "artcafe_cluster"
    replicas: int = 3
    flush_timeout: float = attrs.field(default=2.0, validator=_positive)
    claim_timeout: float = attrs.field(default=5.0, validator=_positive)
    stop_timeout: float = attrs.field(default=5.0, validator=_positive)
    api_timeout: float = attrs.field(default=5.0, validator=_positive)
    dedupe_window: float = attrs.field(default=600.0, validator=_positive)
    dedupe_size: int = 65536
    shared_credentials: bool = False
    advertise_url: str | None = attrs.field(default=None, validator=_advertise)
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    token: str | None = attrs.field(default=None, repr=False)
    tls: ssl.SSLContext | None = None

    @claim_ttl.validator
    def _claim_ttl(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not (value >= MIN_CLAIM_TTL and value > self.lease_ttl) or math.isinf(value):
            raise ValueError(
                f"claim_ttl must be finite, >= {MIN_CLAIM_TTL:g} s and longer than "
                f"lease_ttl ({self.lease_ttl:g} s), not {value!r}"
            )
