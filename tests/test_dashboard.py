"""The dashboard's HTTP server, JSON API, live feed and access control.

The real HTTP server on 127.0.0.1 (port 0) in front of the real hub (agents in
memory): the socket and the HTTP parsing are the point here. The history
document is tested without sockets, with an injected wall clock.
"""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import AsyncIterator

import pytest
import trio

from artcafe_trio.dashboard import (
    Dashboard,
    DashboardConfig,
    HttpLimits,
    create_token,
    serve_dashboard,
    static_files,
)
from artcafe_trio.dashboard._http import Request
from artcafe_trio.dashboard._tokens import hash_token
from artcafe_trio.registry._registry import PresenceChange
from artcafe_trio.testing import TestHub, open_test_hub

from .httpclient import get, open_sse

pytestmark = pytest.mark.timeout(30)


class Site:
    def __init__(self, hub: TestHub, port: int) -> None:
        self.hub = hub
        self.port = port
        self.admin = {"Authorization": f"Bearer {hub.hub.admin_token}"}


@pytest.fixture
async def site(nursery: trio.Nursery) -> AsyncIterator[Site]:
    async with open_test_hub(disconnect_grace=0, close_timeout=0.05) as hub:
        config = DashboardConfig(
            feed_queue=4,
            refresh_interval=60,
            limits=HttpLimits(max_connections=8, max_header_bytes=2048, request_timeout=1.0),
        )
        async with trio.open_nursery() as inner:
            url = await inner.start(
                functools.partial(serve_dashboard, hub.hub, port=0, config=config)
            )
            yield Site(hub, int(url.rsplit(":", 1)[1].strip("/")))
            inner.cancel_scope.cancel()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_page_files_are_package_data() -> None:
    root = importlib.resources.files("artcafe_trio.dashboard") / "static"
    names = {entry.name for entry in root.iterdir()}
    assert {"index.html", "app.js", "app.css", "refused.html", "refused.js"} <= names
    files = static_files()
    assert b"/static/app.js" in files["index.html"]
    assert b"EventSource" in files["app.js"]  # the comment explaining why fetch() is used
    for body in files.values():  # nothing fetched from outside
        assert b"http://" not in body and b"https://" not in body


async def test_no_token_or_a_wrong_token_is_refused_everywhere(site: Site) -> None:
    for path in ("/api/presence", "/api/events", "/api/history?agent=a"):
        answer = await get(site.port, path)
        assert answer.status == 401, path
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert answer.json()["error"] == "unauthorized"
        wrong = await get(site.port, path, bearer("actd_not-a-token"))
        assert wrong.status == 401, path
        assert "bad token" in wrong.json()["message"]
    # A token in the address is only for the page, never for the API.
    query = await get(site.port, f"/api/presence?token={site.hub.hub.admin_token}")
    assert query.status == 401
    page = await get(site.port, "/")
    assert page.status == 401
    assert b"Access refused" in page.body
    assert (await get(site.port, "/?token=wrong")).status == 401
    good = await get(site.port, f"/?token={site.hub.hub.admin_token}")
    assert good.status == 200
    assert b'id="presence"' in good.body
    assert "script-src 'self'" in good.headers["content-security-policy"]
    assert good.headers["referrer-policy"] == "no-referrer"


async def test_admin_sees_every_tenant_and_a_tenant_token_only_its_own(site: Site) -> None:
    token = create_token(site.hub.registry, "t1")
    assert site.hub.registry.dashboard_token_tenant(hash_token(token)) == "t1"
    async with site.hub.open_agent("a", tenant_id="t1"), site.hub.open_agent("b", tenant_id="t2"):
        everything = (await get(site.port, "/api/presence", site.admin)).json()
        assert everything["scope"] == "*"
        assert [(a["tenant_id"], a["agent_id"]) for a in everything["agents"]] == [
            ("t1", "a"), ("t2", "b"),
        ]  # fmt: skip
        assert "heartbeats_per_s" in everything["counters"]
        mine = (await get(site.port, "/api/presence", bearer(token))).json()
        assert mine["scope"] == "t1"
        assert [a["agent_id"] for a in mine["agents"]] == ["a"]
        assert mine["counters"] == {"online": 1, "offline": {}}  # no hub-wide rates
        other = await get(site.port, "/api/presence?tenant=t2", bearer(token))
        assert other.status == 403
        assert (await get(site.port, "/api/history?agent=b&tenant=t2", bearer(token))).status == 403
        assert (await get(site.port, "/api/history?agent=b", bearer(token))).status == 404
        assert (await get(site.port, "/api/events?tenant=t2", bearer(token))).status == 403
        only_t2 = (await get(site.port, "/api/presence?tenant=t2", site.admin)).json()
        assert [a["agent_id"] for a in only_t2["agents"]] == ["b"]
        row = mine["agents"][0]
        assert row["status"] == "online" and row["heartbeat_interval"] == 30.0
        assert row["hub_id"] == site.hub.hub.config.hub_id


