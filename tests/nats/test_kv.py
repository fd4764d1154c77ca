"""JetStream key-value against a real 3-node cluster (R3 buckets)."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from artcafe_trio import Backoff
from artcafe_trio.nats import (
    BucketNotFoundError,
    JetStreamError,
    KeyExistsError,
    KvEntry,
    KvOp,
    NatsError,
    WrongLastRevisionError,
    open_nats,
)

from .servers import API_TIMEOUT, NatsNode, run_single

_names = itertools.count()


def bucket_name() -> str:
    return f"b{next(_names)}"


async def test_bucket_operations_on_an_r3_bucket(nats_cluster: list[NatsNode]) -> None:
    async with open_nats([n.url for n in nats_cluster]) as nc:
        with pytest.raises(BucketNotFoundError):
            await nc.key_value("missing", create=False)
        kv = await nc.key_value(bucket_name(), history=5, replicas=3, api_timeout=API_TIMEOUT)
        assert kv.config["num_replicas"] == 3
        assert await kv.get("k") is None
        r1 = await kv.create("k", b"one")
        with pytest.raises(KeyExistsError):
            await kv.create("k", b"again")
        r2 = await kv.update("k", b"two", last=r1)
        with pytest.raises(WrongLastRevisionError) as caught:
            await kv.update("k", b"stale", last=r1)
        assert caught.value.key == "k"
        assert caught.value.err_code == 10071
        assert await kv.get("k") == KvEntry(kv.bucket, "k", b"two", r2, KvOp.PUT)
        assert await kv.get("k", revision=r1) == KvEntry(kv.bucket, "k", b"one", r1, KvOp.PUT)
        r3 = await kv.put("k", b"three")
        assert r1 < r2 < r3
        await kv.delete("k")
        assert await kv.get("k") is None
        r5 = await kv.create("k", b"reborn")  # a deleted key counts as absent
        assert (await kv.get("k")) == KvEntry(kv.bucket, "k", b"reborn", r5, KvOp.PUT)
        await kv.purge("k")
        assert await kv.get("k") is None
        assert await kv.get("k", revision=r1) is None  # the purge removed the history
        # Binding again gives the same bucket, whatever options are passed.
        again = await nc.key_value(kv.bucket, history=1)
        assert again.config["max_msgs_per_subject"] == 5
        with pytest.raises(ValueError, match="invalid key"):
            await kv.put("a b", b"")


async def test_an_update_race_between_two_clients_has_exactly_one_winner(
    nats_cluster: list[NatsNode],
) -> None:
    n1, n2, _ = nats_cluster
    async with open_nats(n1.url) as a, open_nats(n2.url) as b:
        name = bucket_name()
        kv_a = await a.key_value(name, replicas=3, api_timeout=API_TIMEOUT)
        kv_b = await b.key_value(name)
        revision = await kv_a.put("race", b"start")
        for round_ in range(10):
            outcomes: dict[str, object] = {}

            async def attempt(who: str, kv: object, last: int, outcomes: dict[str, object]) -> None:
                try:
                    outcomes[who] = await kv.update("race", who.encode(), last=last)  # type: ignore[attr-defined]
                except WrongLastRevisionError as exc:
                    outcomes[who] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(attempt, "a", kv_a, revision, outcomes)
                nursery.start_soon(attempt, "b", kv_b, revision, outcomes)
            winners = [who for who, out in outcomes.items() if isinstance(out, int)]
            assert len(winners) == 1, (round_, outcomes)
            entry = await kv_a.get("race")
            assert entry is not None
            assert entry.value == winners[0].encode()
            assert entry.revision == outcomes[winners[0]]
            revision = entry.revision


async def test_a_watched_keys_ttl_expiry_is_seen_within_a_second(
    nats_cluster: list[NatsNode],
) -> None:
    async with open_nats([n.url for n in nats_cluster]) as nc:
        kv = await nc.key_value(
            bucket_name(), replicas=3, limit_marker_ttl=1, api_timeout=API_TIMEOUT
        )
        await kv.put("stays", b"1")
        async with kv.watch("*") as watcher:
            first = await anext(watcher)
            assert (first.key, first.op) == ("stays", KvOp.PUT)
            assert watcher.caught_up
            ttl = 1.0
            revision = await kv.create("short", b"lived", ttl=ttl)
            created = trio.current_time()
            with trio.fail_after(5):
                put = await anext(watcher)
                expired = await anext(watcher)
            seen = trio.current_time() - created
            assert put == KvEntry(kv.bucket, "short", b"lived", revision, KvOp.PUT)
            assert (expired.key, expired.op, expired.value) == ("short", KvOp.EXPIRED, b"")
            assert expired.revision > revision
            assert ttl - 0.05 <= seen <= ttl + 1.0
        assert await kv.get("short") is None
        with pytest.raises(ValueError, match="ttl"):
            await kv.create("x", b"", ttl=0.5)


async def test_max_age_expires_a_key_and_the_watcher_sees_the_marker(
    nats_cluster: list[NatsNode],
) -> None:
    async with open_nats([n.url for n in nats_cluster]) as nc:
        kv = await nc.key_value(
            bucket_name(), replicas=3, max_age=1, limit_marker_ttl=1, api_timeout=API_TIMEOUT
        )
        assert kv.config["max_age"] == 1_000_000_000
        async with kv.watch("*") as watcher:
            revision = await kv.put("aging", b"old")
            written = trio.current_time()
            with trio.fail_after(5):
                put = await anext(watcher)
                expired = await anext(watcher)
            seen = trio.current_time() - written
        assert put == KvEntry(kv.bucket, "aging", b"old", revision, KvOp.PUT)
        assert (expired.key, expired.op, expired.value) == ("aging", KvOp.EXPIRED, b"")
        assert expired.revision > revision
        assert 1.0 - 0.05 <= seen <= 1.0 + 2.0
        assert await kv.get("aging") is None


async def test_allow_msg_ttl_without_markers_removes_expired_keys_silently(
    nats_cluster: list[NatsNode],
) -> None:
    async with open_nats([n.url for n in nats_cluster]) as nc:
        kv = await nc.key_value(
            bucket_name(), replicas=3, allow_msg_ttl=True, api_timeout=API_TIMEOUT
        )
        assert kv.config["allow_msg_ttl"] is True
        assert not kv.config.get("subject_delete_marker_ttl")
        await kv.put("stays", b"1")
        created = await kv.create("short", b"lived", ttl=1)
        entry = await kv.entry("short")
        assert entry is not None and (entry.revision, entry.ttl) == (created, 1.0)
        with trio.fail_after(5):
            while await kv.get("short") is not None:
                await trio.sleep(0.1)
        # No marker: the key has no last revision at all, so it is not listed either.
        assert await kv.entry("short") is None
        assert await kv.keys() == ["stays"]
        async with kv.watch(">") as watcher:
            first = await anext(watcher)
            assert (first.key, watcher.caught_up) == ("stays", True)


async def test_update_with_a_ttl_sets_the_revision_s_ttl_and_expires_the_key(
    nats_cluster: list[NatsNode],
) -> None:
    async with open_nats([n.url for n in nats_cluster]) as nc:
        kv = await nc.key_value(
            bucket_name(), replicas=3, limit_marker_ttl=1, api_timeout=API_TIMEOUT
        )
        first = await kv.put("lease", b"a")
        assert (await kv.entry("lease")).ttl is None  # type: ignore[union-attr]
        async with kv.watch("lease") as watcher:
            assert (await anext(watcher)).revision == first
            second = await kv.update("lease", b"b", last=first, ttl=2)
            updated = trio.current_time()
            entry = await kv.get("lease")
            assert entry is not None and (entry.value, entry.ttl) == (b"b", 2.0)
            with pytest.raises(WrongLastRevisionError):
                await kv.update("lease", b"c", last=first, ttl=2)  # still compare-and-set
            with trio.fail_after(6):
                put = await anext(watcher)
                expired = await anext(watcher)
            seen = trio.current_time() - updated
        assert (put.revision, put.ttl) == (second, 2.0)
        assert (expired.key, expired.op) == ("lease", KvOp.EXPIRED)
        assert 2.0 - 0.05 <= seen <= 2.0 + 1.0
        assert await kv.get("lease") is None


async def test_a_ttl_write_to_a_bucket_without_ttl_support_is_refused_clearly(
    nats_cluster: list[NatsNode],
) -> None:
    async with open_nats([n.url for n in nats_cluster]) as nc:
        kv = await nc.key_value(bucket_name(), replicas=3, api_timeout=API_TIMEOUT)
        revision = await kv.put("k", b"v")
        writes: list[Callable[[], Awaitable[int]]] = [
            lambda: kv.create("new", b"", ttl=1),
            lambda: kv.update("k", b"w", last=revision, ttl=1),
        ]
        for write in writes:
            with pytest.raises(JetStreamError, match="without allow_msg_ttl") as caught:
                await write()
            assert (caught.value.code, caught.value.err_code) == (400, 10166)
            assert not isinstance(caught.value, WrongLastRevisionError)
        assert await kv.get("new") is None
        assert (await kv.get("k")).value == b"v"  # type: ignore[union-attr]


async def test_entries_carry_their_time_and_ttl_and_keys_are_listed(
    nats_cluster: list[NatsNode],
) -> None:
    import time

    async with open_nats([n.url for n in nats_cluster]) as nc:
        kv = await nc.key_value(
            bucket_name(), replicas=3, limit_marker_ttl=1, api_timeout=API_TIMEOUT
        )
        before = time.time()
        await kv.create("h.one", b"1", ttl=30)
        await kv.put("h.two", b"2")
        await kv.put("other", b"3")
        after = time.time()
        one, two = await kv.entry("h.one"), await kv.get("h.two")
        assert one is not None and two is not None
        assert one.time is not None and before - 1 <= one.time <= after + 1
        assert (one.ttl, two.ttl) == (30.0, None)
        assert await kv.keys("h.*") == ["h.one", "h.two"]
        assert await kv.keys("nothing.*") == []
        async with kv.watch("h.*") as watcher:
            seen = [await anext(watcher), await anext(watcher)]
        assert [(e.key, e.ttl) for e in seen] == [("h.one", 30.0), ("h.two", None)]
        assert [e.time for e in seen] == pytest.approx([one.time, two.time], abs=1e-3)


async def test_watch_reports_puts_deletes_and_purges_in_order(nats_cluster: list[NatsNode]) -> None:
    async with open_nats(nats_cluster[0].url) as nc:
        kv = await nc.key_value(bucket_name(), history=10, replicas=3, api_timeout=API_TIMEOUT)
        await kv.put("a.1", b"x")
        await kv.put("a.1", b"y")
        await kv.put("b.1", b"z")
        async with kv.watch("a.*", include_history=True) as watcher:
            await kv.delete("a.1")
            await kv.put("a.2", b"w")
            with trio.fail_after(5):
                got = [await anext(watcher) for _ in range(4)]
            await kv.purge("a.2")  # (before "w" was delivered it would have removed it)
            with trio.fail_after(5):
                got.append(await anext(watcher))
        assert [(e.key, e.op, e.value) for e in got] == [
            ("a.1", KvOp.PUT, b"x"),
            ("a.1", KvOp.PUT, b"y"),
            ("a.1", KvOp.DELETE, b""),
            ("a.2", KvOp.PUT, b"w"),
            ("a.2", KvOp.PURGE, b""),
        ]
        assert [e.revision for e in got] == sorted(e.revision for e in got)


async def test_watch_resumes_after_a_node_dies_without_loss_or_duplicates(
    own_nats_cluster: list[NatsNode],
) -> None:
    n1, n2, _ = own_nats_cluster
    backoff = Backoff(base=0.05, cap=0.5, max_attempts=None)
    async with (
        open_nats(n1.url, backoff=backoff) as watching,
        open_nats(n2.url, backoff=backoff) as writing,
    ):
        # Created patiently (an R3 bucket needs an election), then used through a
        # handle whose 1 s API timeout lets the puts below retry during the failover.
        name = bucket_name()
        await writing.key_value(name, replicas=3, history=64, api_timeout=API_TIMEOUT)
        kv = await writing.key_value(name, api_timeout=1.0)
        watched = await watching.key_value(kv.bucket)
        seen: list[KvEntry] = []
        async with watched.watch(">", idle_heartbeat=0.5) as watcher:
            for i in range(30):
                await kv.put(f"k{i}", b"%d" % i)
            with trio.fail_after(10):
                while len(seen) < 30:
                    seen.append(await anext(watcher))
            await trio.to_thread.run_sync(n1.kill)  # kill and reap off the event loop
            last = 0
            for i in range(30, 60):
                # Bounded, generously: a JetStream leader election after a node dies
                # took up to 5.5 s on this machine under load.
                with trio.fail_after(30):
                    while True:  # the stream may be electing a new leader
                        try:
                            last = await kv.put(f"k{i}", b"%d" % i)
                            break
                        except NatsError:
                            await trio.sleep(0.1)
            with trio.fail_after(30):
                while seen[-1].revision < last:
                    seen.append(await anext(watcher))
            assert watcher.resets >= 1
        # The truth: every message the stream holds (history=64 keeps every revision),
        # read through a handle with a patient API timeout (right after the election the
        # consumer API may take more than the 1 s the watched handle allows, under load).
        patient = await writing.key_value(kv.bucket, api_timeout=10.0)
        async with patient.watch(">", include_history=True) as truth:
            expected = [await anext(truth)]
            while expected[-1].revision < last:
                expected.append(await anext(truth))
        revisions = [e.revision for e in seen]
        assert revisions == sorted(set(revisions))  # in order, no duplicates
        assert [e.revision for e in expected] == revisions  # nothing lost
        assert {int(e.value) for e in seen} == set(range(60))


@pytest.fixture
def plain_node(tmp_path: Path) -> Iterator[NatsNode]:
    with run_single(tmp_path, jetstream=False) as node:
        yield node


async def test_a_server_without_jetstream_gives_a_clear_error(plain_node: NatsNode) -> None:
    async with open_nats(plain_node.url) as nc:
        with pytest.raises(JetStreamError, match="JetStream is not enabled") as caught:
            await nc.key_value("nope")
        assert caught.value.code == 503
