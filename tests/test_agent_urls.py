"""Several hub URLs: failover rounds, permanent failures, the welcome's connect_urls.

Two or three in-memory test hubs under autojump_clock; each URL is mapped to one
hub's transport (``open_agent(transport={url: transport})``).
"""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection

from artcafe_trio import (
    AuthenticationError,
    ConnectFailed,
    HubConfig,
    PrivateKey,
    ReconnectFailed,
    Registry,
    RemoteProtocolError,
    generate_private_key,
    open_agent,
)
from artcafe_trio.agent._config import MAX_URLS, hub_urls
from artcafe_trio.hub._backplane import LocalBackplane
from artcafe_trio.hub._serve import _serve_hub
from artcafe_trio.protocol import Welcome, decode, encode
from artcafe_trio.testing import TestHub, open_test_hub

pytestmark = pytest.mark.timeout(30)


class Dials:
    """A transport per URL that logs each dial as ``(url, time)``."""

    def __init__(self) -> None:
        self.log: list[tuple[str, float]] = []
        self.fail: dict[str, BaseException] = {}

    def transport(self, url: str, hub: TestHub | None) -> _Logged:
        return _Logged(self, url, hub)

    def urls(self) -> list[str]:
        return [url for url, _ in self.log]


class _Logged:
    def __init__(self, dials: Dials, url: str, hub: TestHub | None) -> None:
        self.dials, self.url, self.hub = dials, url, hub

    async def connect(self, nursery: trio.Nursery, resource: str) -> WebSocketConnection:
        self.dials.log.append((self.url, trio.current_time()))
        error = self.dials.fail.get(self.url)
        if error is not None or self.hub is None:
            await trio.lowlevel.checkpoint()
            raise error or OSError("connection refused")
        return await self.hub.transport.connect(nursery, resource)


@asynccontextmanager
async def hubs(count: int) -> AsyncIterator[tuple[list[TestHub], PrivateKey]]:
    key = generate_private_key()
    async with AsyncExitStack() as stack:
        found = []
        for i in range(count):
            hub = await stack.enter_async_context(
                open_test_hub(hub_id=f"hub-{i}", close_timeout=0.05)
            )
            hub.registry.add_key("test", "a1", key.public_key)
            found.append(hub)
        yield found, key


URLS = ["ws://a:1", "ws://b:2", "ws://c:3"]


async def test_the_agent_moves_to_the_second_hub_within_one_backoff_delay(
    autojump_clock: trio.abc.Clock,
) -> None:
    dials = Dials()
    async with hubs(2) as ((a, b), key):
        mapping = {URLS[0]: dials.transport(URLS[0], a), URLS[1]: dials.transport(URLS[1], b)}
        async with open_agent(
            agent_id="a1", tenant_id="test", private_key=key, url=URLS[:2], transport=mapping
        ) as agent:
            assert agent.health().url == URLS[0]
            assert dials.urls() == [URLS[0]]
            await trio.sleep(1)  # the first ACK: a healthy connection
            lost_at = trio.current_time()
            a.go_down()
            while agent.health().url != URLS[1]:
                await trio.sleep(0.01)
            # One round after one backoff delay (full jitter, base 1 s): a refused, then b.
            [(url_a, t_a), (url_b, t_b)] = dials.log[1:]
            assert (url_a, url_b) == (URLS[0], URLS[1])
            assert t_a == t_b and 0 < t_a - lost_at <= 1.0
            assert agent.health().connected
            await agent.publish("x.y", {"n": 1})  # it works through hub b


async def test_rounds_start_from_the_url_that_last_worked(
    autojump_clock: trio.abc.Clock,
) -> None:
    dials = Dials()
    async with hubs(3) as ((a, b, c), key):
        mapping = {url: dials.transport(url, hub) for url, hub in zip(URLS, (a, b, c), strict=True)}
        a.go_down()
        async with open_agent(
            agent_id="a1", tenant_id="test", private_key=key, url=URLS, transport=mapping
        ) as agent:
            assert dials.urls() == [URLS[0], URLS[1]]  # the first round: a refused, b
            assert agent.health().url == URLS[1]
            assert agent.health().reconnect_attempts == 0  # one round, no failed round
            b.go_down()
            while agent.health().url != URLS[2]:
                await trio.sleep(0.01)
            assert dials.urls()[2:] == [URLS[1], URLS[2]]  # from b (it last worked), then c
            a.come_back()
            c.go_down()
            while agent.health().url != URLS[0]:
                await trio.sleep(0.01)
            assert dials.urls()[4:] == [URLS[2], URLS[0]]  # from c, then around to a


