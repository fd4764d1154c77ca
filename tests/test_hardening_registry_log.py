"""Hardening: a registry that keeps refusing writes does not flood the log (issue 9,
item 11). Before, every failed presence write logged an ERROR line, at every retry, for
as long as the registry failed; now the first failure is logged at once, then one line
a minute with the count, and one line when writes work again."""

from __future__ import annotations

import logging

import pytest
import trio

from artcafe_trio.registry._registry import RegistryError
from artcafe_trio.testing import open_test_hub

from .conftest import raw_connect

pytestmark = pytest.mark.timeout(60)


async def test_failing_presence_writes_are_logged_once_a_minute_with_a_count(
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="artcafe_trio.hub")
    async with open_test_hub(close_timeout=0.05) as hub:
        key = hub.register("t1", "a1")
        tries = 0
        original = hub.registry.record_presence

        def broken(changes: object) -> None:
            nonlocal tries
            tries += 1
            raise RegistryError("disk I/O error")

        monkeypatch.setattr(hub.registry, "record_presence", broken)
        await raw_connect(hub, nursery, "a1", "t1", key)  # queues "online"
        await trio.sleep(130)
        lines = [r.getMessage() for r in caplog.records if "write presence" in r.getMessage()]
        assert tries > 10  # retried all along (at every flush)
        assert len(lines) == 3, lines  # at 0 s, 60 s and 120 s
        assert lines[0] == "cannot write presence to the registry (will retry): disk I/O error"
        assert "more failed tries since the last such line" in lines[1]
        assert "in all" in lines[2]
        writer = hub.hub._presence_writer
        assert writer.write_failures == tries
        monkeypatch.setattr(hub.registry, "record_presence", original)
        await trio.sleep(3)
        assert not writer.pending
        assert writer.write_failures == 0
        assert any(
            "presence writes to the registry work again" in r.getMessage() for r in caplog.records
        )
