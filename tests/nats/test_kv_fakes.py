"""Key-value edge cases against a fake JetStream (no server): races that a real
server makes too rare to hit on purpose."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import trio

from artcafe_trio.nats import KeyExistsError, KvEntry, KvOp, Msg
from artcafe_trio.nats._kv import KeyValue, KvWatcher
from artcafe_trio.nats._protocol import encode_headers

PREFIX = "$KV.b."


def answer(body: object) -> Msg:
    return Msg("_INBOX.x", 1, None, json.dumps(body).encode())


def error(code: int, err_code: int, description: str) -> Msg:
    return answer({"error": {"code": code, "err_code": err_code, "description": description}})


class StubSub:
    _closed = False

    async def unsubscribe(self) -> None:
        await trio.lowlevel.checkpoint()

    def _poke(self) -> None:
        pass


class FakeStream:
    """The stream ``KV_b`` behind a NatsClient stand-in: every message is kept."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, str, bytes, dict[str, str]]] = []
        self.consumers: list[dict[str, Any]] = []
        #: What each consumer would deliver, as the server computes it from its policy.
        self.deliveries: list[list[Msg]] = []
        #: Run once, right after a compare-and-set was refused / a last revision read.
        self.after_refusal: Callable[[], None] | None = None
        self.after_read: Callable[[], None] | None = None
        self._reconnect_hooks: list[Any] = []
        self.is_connected = True
        self.written: list[bytes] = []
        #: The consumer lands on a replica that has not applied the writes yet: it
        #: reports nothing pending (its deliveries come late, as ``deliveries``).
        self.lagging_replica = False
        #: The API never answers a consumer delete (its node died; a leader election).
        self.deletes_hang = False

    def write(self, key: str, value: bytes = b"", headers: Mapping[str, str] = {}) -> int:
        seq = (self.messages[-1][0] if self.messages else 0) + 1
        self.messages.append((seq, key, value, dict(headers)))
        return seq

    def remove(self, key: str) -> None:
        """The key's messages go, leaving no marker (an expiry without limit markers)."""
        self.messages = [m for m in self.messages if m[1] != key]

    def last(self, key: str) -> tuple[int, str, bytes, dict[str, str]] | None:
        found = [m for m in self.messages if m[1] == key]
        return found[-1] if found else None

    def _write(self, data: bytes) -> None:
        self.written.append(data)

    async def subscribe(self, subject: str) -> StubSub:
        await trio.lowlevel.checkpoint()
        return StubSub()

    async def request(
        self, subject: str, payload: bytes = b"", *, headers: Mapping[str, str] | None = None
    ) -> Msg:
        await trio.lowlevel.checkpoint()
        if subject.startswith(PREFIX):
            key = subject[len(PREFIX) :]
            expected = (headers or {}).get("Nats-Expected-Last-Subject-Sequence")
            last = self.last(key)
            have = last[0] if last else 0
            if expected is not None and int(expected) != have:
                if self.after_refusal is not None:
                    hook, self.after_refusal = self.after_refusal, None
                    hook()
                return error(400, 10071, f"wrong last sequence: {have}")
            return answer({"stream": "KV_b", "seq": self.write(key, payload, headers or {})})
        if subject == "$JS.API.STREAM.MSG.GET.KV_b":
            key = json.loads(payload)["last_by_subj"][len(PREFIX) :]
            last = self.last(key)
            if self.after_read is not None:
                hook, self.after_read = self.after_read, None
                hook()
            if last is None:
                return error(404, 10037, "no message found")
            seq, _, value, hdrs = last
            message: dict[str, Any] = {"subject": PREFIX + key, "seq": seq}
            message["data"] = base64.b64encode(value).decode()
            if hdrs:
                message["hdrs"] = base64.b64encode(encode_headers(hdrs)).decode()
            return answer({"message": message})
        if subject == "$JS.API.CONSUMER.CREATE.KV_b":
            config = json.loads(payload)["config"]
            self.consumers.append(config)
            deliveries = self._deliver(config, len(self.consumers))
            self.deliveries.append(deliveries)
            pending = 0 if self.lagging_replica else len(deliveries)
            return answer({"name": f"c{len(self.consumers)}", "num_pending": pending})
        if subject.startswith("$JS.API.CONSUMER.DELETE.KV_b."):
            if self.deletes_hang:
                await trio.sleep_forever()
            return answer({"success": True})
        if subject == "$JS.API.STREAM.INFO.KV_b":
            wanted = json.loads(payload)["subjects_filter"]
            assert wanted == PREFIX + ">"  # the tests' watches are on every key
            subjects = {PREFIX + m[1]: 1 for m in self.messages}
            return answer({"state": {"messages": len(self.messages), "subjects": subjects}})
        raise AssertionError(f"unexpected request on {subject}")

    def _deliver(self, config: Mapping[str, Any], consumer: int) -> list[Msg]:
        policy = config["deliver_policy"]
        if policy == "all":
            chosen = list(self.messages)
        elif policy == "last_per_subject":
            chosen = sorted({m[1]: m for m in self.messages}.values())
        else:
            assert policy == "by_start_sequence"
            chosen = [m for m in self.messages if m[0] >= config["opt_start_seq"]]
        return [
            Msg(
                PREFIX + key,
                1,
                f"$JS.ACK.KV_b.c{consumer}.1.{seq}.{n}.1700000000.{len(chosen) - n}",
                value,
            )
            for n, (seq, key, value, _) in enumerate(chosen, start=1)
        ]


