"""The cluster's presence-claim, lease and routing rules (sans-IO, no NATS)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from artcafe_trio.cluster import ClusterConfig, NatsBackplane
from artcafe_trio.cluster._drain import holds_online
from artcafe_trio.cluster._reaper import ReapPlan, reap_plan, run_reaper
from artcafe_trio.cluster._records import (
    HUB_LOST,
    HubLease,
    PresenceClaim,
    expired_claim,
    lease_key,
    next_claim,
    parse_presence_key,
    presence_key,
    reap_claim,
    reaper_key,
    refresh_claim,
    release_claim,
)
from artcafe_trio.cluster._refresh import REFRESH_HIGH, REFRESH_LOW, RefreshSchedule, retry_delay
from artcafe_trio.cluster._routes import (
    InterestTable,
    RecentIds,
    RouteEnvelope,
    nats_subject,
    split_nats_subject,
)
from artcafe_trio.cluster._store import LeaseChange
from artcafe_trio.hub._backplane import PresenceUpdate, Route
from artcafe_trio.nats import KvEntry, KvOp, NatsConnectionLost


def claim(**changes: object) -> PresenceClaim:
    base = dict(tenant_id="acme", agent_id="w1", hub="a", epoch=3, status="online",
                reason="connected", since=100.0, session_id="s-1")  # fmt: skip
    base.update(changes)
    return PresenceClaim(**base)  # type: ignore[arg-type]


def test_keys_are_nats_tokens_and_parse_back() -> None:
    assert presence_key("acme", "w-1") == "p.acme.w-1"
    assert parse_presence_key("p.acme.w-1") == ("acme", "w-1")
    assert parse_presence_key("h.hub1") is None
    assert parse_presence_key("p.acme") is None
    assert lease_key("hub1") == "h.hub1"
    assert reaper_key("hub1", 42) == "r.hub1.42"
    with pytest.raises(ValueError, match="agent id"):
        presence_key("acme", "a.b")  # a dot would split the key's tokens
    with pytest.raises(ValueError, match="hub id"):
        lease_key("*")


def test_a_first_claim_is_epoch_one_and_a_take_over_the_next_epoch() -> None:
    first = next_claim(None, tenant_id="acme", agent_id="w1", hub="a", session_id="s-1", now=5.0)
    assert (first.epoch, first.hub, first.status, first.since) == (1, "a", "online", 5.0)
    moved = next_claim(first, tenant_id="acme", agent_id="w1", hub="b", session_id="s-2", now=9.0)
    # Still the same stay online: the moment it came online is kept.
    assert (moved.epoch, moved.hub, moved.session_id, moved.since) == (2, "b", "s-2", 5.0)
    back = next_claim(
        claim(status="offline", reason="left", since=7.0),
        tenant_id="acme", agent_id="w1", hub="a", session_id="s-3", now=8.0,
    )  # fmt: skip
    assert (back.epoch, back.reason, back.since) == (4, "connected", 8.0)


def test_only_the_owner_at_its_epoch_releases() -> None:
    current = claim()
    offline = release_claim(current, hub="a", epoch=3, reason="left", now=150.0)
    assert offline == claim(status="offline", reason="left", since=150.0, session_id=None)
    assert release_claim(current, hub="b", epoch=3, reason="left", now=150.0) is None
    assert release_claim(current, hub="a", epoch=2, reason="left", now=150.0) is None
    assert release_claim(None, hub="a", epoch=3, reason="left", now=150.0) is None
    assert release_claim(offline, hub="a", epoch=3, reason="timeout", now=160.0) is None


def test_a_reaper_takes_only_what_the_lost_hub_still_owns_online() -> None:
    reaped = reap_claim(claim(), lost_hub="a", now=200.0)
    assert reaped is not None
    assert (reaped.status, reaped.reason, reaped.epoch) == ("offline", HUB_LOST, 3)
    assert reaped.reaper is None
    by_b = reap_claim(claim(), lost_hub="a", now=200.0, reaper="b")
    assert by_b is not None and by_b.reaper == "b"  # the one hub that reports it
    assert PresenceClaim.decode(by_b.encode()) == by_b
    assert reap_claim(claim(hub="b"), lost_hub="a", now=200.0) is None
    assert reap_claim(claim(status="offline"), lost_hub="a", now=200.0) is None
    drained = reap_claim(claim(), lost_hub="a", now=200.0, reason="disconnected")
    assert drained is not None
    assert (drained.status, drained.reason, drained.since) == ("offline", "disconnected", 200.0)


def test_an_expired_lease_is_reaped_as_hub_lost_a_deleted_one_as_disconnected() -> None:
    """Both after the grace: a drained hub's agents are reconnecting elsewhere too."""
    expired = LeaseChange("b", False, 7, None, expired=True)
    deleted = LeaseChange("b", False, 7, None)
    assert reap_plan(expired, me="a", grace=5.0) == ReapPlan(5.0, HUB_LOST)
    assert reap_plan(deleted, me="a", grace=5.0) == ReapPlan(5.0, "disconnected")
    assert reap_plan(LeaseChange("b", True, 7, HubLease("b")), me="a", grace=5.0) is None
    assert reap_plan(lease_of(deleted, "a"), me="a", grace=5.0) is None  # our own


