"""Fuzzing the hub: in process against the sans-IO ServerConnection, and end to end.

**In process** (the bulk, a few seconds): hypothesis feeds generated and mutated
frames straight into one :class:`ServerConnection` (no hub, no socket, no thread, no
event loop), acting on each event as the pump and the hub would (the hub-wide part:
subscription set, de-duplication, reply grants, the fan-out back to the fuzzer's own
``>`` subscription, simulated in a few lines). The oracle is the one the live fuzzer
always used (``FuzzClient.expect``): every frame is answered by exactly one non-fatal
``error`` with the documented code and the frame's ``id`` when it had a string ``id``
of at most 128 characters, by the legitimate answer, or by nothing when nothing is due;
``leave`` closes with 1000. Also checked: no exception other than an assertion escapes,
every error code is one of the tables of ``docs/protocol.md`` §12, the state moves only
along the edges of the connection's state diagram and the subscription count stays
within ``max_subscriptions``; first frames get the documented fatal error and close
code (4006, 4001); a signed ``auth`` with fuzzed fields gets a welcome with clamped
heartbeat values (or its refusal) and what presence copies from it still encodes.

**End to end** (one smoke test, ``test_fuzz_over_tcp``): a real hub over TCP with three
well-behaved agents (a *talker* publishing a tick every 10 ms, a *listener*, a
*monitor* of ``$presence.>``) and a raw client sending text frames, byte mutations,
invalid UTF-8, sizes up to the hard limit (close 1009) and raw WebSocket frames. The
hub must not crash, every frame it sends decodes strictly, fuzzed publishes come back
once per connection with their data intact, and the agents see no disturbance.

``ARTCAFE_FUZZ_LONG=1`` runs the same tests with ten times the examples in process
and 3000 over TCP (and a 15-minute timeout). The total number of inputs tried is printed at
the end (run with ``-s``).

Driving hypothesis end to end: the hypothesis test function runs in a worker thread
(``trio.to_thread.run_sync``) and sends each example into the running trio loop with
``trio.from_thread.run``, so all examples hit the same live hub and agents. If the hub
crashes, the example raises ``HubCrashed`` (a ``BaseException``, not shrunk).

Invalid UTF-8 in a text frame: the hub (wsproto driven directly) closes with 1007 and
other framing errors with 1002, without waiting for an answer; a client that reads the
close frame only after the socket is gone sees 1006 (``INVALID_UTF8_CLOSE``);
``tests/test_wsserver.py`` checks the exact codes byte by byte. Authentication
slow-down is disabled (``auth_failures_free``): ``tests/test_hub.py`` covers it.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection

from artcafe_trio import (
    Agent,
    Hub,
    HubConfig,
    ProtocolError,
    RemoteProtocolError,
    open_agent,
    serve_hub,
)
from artcafe_trio.protocol import (
    CLIENT_FRAME_TYPES,
    AdminAuth,
    AgentCredentials,
    Auth,
    Challenge,
    ClientConnection,
    Error,
    Frame,
    Heartbeat,
    HeartbeatAck,
    Message,
    PresenceEvent,
    PresenceQuery,
    PresenceRecord,
    PresenceState,
    PrivateKey,
    Publish,
    Published,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    decode,
    encode,
    is_reserved,
    subject_matches,
)
from artcafe_trio.protocol._codes import CloseCode
from artcafe_trio.protocol._frames import MAX_NESTING, _deeper_than
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
from artcafe_trio.testing import TestHub

pytestmark = pytest.mark.timeout(900 if os.environ.get("ARTCAFE_FUZZ_LONG") else 120)

TENANT = "fz"
FUZZER = "fuzzer"
SIGNER = "signer"
MAX_FRAME = 8192
HARD_LIMIT = MAX_FRAME * 4 + 65536  # counted by trio-websocket in characters for text
MAX_ID = 128
CALM_INTERVAL = 0.5
CALM_MULTIPLIER = 3.0
TICK = 0.01
BARRIER = 7_000_000_000_000
INVALID_UTF8_CLOSE = frozenset({1006, 1007})
ANSWER_TIMEOUT = 10.0

INPUTS_TRIED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_inputs() -> Iterator[None]:
    yield
    total = sum(INPUTS_TRIED.values())
    detail = ", ".join(f"{name} {count}" for name, count in sorted(INPUTS_TRIED.items()))
    print(f"\nfuzz inputs tried: {total} ({detail})")


# --- writing JSON that json.dumps would not write -------------------------------------


# Neither is a str or tuple subclass: hypothesis 6.170 reports FlakyStrategyDefinition
# while shrinking when a mapped str subclass shares a one_of with st.text().


@attrs.frozen(eq=False)
class Raw:
    """JSON text inserted verbatim (``1e999``, a 5000-digit integer, ``"\\ud800"``)."""

    text: str


@attrs.frozen(eq=False)
class Pairs:
    """A JSON object written member by member, so member names may repeat."""

    members: tuple[tuple[str, Any], ...] = attrs.field(converter=tuple)

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self.members)


def dumps(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs | dict):
        items = value if isinstance(value, Pairs) else value.items()
        members = (f"{json.dumps(k, ensure_ascii=False)}:{dumps(v)}" for k, v in items)
        return "{" + ",".join(members) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def strict_loads(text: str) -> Any:
    """``json.loads`` as the hub parses: NaN/Infinity refused; raises ValueError."""

    def refuse(name: str) -> None:
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise ValueError("too deep") from None
    if _deeper_than(value, MAX_NESTING):  # the hub's own limit (docs/protocol.md §11)
        raise ValueError("too deep")
    return value


def usable_id(text: str) -> str | None:
    """The ``id`` the hub must echo when refusing ``text`` (docs/protocol.md §2)."""
    try:
        obj = strict_loads(text)
    except ValueError:
        return None
    raw = obj.get("id") if isinstance(obj, dict) else None
    return raw if isinstance(raw, str) and len(raw) <= MAX_ID else None


# --- strategies ------------------------------------------------------------------------

LITERALS = [
    "1e999", "-1e999", "1E400", "-0", "0.0e-999", "<4301 digits>", "<4300 digits>",
    '"\\ud800"', '"a\\udfffb"', '"\\u0000"', "1.0", "-1", "[]", "{}",
]  # fmt: skip
"""JSON that ``json.dumps`` would not write (or Python parses surprisingly)."""


def literal(name: str) -> Raw:
    """A literal by name (long ones are built here, keeping strategy reprs short)."""
    if name.endswith(" digits>"):
        return Raw("9" * int(name[1:].split()[0]))
    return Raw(name)


_TOKEN_CHARS = "abcxyz019_-$!~"
texts = st.text(st.characters(codec="utf-8"), max_size=24)
tokens = st.text(_TOKEN_CHARS, min_size=1, max_size=6)
concrete = st.lists(tokens, min_size=1, max_size=4).map(".".join)
valid_subjects = concrete.map(lambda s: "fz." + s) | concrete | st.just("steady.tick")
valid_patterns = valid_subjects | st.builds(
    lambda parts, tail: ".".join([*parts, *tail]),
    st.lists(tokens | st.just("*"), min_size=1, max_size=4),
    st.sampled_from([[], [">"]]),
)
odd_subjects = st.sampled_from(
    ["", " ", ".", "a..b", ".a", "a.", "a b", "ä", "a.*.b", "a.>.b", "*", ">", "*.>", "ta*sks",
     ">>", "$presence.listener", "$presence.>", "$presence.*", "$reply.s-0.x", "$reply.>",
     "$sys.x", "$reply.@SELF@.t1", "$reply.@SELF@", "$reply.@SELF@.a.b", "a.$b", "x" * 256,
     "x" * 257, ".".join(["t"] * 16), ".".join(["t"] * 17), "\x00", "tab\tbed", "fz.\u00e9"]
)  # fmt: skip
subjects = valid_subjects | valid_patterns | odd_subjects | texts
reply_subjects = st.sampled_from(
    ["$reply.@SELF@.r", "$reply.@SELF@.r.2", "$reply.s-0.x", "$reply.@SELF@x.r", "$presence.x",
     "$sys.x", "inbox.x"]
)  # fmt: skip
ids = (
    st.text(_TOKEN_CHARS, min_size=1, max_size=10)
    | st.integers(125, 130).map(lambda n: "i" * n)
    | st.just("")
    | texts
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
    | st.sampled_from(LITERALS).map(literal)
)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
json_objects = st.dictionaries(texts, json_values, max_size=4)
any_ids = ids | json_values
seqs = st.integers(0, 2**63) | st.integers() | st.sampled_from(LITERALS).map(literal)


def frame(type_: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Pairs]:
    return st.fixed_dictionaries(fields).map(lambda d: Pairs((("type", type_), *d.items())))


def optional_frame(
    type_: str, required: dict[str, Any], optional: dict[str, Any]
) -> st.SearchStrategy[Pairs]:
    return st.fixed_dictionaries(required, optional=optional).map(
        lambda d: Pairs((("type", type_), *d.items()))
    )


client_frames = st.one_of(
    frame("subscribe", id=ids, subject=subjects),
    frame("subscribe", id=ids, subject=valid_patterns),
    frame("unsubscribe", id=ids, subject=subjects),
    optional_frame("publish", {"subject": subjects},
                   {"data": json_values, "id": ids, "reply_to": subjects}),
    optional_frame("publish", {"subject": valid_subjects}, {"data": json_values, "id": ids}),
    optional_frame("publish", {"subject": valid_subjects},
                   {"data": json_values, "id": ids, "reply_to": st.just("$reply.@SELF@.r")}),
    optional_frame("publish", {"subject": valid_subjects | reply_subjects},
                   {"data": json_values, "id": ids, "reply_to": reply_subjects}),
    frame("heartbeat", seq=seqs),
    frame("presence_query", id=ids),
    optional_frame("error", {"code": texts}, {"message": texts, "id": ids, "fatal": st.booleans()}),
    optional_frame("leave", {}, {"reason": texts}),
)  # fmt: skip
other_frames = st.one_of(
    frame("auth", agent_id=ids, tenant_id=ids, algorithm=st.just("ed25519"), signature=texts),
    frame("admin_auth", token=texts),
    frame("challenge", nonce=texts, expires_in=st.floats(0, 99), hub_id=texts),
    frame("welcome", session_id=texts, agent_id=texts, tenant_id=texts, hub_id=texts,
          hub_time=st.floats(0, 2e9)),
    frame("subscribed", id=ids, subject=texts),
    frame("unsubscribed", id=ids, subject=texts),
    frame("published", id=ids, message_id=texts),
    frame("message", subject=texts, sender=texts, message_id=texts, time=st.floats(0, 2e9)),
    frame("heartbeat_ack", seq=st.integers(0, 99), hub_time=st.floats(0, 2e9)),
    frame("presence_state", id=ids),
)  # fmt: skip
unknown_types = st.builds(
    lambda t, extra: Pairs((("type", t), *extra.items())),
    st.sampled_from(["teleport", "HEARTBEAT", "", "publish ", "message2"]) | texts | json_values,
    st.dictionaries(st.sampled_from(["id", "seq", "subject", "x"]) | texts, any_ids, max_size=3),
)
field_names = st.sampled_from(["id", "type", "subject", "seq", "data", "reply_to", "x"]) | texts


@st.composite
def mutated(draw: st.DrawFn, frames: st.SearchStrategy[Pairs]) -> Pairs:
    """A frame with fields given wrong types, dropped, added, duplicated or re-typed."""
    members = list(draw(frames))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "drop", "add", "prepend", "dup", "id"]))
        at = draw(st.integers(0, max(0, len(members) - 1)))
        if op == "set" and members:
            members[at] = (members[at][0], draw(json_values))
        elif op == "drop" and members:
            del members[at]
        elif op == "add":
            members.append((draw(field_names), draw(json_values)))
        elif op == "prepend":
            members.insert(0, (draw(field_names), draw(json_values)))
        elif op == "dup" and members:
            members.insert(draw(st.integers(0, len(members))), (members[at][0], draw(json_values)))
        elif op == "id":
            members.append(("id", draw(any_ids)))
    return Pairs(members)


@st.composite
def deep(draw: st.DrawFn) -> str:
    """Deep nesting (below the parser's limit, or well above it: never at the edge)."""
    depth = draw(st.integers(1, 60) | st.integers(1200, 1600) | st.integers(2000, 4000))
    shape = draw(st.sampled_from(["array", "object", "publish", "field"]))
    if shape == "array":
        return "[" * depth + "]" * depth
    if shape == "object":
        return '{"a":' * depth + "1" + "}" * depth
    nested = "[" * depth + "]" * depth
    if shape == "publish":
        return f'{{"type":"publish","subject":"fz.deep","data":{nested}}}'
    return f'{{"type":"heartbeat","seq":1,"x":{nested},"id":"deep"}}'


@st.composite
def structured(draw: st.DrawFn) -> Pairs:
    """A client frame, a hub-only frame or an unknown type (a composite keeps the repr of
    every strategy built on it short: hypothesis computes those reprs)."""
    frames: Pairs = draw(st.one_of(client_frames, client_frames, other_frames, unknown_types))
    return frames


after_auth_inputs = st.one_of(
    json_values.map(dumps),
    structured().map(dumps),
    structured().map(dumps),
    mutated(structured()).map(dumps),
    mutated(structured()).map(dumps),
    deep(),
    st.text(st.characters(codec="utf-8"), max_size=80),
    st.binary(max_size=64),
)

VALID_FRAMES = [
    encode(Subscribe(id="s1", subject="fz.a.*")),
    encode(Unsubscribe(id="u1", subject="fz.a.*")),
    encode(Publish(subject="fz.a.b", data={"k": [1, 2.5, "x", None, True], "é": "✓😀"}, id="p1")),
    encode(Publish(subject="fz.x", data="héllo", reply_to="fz.reply")),
    encode(Heartbeat(seq=12345)),
    encode(PresenceQuery(id="q1")),
]


@attrs.frozen
class InvalidText:
    """A text frame whose payload is not UTF-8 (sent below trio-websocket)."""

    payload: bytes


@st.composite
def byte_mutations(draw: st.DrawFn, *, as_bytes: bool) -> str | InvalidText:
    """A valid encoded frame with flipped, inserted, deleted or duplicated bytes/chars."""
    text = draw(st.sampled_from(VALID_FRAMES))
    data: Any = bytearray(text.encode()) if as_bytes else list(text)
    for _ in range(draw(st.integers(1, 4))):
        n = len(data)
        at = draw(st.integers(0, max(0, n - 1)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "replace"]))
        if op == "flip" and n:
            if as_bytes:
                data[at] ^= 1 << draw(st.integers(0, 7))
            else:
                data[at] = chr(ord(data[at]) ^ (1 << draw(st.integers(0, 6))))
        elif op == "insert":
            piece = draw(st.binary(min_size=1, max_size=4)) if as_bytes else draw(texts)
            data[at:at] = piece
        elif op == "delete" and n:
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "duplicate" and n:
            end = at + draw(st.integers(1, 16))
            data[draw(st.integers(0, n)) : draw(st.integers(0, n))] = data[at:end]
        elif op == "replace" and n:
            data[at] = draw(st.integers(0, 255)) if as_bytes else draw(st.characters(codec="utf-8"))
    if not as_bytes:
        return "".join(data)
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return InvalidText(bytes(data))


