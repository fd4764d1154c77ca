"""Issue 15, a new user's first hour: failures that say what to do, recovery that is
visible, nothing that hangs. Library messages are checked with caplog; the command
line's in process here (``main()``, for the variants), and on the real command in
subprocesses in ``tests/test_first_hour_cli.py``."""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio_websocket

from artcafe_trio import (
    AuthenticationError,
    Backoff,
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    HeartbeatAgent,
    HubConfig,
    KeyLoadError,
    ReconnectFailed,
    generate_private_key,
    load_private_key,
    open_agent,
    open_hub,
)
from artcafe_trio.agent._connfail import describe_failure
from artcafe_trio.agent._session import lost
from artcafe_trio.cli import main
from artcafe_trio.testing import TestHub

from .test_cli import _cli, _free_port, _run_main

pytestmark = pytest.mark.timeout(60)

FAST = Backoff(base=0.01, cap=0.02)


def _records(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "artcafe_trio.agent" and r.levelno == level
    ]


# --------------------------------------------------------------------------- items 2, 3, 4


def _gaierror(code: int, text: str) -> socket.gaierror:
    return socket.gaierror(code, text)


def _refused_group() -> OSError:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Error connecting to ('::1', 1): ...")
    group = OSError("all attempts to connect to 127.0.0.1:1 failed")
    group.__cause__ = ExceptionGroup("all attempts", [refused, refused])
    return group


def _tls_error(reason: str) -> trio.BrokenResourceError:
    tls = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower().replace('_', ' ')}")
    tls.reason = reason
    broken = trio.BrokenResourceError()
    broken.__cause__ = tls
    return broken


def _wrong_version() -> trio.BrokenResourceError:
    return _tls_error("WRONG_VERSION_NUMBER")


def _closed_in_handshake(code: int, reason: str) -> ConnectionLost:
    """What the agent's handshake raises when the hub closes the WebSocket."""
    return lost(trio_websocket.ConnectionClosed(trio_websocket.CloseReason(code, reason)))


URL = "ws://hub.example:8765"

# (what the dial raises, permanent, the message after "cannot connect to URL: ")
FAILURES: dict[str, tuple[Any, bool, str]] = {
    "refused": (_refused_group, False, "connection refused (is the hub running?)"),
    "reset": (
        lambda: ConnectionResetError(errno.ECONNRESET, "reset"),
        False,
        "connection reset by peer",
    ),
    "unreachable": (
        lambda: OSError(errno.ENETUNREACH, "unreachable"),
        False,
        "network is unreachable",
    ),
    "host-unreachable": (
        lambda: OSError(errno.EHOSTUNREACH, "no route"),
        False,
        "no route to host",
    ),
    "tcp-timeout": (
        lambda: TimeoutError(errno.ETIMEDOUT, "timed out"),
        False,
        "connection timed out",
    ),
    "dns-unknown": (
        lambda: _gaierror(socket.EAI_NONAME, "Name or service not known"),
        True,
        "cannot resolve host 'hub.example' (name or service not known)",
    ),
    "dns-temporary": (
        lambda: _gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
        False,
        "cannot resolve host 'hub.example' (temporary failure in name resolution)",
    ),
    "tls-to-plain": (
        _wrong_version,
        True,
        "TLS handshake failed: the hub speaks plain ws://? (use ws:// instead of wss://)",
    ),
    "tls-other": (
        lambda: _tls_error("UNSUPPORTED_PROTOCOL"),
        True,
        "TLS handshake failed: UNSUPPORTED_PROTOCOL",
    ),
    "tls-eof": (
        lambda: trio.BrokenResourceError(),
        False,
        "the hub hung up during the TLS handshake",
    ),
    "http-404": (
        lambda: trio_websocket.ConnectionRejected(
            404, (), b"unknown path; agents use /api/v1/ws/agent/{id}"
        ),
        True,
        "the hub answered HTTP 404: unknown path; agents use /api/v1/ws/agent/{id} (check the"
        " URL: it is the hub's base URL, without a path)",
    ),
    "http-403": (
        lambda: trio_websocket.ConnectionRejected(403, (), b"forbidden"),
        True,
        "the hub answered HTTP 403: forbidden",
    ),
    "http-503": (
        lambda: trio_websocket.ConnectionRejected(503, (), b"hub shutting down"),
        False,
        "the hub answered HTTP 503: hub shutting down",
    ),
    "http-429": (
        lambda: trio_websocket.ConnectionRejected(429, (), b""),
        False,
        "the hub answered HTTP 429",
    ),
    "closed-1012-in-handshake": (
        lambda: _closed_in_handshake(1012, "hub shutting down"),
        False,
        "the hub closed the connection (1012 hub shutting down)",
    ),
    "hung-up-in-handshake": (
        lambda: ConnectionLost("the hub hung up during the WebSocket handshake"),
        False,
        "the hub hung up during the WebSocket handshake",
    ),
}

