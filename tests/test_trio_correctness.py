"""Trio correctness: user code runs without KI protection, blocking calls leave the event
loop, production modules never import ``trio.testing``, and collapsed exception groups
leave no context cycle."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from artcafe_trio import (
    AuthenticationError,
    ConnectFailed,
    Registry,
    generate_private_key,
    open_agent,
    open_hub,
    serve_hub,
)
from artcafe_trio._util import collapse_exception_groups, flatten_exceptions
from artcafe_trio.agent import _agent as agent_module
from artcafe_trio.agent import _transport as transport_module
from artcafe_trio.hub import _serve as hub_module
from artcafe_trio.testing import TestHub, open_test_hub

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- KI protection


@pytest.mark.parametrize("concurrent", [1, 3])
async def test_handlers_run_without_ki_protection(
    test_hub: TestHub, autojump_clock: trio.abc.Clock, concurrent: int
) -> None:
    seen: dict[str, bool] = {}
    done = trio.Event()
    async with test_hub.open_agent("a1", max_concurrent_handlers=concurrent) as agent:

        @agent.on_message("job")
        def sync_handler(subject: str, data: Any) -> None:
            seen["sync"] = trio.lowlevel.currently_ki_protected()

        @agent.on_message("job")
        async def async_handler(subject: str, data: Any) -> None:
            await trio.lowlevel.checkpoint()
            seen["async"] = trio.lowlevel.currently_ki_protected()
            done.set()

        await agent.publish("job", 1)
        with trio.fail_after(5):
            await done.wait()
    assert seen == {"sync": False, "async": False}


async def test_on_reconnect_callbacks_run_without_ki_protection(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    seen: dict[str, bool] = {}
    done = trio.Event()
    async with test_hub.open_agent("a1") as agent:

        @agent.on_reconnect
        def sync_callback() -> None:
            seen["sync"] = trio.lowlevel.currently_ki_protected()

        @agent.on_reconnect
        async def async_callback() -> None:
            await trio.lowlevel.checkpoint()
            seen["async"] = trio.lowlevel.currently_ki_protected()
            done.set()

        test_hub.hub.close_all(1012, "restart")
        with trio.fail_after(120):
            await done.wait()
        # The agent's own machinery is still protected around the user's code.
        assert agent.health().connected
    assert seen == {"sync": False, "async": False}


async def test_a_custom_dial_runs_without_ki_protection(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    seen: list[bool] = []

    async def dial(nursery: trio.Nursery, resource: str) -> Any:
        seen.append(trio.lowlevel.currently_ki_protected())
        return await test_hub.dial(nursery, resource)

    async with test_hub.open_agent("a1", dial=dial) as agent:
        test_hub.hub.close_all(1012, "restart")  # the reconnect dials again
        with trio.fail_after(120):
            while len(seen) < 2 or not agent.health().connected:
                await trio.sleep(0.1)
    assert seen == [False, False]


CTRL_C_IN_HANDLER = textwrap.dedent(
    """
    import signal
    import trio
    from artcafe_trio.testing import open_test_hub

    reached = []

    async def main():
        async with open_test_hub() as hub:
            async with hub.open_agent("a1") as agent:
                @agent.on_message("job")
                def cpu_bound(subject, data):
                    signal.raise_signal(signal.SIGINT)  # Ctrl+C while the handler runs
                    reached.append("handler went on after Ctrl+C")

                await agent.publish("job", 1)
                await trio.sleep(10)

    try:
        trio.run(main)
    except KeyboardInterrupt:
        print("interrupted", reached)
    else:
        print("not interrupted", reached)
    """
)


def test_ctrl_c_interrupts_a_running_handler() -> None:
    # Under KI protection trio would defer the KeyboardInterrupt to the main task and the
    # handler would run on; unprotected, it is raised inside the handler at once.
    result = subprocess.run(
        [sys.executable, "-c", CTRL_C_IN_HANDLER],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "interrupted []", result.stderr


# --------------------------------------------------------------------------- worker threads


def _recording(calls: list[str], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function``, recording under ``name`` whether it ran on the trio thread."""
    trio_thread = threading.current_thread()

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        on_loop = threading.current_thread() is trio_thread
        calls.append(f"{name} on the trio thread" if on_loop else f"{name} in a worker")
        return function(*args, **kwargs)

    return wrapper