invalid_utf8 = st.builds(
    lambda head, bad, tail: InvalidText(head.encode() + bad + tail.encode()),
    st.sampled_from(['{"type":"publish","subject":"fz.x","data":"', '{"type":"heartbeat","seq":', ""]),
    st.sampled_from([b"\xff", b"\xc3", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                     b"\xc0\xaf", b"\x80", b"\xf8\x88\x80\x80\x80"]),
    st.sampled_from(['"}', "1}", ""]),
)  # fmt: skip


# --- the hub, the well-behaved agents, raw clients -----------------------------------


class Target:
    """A running hub and how to reach it: in memory, or over TCP."""

    def __init__(
        self, hub: Hub, nursery: trio.Nursery, *, tcp: bool, hub_scope: trio.CancelScope
    ) -> None:
        self.hub = hub
        self.kit = TestHub(hub)
        self.nursery = nursery
        self.tcp = tcp
        self.keys: dict[str, PrivateKey] = {}
        self._hub_scope = hub_scope
        self.dialed: list[WebSocketConnection] = []

    def crashed(self) -> bool:
        """Whether the hub's task died (trio then cancels the nursery it runs in)."""
        return self._hub_scope.cancel_called

    def key(self, agent_id: str) -> PrivateKey:
        if agent_id not in self.keys:
            self.keys[agent_id] = self.kit.register(TENANT, agent_id)
        return self.keys[agent_id]

    async def dial(self, resource: str) -> WebSocketConnection:
        if self.tcp:
            assert self.hub.url is not None
            ws = await trio_websocket.connect_websocket_url(
                self.nursery, self.hub.url + resource, max_message_size=HARD_LIMIT
            )
        else:
            ws = await self.kit.dial(self.nursery, resource)
        self.dialed.append(ws)
        return ws

    async def close_dialed(self) -> None:
        """Close the connections still open, answering the hub's close: else, once their
        nursery is cancelled, the hub waits out its close_timeout for each."""
        for ws in self.dialed:
            if ws.closed is None:
                with trio.move_on_after(self.hub.config.close_timeout):
                    await ws.aclose()

    def open_agent(self, agent_id: str, **kwargs: Any) -> AbstractAsyncContextManager[Agent]:
        key = self.key(agent_id)
        if self.tcp:
            return open_agent(
                agent_id=agent_id, tenant_id=TENANT, private_key=key, url=self.hub.url, **kwargs
            )
        return self.kit.open_agent(agent_id, tenant_id=TENANT, private_key=key, **kwargs)