async def test_an_attempt_is_a_round_and_max_reconnect_attempts_counts_rounds(
    autojump_clock: trio.abc.Clock,
) -> None:
    dials = Dials()
    mapping = {url: dials.transport(url, None) for url in URLS}
    with pytest.raises(ReconnectFailed) as info:
        async with open_agent(
            agent_id="a1", tenant_id="test", private_key=generate_private_key(), url=URLS,
            transport=mapping, max_reconnect_attempts=2,
        ):  # fmt: skip
            pytest.fail("must not connect")
    assert info.value.attempts == 2
    assert dials.urls() == URLS * 3  # the first round, then two rounds
    times = [t for _, t in dials.log]
    for start in (0, 3, 6):
        assert times[start] == times[start + 1] == times[start + 2]  # no sleep in a round
    assert times[0] < times[3] < times[6]  # a backoff delay between rounds
    cause = info.value.last_cause
    assert isinstance(cause, ConnectFailed) and cause.url == URLS[2]


@pytest.mark.parametrize(
    "error",
    [
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        AuthenticationError("bad certificate", code="hub_certificate_invalid"),
    ],
    ids=["unknown-host", "bad-tls"],
)
async def test_a_permanent_failure_drops_that_url_and_the_agent_goes_on(
    autojump_clock: trio.abc.Clock, error: BaseException
) -> None:
    dials = Dials()
    dials.fail[URLS[0]] = error
    async with hubs(2) as ((a, b), key):
        mapping = {URLS[0]: dials.transport(URLS[0], a), URLS[1]: dials.transport(URLS[1], b)}
        async with open_agent(
            agent_id="a1", tenant_id="test", private_key=key, url=URLS[:2], transport=mapping
        ) as agent:
            assert agent.health().url == URLS[1]
            await trio.sleep(1)
            b.go_down()
            await trio.sleep(5)
            b.come_back()
            while not agent.health().connected:
                await trio.sleep(0.01)
            assert dials.urls()[0] == URLS[0]
            assert set(dials.urls()[1:]) == {URLS[1]}  # a is never tried again


async def test_the_last_url_failing_permanently_ends_the_agent(
    autojump_clock: trio.abc.Clock,
) -> None:
    dials = Dials()
    for url in URLS[:2]:
        dials.fail[url] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    mapping = {url: dials.transport(url, None) for url in URLS[:2]}
    start = trio.current_time()
    with pytest.raises(ConnectFailed) as info:
        async with open_agent(
            agent_id="a1", tenant_id="test", private_key=generate_private_key(),
            url=URLS[:2], transport=mapping,
        ):  # fmt: skip
            pytest.fail("must not connect")
    assert info.value.permanent and info.value.url == URLS[1]
    assert dials.urls() == URLS[:2] and trio.current_time() == start


def test_urls_are_checked_up_front() -> None:
    assert hub_urls("ws://a:1/, wss://b") == ("ws://a:1", "wss://b")
    assert hub_urls(["ws://a", "ws://a/"]) == ("ws://a",)
    for bad in ("http://a", "ws://", ["ws://a", "tcp://b"], [], "ws://a:notaport"):
        with pytest.raises(ValueError, match="url"):
            hub_urls(bad)
    with pytest.raises(ValueError, match="at most"):
        hub_urls([f"ws://h{i}" for i in range(MAX_URLS + 1)])


async def test_open_agent_refuses_a_bad_url_and_a_url_without_transport() -> None:
    key = generate_private_key()
    with pytest.raises(ValueError, match="ws://host:port"):
        async with open_agent(agent_id="a1", tenant_id="t", private_key=key, url=["ftp://x"]):
            pass
    with pytest.raises(ValueError, match="no transport for the hub url"):
        async with open_agent(
            agent_id="a1", tenant_id="t", private_key=key, url=["ws://a", "ws://b"],
            transport={"ws://a": Dials().transport("ws://a", None)},
        ):  # fmt: skip
            pass


# --- the welcome's connect_urls ------------------------------------------------------