def bucket() -> tuple[KeyValue, FakeStream]:
    stream = FakeStream()
    return KeyValue(stream, "b", {}, 5.0), stream  # type: ignore[arg-type]


async def test_create_retries_when_the_key_vanishes_between_the_refusal_and_the_read() -> None:
    kv, stream = bucket()
    stream.write("k", b"old")
    stream.after_refusal = lambda: stream.remove("k")  # its TTL ran out, no marker left
    revision = await kv.create("k", b"mine")
    last = stream.last("k")
    assert last is not None and (last[0], last[2]) == (revision, b"mine")


async def test_create_over_a_marker_looks_again_when_it_is_written_meanwhile() -> None:
    kv, stream = bucket()
    stream.write("k", b"", {"KV-Operation": "DEL"})
    assert await kv.create("k", b"reborn") == 2  # a deleted key counts as absent
    stream.write("k", b"", {"KV-Operation": "DEL"})
    # Another client's create wins between our read of the marker and our update.
    stream.after_read = lambda: stream.write("k", b"theirs")
    with pytest.raises(KeyExistsError) as caught:
        await kv.create("k", b"mine")
    assert caught.value.key == "k"
    last = stream.last("k")
    assert last is not None and last[2] == b"theirs"
    with pytest.raises(KeyExistsError):
        await kv.create("k", b"again")  # a live value: refused at once


async def test_a_reset_before_catching_up_does_not_replay_superseded_revisions() -> None:
    kv, stream = bucket()
    for key in ("a", "b", "c", "b"):  # b@2 is superseded by b@4
        stream.write(key, key.encode())
    watcher = KvWatcher(kv, ">", False, 1.0)
    await watcher._start()
    assert stream.consumers[-1]["deliver_policy"] == "last_per_subject"
    first = stream.deliveries[-1]  # a@1, c@3, b@4
    assert watcher._process(first[0]) == KvEntry("b", "a", b"a", 1, KvOp.PUT)
    # c@3 is lost on the way: the next delivery shows the gap; reset before catching up.
    assert watcher._process(first[2]) is None
    assert watcher._reset_needed and not watcher.caught_up
    stream.write("a", b"a2")  # a change meanwhile: a@5
    await watcher._reset()
    got = [e for m in stream.deliveries[-1] if (e := watcher._process(m)) is not None]
    assert [(e.key, e.revision) for e in got] == [("c", 3), ("b", 4), ("a", 5)]
    assert watcher.caught_up
    # Once caught up, a reset resumes right after the last revision seen.
    watcher._reset_needed = True
    await watcher._reset()
    assert stream.consumers[-1]["deliver_policy"] == "by_start_sequence"
    assert stream.consumers[-1]["opt_start_seq"] == 6


async def test_a_watch_with_history_resets_after_the_last_revision_seen() -> None:
    kv, stream = bucket()
    for key in ("a", "b", "a"):
        stream.write(key, key.encode())
    watcher = KvWatcher(kv, ">", True, 1.0)
    await watcher._start()
    assert stream.consumers[-1]["deliver_policy"] == "all"
    assert watcher._process(stream.deliveries[-1][0]) is not None
    watcher._reset_needed = True
    await watcher._reset()  # every revision after the last one seen, superseded or not
    assert stream.consumers[-1]["deliver_policy"] == "by_start_sequence"
    assert stream.consumers[-1]["opt_start_seq"] == 2
    got = [e for m in stream.deliveries[-1] if (e := watcher._process(m)) is not None]
    assert [(e.key, e.revision) for e in got] == [("b", 2), ("a", 3)]
    assert watcher.caught_up


async def test_a_reset_is_caught_up_when_its_snapshot_holds_only_delivered_values() -> None:
    kv, stream = bucket()
    for key in ("a", "b", "c"):
        stream.write(key, key.encode())
    watcher = KvWatcher(kv, ">", False, 1.0)
    await watcher._start()
    first = stream.deliveries[-1]
    assert watcher._process(first[0]) is not None
    assert watcher._process(first[1]) is not None
    watcher._reset_needed = True  # say a heartbeat went missing
    stream.remove("c")  # expired without a marker before the new snapshot
    await watcher._reset()
    again = stream.deliveries[-1]  # a@1, b@2: both delivered already
    assert [watcher._process(m) for m in again] == [None, None]
    assert watcher.caught_up