def lease_of(change: LeaseChange, hub: str) -> LeaseChange:
    return LeaseChange(hub, change.alive, change.revision, change.lease, change.expired)


def update(status: str = "offline", reason: str = "disconnected") -> PresenceUpdate:
    return PresenceUpdate("acme", "w1", status, reason, 150.0, None, "b")


def test_a_draining_hub_holds_back_only_the_disconnects_of_its_stop_and_only_if_not_alone() -> None:
    assert holds_online(update(), draining=True, other_hubs=1)
    assert not holds_online(update(), draining=True, other_hubs=0)  # nobody would reap
    assert not holds_online(update(), draining=False, other_hubs=2)  # not stopping
    for reason in ("left", "timeout", "hub_lost"):
        assert not holds_online(update(reason=reason), draining=True, other_hubs=1)
    assert not holds_online(update("online", "connected"), draining=True, other_hubs=1)


def test_values_round_trip_and_bad_values_are_refused() -> None:
    value = claim()
    assert PresenceClaim.decode(value.encode()) == value
    assert b"reaper" not in value.encode()  # only a reaped claim names its reaper
    lease = HubLease("a", ("ws://h1:8765",), 12.5, draining=True)
    assert HubLease.decode(lease.encode()) == lease
    for bad, problem in (
        (b"[]", "JSON object"),
        (b'{"epoch": 0}', "epoch"),
        (value.encode().replace(b'"online"', b'"away"'), "unknown status"),
    ):
        with pytest.raises(ValueError, match=problem):
            PresenceClaim.decode(bad)
    with pytest.raises(ValueError, match="urls"):
        HubLease.decode(b'{"hub": "a", "urls": [1]}')


# ------------------------------------------------------- claim TTL backstop (sans-IO)


def test_the_claim_ttl_defaults_to_an_hour_and_must_outlast_the_lease() -> None:
    assert ClusterConfig(servers="nats://x").claim_ttl == 3600.0
    assert ClusterConfig(servers="nats://x", lease_ttl=1.0, claim_ttl=2.0).claim_ttl == 2.0
    for lease_ttl, claim_ttl in ((10.0, 10.0), (10.0, 5.0), (1.0, 1.5), (1.0, float("inf"))):
        with pytest.raises(ValueError, match="claim_ttl"):
            ClusterConfig(servers="nats://x", lease_ttl=lease_ttl, claim_ttl=claim_ttl)
    with pytest.raises(ValueError, match="claim_ttl"):
        ClusterConfig(servers="nats://x", claim_ttl=float("nan"))