async def test_open_agent_loads_the_key_file_in_a_worker_thread(
    test_hub: TestHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = test_hub.register("test", "a1")
    path = tmp_path / "a1.pem"
    path.write_bytes(key.to_pem("secret"))
    calls: list[str] = []
    loader = _recording(calls, "load_private_key", agent_module.load_private_key)
    monkeypatch.setattr(agent_module, "load_private_key", loader)
    async with open_agent(
        agent_id="a1",
        tenant_id="test",
        private_key_path=path,
        private_key_password="secret",
        dial=test_hub.dial,
    ) as agent:
        assert agent.health().connected
    assert calls == ["load_private_key in a worker"]


async def test_open_agent_checks_its_arguments_before_loading_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(agent_module, "load_private_key", _recording(calls, "load", print))
    with pytest.raises(ValueError, match="exactly one"):
        async with open_agent(
            agent_id="a1", tenant_id="t", private_key_path="k", private_key=generate_private_key()
        ):
            pass
    with pytest.raises(ValueError, match="agent_id"):
        async with open_agent(agent_id="", tenant_id="t", private_key_path="k"):
            pass
    assert calls == []


async def test_a_wss_agent_builds_its_default_tls_context_in_a_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(
        transport_module,
        "_default_client_context",
        _recording(calls, "create_default_context", transport_module._default_client_context),
    )
    async with open_hub() as hub:
        assert hub.url is not None
        with pytest.raises(ConnectFailed, match="TLS handshake failed"):
            async with open_agent(
                agent_id="a1",
                tenant_id="t",
                private_key=generate_private_key(),
                url=hub.url.replace("ws://", "wss://"),
                retry_first_connect=False,
            ):
                pytest.fail("must not connect")
    assert calls == ["create_default_context in a worker"]


async def test_serve_hub_opens_closes_and_writes_files_in_worker_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_open, real_close = Registry.open.__func__, Registry.close  # type: ignore[attr-defined]
    opener = _recording(calls, "Registry.open", real_open)
    monkeypatch.setattr(Registry, "open", classmethod(opener))
    monkeypatch.setattr(Registry, "close", _recording(calls, "Registry.close", real_close))
    monkeypatch.setattr(
        hub_module,
        "write_private_file",
        _recording(calls, "write_private_file", hub_module.write_private_file),
    )
    monkeypatch.setattr(
        hub_module,
        "_remove_admin_file",
        _recording(calls, "_remove_admin_file", hub_module._remove_admin_file),
    )
    admin_file = tmp_path / "admin.json"
    async with trio.open_nursery() as nursery:
        hub = await nursery.start(
            lambda task_status: serve_hub(
                db=tmp_path / "registry.db",
                port=None,
                admin_file=admin_file,
                task_status=task_status,
            )
        )
        assert json.loads(admin_file.read_text())["token"] == hub.admin_token
        nursery.cancel_scope.cancel()
    assert not admin_file.exists()
    assert calls == [
        "Registry.open in a worker",
        "write_private_file in a worker",
        "_remove_admin_file in a worker",
        "Registry.close in a worker",
    ]


async def test_serve_hub_keeps_an_in_memory_registry_inline(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    # No file, no blocking: the in-memory registry stays on the loop (as Hub._db does), so
    # autojump_clock tests never wait for a thread.
    calls: list[str] = []
    opener = _recording(calls, "Registry.open", Registry.open.__func__)  # type: ignore[attr-defined]
    monkeypatch.setattr(Registry, "open", classmethod(opener))
    monkeypatch.setattr(Registry, "close", _recording(calls, "Registry.close", Registry.close))
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_hub(port=None, task_status=task_status))
        nursery.cancel_scope.cancel()
    assert calls == ["Registry.open on the trio thread", "Registry.close on the trio thread"]


# --------------------------------------------------------------------------- no trio.testing

NO_TEST_KIT_SCRIPT = textwrap.dedent(
    """
    import sys
    import artcafe_trio
    for name in artcafe_trio.__all__:
        getattr(artcafe_trio, name)
    import artcafe_trio.agent._agent, artcafe_trio.hub._hub, artcafe_trio.demo._main, artcafe_trio.cli._main
    import artcafe_trio.agent._compat
    assert "artcafe_trio.hub._hub" in sys.modules and "artcafe_trio.demo._main" in sys.modules
    leaked = sorted(
        name for name in sys.modules
        if name == "trio.testing" or name.startswith("trio.testing.")
        or name == "artcafe_trio.testing"
    )
    assert not leaked, leaked
    print("no test kit")
    """
)


def test_production_modules_do_not_import_trio_testing_or_the_test_kit() -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_TEST_KIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "no test kit"


async def test_the_test_kit_connects_in_memory_through_serve_stream(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_test_hub(handshake_timeout=2.0) as hub:
        stream = await hub.connect_in_memory(remote="10.9.9.9")
        await trio.sleep(0.1)
        assert hub.hub.unauthenticated.count("10.9.9.9") == 1
        with trio.fail_after(5):
            assert await stream.receive_some() == b""  # no upgrade within the deadline
        assert hub.hub.stats.handshake_timeouts == 1
        await stream.aclose()


# --------------------------------------------------------------------------- exception groups


def _context_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    context = exc.__context__
    while context is not None and context not in chain:
        chain.append(context)
        context = context.__context__
    return chain


def _assert_no_cycle_through_a_group(exc: BaseException) -> None:
    for context in _context_chain(exc):
        if isinstance(context, BaseExceptionGroup):
            assert exc not in flatten_exceptions(context), "context cycle through its group"


async def test_collapsed_error_keeps_cause_and_context_without_a_cycle() -> None:
    cause = OSError("the root cause")
    handled = RuntimeError("handled while failing")

    async def fail() -> None:
        try:
            raise handled
        except RuntimeError:
            raise ValueError("the error") from cause

    async def cancelled_sibling() -> None:
        await trio.sleep_forever()

    with pytest.raises(ValueError, match="the error") as info:
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancelled_sibling)
                nursery.start_soon(fail)
    error = info.value
    _assert_no_cycle_through_a_group(error)
    assert error.__cause__ is cause
    assert error.__context__ is handled  # its own context, not the group
    assert error.__suppress_context__


async def test_collapsed_error_without_context_gets_none() -> None:
    async def fail() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError) as info:
        with collapse_exception_groups():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail)
                nursery.start_soon(fail)
    assert info.value.__context__ is None
    assert info.value.__cause__ is None


async def test_public_api_errors_have_no_context_cycle(
    test_hub: TestHub, autojump_clock: trio.abc.Clock
) -> None:
    stranger = test_hub.register("other-tenant", "a1")
    with pytest.raises(AuthenticationError) as info:
        async with test_hub.open_agent("a1", private_key=stranger):
            pytest.fail("must not connect")
    _assert_no_cycle_through_a_group(info.value)
    assert not any(isinstance(c, BaseExceptionGroup) for c in _context_chain(info.value))
