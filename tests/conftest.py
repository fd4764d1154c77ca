"""Shared fixtures and a raw protocol client for hub tests."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Generator
from typing import Any

import pytest
import trio
import trio_websocket

from artcafe_trio.protocol import (
    Auth,
    Challenge,
    Frame,
    Message,
    PrivateKey,
    Subscribe,
    Subscribed,
    Welcome,
    decode,
    encode,
)
from artcafe_trio.testing import TestHub, open_test_hub

from .logsecrets import secret_lines

pytest_plugins = ["pytester"]  # tests/test_zz_logs.py runs the log check in a session of its own


class RawClient:
    """Speaks protocol v1 frame by frame, for tests that poke the hub directly."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.welcome: Welcome | None = None
        self._ids = 0

    def next_id(self) -> str:
        self._ids += 1
        return f"r{self._ids}"

    async def send(self, frame: Frame | str | bytes) -> None:
        await self.ws.send_message(frame if isinstance(frame, str | bytes) else encode(frame))

    async def recv(self) -> Frame:
        return decode(await self.ws.get_message())

    async def recv_type(self, cls: type[Any]) -> Any:
        """Receive frames until one of ``cls`` arrives (skipping e.g. presence messages)."""
        while True:
            frame = await self.recv()
            if isinstance(frame, cls):
                return frame

    async def subscribe(self, pattern: str) -> Subscribed:
        frame_id = self.next_id()
        await self.send(Subscribe(id=frame_id, subject=pattern))
        answer = await self.recv_type(Subscribed)
        assert answer.id == frame_id
        return answer

    async def messages(self, count: int) -> list[Message]:
        return [await self.recv_type(Message) for _ in range(count)]

    async def close_code(self) -> int | None:
        """Read until the hub closes; return the close code."""
        try:
            while True:
                await self.ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            return exc.reason.code


async def raw_connect(
    hub: TestHub,
    nursery: trio.Nursery,
    agent_id: str,
    tenant_id: str,
    key: PrivateKey | None,
    *,
    path_agent: str | None = None,
    path_tenant: str | None = None,
    authenticate: bool = True,
    **auth_fields: Any,
) -> RawClient:
    """Connect in memory; with ``authenticate``, answer the challenge and expect a welcome."""
    resource = f"/api/v1/ws/agent/{path_agent or agent_id}?tenant_id={path_tenant or tenant_id}"
    client = RawClient(await hub.dial(nursery, resource))
    if not authenticate:
        return client
    challenge = await client.recv()
    assert isinstance(challenge, Challenge)
    assert key is not None
    fields: dict[str, Any] = {
        "agent_id": agent_id,
        "tenant_id": tenant_id,
        "algorithm": key.algorithm,
        "signature": key.sign_auth(tenant_id=tenant_id, agent_id=agent_id, nonce=challenge.nonce),
        "heartbeat_interval": 10.0,
        "heartbeat_timeout_multiplier": 3.0,
    }
    fields.update(auth_fields)
    await client.send(Auth(**fields))
    answer = await client.recv()
    if isinstance(answer, Welcome):
        client.welcome = answer
    else:
        client.welcome = None
        client.refusal = answer  # type: ignore[attr-defined]
    return client


async def _connect_over_a_socket_pair(self: TestHub, remote: str = "memory") -> trio.abc.Stream:
    """``TestHub.connect_in_memory`` over an OS socket pair (``socket.socketpair``): the
    hub then writes as it does over TCP, at once from the task that queued the frame,
    which memory streams do not allow (see ``_wsserver.nowait_socket``)."""
    a, b = socket.socketpair()
    client = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    server = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    self.hub.serve_stream(server, remote)
    await trio.lowlevel.checkpoint()
    return client


@pytest.fixture(params=["memory", "socketpair"] if os.name == "posix" else ["memory"])
def hub_streams(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a module's tests twice (``pytestmark = pytest.mark.usefixtures("hub_streams")``):
    over memory streams (the writer task writes) and over OS socket pairs (writes at
    once, the writer task only for what the socket does not take)."""
    if request.param == "socketpair":
        monkeypatch.setattr(TestHub, "connect_in_memory", _connect_over_a_socket_pair)
    return str(request.param)


@pytest.fixture
async def test_hub() -> AsyncIterator[TestHub]:
    # Raw test clients often stop reading (their nursery is gone at teardown, so nobody
    # answers the hub's close): a short close_timeout keeps teardown quick. Over memory
    # streams a write never waits, so the close frame itself always goes out at once.
    async with open_test_hub(disconnect_grace=5.0, close_timeout=0.05) as hub:
        yield hub


class _SecretsFilter(logging.Handler):
    """Collects every log record of this process's session to check no secret leaks."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.checked = 0  # lines[:checked] passed the check

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def check_new_lines(self) -> list[str]:
        """The lines logged since the last check that may hold a secret."""
        new, self.checked = self.lines[self.checked :], len(self.lines)
        return secret_lines(new)


LOG_CAPTURE = _SecretsFilter()
logging.getLogger("artcafe_trio").addHandler(LOG_CAPTURE)
logging.getLogger("artcafe_trio").setLevel(logging.DEBUG)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Every log line is checked for secrets at the end of the test phase that logged it
    (in each pytest-xdist worker: the check needs no single process to see the session)."""
    outcome = yield
    leaked = LOG_CAPTURE.check_new_lines()
    if leaked:
        report: pytest.TestReport = outcome.get_result()
        report.outcome = "failed"
        shown = "\n".join(repr(line[:200]) for line in leaked)
        report.longrepr = f"possible secret in {len(leaked)} log line(s) ({call.when}):\n{shown}"


#: The modules that take longest (real nats-server clusters, processes, a browser, real
#: clocks), longest first, as measured (seconds summed over their tests, 2 December
#: 2026). They run first so that no worker picks one up last while the others are idle;
#: every other module follows in collection order. Only the order depends on this list.
LONGEST_FIRST = (
    "nats/test_cluster_hubs.py",  # 37 s
    "test_dashboard_browser.py",  # 22 s
    "nats/test_cluster_ttl.py",  # 17 s
    "test_demo.py",  # 16 s
    "test_cli.py",  # 12 s
    "nats/test_kv.py",  # 9 s
    "nats/test_cluster_cli.py",  # 8 s
    "test_faults_processes.py",  # 8 s
    "nats/test_cluster_store.py",  # 8 s
    "test_hub.py",  # 7 s
    "test_first_hour_cli.py",  # 7 s
    "test_fuzz_hub.py",  # 7 s
    "test_faults.py",  # 7 s
    "test_frames.py",  # 6 s
    "test_first_hour.py",  # 6 s
    "test_subjects.py",  # 6 s
    "test_hardening_isolation.py",  # 6 s
    "test_hardening_auth.py",  # 6 s
    "test_examples.py",  # 6 s
    "nats/test_cluster_reaper.py",  # 5 s
    "nats/test_real.py",  # 5 s
    "test_keys.py",  # 4 s
    "test_package.py",  # 4 s
    "test_e2e.py",  # 4 s
    "nats/test_cluster_drain_races.py",  # 3 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest modules first (stable: a module's tests keep their order)."""
    tests = os.path.dirname(__file__)

    def rank(item: pytest.Item) -> int:
        module = os.path.relpath(str(item.path), tests).replace(os.sep, "/")
        return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Lines logged outside any test phase (collection, session end) are checked too."""
    leaked = LOG_CAPTURE.check_new_lines()
    if leaked:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        for line in leaked:
            print(f"possible secret in a log line outside any test: {line[:200]!r}")