def test_a_claim_of_an_expired_key_goes_above_every_epoch_the_key_had() -> None:
    """The key's claim expired at revision 41 (its epochs were all <= the revisions
    they were written at): the next claim is above 41, so an old owner's epoch never
    matches a newer claim."""
    fresh = next_claim(
        None, tenant_id="acme", agent_id="w1", hub="b", session_id="s-9", now=5.0, above=41
    )
    assert (fresh.epoch, fresh.hub, fresh.since) == (42, "b", 5.0)
    # ``above`` never lowers an epoch (0: a key that never existed).
    assert next_claim(claim(), tenant_id="acme", agent_id="w1", hub="b", session_id="s-2",
                      now=9.0, above=2).epoch == 4  # fmt: skip
    assert next_claim(None, tenant_id="acme", agent_id="w1", hub="a", session_id="s",
                      now=1.0).epoch == 1  # fmt: skip


def test_only_the_owner_refreshes_its_online_claim_unchanged() -> None:
    current = claim()
    assert refresh_claim(current, hub="a", epoch=3) is current
    assert refresh_claim(current, hub="b", epoch=3) is None  # taken over
    assert refresh_claim(current, hub="a", epoch=2) is None  # a newer session's claim
    assert refresh_claim(claim(status="offline", reason="left"), hub="a", epoch=3) is None
    assert refresh_claim(claim(reason=HUB_LOST, status="offline"), hub="a", epoch=3) is None
    assert refresh_claim(None, hub="a", epoch=3) is None


def test_an_expired_online_claim_is_hub_lost_and_an_offline_one_changes_nothing() -> None:
    gone = expired_claim(claim(), now=4000.0)
    assert gone == claim(status="offline", reason=HUB_LOST, since=4000.0, session_id=None)
    assert expired_claim(claim(status="offline", reason="left"), now=4000.0) is None


def test_each_claim_is_refreshed_between_0_4_and_0_5_of_its_ttl() -> None:
    schedule: RefreshSchedule[str] = RefreshSchedule(100.0, rng=random.Random(7))
    for n in range(200):
        schedule.written(f"k{n}", 0.0)
    assert schedule.pop_due(REFRESH_LOW * 100.0 - 0.001) is None
    dues = []
    while (due := schedule.next_due()) is not None:
        key = schedule.pop_due(due)
        assert key is not None
        dues.append(due)
    assert len(dues) == 200 and dues == sorted(dues)
    assert min(dues) >= REFRESH_LOW * 100.0 and max(dues) <= REFRESH_HIGH * 100.0
    assert max(dues) - min(dues) > 8.0  # spread over the window, not one burst


def test_a_rewrite_reschedules_a_forgotten_claim_is_not_refreshed_and_failures_retry() -> None:
    schedule: RefreshSchedule[str] = RefreshSchedule(3600.0, rng=random.Random(1))
    schedule.written("a", 0.0)
    schedule.written("b", 0.0)
    schedule.written("a", 1000.0)  # a new claim: its schedule restarts
    schedule.forget("b")  # released
    assert len(schedule) == 1 and "b" not in schedule
    due = schedule.next_due()
    assert due is not None and 1000.0 + 1440.0 <= due <= 1000.0 + 1800.0
    assert schedule.pop_due(due) == "a"
    assert schedule.next_due() is None  # the stale items of a and b are gone
    schedule.failed("a", 3000.0)
    assert schedule.next_due() == 3000.0 + retry_delay(3600.0) == 3010.0
    assert (retry_delay(2.0), retry_delay(100.0)) == (0.5, 5.0)
    for n in range(1000):  # rewrites leave stale heap items; they are rebuilt away
        schedule.written("a", float(n))
    assert len(schedule._heap) <= 2 * len(schedule) + 64


