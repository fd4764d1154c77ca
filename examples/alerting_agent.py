"""An alerting agent: raises an alert the moment another agent of its tenant goes offline.

It subscribes to ``$presence.>`` (the hub's presence events) and, when an agent
goes offline unexpectedly (reason ``timeout``: it hung; ``disconnected``: its
connection died without a goodbye), logs a WARNING line starting with ``ALERT``
and, if ALERT_COMMAND is set, runs that command (split with ``shlex``; no
shell) with AGENT_ID, TENANT_ID and REASON of the offline agent in its
environment, killed after ALERT_TIMEOUT seconds (default 30). A graceful leave
(reason ``left``) is logged at INFO; set ALERT_ON_LEFT=1 to alert on it too.

Run it like ``heartbeat_example.py`` (same AGENT_ID, ORGANIZATION_ID,
PRIVATE_KEY_PATH, ARTCAFE_URL, HEARTBEAT_INTERVAL variables)::

    artcafe-trio keygen --out alerter.pem
    artcafe-trio agents add --create --tenant acme --agent alerter --public-key alerter.pem.pub
    AGENT_ID=alerter ORGANIZATION_ID=acme PRIVATE_KEY_PATH=alerter.pem \\
        ALERT_COMMAND='notify-send "agent down"' python examples/alerting_agent.py

Exit codes: 0 after Ctrl+C or SIGTERM (the agent left the hub gracefully), 1 if
the hub refused the key or stayed unreachable, 2 for a configuration error.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from artcafe_trio import (
    ArtcafeError,
    AuthenticationError,
    PresenceEvent,
    ProtocolError,
    ReconnectFailed,
    open_agent,
)

log = logging.getLogger("alerting_agent")

UNEXPECTED = frozenset({"timeout", "disconnected"})


@attrs.frozen
class Config:
    agent_id: str
    organization_id: str
    private_key_path: str
    url: str
    heartbeat_interval: float = 30.0
    alert_command: list[str] | None = None
    alert_timeout: float = 30.0
    alert_on_left: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        """Read the configuration; raises ``ValueError`` with a readable message."""
        required = ("AGENT_ID", "ORGANIZATION_ID", "PRIVATE_KEY_PATH")
        missing = [name for name in required if not env.get(name)]
        if missing:
            raise ValueError(f"set the environment variable(s) {', '.join(missing)}")
        command = shlex.split(env.get("ALERT_COMMAND", ""))
        return cls(
            agent_id=env["AGENT_ID"],
            organization_id=env["ORGANIZATION_ID"],
            private_key_path=env["PRIVATE_KEY_PATH"],
            url=env.get("ARTCAFE_URL") or "ws://127.0.0.1:8765",
            heartbeat_interval=float(env.get("HEARTBEAT_INTERVAL") or 30),
            alert_command=command or None,
            alert_timeout=float(env.get("ALERT_TIMEOUT") or 30),
            alert_on_left=env.get("ALERT_ON_LEFT", "") not in ("", "0", "false", "no"),
        )


class Alerter:
    """Turns presence events into alerts; commands run in ``nursery``, so a slow one
    delays neither the next alert nor the agent."""

    def __init__(self, config: Config, nursery: trio.Nursery) -> None:
        self.config = config
        self.nursery = nursery

    def on_presence(self, subject: str, data: Any) -> None:
        try:
            event = PresenceEvent.from_data(data)
        except ProtocolError as exc:
            log.warning("ignoring a malformed presence event on %s: %s", subject, exc)
            return
        who = f"{event.tenant_id}/{event.agent_id}"
        if event.agent_id == self.config.agent_id:
            return  # our own presence: we are obviously still here
        if event.status == "online":
            log.info("%s is online", who)
        elif event.reason in UNEXPECTED or self.config.alert_on_left:
            log.warning("ALERT: agent %s is offline (%s)", who, event.reason)
            if self.config.alert_command is not None:
                self.nursery.start_soon(self.run_command, self.config.alert_command, event)
        else:
            log.info("%s left gracefully (%s)", who, event.reason)

    async def run_command(self, command: list[str], event: PresenceEvent) -> None:
        env = dict(os.environ)
        env.update(AGENT_ID=event.agent_id, TENANT_ID=event.tenant_id, REASON=event.reason)
        with trio.move_on_after(self.config.alert_timeout) as bounded:
            try:
                result = await trio.run_process(command, env=env, stdin=b"", check=False)
            except OSError as exc:
                log.error("alert command %r could not start: %s", command[0], exc)
                return
        if bounded.cancelled_caught:
            log.error("alert command killed after %g s", self.config.alert_timeout)
        elif result.returncode != 0:
            log.error("alert command exited with status %d", result.returncode)


async def watch(config: Config) -> None:
    """Watch the tenant's presence until Ctrl+C or SIGTERM (or cancelled)."""
    async with trio.open_nursery() as commands:
        alerter = Alerter(config, commands)
        async with open_agent(
            agent_id=config.agent_id,
            organization_id=config.organization_id,
            private_key_path=config.private_key_path,
            url=config.url,
            heartbeat_interval=config.heartbeat_interval,
        ) as agent:
            await agent.subscribe("$presence.>", alerter.on_presence)
            offline = [r.agent_id for r in await agent.presence() if r.status == "offline"]
            log.info(
                "watching presence of tenant %s%s",
                config.organization_id,
                f" (already offline: {', '.join(offline)})" if offline else "",
            )
            # Until Ctrl+C or SIGTERM; leaving the block leaves the hub gracefully. (The
            # signal is caught rather than KeyboardInterrupt: trio may raise that inside
            # the agent's own tasks, and then there is no connection to say goodbye on.)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    break


def _leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first exception inside a (possibly nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def main() -> int:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = Config.from_env()
    except ValueError as exc:
        log.error("configuration error: %s", exc)
        return 2
    exit_code = 0
    try:
        await watch(config)
        log.info("stopped: %s left the hub", config.agent_id)
    except* KeyboardInterrupt:  # a second Ctrl+C while stopping
        exit_code = 130
    except* (AuthenticationError, ReconnectFailed) as failed:
        log.error("%s", _leaf(failed))
        exit_code = 1
    except* ArtcafeError as failed:  # e.g. an unreadable key file
        log.error("%s", _leaf(failed))
        exit_code = 2
    return exit_code


if __name__ == "__main__":
    raise SystemExit(trio.run(main))