@asynccontextmanager
async def fuzz_target(*, tcp: bool = False, **overrides: Any) -> AsyncIterator[Target]:
    fields: dict[str, Any] = {
        "max_frame_bytes": MAX_FRAME, "close_timeout": 0.5, "auth_failures_free": 10**9,
        "disconnect_grace": 5.0,
    }  # fmt: skip
    config = HubConfig(**{**fields, **overrides})
    async with trio.open_nursery() as hub_nursery:  # no open_hub: to see the hub crash
        serve = functools.partial(serve_hub, port=0 if tcp else None, config=config)
        hub: Hub = await hub_nursery.start(serve)
        async with trio.open_nursery() as nursery:
            target = Target(hub, nursery, tcp=tcp, hub_scope=hub_nursery.cancel_scope)
            yield target
            await target.close_dialed()
            nursery.cancel_scope.cancel()
        hub_nursery.cancel_scope.cancel()


@attrs.define
class Calm:
    """What the well-behaved agents saw."""

    sent: int = 0
    received: list[int] = attrs.field(factory=list)
    foreign: int = 0
    presence: list[PresenceEvent] = attrs.field(factory=list)
    acks: Counter[str] = attrs.field(factory=Counter)
    max_since_ack: float = 0.0
    reconnects: dict[str, int] = attrs.field(factory=dict)
    duration: float = 0.0
    presence_at_end: list[PresenceEvent] = attrs.field(factory=list)

    def events_for(self, agent_id: str, *, at_end: bool = False) -> list[tuple[str, str]]:
        events = self.presence_at_end if at_end else self.presence
        return [(e.status, e.reason) for e in events if e.agent_id == agent_id]


@asynccontextmanager
async def calm_traffic(target: Target) -> AsyncIterator[Calm]:
    """Run the talker, listener and monitor around the block; check them afterwards."""
    calm = Calm()

    async def on_presence(subject: str, data: Any) -> None:
        calm.presence.append(PresenceEvent.from_data(data))

    async def on_tick(subject: str, data: Any, message: Message) -> None:
        if message.sender == "talker":
            calm.received.append(data)
        else:
            calm.foreign += 1

    async def talk(talker: Agent, stop: trio.Event, done: trio.Event) -> None:
        for seq in itertools.count():
            if stop.is_set():
                done.set()
                return
            await talker.publish("steady.tick", seq)
            calm.sent = seq + 1
            await trio.sleep(TICK)

    async def watch_acks(agents: dict[str, Agent]) -> None:
        last: dict[str, Any] = {}
        while True:
            for name, agent in agents.items():
                health = agent.health()
                if health.last_ack is not None and health.last_ack != last.get(name):
                    last[name] = health.last_ack
                    calm.acks[name] += 1
                if health.seconds_since_ack is not None:
                    calm.max_since_ack = max(calm.max_since_ack, health.seconds_since_ack)
            await trio.sleep(0.02)

    beat = {"heartbeat_interval": CALM_INTERVAL, "heartbeat_timeout_multiplier": CALM_MULTIPLIER}
    async with target.open_agent("monitor", heartbeat_interval=None) as monitor:
        await monitor.subscribe("$presence.>", on_presence)
        async with (
            target.open_agent("listener", **beat) as listener,
            target.open_agent("talker", **beat) as talker,
        ):
            await listener.subscribe("steady.>", on_tick)
            # Inside the agents: if the block fails, the talker stops before its agent does.
            async with trio.open_nursery() as nursery:
                stop, done = trio.Event(), trio.Event()
                nursery.start_soon(talk, talker, stop, done)
                nursery.start_soon(watch_acks, {"listener": listener, "talker": talker})
                start = trio.current_time()
                yield calm
                calm.duration = trio.current_time() - start
                stop.set()
                with trio.fail_after(10):
                    await done.wait()
                    while len(calm.received) < calm.sent:
                        await trio.sleep(0.01)
                calm.presence_at_end = list(calm.presence)  # before the calm agents leave
                agents = {"monitor": monitor, "listener": listener, "talker": talker}
                calm.reconnects = {n: a.health().total_reconnects for n, a in agents.items()}
                nursery.cancel_scope.cancel()


def assert_undisturbed(calm: Calm, label: str) -> None:
    timeout = CALM_INTERVAL * CALM_MULTIPLIER
    print(
        f"\n{label}: calm agents over {calm.duration:.1f} s: {calm.sent} ticks, "
        f"{len(calm.received)} received in order, {calm.foreign} fuzz messages on steady.>, "
        f"ACKs {dict(calm.acks)}, max seconds since ACK {calm.max_since_ack:.3f}, "
        f"reconnects {calm.reconnects}"
    )
    assert calm.reconnects == {"monitor": 0, "listener": 0, "talker": 0}
    assert calm.sent > 0
    assert calm.received == list(range(calm.sent))
    for name in ("listener", "talker"):
        assert calm.events_for(name, at_end=True) == [("online", "connected")], calm.presence
        assert calm.acks[name] >= calm.duration / CALM_INTERVAL / 2, calm.acks
    assert calm.max_since_ack < timeout


async def handshake(
    ws: WebSocketConnection, agent_id: str, key: PrivateKey, **fields: Any
) -> Welcome:
    """A well-behaved agent's handshake, through the library's sans-IO client side."""
    client = ClientConnection(
        AgentCredentials(agent_id, TENANT, key, heartbeat_interval=None, **fields)
    )
    client.receive(await ws.get_message(), trio.current_time())  # the challenge
    await ws.send_message(client.auth())
    client.receive(await ws.get_message(), trio.current_time())  # raises unless welcomed
    assert client.welcome is not None
    return client.welcome


async def assert_hub_alive(target: Target, label: str) -> None:
    """The hub still runs: its table answers and a brand-new agent authenticates."""
    table = {r.agent_id: r.status for r in target.hub.presence_table(TENANT)}
    assert table["listener"] == table["talker"] == "online", table
    fresh = f"fresh-{label}"
    ws = await target.dial(f"/api/v1/ws/agent/{fresh}?tenant_id={TENANT}")
    await handshake(ws, fresh, target.key(fresh))
    await ws.send_message(encode(Heartbeat(seq=1)))
    ack = await collect_one(ws)
    assert isinstance(ack, HeartbeatAck) and ack.seq == 1, ack
    await ws.aclose()


class HubCrashed(BaseException):
    """The hub died while handling this input (a BaseException: hypothesis stops at once,
    and the hub's own exception surfaces from its nursery)."""


async def drive(
    target: Target,
    label: str,
    strategy: st.SearchStrategy[Any],
    probe: Callable[[Any], Awaitable[None]],
    *,
    max_examples: int,
    examples: tuple[Any, ...] = (),
) -> int:
    """Run hypothesis in a worker thread, each example through ``probe`` in trio."""
    tried = 0

    def body(value: Any) -> None:
        nonlocal tried
        tried += 1
        try:
            trio.from_thread.run(probe, value)
        except Exception:
            if trio.from_thread.run_sync(target.crashed):
                raise HubCrashed(describe(value)) from None  # not shrunk: the hub is gone
            raise

    test = given(strategy)(body)
    for value in examples:
        test = example(value)(test)
    test = settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=not LONG,  # as in fuzz_in_process: reproducible unless long
        suppress_health_check=list(HealthCheck),
    )(test)
    try:
        await trio.to_thread.run_sync(test)
    finally:
        INPUTS_TRIED[label] += tried
        print(f"\n{label}: {tried} inputs tried")
    return tried