def test_a_fenced_hub_or_a_claim_being_retried_is_a_degraded_view() -> None:
    backplane = NatsBackplane(ClusterConfig(servers="nats://x:4222"), hub_id="h1", grace=1.0)
    assert backplane.degraded() == ()
    backplane._on_fenced(True)
    assert backplane.degraded() == ("fenced",)
    backplane.claims._pending_claims[("acme", "w1")] = "s-1"
    assert backplane.degraded() == ("fenced", "claims_pending")
    backplane._on_fenced(False)
    del backplane.claims._pending_claims[("acme", "w1")]
    assert backplane.degraded() == ()


# ----------------------------------------------------------------- routing (sans-IO)


def test_routed_subjects_carry_the_tenant_and_split_back() -> None:
    assert nats_subject("acme", "tasks.>") == "ac.acme.tasks.>"
    assert split_nats_subject("ac.acme.tasks.new") == ("acme", "tasks.new")
    assert split_nats_subject("ac.acme") is None
    assert split_nats_subject("$JS.API.INFO") is None
    with pytest.raises(ValueError, match="tenant id"):
        nats_subject("a.b", "x")  # would let one tenant's pattern reach another's


def test_interest_subscribes_on_the_first_and_unsubscribes_on_the_last() -> None:
    table = InterestTable()
    assert table.add("acme", "tasks.*") is True
    assert table.add("acme", "tasks.*") is False
    assert table.add("other", "tasks.*") is True  # tenants never share a subscription
    assert table.patterns() == [("acme", "tasks.*"), ("other", "tasks.*")]
    assert table.remove("acme", "tasks.*") is False
    assert table.remove("acme", "tasks.*") is True
    assert len(table) == 1
    with pytest.raises(KeyError):
        table.remove("acme", "tasks.*")


def test_an_envelope_round_trips_through_payload_and_headers() -> None:
    envelope = RouteEnvelope("hub-a", "hub-a-7", "w1", '{"n":1}', 1700000000.25, "_reply.s.1")
    assert envelope.publish_id is None
    payload, headers = envelope.to_nats()
    assert payload == b'{"n":1}'  # the data JSON, encoded once by the origin
    assert RouteEnvelope.from_nats(payload, headers) == envelope
    del headers["Ac-Sender"]
    with pytest.raises(ValueError, match="Ac-Sender"):
        RouteEnvelope.from_nats(payload, headers)
    with pytest.raises(ValueError, match="headers"):
        RouteEnvelope.from_nats(payload, None)


def test_a_request_s_reply_from_crosses_hubs_in_the_envelope() -> None:
    request = RouteEnvelope(
        "hub-a", "hub-a-9", "req", '"x"', 1.0, "$reply.s-1.1", reply_from=("w1", "w-2")
    )
    payload, headers = request.to_nats()
    assert headers["Ac-Reply-From"] == "w1,w-2"
    assert RouteEnvelope.from_nats(payload, headers) == request
    nobody = RouteEnvelope("hub-a", "hub-a-9", "req", '"x"', 1.0, "$reply.s-1.1", reply_from=())
    assert RouteEnvelope.from_nats(*nobody.to_nats()).reply_from == ()
    headers["Ac-Reply-From"] = "w1,../x"
    with pytest.raises(ValueError, match="Ac-Reply-From agent id"):
        RouteEnvelope.from_nats(payload, headers)
    # A string no agent can have (a frame allows any up to 128 characters) matches no
    # agent anywhere: it is left out, so neither the route nor the other ids are lost.
    odd = attrs.evolve(request, reply_from=("w1", "a.b", "x,y"))
    assert RouteEnvelope.from_nats(*odd.to_nats()).reply_from == ("w1",)


def test_recent_ids_pass_each_key_once_in_bounded_memory_and_time() -> None:
    seen = RecentIds(window=10.0, size=3)
    assert [seen.first_time(k, 0.0) for k in ("a", "b", "a", "c", "d")] == [
        True, True, False, True, True
    ]  # fmt: skip
    assert len(seen) == 3
    assert seen.first_time("a", 1.0) is True  # forgotten: the oldest went first
    assert seen.first_time("c", 9.9) is False
    assert seen.first_time("c", 10.0) is True  # the window passed
    with pytest.raises(ValueError, match="window"):
        RecentIds(window=0)