# Each row of docs/troubleshooting.md's "Which connection failures are retried": the
# FAILURES cases above that check it, or the test elsewhere that does.
DOCUMENTED: dict[str, list[str]] = {
    "TCP connection refused": ["refused"],
    "reset, network or host unreachable, TCP timeout": [
        "reset", "unreachable", "host-unreachable", "tcp-timeout",
    ],
    "host name does not exist (`EAI_NONAME`)": ["dns-unknown"],
    "temporary resolver failure (`EAI_AGAIN`)": ["dns-temporary"],
    "`wss://` to a plain `ws://` hub": ["tls-to-plain"],
    "another TLS protocol error": ["tls-other"],
    "the hub hangs up during the TLS handshake": ["tls-eof"],
    "the hub's certificate does not verify": ["test_cli_untrusted_certificate_names_cafile"],
    "HTTP 404 to the WebSocket upgrade (a path after the host)": ["http-404"],
    "any other HTTP 4xx (400, 401, 403...)": ["http-403"],
    "HTTP 408, 425, 429, 500, 502, 503, 504 (a proxy, a hub shutting down)": [
        "http-503", "http-429",
    ],
    "no `welcome` within `connect_timeout`": ["test_connect_timeout_is_retryable"],
    "the hub closes or hangs up during the handshake": [
        "closed-1012-in-handshake", "hung-up-in-handshake",
    ],
    "the hub refuses the key": ["test_auth_failure_is_permanent_and_its_traceback_short"],
    "replaced by another session (4003)": [
        "test_regressions.py::test_being_replaced_by_another_process_stops_the_agent_loudly"
    ],
}  # fmt: skip


