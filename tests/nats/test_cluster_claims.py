"""ClaimKeeper's bookkeeping, without NATS: what the claim watch and the hub tell it."""

from __future__ import annotations

from typing import Any

import attrs
import trio

from artcafe_trio.cluster import ClusterConfig
from artcafe_trio.cluster._claims import ClaimKeeper
from artcafe_trio.cluster._records import PresenceClaim
from artcafe_trio.hub._backplane import PresenceUpdate, Route, SessionClaim
from artcafe_trio.nats import NatsTimeoutError


class Peer:
    def __init__(self) -> None:
        self.claimed: list[SessionClaim] = []
        self.observed: list[PresenceUpdate] = []

    async def route_arrived(self, route: Route) -> None:
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


# --- the TTL backstop: refreshes of kept claims, expiry of others' ----------------------


class RefreshingStore:
    """Enough of a ClusterStore for ``refresh_claims``: records each refresh; the
    first ``failures`` refreshes fail as a NATS outage would."""

    def __init__(self, failures: int = 0) -> None:
        self.refreshed: list[tuple[str, float]] = []
        self.failures = failures

    async def refresh(self, claim: PresenceClaim) -> bool:
        await trio.sleep(0.002)  # a round trip
        if self.failures:
            self.failures -= 1
            raise NatsTimeoutError("no ack")
        self.refreshed.append((claim.agent_id, trio.current_time()))
        return True


def ttl_keeper(ttl: float) -> tuple[ClaimKeeper, Peer]:
    config = ClusterConfig(servers="nats://127.0.0.1:1", claim_ttl=ttl)
    keep = ClaimKeeper(config, "hub-a", wall_clock=lambda: 5000.0)
    peer = Peer()
    return keep, peer


