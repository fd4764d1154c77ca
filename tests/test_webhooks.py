"""Alert webhooks: a real local HTTP receiver on 127.0.0.1 (up, down, slow, 500) and,
where the socket is not the point, exact timing under autojump_clock."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import itertools
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import attrs
import h11
import pytest
import trio

from artcafe_trio import Backoff
from artcafe_trio.dashboard._http import HttpError, post
from artcafe_trio.dashboard._webhooks import (
    SIGNATURE_HEADER,
    AlertFilter,
    Webhook,
    WebhookConfig,
    sign,
)
from artcafe_trio.testing import TestHub, open_test_hub

from .hubproc import free_port

pytestmark = pytest.mark.timeout(30)

FAST = Backoff(base=0.02, cap=0.05, max_attempts=3)


class Receiver:
    """A tiny HTTP server that records POSTs; ``answers`` is the status of each in turn
    (the last one repeats); ``delay`` seconds before answering."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answers = [200]
        self.delay = 0.0
        self.port = 0
        self.got = trio.Condition()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # e.g. a TLS client refusing us
            await self._exchange(stream)

    async def _exchange(self, stream: trio.abc.Stream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            headers: dict[str, str] = {}
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            status = self.answers[min(len(self.received), len(self.answers) - 1)]
            self.received.append((headers, body))
            async with self.got:
                self.got.notify_all()
            await trio.sleep(self.delay)
            response = h11.Response(status_code=status, headers=[("Content-Length", "2")])
            await stream.send_all(conn.send(response) + conn.send(h11.Data(data=b"ok")))
            await stream.send_all(conn.send(h11.EndOfMessage()))

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(10):
            async with self.got:
                while len(self.received) < count:
                    await self.got.wait()


@pytest.fixture
async def receiver(nursery: trio.Nursery) -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await nursery.start(receiver.serve)
    return receiver


async def start_webhook(hub: TestHub, nursery: trio.Nursery, url: str, **fields: Any) -> Webhook:
    webhook = Webhook(hub.hub, WebhookConfig(url=url, **fields), rng=random.Random(7))
    await nursery.start(webhook.run)
    return webhook


async def test_a_transition_is_posted_signed_to_a_real_receiver(
    receiver: Receiver, nursery: trio.Nursery
) -> None:
    async with open_test_hub(disconnect_grace=0) as hub:
        url = f"http://127.0.0.1:{receiver.port}/hooks/artcafe?x=1"
        webhook = await start_webhook(hub, nursery, url, secret=b"s3cret", backoff=FAST)
        async with hub.open_agent("w1", tenant_id="acme"):
            pass
        await receiver.wait_for(2)
        (h1, b1), (_h2, b2) = receiver.received
        first, second = json.loads(b1), json.loads(b2)
        assert (first["status"], first["reason"], second["status"], second["reason"]) == (
            "online", "connected", "offline", "left",
        )  # fmt: skip
        assert first["tenant_id"] == "acme" and first["agent_id"] == "w1"
        assert first["hub_id"] == hub.hub.config.hub_id
        expected = "sha256=" + hmac.new(b"s3cret", b1, hashlib.sha256).hexdigest()
        assert h1[SIGNATURE_HEADER.lower()] == expected == sign(b"s3cret", b1)
        assert h1["content-type"] == "application/json"
        assert h1["x-artcafe-delivery"] == first["id"]
        with trio.fail_after(5):
            while webhook.stats.sent < 2:  # counted once the answer is read
                await trio.sleep(0.01)
        assert webhook.stats.failed == 0


async def test_500_answers_are_retried_until_accepted(
    receiver: Receiver, nursery: trio.Nursery
) -> None:
    receiver.answers = [500, 503, 200]
    async with open_test_hub() as hub:
        webhook = await start_webhook(
            hub, nursery, f"http://127.0.0.1:{receiver.port}/", backoff=FAST
        )
        async with hub.open_agent("w1"):
            await receiver.wait_for(3)
        ids = {json.loads(body)["id"] for _h, body in receiver.received[:3]}
        assert len(ids) == 1  # the same document, three times
        with trio.fail_after(5):
            while webhook.stats.sent < 2:  # the online (third try) and the offline (first)
                await trio.sleep(0.01)
        assert (webhook.stats.sent, webhook.stats.retries, webhook.stats.failed) == (2, 2, 0)
        assert len(receiver.received) == 4


async def test_a_receiver_that_is_down_costs_retries_not_the_hub(nursery: trio.Nursery) -> None:
    port = free_port()  # nobody listens there
    async with open_test_hub(disconnect_grace=0) as hub:
        webhook = await start_webhook(hub, nursery, f"http://127.0.0.1:{port}/", backoff=FAST)
        started = trio.current_time()
        for i in range(3):
            async with hub.open_agent(f"w{i}"):
                pass
        assert trio.current_time() - started < 5  # the hub went on regardless
        assert [r.status for r in hub.hub.presence_table()] == ["offline"] * 3
        with trio.fail_after(10):
            while webhook.stats.failed < 6:
                await trio.sleep(0.01)
        assert webhook.stats.sent == 0
        assert webhook.stats.retries == 6 * FAST.max_attempts  # type: ignore[operator]


async def test_a_slow_receiver_is_cut_off_by_the_timeout_and_retried(
    receiver: Receiver, nursery: trio.Nursery
) -> None:
    receiver.delay = 2.0
    async with open_test_hub() as hub:
        webhook = await start_webhook(
            hub, nursery, f"http://127.0.0.1:{receiver.port}/", timeout=0.3,
            backoff=Backoff(base=0.01, cap=0.01, max_attempts=1),
        )  # fmt: skip
        async with hub.open_agent("w1"):
            with trio.fail_after(5):
                while webhook.stats.failed < 1:
                    await trio.sleep(0.01)
            at_failure = attrs.evolve(webhook.stats)
        online = [b for _h, b in receiver.received if json.loads(b)["status"] == "online"]
        assert len(online) == 2  # the first try and one retry, each cut at 0.3 s
        assert at_failure.sent == 0 and at_failure.retries == 1


async def test_the_client_reports_refused_and_non_2xx_precisely(receiver: Receiver) -> None:
    receiver.answers = [404]
    with pytest.raises(HttpError, match="HTTP 404") as info:
        await post(f"http://127.0.0.1:{receiver.port}/", b"{}", [], time_limit=5)
    assert info.value.status == 404
    with pytest.raises(HttpError, match="failed") as down:
        await post(f"http://127.0.0.1:{free_port()}/", b"{}", [], time_limit=5)
    assert down.value.status == 0
    with pytest.raises(ValueError, match="not an http"):
        await post("ftp://127.0.0.1/", b"", [], time_limit=1)


# --- filters, holding, queue and backoff: under autojump_clock, with a fake POST ---------


@attrs.define
class FakePost:
    """Records (time, document); fails the first ``failures`` calls with ``status``."""

    failures: int = 0
    status: int = 500
    block: bool = False
    calls: list[tuple[float, dict[str, Any]]] = attrs.field(factory=list)

    async def __call__(self, url: str, body: bytes, headers: object, **kw: object) -> int:
        self.calls.append((trio.current_time(), json.loads(body)))
        if self.block:
            await trio.sleep_forever()
        if len(self.calls) <= self.failures:
            raise HttpError("nope", self.status)
        await trio.lowlevel.checkpoint()
        return 200


async def fake_webhook(
    hub: TestHub, nursery: trio.Nursery, fake: FakePost, **fields: Any
) -> Webhook:
    webhook = Webhook(
        hub.hub, WebhookConfig(url="http://x/", **fields), post=fake, rng=random.Random(3)
    )
    await nursery.start(webhook.run)
    return webhook


async def test_an_offline_blip_shorter_than_min_offline_pages_no_one(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    fake = FakePost()
    async with open_test_hub(disconnect_grace=0) as hub:
        webhook = await fake_webhook(hub, nursery, fake, filter=AlertFilter(min_offline=30))
        key = hub.register("test", "w")
        async with hub.open_agent("w", private_key=key):
            pass
        await trio.sleep(10)
        async with hub.open_agent("w", private_key=key):  # back after 10 s: a blip
            await trio.sleep(1)
            assert fake.calls == [] and webhook.stats.held == 1
        left_at = trio.current_time()
        await trio.sleep(40)  # this time it stays away
        assert [(d["status"], d["reason"]) for _t, d in fake.calls] == [("offline", "left")]
        assert fake.calls[0][0] == pytest.approx(left_at + 30, abs=0.01)
        assert fake.calls[0][1]["offline_for_at_least"] == 30
        async with hub.open_agent("w", private_key=key):
            await trio.sleep(1)
        assert [d["status"] for _t, d in fake.calls] == ["offline", "online"]  # recovered


async def test_reason_and_tenant_filters(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    fake = FakePost()
    async with open_test_hub(disconnect_grace=0) as hub:
        rules = AlertFilter(reasons={"timeout"}, tenants={"acme"})
        await fake_webhook(hub, nursery, fake, filter=rules)
        async with hub.open_agent("a", tenant_id="other"):
            pass
        async with hub.open_agent("b", tenant_id="acme"):
            pass  # left: not a reason we page for, and so its online is not sent either
        await trio.sleep(1)
        assert fake.calls == []
        key = hub.register("acme", "c")
        async with hub.open_agent("c", tenant_id="acme", private_key=key, heartbeat_interval=1):
            hub.blackhole()
            await trio.sleep(10)  # the hub times it out
        await trio.sleep(1)
        sent = [(d["tenant_id"], d["agent_id"], d["status"], d["reason"]) for _t, d in fake.calls]
        assert sent[0] == ("acme", "c", "offline", "timeout")
        assert all(s[:2] == ("acme", "c") for s in sent)


async def test_a_full_queue_drops_and_counts_without_stalling_the_hub(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    fake = FakePost(block=True)  # the receiver never answers and there is no timeout
    async with open_test_hub(disconnect_grace=0) as hub:
        webhook = await fake_webhook(hub, nursery, fake, queue_size=2)
        for i in range(4):
            async with hub.open_agent(f"w{i}"):
                pass
        await trio.sleep(1)
        # 8 documents: one in flight, two queued, five dropped.
        assert len(fake.calls) == 1
        assert (webhook.stats.queued, webhook.stats.dropped) == (3, 5)
        assert [r.status for r in hub.hub.presence_table()] == ["offline"] * 4


async def test_webhook_counters_are_prometheus_metrics_without_the_url_path(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from artcafe_trio.dashboard._alertmetrics import WebhookCollector

    async with open_test_hub(disconnect_grace=0) as hub:
        blocked = Webhook(
            hub.hub, WebhookConfig(url="https://hooks.example.com/s3cret-path?k=v", queue_size=2),
            post=FakePost(block=True),
        )  # fmt: skip
        failing = Webhook(
            hub.hub, WebhookConfig(url="http://127.0.0.1:9/", backoff=FAST),
            post=FakePost(failures=100), rng=random.Random(1),
        )  # fmt: skip
        await nursery.start(blocked.run)
        await nursery.start(failing.run)
        for i in range(4):
            async with hub.open_agent(f"w{i}"):
                pass
        await trio.sleep(5)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WebhookCollector([blocked, failing]))
        text = generate_latest(registry).decode()
    assert "s3cret" not in text and "k=v" not in text
    first = 'host="hooks.example.com",webhook="0"'
    second = 'host="127.0.0.1",webhook="1"'
    assert f"artcafe_webhook_dropped_total{{{first}}} 5.0" in text  # as the full-queue test
    assert f"artcafe_webhook_queued{{{first}}} 2.0" in text
    assert f"artcafe_webhook_sent_total{{{first}}} 0.0" in text
    assert f"artcafe_webhook_failed_total{{{second}}} 8.0" in text  # every document, given up
    assert f"artcafe_webhook_retries_total{{{second}}} 24.0" in text  # 3 retries each
    assert "# TYPE artcafe_webhook_failed_total counter" in text


async def test_retries_wait_full_jitter_backoff_exactly(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    backoff = Backoff(base=1.0, cap=8.0, max_attempts=4)
    fake = FakePost(failures=3, status=503)
    async with open_test_hub() as hub:
        await fake_webhook(hub, nursery, fake, backoff=backoff)
        async with hub.open_agent("w"):
            await trio.sleep(60)
    times = [t for t, d in fake.calls if d["status"] == "online"]
    expected = list(backoff.delays(random.Random(3)))[:3]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx(expected, abs=1e-6)
    assert len(times) == 4  # three failures, then accepted


async def test_a_4xx_answer_is_not_retried(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    fake = FakePost(failures=1, status=400)
    async with open_test_hub() as hub:
        webhook = await fake_webhook(hub, nursery, fake)
        async with hub.open_agent("w"):
            await trio.sleep(5)
        assert len([1 for _t, d in fake.calls if d["status"] == "online"]) == 1
        assert webhook.stats.failed == 1 and webhook.stats.retries == 0


def test_the_signature_check_in_the_docs_accepts_ours_and_refuses_a_forgery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "alerts.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.S)
    assert snippet is not None
    monkeypatch.setenv("ALERT_SECRET", "s3cret")
    namespace: dict[str, Any] = {}
    exec(snippet.group(1), namespace)
    body = b'{"status":"offline"}'
    assert namespace["verify"](body, sign(b"s3cret", body)) == {"status": "offline"}
    with pytest.raises(ValueError, match="bad signature"):
        namespace["verify"](body, sign(b"guess", body))
    with pytest.raises(ValueError, match="bad signature"):
        namespace["verify"](body + b" ", sign(b"s3cret", body))


def test_the_prometheus_rules_in_the_docs_parse_and_name_exported_metrics() -> None:
    import pathlib
    import re

    import yaml  # PyYAML: installed with mkdocs (the dev extra)

    import artcafe_trio.dashboard._alertmetrics as alertmetrics
    import artcafe_trio.hub._metrics as metrics

    root = pathlib.Path(__file__).parent.parent
    text = (root / "docs" / "alerts.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    rules = yaml.safe_load(block.group(1))
    [group] = rules["groups"]
    assert group["name"] == "artcafe-trio"
    exported = set(re.findall(r"``(artcafe_\w+)", f"{metrics.__doc__}{alertmetrics.__doc__}"))
    names = [rule["alert"] for rule in group["rules"]]
    assert len(names) == len(set(names)) >= 9
    used = set()
    for rule in group["rules"]:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        assert rule["labels"]["severity"] in ("page", "warn")
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])
        used |= set(re.findall(r"\bartcafe_\w+", rule["expr"]))
    assert used <= exported, used - exported  # every metric a rule reads is exported
    assert {"artcafe_slow_consumers_total", "artcafe_auth_failures_total",
            "artcafe_heartbeat_ack_rtt_seconds", "artcafe_webhook_failed_total"} <= used  # fmt: skip


async def test_https_receivers_are_verified(nursery: trio.Nursery) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    receiver = Receiver()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    tls = [trio.SSLListener(listener, server_context) for listener in listeners]
    nursery.start_soon(trio.serve_listeners, receiver._handle, tls)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    url = f"https://127.0.0.1:{port}/hook"
    assert await post(url, b"{}", [], time_limit=5, ssl_context=trusting) == 200
    assert receiver.received[0][1] == b"{}"
    with pytest.raises(HttpError, match="failed"):  # the system CAs do not know this one
        await post(url, b"{}", [], time_limit=5)
    assert len(receiver.received) == 1