def test_a_resent_publish_has_the_same_key_on_every_hub() -> None:
    first = RouteEnvelope("hub-a", "hub-a-7", "w1", "1", 1.0, publish_id="p-42")
    resent = RouteEnvelope("hub-b", "hub-b-3", "w1", "1", 2.0, publish_id="p-42")
    assert first.dedupe_key("acme") == resent.dedupe_key("acme") == "acme/w1/p-42"
    assert first.dedupe_key("other") != first.dedupe_key("acme")
    anonymous = RouteEnvelope("hub-a", "hub-a-8", "w1", "1", 1.0)
    assert anonymous.dedupe_key("acme") == "hub-a-8"
    payload, headers = first.to_nats()
    assert RouteEnvelope.from_nats(payload, headers) == first


def test_recent_ids_remember_the_first_message_id_of_a_key() -> None:
    seen = RecentIds(window=10.0, size=8)
    assert seen.earlier("t/a/p1", 0.0, "hub-a-1") is None
    assert seen.earlier("t/a/p1", 1.0, "hub-b-7") == "hub-a-1"  # a re-send elsewhere
    assert seen.earlier("t/a/p1", 10.0, "hub-b-8") is None  # forgotten after the window
    assert seen.earlier("t/a/p1", 11.0, "hub-c-1") == "hub-b-8"


def test_a_claim_carries_the_agent_s_capabilities_and_metadata() -> None:
    claim = next_claim(
        None, tenant_id="acme", agent_id="w1", hub="a", session_id="s-1", now=5.0,
        capabilities=("gpu",), metadata={"zone": "eu"},
    )  # fmt: skip
    assert PresenceClaim.decode(claim.encode()) == claim
    assert claim.capabilities == ("gpu",) and claim.metadata == {"zone": "eu"}
    with pytest.raises(ValueError, match="capabilities"):
        PresenceClaim.decode(claim.encode().replace(b'["gpu"]', b'"gpu"'))


# ----------------------------------------------------- the backplane through a NATS blip


class _BlippingNats:
    """Enough of a NatsClient for the interest task: the first subscribe and the first
    flush fail as a connection drop would."""

    def __init__(self) -> None:
        self.subscribed: list[str] = []
        self.failures = {"subscribe": 1, "flush": 1}

    def _fail(self, what: str) -> None:
        if self.failures[what]:
            self.failures[what] -= 1
            raise NatsConnectionLost(f"{what}: connection lost")

    async def subscribe(self, subject: str) -> object:
        await trio.lowlevel.checkpoint()
        self._fail("subscribe")
        self.subscribed.append(subject)
        return _IdleSubscription()

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        self._fail("flush")


class _IdleSubscription:
    def __aiter__(self) -> _IdleSubscription:
        return self

    async def __anext__(self) -> object:
        await trio.sleep_forever()
        raise StopAsyncIteration  # pragma: no cover


async def test_interest_survives_a_nats_blip_and_is_applied_after_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    backplane = NatsBackplane(ClusterConfig(servers="nats://x:4222"), hub_id="h1", grace=1.0)
    nc = _BlippingNats()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backplane._apply_interest, nc, nursery)
        backplane.interest("acme", "tasks.>", True)
        with trio.fail_after(10):
            while not (backplane.interest_settled and nc.subscribed):
                await trio.sleep(0.1)
        assert nc.subscribed == ["ac.acme.tasks.>"]  # once, after the failed attempt
        assert nc.failures == {"subscribe": 0, "flush": 0}  # both blips happened
        nursery.cancel_scope.cancel()