async def test_a_tenant_feed_shows_its_transitions_live_and_no_one_elses(site: Site) -> None:
    token = create_token(site.hub.registry, "t1")
    feed, stream = await open_sse(site.port, "/api/events", bearer(token))
    async with stream:
        assert feed.status == 200
        name, snapshot = await feed.event()
        assert (name, snapshot["scope"], snapshot["agents"]) == ("snapshot", "t1", [])
        async with (
            site.hub.open_agent("b", tenant_id="t2"),
            site.hub.open_agent("a", tenant_id="t1"),
        ):
            pass  # both come and leave
        with trio.fail_after(5):
            seen = [await feed.event() for _ in range(2)]
        assert [(n, e["agent_id"], e["status"], e["reason"]) for n, e in seen] == [
            ("presence", "a", "online", "connected"),
            ("presence", "a", "offline", "left"),
        ]
        assert seen[1][1]["agent"]["status"] == "offline"  # the updated row rides along
        # b (t2) left after a did: nothing of it arrives, within a bounded wait.
        assert any(e.tenant_id == "t2" for e in site.hub.hub.events.recent)  # it happened
        with trio.move_on_after(0.5) as waited:
            extra = await feed.event()
            raise AssertionError(f"another tenant's event reached a t1 feed: {extra}")
        assert waited.cancelled_caught


async def test_a_feed_that_falls_behind_gets_resync_and_a_fresh_snapshot(site: Site) -> None:
    feed, stream = await open_sse(site.port, "/api/events", site.admin)
    async with stream:
        await feed.event()  # the first snapshot
        events = site.hub.hub.events
        for i in range(50):  # no checkpoint: the feed cannot keep up
            events.presence("t1", f"x{i}", "online", "connected", None, float(i))
        with trio.fail_after(5):
            name, data = await feed.event()
            if name == "presence":  # handed straight to the feed task that was waiting
                assert data["agent_id"] == "x0"
                name, data = await feed.event()
            assert name == "resync"
            assert data["lost"] >= 45  # at most feed_queue (4) events were kept
            name, snapshot = await feed.event()
            assert name == "snapshot" and "events" in snapshot


async def test_limits_header_size_body_method_connections_and_request_time(site: Site) -> None:
    big = await get(site.port, "/api/presence", {"X-Big": "y" * 4000})
    assert big.status == 431
    posted = await get(site.port, "/api/presence", site.admin, method="POST")
    assert posted.status == 405
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", site.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n")
            assert b" 413 " in await stream.receive_some(1000)
        # A client that sends half a request is answered 408 and dropped after 1 s.
        stream = await trio.open_tcp_stream("127.0.0.1", site.port)
        async with stream:
            started = trio.current_time()
            await stream.send_all(b"GET / HTTP/1.1\r\nHost")
            answer = await stream.receive_some(1000)
            assert b" 408 " in answer
            assert 0.9 <= trio.current_time() - started < 5
        # More than max_connections (8) at once: the extra ones get 503 at once.
        idle = [await trio.open_tcp_stream("127.0.0.1", site.port) for _ in range(8)]
        await trio.sleep(0.2)
        extra = await get(site.port, "/api/presence", site.admin)
        assert extra.status == 503
        for s in idle:
            await s.aclose()
        await trio.sleep(0.2)
        assert (await get(site.port, "/api/presence", site.admin)).status == 200


async def test_head_answers_headers_only_and_the_server_keeps_serving(site: Site) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", site.port)
        async with stream:
            await stream.send_all(b"HEAD /static/app.css HTTP/1.1\r\nHost: x\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert length == len(static_files()["app.css"])
            assert head.endswith(b"\r\n\r\n")  # no body after the headers
    assert (await get(site.port, "/static/app.css")).status == 200  # still serving
    many = "&".join(f"k{i}=v" for i in range(50))
    assert (await get(site.port, f"/api/presence?{many}", site.admin)).status == 400


async def test_unknown_paths_and_static_files(site: Site) -> None:
    assert (await get(site.port, "/nope")).status == 404
    assert (await get(site.port, "/api/nope", site.admin)).status == 404
    assert (await get(site.port, "/static/../../etc/passwd")).status == 404
    js = await get(site.port, "/static/app.js")
    assert js.status == 200 and js.headers["content-type"].startswith("text/javascript")
    assert (await get(site.port, "/static/index.html")).status == 404  # the page needs a token


async def test_history_segments_and_uptime_for_the_last_24_hours() -> None:
    day = 86400.0
    until = 1_000_000.0
    async with open_test_hub() as hub:
        hub.registry.record_presence(
            [
                PresenceChange("t1", "a", "online", "connected", "s1", until - 2 * day),
                PresenceChange("t1", "a", "offline", "timeout", "s1", until - 6 * 3600),
                PresenceChange("t1", "a", "online", "connected", "s2", until - 3 * 3600),
            ]
        )
        dashboard = Dashboard(hub.hub, DashboardConfig(), wall_clock=lambda: until)

        async def history(query: str, token: str) -> dict[str, object]:
            request = Request(
                method="GET", path="/api/history", query={k: [v] for k, v in
                (p.split("=") for p in query.split("&"))},
                headers={"authorization": f"Bearer {token}"}, remote="test",
            )  # fmt: skip
            response = await dashboard.handle(request)
            assert response.status == 200, response.body  # type: ignore[union-attr]
            import json

            return json.loads(response.body)  # type: ignore[union-attr,no-any-return]

        doc = await history("agent=a&tenant=t1", hub.hub.admin_token)
        assert [(s["status"], s["reason"], s["end"] - s["start"]) for s in doc["segments"]] == [  # type: ignore[attr-defined]
            ("online", "connected", day - 6 * 3600),
            ("offline", "timeout", 3 * 3600),
            ("online", "connected", 3 * 3600),
        ]
        assert doc["uptime"] == pytest.approx(21 / 24)
        assert [t["reason"] for t in doc["transitions"]] == ["timeout", "connected"]  # type: ignore[attr-defined]
        token = create_token(hub.registry, "t1")
        assert (await history("agent=a", token))["tenant_id"] == "t1"
