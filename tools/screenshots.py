"""Render the dashboard screenshots in docs/img/ (light, wide and narrow).

    python tools/screenshots.py [--out docs/img] [--chromium /usr/bin/chromium] [--settle 2.5]

Starts ``artcafe-trio hub --dashboard`` on free loopback ports with a throw-away
registry, a few agents (one of which leaves and one of which is killed, so the
table, the feed and the uptime bars show both states), then drives the system
Chromium with Playwright. Needs the ``dev`` extra; never downloads a browser.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from artcafe_trio import Registry, generate_private_key
from artcafe_trio.registry._registry import PresenceChange

ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

AGENTS = """
import sys, trio
from artcafe_trio import open_agent
async def one(url, tenant, agent, key, caps, leave_after):
    async with open_agent(url=url, tenant_id=tenant, agent_id=agent, private_key_path=key,
                          heartbeat_interval=2.0, capabilities=caps,
                          metadata={"version": "1.4.2"}) as a:
        await a.wait_connected()
        await trio.sleep(leave_after)
async def main():
    url, specs = sys.argv[1], sys.argv[2:]
    async with trio.open_nursery() as n:
        for spec in specs:
            tenant, agent, key, caps, leave = spec.split(":")
            names = caps.split(",") if caps else []
            n.start_soon(one, url, tenant, agent, key, names, float(leave))
        await trio.sleep(1.0)
        print("ready", flush=True)
trio.run(main)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _example_history(layout: list[tuple[str, str, str, str, float]]) -> list[PresenceChange]:
    """24 h of made-up past transitions, so the uptime bars show something (the docs
    say so); every agent is offline a minute ago, then connects for real."""
    now = time.time()
    hour = 3600.0
    outages = {
        "planner": [],
        "resizer-1": [(20, 19.5, "timeout")],
        "resizer-2": [(14, 10, "disconnected"), (3, 2.8, "timeout")],
        "reporter": [(22, 21, "left"), (16, 15.2, "left"), (9, 8, "left"), (4, 3.5, "left")],
        "crawler": [(7, 6.6, "disconnected")],
        "indexer": [],
    }
    changes = []
    for tenant, agent, _caps, _group, _leave in layout:
        changes.append(PresenceChange(tenant, agent, "online", "connected", None, now - 25 * hour))
        for down, up, reason in outages[agent]:
            changes.append(
                PresenceChange(tenant, agent, "offline", reason, None, now - down * hour)
            )
            changes.append(
                PresenceChange(tenant, agent, "online", "connected", None, now - up * hour)
            )
        changes.append(PresenceChange(tenant, agent, "offline", "left", None, now - 60))
    return changes


def wait_for_presence(db: Path, agent: str, reason: str, *, since: float) -> None:
    """Until the hub has written ``agent`` offline with ``reason`` (after ``since``: the
    made-up history already ends with every agent offline, left)."""
    deadline = time.monotonic() + 30
    with Registry.open(db) as registry:
        while time.monotonic() < deadline:
            for row in registry.presence_rows():
                if (row.agent_id, row.status, row.reason) == (agent, "offline", reason) and (
                    row.changed_at is not None and row.changed_at >= since
                ):
                    return
            time.sleep(0.05)
    raise SystemExit(f"{agent} was never recorded offline ({reason})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument(
        "--settle", type=float, default=2.5,
        help="seconds each page runs before its screenshot (histories, measured intervals)",
    )  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "hub.db"
        specs: dict[str, list[str]] = {"steady": [], "leaves": [], "killed": []}
        layout = [
            ("acme", "planner", "plan,schedule", "steady", 1e9),
            ("acme", "resizer-1", "resize", "steady", 1e9),
            ("acme", "resizer-2", "resize", "killed", 1e9),
            ("acme", "reporter", "report", "leaves", 2.0),
            ("globex", "crawler", "crawl", "steady", 1e9),
            ("globex", "indexer", "index", "steady", 1e9),
        ]
        with Registry.open(db) as registry:
            for tenant, agent, caps, group, leave in layout:
                key = generate_private_key()
                path = Path(tmp) / f"{agent}.pem"
                path.write_bytes(key.to_pem())
                registry.add_key(tenant, agent, key.public_key)
                specs[group].append(f"{tenant}:{agent}:{path}:{caps}:{leave}")
            registry.record_presence(_example_history(layout))
        port, dash = free_port(), free_port()
        hub = subprocess.Popen(
            [sys.executable, "-m", "artcafe_trio", "hub", "--port", str(port), "--db",
             str(db), "--dashboard", f"127.0.0.1:{dash}", "--disconnect-grace", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        groups = []
        try:
            assert hub.stdout is not None
            while not hub.stdout.readline().startswith(b"hub listening"):
                pass
            url = f"ws://127.0.0.1:{port}"
            started = time.time()
            for group in ("steady", "killed", "leaves"):  # all at once, then each ready
                groups.append(
                    subprocess.Popen(
                        [sys.executable, "-c", AGENTS, url, *specs[group]], stdout=subprocess.PIPE
                    )
                )
            for proc in groups:
                assert proc.stdout is not None
                proc.stdout.readline()
            wait_for_presence(db, "reporter", "left", since=started)  # the reporter leaves
            groups[1].send_signal(signal.SIGKILL)  # resizer-2 dies
            wait_for_presence(db, "resizer-2", "disconnected", since=started)
            token = json.loads(Path(f"{db}.admin").read_text())["token"]
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=ARGS)
                for name, width, height in (
                    ("dashboard", 1440, 860),
                    ("dashboard-narrow", 420, 1100),
                ):
                    page = browser.new_page(viewport={"width": width, "height": height})
                    page.goto(f"http://127.0.0.1:{dash}/?token={token}")
                    page.wait_for_selector('#feed-state[data-state="live"]')
                    page.wait_for_selector(".bar span")
                    page.wait_for_timeout(args.settle * 1000)  # histories, measures, ages
                    page.screenshot(path=str(out / f"{name}.png"))
                    page.close()
                    print(f"wrote {out / (name + '.png')}")
                browser.close()
        finally:
            for proc in groups:
                proc.kill()
                proc.wait()
            hub.send_signal(signal.SIGTERM)
            hub.wait(15)


if __name__ == "__main__":
    main()