def test_an_envelope_from_nats_must_be_what_a_hub_would_send() -> None:
    """Whatever publishes on ``ac.>`` cannot make a hub send frames that are not strict
    JSON: the payload, the time and the reply subject are checked."""
    good = RouteEnvelope("hub-a", "hub-a-1", "w1", '{"n":1}', 1.0, "jobs.reply")
    payload, headers = good.to_nats()
    assert RouteEnvelope.from_nats(payload, headers) == good
    for bad_payload in (b'{"n":NaN}', b'{"n":1', b"\xff", b'1, "x": 2'):
        with pytest.raises(ValueError, match="not strict JSON"):
            RouteEnvelope.from_nats(bad_payload, headers)
    for moment in ("nan", "inf"):
        with pytest.raises(ValueError, match="finite"):
            RouteEnvelope.from_nats(payload, {**headers, "Ac-Time": moment})
    with pytest.raises(ValueError, match="Ac-Reply-To"):
        RouteEnvelope.from_nats(payload, {**headers, "Ac-Reply-To": 'x", "y'})


class _ReconnectingNats:
    is_connected = False

    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish(self, subject: str, payload: bytes, *, headers: object) -> None:
        await trio.lowlevel.checkpoint()
        self.published.append(subject)

    async def flush(self) -> None:
        await trio.sleep_forever()  # no answer while reconnecting


async def test_a_publish_during_a_nats_reconnect_does_not_wait_for_a_flush(
    autojump_clock: trio.abc.Clock,
) -> None:
    backplane = NatsBackplane(ClusterConfig(servers="nats://x:4222"), hub_id="h1", grace=1.0)
    nc = _ReconnectingNats()
    backplane._nc = nc  # type: ignore[assignment]
    route = Route("acme", "jobs.new", "1", "w1", "h1-1", 1.0)
    start = trio.current_time()
    assert await backplane.publish_route(route) is None
    assert trio.current_time() == start  # not a flush_timeout per publish
    assert nc.published == ["ac.acme.jobs.new"]  # buffered for the reconnect
    assert backplane.routes_unconfirmed == 1


# ----------------------------------------------------- a graceful stop (drain), no NATS


class _HandoverStore:
    """Enough of a ClusterStore for :meth:`Drain.hand_over`: the hubs'
    leases as the bucket has them now (``kv.entry``); hub a left an agent online."""

    def __init__(self, leases: dict[str, HubLease | KvOp] | None = None) -> None:
        self.released: list[tuple[str, str]] = []
        self.reaped: list[tuple[str, str]] = []
        self.events: list[str] = []  # lease writes and reads, in order
        self.lease_dropped = False
        self.leases = leases or {}
        self.kv = self

    async def entry(self, key: str) -> KvEntry | None:
        await trio.lowlevel.checkpoint()
        self.events.append(f"read {key}")
        lease = self.leases.get(key.removeprefix("h."))
        if isinstance(lease, KvOp):  # a delete or expiry marker
            return KvEntry("b", key, b"", 2, lease)
        return None if lease is None else KvEntry("b", key, lease.encode(), 1, KvOp.PUT)

    async def snapshot(self) -> dict[tuple[str, str], PresenceClaim]:
        await trio.lowlevel.checkpoint()
        self.events.append("snapshot")
        return {
            ("acme", "x1"): claim(agent_id="x1", hub="a"),
            ("acme", "x2"): claim(agent_id="x2", hub="c", status="offline"),
        }

    async def reap(self, hub: str, *, reason: str) -> list[PresenceClaim]:
        await trio.lowlevel.checkpoint()
        self.reaped.append((hub, reason))
        return []

    async def update(self, key: str, value: bytes, *, last: int, ttl: float) -> int:
        await trio.lowlevel.checkpoint()
        self.leases[key.removeprefix("h.")] = HubLease.decode(value)
        self.events.append(f"update {key}")
        return last + 1

    async def release(self, claim: PresenceClaim, reason: str) -> bool:
        await trio.lowlevel.checkpoint()
        self.released.append((claim.agent_id, reason))
        return True

    async def drop_lease(self) -> None:
        await trio.lowlevel.checkpoint()
        self.lease_dropped = True


