"""The examples, run for real against a hub on 127.0.0.1 (port 0).

Long-running examples run as subprocesses (``python examples/X.py``, configured
through the environment) and are stopped with SIGINT, which must make them
leave the hub and exit 0; the others are imported and driven in-process.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trio_websocket

from artcafe_trio import (
    Agent,
    Hub,
    HubConfig,
    Message,
    PrivateKey,
    generate_private_key,
    open_agent,
    open_hub,
)
from artcafe_trio.protocol import Auth, Challenge, Welcome, decode, encode

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TENANT = "acme"

WAIT = 10.0  # seconds: the most any single expected event may take

pytestmark = pytest.mark.timeout(30)


# --- helpers ---------------------------------------------------------------------------


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def running_hub(tmp_path: Path, **config: Any) -> AsyncIterator[Hub]:
    async with open_hub(port=0, db=tmp_path / "hub.db", config=HubConfig(**config)) as hub:
        yield hub


def register(hub: Hub, tmp_path: Path, agent_id: str) -> tuple[Path, PrivateKey]:
    """Generate a key, write it to ``tmp_path/<agent_id>.pem`` and register its public key."""
    key = generate_private_key()
    path = tmp_path / f"{agent_id}.pem"
    path.write_bytes(key.to_pem())
    hub.registry.add_key(TENANT, agent_id, key.public_key)
    return path, key


def agent_env(hub: Hub, key_path: Path, agent_id: str, **extra: str) -> dict[str, str]:
    assert hub.url is not None
    return {
        "ARTCAFE_URL": hub.url,
        "AGENT_ID": agent_id,
        "ORGANIZATION_ID": TENANT,
        "PRIVATE_KEY_PATH": str(key_path),
        "HEARTBEAT_INTERVAL": "1",
        **extra,
    }


@asynccontextmanager
async def observer(hub: Hub, tmp_path: Path, agent_id: str = "observer") -> AsyncIterator[Agent]:
    """A test agent on the same hub and tenant."""
    _, key = register(hub, tmp_path, agent_id)
    async with open_agent(
        agent_id=agent_id, tenant_id=TENANT, private_key=key, url=hub.url, heartbeat_interval=1
    ) as agent:
        yield agent


class Inbox:
    """A handler that collects messages; ``await inbox.next(...)`` takes the next match."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Message](1000)

    def __call__(self, subject: str, data: Any, message: Message) -> None:
        self._send.send_nowait(message)

    async def next(self, predicate: Callable[[Message], bool] = lambda m: True) -> Message:
        """The next message matching ``predicate`` (within ``WAIT`` seconds)."""
        with trio.fail_after(WAIT):
            async for message in self._receive:
                if predicate(message):
                    return message
        raise AssertionError("unreachable")  # pragma: no cover