def mask(
    payload: bytes, *, opcode: int, fin: bool = True, rsv: int = 0, masked: bool = True
) -> bytes:
    """One client WebSocket frame, written by hand."""
    head = bytearray([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0x0F])
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head.append(bit | n)
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def send_raw(ws: WebSocketConnection, data: bytes) -> None:
    """Write bytes below trio-websocket (its own writes hold the same lock)."""
    async with ws._stream_lock:
        await ws._stream.send_all(data)


@attrs.define
class Reply:
    """What a connection received after a probe."""

    answers: list[Frame] = attrs.field(factory=list)
    deliveries: list[Message] = attrs.field(factory=list)
    bad: list[str] = attrs.field(factory=list)
    closed: int | None = None


async def collect(ws: WebSocketConnection, barrier: int | None, sender: str) -> Reply:
    """Read until the barrier's ACK (or, without one, until the connection closes)."""
    reply = Reply()
    try:
        with trio.fail_after(ANSWER_TIMEOUT):
            while True:
                try:
                    text = await ws.get_message()
                except ConnectionClosed as exc:
                    reply.closed = exc.reason.code
                    return reply
                try:
                    frame = decode(text, max_bytes=HARD_LIMIT * 4)
                except ProtocolError:
                    reply.bad.append(str(text)[:300])
                    continue
                if isinstance(frame, HeartbeatAck) and frame.seq == barrier:
                    return reply
                if isinstance(frame, Message):
                    if frame.sender == sender:
                        reply.deliveries.append(frame)
                    continue
                reply.answers.append(frame)
    except trio.TooSlowError:
        raise AssertionError(
            f"the hub neither answered nor closed within {ANSWER_TIMEOUT} s"
        ) from None


@attrs.frozen
class Expect:
    """The documented outcome of one input (all None: no answer due)."""

    error: str | None = None
    error_id: str | None = None
    answer: str | None = None
    close: frozenset[int] | None = None
    deliveries: int = 0
    patterns: tuple[str | None, ...] = ()
    data: Any = None
    may_rate_limit: bool = False
    alternatives: tuple[Expect, ...] = ()


def describe(payload: Any) -> str:
    text = repr(payload)
    return text if len(text) <= 400 else text[:400] + f"... ({len(text)} chars)"


# --- the authenticated fuzzing client --------------------------------------------------


class FuzzClient:
    """An authenticated raw connection that sends fuzz and checks every answer."""

    def __init__(self, target: Target, agent_id: str = FUZZER) -> None:
        self.target = target
        self.agent_id = agent_id
        self.ws: WebSocketConnection | None = None
        self.session_id = ""
        self.subs: set[str] = set()
        self.published: set[str] = set()  # the hub de-duplicates per agent, across sessions
        self.granted: set[str] = set()  # reply subjects this agent may answer once
        self.counter = itertools.count(1)
        self.outcomes: Counter[str] = Counter()

    async def connect(self) -> WebSocketConnection:
        ws = await self.target.dial(f"/api/v1/ws/agent/{self.agent_id}?tenant_id={TENANT}")
        welcome = await handshake(ws, self.agent_id, self.target.key(self.agent_id))
        self.session_id = welcome.session_id
        await ws.send_message(encode(Subscribe(id="all", subject=">")))
        reply = await collect_one(ws)
        assert reply.type == "subscribed", reply
        self.subs = {">"}
        self.ws = ws
        return ws

    def expect(self, payload: str | bytes | InvalidText) -> Expect:
        if isinstance(payload, InvalidText):
            return Expect(close=INVALID_UTF8_CLOSE)
        if isinstance(payload, bytes):
            return Expect(error="binary_frame")
        if len(payload) > HARD_LIMIT:
            return Expect(close=frozenset({1009}))
        if len(payload.encode()) > MAX_FRAME:
            return Expect(error="frame_too_large")
        fid = usable_id(payload)
        try:
            frame = decode(payload, max_bytes=MAX_FRAME)
        except ProtocolError as exc:
            return Expect(error=exc.code, error_id=fid)
        return self.expect_frame(frame, fid, strict_loads(payload))

    def expect_frame(self, frame: Frame, fid: str | None, obj: dict[str, Any]) -> Expect:
        kind = frame.type
        if kind not in CLIENT_FRAME_TYPES:
            return Expect(error="unexpected_type", error_id=fid)
        if kind in ("auth", "admin_auth"):
            return Expect(error="already_authenticated", error_id=fid)
        if kind == "heartbeat":
            return Expect(answer="heartbeat_ack")
        if kind == "presence_query":
            return Expect(answer="presence_state")
        if kind == "unsubscribe":
            return Expect(answer="unsubscribed")
        if kind == "leave":
            return Expect(close=frozenset({1000}))
        if kind == "error":
            return Expect()
        if isinstance(frame, Subscribe):
            pattern = frame.subject
            if is_reserved(pattern) and not pattern.startswith("$presence."):
                return Expect(error="forbidden_subject", error_id=fid)
            if pattern not in self.subs and len(self.subs) >= 1000:
                return Expect(error="too_many_subscriptions", error_id=fid)
            return Expect(answer="subscribed")
        assert isinstance(frame, Publish), frame
        subject, reply_to = frame.subject, frame.reply_to
        if is_reserved(subject) and not subject.startswith("$reply."):
            return Expect(error="forbidden_subject", error_id=fid)
        own_inbox = f"$reply.{self.session_id}."
        if reply_to is not None and is_reserved(reply_to) and not reply_to.startswith(own_inbox):
            return Expect(error="forbidden_subject", error_id=fid)
        if frame.id is not None and frame.id in self.published:
            return Expect(answer="published")
        # One delivery per connection, however many of its patterns match; it names none.
        matched = any(subject_matches(p, subject) for p in self.subs)
        if subject.startswith("$reply."):
            # A reply is accepted once, and only from an agent the request reached.
            if subject not in self.granted:
                return Expect(error="reply_not_expected", error_id=fid)
            self.granted.discard(subject)  # answered (a refused answer would keep it)
            matched = subject.split(".", 2)[1] == self.session_id
        elif reply_to is not None and reply_to.startswith(own_inbox):
            self.granted.discard(reply_to)
            if matched:  # the request reaches this agent itself: it may answer
                self.granted.add(reply_to)
        delivered = Expect(
            answer="published" if frame.id is not None else None,
            deliveries=int(matched), patterns=(None,) if matched else (),
            data=obj.get("data"), may_rate_limit=True,
        )  # fmt: skip
        try:
            json.dumps(frame.data, allow_nan=False)
        except (ValueError, RecursionError):
            # Not representable as strict JSON: refusing it is right; relaying it is
            # right only if every delivery still decodes (checked for every frame).
            return Expect(error="invalid_field", error_id=fid, alternatives=(delivered,))
        return delivered

    async def probe(self, payload: str | bytes | InvalidText) -> None:
        ws = self.ws or await self.connect()
        if isinstance(payload, str):  # a reply inbox of this very session
            payload = payload.replace("@SELF@", self.session_id)
        expect = self.expect(payload)
        barrier = BARRIER + next(self.counter)
        try:
            if isinstance(payload, InvalidText):
                await send_raw(ws, mask(payload.payload, opcode=1))
            else:
                await ws.send_message(payload)
            if expect.close is None:
                await ws.send_message(encode(Heartbeat(seq=barrier)))
        except ConnectionClosed:
            pass
        reply = await collect(ws, None if expect.close else barrier, self.agent_id)
        self.learn(reply)  # first: the hub's state moved on even if the check fails
        self.check(expect, reply, payload)
        if reply.closed is not None:
            self.ws = None
            await ws.aclose()

    def check(self, expect: Expect, reply: Reply, payload: Any) -> None:
        what = describe(payload)
        assert not reply.bad, f"the hub sent frames that do not decode: {reply.bad} after {what}"
        if expect.close is not None:
            assert reply.closed in expect.close, (
                f"closed with {reply.closed}, not {set(expect.close)}: {what}"
            )
            self.outcomes[f"close {reply.closed}"] += 1
            return
        assert reply.closed is None, f"the hub closed the connection ({reply.closed}) after {what}"
        failures = []
        for candidate in (expect, *expect.alternatives):
            try:
                self.check_answers(candidate, reply, what)
                return
            except AssertionError as exc:
                failures.append(str(exc))
        raise AssertionError(" / or: ".join(failures))

    def check_answers(self, expect: Expect, reply: Reply, what: str) -> None:
        answers = reply.answers
        types = [a.type for a in answers]
        if (
            expect.may_rate_limit
            and answers
            and getattr(answers[0], "code", None) == "rate_limited"
        ):
            self.outcomes["error rate_limited"] += 1
            assert len(answers) == 1 and not reply.deliveries, what
            return
        if expect.error is not None:
            assert len(answers) == 1 and isinstance(answers[0], Error), (
                f"expected error {expect.error!r}, got {types}: {what}"
            )
            error = answers[0]
            assert error.code == expect.error, (
                f"expected error {expect.error!r}, got {error.code!r}: {what}"
            )
            assert error.id == expect.error_id, (
                f"error {error.code!r} carries id {error.id!r}, not {expect.error_id!r}: {what}"
            )
            assert not error.fatal, what
            assert not reply.deliveries, what
            self.outcomes[f"error {error.code}"] += 1
            return
        expected_types = [expect.answer] if expect.answer else []
        assert types == expected_types, f"expected {expected_types}, got {answers}: {what}"
        assert len(reply.deliveries) == expect.deliveries, (
            f"{len(reply.deliveries)} deliveries, not {expect.deliveries}: {what}"
        )
        for message in reply.deliveries:
            assert message.data == expect.data, f"delivered {message.data!r}: {what}"
        got = tuple(sorted((m.subscription for m in reply.deliveries), key=str))
        assert got == expect.patterns, f"delivered for {got}, not {expect.patterns}: {what}"
        self.outcomes[expect.answer or "no answer"] += 1

    def learn(self, reply: Reply) -> None:
        for answer in reply.answers:
            if answer.type == "subscribed":
                self.subs.add(answer.subject)  # type: ignore[attr-defined]
            elif answer.type == "unsubscribed":
                self.subs.discard(answer.subject)  # type: ignore[attr-defined]
            elif answer.type == "published":
                self.published.add(answer.id)  # type: ignore[attr-defined]