def _documented_rows() -> list[list[str]]:
    text = (Path(__file__).parent.parent / "docs" / "troubleshooting.md").read_text()
    section = text.split("### Which connection failures are retried", 1)[1]
    table = section.split("| --- |", 1)[1].split("\n\n", 1)[0]
    return [
        [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        for line in table.strip().splitlines()[1:]
    ]


def _pattern(snippet: str) -> str:
    """A documented message as a regex: "..." and the placeholders match anything."""
    parts = re.split(r"(\.\.\.|REASON|BODY)", snippet)
    return "".join(".*" if p in ("...", "REASON", "BODY") else re.escape(p) for p in parts)


def test_every_documented_failure_row_is_tested() -> None:
    rows = _documented_rows()
    assert [row[0] for row in rows] == list(DOCUMENTED)
    for failure, message, kind in rows:
        cases = DOCUMENTED[failure]
        for case in cases:
            if case.startswith("test_"):
                module, _, name = case.rpartition("::")
                where = Path(__file__).with_name(module) if module else Path(__file__)
                assert f"def {name or case}(" in where.read_text(), case
                continue
            _make, permanent, _text = FAILURES[case]
            assert permanent == kind.startswith("**permanent**"), (failure, case)
        texts = [FAILURES[c][2] for c in cases if c in FAILURES]
        if not texts or message.startswith("("):
            continue  # raised as another error: its test checks the words
        for snippet in re.findall(r"`([^`]+)`", message):
            if snippet.startswith("cannot connect to"):
                continue
            assert any(re.fullmatch(_pattern(snippet) + ".*", t) for t in texts), (
                failure, snippet, texts,
            )  # fmt: skip


@pytest.mark.parametrize("name", sorted(FAILURES))
async def test_each_connection_failure_is_retryable_or_permanent(
    name: str, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    make, permanent, text = FAILURES[name]
    dials = 0

    async def failing_dial(nursery: trio.Nursery, resource: str) -> Any:
        nonlocal dials
        dials += 1
        await trio.lowlevel.checkpoint()
        raise make()

    caplog.set_level(logging.INFO, "artcafe_trio.agent")
    kwargs: dict[str, Any] = {
        "url": URL, "agent_id": "a1", "tenant_id": "acme", "dial": failing_dial,
        "private_key": generate_private_key(), "max_reconnect_attempts": 1,
        "rng": random.Random(3),
    }  # fmt: skip
    message = f"cannot connect to {URL}: {text}"
    expected: type[Exception] = ConnectFailed if permanent else ReconnectFailed
    with pytest.raises(expected) as info:
        async with open_agent(**kwargs):
            pytest.fail("must not connect")
    if permanent:
        assert isinstance(info.value, ConnectFailed)
        assert info.value.permanent
        assert str(info.value) == message
        assert dials == 1  # never retried
        assert _records(caplog) == []
    else:
        assert isinstance(info.value, ReconnectFailed)
        cause = info.value.last_cause
        assert isinstance(cause, ConnectFailed) and not cause.permanent
        assert str(cause) == message
        assert dials == 2
        (warning,) = _records(caplog)
        assert warning.startswith(f"acme/a1: {message}; retry 1/1 in ")
        assert "connection lost" not in warning  # it never was connected
    assert describe_failure(make(), URL) == (message, permanent)


async def test_connect_timeout_is_retryable(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async def silent_dial(nursery: trio.Nursery, resource: str) -> Any:
        await trio.sleep_forever()

    with pytest.raises(ReconnectFailed) as info:
        async with open_agent(
            url=URL, agent_id="a1", tenant_id="acme", dial=silent_dial,
            private_key=generate_private_key(), max_reconnect_attempts=1, connect_timeout=2.5,
        ):  # fmt: skip
            pytest.fail("must not connect")
    assert isinstance(info.value.last_cause, ConnectTimeout)
    assert info.value.last_cause.timeout == 2.5
    assert info.value.last_cause.permanent is False
    assert str(info.value.last_cause) == (
        f"cannot connect to {URL}: no welcome from the hub within 2.5 s"
    )
    assert str(info.value).endswith(
        f"; last cause: cannot connect to {URL}: no welcome from the hub within 2.5 s"
    )


async def test_auth_failure_is_permanent_and_its_traceback_short(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    test_hub.register("test", "a1")
    with pytest.raises(AuthenticationError) as info:
        async with test_hub.open_agent("a1", private_key=generate_private_key()):
            pytest.fail("must not connect")
    frames = traceback.extract_tb(info.value.__traceback__)
    internal = [f.name for f in frames if f.filename.endswith(("_agent.py", "_util.py"))]
    assert "_supervise" not in internal and "_handshake" not in internal
    # the test, TestHub.open_agent and open_agent entering, and where the error is raised
    assert len(frames) <= 8, [f.name for f in frames]
    assert info.value.__cause__ is None


async def _serve_silently(task_status: trio.TaskStatus[int]) -> None:
    """A TCP server that accepts and never answers (a hung hub)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(hold, listeners)


async def test_real_sockets_tls_to_plain_404_refused_and_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same words over real sockets, without retrying the permanent ones."""
    caplog.set_level(logging.WARNING, "artcafe_trio.agent")
    base: dict[str, Any] = {"agent_id": "a1", "tenant_id": "acme", "backoff": FAST}
    base["private_key"] = generate_private_key()
    async with open_hub(port=0, db=str(tmp_path / "hub.db")) as hub:
        assert hub.url is not None
        wss = hub.url.replace("ws://", "wss://")
        with pytest.raises(ConnectFailed) as info:
            async with open_agent(url=wss, **base):
                pass
        assert str(info.value) == (
            f"cannot connect to {wss}: TLS handshake failed: the hub speaks plain ws://?"
            " (use ws:// instead of wss://)"
        )
        wrong = hub.url + "/foo"
        with pytest.raises(ConnectFailed) as info:
            async with open_agent(url=wrong, **base):
                pass
        assert str(info.value) == (
            f"cannot connect to {wrong}: the hub answered HTTP 404: unknown path; agents use"
            " /api/v1/ws/agent/{id} (check the URL: it is the hub's base URL, without a path)"
        )
        assert _records(caplog) == []  # neither was retried
    down = f"ws://127.0.0.1:{_free_port()}"
    with pytest.raises(ReconnectFailed) as gave_up:
        async with open_agent(url=down, max_reconnect_attempts=2, **base):
            pass
    refused = f"cannot connect to {down}: connection refused (is the hub running?)"
    assert str(gave_up.value.last_cause) == refused
    assert [w.split("; retry")[0] for w in _records(caplog)] == [f"acme/a1: {refused}"] * 2
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_silently)
        hung = f"ws://127.0.0.1:{port}"
        with pytest.raises(ReconnectFailed) as gave_up:
            async with open_agent(url=hung, max_reconnect_attempts=1, connect_timeout=0.2, **base):
                pass
        assert str(gave_up.value.last_cause) == (
            f"cannot connect to {hung}: no welcome from the hub within 0.2 s"
        )
        nursery.cancel_scope.cancel()


async def test_retry_first_connect_false_fails_fast_then_reconnects(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    """What ``listen`` uses: the first connection fails at once; an established one
    reconnects."""
    test_hub.go_down()
    start = trio.current_time()
    with pytest.raises(ConnectFailed) as info:
        async with test_hub.open_agent("a1", retry_first_connect=False):
            pytest.fail("must not connect")
    assert str(info.value) == "cannot connect to ws://127.0.0.1:8765: test hub is down"
    assert not info.value.permanent  # retryable, but this caller asked not to wait
    assert trio.current_time() == start
    test_hub.come_back()
    async with test_hub.open_agent("a1", retry_first_connect=False) as agent:
        first = agent.session_id
        test_hub.hub.close_all(1012, "restart")
        with trio.fail_after(10):
            await trio.sleep(0.01)
            await agent.wait_connected()
        assert agent.session_id != first


# --------------------------------------------------------------------------- items 5, 10


async def test_reconnect_success_is_logged_at_the_level_of_the_loss(
    test_hub: TestHub, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "artcafe_trio.agent")
    async with test_hub.open_agent("a1", rng=random.Random(5)) as agent:
        assert _records(caplog, logging.INFO) == [f"test/a1 connected (session {agent.session_id})"]
        test_hub.go_down()
        await trio.sleep(20)
        test_hub.come_back()
        with trio.fail_after(120):
            await agent.wait_connected()
        warnings = _records(caplog)
        lost, *failed, back = warnings
        assert lost.startswith(
            "test/a1: connection lost (the hub closed the connection (1012 test hub going down));"
            " reconnect attempt 1/10 in "
        )
        assert failed and all(
            w.startswith("test/a1: cannot connect to ws://127.0.0.1:8765: test hub is down;")
            for w in failed
        )
        attempts = len(failed) + 1
        assert back == f"test/a1 reconnected after {attempts} attempts (session {agent.session_id})"


async def test_first_connection_after_failures_is_logged(
    test_hub: TestHub, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    test_hub.go_down()

    async def bring_up() -> None:
        await trio.sleep(0.5)
        test_hub.come_back()

    caplog.set_level(logging.WARNING, "artcafe_trio.agent")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bring_up)
        async with test_hub.open_agent("a1", rng=random.Random(1)) as agent:
            *retries, back = _records(caplog)
            assert all("; retry " in r for r in retries)
            plural = "" if len(retries) == 1 else "s"
            assert back == (
                f"test/a1 connected after {len(retries)} attempt{plural}"
                f" (session {agent.session_id})"
            )


async def test_watchdog_message_does_not_blame_the_hub(
    test_hub: TestHub, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "artcafe_trio.agent")
    async with test_hub.open_agent("a1", heartbeat_interval=10):
        await trio.sleep(1)
        test_hub.blackhole()
        await trio.sleep(31)  # the watchdog fires at 30 s; the agent reconnects at once
        test_hub.blackhole(False)
        assert _records(caplog)[0].startswith(
            "test/a1: connection lost (no heartbeat ACK for 30 s); reconnect attempt 1/10 in "
        )


def test_one_shot_status_is_debug_on_the_hub(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "hub.db"
    caplog.set_level(logging.DEBUG, "artcafe_trio.hub")
    done = threading.Event()
    result: list[int] = []

    async def run() -> None:
        async with open_hub(port=0, db=str(db), admin_file=f"{db}.admin"):
            result.append(await trio.to_thread.run_sync(main, ["status", "--db", str(db)]))
            await trio.sleep(0.2)  # the hub notices the close
        done.set()

    trio.run(run)
    assert result == [0]
    admin = [r for r in caplog.records if "$admin" in r.getMessage()]
    # status sends a close frame (1000): a clean close, not a lost connection
    assert [r.getMessage().rsplit("> ", 1)[-1] for r in admin] == [
        "connected",
        "closed by the client (1000)",
    ]
    assert {r.levelno for r in admin} == {logging.DEBUG}


async def test_the_hub_tells_a_client_close_from_a_dropped_connection(
    test_hub: TestHub, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection that ends without a close frame is "connection lost"; ``leave`` is
    the hub's close. (A client's close frame: ``test_one_shot_status_is_debug_on_the_hub``.)"""
    caplog.set_level(logging.INFO, "artcafe_trio.hub")
    sessions: list[str | None] = []
    async with test_hub.open_agent("a1", rng=random.Random(2)) as agent:
        sessions.append(agent.session_id)
        await test_hub._streams[-1].send_eof()  # the connection drops: no close frame
        await trio.sleep(0.5)
        await agent.wait_connected()
        sessions.append(agent.session_id)
    ends = {
        sid: message.split("> ", 1)[1]
        for r in caplog.records
        if r.name == "artcafe_trio.hub" and (message := r.getMessage()).startswith("<session")
        for sid in sessions
        if sid is not None and sid in message and not message.endswith("> connected")
    }
    assert ends == {sessions[0]: "connection lost", sessions[1]: "closed: 1000 left"}


# --------------------------------------------------------------------------- item 6


async def test_presence_ack_is_per_session(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    key = test_hub.register("test", "a1")
    async with test_hub.open_agent("a1", private_key=key, heartbeat_interval=1):
        await trio.sleep(1.5)
        (row,) = test_hub.hub.presence_table("test")
        assert row.last_heartbeat is not None
    async with test_hub.open_agent("a1", private_key=key, heartbeat_interval=None):
        (row,) = test_hub.hub.presence_table("test")
        assert row.status == "online"
        assert row.last_heartbeat is None  # not the previous session's ACK


async def test_status_watch_redraws_every_second(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bounded real-clock test: no presence change, yet the table is redrawn each second
    with ticking ages."""
    db = tmp_path / "hub.db"
    result: list[int] = []
    async with trio.open_nursery() as nursery:
        async with open_hub(port=0, db=str(db), admin_file=f"{db}.admin") as hub:
            key = generate_private_key()
            hub.registry.add_key("acme", "w1", key.public_key)
            async with open_agent(
                url=hub.url, agent_id="w1", tenant_id="acme", private_key=key,
                heartbeat_interval=60,
            ):  # fmt: skip

                def watch() -> None:
                    result.append(main(["status", "--db", str(db), "--watch"]))

                nursery.start_soon(trio.to_thread.run_sync, watch)
                with trio.fail_after(20):
                    while capsys.readouterr().out.count("presence at ") < 1:
                        await trio.sleep(0.05)
                    start = trio.current_time()
                    seen = 0
                    text = ""
                    while seen < 3:
                        await trio.sleep(0.1)
                        chunk = capsys.readouterr().out
                        seen += chunk.count("presence at ")
                        text += chunk
                    elapsed = trio.current_time() - start
        assert 1.5 < elapsed < 10  # about one redraw a second
    assert result == [3]  # the hub stopped: the watch fell back to the database
    last = text.strip().split("presence at ")[-1].splitlines()
    assert last[1].split()[:4] == ["TENANT", "AGENT", "STATUS", "REASON"]
    row = last[2]
    assert row.startswith("acme    w1     online  connected")
    assert " s ago)" in row  # ages tick


# --------------------------------------------------------------------------- item 7


def test_health_before_run_is_a_not_connected_snapshot(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_bytes(generate_private_key().to_pem())
    agent = HeartbeatAgent("a1", str(key), "acme")
    health = agent.get_connection_health()  # no trio here at all
    assert health["connected"] is False
    assert health["healthy"] is False
    assert health["last_heartbeat_ack"] is None
    assert health["seconds_since_ack"] is None
    assert health["reconnect_attempts"] == 0
    assert health["state"] == "not_started"  # nothing is connecting yet
    assert agent.health().next_retry_in is None


# --------------------------------------------------------------------------- item 8


async def test_stop_on_signals_leaves_gracefully(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    async with test_hub.open_agent("a1", stop_on_signals=True):
        os.kill(os.getpid(), signal.SIGTERM)
        await trio.sleep_forever()  # cancelled by the signal: the block ends normally
    (row,) = test_hub.hub.presence_table("test")
    assert (row.status, row.reason) == ("offline", "left")
    with pytest.raises(KeyboardInterrupt):
        async with test_hub.open_agent("a2", stop_on_signals=True):
            os.kill(os.getpid(), signal.SIGINT)
            await trio.sleep_forever()
    row = test_hub.hub.presence_table("test")[1]
    assert (row.agent_id, row.status, row.reason) == ("a2", "offline", "left")


def test_stop_on_signals_outside_the_main_thread_is_refused() -> None:
    errors: list[BaseException] = []

    async def run() -> None:
        async with open_agent(
            agent_id="a", tenant_id="t", private_key=generate_private_key(), stop_on_signals=True
        ):
            pass

    def thread() -> None:
        try:
            trio.run(run)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=thread)
    worker.start()
    worker.join(10)
    assert [str(e) for e in errors] == [
        "stop_on_signals=True needs trio running in the main thread"
    ]


WORKER = textwrap.dedent(
    """
    import sys

    import trio

    from artcafe_trio import open_agent


    async def main():
        async with open_agent(
            url=sys.argv[1], agent_id="worker-1", organization_id="acme",
            private_key_path=sys.argv[2], stop_on_signals=True,
        ) as agent:
            print("online", flush=True)
            await trio.sleep_forever()


    trio.run(main)
    """
)


@pytest.mark.slow
async def test_sigterm_on_an_open_agent_script_is_left(tmp_path: Path) -> None:
    """The README's script shape under systemd/Kubernetes: SIGTERM → ``left``, exit 0."""
    db = tmp_path / "hub.db"
    key = generate_private_key()
    (tmp_path / "worker-1").write_bytes(key.to_pem())
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    config = HubConfig(disconnect_grace=30)
    async with open_hub(port=0, db=str(db), config=config) as hub:
        hub.registry.add_key("acme", "worker-1", key.public_key)
        assert hub.url is not None
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(script), hub.url, str(tmp_path / "worker-1")],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            with trio.fail_after(20):
                seen = b""
                while b"online" not in seen:
                    chunk = await proc.stdout.receive_some()
                    assert chunk, "the worker exited early"
                    seen += chunk
                proc.send_signal(signal.SIGTERM)
                code = await proc.wait()
            assert code == 0
            (row,) = hub.presence_table("acme")
            assert (row.status, row.reason) == ("offline", "left")  # not after the 30 s grace
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            if proc.stdout is not None:
                await proc.stdout.aclose()


# --------------------------------------------------------------------------- items 11, 13


def test_password_for_an_unencrypted_key_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = generate_private_key()
    (tmp_path / "plain").write_bytes(key.to_pem())
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, "artcafe_trio.keys")
    assert load_private_key("plain", "secret") == key
    assert [r.getMessage() for r in caplog.records if r.name == "artcafe_trio.keys"] == [
        f"private key {tmp_path / 'plain'} is not encrypted: the password given is ignored"
    ]
    caplog.clear()
    assert load_private_key("plain") == key
    assert not [r for r in caplog.records if r.name == "artcafe_trio.keys"]


def test_key_errors_show_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyLoadError) as info:
        load_private_key("keys/missing")
    assert str(info.value) == f"private key file not found: {tmp_path / 'keys' / 'missing'}"
    assert info.value.__cause__ is None and info.value.__suppress_context__


NEWCOMER = textwrap.dedent(
    """
    import sys

    import trio

    from artcafe_trio import Backoff, generate_private_key, open_agent


    async def main(case, where):
        if case == "down":
            keys = {"private_key": generate_private_key(), "max_reconnect_attempts": 2,
                    "backoff": Backoff(base=0.01, cap=0.02)}
        else:
            keys = {"private_key_path": where}
        async with open_agent(url=sys.argv[3], agent_id="a1", tenant_id="acme", **keys):
            pass


    trio.run(main, sys.argv[1], sys.argv[2])
    """
)


@pytest.mark.parametrize("case", ["down", "missing", "encrypted"])
def test_a_newcomer_s_tracebacks_are_short(tmp_path: Path, case: str) -> None:
    """The uncaught errors of an ``open_agent`` script, as its author sees them: the hub
    down (ReconnectFailed, was 69 lines with trio's ExceptionGroup), a missing or an
    encrypted key (KeyLoadError, was 35-38 lines through trio.to_thread)."""
    script = tmp_path / "newcomer.py"
    script.write_text(NEWCOMER)
    (tmp_path / "encrypted").write_bytes(generate_private_key().to_pem("pw"))
    url = f"ws://127.0.0.1:{_free_port()}"
    result = subprocess.run(
        [sys.executable, str(script), case, str(tmp_path / case), url],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    trace = lines[lines.index("Traceback (most recent call last):") :]
    if case == "down":  # the elapsed time varies
        trace[-1] = re.sub(r"over \d+\.\d s;", "over T s;", trace[-1])
    last = {
        "down": "artcafe_trio.ReconnectFailed: gave up after 2 consecutive failed connection"
        " attempts over T s; last cause: cannot connect to"
        f" {url}: connection refused (is the hub running?)",
        "missing": f"artcafe_trio.KeyLoadError: private key file not found: {tmp_path / case}",
        "encrypted": f"artcafe_trio.KeyLoadError: private key {tmp_path / case} is encrypted:"
        " pass private_key_password",
    }[case]
    assert trace[-1] == last
    assert result.stderr.count("Traceback (most recent call last)") == 1  # no chain
    for noise in ("ExceptionGroup", "_threads.py", "outcome/", "_supervisor.py"):
        assert noise not in result.stderr
    assert len(trace) <= 18, result.stderr  # the script, open_agent, where it is raised


# --------------------------------------------------------------------------- CLI (items 1, 9, 13)


@attrs.frozen
class _InProcess:
    """What ``main([...])`` did in this process (not a subprocess: those are in
    ``tests/test_first_hour_cli.py``)."""

    returncode: int
    stdout: str
    stderr: str


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> _InProcess:
    """The command's ``main([...])`` in this process, in ``cwd`` with ``env`` added: no
    interpreter start-up (``tests/test_first_hour_cli.py`` runs the real command)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        code, out, err = _run_main(*args)
    return _InProcess(code, out, err)


def test_cli_listen_against_a_down_hub_fails_fast(tmp_path: Path) -> None:
    assert _cli("keygen", "--out", str(tmp_path / "ops")).returncode == 0
    url = f"ws://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    result = _run("listen", "--url", url, "--tenant", "acme", "--agent", "ops",
                  "--key", "ops", "results.>", cwd=tmp_path)  # fmt: skip
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    assert result.stderr == (
        f"error: cannot connect to {url}: connection refused (is the hub running?)\n"
    )
    assert elapsed < 15  # one attempt, not 181 s (in process: no interpreter start-up)


def test_cli_key_password_messages_name_the_flag(tmp_path: Path) -> None:
    env = {"KEY_PW": "s3cret"}
    made = _run("keygen", "--out", "enc", "--password-env", "KEY_PW", cwd=tmp_path, env=env)
    assert made.returncode == 0
    assert _run("keygen", "--out", "plain", cwd=tmp_path).returncode == 0
    url = f"ws://127.0.0.1:{_free_port()}"
    agent = ["--url", url, "--tenant", "acme", "--agent", "a"]
    result = _run("publish", *agent, "--key", "enc", "x.y", "1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: private key {tmp_path / 'enc'} is encrypted: give its password with"
        " --password-env VAR (VAR: an environment variable that holds it)\n"
    )
    result = _run("publish", *agent, "--key", "enc", "--password-env", "KEY_PW", "x.y", "1",
                  cwd=tmp_path, env={"KEY_PW": "wrong"})  # fmt: skip
    assert result.stderr == (
        f"error: cannot decrypt private key {tmp_path / 'enc'}: wrong password in"
        " --password-env KEY_PW\n"
    )
    result = _run("publish", *agent, "--key", "plain", "--password-env", "KEY_PW", "x.y", "1",
                  cwd=tmp_path, env=env)  # fmt: skip
    assert result.stderr == (
        f"warning: private key {tmp_path / 'plain'} is not encrypted; --password-env KEY_PW"
        " is ignored\n"
        f"error: cannot connect to {url}: connection refused (is the hub running?)\n"
    )


def test_cli_keygen_fingerprint(tmp_path: Path) -> None:
    env = {"KEY_PW": "s3cret"}
    made = _run("keygen", "--out", "enc", "--password-env", "KEY_PW", cwd=tmp_path, env=env)
    fingerprint = made.stdout.strip()
    assert fingerprint.startswith("SHA256:")
    for args, extra in (
        (["enc.pub"], {}),
        (["enc", "--password-env", "KEY_PW"], env),
        (["enc"], {}),  # encrypted: read from enc.pub
    ):
        result = _run("keygen", "--fingerprint", *args, cwd=tmp_path, env=extra)
        assert (result.returncode, result.stdout) == (0, fingerprint + "\n"), result.stderr
    assert result.stderr == f"read from {tmp_path / 'enc.pub'} (the private key is encrypted)\n"
    os.remove(tmp_path / "enc.pub")
    result = _run("keygen", "--fingerprint", "enc", cwd=tmp_path)
    assert result.returncode == 1
    assert "give its password with --password-env VAR" in result.stderr
    result = _run("keygen", "--fingerprint", "nothere", cwd=tmp_path)
    assert result.stderr == f"error: key file not found: {tmp_path / 'nothere'}\n"
    assert not (tmp_path / "nothere").exists()
    result = _run("keygen", cwd=tmp_path)
    assert result.returncode == 2
    assert "one of the arguments --out --fingerprint is required" in result.stderr


def test_cli_auth_failure_gives_a_hint_not_a_class_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "k").write_bytes(generate_private_key().to_pem())

    async def run() -> int:
        async with open_hub(port=0, db=str(tmp_path / "hub.db")) as hub:
            args: list[str] = ["publish", "--url", str(hub.url), "--tenant", "acme", "--agent", "stranger",
                    "--key", str(tmp_path / "k"), "x.y", "1"]  # fmt: skip
            code: int = await trio.to_thread.run_sync(main, args)
            return code

    assert trio.run(run) == 1
    assert capsys.readouterr().err == (
        "error: the hub refused agent 'stranger' of tenant 'acme': unknown agent or signature"
        " does not verify\n"
        "hint: check 'artcafe-trio agents list --tenant acme' on the hub and the key's"
        f" fingerprint ('artcafe-trio keygen --fingerprint {tmp_path / 'k'}')\n"
    )


def test_cli_untrusted_certificate_names_cafile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import trustme

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    (tmp_path / "k").write_bytes(generate_private_key().to_pem())

    async def run() -> int:
        async with open_hub(port=0, ssl_context=context) as hub:
            args: list[str] = ["publish", "--url", str(hub.url), "--tenant", "acme",
                               "--agent", "a", "--key", str(tmp_path / "k"), "x.y", "1"]  # fmt: skip
            code: int = await trio.to_thread.run_sync(main, args)
            return code

    assert trio.run(run) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the hub's TLS certificate does not verify: ")
    assert err.endswith(" (pass --cafile to trust its CA)\n")
    assert err.count("\n") == 1