async def hand_over(backplane: NatsBackplane, store: _HandoverStore) -> None:
    """What the backplane does when it stops (the hubs its lease watch saw live)."""
    await backplane._drainer.hand_over(store, list(backplane._hub_urls))  # type: ignore[arg-type]


def draining_backplane(*others: str) -> NatsBackplane:
    backplane = NatsBackplane(ClusterConfig(servers="nats://x:4222"), hub_id="b", grace=1.0)
    for agent in ("w1", "w2"):
        backplane.claims._claims[("acme", agent)] = claim(agent_id=agent, hub="b")
    backplane._hub_urls.update({hub: (f"ws://{hub}",) for hub in others})
    return backplane


LIVE, DRAINING = HubLease("a"), HubLease("a", draining=True)


@pytest.mark.parametrize(
    ("at_stop", "at_handover", "released", "reaped"),
    [
        # w1 stays online under hub b: it reconnects elsewhere, or hub a reaps it.
        (("a",), {"a": LIVE}, [("w2", "left")], []),
        # Alone: nobody would reap w1, so it is released at once; and what hub a
        # left online (a drained hub whose reaper is gone) is reaped: the last one out.
        ((), {}, [("w1", "disconnected"), ("w2", "left")], [("a", "disconnected")]),
        # Hub a is draining too (stopped at the same moment: the watch had not shown
        # it yet) or left during the stop: what was held back is released, and what
        # hub a left online is reaped.
        (("a",), {"a": DRAINING}, [("w2", "left"), ("w1", "disconnected")],
         [("a", "disconnected")]),
        (("a",), {"a": KvOp.DELETE}, [("w2", "left"), ("w1", "disconnected")],
         [("a", "disconnected")]),
        # Hub a died (its lease expired): its agents as a reaper would mark them.
        (("a",), {"a": KvOp.EXPIRED}, [("w2", "left"), ("w1", "disconnected")],
         [("a", HUB_LOST)]),
    ],
)  # fmt: skip
async def test_a_draining_hub_leaves_its_agents_online_for_the_others_unless_alone(
    at_stop: tuple[str, ...],
    at_handover: dict[str, HubLease | KvOp],
    released: list[tuple[str, str]],
    reaped: list[tuple[str, str]],
) -> None:
    backplane = draining_backplane(*at_stop)
    assert not backplane._drainer.draining
    backplane.begin_drain()
    assert backplane._drainer.draining
    backplane.announce_presence(attrs_update("w1", "disconnected"))  # closed by the stop
    backplane.announce_presence(attrs_update("w2", "left"))  # left during the stop
    store = _HandoverStore(at_handover)
    await hand_over(backplane, store)
    assert store.released == released
    assert store.reaped == reaped
    assert store.lease_dropped


async def test_a_draining_hub_s_lease_says_so_before_it_reads_the_others() -> None:
    """Hubs stopping together: each writes ``draining`` before it reads the others, so
    the last to read sees all of them draining and reaps (the last one out)."""
    backplane = draining_backplane("a")
    backplane.begin_drain()  # no lease refresh since
    store = _HandoverStore({"a": DRAINING, "b": HubLease("b")})
    await hand_over(backplane, store)
    assert store.events == ["read h.b", "update h.b", "read h.a", "snapshot", "read h.a"]
    written = store.leases["b"]
    assert isinstance(written, HubLease) and (written.hub, written.draining) == ("b", True)
    assert store.reaped == [("a", "disconnected")]


async def test_a_hub_that_is_not_draining_releases_a_disconnect_at_once() -> None:
    backplane = draining_backplane("a")
    backplane.announce_presence(attrs_update("w1", "disconnected"))
    store = _HandoverStore()
    await hand_over(backplane, store)
    assert store.released == [("w1", "disconnected")]


def attrs_update(agent: str, reason: str) -> PresenceUpdate:
    return PresenceUpdate("acme", agent, "offline", reason, 150.0, None, "b")


