"""A cluster of hubs over NATS (issue 13): :func:`serve_cluster_hub`/:func:`open_cluster_hub`.

- :class:`ClusterConfig`: how a hub joins (NATS servers, lease TTL, bucket).
- :class:`NatsBackplane` (:mod:`._backplane`): the hub's backplane over NATS — routes
  on core NATS, presence claims and hub leases in a JetStream key-value bucket.
- :mod:`._records` (sans-IO): the values kept in the bucket and the rules that move
  them; :mod:`._store`: those rules applied with compare-and-set, the hub lease;
  :mod:`._reaper`: a lost hub's agents marked offline by one surviving hub;
  :mod:`._routes`: subjects, envelopes, the recent-id filter;
  :mod:`._credentials`: credentials in the bucket (``publish_agent``,
  ``remove_agent``), served by every hub with ``ClusterConfig(shared_credentials=True)``.

See ``docs/cluster.md`` for what is guaranteed and what is missing.
"""

from __future__ import annotations

from ._backplane import NatsBackplane
from ._config import ClusterConfig
from ._credentials import publish_agent, remove_agent
from ._records import HubLease, PresenceClaim
from ._serve import open_cluster_hub, serve_cluster_hub

__all__ = [
    "ClusterConfig",
    "HubLease",
    "NatsBackplane",
    "PresenceClaim",
    "open_cluster_hub",
    "publish_agent",
    "remove_agent",
    "serve_cluster_hub",
]
