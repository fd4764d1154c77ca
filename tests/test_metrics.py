"""Prometheus metrics: the collector reads the hub at scrape time; the HTTP server serves it."""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
import trio

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest

from artcafe_trio import AuthenticationError
from artcafe_trio.hub._metrics import collector, start_metrics_server
from artcafe_trio.testing import open_test_hub

from .ports import free_port


def _samples(hub: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the collector yields, keyed by (sample name, sorted labels)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in collector(hub).collect():
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_collector_reports_presence_and_traffic() -> None:
    async with open_test_hub(disconnect_grace=0) as test_hub:
        hub = test_hub.hub
        received = trio.Event()
        async with (
            test_hub.open_agent("a1", tenant_id="acme", heartbeat_interval=1.0) as a1,
            test_hub.open_agent("a2", tenant_id="acme", heartbeat_interval=1.0) as a2,
        ):
            await a2.subscribe("tasks.*", lambda subject, data: received.set())
            await a1.publish("tasks.new", {"n": 1}, confirm=True)
            with trio.fail_after(5):
                await received.wait()
            async with test_hub.open_agent("b1", tenant_id="other"):
                samples = _samples(hub)
        assert samples[("artcafe_agents_online", (("tenant", "acme"),))] == 2
        assert samples[("artcafe_agents_online", (("tenant", "other"),))] == 1
        assert samples[("artcafe_messages_routed_total", ())] >= 1
        assert samples[("artcafe_deliveries_total", ())] >= 1
        assert samples[("artcafe_connections_total", ())] == 3
        assert samples[("artcafe_heartbeats_total", ())] >= 2
        assert samples[("artcafe_presence_transitions_total", (("reason", "connected"),))] == 3
        # Reasons that have not happened yet are exported as 0, not missing.
        assert samples[("artcafe_presence_transitions_total", (("reason", "timeout"),))] == 0
        for name in ("slow_consumers", "auth_failures", "refused_frames", "rate_limited"):
            assert samples[(f"artcafe_{name}_total", ())] == 0

        # After everyone left: the gauge drops to 0 (the tenant's series stays), and the
        # transitions counter has the three graceful leaves.
        samples = _samples(hub)
        assert samples[("artcafe_agents_online", (("tenant", "acme"),))] == 0
        assert samples[("artcafe_agents_online", (("tenant", "other"),))] == 0
        assert samples[("artcafe_presence_transitions_total", (("reason", "left"),))] == 3


async def test_collector_counts_auth_failures() -> None:
    async with open_test_hub() as test_hub:
        stranger = test_hub.register("acme", "someone-else")
        with pytest.raises(AuthenticationError):
            async with test_hub.open_agent("intruder", tenant_id="acme", private_key=stranger):
                pass  # pragma: no cover
        samples = _samples(test_hub.hub)
    assert samples[("artcafe_auth_failures_total", ())] == 1


async def test_exposition_text_format() -> None:
    """The collector is valid for a CollectorRegistry and renders the documented names."""
    async with open_test_hub() as test_hub, test_hub.open_agent("a1", tenant_id="acme"):
        registry = CollectorRegistry()
        registry.register(collector(test_hub.hub))
        text = generate_latest(registry).decode()
    assert 'artcafe_agents_online{tenant="acme"} 1.0' in text
    assert "# TYPE artcafe_heartbeats_total counter" in text
    assert 'artcafe_presence_transitions_total{reason="connected"} 1.0' in text


def _free_port() -> int:
    return free_port()


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


async def test_http_server_serves_metrics() -> None:
    async with open_test_hub() as test_hub:
        async with (
            test_hub.open_agent("a1", tenant_id="acme"),
            test_hub.open_agent("a2", tenant_id="acme"),
        ):
            port = _free_port()
            start_metrics_server(test_hub.hub, port)
            # The scrape runs in a worker thread; the collector reads the hub on this
            # (trio) thread through the trio token, so the loop must keep running.
            with trio.fail_after(10):
                text = await trio.to_thread.run_sync(_fetch, f"http://127.0.0.1:{port}/metrics")
        assert 'artcafe_agents_online{tenant="acme"} 2.0' in text
        assert "artcafe_messages_routed_total" in text
        # Its own registry: none of prometheus_client's default process/platform metrics.
        assert "process_cpu_seconds_total" not in text
        assert "python_info" not in text


async def test_flow_control_is_exported(autojump_clock: Any) -> None:
    async with open_test_hub(
        max_unauthenticated_per_address=2, handshake_timeout=1.0, close_timeout=0.5
    ) as test_hub:
        hub = test_hub.hub
        idle = [await test_hub.connect_in_memory(remote="10.1.1.1") for _ in range(3)]
        await trio.sleep(0.1)
        samples = _samples(hub)
        assert samples[("artcafe_unauthenticated_connections", ())] == 2
        assert samples[("artcafe_unauthenticated_evicted_total", ())] == 1
        assert samples[("artcafe_output_queued_bytes", ())] == 0
        assert samples[("artcafe_output_budget_cut_offs_total", ())] == 0
        await trio.sleep(2)  # the two left never finish their upgrade
        samples = _samples(hub)
        assert samples[("artcafe_handshake_timeouts_total", ())] == 2
        assert samples[("artcafe_unauthenticated_connections", ())] == 0
        for stream in idle:
            await stream.aclose()