async def test_kept_claims_are_refreshed_about_twice_per_ttl_spread_out_and_never_late(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    """1000 agents claimed in the same instant (a mass reconnect), 10 TTLs of an hour:
    each claim rewritten 2-2.5 times per TTL, never with less than half a TTL left,
    and the writes spread out (no burst of 1000 at each round)."""
    ttl, agents, ttls = 3600.0, 1000, 10
    keep, peer = ttl_keeper(ttl)
    store = RefreshingStore()
    keep.bind(peer, store, nursery)  # type: ignore[arg-type]
    start = trio.current_time()
    for n in range(agents):
        keep._keep(("t", f"a{n}"), attrs.evolve(claim("hub-a", 1), agent_id=f"a{n}"))
    nursery.start_soon(keep.refresh_claims, store)
    await trio.sleep(ttls * ttl)
    rate = len(store.refreshed) / agents / ttls
    assert 2.0 <= rate <= 2.5, rate
    assert keep.refreshes == len(store.refreshed)
    last: dict[str, float] = {}
    busiest: dict[int, int] = {}
    for agent, moment in store.refreshed:
        gap = moment - last.get(agent, start)
        assert 0.4 * ttl - 0.01 <= gap <= 0.5 * ttl + 1.0, (agent, gap)
        last[agent] = moment
        busiest[int(moment)] = busiest.get(int(moment), 0) + 1
    assert len(last) == agents
    # 1000 writes per round spread over a tenth of the TTL: ~3/s, never a burst.
    assert max(busiest.values()) <= 20, max(busiest.values())
    print(f"{rate:.2f} refreshes per claim per TTL; busiest second {max(busiest.values())}")


async def test_a_released_or_taken_over_claim_is_no_longer_refreshed(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    keep, peer = ttl_keeper(100.0)
    store = RefreshingStore()
    keep.bind(peer, store, nursery)  # type: ignore[arg-type]
    nursery.start_soon(keep.refresh_claims, store)
    keep._keep(("t", "x"), claim("hub-a", 1))
    keep._keep(("t", "y"), attrs.evolve(claim("hub-a", 1), agent_id="y"))
    keep._keep(("t", "z"), attrs.evolve(claim("hub-a", 1), agent_id="z"))
    await trio.sleep(60)  # each refreshed once (at 40-50 s)
    assert sorted(agent for agent, _ in store.refreshed) == ["x", "y", "z"]
    keep.announce_presence(PresenceUpdate("t", "x", "offline", "left", 2.0, "s1", "hub-a"))
    keep._claim_changed(("t", "y"), attrs.evolve(claim("hub-b", 2), agent_id="y"), initial=False)
    await trio.sleep(500)
    later = [agent for agent, moment in store.refreshed if moment > trio.current_time() - 500]
    assert set(later) == {"z"} and len(later) >= 9  # z: ~every 45 s; x, y never again


async def test_a_failed_refresh_is_retried_well_before_the_claim_expires(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    ttl = 100.0
    keep, peer = ttl_keeper(ttl)
    store = RefreshingStore(failures=5)  # a NATS election of about half a minute
    keep.bind(peer, store, nursery)  # type: ignore[arg-type]
    nursery.start_soon(keep.refresh_claims, store)
    written = trio.current_time()
    keep._keep(("t", "x"), claim("hub-a", 1))
    await trio.sleep(ttl)
    assert keep.refresh_failures == 5
    assert store.refreshed, "never refreshed"
    first = store.refreshed[0][1] - written
    # Due at 40-50 s, then five failures 5 s apart (retry_delay(100)): still 25 s left.
    assert 0.4 * ttl + 25 <= first <= 0.5 * ttl + 26, first


async def test_a_nats_outage_costs_one_failed_refresh_per_retry_delay_not_one_per_claim(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    """200 claims come due while NATS is away for 40 s: a failed attempt every 5 s
    (retry_delay(100)), not one per claim (nor a warning each); once NATS is back,
    every claim is refreshed well before it expires."""
    ttl = 100.0
    keep, peer = ttl_keeper(ttl)
    store = RefreshingStore(failures=8)  # 8 attempts, 5 s apart: 40 s
    keep.bind(peer, store, nursery)  # type: ignore[arg-type]
    nursery.start_soon(keep.refresh_claims, store)
    written = trio.current_time()
    for n in range(200):
        keep._keep(("t", f"a{n}"), attrs.evolve(claim("hub-a", 1), agent_id=f"a{n}"))
    await trio.sleep(0.4 * ttl + 22)  # the first claims came due at 40 s
    assert 4 <= keep.refresh_failures <= 5
    await trio.sleep(ttl / 2)
    assert keep.refresh_failures == 8
    first: dict[str, float] = {}
    for agent, moment in store.refreshed:
        first.setdefault(agent, moment - written)
    assert len(first) == 200 and max(first.values()) < ttl - 10, max(first.values())


async def test_an_online_claim_that_expired_is_reported_offline_once(
    nursery: trio.Nursery,
) -> None:
    keep, peer = ttl_keeper(3600.0)
    keep.bind(peer, RefreshingStore(), nursery)  # type: ignore[arg-type]
    keep._claim_changed(("t", "x"), claim("hub-b", 7), initial=False)  # B's agent online
    keep._claim_expired(("t", "x"), 4000.0, initial=False)  # B is gone: nobody refreshed
    keep._claim_expired(("t", "x"), 4001.0, initial=False)  # (nothing left to report)
    assert [(u.agent_id, u.status, u.reason, u.time, u.hub_id, u.session_id, u.local)
            for u in peer.observed] == [
        ("x", "online", "connected", 1.0, "hub-b", "s7", False),
        ("x", "offline", "hub_lost", 4000.0, "hub-b", None, False),
    ]  # fmt: skip
    assert peer.claimed == []  # not our session
    # An offline claim's expiry changes nothing.
    keep._claim_changed(("t", "y"), attrs.evolve(claim("hub-b", 2, "offline"), agent_id="y"),
                        initial=False)  # fmt: skip
    keep._claim_expired(("t", "y"), 4000.0, initial=False)
    assert [u.status for u in peer.observed if u.agent_id == "y"] == ["offline"]
    assert keep.expired == 1


async def test_exactly_one_live_hub_reports_an_expiry_as_its_own(nursery: trio.Nursery) -> None:
    """Every hub sees an expired claim; the lowest live hub id reports it (its alerts
    fire, as the reaper's would), so a dead hub's agent pages once, not once per hub."""
    reporters = []
    for me, others in (("hub-a", ("hub-c",)), ("hub-c", ("hub-a",))):
        keep = ClaimKeeper(ClusterConfig(servers="nats://127.0.0.1:1"), me)
        keep.live_hubs = lambda others=others: others  # type: ignore[misc]
        peer = Peer()
        keep.bind(peer, RefreshingStore(), nursery)  # type: ignore[arg-type]
        keep._claim_changed(("t", "x"), claim("hub-b", 7), initial=False)
        keep._claim_expired(("t", "x"), 4000.0, initial=False)
        [gone] = [u for u in peer.observed if u.status == "offline"]
        assert (gone.reason, gone.local) == ("hub_lost", False)
        reporters.append(gone.reaped_by == me)
    assert reporters == [True, False]


async def test_our_own_claim_expiring_closes_our_session_so_it_claims_again(
    nursery: trio.Nursery,
) -> None:
    """Not refreshed for half a TTL (NATS away that long): every hub reports the agent
    offline; ours closes the session (as for a reap) and stops refreshing it."""
    keep, peer = ttl_keeper(3600.0)
    keep.bind(peer, RefreshingStore(), nursery)  # type: ignore[arg-type]
    ours = claim("hub-a", 3)
    keep._keep(("t", "x"), ours)
    keep._claim_changed(("t", "x"), ours, initial=False)  # our write, seen by the watch
    assert peer.observed == []
    keep._claim_expired(("t", "x"), 4000.0, initial=False)
    assert [(c.agent_id, c.hub_id) for c in peer.claimed] == [("x", "hub-a")]
    assert [(u.status, u.reason) for u in peer.observed] == [("offline", "hub_lost")]
    assert keep._claims == {} and ("t", "x") not in keep._refresh