async def test_a_consumer_on_a_lagging_replica_does_not_make_the_watch_caught_up() -> None:
    """A fresh-clone CI run saw a watch report caught up with an empty table although
    the bucket held a value: the R1 consumer said nothing was pending. The watch asks
    the stream (its leader) before it believes that."""
    kv, stream = bucket()
    stream.write("a", b"1")
    stream.lagging_replica = True
    watcher = KvWatcher(kv, ">", False, 1.0)
    await watcher._start()
    assert not watcher.caught_up  # the stream holds "a": wait for its delivery
    [late] = stream.deliveries[-1]
    assert watcher._process(late) == KvEntry("b", "a", b"1", 1, KvOp.PUT)
    assert watcher.caught_up
    # An empty bucket: nothing pending and nothing in the stream: caught up at once.
    empty_kv, _ = bucket()
    empty = KvWatcher(empty_kv, ">", False, 1.0)
    await empty._start()
    assert empty.caught_up


async def test_a_reset_is_not_held_up_by_the_old_consumers_delete(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A fresh-clone CI run: after a NATS node died, the watch's reset waited the whole
    API timeout (40 s there) for the old consumer's delete, delivering nothing, and the
    cluster's presence stood still. The delete is cleanup (the consumer expires on its
    own): it gets the reset's short per-attempt bound."""
    kv, stream = bucket()  # API timeout 5 s
    stream.write("a", b"1")
    watcher = KvWatcher(kv, ">", False, 1.0)
    await watcher._start()
    stream.deletes_hang = True
    watcher._reset_needed = True
    started = trio.current_time()
    await watcher._reset()
    assert trio.current_time() - started == pytest.approx(1.0)
    assert len(stream.consumers) == 2 and watcher._consumer == "c2"


class CreateOnlyJetStream:
    """A NatsClient stand-in for ``key_value``'s creation: no bucket yet; the first
    ``drop`` stream creates are never answered (a clustered server drops a create it
    could not propose to a meta leader being elected); ``took_effect``: a dropped create
    made the stream all the same, so a repeated one is refused as a name in use."""

    def __init__(self, drop: int, *, took_effect: bool = False) -> None:
        self.drop = drop
        self.took_effect = took_effect
        self.created: dict[str, Any] | None = None
        self.creates: list[float] = []

    async def request(
        self, subject: str, payload: bytes = b"", *, headers: Mapping[str, str] | None = None
    ) -> Msg:
        await trio.lowlevel.checkpoint()
        if subject == "$JS.API.STREAM.INFO.KV_b":
            if self.created is None:
                return error(404, 10059, "stream not found")
            return answer({"config": self.created})
        assert subject == "$JS.API.STREAM.CREATE.KV_b", subject
        self.creates.append(trio.current_time())
        config = json.loads(payload)
        if len(self.creates) <= self.drop:
            if self.took_effect:
                self.created = config
            await trio.sleep_forever()
        if self.created is not None:
            return error(400, 10058, "stream name already in use with a different configuration")
        self.created = config
        return answer({"config": config})


@pytest.mark.parametrize("took_effect", [False, True])
async def test_an_unanswered_stream_create_is_sent_again(
    autojump_clock: trio.abc.Clock, took_effect: bool
) -> None:
    """A fresh-clone CI run: an R3 bucket's create went unanswered for the whole API
    timeout (40 s). Each attempt now waits a quarter of it; a create that took effect
    unanswered is read back."""
    from artcafe_trio.nats._kv import key_value

    nc: Any = CreateOnlyJetStream(drop=2, took_effect=took_effect)
    started = trio.current_time()
    kv = await key_value(nc, "b", api_timeout=8.0)
    assert [t - started for t in nc.creates] == [0.0, 2.0, 4.0]
    assert kv.bucket == "b" and nc.created is not None


async def test_a_stream_create_never_answered_fails_at_the_api_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    from artcafe_trio.nats import NatsTimeoutError
    from artcafe_trio.nats._kv import key_value

    nc: Any = CreateOnlyJetStream(drop=100)
    started = trio.current_time()
    with pytest.raises(NatsTimeoutError, match=r"STREAM\.CREATE\.KV_b within 5 s"):
        await key_value(nc, "b", api_timeout=5.0)
    assert trio.current_time() - started == pytest.approx(5.0)
    assert len(nc.creates) == 4  # 1.25 s each


async def test_an_unanswered_bind_is_sent_again(autojump_clock: trio.abc.Clock) -> None:
    """A fresh-clone CI run: binding a new R3 bucket got no answer to its stream info
    for 5 s (no stream leader yet: the request is lost, not late)."""
    from artcafe_trio.nats._kv import key_value

    class LeaderlessAtFirst(CreateOnlyJetStream):
        def __init__(self) -> None:
            super().__init__(drop=0)
            self.infos: list[float] = []

        async def request(
            self, subject: str, payload: bytes = b"", *, headers: Mapping[str, str] | None = None
        ) -> Msg:
            if subject.startswith("$JS.API.STREAM.INFO."):
                self.infos.append(trio.current_time())
                if len(self.infos) == 1:
                    await trio.sleep_forever()
            return await super().request(subject, payload, headers=headers)

    nc: Any = LeaderlessAtFirst()
    nc.created = {"name": "KV_b"}
    started = trio.current_time()
    kv = await key_value(nc, "b", create=False)  # api_timeout 5 s: 1.25 s per attempt
    assert [t - started for t in nc.infos] == [0.0, 1.25]
    assert kv.bucket == "b" and nc.creates == []
