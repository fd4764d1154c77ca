"""A cluster of hubs over NATS (issue 13): ``serve_hub(cluster=ClusterConfig(...))``.

- :class:`ClusterConfig`: how a hub joins (NATS servers, lease TTL, bucket).
- :class:`NatsBackplane` (:mod:`._backplane`): the hub's backplane over NATS — routes
  on core NATS, presence claims and hub leases in a JetStream key-value bucket.
- :mod:`._records` (sans-IO): the values kept in the bucket and the rules that move
  them; :mod:`._store`: those rules applied with compare-and-set, the hub lease;
  :mod:`._reaper`: a lost hub's agents marked offline by one surviving hub;
  :mod:`._routes`: subjects, envelopes, the recent-id filter;
  :mod:`._credentials`: credentials in the bucket (not wired into the hub yet).

See ``docs/cluster.md`` for what is guaranteed and what is missing.
"""

from __future__ import annotations

from ._backplane import NatsBackplane
from ._config import ClusterConfig

__all__ = ["ClusterConfig", "NatsBackplane"]
