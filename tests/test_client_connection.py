"""The sans-IO client connection: exact, no I/O, no trio."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

from artcafe_trio import AuthenticationError, HubError, LocalProtocolError, RemoteProtocolError
from artcafe_trio.protocol import Challenge, Welcome, encode
from artcafe_trio.protocol._keys import generate_private_key
from artcafe_trio.protocol.client import (
    AdminCredentials,
    AgentCredentials,
    ChallengeReceived,
    ClientConnection,
    ClientState,
    HeartbeatAcked,
    HubErrorReceived,
    IdAllocator,
    MessageReceived,
    PresenceAnswered,
    PublishConfirmed,
    PublishRefused,
    ReplyAbandoned,
    ReplyReceived,
    RequestAbandoned,
    RequestRefused,
    SubscribeConfirmed,
    UnexpectedFrame,
    UnsubscribeConfirmed,
    Welcomed,
)

KEY = generate_private_key()
CHALLENGE = encode(Challenge(nonce="n0nce", expires_in=30, hub_id="hub"))


def welcome(**fields: Any) -> str:
    values: dict[str, Any] = {
        "session_id": "s-1",
        "agent_id": "a1",
        "tenant_id": "acme",
        "hub_id": "hub",
        "hub_time": 0.0,
        "heartbeat_interval": 5.0,
        "heartbeat_timeout": 15.0,
    }
    values.update(fields)
    return encode(Welcome(**values))


def agent_conn(**creds: Any) -> ClientConnection:
    credentials = AgentCredentials(agent_id="a1", tenant_id="acme", private_key=KEY, **creds)
    return ClientConnection(credentials, ids=IdAllocator("p"))


def open_conn(now: float = 100.0, **welcome_fields: Any) -> ClientConnection:
    conn = agent_conn()
    conn.receive(CHALLENGE, now)
    conn.auth()
    conn.receive(welcome(**welcome_fields), now)
    assert conn.state is ClientState.OPEN
    return conn


def state(conn: ClientConnection) -> ClientState:
    return conn.state  # read through a call: mypy does not narrow it between steps


def frame(text: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(text)
    return value


def test_agent_handshake_signs_the_challenge() -> None:
    conn = agent_conn(heartbeat_interval=5.0, capabilities=["x"], metadata={"k": 1})
    assert state(conn) is ClientState.AWAITING_CHALLENGE
    events = conn.receive(CHALLENGE, 1.0)
    assert events == [ChallengeReceived(Challenge(nonce="n0nce", expires_in=30, hub_id="hub"))]
    assert state(conn) is ClientState.CHALLENGED
    auth = frame(conn.auth())
    assert state(conn) is ClientState.AWAITING_WELCOME
    assert auth["type"] == "auth" and auth["agent_id"] == "a1" and auth["tenant_id"] == "acme"
    assert auth["heartbeat_interval"] == 5.0 and auth["capabilities"] == ["x"]
    assert auth["metadata"] == {"k": 1} and auth["algorithm"] == "ed25519"
    assert KEY.public_key.verify_auth(
        auth["signature"], tenant_id="acme", agent_id="a1", nonce="n0nce"
    )
    [event] = conn.receive(welcome(), 2.0)
    assert isinstance(event, Welcomed) and event.welcome.session_id == "s-1"
    assert state(conn) is ClientState.OPEN and conn.session_id == "s-1"
    assert conn.heartbeat_timeout == 15.0 and conn.ack_deadline == 17.0


def test_admin_handshake_sends_the_token() -> None:
    conn = ClientConnection(AdminCredentials(token="t0ken"))
    assert "t0ken" not in repr(conn.credentials)
    conn.receive(CHALLENGE, 0.0)
    assert frame(conn.auth()) == {"type": "admin_auth", "token": "t0ken"}
    conn.receive(welcome(heartbeat_interval=None, heartbeat_timeout=None), 0.0)
    assert conn.state is ClientState.OPEN and conn.ack_deadline is None


def test_admin_refusal_is_an_authentication_error() -> None:
    conn = ClientConnection(AdminCredentials(token="bad"))
    conn.receive(CHALLENGE, 0.0)
    conn.auth()
    refusal = encode_error("authentication_failed", "bad token")
    with pytest.raises(AuthenticationError, match="refused the admin token: bad token"):
        conn.receive(refusal, 0.0)
    assert conn.state is ClientState.ERROR


def encode_error(code: str, message: str, frame_id: str | None = None) -> str:
    from artcafe_trio.protocol import Error

    return encode(Error(code=code, message=message, id=frame_id))


@pytest.mark.parametrize("code", ["authentication_failed", "unsupported_protocol"])
def test_agent_refusal_is_an_authentication_error_with_the_code(code: str) -> None:
    conn = agent_conn()
    conn.receive(CHALLENGE, 0.0)
    conn.auth()
    with pytest.raises(AuthenticationError) as info:
        conn.receive(encode_error(code, "no"), 0.0)
    assert info.value.code == code
    assert str(info.value) == "the hub refused agent 'a1' of tenant 'acme': no"
    assert conn.state is ClientState.ERROR


def test_other_handshake_error_is_a_hub_error() -> None:
    conn = agent_conn()
    conn.receive(CHALLENGE, 0.0)
    conn.auth()
    with pytest.raises(HubError, match="challenge_expired: too slow"):
        conn.receive(encode_error("challenge_expired", "too slow"), 0.0)
    assert conn.state is ClientState.ERROR


def test_bad_frames_in_the_handshake_are_remote_protocol_errors() -> None:
    conn = agent_conn()
    with pytest.raises(RemoteProtocolError, match="expected a challenge"):
        conn.receive(welcome(), 0.0)
    assert conn.state is ClientState.ERROR
    with pytest.raises(LocalProtocolError):
        conn.receive(CHALLENGE, 0.0)  # nothing more after an error

    conn = agent_conn()
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive("{not json", 0.0)
    assert info.value.code == "invalid_json" and conn.state is ClientState.ERROR

    conn = agent_conn()
    conn.receive(CHALLENGE, 0.0)
    with pytest.raises(RemoteProtocolError, match="before our auth"):
        conn.receive(CHALLENGE, 0.0)

    conn = agent_conn()
    conn.receive(CHALLENGE, 0.0)
    conn.auth()
    with pytest.raises(RemoteProtocolError, match="expected a welcome"):
        conn.receive(CHALLENGE, 0.0)


def test_sending_before_open_is_a_local_protocol_error() -> None:
    conn = agent_conn()
    for send in (conn.auth, lambda: conn.heartbeat(0.0), lambda: conn.subscribe("a.b")):
        with pytest.raises(LocalProtocolError):
            send()
    assert conn.state is ClientState.AWAITING_CHALLENGE


def test_open_connection_ignores_nothing_silently_but_survives_bad_frames() -> None:
    conn = open_conn()
    with pytest.raises(RemoteProtocolError):
        conn.receive("[]", 1.0)
    assert conn.state is ClientState.OPEN
    assert conn.receive(CHALLENGE, 1.0) == [
        UnexpectedFrame(Challenge(nonce="n0nce", expires_in=30, hub_id="hub"))
    ]


def test_ids_come_from_the_shared_allocator() -> None:
    ids = IdAllocator("x")
    first = ClientConnection(AdminCredentials(token="t"), ids=ids)
    assert ids.next() == "x-1"
    assert first.ids.next() == "x-2"


def test_subscribe_unsubscribe_and_presence_are_correlated_by_id() -> None:
    conn = open_conn()
    sub = conn.subscribe("a.*")
    assert sub.id == "p-1" and frame(sub.text) == {
        "type": "subscribe",
        "id": "p-1",
        "subject": "a.*",
    }
    unsub = conn.unsubscribe("a.*")
    query = conn.presence_query()
    answers = [
        '{"type": "presence_state", "id": "p-3", "agents": []}',
        '{"type": "unsubscribed", "id": "p-2", "subject": "a.*"}',
        '{"type": "subscribed", "id": "p-1", "subject": "a.*"}',
        '{"type": "subscribed", "id": "p-1", "subject": "a.*"}',  # answered already
        '{"type": "subscribed", "id": "zzz", "subject": "a.*"}',  # never asked
    ]
    events = [e for text in answers for e in conn.receive(text, 1.0)]
    assert events == [
        PresenceAnswered(query.id, ()),
        UnsubscribeConfirmed(unsub.id, "a.*"),
        SubscribeConfirmed(sub.id, "a.*"),
    ]


def test_a_refused_request_and_a_stray_error() -> None:
    conn = open_conn()
    sub = conn.subscribe("$admin.x")
    refused = conn.receive(encode_error("forbidden", "no", sub.id), 1.0)
    [event] = refused
    assert isinstance(event, RequestRefused) and event.id == sub.id
    assert (event.error.code, event.error.message) == ("forbidden", "no")
    [stray] = conn.receive(encode_error("rate_limited", "slow down", sub.id), 1.0)
    assert isinstance(stray, HubErrorReceived) and stray.error.code == "rate_limited"


def test_forgotten_requests_get_no_answer_event() -> None:
    conn = open_conn()
    query = conn.presence_query()
    conn.forget(query.id)
    assert conn.receive('{"type": "presence_state", "id": "p-1", "agents": []}', 1.0) == []
    assert conn.closed() == []


def test_publish_confirmations_and_refusals() -> None:
    conn = open_conn()
    first = conn.publish("a.b", {"x": 1})
    assert frame(first.text) == {"type": "publish", "subject": "a.b", "data": {"x": 1}, "id": "p-1"}
    again = conn.publish("a.b", 2, frame_id="old-7")
    assert again.id == "old-7"
    events = conn.receive('{"type": "published", "id": "p-1", "message_id": "m1"}', 1.0)
    assert events == [PublishConfirmed("p-1", "m1", False)]
    assert conn.receive('{"type": "published", "id": "p-1", "message_id": "m1"}', 1.0) == []
    [refused] = conn.receive(encode_error("forbidden", "no", "old-7"), 1.0)
    assert isinstance(refused, PublishRefused) and refused.id == "old-7"
    assert refused.error.code == "forbidden"


def test_publish_keeps_given_text() -> None:
    conn = open_conn()
    assert conn.publish("a.b", frame_id="i", encoded="TEXT").text == "TEXT"


def test_request_reply_by_token_first_reply_only() -> None:
    conn = open_conn()
    request = conn.publish("svc.echo", 1, reply_token="tok", encoded="ignored")
    assert frame(request.text)["reply_to"] == "$reply.s-1.tok"
    reply = (
        '{"type": "message", "subject": "$reply.s-1.tok", "data": 2, "sender": "b",'
        ' "message_id": "m", "time": 1.0}'
    )
    [event] = conn.receive(reply, 2.0)
    assert isinstance(event, ReplyReceived) and event.token == "tok" and event.message.data == 2
    assert conn.receive(reply, 2.0) == []  # a second reply is dropped
    other = reply.replace("$reply.s-1.tok", "a.b")
    [message] = conn.receive(other, 2.0)
    assert isinstance(message, MessageReceived) and message.message.subject == "a.b"


def test_heartbeats_rtt_smoothing_and_the_ack_deadline() -> None:
    conn = open_conn(now=100.0)
    assert conn.ack_deadline == 115.0
    assert frame(conn.heartbeat(100.0)) == {"type": "heartbeat", "seq": 1}
    [ack] = conn.receive('{"type": "heartbeat_ack", "seq": 1, "hub_time": 0}', 100.8)
    assert isinstance(ack, HeartbeatAcked)
    assert ack.rtt == pytest.approx(0.8) and ack.rtt_smoothed == pytest.approx(0.8)
    assert ack.deadline == pytest.approx(115.8) and conn.last_ack == 100.8
    assert frame(conn.heartbeat(105.0)) == {"type": "heartbeat", "seq": 2, "rtt": ack.rtt_smoothed}
    [ack] = conn.receive('{"type": "heartbeat_ack", "seq": 2, "hub_time": 0}', 105.0 + 1.6)
    assert isinstance(ack, HeartbeatAcked)
    assert ack.rtt == pytest.approx(1.6)
    assert ack.rtt_smoothed == pytest.approx(0.875 * 0.8 + 0.125 * 1.6)
    [unknown] = conn.receive('{"type": "heartbeat_ack", "seq": 99, "hub_time": 0}', 110.0)
    assert isinstance(unknown, HeartbeatAcked) and unknown.rtt is None
    assert unknown.deadline == 125.0  # any ACK proves the hub answers


def test_only_sixteen_heartbeats_are_tracked() -> None:
    conn = open_conn()
    for i in range(17):
        conn.heartbeat(float(i))
    [ack] = conn.receive('{"type": "heartbeat_ack", "seq": 1, "hub_time": 0}', 20.0)
    assert isinstance(ack, HeartbeatAcked) and ack.rtt is None
    [ack] = conn.receive('{"type": "heartbeat_ack", "seq": 2, "hub_time": 0}', 20.0)
    assert isinstance(ack, HeartbeatAcked) and ack.rtt == 19.0


def test_rtt_seed_carries_over() -> None:
    conn = ClientConnection(AdminCredentials(token="t"), rtt_smoothed=0.5)
    assert conn.rtt_smoothed == 0.5


def test_closing_abandons_what_is_outstanding() -> None:
    conn = open_conn()
    sub = conn.subscribe("a")
    conn.publish("x", reply_token="t2")
    conn.publish("x", reply_token="t1")
    assert conn.closed() == [RequestAbandoned(sub.id), ReplyAbandoned("t1"), ReplyAbandoned("t2")]
    assert conn.state is ClientState.CLOSED
    assert conn.closed() == []
    with pytest.raises(LocalProtocolError):
        conn.publish("x")


def test_leave_closes() -> None:
    conn = open_conn()
    query = conn.presence_query()
    assert frame(conn.leave("bye")) == {"type": "leave", "reason": "bye"}
    assert state(conn) is ClientState.LEAVING
    with pytest.raises(LocalProtocolError):
        conn.heartbeat(1.0)
    [answer] = conn.receive('{"type": "presence_state", "id": "p-1", "agents": []}', 1.0)
    assert answer == PresenceAnswered(query.id, ())  # the hub may still answer
    assert conn.closed() == []
    assert state(conn) is ClientState.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.leave()


def test_the_module_does_no_io() -> None:
    import artcafe_trio.protocol.client as module

    source = pathlib.Path(module.__file__).read_text(encoding="utf-8")
    for banned in ("import trio", "import socket", "time.time", "monotonic"):
        assert banned not in source


def test_a_presence_answer_carries_the_hub_s_degraded_reasons() -> None:
    """``presence_state.degraded`` (a fenced cluster hub) reaches the caller, e.g. the
    CLI's ``status``; absent, the answer says nothing is degraded."""
    conn = open_conn()
    for degraded, expected in ((["fenced"], ("fenced",)), (None, ())):
        query = conn.presence_query()
        answer: dict[str, Any] = {"type": "presence_state", "id": query.id, "agents": []}
        if degraded is not None:
            answer["degraded"] = degraded
        assert conn.receive(json.dumps(answer), 1.0) == [PresenceAnswered(query.id, (), expected)]
