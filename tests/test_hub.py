"""The hub, driven frame by frame over memory streams (timing under autojump_clock)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trio

from artcafe_trio import CloseCode, HubConfig, open_hub
from artcafe_trio.protocol import (
    Auth,
    Challenge,
    Error,
    Heartbeat,
    HeartbeatAck,
    Leave,
    Message,
    PresenceEvent,
    PresenceQuery,
    PresenceState,
    Publish,
    Published,
    Subscribe,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    auth_payload,
    decode,
)
from artcafe_trio.testing import TestHub, open_test_hub

from .conftest import RawClient, raw_connect

pytestmark = [pytest.mark.timeout(30), pytest.mark.usefixtures("hub_streams")]


async def connect(
    hub: TestHub, nursery: trio.Nursery, agent: str, tenant: str = "t1", **kw: object
) -> RawClient:
    key = hub.register(tenant, agent)
    client = await raw_connect(hub, nursery, agent, tenant, key, **kw)  # type: ignore[arg-type]
    assert client.welcome is not None, getattr(client, "refusal", None)
    return client


# --- authentication -----------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ed25519", "rsa"])
async def test_auth_succeeds_with_both_key_types(
    test_hub: TestHub, nursery: trio.Nursery, algorithm: str
) -> None:
    key = test_hub.register("t1", "a1", algorithm=algorithm)
    client = await raw_connect(test_hub, nursery, "a1", "t1", key)
    assert client.welcome is not None
    assert client.welcome.agent_id == "a1"
    assert client.welcome.tenant_id == "t1"
    assert client.welcome.heartbeat_timeout == 30.0


async def test_heartbeat_settings_are_clamped(test_hub: TestHub, nursery: trio.Nursery) -> None:
    config = test_hub.hub.config
    low = await connect(
        test_hub, nursery, "low", heartbeat_interval=0.001, heartbeat_timeout_multiplier=1.0
    )
    assert low.welcome is not None
    assert low.welcome.heartbeat_interval == config.min_heartbeat_interval
    assert (
        low.welcome.heartbeat_timeout
        == config.min_heartbeat_interval * config.min_timeout_multiplier
    )
    high = await connect(
        test_hub, nursery, "high", heartbeat_interval=10_000.0, heartbeat_timeout_multiplier=99.0
    )
    assert high.welcome is not None
    assert (
        high.welcome.heartbeat_timeout
        == config.max_heartbeat_interval * config.max_timeout_multiplier
    )


async def expect_refusal(client: RawClient, code: str, close: int) -> Error:
    refusal = getattr(client, "refusal", None)
    assert isinstance(refusal, Error), refusal
    assert refusal.code == code
    assert refusal.fatal
    assert await client.close_code() == close
    return refusal


async def test_wrong_key_and_unknown_agent_answer_alike(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    test_hub.register("t1", "known")
    stranger = test_hub.register("t1", "other")
    wrong = await raw_connect(test_hub, nursery, "known", "t1", stranger)
    unknown_key = test_hub.register("t9", "x")
    unknown = await raw_connect(test_hub, nursery, "nobody", "t1", unknown_key)
    e1 = await expect_refusal(wrong, "authentication_failed", CloseCode.AUTHENTICATION_FAILED)
    e2 = await expect_refusal(unknown, "authentication_failed", CloseCode.AUTHENTICATION_FAILED)
    assert e1.message == e2.message


async def test_signature_for_another_tenant_or_agent_fails(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    key = test_hub.register("t1", "a1")
    test_hub.register("t2", "a1")
    client = await raw_connect(test_hub, nursery, "a1", "t1", key, authenticate=False)
    challenge = await client.recv()
    assert isinstance(challenge, Challenge)
    for tenant, agent in [("t2", "a1"), ("t1", "a2")]:
        signature = key.sign_auth(tenant_id=tenant, agent_id=agent, nonce=challenge.nonce)
        assert not key.public_key.verify_auth(
            signature, tenant_id="t1", agent_id="a1", nonce=challenge.nonce
        )
    forged = await raw_connect(
        test_hub, nursery, "a1", "t1", key,
        signature=key.sign_auth(tenant_id="t2", agent_id="a1", nonce="whatever"),
    )  # fmt: skip
    await expect_refusal(forged, "authentication_failed", CloseCode.AUTHENTICATION_FAILED)
    # Still waiting for its auth, it would hold the hub's shutdown for close_timeout + 1 s.
    await client.ws.aclose()


async def test_replayed_auth_frame_fails_on_a_new_connection(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    key = test_hub.register("t1", "a1")
    first = await raw_connect(test_hub, nursery, "a1", "t1", key, authenticate=False)
    challenge = await first.recv()
    assert isinstance(challenge, Challenge)
    captured = {
        "type": "auth", "agent_id": "a1", "tenant_id": "t1", "algorithm": key.algorithm,
        "signature": key.sign_auth(tenant_id="t1", agent_id="a1", nonce=challenge.nonce),
        "heartbeat_interval": 10,
    }  # fmt: skip
    await first.send(json.dumps(captured))
    assert (await first.recv()).type == "welcome"
    second = await raw_connect(test_hub, nursery, "a1", "t1", None, authenticate=False)
    second_challenge = await second.recv()
    assert isinstance(second_challenge, Challenge)
    assert second_challenge.nonce != challenge.nonce
    await second.send(json.dumps(captured))
    answer = await second.recv()
    assert isinstance(answer, Error)
    assert answer.code == "authentication_failed"
    assert await second.close_code() == CloseCode.AUTHENTICATION_FAILED


async def test_challenge_expires(
    test_hub: TestHub, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    key = test_hub.register("t1", "a1")
    client = await raw_connect(test_hub, nursery, "a1", "t1", key, authenticate=False)
    start = trio.current_time()
    challenge = await client.recv()
    assert isinstance(challenge, Challenge)
    assert challenge.expires_in == 30.0
    answer = await client.recv()
    assert isinstance(answer, Error)
    assert answer.code == "challenge_expired"
    assert trio.current_time() - start == pytest.approx(30.0)
    assert await client.close_code() == CloseCode.CHALLENGE_EXPIRED


async def test_repeated_failures_from_one_address_are_slowed(
    test_hub: TestHub, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    test_hub.register("t1", "a1")
    wrong = test_hub.register("t1", "intruder")
    answer_delays = []
    for _ in range(6):
        client = await raw_connect(test_hub, nursery, "a1", "t1", wrong, authenticate=False)
        challenge = await client.recv()
        assert isinstance(challenge, Challenge)
        sig = wrong.sign_auth(tenant_id="t1", agent_id="a1", nonce=challenge.nonce)
        await client.send(json.dumps({"type": "auth", "agent_id": "a1", "tenant_id": "t1",
                                      "algorithm": wrong.algorithm, "signature": sig}))  # fmt: skip
        sent = trio.current_time()
        assert isinstance(await client.recv(), Error)
        answer_delays.append(round(trio.current_time() - sent, 6))
    assert answer_delays == [0, 0, 0, 0.25, 0.5, 1.0]


async def test_frame_before_auth_is_refused(test_hub: TestHub, nursery: trio.Nursery) -> None:
    client = await raw_connect(test_hub, nursery, "a1", "t1", None, authenticate=False)
    await client.recv()
    await client.send(Subscribe(id="s1", subject="tasks.>"))
    answer = await client.recv()
    assert isinstance(answer, Error)
    assert (answer.code, answer.id) == ("not_authenticated", "s1")
    assert await client.close_code() == CloseCode.PROTOCOL_VIOLATION


async def test_path_and_auth_must_agree(test_hub: TestHub, nursery: trio.Nursery) -> None:
    key = test_hub.register("t1", "a1")
    client = await raw_connect(test_hub, nursery, "a1", "t1", key, path_agent="a2")
    await expect_refusal(client, "authentication_failed", CloseCode.AUTHENTICATION_FAILED)


# --- routing ---------------------------------------------------------------------


async def test_delivery_carries_concrete_subject_and_no_subscription(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    sub = await connect(test_hub, nursery, "sub")
    pub = await connect(test_hub, nursery, "pub")
    await sub.subscribe("tasks.*")
    await pub.send(Publish(subject="tasks.new", data={"n": 1}, id="p1"))
    ack = await pub.recv_type(Published)
    [message] = await sub.messages(1)
    assert (message.subject, message.subscription, message.data) == (
        "tasks.new",
        None,
        {"n": 1},
    )
    assert message.sender == "pub"
    assert message.message_id == ack.message_id


@pytest.mark.parametrize("pattern", ["tasks.new", "tasks.*", "tasks.>", "*.new", ">", "*.*"])
async def test_no_delivery_crosses_tenants(
    test_hub: TestHub, nursery: trio.Nursery, pattern: str
) -> None:
    a_sub = await connect(test_hub, nursery, "agent", "tenant-a")
    b_sub = await connect(test_hub, nursery, "agent", "tenant-b")
    b_pub = await connect(test_hub, nursery, "pub", "tenant-b")
    await a_sub.subscribe(pattern)
    await b_sub.subscribe(pattern)
    await b_pub.send(Publish(subject="tasks.new", data="for b", id="x"))
    await b_pub.recv_type(Published)
    [got] = await b_sub.messages(1)
    assert got.data == "for b"
    # tenant-a's identical subscriber saw nothing: its next frame is the answer to a query.
    await a_sub.send(PresenceQuery(id="q"))
    answer = await a_sub.recv()
    assert isinstance(answer, PresenceState), answer
    assert {r.tenant_id for r in answer.agents} == {"tenant-a"}


async def test_presence_prefix_cannot_be_published_and_reply_prefix_not_subscribed(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    client = await connect(test_hub, nursery, "a1")
    await client.send(Publish(subject="$presence.victim", data={"status": "offline"}, id="p"))
    err = await client.recv_type(Error)
    assert (err.code, err.id) == ("forbidden_subject", "p")
    await client.send(Subscribe(id="s", subject="$reply.>"))
    err = await client.recv_type(Error)
    assert (err.code, err.id) == ("forbidden_subject", "s")
    await client.send(Publish(subject="x", id="r", reply_to="$reply.someone-else.1"))
    err = await client.recv_type(Error)
    assert (err.code, err.id) == ("forbidden_subject", "r")


async def test_publisher_receives_its_own_message_when_subscribed(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    client = await connect(test_hub, nursery, "a1")
    await client.subscribe("echo.>")
    await client.send(Publish(subject="echo.1", data=1))
    [message] = await client.messages(1)
    assert message.sender == "a1"


async def test_resent_publish_id_is_acked_but_delivered_once(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    sub = await connect(test_hub, nursery, "sub")
    pub = await connect(test_hub, nursery, "pub")
    await sub.subscribe("jobs")
    await pub.send(Publish(subject="jobs", data=1, id="same"))
    first = await pub.recv_type(Published)
    await pub.send(Publish(subject="jobs", data=1, id="same"))
    second = await pub.recv_type(Published)
    assert not first.duplicate
    assert second.duplicate
    assert second.message_id == first.message_id
    await pub.send(Publish(subject="jobs", data=2, id="other"))
    messages = await sub.messages(2)
    assert [m.data for m in messages] == [1, 2]


async def test_dedupe_survives_reconnect_of_the_same_agent(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    key = test_hub.register("t1", "pub")
    sub = await connect(test_hub, nursery, "sub")
    await sub.subscribe("jobs")
    first = await raw_connect(test_hub, nursery, "pub", "t1", key)
    await first.send(Publish(subject="jobs", data=1, id="p-1"))
    await first.recv_type(Published)
    second = await raw_connect(test_hub, nursery, "pub", "t1", key)
    await second.send(Publish(subject="jobs", data=1, id="p-1"))
    assert (await second.recv_type(Published)).duplicate
    await second.send(Publish(subject="jobs", data=2, id="p-2"))
    assert [m.data for m in await sub.messages(2)] == [1, 2]


async def test_request_reply_goes_only_to_the_requester(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    requester = await connect(test_hub, nursery, "req")
    worker = await connect(test_hub, nursery, "worker")
    assert requester.welcome is not None
    await worker.subscribe("math.double")
    reply_to = f"$reply.{requester.welcome.session_id}.abc"
    await requester.send(Publish(subject="math.double", data=21, reply_to=reply_to))
    [request] = await worker.messages(1)
    assert request.reply_to == reply_to
    await worker.send(Publish(subject=request.reply_to, data=42))
    [reply] = await requester.messages(1)
    assert (reply.subject, reply.data, reply.subscription) == (reply_to, 42, None)


async def test_unsubscribe_stops_delivery(test_hub: TestHub, nursery: trio.Nursery) -> None:
    client = await connect(test_hub, nursery, "a1")
    await client.subscribe("a")
    await client.send(Unsubscribe(id="u", subject="a"))
    assert (await client.recv_type(Unsubscribed)).id == "u"
    await client.send(Publish(subject="a", data=1, id="p"))
    await client.send(PresenceQuery(id="q"))
    frames = [await client.recv(), await client.recv()]
    assert [f.type for f in frames] == ["published", "presence_state"]


# --- bad input and limits ------------------------------------------------------


async def test_every_bad_input_class_gets_an_error_and_the_connection_survives(
    nursery: trio.Nursery,
) -> None:
    async with open_test_hub(max_frame_bytes=4096) as hub:
        client = await connect(hub, nursery, "a1")
        cases = [
            ("{not json", "invalid_json", None),
            ("[1, 2]", "not_an_object", None),
            ('{"type": "teleport", "id": "t1"}', "unknown_type", "t1"),
            ('{"type": "subscribe", "id": "m1"}', "missing_field", "m1"),
            ('{"type": "heartbeat", "seq": "one"}', "invalid_field", None),
            ('{"type": "publish", "id": "i1", "subject": "a..b"}', "invalid_subject", "i1"),
            ('{"type": "publish", "id": "w1", "subject": "tasks.*"}', "invalid_subject", "w1"),
            ('{"type": "welcome", "id": "x1"}', "missing_field", "x1"),
            (json.dumps({"type": "publish", "id": "big", "subject": "a", "data": "x" * 5000}), "frame_too_large", None),
            (b"\x00\x01binary", "binary_frame", None),
            (json.dumps({"type": "auth", "agent_id": "a", "tenant_id": "t", "algorithm": "ed25519", "signature": ""}), "already_authenticated", None),
            (json.dumps({"type": "published", "id": "y1", "message_id": "m"}), "unexpected_type", "y1"),
        ]  # fmt: skip
        for text, code, frame_id in cases:
            await client.send(text)
            err = await client.recv()
            assert isinstance(err, Error), (text, err)
            assert (err.code, err.id) == (code, frame_id), text
            assert not err.fatal
            await client.send(Heartbeat(seq=1))
            assert isinstance(await client.recv(), HeartbeatAck)
        assert hub.hub.stats.refused_frames == len(cases)


async def test_frame_above_the_hard_limit_closes_with_1009(nursery: trio.Nursery) -> None:
    async with open_test_hub(max_frame_bytes=1024) as hub:
        client = await connect(hub, nursery, "a1")
        bystander = await connect(hub, nursery, "a2")
        await client.send("x" * (1024 * 4 + 65536 + 1))
        assert await client.close_code() == 1009
        await bystander.send(Heartbeat(seq=7))
        assert (await bystander.recv_type(HeartbeatAck)).seq == 7


async def test_publish_rate_limit_answers_rate_limited_without_disconnecting(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    async with open_test_hub(publish_rate=10.0, publish_burst=3) as hub:
        sub = await connect(hub, nursery, "sub")
        await sub.subscribe("x")
        pub = await connect(hub, nursery, "pub")
        for i in range(4):
            await pub.send(Publish(subject="x", data=i, id=f"p{i}"))
        answers = [await pub.recv() for _ in range(4)]
        assert [a.type for a in answers] == ["published"] * 3 + ["error"]
        assert (answers[3].code, answers[3].id) == ("rate_limited", "p3")  # type: ignore[attr-defined]
        await trio.sleep(0.1)  # one token refills
        await pub.send(Publish(subject="x", data=9, id="p9"))
        assert (await pub.recv_type(Published)).id == "p9"
        assert [m.data for m in await sub.messages(4)] == [0, 1, 2, 9]


async def test_too_many_subscriptions(nursery: trio.Nursery) -> None:
    async with open_test_hub(max_subscriptions=2) as hub:
        client = await connect(hub, nursery, "a1")
        await client.subscribe("a")
        await client.subscribe("b")
        await client.send(Subscribe(id="c", subject="c"))
        err = await client.recv_type(Error)
        assert (err.code, err.id) == ("too_many_subscriptions", "c")
        await client.subscribe("a")  # re-subscribing an existing pattern is fine


# --- presence ----------------------------------------------------------------------


async def presence_events(client: RawClient, count: int) -> list[tuple[float, PresenceEvent]]:
    out = []
    for message in await client.messages(count):
        assert message.subject.startswith("$presence.")
        out.append((trio.current_time(), PresenceEvent.from_data(message.data)))
    return out


@pytest.mark.parametrize(("interval", "multiplier"), [(10.0, 3.0), (30.0, 3.0), (1.0, 2.0)])
async def test_offline_with_reason_timeout_exactly_at_the_deadline(
    test_hub: TestHub, nursery: trio.Nursery, autojump_clock: trio.abc.Clock,
    interval: float, multiplier: float,
) -> None:  # fmt: skip
    watcher = await connect(test_hub, nursery, "watcher", heartbeat_interval=None)
    await watcher.subscribe("$presence.>")
    hung = await connect(
        test_hub, nursery, "hung", heartbeat_interval=interval,
        heartbeat_timeout_multiplier=multiplier,
    )  # fmt: skip
    [(_, online)] = await presence_events(watcher, 1)
    assert (online.agent_id, online.status, online.reason) == ("hung", "online", "connected")
    await trio.sleep(interval)
    await hung.send(Heartbeat(seq=1))
    await hung.recv_type(HeartbeatAck)
    last_frame = trio.current_time()
    [(seen_at, offline)] = await presence_events(watcher, 1)
    assert (offline.agent_id, offline.status, offline.reason) == ("hung", "offline", "timeout")
    assert seen_at - last_frame == pytest.approx(interval * multiplier, abs=1e-9)
    assert await hung.close_code() == CloseCode.HEARTBEAT_TIMEOUT
    [record] = [r for r in test_hub.hub.presence_table() if r.agent_id == "hung"]
    assert (record.status, record.reason) == ("offline", "timeout")


async def test_disconnect_grace_suppresses_a_flap(
    test_hub: TestHub, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    key = test_hub.register("t1", "flappy")
    watcher = await connect(test_hub, nursery, "watcher", heartbeat_interval=None)
    await watcher.subscribe("$presence.>")
    first = await raw_connect(test_hub, nursery, "flappy", "t1", key)
    await presence_events(watcher, 1)  # online
    await first.ws.aclose()
    await trio.sleep(3.0)  # shorter than the 5 s grace
    second = await raw_connect(test_hub, nursery, "flappy", "t1", key)
    assert second.welcome is not None
    await trio.sleep(10.0)
    await second.send(Heartbeat(seq=1))
    await second.recv_type(HeartbeatAck)
    await second.ws.aclose()
    closed_at = trio.current_time()
    [(seen_at, event)] = await presence_events(watcher, 1)
    assert (event.status, event.reason) == ("offline", "disconnected")
    assert seen_at - closed_at == pytest.approx(5.0, abs=1e-3)
    # The registry is written in a worker thread, after the event went out (at once,
    # over a socket): wait for it, on the real clock (the autojump clock does not see
    # the thread).
    deadline = time.monotonic() + 5
    while len(history := test_hub.registry.presence_history("t1", "flappy")) < 2:
        assert time.monotonic() < deadline, history
        await trio.sleep(0.01)
    assert [(h.status, h.reason) for h in reversed(history)] == [
        ("online", "connected"), ("offline", "disconnected"),
    ]  # fmt: skip


async def test_take_over_closes_the_older_session_without_a_flap(
    test_hub: TestHub, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    key = test_hub.register("t1", "dup")
    watcher = await connect(test_hub, nursery, "watcher", heartbeat_interval=None)
    await watcher.subscribe("$presence.>")
    older = await raw_connect(test_hub, nursery, "dup", "t1", key)
    await presence_events(watcher, 1)
    newer = await raw_connect(test_hub, nursery, "dup", "t1", key)
    assert newer.welcome is not None
    assert await older.close_code() == CloseCode.REPLACED
    await trio.sleep(20)
    await newer.send(Leave())
    [(_, event)] = await presence_events(watcher, 1)
    assert (event.status, event.reason) == ("offline", "left")
    assert event.session_id == newer.welcome.session_id


async def test_leave_marks_offline_left_and_closes_normally(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    client = await connect(test_hub, nursery, "a1")
    await client.send(Leave(reason="bye"))
    assert await client.close_code() == 1000
    [record] = test_hub.hub.presence_table("t1")
    assert (record.status, record.reason) == ("offline", "left")


async def test_simple_agent_without_heartbeats_never_times_out(
    test_hub: TestHub, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    client = await connect(test_hub, nursery, "simple", heartbeat_interval=None)
    assert client.welcome is not None
    assert client.welcome.heartbeat_timeout is None
    await trio.sleep(3600)
    [record] = test_hub.hub.presence_table("t1")
    assert record.status == "online"


async def test_removed_or_disabled_key_closes_the_live_session_within_a_second(
    test_hub: TestHub, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    removed = await connect(test_hub, nursery, "removed")
    disabled = await connect(test_hub, nursery, "disabled")
    start = trio.current_time()
    test_hub.registry.remove_key("t1", "removed")
    test_hub.registry.set_disabled("t1", "disabled", True)
    assert await removed.close_code() == CloseCode.KEY_REVOKED
    assert await disabled.close_code() == CloseCode.KEY_REVOKED
    assert trio.current_time() - start <= 1.0


async def test_presence_query_returns_only_the_tenants_table(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    a = await connect(test_hub, nursery, "a1", "t1")
    await connect(test_hub, nursery, "b1", "t2")
    await a.send(PresenceQuery(id="q"))
    state = await a.recv_type(PresenceState)
    assert [(r.tenant_id, r.agent_id, r.status) for r in state.agents] == [("t1", "a1", "online")]


async def test_presence_records_name_the_agents_hub(
    test_hub: TestHub, nursery: trio.Nursery
) -> None:
    a = await connect(test_hub, nursery, "a1", "t1")
    await a.send(PresenceQuery(id="q"))
    state = await a.recv_type(PresenceState)
    assert [r.hub_id for r in state.agents] == [test_hub.hub.config.hub_id]


async def test_last_seen_survives_a_hub_restart(tmp_path: object, nursery: trio.Nursery) -> None:
    from pathlib import Path

    db = Path(str(tmp_path)) / "hub.db"
    async with open_hub(db=db, port=None) as hub:
        test_hub = TestHub(hub)
        client = await connect(test_hub, nursery, "a1")
        await client.send(Heartbeat(seq=1))
        await client.recv_type(HeartbeatAck)
        await client.send(Leave())
        await client.close_code()
    async with open_hub(db=db, port=None) as hub:
        [record] = hub.presence_table()
        assert (record.agent_id, record.status, record.reason) == ("a1", "offline", "left")
        assert record.hub_id is None  # the registry keeps no hub: unknown, not this one
        assert record.last_seen is not None
        assert record.last_heartbeat is not None


async def test_crash_while_online_is_recorded_as_an_outage(tmp_path: object) -> None:
    from pathlib import Path

    from artcafe_trio import Registry
    from artcafe_trio.registry._registry import PresenceChange

    db = Path(str(tmp_path)) / "hub.db"
    with Registry.open(db) as registry:  # what a hub killed with SIGKILL leaves behind
        registry.record_presence(
            [PresenceChange("t1", "a1", "online", "connected", "s-1", 100.0, last_seen=150.0)]
        )
    async with open_hub(db=db, port=None) as hub:
        [record] = hub.presence_table()
        assert (record.status, record.reason, record.last_seen) == (
            "offline",
            "disconnected",
            150.0,
        )
        history = hub.registry.presence_history("t1", "a1")
        assert (history[0].status, history[0].reason, history[0].time) == (
            "offline",
            "disconnected",
            150.0,
        )


async def test_shutdown_does_not_wait_for_a_connection_still_awaiting_its_auth(
    autojump_clock: Any,
) -> None:
    """A connection that took its challenge and sent nothing holds no session: a shutdown
    ends its wait at once with 1012, rather than waiting out ``close_timeout`` + 1 s (or
    the challenge) for it."""
    async with trio.open_nursery() as nursery:
        async with open_test_hub(close_timeout=2.0, challenge_timeout=30.0) as hub:
            key = hub.register("t1", "a1")
            idle = await raw_connect(hub, nursery, "a1", "t1", key, authenticate=False)
            assert isinstance(await idle.recv(), Challenge)
            agent = await raw_connect(hub, nursery, "a2", "t1", hub.register("t1", "a2"))
            stopping_at = trio.current_time()
        assert trio.current_time() - stopping_at == 0.0
        assert await idle.close_code() == CloseCode.SERVICE_RESTART
        assert await agent.close_code() == CloseCode.SERVICE_RESTART
        nursery.cancel_scope.cancel()


async def test_an_auth_still_being_checked_when_the_hub_stops_gets_1012_not_a_session(
    autojump_clock: Any,
) -> None:
    """The shutdown's close of every session is past by the time this check ends: a
    session made then would be held open until the shutdown gives up on it."""
    import trio_websocket

    async with trio.open_nursery() as nursery:
        async with open_test_hub(
            auth_failures_free=0, close_timeout=2.0, challenge_timeout=30.0
        ) as hub:
            key = hub.register("t1", "a1")
            forged = await raw_connect(
                hub, nursery, "a1", "t1", key,
                signature=key.sign_auth(tenant_id="t1", agent_id="a1", nonce="not it"),
            )  # fmt: skip
            assert forged.welcome is None  # one failure: the next check waits 0.25 s
            late = await raw_connect(hub, nursery, "a1", "t1", key, authenticate=False)
            challenge = await late.recv()
            assert isinstance(challenge, Challenge)
            signature = key.sign_auth(tenant_id="t1", agent_id="a1", nonce=challenge.nonce)
            await late.send(
                Auth(agent_id="a1", tenant_id="t1", algorithm=key.algorithm, signature=signature)
            )
            await trio.sleep(0.1)  # the hub holds the check in the slow-down
        frames = []
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            while True:
                frames.append(decode(await late.ws.get_message()))
        assert not any(isinstance(frame, Welcome) for frame in frames), frames
        assert closed.value.reason.code == CloseCode.SERVICE_RESTART
        nursery.cancel_scope.cancel()


# --- real sockets ----------------------------------------------------------------


async def test_shutdown_closes_agents_with_1012_over_tcp(nursery: trio.Nursery) -> None:
    import trio_websocket

    async with open_hub(port=0) as hub:
        key = hub.registry and None
        assert hub.url is not None and hub.url.startswith("ws://127.0.0.1:")
        test_hub = TestHub(hub)
        key = test_hub.register("t1", "a1")
        ws = await trio_websocket.connect_websocket_url(
            nursery, f"{hub.url}/api/v1/ws/agent/a1?tenant_id=t1"
        )
        client = RawClient(ws)
        challenge = await client.recv()
        assert isinstance(challenge, Challenge)
        payload = auth_payload("t1", "a1", challenge.nonce)
        assert key.public_key.verify(key.sign(payload), payload)
        await client.send(json.dumps({"type": "auth", "agent_id": "a1", "tenant_id": "t1",
            "algorithm": key.algorithm,
            "signature": key.sign_auth(tenant_id="t1", agent_id="a1", nonce=challenge.nonce)}))  # fmt: skip
        assert (await client.recv()).type == "welcome"
    assert await client.close_code() == CloseCode.SERVICE_RESTART


async def test_a_consumer_that_never_reads_is_cut_off_alone() -> None:
    import trio_websocket

    # A long close_timeout lets the hub finish the frame it was writing when it cut the
    # consumer off, so the consumer, once it reads again, sees the close code.
    config = HubConfig(send_queue_size=8, publish_rate=1e9, publish_burst=10**9, close_timeout=30)
    async with open_hub(port=0, config=config) as hub, trio.open_nursery() as nursery:
        test_hub = TestHub(hub)

        async def tcp_client(agent: str) -> RawClient:
            key = test_hub.register("t1", agent)
            ws = await trio_websocket.connect_websocket_url(
                nursery, f"{hub.url}/api/v1/ws/agent/{agent}?tenant_id=t1", max_message_size=10**7
            )
            client = RawClient(ws)
            challenge = await client.recv()
            assert isinstance(challenge, Challenge)
            sig = key.sign_auth(tenant_id="t1", agent_id=agent, nonce=challenge.nonce)
            await client.send(json.dumps({"type": "auth", "agent_id": agent, "tenant_id": "t1",
                                          "algorithm": key.algorithm, "signature": sig}))  # fmt: skip
            assert (await client.recv()).type == "welcome"
            return client

        stuck = await tcp_client("stuck")
        await stuck.subscribe("firehose")
        healthy = await tcp_client("healthy")
        await healthy.subscribe("firehose")
        pub = await tcp_client("pub")
        blob = "x" * 60_000
        count = 400  # 24 MB: far more than the socket buffers hold
        received = 0

        async def read_all() -> None:
            nonlocal received
            while received < count:
                await healthy.recv_type(Message)
                received += 1

        with trio.fail_after(20):
            async with trio.open_nursery() as inner:
                inner.start_soon(read_all)
                for i in range(count):
                    # Paced by the healthy reader (at most 4 ahead): a publisher faster
                    # than a reader makes that reader a slow consumer too, rightly.
                    while i - received > 4:
                        await trio.sleep(0.001)
                    await pub.send(Publish(subject="firehose", data=blob, id=f"m{i}"))
        assert received == count
        assert hub.stats.slow_consumers == 1
        with trio.fail_after(5):
            # The stuck consumer was cut off: draining it ends with the slow-consumer code.
            assert await stuck.close_code() == CloseCode.SLOW_CONSUMER
        for client in (stuck, healthy, pub):
            with trio.move_on_after(2):
                await client.ws.aclose()
        nursery.cancel_scope.cancel()


# --- WebSocket pings --------------------------------------------------------------


async def test_a_ping_on_an_idle_connection_is_answered_at_once(
    test_hub: TestHub, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """A pong used to wait for the hub's next write (a heartbeat ACK, a message): on an
    idle connection, for ever."""
    client = await connect(test_hub, nursery, "pinger", heartbeat_interval=None)
    with trio.fail_after(1):
        await client.ws.ping(b"are you there")


async def test_a_ping_flood_is_answered_and_holds_nothing_in_the_hub(
    test_hub: TestHub, nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    from wsproto.frame_protocol import FrameProtocol

    client = await connect(test_hub, nursery, "flooder", heartbeat_interval=None)
    session = test_hub.hub._directory.live("t1", "flooder")  # type: ignore[attr-defined]
    ping = bytes(FrameProtocol(client=True, extensions=[]).ping(b"p" * 125))
    stream = test_hub._streams[-1]
    # 1,000 pings, 125 KiB of pongs owed: fewer than the send queue holds, so a reader
    # that keeps reading is never cut off, however the scheduler interleaves the two
    # (2,000 over a socket pair could outrun the client's reads on a loaded machine).
    assert HubConfig().send_queue_size > 1000
    for _ in range(10):
        await stream.send_all(ping * 100)
    await trio.sleep(1)  # the hub has read them all
    assert session.ws.unsent_bytes == 0  # none waits for a write that may never come
    assert test_hub.hub.output_budget.used == 0
    await client.send(Heartbeat(seq=1))
    assert (await client.recv_type(HeartbeatAck)).seq == 1