class AdminFuzzClient(FuzzClient):
    """The same on the admin channel (``/api/v1/ws/admin``, protocol.md §14)."""

    def __init__(self, target: Target) -> None:
        super().__init__(target, agent_id="$admin")

    async def connect(self) -> WebSocketConnection:
        ws = await self.target.dial("/api/v1/ws/admin")
        assert isinstance(decode(await ws.get_message()), Challenge)
        await ws.send_message(encode(AdminAuth(token=self.target.hub.admin_token)))
        welcome = await collect_one(ws)
        assert isinstance(welcome, Welcome), welcome
        self.session_id = welcome.session_id
        await ws.send_message(encode(Subscribe(id="all", subject="$presence.>")))
        assert (await collect_one(ws)).type == "subscribed"
        self.subs = {"$presence.>"}
        self.ws = ws
        return ws

    def expect_frame(self, frame: Frame, fid: str | None, obj: dict[str, Any]) -> Expect:
        if isinstance(frame, Publish):
            return Expect(error="forbidden_subject", error_id=fid)
        if isinstance(frame, Subscribe) and frame.subject != "$presence.>":
            # protocol.md §14 says other patterns "are answered subscribed but deliver
            # nothing"; the hub refuses them (forbidden_subject). Both are accepted here.
            subscribed = Expect(answer="subscribed")
            return Expect(error="forbidden_subject", error_id=fid, alternatives=(subscribed,))
        return super().expect_frame(frame, fid, obj)


async def collect_one(ws: WebSocketConnection) -> Frame:
    """The next frame that is not a ``message``; a close is a failure."""
    with trio.fail_after(ANSWER_TIMEOUT):
        while True:
            try:
                text = await ws.get_message()
            except ConnectionClosed as exc:
                raise AssertionError(f"the hub closed the connection: {exc.reason}") from None
            frame = decode(text)
            if not isinstance(frame, Message):
                return frame


# --- the tests ---------------------------------------------------------------------------


@asynccontextmanager
async def fuzzing(
    label: str, *, tcp: bool = False, **overrides: Any
) -> AsyncIterator[tuple[Target, Calm]]:
    """A hub with calm traffic around the block; afterwards the hub must still serve
    (checked while the calm agents are still connected) and they must be undisturbed."""
    async with fuzz_target(tcp=tcp, **overrides) as target:
        async with calm_traffic(target) as calm:
            yield target, calm
            await assert_hub_alive(target, label)
        assert_undisturbed(calm, label)


# --- in process: one ServerConnection driven as the hub's pump drives it ---------------

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def documented_codes() -> frozenset[str]:
    """Every error code in the tables of docs/protocol.md §12 (the contract)."""
    text = PROTOCOL_MD.read_text()
    section = text[text.index("## 12.") : text.index("## 13.")]
    return frozenset(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))


DOCUMENTED = documented_codes()
HANDSHAKE_CLOSES = frozenset({CloseCode.PROTOCOL_VIOLATION, CloseCode.AUTHENTICATION_FAILED})
LIMITS = ServerLimits(hub_id="hub-fz", max_frame_bytes=MAX_FRAME, max_subscriptions=1000)
# The allowed transitions (docs/design.md); CLOSED is reached only by connection_closed().
EDGES = {
    (ConnectionState.AWAITING_AUTH, ConnectionState.AUTHENTICATING),
    (ConnectionState.AUTHENTICATING, ConnectionState.OPEN),
    (ConnectionState.AUTHENTICATING, ConnectionState.CLOSING),
    (ConnectionState.OPEN, ConnectionState.CLOSING),
}


class Bucket:
    """A token bucket on the ``now`` it is given (rate 1000/s, burst 5: some publishes
    of a fast fuzzer are refused ``rate_limited``)."""

    def __init__(self) -> None:
        self.tokens, self.stamp = 5.0, 0.0

    def take(self, now: float) -> bool:
        self.tokens = min(5.0, self.tokens + (now - self.stamp) * 1000.0)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def step(conn: ServerConnection, before: ConnectionState) -> None:
    """The state only moves along an edge of the diagram, and stays consistent."""
    after = conn.state
    assert after is before or (before, after) in EDGES, f"{before.name} -> {after.name}"
    assert len(conn.subscriptions) <= conn.limits.max_subscriptions
    if conn.closing:
        assert conn.close_code is not None and conn.close_code in set(CloseCode), conn.close_code


