"""The dashboard in a real browser: headless Chromium (the system's) driven by Playwright.

The hub (``artcafe-trio hub --dashboard``) and the agents run as real processes,
so an agent can be SIGKILLed and the hub restarted; the browser is driven with
Playwright's sync API from plain (non-trio) test functions. Never downloads a
browser: ``executable_path`` is the Debian ``chromium`` package's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from artcafe_trio import Registry, generate_private_key
from artcafe_trio.dashboard import create_token

from .hubproc import free_port

pytestmark = pytest.mark.timeout(60)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
HERE = Path(__file__).parent

if not os.path.exists(CHROMIUM) or shutil.which("chromium") is None:
    if os.environ.get("CI"):
        raise RuntimeError(f"browser tests need {CHROMIUM} (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)", allow_module_level=True)
try:
    import playwright.sync_api as sync_api
except ImportError:  # under CI a missing Playwright fails the run, as a missing chromium does
    if os.environ.get("CI"):
        raise
    pytest.skip("playwright not installed (pip install -e '.[dev]')", allow_module_level=True)


class Hub:
    """``artcafe-trio hub --dashboard`` as a subprocess, restartable on the same ports."""

    def __init__(self, tmp: Path) -> None:
        self.db = tmp / "hub.db"
        self.port = free_port()
        self.dashboard_port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}/"
        self.log = tmp / "hub.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-c", "from artcafe_trio.cli import main; raise SystemExit(main())",
            "hub", "--host", "127.0.0.1", "--port", str(self.port), "--db", str(self.db),
            "--dashboard", f"127.0.0.1:{self.dashboard_port}", "--disconnect-grace", "0",
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
        assert self.process.stdout is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"hub exited early; see {self.log}")
            if line.startswith(b"hub listening on"):
                return
        raise RuntimeError("hub did not start")

    @property
    def admin_token(self) -> str:
        import json

        with open(f"{self.db}.admin") as f:
            token: str = json.load(f)["token"]
        return token

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(15)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


class Agents:
    """Agents in a subprocess (``dashboard_agents.py``); kill it to kill them. Started,
    not yet connected: :meth:`wait_ready` (so several start, and the browser, at once)."""

    def __init__(self, hub: Hub, interval: float, *specs: str) -> None:
        command = [
            sys.executable,
            str(HERE / "dashboard_agents.py"),
            hub.url,
            str(interval),
            *specs,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def wait_ready(self) -> None:
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"ready":
            raise RuntimeError("agents did not connect")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


class World:
    def __init__(
        self, hub: Hub, tenant_token: str, all_token: str, victim: Agents, browser: object
    ) -> None:
        self.hub = hub
        self.tenant_token = tenant_token
        self.all_token = all_token  # dashboard-token --all-tenants: survives restarts
        self.victim = victim
        self.browser = browser


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("dash")
    hub = Hub(tmp)
    specs: dict[str, list[str]] = {}
    with Registry.open(hub.db) as registry:
        for tenant, agent, group in [
            ("t1", "alpha", "steady"), ("t1", "gamma", "steady"), ("t2", "delta", "steady"),
            ("t1", "victim", "victim"),
        ]:  # fmt: skip
            key = generate_private_key()
            path = tmp / f"{agent}.pem"
            path.write_bytes(key.to_pem())
            registry.add_key(tenant, agent, key.public_key)
            specs.setdefault(group, []).append(f"{tenant}:{agent}:{path}")
        tenant_token = create_token(registry, "t1")
        all_token = create_token(registry, None)
    hub.start()
    # alpha's heartbeat age grows for a minute: the ticking test reads it.
    steady = Agents(hub, 60.0, *specs["steady"])
    victim = Agents(hub, 1.0, *specs["victim"])
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                steady.wait_ready()
                victim.wait_ready()
                yield World(hub, tenant_token, all_token, victim, browser)
            finally:
                browser.close()
    finally:
        steady.kill()
        victim.kill()
        hub.stop()


@pytest.fixture
def page(world: World) -> Iterator[object]:
    context = world.browser.new_context(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(10_000)
    yield page
    context.close()


def open_live(page: object, world: World, token: str) -> None:
    page.goto(f"{world.hub.dashboard}?token={token}")  # type: ignore[attr-defined]
    page.wait_for_selector('#feed-state[data-state="live"]')  # type: ignore[attr-defined]


def rows(page: object) -> list[str]:
    return page.eval_on_selector_all(  # type: ignore[attr-defined, no-any-return]
        "#presence tbody tr", "rows => rows.map(r => r.dataset.key)"
    )


def test_the_page_lists_connected_agents_and_hides_the_token(page: object, world: World) -> None:
    open_live(page, world, world.hub.admin_token)
    page.wait_for_selector('tr[data-key="t1/victim"][data-status="online"]')  # type: ignore[attr-defined]
    assert rows(page) == ["t1/alpha", "t2/delta", "t1/gamma", "t1/victim"]  # sorted by agent
    for key in rows(page):
        status = page.inner_text(f'tr[data-key="{key}"] .status')  # type: ignore[attr-defined]
        assert status == "online"  # the status is written out, not only coloured
    assert "token" not in page.url  # type: ignore[attr-defined]
    stored = page.evaluate("sessionStorage.getItem('artcafe-token')")  # type: ignore[attr-defined]
    assert stored == world.hub.admin_token
    assert "every tenant" in page.inner_text("#scope")  # type: ignore[attr-defined]
    assert page.inner_text("#c-online") == "4"  # type: ignore[attr-defined]
    meta = page.inner_text('tr[data-key="t1/alpha"] td.meta')  # type: ignore[attr-defined]
    assert "resize" in meta and "zone" in meta
    # A reload finds the token in sessionStorage (the address no longer has it).
    page.reload()  # type: ignore[attr-defined]
    page.wait_for_selector('#feed-state[data-state="live"]')  # type: ignore[attr-defined]
    assert "token" not in page.url and len(rows(page)) == 4  # type: ignore[attr-defined]


def test_the_heartbeat_age_ticks(page: object, world: World) -> None:
    open_live(page, world, world.hub.admin_token)
    cell = 'tr[data-key="t1/alpha"] td.age'

    def age() -> float:
        text: str = page.inner_text(cell)  # type: ignore[attr-defined]
        value, unit = text.split()
        return float(value) / (1000 if unit == "ms" else 1)

    first = age()
    page.wait_for_timeout(1200)  # type: ignore[attr-defined]
    second = age()
    assert second - first == pytest.approx(1.2, abs=0.6)


def test_filter_search_and_sort(page: object, world: World) -> None:
    open_live(page, world, world.hub.admin_token)
    page.fill("#search", "gam")  # type: ignore[attr-defined]
    assert rows(page) == ["t1/gamma"]
    page.fill("#search", "")  # type: ignore[attr-defined]
    page.select_option("#tenant-filter", "t2")  # type: ignore[attr-defined]
    assert rows(page) == ["t2/delta"]
    page.select_option("#tenant-filter", "")  # type: ignore[attr-defined]
    page.fill("#search", "zone")  # metadata is searched too  # type: ignore[attr-defined]
    assert len(rows(page)) == 4
    page.fill("#search", "")  # type: ignore[attr-defined]
    page.click('th button[data-sort="agent_id"]')  # already by agent: now descending  # type: ignore[attr-defined]
    assert rows(page) == ["t1/victim", "t1/gamma", "t2/delta", "t1/alpha"]
    page.click('th button[data-sort="tenant_id"]')  # type: ignore[attr-defined]
    assert [r.split("/")[0] for r in rows(page)] == ["t1", "t1", "t1", "t2"]


def test_a_tenant_token_sees_only_its_tenant(page: object, world: World) -> None:
    open_live(page, world, world.tenant_token)
    assert "tenant t1" in page.inner_text("#scope")  # type: ignore[attr-defined]
    assert sorted(rows(page)) == ["t1/alpha", "t1/gamma", "t1/victim"]
    events = page.inner_text("#events")  # type: ignore[attr-defined]
    assert "t1/alpha" in events and "t2/" not in events
    assert page.inner_text("#c-heartbeats") == "–"  # hub-wide rates are admin-only  # type: ignore[attr-defined]


def test_no_token_or_a_wrong_one_is_refused(page: object, world: World) -> None:
    for url in (world.hub.dashboard, f"{world.hub.dashboard}?token=actd_wrong"):
        response = page.goto(url)  # type: ignore[attr-defined]
        assert response.status == 401
        assert page.inner_text("#refused") == "Access refused"  # type: ignore[attr-defined]
        assert page.query_selector("#presence") is None  # type: ignore[attr-defined]


def test_a_killed_agent_turns_offline_live_within_a_second(page: object, world: World) -> None:
    open_live(page, world, world.hub.admin_token)
    page.wait_for_selector('tr[data-key="t1/victim"][data-status="online"]')  # type: ignore[attr-defined]
    world.victim.kill()  # SIGKILL: no goodbye; the hub sees the connection drop
    row = page.wait_for_selector('tr[data-key="t1/victim"][data-status="offline"]')  # type: ignore[attr-defined]
    shown = int(row.get_attribute("data-rendered-at"))
    transition = int(row.get_attribute("data-transition-at"))
    print(f"offline shown {shown - transition} ms after the hub's transition")
    assert 0 <= shown - transition < 1000, (shown, transition)  # same machine, same clock
    assert row.inner_text().count("disconnected") == 1
    assert page.inner_text("#c-online") == "3"  # type: ignore[attr-defined]
    assert "t1/victim offline (disconnected)" in page.inner_text("#events")  # type: ignore[attr-defined]
    page.select_option("#status-filter", "offline")  # type: ignore[attr-defined]
    assert rows(page) == ["t1/victim"]


def new_page(world: World, width: int = 1400) -> object:
    context = world.browser.new_context(viewport={"width": width, "height": 900})  # type: ignore[attr-defined]
    page = context.new_page()
    page.set_default_timeout(10_000)
    return page


def test_the_feed_recovers_after_a_hub_restart(page: object, world: World) -> None:
    open_live(page, world, world.tenant_token)
    everyone = new_page(world)  # a stored all-tenants token: outlives the restart too
    admin = new_page(world)  # the hub's admin token: new at every start
    open_live(everyone, world, world.all_token)
    open_live(admin, world, world.hub.admin_token)
    assert "every tenant" in everyone.inner_text("#scope")  # type: ignore[attr-defined]
    world.hub.stop()
    for p in (page, everyone, admin):
        p.wait_for_selector('#feed-state[data-state="reconnecting"]')  # type: ignore[attr-defined]
    restarted = time.time()
    world.hub.start()
    # The agents reconnect by themselves; the page shows them online again, with the
    # new sessions' times, without a reload.
    for p in (page, everyone):
        p.wait_for_selector('#feed-state[data-state="live"]', timeout=15_000)  # type: ignore[attr-defined]
        p.wait_for_function(  # type: ignore[attr-defined]
            """(t) => { const tr = document.querySelector('tr[data-key="t1/alpha"]');
                       const td = tr && tr.querySelector('td.since');
                       return !!td && tr.dataset.status === 'online' && Number(td.dataset.t) >= t; }""",
            arg=restarted,
            timeout=15_000,
        )
        assert p.inner_text('tr[data-key="t1/alpha"] .status') == "online"  # type: ignore[attr-defined]
    assert "t2/delta" in rows(everyone)
    # The old admin token is refused, and the page says why and what to use instead.
    admin.wait_for_selector('body[data-refused="expired"]', timeout=15_000)  # type: ignore[attr-defined]
    said = admin.inner_text("#feed-state")  # type: ignore[attr-defined]
    assert "no longer valid" in said and "--all-tenants" in said
    for p in (everyone, admin):
        p.context.close()  # type: ignore[attr-defined]


def test_the_event_filter_the_uptime_bar_and_the_narrow_layout(world: World) -> None:
    refuse_one_login(world.hub)  # an auth_failure event, besides the presence ones
    page = new_page(world, width=400)
    open_live(page, world, world.all_token)
    page.wait_for_selector('#events li[data-kind="auth_failure"]')  # type: ignore[attr-defined]

    def kinds() -> list[str]:
        return page.eval_on_selector_all(  # type: ignore[attr-defined, no-any-return]
            "#events li", "items => items.map(i => i.dataset.kind)"
        )

    assert {"presence", "auth_failure"} <= set(kinds())
    page.select_option("#event-filter", "auth_failure")  # type: ignore[attr-defined]
    assert set(kinds()) == {"auth_failure"}
    assert "authentication refused from 127.0.0.1" in page.inner_text("#events")  # type: ignore[attr-defined]
    page.select_option("#event-filter", "takeover")  # type: ignore[attr-defined]
    assert kinds() == []
    page.select_option("#event-filter", "presence")  # type: ignore[attr-defined]
    assert kinds() and set(kinds()) == {"presence"}
    # Each row's 24-hour bar: segments, and its uptime in words.
    bar = 'tr[data-key="t1/alpha"] .bar'
    page.wait_for_selector(f"{bar} span[data-status=online]", state="attached")  # type: ignore[attr-defined]
    label = page.get_attribute(bar, "aria-label")  # type: ignore[attr-defined]
    assert label.startswith("last 24 h: ") and "% up" in label and "offline period" in label
    # Drawn wider than 50 px (waited for: the table is redrawn at each snapshot tick, and
    # a bar measured in the middle of a redraw is 0 px wide); a timeout fails the test.
    page.wait_for_function(  # type: ignore[attr-defined]
        "sel => { const b = document.querySelector(sel);"
        " return b !== null && b.getBoundingClientRect().width > 50 }",
        arg=bar,
        timeout=5000,
    )
    # 400 px wide: each agent is a card, each cell labelled; nothing overflows sideways.
    assert page.eval_on_selector(  # type: ignore[attr-defined]
        "#presence thead", "h => h.getBoundingClientRect().right <= 0"
    )
    label = page.eval_on_selector(  # type: ignore[attr-defined]
        'tr[data-key="t1/alpha"] td[data-label="status"]',
        "td => getComputedStyle(td, '::before').content",
    )
    assert label == '"status"'
    card = page.eval_on_selector(  # type: ignore[attr-defined]
        'tr[data-key="t1/alpha"]', "tr => tr.getBoundingClientRect().toJSON()"
    )
    assert card["width"] <= 400 and card["left"] >= 0
    assert page.evaluate("document.documentElement.scrollWidth") <= 400  # type: ignore[attr-defined]
    page.fill("#search", "gam")  # the controls still work  # type: ignore[attr-defined]
    assert rows(page) == ["t1/gamma"]
    page.context.close()  # type: ignore[attr-defined]


def refuse_one_login(hub: Hub) -> None:
    """One refused authentication on the hub (a key it does not know)."""
    import trio

    from artcafe_trio import AuthenticationError, Backoff, open_agent

    async def main() -> None:
        with trio.fail_after(10):
            with pytest.raises(AuthenticationError):
                async with open_agent(
                    url=hub.url, tenant_id="t1", agent_id="intruder",
                    private_key=generate_private_key(), backoff=Backoff(max_attempts=1),
                ):  # fmt: skip
                    pass

    trio.run(main)


def test_the_screenshot_script_renders_both_layouts(tmp_path: Path) -> None:
    """tools/screenshots.py (the docs' images) still runs: a quick render into tmp."""
    import struct

    script = HERE.parent / "tools" / "screenshots.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--settle", "0.3"],
        capture_output=True, timeout=50, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    for name, width in (("dashboard", 1440), ("dashboard-narrow", 420)):
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", data[16:24])[0] == width  # IHDR: the viewport's width
