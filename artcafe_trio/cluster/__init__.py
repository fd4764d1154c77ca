"""Building blocks of a cluster of hubs over NATS (issue 13), not yet wired into the hub.

- :mod:`._records` (sans-IO): the values kept in the cluster's JetStream key-value
  bucket (one presence claim per agent, one lease per hub) and the pure rules that
  move them (claim with epoch + 1, release only by the owner, reap a lost hub).
- :mod:`._store`: those rules applied to a real bucket with compare-and-set, a hub
  lease kept alive under its TTL, lease expiry watching, reaper election.

The hub does not use them yet: a ``NatsBackplane`` behind the hub's backplane seam
will. See ``docs/cluster.md`` for what exists and what does not.
"""

from __future__ import annotations