def test_welcome_connect_urls_round_trip_and_old_frames_still_decode() -> None:
    fields = dict(session_id="s", agent_id="a", tenant_id="t", hub_id="h", hub_time=1.0)
    old = json.dumps({"type": "welcome", **fields})
    assert decode(old) == Welcome(**fields)  # type: ignore[arg-type]
    assert Welcome(**fields).connect_urls is None  # type: ignore[arg-type]
    assert "connect_urls" not in encode(Welcome(**fields))  # type: ignore[arg-type]
    with_urls = Welcome(**fields, connect_urls=("ws://b:2", "wss://c"))  # type: ignore[arg-type]
    assert json.loads(encode(with_urls))["connect_urls"] == ["ws://b:2", "wss://c"]
    assert decode(encode(with_urls)) == with_urls
    with pytest.raises(RemoteProtocolError) as info:
        decode(json.dumps({"type": "welcome", **fields, "connect_urls": "ws://b"}))
    assert info.value.code == "invalid_field"
    with pytest.raises(RemoteProtocolError):
        decode(json.dumps({"type": "welcome", **fields, "connect_urls": ["ws://b"] * 65}))


class Advertising(LocalBackplane):
    def __init__(self, urls: tuple[str, ...]) -> None:
        self.urls = urls

    def connect_urls(self) -> tuple[str, ...]:
        return self.urls


async def test_the_agent_learns_the_advertised_hubs_and_fails_over_to_them(
    autojump_clock: trio.abc.Clock,
) -> None:
    dials = Dials()
    advertised = (URLS[1], "not a url", URLS[0])
    async with hubs(1) as ((b,), key), trio.open_nursery() as nursery:
        with Registry.open(":memory:") as registry:
            registry.add_key("test", "a1", key.public_key)
            serve = functools.partial(
                _serve_hub, registry=registry, db=None, host=None, port=None,
                config=HubConfig(hub_id="hub-a", close_timeout=0.05), ssl_context=None,
                tls_cert=None, tls_key=None, admin_file=None, backplane=Advertising(advertised),
            )  # fmt: skip
            a = TestHub(await nursery.start(serve))
            mapping = {URLS[0]: dials.transport(URLS[0], a), URLS[1]: dials.transport(URLS[1], b)}
            async with open_agent(
                agent_id="a1", tenant_id="test", private_key=key, url=URLS[0], transport=mapping
            ) as agent:
                assert agent._sup.urls.all == (URLS[0], URLS[1])  # bad and known ones left out
                await trio.sleep(1)
                a.go_down()
                while agent.health().url != URLS[1]:
                    await trio.sleep(0.01)
                assert dials.urls() == [URLS[0], URLS[0], URLS[1]]
                # b advertises nothing: b itself stays on the list, the way back to it.
                assert agent._sup.urls.all == (URLS[0], URLS[1])
            nursery.cancel_scope.cancel()


async def test_one_transport_for_every_url_ignores_advertised_urls(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with hubs(1) as ((hub,), key):
        async with open_agent(
            agent_id="a1", tenant_id="test", private_key=key, transport=hub.transport
        ) as agent:
            agent._sup.urls.connected("ws://127.0.0.1:8765", ("ws://b:2",))
            assert agent._sup.urls.all == ("ws://127.0.0.1:8765",)


def test_the_server_connection_puts_connect_urls_in_the_welcome_only_when_given() -> None:
    from artcafe_trio.protocol.server import AuthRequested

    from .test_server_connection import auth, fresh

    def welcome(**accept: Any) -> dict[str, Any]:
        conn = fresh()
        assert isinstance(conn.receive_auth(encode(auth()), 101.0), AuthRequested)
        result: dict[str, Any] = json.loads(conn.accept(session_id="s", hub_time=1.0, **accept))
        return result

    assert "connect_urls" not in welcome()
    assert "connect_urls" not in welcome(connect_urls=())
    assert welcome(connect_urls=["ws://b:2"])["connect_urls"] == ["ws://b:2"]


def test_the_client_connection_exposes_the_advertised_urls() -> None:
    from .test_client_connection import open_conn

    assert open_conn().connect_urls == ()
    assert open_conn(connect_urls=["ws://b:2", "ws://c:3"]).connect_urls == ("ws://b:2", "ws://c:3")
