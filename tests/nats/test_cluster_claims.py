"""ClaimKeeper's bookkeeping, without NATS: what the claim watch and the hub tell it."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from artcafe_trio.cluster import ClusterConfig
from artcafe_trio.cluster._claims import ClaimKeeper
from artcafe_trio.cluster._records import PresenceClaim
from artcafe_trio.hub._backplane import PresenceUpdate, Route, SessionClaim


class Peer:
    def __init__(self) -> None:
        self.claimed: list[SessionClaim] = []
        self.observed: list[PresenceUpdate] = []

    def route_arrived(self, route: Route) -> None:
        raise AssertionError("no routes here")

    def session_claimed(self, claim: SessionClaim) -> None:
        self.claimed.append(claim)

    def presence_observed(self, update: PresenceUpdate) -> None:
        self.observed.append(update)

    def describe_session(self, session_id: str) -> tuple[tuple[str, ...], dict[str, Any]] | None:
        return (), {}

    def use_credentials(self, load: Any) -> None:
        pass


def claim(hub: str, epoch: int, status: str = "online", session: str = "s") -> PresenceClaim:
    reason = "connected" if status == "online" else "left"
    return PresenceClaim("t", "x", hub, epoch, status, reason, 1.0, f"{session}{epoch}")


async def keeper(nursery: trio.Nursery) -> tuple[ClaimKeeper, Peer]:
    keep = ClaimKeeper(ClusterConfig(servers="nats://127.0.0.1:1"), "hub-a")
    peer = Peer()
    keep.bind(peer, None, nursery)  # type: ignore[arg-type]
    return keep, peer


async def test_a_take_over_seen_before_our_claim_was_acknowledged_closes_ours(
    nursery: trio.Nursery,
) -> None:
    keep, peer = await keeper(nursery)
    keep._claim_changed(("t", "x"), claim("hub-b", 2), initial=False)  # B's, newer
    keep._keep(("t", "x"), claim("hub-a", 1))  # our CAS answer arrives after it
    assert [(c.hub_id, c.session_id) for c in peer.claimed] == [("hub-b", "s2")]
    assert keep._claims == {}  # nothing of ours to release later
    keep.announce_presence(
        PresenceUpdate("t", "x", "offline", "left", 2.0, "s1", "hub-a")
    )  # fmt: skip
    assert not keep._releases


async def test_an_offline_is_released_at_the_kept_epoch_and_a_take_over_forgets_it(
    nursery: trio.Nursery,
) -> None:
    keep, peer = await keeper(nursery)
    keep._keep(("t", "x"), claim("hub-a", 3))
    keep.announce_presence(PresenceUpdate("t", "x", "online", "connected", 1.0, "s3", "hub-a"))
    assert not keep._releases  # online was the claim itself
    keep.announce_presence(PresenceUpdate("t", "x", "offline", "timeout", 2.0, "s3", "hub-a"))
    assert [(c.epoch, reason) for c, reason in keep._releases.values()] == [(3, "timeout")]
    # Another agent id, taken over by hub C: closed here, observed, nothing released.
    keep._keep(("t", "y"), attrs.evolve(claim("hub-a", 1), agent_id="y"))
    keep._claim_changed(("t", "y"), attrs.evolve(claim("hub-c", 2), agent_id="y"), initial=False)
    assert [(c.agent_id, c.hub_id) for c in peer.claimed] == [("y", "hub-c")]
    assert [(u.agent_id, u.status, u.hub_id, u.local) for u in peer.observed] == [
        ("y", "online", "hub-c", False)
    ]
    assert ("t", "y") not in keep._claims


async def test_a_reaped_claim_is_observed_with_its_reaper(nursery: trio.Nursery) -> None:
    keep, peer = await keeper(nursery)
    reaped = attrs.evolve(
        claim("hub-b", 2, status="offline"), reason="hub_lost", session_id=None, reaper="hub-a"
    )
    keep._claim_changed(("t", "x"), reaped, initial=False)
    assert [(u.reason, u.hub_id, u.local, u.reaped_by) for u in peer.observed] == [
        ("hub_lost", "hub-b", False, "hub-a")
    ]
