"""Prometheus metrics for a hub (the optional ``metrics`` extra: ``prometheus-client``).

A custom collector reads :attr:`Hub.stats` and :meth:`Hub.presence_table` when
Prometheus scrapes, so the hub's hot path pays nothing for metrics. Exported:

==========================================  =======  ======================================
``artcafe_agents_online{tenant}``           gauge    agents online now, per tenant
``artcafe_heartbeats_total``                counter  heartbeats received
``artcafe_presence_transitions_total``      counter  presence transitions, by ``reason``
``artcafe_messages_routed_total``           counter  publishes accepted and routed
``artcafe_deliveries_total``                counter  messages queued to subscribers
``artcafe_slow_consumers_total``            counter  connections cut off as slow consumers
``artcafe_auth_failures_total``             counter  refused authentications
``artcafe_refused_frames_total``            counter  frames answered with an ``error``
``artcafe_rate_limited_total``              counter  publishes refused by the rate limit
``artcafe_connections_total``               counter  WebSocket connections accepted
``artcafe_registry_file_lost``              gauge    1 while the registry file was deleted/replaced
``artcafe_presence_writes_pending``         gauge    presence changes waiting to be written
``artcafe_cluster_fenced``                  gauge    1 while this cluster hub is fenced
``artcafe_cluster_claims_pending``          gauge    1 while a session's claim is retried
==========================================  =======  ======================================

and the gauge ``artcafe_heartbeat_ack_rtt_seconds{tenant}``: the largest heartbeat-ACK
round trip an online agent of the tenant reports (the optional ``rtt`` of its heartbeats).

The two ``artcafe_cluster_`` gauges are the hub's :attr:`~Hub.cluster_degraded` reasons
(``fenced``, ``claims_pending``; always 0 for a hub alone): see ``docs/cluster.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import attrs
import trio
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._hub import Hub

__all__ = ["HubCollector", "collector", "start_metrics_server"]

PRESENCE_REASONS = ("connected", "disconnected", "left", "timeout")
"""Reasons always exported (as 0 until they happen), so rates and alerts have a series."""

_COUNTERS = (
    ("heartbeats", "heartbeats", "Heartbeats received from agents."),
    ("messages_routed", "messages_routed", "Publishes accepted and routed."),
    ("deliveries", "deliveries", "Messages queued for delivery to subscribers."),
    ("slow_consumers", "slow_consumers", "Connections cut off because their send queue was full."),
    ("auth_failures", "auth_failures", "Refused authentications."),
    ("refused_frames", "refused_frames", "Frames refused with an error frame."),
    ("rate_limited", "rate_limited", "Publishes refused by the per-agent rate limit."),
    ("connections", "connections", "WebSocket connections accepted (before authentication)."),
    (
        "handshake_timeouts",
        "handshake_timeouts",
        "Connections closed for not finishing the HTTP upgrade within handshake_timeout.",
    ),
)

# gauge/counter name -> (kind, documentation); values read from the hub's flow control
_FLOW = {
    "unauthenticated_connections": (
        "gauge", "Connections that have not authenticated yet."),
    "unauthenticated_evicted": (
        "counter", "Unauthenticated connections closed to stay within the limits."),
    "output_queued_bytes": (
        "gauge", "Bytes of output held hub-wide: deliveries (a message queued for many counts "
        "once), unsent answers, writes in flight."),
    "output_budget_cut_offs": (
        "counter", "Consumers cut off because the hub-wide output budget was exceeded."),
}  # fmt: skip
_GAUGES = (
    (
        "registry_file_lost",
        "registry_file_lost",
        "1 while the registry file at the hub's path is not the one it opened (deleted).",
    ),
    (
        "presence_writes_pending",
        "presence_writes_pending",
        "Presence changes waiting to be written to the registry (bounded per agent).",
    ),
)


# gauge name -> (the Hub.cluster_degraded reason it shows as 1, documentation)
_DEGRADED = {
    "cluster_fenced": ("fenced", (
        "1 while this hub is fenced: its cluster lease could not be refreshed for a lease "
        "TTL (it keeps serving; other hubs may reap its agents; its view may be stale).")),
    "cluster_claims_pending": ("claims_pending", (
        "1 while a session's presence claim is being retried (the other hubs do not see "
        "that agent here yet).")),
}  # fmt: skip


@attrs.frozen
class _Snapshot:
    counters: dict[str, int]
    transitions: dict[str, int]
    online: dict[str, int]
    flow: dict[str, int]
    rtt: dict[str, float]
    degraded: tuple[str, ...] = ()


class HubCollector(Collector):
    """Builds the hub's metrics at scrape time.

    ``collect()`` is called from prometheus_client's HTTP thread. With a
    ``trio_token`` the hub's state is read on the trio thread (a consistent
    snapshot, never racing the hub's own updates); without one, or once that
    trio run has ended, it is read directly.
    """

    def __init__(self, hub: Hub, trio_token: trio.lowlevel.TrioToken | None = None) -> None:
        self.hub = hub
        self.trio_token = trio_token

    def collect(self) -> Iterator[Metric]:
        snapshot = self._snapshot()
        online = GaugeMetricFamily(
            "artcafe_agents_online", "Agents online now, per tenant.", labels=["tenant"]
        )
        for tenant, count in sorted(snapshot.online.items()):
            online.add_metric([tenant], count)
        yield online
        rtt = GaugeMetricFamily(
            "artcafe_heartbeat_ack_rtt_seconds",
            "Largest heartbeat-ACK round trip reported by an online agent, per tenant.",
            labels=["tenant"],
        )
        for tenant, seconds in sorted(snapshot.rtt.items()):
            rtt.add_metric([tenant], seconds)
        yield rtt
        for name, key, documentation in _COUNTERS:
            yield CounterMetricFamily(
                f"artcafe_{name}", documentation, value=snapshot.counters[key]
            )
        transitions = CounterMetricFamily(
            "artcafe_presence_transitions",
            "Presence transitions, by reason (connected, disconnected, left, timeout).",
            labels=["reason"],
        )
        for reason, count in sorted(snapshot.transitions.items()):
            transitions.add_metric([reason], count)
        yield transitions
        for name, (kind, documentation) in _FLOW.items():
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(f"artcafe_{name}", documentation, value=snapshot.flow[name])
        for name, key, documentation in _GAUGES:
            yield GaugeMetricFamily(f"artcafe_{name}", documentation, value=snapshot.counters[key])
        for name, (reason, documentation) in _DEGRADED.items():
            value = int(reason in snapshot.degraded)
            yield GaugeMetricFamily(f"artcafe_{name}", documentation, value=value)

    def _snapshot(self) -> _Snapshot:
        if self.trio_token is not None and not _in_trio_thread():
            try:
                return trio.from_thread.run_sync(self._read, trio_token=self.trio_token)
            except trio.RunFinishedError:
                pass  # the hub's trio run is over: its state no longer changes
        return self._read()

    def _read(self) -> _Snapshot:
        stats = self.hub.stats
        counters = {key: int(getattr(stats, key)) for _name, key, _doc in _COUNTERS + _GAUGES}
        transitions = dict.fromkeys(PRESENCE_REASONS, 0)
        transitions.update(stats.transitions)
        online: dict[str, int] = {}
        rtt: dict[str, float] = {}
        for record in self.hub.presence_table():
            count = online.setdefault(record.tenant_id, 0)
            if record.status == "online":
                online[record.tenant_id] = count + 1
                reported = self.hub.events.measures(record.tenant_id, record.agent_id).rtt
                if reported is not None:
                    rtt[record.tenant_id] = max(rtt.get(record.tenant_id, 0.0), reported)
        hub = self.hub
        flow = {
            "unauthenticated_connections": len(hub.unauthenticated),
            "unauthenticated_evicted": hub.unauthenticated.evicted,
            "output_queued_bytes": hub.output_budget.used,
            "output_budget_cut_offs": hub.output_budget.cut_offs,
        }
        return _Snapshot(
            counters=counters, transitions=transitions, online=online, flow=flow, rtt=rtt,
            degraded=hub.cluster_degraded,
        )  # fmt: skip


def _in_trio_thread() -> bool:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


def collector(hub: Hub) -> HubCollector:
    """A collector for ``hub`` (reads on the trio thread when created inside the hub's run)."""
    token = trio.lowlevel.current_trio_token() if _in_trio_thread() else None
    return HubCollector(hub, token)


def start_metrics_server(
    hub: Hub, port: int, host: str = "127.0.0.1", *, extra: Sequence[Collector] = ()
) -> None:
    """Serve ``hub``'s metrics at ``http://host:port/metrics`` until the process exits
    (and those of the ``extra`` collectors, e.g. the alert webhooks').

    Call it from inside the hub's trio run. The metrics get their own
    :class:`CollectorRegistry` (no process or platform collectors from the
    global one). Raises :class:`OSError` if the port cannot be bound.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector(hub))
    for more in extra:
        registry.register(more)
    # prometheus_client serves from its own daemon thread: that is the library's HTTP
    # server, not one of our tasks. It only reads the hub (on the trio thread, via
    # the collector's trio token), and it dies with the process.
    start_http_server(port, addr=host, registry=registry)