class InProcessClient(FuzzClient):
    """The live oracle (``FuzzClient.expect``), checked against a ServerConnection fed
    in process: the hub-wide part (subscription set, de-duplication, reply grants, the
    fan-out back to this client's ``>``) is simulated here in a few lines."""

    admin = False

    def __init__(self) -> None:
        FuzzClient.__init__(self, None, agent_id="$admin" if self.admin else FUZZER)  # type: ignore[arg-type]
        self.conn: ServerConnection | None = None
        self.sessions = itertools.count(1)
        self.now = 0.0
        self.seen: set[str] = set()  # publish ids the "hub" remembers (per agent)
        self.grants: set[str] = set()  # reply subjects the "hub" accepts once

    def open(self) -> ServerConnection:
        conn = ServerConnection(
            LIMITS, agent_id=None if self.admin else FUZZER,
            tenant_id=None if self.admin else TENANT, nonce="n",
        )  # fmt: skip
        conn.challenge(self.now)
        claim: Frame = (
            AdminAuth(token="t") if self.admin
            else Auth(agent_id=FUZZER, tenant_id=TENANT, algorithm="ed25519", signature="s")
        )  # fmt: skip
        assert isinstance(conn.receive_auth(encode(claim), self.now), AuthRequested)
        self.session_id = f"s-{next(self.sessions)}"
        welcome = decode(conn.accept(session_id=self.session_id, hub_time=0.0, bucket=Bucket()))
        assert isinstance(welcome, Welcome)
        pattern = "$presence.>" if self.admin else ">"
        self.feed(conn, encode(Subscribe(id="all", subject=pattern)))
        self.subs = {pattern}
        self.grants.clear()  # the hub forgets a gone session's open requests
        self.granted.clear()
        return conn

    def probe_sync(self, payload: str | bytes) -> None:
        conn = self.conn or self.open()
        self.conn = conn
        if isinstance(payload, str):
            payload = payload.replace("@SELF@", self.session_id)
        expect = self.expect(payload)
        if expect.close == frozenset({1009}):  # the WebSocket layer's; the connection refuses
            expect = Expect(error="frame_too_large")
        reply = self.feed(conn, payload)
        self.learn(reply)
        self.check(expect, reply, payload)
        for answer in reply.answers:
            if isinstance(answer, Error):
                assert answer.code in DOCUMENTED, f"undocumented code {answer.code!r}"
        if reply.closed is not None:
            conn.connection_closed()
            self.conn = None

    def feed(self, conn: ServerConnection, payload: str | bytes) -> Reply:
        """Feed one frame; act on its event as the pump and the hub would."""
        self.now += 0.0004
        before = conn.state
        event = conn.receive_text(payload, self.now)
        reply = Reply()
        if isinstance(event, FrameRefused):
            assert decode(event.text) == event.error and not event.error.fatal
            reply.answers.append(event.error)
        elif isinstance(event, SubscribeRequested):
            conn.subscriptions.add(event.frame.subject)
            reply.answers.append(Subscribed(id=event.frame.id, subject=event.frame.subject))
        elif isinstance(event, UnsubscribeRequested):
            conn.subscriptions.discard(event.frame.subject)
            reply.answers.append(Unsubscribed(id=event.frame.id, subject=event.frame.subject))
        elif isinstance(event, HeartbeatReceived):
            reply.answers.append(HeartbeatAck(seq=event.frame.seq, hub_time=self.now))
        elif isinstance(event, PresenceRequested):
            reply.answers.append(PresenceState(id=event.frame.id, agents=()))
        elif isinstance(event, LeaveRequested):
            assert conn.left and conn.close(CloseCode.NORMAL, "left")
            reply.closed = conn.close_code
        elif isinstance(event, PublishRequested):
            self.publish(conn, event, reply)
        else:
            assert isinstance(event, PeerError), event
        step(conn, before)
        return reply

    def publish(self, conn: ServerConnection, event: PublishRequested, reply: Reply) -> None:
        frame = event.frame
        if frame.id is not None and frame.id in self.seen:
            reply.answers.append(Published(id=frame.id, message_id="m", duplicate=True))
            return
        if event.is_reply and frame.subject not in self.grants:
            error = RemoteProtocolError("reply_not_expected", "-", frame_id=frame.id)
            reply.answers.append(conn.refusal(error).error)
            return
        try:
            data_json = conn.admit_publish(frame, self.now)
        except RemoteProtocolError as exc:
            reply.answers.append(conn.refusal(exc).error)
            return
        data = strict_loads(data_json)  # encoded once, as strict JSON
        if frame.id is not None:
            self.seen.add(frame.id)
            reply.answers.append(Published(id=frame.id, message_id="m"))
        if event.is_reply:
            self.grants.discard(frame.subject)
            mine = frame.subject.split(".", 2)[1] == conn.session_id
            matched = mine
        else:
            matched = any(subject_matches(p, frame.subject) for p in conn.subscriptions)
            reply_to = frame.reply_to
            if reply_to is not None and reply_to.startswith(conn.reply_prefix):
                self.grants.discard(reply_to)
                if matched:
                    self.grants.add(reply_to)
        if matched and not conn.is_admin:
            reply.deliveries.append(
                Message(subject=frame.subject, data=data, sender=FUZZER, message_id="m", time=0.0)
            )


class InProcessAdminClient(InProcessClient, AdminFuzzClient):
    admin = True