# ----------------------------------------------------- the reaper's timing, no NATS


class _ReaperStore:
    """Enough of a ClusterStore for :func:`run_reaper`: leases fed by the test, one
    election per lease revision, reaps recorded with their time."""

    hub_id = "a"

    def __init__(self) -> None:
        self.send, self._receive = trio.open_memory_channel[LeaseChange](10)
        self.elected: set[tuple[str, int]] = set()
        self.reaps: list[tuple[str, str, float]] = []
        self.kv = self

    @asynccontextmanager
    async def watch_leases(self) -> AsyncIterator[AsyncIterator[LeaseChange]]:
        yield self._receive

    async def entry(self, key: str) -> None:
        await trio.lowlevel.checkpoint()  # the lease did not come back

    async def elect_reaper(self, hub: str, revision: int, *, ttl: float) -> bool:
        await trio.lowlevel.checkpoint()
        won = (hub, revision) not in self.elected
        self.elected.add((hub, revision))
        return won

    async def reap(self, hub: str, *, reason: str) -> list[PresenceClaim]:
        await trio.lowlevel.checkpoint()
        self.reaps.append((hub, reason, trio.current_time()))
        return []


async def test_the_reaper_waits_the_grace_for_a_deleted_lease_too_and_reaps_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = _ReaperStore()
    reaped: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_reaper(
                store, grace=5.0, on_reaped=lambda hub, _: reaped.append(hub),  # type: ignore[arg-type]
                task_status=task_status,
            )
        )  # fmt: skip
        start = trio.current_time()
        await store.send.send(LeaseChange("b", False, 3, None))  # hub b drained
        await store.send.send(LeaseChange("b", False, 3, None))  # seen twice: one reap
        await store.send.send(LeaseChange("c", False, 4, None, expired=True))  # c died
        await trio.sleep(4.9)
        assert store.reaps == []  # nothing before the grace, deleted or expired
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert sorted((hub, reason) for hub, reason, _ in store.reaps) == [
        ("b", "disconnected"), ("c", HUB_LOST),
    ]  # fmt: skip
    assert all(at - start == pytest.approx(5.0, abs=0.01) for _, _, at in store.reaps)
    assert sorted(reaped) == ["b", "c"]


class _Peer:
    """A BackplanePeer that records what a ClaimKeeper tells the hub."""

    def __init__(self) -> None:
        self.observed: list[PresenceUpdate] = []

    def presence_observed(self, update: PresenceUpdate) -> None:
        self.observed.append(update)


def test_a_drained_run_s_leftovers_wait_for_the_grace_a_crashed_run_s_do_not() -> None:
    from artcafe_trio.cluster._claims import ClaimKeeper

    crashed, drained = (ClaimKeeper(ClusterConfig(servers="nats://x:4222"), "a") for _ in "12")
    drained.leftovers = {}  # the previous run's lease was deleted, not expired
    for keeper in (crashed, drained):
        keeper._peer = _Peer()  # type: ignore[assignment]
        for agent in ("w1", "w2"):
            keeper._claim_changed(("acme", agent), claim(agent_id=agent), initial=True)
    assert [(k[1], r) for k, (_, r) in crashed._releases.items()] == [
        ("w1", HUB_LOST), ("w2", HUB_LOST),
    ]  # fmt: skip
    assert not drained._releases and set(drained.leftovers) == {("acme", "w1"), ("acme", "w2")}
    # w2 went offline again meanwhile (a session here, released): that one is kept.
    newer = claim(agent_id="w2", epoch=4)
    drained._releases[("acme", "w2")] = (newer, "left")
    drained.release_leftovers("disconnected")
    assert drained.leftovers is None
    assert {k[1]: (c.epoch, r) for k, (c, r) in drained._releases.items()} == {
        "w1": (3, "disconnected"), "w2": (4, "left"),
    }  # fmt: skip
