"""Run agents for the browser tests: ``python dashboard_agents.py URL INTERVAL TENANT:AGENT:KEY...``.

Prints ``ready`` once every agent is connected, then runs until killed (agents
reconnect by themselves after a hub restart).
"""

from __future__ import annotations

import sys

import trio

from artcafe_trio import Backoff, open_agent


async def run_one(url: str, interval: float, spec: str, ready: trio.Semaphore) -> None:
    tenant, agent, key = spec.split(":", 2)
    async with open_agent(
        url=url, tenant_id=tenant, agent_id=agent, private_key_path=key,
        # No phase jitter: the second heartbeat comes a whole interval after the first
        # (the ticking test reads a heartbeat age that must grow, not restart).
        heartbeat_interval=interval, heartbeat_jitter=0.0,
        capabilities=["resize"], metadata={"zone": tenant},
        backoff=Backoff(base=0.2, cap=1.0, max_attempts=None),
    ) as agent_:  # fmt: skip
        await agent_.wait_connected()
        ready.release()
        await trio.sleep_forever()


async def main() -> None:
    url, interval, specs = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    ready = trio.Semaphore(0)
    async with trio.open_nursery() as nursery:
        for spec in specs:
            nursery.start_soon(run_one, url, interval, spec, ready)
        for _ in specs:
            await ready.acquire()
        print("ready", flush=True)


if __name__ == "__main__":
    trio.run(main)
