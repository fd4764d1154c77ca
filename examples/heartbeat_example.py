"""A production monitoring agent on ``HeartbeatAgent``.

Its heartbeats keep its presence honest (a hung or crashed agent is marked
offline after HEARTBEAT_INTERVAL x 3), it reconnects by itself, and it:

- answers ``system.health`` with its connection health: as a reply when the
  message is a request, otherwise by publishing to ``health.response``;
- logs ``system.broadcast`` messages;
- obeys ``{"command": "ping" | "status" | "stop"}`` on ``agents.<AGENT_ID>.commands``;
- publishes a status report to ``monitoring.status`` every STATUS_INTERVAL seconds.

Run it against a hub::

    artcafe-trio keygen --out monitor-1.pem
    artcafe-trio agents add --create --tenant acme --agent monitor-1 --public-key monitor-1.pem.pub
    artcafe-trio hub &
    AGENT_ID=monitor-1 ORGANIZATION_ID=acme PRIVATE_KEY_PATH=monitor-1.pem \\
        ARTCAFE_URL=ws://127.0.0.1:8765 python examples/heartbeat_example.py

Optional: HEARTBEAT_INTERVAL (seconds, default 30), STATUS_INTERVAL (default 60),
LOG_LEVEL (default INFO). Exit codes: 0 after Ctrl+C, SIGTERM or a ``stop``
command (the agent left the hub gracefully), 1 if the hub refused the key or
stayed unreachable for 10 reconnect attempts, 2 for a configuration error.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from artcafe_trio import (
    AgentClosed,
    ArtcafeError,
    AuthenticationError,
    HeartbeatAgent,
    Message,
    ReconnectFailed,
)

log = logging.getLogger("heartbeat_example")


class ConfigError(Exception):
    """A missing or invalid environment variable."""


@attrs.frozen
class Config:
    agent_id: str
    organization_id: str
    private_key_path: str
    url: str
    heartbeat_interval: float = 30.0
    status_interval: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        required = ("AGENT_ID", "ORGANIZATION_ID", "PRIVATE_KEY_PATH")
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise ConfigError(f"set the environment variable(s) {', '.join(missing)}")
        return cls(
            agent_id=env["AGENT_ID"],
            organization_id=env["ORGANIZATION_ID"],
            private_key_path=env["PRIVATE_KEY_PATH"],
            url=env.get("ARTCAFE_URL") or "ws://127.0.0.1:8765",
            heartbeat_interval=_seconds(env, "HEARTBEAT_INTERVAL", 30.0),
            status_interval=_seconds(env, "STATUS_INTERVAL", 60.0),
        )


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {text!r}")
    return value


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


class MonitoringAgent:
    """The agent's handlers and status reporter, around one :class:`HeartbeatAgent`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.agent = HeartbeatAgent(
            config.agent_id,
            config.private_key_path,
            config.organization_id,
            url=config.url,
            heartbeat_interval=config.heartbeat_interval,
        )
        self.started = trio.current_time()
        self.commands_handled = 0
        self.reports_sent = 0
        self.agent.on_message("system.health")(self.on_health)
        self.agent.on_message("system.broadcast")(self.on_broadcast)
        self.agent.on_message(f"agents.{config.agent_id}.commands")(self.on_command)
        self.agent.on_reconnect(self.on_reconnect)

    async def run(self) -> None:
        """Serve until stopped, with the status reporter alongside the agent."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.report_status)
            # run() returns after stop() or SIGTERM; on Ctrl+C it leaves, then raises
            # KeyboardInterrupt.
            await self.agent.run()
            nursery.cancel_scope.cancel()

    # --- handlers: called as handler(subject, data[, message]) -------------------

    async def on_health(self, subject: str, data: Any, message: Message) -> None:
        health: dict[str, Any] = {"agent_id": self.config.agent_id, "time": _now()}
        health.update(self.agent.get_connection_health())
        await self._answer(message, health, otherwise="health.response")

    def on_broadcast(self, subject: str, data: Any, message: Message) -> None:
        log.info("broadcast from %s: %r", message.sender, data)

    async def on_command(self, subject: str, data: Any, message: Message) -> None:
        command = data.get("command") if isinstance(data, dict) else data
        self.commands_handled += 1
        log.info("command %r from %s", command, message.sender)
        if command == "ping":
            answer: dict[str, Any] = {"pong": True, "agent_id": self.config.agent_id}
        elif command == "status":
            answer = self.status_report()
        elif command == "stop":
            answer = {"stopping": True, "agent_id": self.config.agent_id}
        else:
            answer = {"error": f"unknown command {command!r}; try ping, status or stop"}
        await self._answer(message, answer)
        if command == "stop":
            await self.agent.stop()  # run() returns once handlers and publishes are done

    def on_reconnect(self) -> None:
        health = self.agent.health()
        log.warning("reconnected (%d reconnects so far)", health.total_reconnects)

    async def _answer(self, message: Message, data: Any, *, otherwise: str | None = None) -> None:
        """Reply to a request; publish to ``otherwise`` for a plain message."""
        if message.reply_to is not None:
            await self.agent.agent.reply(message, data)  # .agent: the underlying Agent
        elif otherwise is not None:
            await self.agent.publish(otherwise, data)

    # --- status reports ---------------------------------------------------------------

    def status_report(self) -> dict[str, Any]:
        health = self.agent.get_connection_health()
        return {
            "agent_id": self.config.agent_id,
            "time": _now(),
            "uptime": round(trio.current_time() - self.started, 3),
            "healthy": health["healthy"],
            "connected": health["connected"],
            "last_heartbeat_ack": health["last_heartbeat_ack"],
            "seconds_since_ack": health["seconds_since_ack"],
            "reconnect_attempts": health["reconnect_attempts"],
            "commands_handled": self.commands_handled,
            "reports_sent": self.reports_sent,
        }

    async def report_status(self) -> None:
        interval = self.config.status_interval
        try:
            while True:
                await trio.sleep(interval)
                # publish() waits while the agent reconnects: bound the wait, skip the
                # report rather than pile up stale ones.
                with trio.move_on_after(interval) as waited:
                    await self.agent.publish("monitoring.status", self.status_report())
                if waited.cancelled_caught:
                    log.warning("status report skipped: not connected for %g s", interval)
                else:
                    self.reports_sent += 1
        except AgentClosed:
            return  # the agent is stopping


def _configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception inside a (possibly nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def main() -> int:
    _configure_logging()
    try:
        config = Config.from_env()
        monitor = MonitoringAgent(config)
    except (ConfigError, ArtcafeError, ValueError) as exc:  # env, key file, agent id
        log.error("configuration error: %s", exc)
        return 2
    log.info("starting %s/%s against %s", config.organization_id, config.agent_id, config.url)
    exit_code = 0
    try:
        await monitor.run()
        log.info("stopped: %s left the hub", config.agent_id)
    except* KeyboardInterrupt:  # Ctrl+C: the agent has already left the hub
        log.info("interrupted: %s left the hub", config.agent_id)
    except* AuthenticationError as refused:
        log.error("the hub refused this agent: %s", _leaf(refused))
        exit_code = 1
    except* ReconnectFailed as gave_up:
        log.error("giving up on the hub: %s", _leaf(gave_up))
        exit_code = 1
    return exit_code


if __name__ == "__main__":
    raise SystemExit(trio.run(main))