def fuzz_in_process(
    label: str, strategy: st.SearchStrategy[Any], probe: Callable[[Any], None], count: int
) -> None:
    """Run ``probe`` on ``count`` examples (no hub, no thread, no event loop)."""
    tried = 0

    # Derandomized by default: every run tries the same examples, so a failure (and the
    # coverage checks on the outcomes reached) reproduces exactly; the long runs explore.
    @settings(
        max_examples=count, deadline=None, database=None, derandomize=not LONG,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(strategy)
    def run(value: Any) -> None:
        nonlocal tried
        tried += 1
        probe(value)

    try:
        run()
    finally:
        INPUTS_TRIED[label] += tried


def expect_first_frame_in_process(
    path: str, payload: str | bytes
) -> tuple[str, set[str | None], frozenset[int]]:
    """The live oracle (``expect_first_frame``), minus what only the WebSocket layer does."""
    if isinstance(payload, str) and len(payload) > HARD_LIMIT:
        return "frame_too_large", {None}, frozenset({4006})
    error, close = expect_first_frame(path, payload)
    assert error is not None
    return error[0], error[1], close


def probe_first_frame_in_process(case: tuple[str, str | bytes]) -> None:
    """A first frame on a fresh connection; a claim that gets this far is refused by the
    (simulated) authenticator, as every claim from ``nobody`` is."""
    path, payload = case
    admin = path == "admin"
    conn = ServerConnection(
        LIMITS, agent_id=None if admin else "nobody", tenant_id=None if admin else TENANT,
        nonce="n",
    )  # fmt: skip
    conn.challenge(0.0)
    event = conn.receive_auth(payload, 1.0)
    step(conn, ConnectionState.AWAITING_AUTH)
    if isinstance(event, HandshakeRefused):
        refusal = event.refusal
    else:
        refusal = Refusal(
            code="authentication_failed", message="-", frame_id=event.frame_id,
            close=CloseCode.AUTHENTICATION_FAILED, who=event.who, cause="-",
        )  # fmt: skip
    error = decode(conn.refuse(refusal))
    step(conn, ConnectionState.AUTHENTICATING)
    code, ids, closes = expect_first_frame_in_process(path, payload)
    what = f"{path}: {describe(payload)}"
    assert isinstance(error, Error) and error.fatal, what
    assert (error.code, conn.close_code) in {(code, c) for c in closes}, f"{error}: {what}"
    assert error.id in ids, f"{error} should carry an id in {ids}: {what}"
    assert error.code in DOCUMENTED, error.code
    assert conn.close_code in HANDSHAKE_CLOSES
    assert conn.expire(1e9) is None  # refused: nothing left to expire


def probe_signed_auth(fields: dict[str, Any]) -> None:
    """An auth whose signature the (simulated) authenticator accepts and whose other
    fields are fuzzed: welcome with clamped heartbeat values, or the documented refusal;
    what the hub copies into presence still encodes as strict protocol."""
    conn = ServerConnection(LIMITS, agent_id=SIGNER, tenant_id=TENANT, nonce="n")
    conn.challenge(0.0)
    text = dumps(Pairs((("type", "auth"), ("agent_id", SIGNER), ("tenant_id", TENANT),
                        ("algorithm", "ed25519"), ("signature", "c2ln"), *fields.items())))  # fmt: skip
    what = describe(text)
    try:
        claim = decode(text, max_bytes=MAX_FRAME)
        refusal = None if claim.protocol == 1 else "unsupported_protocol"  # type: ignore[attr-defined]
    except ProtocolError as exc:
        refusal = exc.code
    event = conn.receive_auth(text, 1.0)
    if refusal is not None:
        assert isinstance(event, HandshakeRefused), what
        assert event.refusal.code == refusal and event.refusal.close == 4006, what
        return
    assert isinstance(event, AuthRequested) and isinstance(claim, Auth), what
    welcome = decode(conn.accept(session_id="s-1", hub_time=1.0))
    assert isinstance(welcome, Welcome) and conn.state is ConnectionState.OPEN, what
    if claim.heartbeat_interval is None:
        assert (welcome.heartbeat_interval, welcome.heartbeat_timeout) == (None, None), what
    else:
        interval = _clamp(claim.heartbeat_interval, 0.5, 300.0)
        multiplier = _clamp(claim.heartbeat_timeout_multiplier, 1.5, 10.0)
        assert welcome.heartbeat_interval == interval, what
        assert welcome.heartbeat_timeout == pytest.approx(interval * multiplier), what
    record = PresenceRecord(
        tenant_id=TENANT, agent_id=SIGNER, status="online", session_id="s-1",
        heartbeat_timeout=welcome.heartbeat_timeout, capabilities=claim.capabilities,
        metadata=claim.metadata,
    )  # fmt: skip
    decode(encode(PresenceState(id="q", agents=(record,))))  # what presence_query sends


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def fuzz_after_auth(count: int) -> None:
    client = InProcessClient()
    fuzz_in_process("after-auth", after_auth_inputs, client.probe_sync, count)
    print(f"outcomes: {dict(client.outcomes)}")
    assert {"error invalid_json", "subscribed", "heartbeat_ack", "close 1000"} <= set(
        client.outcomes
    )


def fuzz_admin(count: int) -> None:
    client = InProcessAdminClient()
    fuzz_in_process("admin", after_auth_inputs, client.probe_sync, count)
    print(f"outcomes: {dict(client.outcomes)}")
    assert "error forbidden_subject" in client.outcomes


def fuzz_mutations(count: int) -> None:
    client = InProcessClient()
    inputs = byte_mutations(as_bytes=False) | byte_mutations(as_bytes=True).filter(
        lambda x: isinstance(x, str)
    )
    fuzz_in_process("mutations", inputs, client.probe_sync, count)


def fuzz_sizes(count: int) -> None:
    client = InProcessClient()
    counter = itertools.count()

    def probe(text: str) -> None:
        client.probe_sync(text.replace("@@@@@@", f"{next(counter):06d}"))

    fuzz_in_process("sizes", sized(), probe, count)
    assert "error frame_too_large" in client.outcomes


def fuzz_first_frame(count: int) -> None:
    first = first_frames.filter(lambda x: not isinstance(x, InvalidText))
    cases = st.tuples(st.sampled_from(["agent", "agent", "admin"]), first)
    fuzz_in_process("first-frame", cases, probe_first_frame_in_process, count)


def fuzz_signed_auth(count: int) -> None:
    fuzz_in_process("signed-auth", signed_auth_fields, probe_signed_auth, count)


IN_PROCESS = {
    "after-auth": (fuzz_after_auth, 500),
    "admin": (fuzz_admin, 200),
    "mutations": (fuzz_mutations, 300),
    "sizes": (fuzz_sizes, 60),
    "first-frame": (fuzz_first_frame, 300),
    "signed-auth": (fuzz_signed_auth, 200),
}
#: ``ARTCAFE_FUZZ_LONG=1`` multiplies every example count by ten (3000 over TCP): the
#: same tests, longer; nothing is skipped by default.
LONG = bool(os.environ.get("ARTCAFE_FUZZ_LONG"))
SCALE = 10 if LONG else 1


@pytest.mark.parametrize("name", sorted(IN_PROCESS))
def test_fuzz_server_connection(name: str) -> None:
    """Generated frames into one sans-IO ServerConnection: never an unexpected exception,
    every answer the documented one, every refusal code in docs/protocol.md."""
    run, count = IN_PROCESS[name]
    run(count * SCALE)


@st.composite
def sized(draw: st.DrawFn) -> str:
    """A frame of an exact size near ``max_frame_bytes`` (UTF-8 bytes) or near the hard
    limit (characters, as trio-websocket counts them), in one field or as junk."""
    zone = draw(st.sampled_from(["max", "max", "between", "hard", "above"]))
    wide = draw(st.sampled_from(["a", "é", "✓", "😀"])) if zone in ("max", "between") else "a"
    target = {
        "max": st.integers(MAX_FRAME - 6, MAX_FRAME + 6),
        "between": st.integers(MAX_FRAME + 7, HARD_LIMIT - 5),
        "hard": st.integers(HARD_LIMIT - 4, HARD_LIMIT + 4),
        "above": st.integers(HARD_LIMIT + 5, HARD_LIMIT + 20_000),
    }[zone]
    size = draw(target)
    head, tail = draw(st.sampled_from([
        ('{"type":"publish","subject":"fz.big","id":"big-@@@@@@","data":"', '"}'),
        ('{"type":"heartbeat","seq":1,"junk":"', '"}'),
        ('{"type":"presence_query","id":"', '"}'),
        ('{"type":"subscribe","id":"sub-big","subject":"', '"}'),
        ("", ""),
    ]))  # fmt: skip
    room = (
        size - len((head + tail).encode())
        if zone in ("max", "between")
        else size - len(head + tail)
    )
    width = len(wide.encode()) if zone in ("max", "between") else 1
    body = wide * max(0, room // width) + "a" * max(0, room % width)
    return head + body + tail


first_frames = st.one_of(
    after_auth_inputs,
    frame("auth", agent_id=st.just("nobody"), tenant_id=st.just(TENANT),
          algorithm=st.sampled_from(["ed25519", "rsa-pkcs1-sha256", "x"]), signature=texts).map(dumps),
    mutated(frame("auth", agent_id=st.just("nobody"), tenant_id=st.just(TENANT),
                  algorithm=st.just("ed25519"), signature=texts)).map(dumps),
    frame("admin_auth", token=texts).map(dumps),
    invalid_utf8,
    sized(),
)  # fmt: skip


async def probe_first_frame(
    target: Target, case: tuple[str, str | bytes | InvalidText], outcomes: Counter[str]
) -> None:
    """Send ``payload`` as the first frame on a fresh connection; check the refusal."""
    path, payload = case
    agent_path = f"/api/v1/ws/agent/nobody?tenant_id={TENANT}"
    ws = await target.dial("/api/v1/ws/admin" if path == "admin" else agent_path)
    assert isinstance(decode(await ws.get_message()), Challenge)
    try:
        if isinstance(payload, InvalidText):
            await send_raw(ws, mask(payload.payload, opcode=1))
        else:
            await ws.send_message(payload)
    except ConnectionClosed:
        pass
    reply = await collect(ws, None, "")
    what = f"{path}: {describe(payload)}"
    assert not reply.bad, what
    error, close = expect_first_frame(path, payload)
    assert reply.closed in close, f"closed with {reply.closed}, not {set(close)}: {what}"
    if error is None:
        assert reply.answers == [], what
        outcomes[f"- {reply.closed}"] += 1
    else:
        assert len(reply.answers) == 1, f"{reply.answers}: {what}"
        refusal = reply.answers[0]
        assert isinstance(refusal, Error), what
        code, ids = error
        assert (refusal.code, refusal.fatal) == (code, True), f"{refusal}: {what}"
        assert refusal.id in ids, f"{refusal} should carry the id {ids}: {what}"
        outcomes[f"{refusal.code} {reply.closed}"] += 1
    await ws.aclose()


def expect_first_frame(
    path: str, payload: str | bytes | InvalidText
) -> tuple[tuple[str, set[str | None]] | None, frozenset[int]]:
    """(error code, acceptable ids) and close codes for a first frame (protocol.md §3)."""
    violation = frozenset({4006})
    if isinstance(payload, InvalidText):
        return None, INVALID_UTF8_CLOSE
    if isinstance(payload, bytes):
        return ("binary_frame", {None}), violation
    if len(payload) > HARD_LIMIT:
        return None, frozenset({1009})
    if len(payload.encode()) > MAX_FRAME:
        return ("frame_too_large", {None}), violation
    fid = usable_id(payload)
    try:
        frame_ = decode(payload, max_bytes=MAX_FRAME)
    except ProtocolError as exc:
        return (exc.code, {fid}), violation
    failed = frozenset({4001})
    if path == "admin":
        return ("authentication_failed", {None, fid}), failed
    if not isinstance(frame_, Auth):
        return ("not_authenticated", {fid}), violation
    if frame_.protocol != 1:
        return ("unsupported_protocol", {None, fid}), violation
    return ("authentication_failed", {None, fid}), failed


heartbeat_numbers = st.one_of(
    st.none(), st.floats(0, 1000), st.integers(-2, 10**6), st.sampled_from(LITERALS).map(literal),
    texts, st.booleans(),
)  # fmt: skip
signed_auth_fields = st.fixed_dictionaries(
    {},
    optional={
        "heartbeat_interval": heartbeat_numbers,
        "heartbeat_timeout_multiplier": heartbeat_numbers,
        "capabilities": st.lists(texts, max_size=3) | json_values,
        "metadata": json_objects | json_values,
        "protocol": st.sampled_from([1, 1, 1, 0, 2, -1, "1", 1.0, True, None]),
        "session_id": texts,
        "id": any_ids,
    },
)


@attrs.frozen
class RawFrame:
    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes

    def well_formed(self) -> bool:
        """A frame wsproto accepts on its own (data frames must also finish a message)."""
        if self.rsv or not self.masked or self.opcode not in (1, 2, 9, 10):
            return False
        if self.opcode >= 8:
            return self.fin and len(self.payload) <= 125
        return self.fin


raw_frames = st.builds(
    RawFrame,
    fin=st.booleans(),
    rsv=st.sampled_from([0, 0, 0, 1, 2, 4, 7]),
    opcode=st.sampled_from([0, 1, 1, 2, 3, 7, 8, 9, 10, 11, 15]),
    masked=st.sampled_from([True, True, True, False]),
    payload=st.binary(max_size=140)
    | st.sampled_from(VALID_FRAMES).map(str.encode)
    | invalid_utf8.map(lambda x: x.payload),
)


async def test_challenge_expires_when_nothing_is_sent() -> None:
    async with fuzz_target(challenge_timeout=0.2) as target:
        for _ in range(3):
            ws = await target.dial(f"/api/v1/ws/agent/nobody?tenant_id={TENANT}")
            assert isinstance(decode(await ws.get_message()), Challenge)
            reply = await collect(ws, None, "")
            assert [(a.type, getattr(a, "code", None)) for a in reply.answers] == [
                ("error", "challenge_expired")
            ]
            assert reply.closed == 4002
        INPUTS_TRIED["silence"] += 3


async def probe_raw(client: FuzzClient, raw: RawFrame, codes: Counter[str]) -> None:
    """A frame written below trio-websocket: reserved opcodes and bits, unmasked frames,
    unfinished messages, stray continuations, oversized control frames, raw close and
    ping frames, invalid UTF-8. The connection either keeps working or is closed."""
    ws = client.ws or await client.connect()
    payload = raw.payload
    text: str | None = None
    if raw.well_formed() and raw.opcode == 1:
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            text = None
    if text is not None:
        await client.probe(text)  # a proper text frame: the full oracle applies
        codes["text"] += 1
        return
    barrier = BARRIER + next(client.counter)
    try:
        await send_raw(
            ws, mask(payload, opcode=raw.opcode, fin=raw.fin, rsv=raw.rsv, masked=raw.masked)
        )
        await ws.send_message(encode(Heartbeat(seq=barrier)))
    except ConnectionClosed:
        pass
    reply = await collect(ws, barrier, FUZZER)
    what = describe(raw)
    assert not reply.bad, what
    must_close = not raw.well_formed() or raw.opcode == 1  # (1 here: invalid UTF-8)
    if must_close:
        assert reply.closed is not None, f"the hub accepted a broken frame: {what}"
    elif raw.opcode == 2:
        assert [(a.type, getattr(a, "code", None)) for a in reply.answers] == [
            ("error", "binary_frame")
        ], what
    else:  # ping / pong
        assert reply.closed is None and reply.answers == [], what
    codes[f"raw close {reply.closed}" if reply.closed else "raw open"] += 1
    if reply.closed is not None:
        client.ws = None
        await ws.aclose()


async def fuzz_over_tcp(max_examples: int) -> None:
    async with fuzzing("tcp", tcp=True) as (target, _):
        client = FuzzClient(target)
        codes: Counter[str] = Counter()

        async def probe(value: Any) -> None:
            if isinstance(value, RawFrame):
                await probe_raw(client, value, codes)
            else:
                await client.probe(value)

        inputs = (
            after_auth_inputs | byte_mutations(as_bytes=True) | invalid_utf8 | sized() | raw_frames
        )
        await drive(
            target, "tcp", inputs, probe, max_examples=max_examples,
            examples=(InvalidText(b'{"type":"heartbeat","seq":1,"x":"\xff"}'),
                      "x" * (HARD_LIMIT + 1), RawFrame(True, 0, 8, True, b"")),
        )  # fmt: skip
        print(f"outcomes: {dict(client.outcomes)} {dict(codes)}")


async def test_fuzz_over_tcp() -> None:
    """End to end: the real hub over real sockets, with the well-behaved agents running;
    text frames, byte mutations, invalid UTF-8, sizes up to the hard limit and raw
    WebSocket frames (what only the WebSocket layer and the hub-wide side can get wrong)."""
    await fuzz_over_tcp(3000 if LONG else 150)


# --- what the fuzzers found, as minimal reproductions --------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"heartbeat_ack","seq":1,"hub_time":1.0,"id":"ack-1"}',  # unexpected_type
        '{"type":"challenge","nonce":"n","expires_in":1,"hub_id":"h","id":"ch-1"}',
        '{"type":"auth","agent_id":"a","tenant_id":"t","algorithm":"ed25519","signature":"",'
        '"id":"auth-1"}',  # already_authenticated
        '{"type":"admin_auth","token":"x","id":"admin-1"}',
    ],
)
async def test_refusal_echoes_the_id_of_a_frame_type_without_an_id_field(text: str) -> None:
    """protocol.md §2: every refused frame's error carries the frame's string ``id``
    (<= 128 characters), "even if the frame was otherwise malformed"."""
    async with fuzz_target() as target:
        client = FuzzClient(target)
        await client.probe(text)