class Lines:
    """Output lines collected as they come; ``await lines.wait_for(text)``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ended = False
        self._changed = trio.Event()

    def add(self, line: str) -> None:
        self.lines.append(line)
        self._changed.set()
        self._changed = trio.Event()

    def end(self) -> None:
        self.ended = True
        self._changed.set()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    async def wait_for(self, text: str) -> str:
        """The first line containing ``text`` (within ``WAIT`` seconds)."""
        with trio.fail_after(WAIT):
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self.ended:
                    raise AssertionError(f"ended before {text!r} appeared:\n{self.text}")
                await self._changed.wait()


class LogLines(Lines, logging.Handler):
    """Collects one logger's records (emitted on the trio thread) as lines."""

    def __init__(self) -> None:
        Lines.__init__(self)
        logging.Handler.__init__(self, level=logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        self.add(f"{record.levelname} {record.getMessage()}")


@contextmanager
def watch_log(name: str) -> Iterator[LogLines]:
    lines = LogLines()
    logger = logging.getLogger(name)
    old_level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(lines)
        logger.setLevel(old_level)


class Script(Lines):
    """A running example script; its stdout and stderr are collected line by line."""

    def __init__(self, process: trio.Process) -> None:
        super().__init__()
        self.process = process

    async def pump(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            *complete, buffer = (buffer + chunk).split(b"\n")
            for line in complete:
                self.add(line.decode(errors="replace"))
        if buffer:
            self.add(buffer.decode(errors="replace"))
        self.end()

    async def interrupt(self) -> int:
        """Ctrl+C: send SIGINT and return the exit code."""
        self.process.send_signal(signal.SIGINT)
        return await self.wait()

    async def wait(self) -> int:
        with trio.fail_after(WAIT):
            return await self.process.wait()


async def start_script(nursery: trio.Nursery, name: str, env: dict[str, str]) -> Script:
    """Start ``python examples/<name>.py``; cancelling ``nursery`` kills it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ARTCAFE_", "ALERT_"))}
    full_env.update(PYTHONUNBUFFERED="1", LOG_LEVEL="INFO", **env)
    process: trio.Process = await nursery.start(
        functools.partial(
            trio.run_process,
            [sys.executable, str(EXAMPLES / f"{name}.py")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            check=False,
        )
    )
    script = Script(process)
    nursery.start_soon(script.pump)
    return script


def _from(agent_id: str) -> Callable[[Message], bool]:
    return lambda m: isinstance(m.data, dict) and m.data.get("agent_id") == agent_id


# --- heartbeat_example.py ----------------------------------------------------------------


async def test_heartbeat_example_monitors_and_leaves_on_ctrl_c(tmp_path: Path) -> None:
    async with running_hub(tmp_path) as hub, observer(hub, tmp_path) as watcher:
        key_path, _ = register(hub, tmp_path, "monitor-1")
        status, health, presence = Inbox(), Inbox(), Inbox()
        await watcher.subscribe("monitoring.status", status)
        await watcher.subscribe("health.response", health)
        await watcher.subscribe("$presence.monitor-1", presence)
        async with trio.open_nursery() as nursery:
            env = agent_env(hub, key_path, "monitor-1", STATUS_INTERVAL="0.3")
            script = await start_script(nursery, "heartbeat_example", env)

            # A periodic status report arrives (so its subscriptions are in place too).
            report = (await status.next(_from("monitor-1"))).data
            assert report["connected"] is True
            assert report["reconnect_attempts"] == 0
            later = (await status.next(_from("monitor-1"))).data
            assert later["reports_sent"] >= 1

            # system.health as a plain message: answered on health.response. The first
            # heartbeat ACK may still be on its way: ask until it reports healthy.
            with trio.fail_after(WAIT):
                while True:
                    await watcher.publish("system.health", {})
                    with trio.move_on_after(1):
                        answer = (await health.next(_from("monitor-1"))).data
                        if answer["healthy"]:
                            break
            assert answer["connected"] is True
            assert answer["last_heartbeat_ack"] is not None

            # system.health as a request: answered by a reply, not on health.response.
            with trio.fail_after(WAIT):
                reply = await watcher.request("system.health", {})
            assert reply["agent_id"] == "monitor-1"
            assert reply["healthy"] is True

            # Commands on the agent's own subject.
            with trio.fail_after(WAIT):
                pong = await watcher.request("agents.monitor-1.commands", {"command": "ping"})
                unknown = await watcher.request("agents.monitor-1.commands", {"command": "?"})
            assert pong == {"pong": True, "agent_id": "monitor-1"}
            assert "unknown command" in unknown["error"]

            await watcher.publish("system.broadcast", {"note": "maintenance at noon"})
            await script.wait_for("maintenance at noon")

            # Ctrl+C: the agent leaves gracefully and the script exits 0.
            assert await script.interrupt() == 0, script.text
        event = (await presence.next(lambda m: m.data["status"] == "offline")).data
        assert event["reason"] == "left"
        assert "interrupted: monitor-1 left the hub" in script.text
        assert "left the hub" in script.text


async def test_heartbeat_example_stop_command_and_refused_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: ``main()`` returns 0 after a ``stop`` command, 1 for an unknown key."""
    example = load_example("heartbeat_example")
    async with running_hub(tmp_path) as hub, observer(hub, tmp_path) as watcher:
        key_path, _ = register(hub, tmp_path, "monitor-2")
        for name, value in agent_env(hub, key_path, "monitor-2").items():
            monkeypatch.setenv(name, value)
        codes: list[int] = []

        async def run_main() -> None:
            codes.append(await example.main())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_main)
            with trio.fail_after(WAIT):
                while True:  # until its subscriptions are in place
                    with trio.move_on_after(0.5):
                        answer = await watcher.request(
                            "agents.monitor-2.commands", {"command": "stop"}
                        )
                        break
        assert answer == {"stopping": True, "agent_id": "monitor-2"}
        assert codes == [0]

        # A key the hub does not know: AuthenticationError, logged, exit code 1.
        stranger = tmp_path / "stranger.pem"
        stranger.write_bytes(generate_private_key().to_pem())
        monkeypatch.setenv("PRIVATE_KEY_PATH", str(stranger))
        with trio.fail_after(WAIT):
            assert await example.main() == 1

        monkeypatch.delenv("AGENT_ID")
        assert await example.main() == 2


# --- custom_agent.py ---------------------------------------------------------------------


async def test_custom_agent_answers_health(tmp_path: Path) -> None:
    example = load_example("custom_agent")
    async with running_hub(tmp_path) as hub, observer(hub, tmp_path) as watcher:
        key_path, _ = register(hub, tmp_path, "custom-1")
        health = Inbox()
        await watcher.subscribe("health.response", health)
        agent = example.agent_from_env(agent_env(hub, key_path, "custom-1"))
        assert isinstance(agent, example.CustomMonitoringAgent)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            with trio.fail_after(WAIT):
                while True:
                    await watcher.publish("system.health", {})
                    with trio.move_on_after(0.5):
                        answer = (await health.next(_from("custom-1"))).data
                        if answer["healthy"]:
                            break
            await agent.stop()  # run() returns; the nursery ends
        assert set(answer) == {
            "agent_id", "healthy", "last_heartbeat", "seconds_since_ack", "uptime"
        }  # fmt: skip
        assert answer["last_heartbeat"] is not None
        assert 0 <= answer["seconds_since_ack"] < 3
        assert answer["uptime"] >= 0
        records = {r.agent_id: r for r in await watcher.presence()}
        assert records["custom-1"].status == "offline"
        assert records["custom-1"].reason == "left"


async def test_custom_agent_main_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    example = load_example("custom_agent")
    for name in ("AGENT_ID", "ORGANIZATION_ID", "PRIVATE_KEY_PATH", "ARTCAFE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert await example.main() == 2
    monkeypatch.setenv("AGENT_ID", "a")
    monkeypatch.setenv("ORGANIZATION_ID", "acme")
    monkeypatch.setenv("PRIVATE_KEY_PATH", "/nonexistent/key.pem")
    assert await example.main() == 2


# --- alerting_agent.py --------------------------------------------------------------------

ALERT_SCRIPT = (
    "import os, pathlib; "
    "who = os.environ['TENANT_ID'] + '/' + os.environ['AGENT_ID'] + ' ' + os.environ['REASON']; "
    "pathlib.Path(os.environ['ALERT_FILE']).write_text(who); "
    "print('alert command ran for', who, flush=True)"
)


async def test_alerting_agent_alerts_when_an_agent_is_killed(tmp_path: Path) -> None:
    async with running_hub(tmp_path, disconnect_grace=0.2) as hub:
        alerter_key, _ = register(hub, tmp_path, "alerter")
        victim_key, _ = register(hub, tmp_path, "victim")
        alert_file = tmp_path / "alert.txt"
        command = f"{shlex.quote(sys.executable)} -c {shlex.quote(ALERT_SCRIPT)}"
        env = agent_env(
            hub, alerter_key, "alerter",
            ALERT_COMMAND=command, ALERT_FILE=str(alert_file), ALERT_TIMEOUT="10",
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            alerter = await start_script(nursery, "alerting_agent", env)
            await alerter.wait_for("watching presence of tenant acme")

            # A graceful leave is not an incident: logged, no alert.
            async with observer(hub, tmp_path, "polite"):
                await alerter.wait_for("acme/polite is online")
            await alerter.wait_for("acme/polite left gracefully (left)")

            # A monitoring agent is killed (SIGKILL: no goodbye, the socket just dies).
            victim_env = agent_env(hub, victim_key, "victim")
            victim = await start_script(nursery, "heartbeat_example", victim_env)
            await alerter.wait_for("acme/victim is online")
            await victim.wait_for("acme/victim connected (session")
            # Kill it while the hub is not writing to it: the hub has a race there (the
            # reader sees the close mid-write and the session then lingers until the
            # heartbeat timeout), reported separately; this test is about the alerter.
            await trio.sleep(0.3)
            victim.process.kill()
            assert await victim.wait() == -signal.SIGKILL
            line = await alerter.wait_for("ALERT")
            assert "WARNING" in line
            assert "agent acme/victim is offline (disconnected)" in line

            # ALERT_COMMAND ran (its output is the alerter's) with the offline agent's
            # identity in its environment.
            await alerter.wait_for("alert command ran for acme/victim disconnected")
            assert alert_file.read_text() == "acme/victim disconnected"

            assert await alerter.interrupt() == 0, alerter.text
        assert "ALERT: agent acme/polite" not in alerter.text
        assert "stopped: alerter left the hub" in alerter.text


async def test_alerting_agent_alerts_on_heartbeat_timeout(tmp_path: Path) -> None:
    """In-process: a hung agent (socket open, heartbeats stopped) is reported as
    ``timeout``, and an alert command that hangs is killed after ALERT_TIMEOUT."""
    example = load_example("alerting_agent")
    async with running_hub(tmp_path) as hub:
        key_path, _ = register(hub, tmp_path, "alerter")
        _, hung_key = register(hub, tmp_path, "hung")
        env = agent_env(
            hub, key_path, "alerter",
            ALERT_COMMAND=f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)'",
            ALERT_TIMEOUT="0.5",
        )  # fmt: skip
        with watch_log("alerting_agent") as log:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(example.watch, example.Config.from_env(env))
                await log.wait_for("watching presence of tenant acme")
                async with silent_session(hub, "hung", hung_key, heartbeat_interval=0.5):
                    alert = await log.wait_for("ALERT")
                    killed = await log.wait_for("alert command killed")
                nursery.cancel_scope.cancel()
    assert alert == "WARNING ALERT: agent acme/hung is offline (timeout)"
    assert killed == "ERROR alert command killed after 0.5 s"


@asynccontextmanager
async def silent_session(
    hub: Hub, agent_id: str, key: PrivateKey, *, heartbeat_interval: float
) -> AsyncIterator[None]:
    """An agent that authenticates, then hangs: its socket stays open, nothing is sent."""
    assert hub.url is not None
    url = f"{hub.url}/api/v1/ws/agent/{agent_id}?tenant_id={TENANT}"
    async with trio_websocket.open_websocket_url(url) as ws:
        challenge = decode(await ws.get_message())
        assert isinstance(challenge, Challenge)
        auth = Auth(
            agent_id=agent_id,
            tenant_id=TENANT,
            algorithm=key.algorithm,
            signature=key.sign_auth(tenant_id=TENANT, agent_id=agent_id, nonce=challenge.nonce),
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout_multiplier=1.5,
        )
        await ws.send_message(encode(auth))
        assert isinstance(decode(await ws.get_message()), Welcome)
        yield


# --- request_reply.py ---------------------------------------------------------------------


def test_request_reply_runs_with_no_setup() -> None:
    """``python examples/request_reply.py`` with an empty configuration starts its own hub."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARTCAFE_")}
    for name in ("WORKER_KEY_PATH", "CLIENT_KEY_PATH"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "request_reply.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["double(1) = 2", "double(21) = 42", "double(2.5) = 5.0"]


async def test_request_reply_against_a_running_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("request_reply")
    async with running_hub(tmp_path) as hub, observer(hub, tmp_path) as watcher:
        worker_path, _ = register(hub, tmp_path, "doubler")
        client_path, _ = register(hub, tmp_path, "asker")
        assert hub.url is not None
        monkeypatch.setenv("ARTCAFE_URL", hub.url)
        monkeypatch.setenv("ORGANIZATION_ID", TENANT)
        monkeypatch.setenv("WORKER_KEY_PATH", str(worker_path))
        monkeypatch.setenv("CLIENT_KEY_PATH", str(client_path))
        with trio.fail_after(WAIT):
            assert await example.main() == 0
        assert "double(21) = 42" in capsys.readouterr().out
        records = {r.agent_id: r for r in await watcher.presence()}
        # Both agents left gracefully at the end of their blocks.
        assert (records["doubler"].status, records["doubler"].reason) == ("offline", "left")
        assert (records["asker"].status, records["asker"].reason) == ("offline", "left")

        # A worker that never answers: the client's deadline fires, main() returns 1.
        async def slow_double(url: str, *args: Any, **kwargs: Any) -> None:
            async with open_agent(
                agent_id="doubler", tenant_id=TENANT, private_key=args[2], url=url
            ) as worker:
                await worker.subscribe("math.double", lambda s, d: None)
                kwargs["task_status"].started(worker)
                await trio.sleep_forever()

        monkeypatch.setattr(example, "serve_doubler", slow_double)
        monkeypatch.setattr(example, "REQUEST_DEADLINE", 0.3)
        with trio.fail_after(WAIT):
            assert await example.main() == 1
