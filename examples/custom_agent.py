"""A ``HeartbeatAgent`` subclass: handlers registered in ``setup()``, as in the SDK guide.

``CustomMonitoringAgent`` answers every ``system.health`` message by publishing
its connection health to ``health.response``. Configure it like
``heartbeat_example.py`` and run it::

    artcafe-trio keygen --out monitor-2.pem
    artcafe-trio agents add --create --tenant acme --agent monitor-2 --public-key monitor-2.pem.pub
    artcafe-trio hub &
    AGENT_ID=monitor-2 ORGANIZATION_ID=acme PRIVATE_KEY_PATH=monitor-2.pem \\
        ARTCAFE_URL=ws://127.0.0.1:8765 python examples/custom_agent.py

Then, as any other registered agent of the tenant (``ops`` here), ask::

    artcafe-trio publish --tenant acme --agent ops --key ops.pem system.health '{}'

and the answer appears on ``health.response`` (``artcafe-trio listen ... health.response``
as a third agent shows it).

Optional: HEARTBEAT_INTERVAL (seconds, default 30), LOG_LEVEL (default INFO).
Exit codes: 0 after Ctrl+C or SIGTERM (the agent left the hub gracefully), 1 if
the hub refused the key or stayed unreachable, 2 for a configuration error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import trio

from artcafe_trio import ArtcafeError, AuthenticationError, HeartbeatAgent, ReconnectFailed

log = logging.getLogger("custom_agent")


class CustomMonitoringAgent(HeartbeatAgent):
    """Publishes its connection health to ``health.response`` on every ``system.health``."""

    async def setup(self) -> None:
        started = trio.current_time()

        @self.on_message("system.health")
        async def health_check(subject: str, data: Any) -> None:
            health = self.get_connection_health()
            await self.publish(
                "health.response",
                {
                    "agent_id": self.agent_id,
                    "healthy": health["healthy"],
                    "last_heartbeat": health["last_heartbeat_ack"],  # ISO-8601, or None
                    "seconds_since_ack": health["seconds_since_ack"],
                    # The guide's "uptime" was seconds_since_ack; this is the real uptime.
                    "uptime": round(trio.current_time() - started, 3),
                },
            )

    async def run(self) -> None:
        await self.setup()
        await super().run()


def agent_from_env(env: Mapping[str, str] = os.environ) -> CustomMonitoringAgent:
    """Build the agent from AGENT_ID, ORGANIZATION_ID, PRIVATE_KEY_PATH, ARTCAFE_URL and
    HEARTBEAT_INTERVAL. Raises ``KeyError`` or ``ValueError`` for bad settings and
    ``KeyLoadError`` for an unusable key file."""
    return CustomMonitoringAgent(
        agent_id=env["AGENT_ID"],
        private_key_path=env["PRIVATE_KEY_PATH"],
        organization_id=env["ORGANIZATION_ID"],
        url=env.get("ARTCAFE_URL") or "ws://127.0.0.1:8765",
        heartbeat_interval=float(env.get("HEARTBEAT_INTERVAL") or 30),
    )


async def main() -> int:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        agent = agent_from_env()
    except KeyError as exc:
        log.error("configuration error: set the environment variable %s", exc)
        return 2
    except (ValueError, ArtcafeError) as exc:
        log.error("configuration error: %s", exc)
        return 2
    try:
        await agent.run()  # until stop(), SIGTERM, or Ctrl+C (which leaves, then raises)
    except KeyboardInterrupt:
        pass
    except (AuthenticationError, ReconnectFailed) as failed:
        log.error("%s", failed)
        return 1
    log.info("stopped: %s left the hub", agent.agent_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(trio.run(main))