async def test_not_authenticated_echoes_the_id_of_a_frame_type_without_an_id_field() -> None:
    async with fuzz_target() as target:
        case = ("agent", '{"type":"heartbeat","seq":1,"id":"hb-1"}')
        await probe_first_frame(target, case, Counter())


async def test_a_publish_with_a_number_beyond_float_range_is_refused_or_relayed_as_json() -> None:
    """``1e999`` is valid JSON syntax; Python parses it as ``inf``. The hub must refuse the
    publish (``invalid_field``) or deliver strict JSON, never ``"data":Infinity``."""
    async with fuzz_target() as target:
        client = FuzzClient(target)
        await client.probe('{"type":"publish","subject":"fz.inf","data":1e999,"id":"inf-1"}')


async def test_auth_metadata_with_a_number_beyond_float_range_keeps_presence_working() -> None:
    """An agent whose signed ``auth`` has ``"metadata":{"x":1e999}`` (valid JSON syntax,
    parsed as ``inf``). The hub must refuse that auth (``invalid_field``) or keep presence
    valid: another agent's ``presence_query`` is answered, and the presence event decodes.
    (Found by ``test_fuzz_signed_auth_fields``: the hub crashed on the query; with the
    per-connection barrier it drops the *querying* connection instead.)"""
    async with fuzzing("metadata-1e999") as (target, calm):
        key = target.key(SIGNER)
        ws = await target.dial(f"/api/v1/ws/agent/{SIGNER}?tenant_id={TENANT}")
        challenge = decode(await ws.get_message())
        assert isinstance(challenge, Challenge)
        signature = key.sign_auth(tenant_id=TENANT, agent_id=SIGNER, nonce=challenge.nonce)
        await ws.send_message(
            f'{{"type":"auth","agent_id":"{SIGNER}","tenant_id":"{TENANT}",'
            f'"algorithm":"ed25519","signature":"{signature}","metadata":{{"x":1e999}}}}'
        )
        answer = await collect_one(ws)
        if isinstance(answer, Error):  # refusing such an auth is fine
            assert (answer.code, answer.fatal) == ("invalid_field", True)
            return
        assert isinstance(answer, Welcome), answer
        bystander = await FuzzClient(target).connect()
        await bystander.send_message(encode(PresenceQuery(id="q")))
        state = await collect_one(bystander)
        assert isinstance(state, PresenceState), state
        with trio.fail_after(5):  # the monitor decodes the signer's presence event
            while not calm.events_for(SIGNER):
                await trio.sleep(0.01)


async def test_peer_controlled_text_cannot_forge_log_lines() -> None:
    """Ids from an unauthenticated peer (the URL path and the ``auth`` frame) must not
    reach the hub's log raw: a newline in them would forge a log line."""
    from .conftest import LOG_CAPTURE

    async with fuzz_target() as target:
        seen = len(LOG_CAPTURE.lines)
        ws = await target.dial("/api/v1/ws/agent/x%0AERROR%20forged-by-path?tenant_id=t")
        assert isinstance(decode(await ws.get_message()), Challenge)
        auth = {"type": "auth", "agent_id": "a\nCRITICAL forged-by-frame", "tenant_id": "t",
                "algorithm": "ed25519", "signature": "x"}  # fmt: skip
        await ws.send_message(json.dumps(auth))
        reply = await collect(ws, None, "")
        assert reply.closed == 4001
        forged = [line for line in LOG_CAPTURE.lines[seen:] if "\n" in line]
        assert not forged, forged
