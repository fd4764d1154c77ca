"""The hub's sans-IO ServerConnection: handshake, per-frame policy, close transitions.

No I/O, no trio: frames in as text, events and frames out, ``now`` passed in.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from artcafe_trio import LocalProtocolError, RemoteProtocolError
from artcafe_trio.protocol import (
    AdminAuth,
    Auth,
    Challenge,
    Error,
    Heartbeat,
    Leave,
    PresenceQuery,
    Publish,
    Subscribe,
    Unsubscribe,
    Welcome,
    decode,
    encode,
)
from artcafe_trio.protocol._codes import CloseCode
from artcafe_trio.protocol.server import (
    AuthRequested,
    ConnectionState,
    FrameRefused,
    HandshakeRefused,
    HeartbeatReceived,
    LeaveRequested,
    PeerError,
    PresenceRequested,
    PublishRequested,
    Refusal,
    ServerConnection,
    ServerLimits,
    SubscribeRequested,
    UnsubscribeRequested,
)

LIMITS = ServerLimits(hub_id="hub-1", max_frame_bytes=4096, max_subscriptions=2)


class Bucket:
    """A RateLimiter that records the times it was asked and answers from a script."""

    def __init__(self, *answers: bool) -> None:
        self.answers = list(answers)
        self.asked: list[float] = []

    def take(self, now: float) -> bool:
        self.asked.append(now)
        return self.answers.pop(0)


def auth(**fields: Any) -> Auth:
    defaults: dict[str, Any] = {
        "agent_id": "a", "tenant_id": "t", "algorithm": "ed25519", "signature": "c2ln",
    }  # fmt: skip
    return Auth(**{**defaults, **fields})


def fresh(
    agent_id: str | None = "a", tenant_id: str | None = "t", **limits: Any
) -> ServerConnection:
    conn = ServerConnection(
        ServerLimits(
            **{"hub_id": "hub-1", "max_frame_bytes": 4096, "max_subscriptions": 2, **limits}
        ),
        agent_id=agent_id,
        tenant_id=tenant_id,
        nonce="n0nce",
    )
    conn.challenge(100.0)
    return conn


def opened(bucket: Bucket | None = None, **auth_fields: Any) -> ServerConnection:
    conn = fresh()
    event = conn.receive_auth(encode(auth(**auth_fields)), 101.0)
    assert isinstance(event, AuthRequested)
    conn.accept(session_id="s-1", hub_time=1234.5, bucket=bucket)
    return conn


def opened_admin() -> ServerConnection:
    conn = fresh(None, None)
    assert isinstance(conn.receive_auth(encode(AdminAuth(token="tok")), 101.0), AuthRequested)
    conn.accept(session_id="s-adm", hub_time=1.0)
    return conn


def refused(conn: ServerConnection, text: str | bytes) -> Error:
    event = conn.receive_text(text, 200.0)
    assert isinstance(event, FrameRefused), event
    assert decode(event.text) == event.error
    assert event.error.fatal is False
    return event.error


# --- handshake -------------------------------------------------------------------


def test_challenge_is_issued_once_with_its_deadline() -> None:
    conn = ServerConnection(LIMITS, agent_id="a", tenant_id="t", nonce="n0nce")
    assert conn.state is ConnectionState.AWAITING_AUTH
    assert decode(conn.challenge(100.0)) == Challenge(
        nonce="n0nce", expires_in=30.0, hub_id="hub-1"
    )
    assert conn.challenge_deadline == 130.0
    with pytest.raises(LocalProtocolError, match="already"):
        conn.challenge(101.0)


def test_a_well_formed_auth_asks_the_authenticator() -> None:
    conn = fresh()
    claim = auth()
    text = json.dumps({**json.loads(encode(claim)), "id": "x"})  # no id field: still echoed
    event = conn.receive_auth(text, 101.0)
    assert event == AuthRequested(claim, "x", "t/a", "t/a")
    assert conn.state is ConnectionState.AUTHENTICATING
    with pytest.raises(LocalProtocolError):
        conn.receive_auth(encode(claim), 102.0)  # one first frame only


def test_ids_that_differ_from_the_url_are_named_for_the_log() -> None:
    event = fresh().receive_auth(encode(auth(agent_id="b\n")), 101.0)
    assert isinstance(event, AuthRequested)
    assert (event.identity, event.who) == ("t/b\n", "t/b\\n (URL says t/a)")


@pytest.mark.parametrize(
    ("text", "code", "frame_id", "close", "reason", "identity"),
    [
        ("{nope", "invalid_json", None, 4006, "expected auth", ""),
        ('{"type":"teleport","id":"t1"}', "unknown_type", "t1", 4006, "expected auth", ""),
        ('{"type":"heartbeat","seq":1,"id":"h1"}', "not_authenticated", "h1", 4006,
         "expected auth", ""),
        (encode(auth(protocol=2)), "unsupported_protocol", None, 4006,
         "this hub speaks protocol 1", "t/a"),
    ],
)  # fmt: skip
def test_first_frames_the_connection_refuses_itself(
    text: str, code: str, frame_id: str | None, close: int, reason: str, identity: str
) -> None:
    conn = fresh()
    event = conn.receive_auth(text, 101.0)
    assert isinstance(event, HandshakeRefused)
    refusal = event.refusal
    assert (refusal.code, refusal.frame_id, refusal.close, refusal.identity) == (
        code, frame_id, close, identity,
    )  # fmt: skip
    assert conn.state is ConnectionState.AUTHENTICATING  # the driver refuses (and counts)
    error = decode(conn.refuse(refusal))
    assert error == Error(code=code, message=refusal.message, id=frame_id, fatal=True)
    assert conn.state is ConnectionState.CLOSING
    assert (conn.close_code, conn.close_reason) == (close, reason)


def test_a_refused_first_frame_cannot_be_accepted() -> None:
    """Fail closed: after ``HandshakeRefused`` the only way on is ``refuse``; accepting
    would welcome a connection that never authenticated (as the admin, even)."""
    conn = fresh()
    event = conn.receive_auth('{"type":"heartbeat","seq":1}', 101.0)
    assert isinstance(event, HandshakeRefused)
    with pytest.raises(LocalProtocolError, match="first frame was refused"):
        conn.accept(session_id="s-1", hub_time=1.0)
    assert conn.state is ConnectionState.AUTHENTICATING
    conn.refuse(event.refusal)
    assert conn.state is ConnectionState.CLOSING


def test_not_authenticated_names_the_frame_type() -> None:
    event = fresh().receive_auth('{"type":"leave"}', 101.0)
    assert isinstance(event, HandshakeRefused)
    assert event.refusal.message == "expected an auth frame, got 'leave'"


def test_the_admin_path_takes_only_admin_auth() -> None:
    event = fresh(None, None).receive_auth(encode(auth()), 101.0)
    assert isinstance(event, HandshakeRefused)
    assert event.refusal == Refusal(
        code="authentication_failed", message="bad admin token", frame_id=None,
        close=CloseCode.AUTHENTICATION_FAILED, who="admin", cause="a auth frame",
        identity="$admin",
    )  # fmt: skip
    conn = fresh(None, None)
    ok = conn.receive_auth(encode(AdminAuth(token="tok")), 101.0)
    assert ok == AuthRequested(AdminAuth(token="tok"), None, "$admin", "admin")


def test_the_agent_path_refuses_admin_auth_as_not_authenticated() -> None:
    event = fresh().receive_auth(encode(AdminAuth(token="tok")), 101.0)
    assert isinstance(event, HandshakeRefused)
    assert (event.refusal.code, event.refusal.close) == ("not_authenticated", 4006)


def test_an_authenticator_refusal_closes_with_its_code() -> None:
    conn = fresh()
    conn.receive_auth(encode(auth()), 101.0)
    refusal = Refusal(
        code="authentication_failed", message="unknown agent or signature does not verify",
        frame_id="f", close=CloseCode.AUTHENTICATION_FAILED, who="t/a", cause="unknown tenant",
    )  # fmt: skip
    assert json.loads(conn.refuse(refusal)) == {
        "type": "error", "code": "authentication_failed", "id": "f", "fatal": True,
        "message": "unknown agent or signature does not verify",
    }  # fmt: skip
    assert (conn.close_code, conn.close_reason) == (4001, refusal.message)
    with pytest.raises(LocalProtocolError):
        conn.refuse(refusal)
    with pytest.raises(LocalProtocolError):
        conn.accept(session_id="s", hub_time=0.0)


@pytest.mark.parametrize("answered", [False, True])
def test_the_challenge_expires_at_its_deadline(answered: bool) -> None:
    conn = fresh()
    if answered:  # still being checked (throttle, registry) when it expires
        conn.receive_auth(encode(auth()), 101.0)
    assert conn.expire(129.999) is None
    assert conn.state is not ConnectionState.CLOSING
    expired = conn.expire(130.0)
    assert expired is not None
    assert decode(expired) == Error(
        code="challenge_expired",
        message="no auth frame checked before the challenge expired",
        fatal=True,
    )
    assert (conn.state, conn.close_code, conn.close_reason) == (
        ConnectionState.CLOSING, 4002, "challenge expired",
    )  # fmt: skip
    assert conn.expire(200.0) is None  # once


def test_an_open_connection_does_not_expire() -> None:
    conn = opened()
    assert conn.expire(1e9) is None
    assert conn.state is ConnectionState.OPEN


@pytest.mark.parametrize(
    ("interval", "multiplier", "effective", "timeout"),
    [
        (2.0, 3.0, 2.0, 6.0),
        (0.1, 100.0, 0.5, 5.0),  # both raised/lowered to the bounds
        (1000.0, 1.0, 300.0, 450.0),
        (None, 3.0, None, None),  # no heartbeats: no deadline
    ],
)
def test_welcome_carries_the_clamped_heartbeat_settings(
    interval: float | None, multiplier: float, effective: float | None, timeout: float | None
) -> None:
    conn = fresh()
    conn.receive_auth(
        encode(auth(heartbeat_interval=interval, heartbeat_timeout_multiplier=multiplier)), 101.0
    )
    welcome = decode(conn.accept(session_id="s-1", hub_time=1234.5))
    assert welcome == Welcome(
        session_id="s-1", agent_id="a", tenant_id="t", hub_id="hub-1", hub_time=1234.5,
        heartbeat_interval=effective, heartbeat_timeout=timeout, max_frame_bytes=4096,
    )  # fmt: skip
    assert conn.state is ConnectionState.OPEN
    assert (conn.heartbeat_interval, conn.heartbeat_timeout) == (effective, timeout)
    assert (conn.session_id, conn.reply_prefix) == ("s-1", "$reply.s-1.")


def test_the_admin_session_is_named_admin() -> None:
    conn = opened_admin()
    assert (conn.tenant_id, conn.agent_id, conn.is_admin) == ("*", "$admin", True)
    assert conn.heartbeat_timeout is None


def test_frames_before_welcome_are_a_local_error() -> None:
    conn = fresh()
    with pytest.raises(LocalProtocolError, match="receive_text needs a OPEN connection"):
        conn.receive_text('{"type":"heartbeat","seq":1}', 101.0)


# --- per-frame events and policy -------------------------------------------------


def test_each_allowed_frame_is_one_event() -> None:
    conn = opened()
    heartbeat = Heartbeat(seq=7, rtt=0.01)
    assert conn.receive_text(encode(heartbeat), 200.0) == HeartbeatReceived(heartbeat)
    query = PresenceQuery(id="q")
    assert conn.receive_text(encode(query), 200.0) == PresenceRequested(query)
    unsubscribe = Unsubscribe(id="u", subject="x.>")
    assert conn.receive_text(encode(unsubscribe), 200.0) == UnsubscribeRequested(unsubscribe)
    report = Error(code="oops", message="m")
    assert conn.receive_text(encode(report), 200.0) == PeerError("oops", "m")
    publish = Publish(subject="a.b", data={"k": 1}, id="p")
    assert conn.receive_text(encode(publish), 200.0) == PublishRequested(publish, False)
    reply = Publish(subject="$reply.s-9.1", data=1)
    assert conn.receive_text(encode(reply), 200.0) == PublishRequested(reply, True)


def test_subscribe_policy() -> None:
    conn = opened()
    first = Subscribe(id="1", subject="x.>")
    assert conn.receive_text(encode(first), 200.0) == SubscribeRequested(first, True)
    conn.subscriptions.add("x.>")  # the hub adds what it indexed
    assert conn.receive_text(encode(first), 200.0) == SubscribeRequested(first, False)
    presence = Subscribe(id="2", subject="$presence.b")
    assert conn.receive_text(encode(presence), 200.0) == SubscribeRequested(presence, True)
    conn.subscriptions.add("$presence.b")
    error = refused(conn, encode(Subscribe(id="3", subject="y")))
    assert error == Error(
        code="too_many_subscriptions", message="at most 2 subscriptions per connection", id="3"
    )
    # a pattern already held is not a new subscription, even at the limit
    assert conn.receive_text(encode(first), 200.0) == SubscribeRequested(first, False)
    error = refused(conn, encode(Subscribe(id="4", subject="$reply.>")))
    assert error == Error(
        code="forbidden_subject",
        message="'$reply.>' is reserved; only $presence.* may be subscribed to",
        id="4",
    )


def test_the_admin_channel_subscribes_to_presence_only_and_never_publishes() -> None:
    conn = opened_admin()
    ok = Subscribe(id="1", subject="$presence.>")
    assert conn.receive_text(encode(ok), 200.0) == SubscribeRequested(ok, True)
    assert refused(conn, encode(Subscribe(id="2", subject="$presence.a"))) == Error(
        code="forbidden_subject",
        message="the admin channel can only subscribe to $presence.>",
        id="2",
    )
    assert refused(conn, encode(Publish(subject="a", id="3"))) == Error(
        code="forbidden_subject", message="the admin channel cannot publish", id="3"
    )


def test_publish_subject_rules() -> None:
    conn = opened()
    assert refused(conn, encode(Publish(subject="$presence.a", id="1"))) == Error(
        code="forbidden_subject",
        message="'$presence.a' is reserved for the hub; agents may not publish to it",
        id="1",
    )
    assert refused(conn, encode(Publish(subject="a", reply_to="$reply.s-2.x", id="2"))) == Error(
        code="forbidden_subject",
        message="reply_to must be a normal subject or under $reply.s-1.",
        id="2",
    )
    for reply_to in ("$reply.s-1.x", "inbox.a"):
        frame = Publish(subject="a", reply_to=reply_to)
        assert conn.receive_text(encode(frame), 200.0) == PublishRequested(frame, False)


def test_admit_publish_takes_a_token_at_now_then_encodes_once() -> None:
    bucket = Bucket(True, False, True)
    conn = opened(bucket)
    frame = Publish(subject="a", data={"b": [1, 2.5, None]}, id="p")
    assert conn.admit_publish(frame, 300.0) == '{"b":[1,2.5,null]}'
    with pytest.raises(RemoteProtocolError) as info:
        conn.admit_publish(frame, 300.5)
    assert (info.value.code, info.value.message, info.value.frame_id) == (
        "rate_limited", "publish rate above 1000/s; slow down and retry", "p",
    )  # fmt: skip
    event = conn.receive_text('{"type":"publish","subject":"a","id":"q","data":1e999}', 301.0)
    assert isinstance(event, PublishRequested)
    with pytest.raises(RemoteProtocolError) as info:
        conn.admit_publish(event.frame, 301.0)
    assert (info.value.code, info.value.frame_id) == ("invalid_field", "q")
    assert info.value.message == "data holds a number out of range or is nested too deeply"
    assert bucket.asked == [300.0, 300.5, 301.0]  # the token is taken before encoding


@pytest.mark.parametrize(
    ("text", "code", "frame_id"),
    [
        ("{not json", "invalid_json", None),
        ('{"":"","id":""}', "missing_field", ""),  # an empty id is still echoed
        ('{"type":"welcome","id":"x1"}', "missing_field", "x1"),
        ('{"type":"published","id":"y1","message_id":"m"}', "unexpected_type", "y1"),
        ('{"type":"challenge","nonce":"n","expires_in":1,"hub_id":"h","id":"c"}',
         "unexpected_type", "c"),
        (encode(auth()), "already_authenticated", None),
        ('{"type":"admin_auth","token":"t","id":"z"}', "already_authenticated", "z"),
        (b"\x00binary", "binary_frame", None),
        (json.dumps({"type": "publish", "subject": "a", "data": "x" * 5000}), "frame_too_large",
         None),
        ('{"type":"publish","id":"i1","subject":"a..b"}', "invalid_subject", "i1"),
    ],
)  # fmt: skip
def test_refused_frames_echo_their_id(text: str | bytes, code: str, frame_id: str | None) -> None:
    conn = opened()
    error = refused(conn, text)
    assert (error.code, error.id) == (code, frame_id)
    assert conn.state is ConnectionState.OPEN  # a refused frame never closes


def test_refusal_of_a_hub_wide_error_falls_back_to_the_frame_id() -> None:
    conn = opened()
    named = conn.refusal(RemoteProtocolError("reply_not_expected", "m", frame_id="p"), "other")
    assert named.error == Error(code="reply_not_expected", message="m", id="p")
    unnamed = conn.refusal(RemoteProtocolError("x", "m"), "q")
    assert unnamed.error.id == "q"


# --- closing ----------------------------------------------------------------------


def test_leave_is_reported_and_the_driver_closes() -> None:
    conn = opened()
    assert conn.receive_text(encode(Leave(reason="bye")), 200.0) == LeaveRequested("bye")
    assert conn.left and conn.state is ConnectionState.OPEN
    assert conn.close(CloseCode.NORMAL, "left") is True
    assert (conn.state, conn.close_code, conn.close_reason) == (
        ConnectionState.CLOSING, 1000, "left",
    )  # fmt: skip


def test_the_first_close_wins_then_closed() -> None:
    conn = opened()
    assert conn.close(CloseCode.REPLACED, "replaced by a newer session s-2") is True
    assert conn.close(CloseCode.SERVICE_RESTART, "hub shutting down") is False
    assert (conn.close_code, conn.close_reason) == (4003, "replaced by a newer session s-2")
    assert conn.closing
    with pytest.raises(LocalProtocolError):
        conn.receive_text('{"type":"heartbeat","seq":1}', 200.0)
    with pytest.raises(LocalProtocolError):
        conn.admit_publish(Publish(subject="a"), 200.0)
    conn.connection_closed()
    assert conn.state is ConnectionState.CLOSED and conn.closing
    assert conn.close(CloseCode.NORMAL, "") is False


def test_a_connection_lost_during_the_handshake_is_closed_without_a_code() -> None:
    conn = fresh()
    conn.connection_closed()
    assert (conn.state, conn.close_code) == (ConnectionState.CLOSED, None)
    assert conn.expire(1e9) is None
