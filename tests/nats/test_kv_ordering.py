"""The ordered watcher's bookkeeping, message by message (no server needed)."""

from __future__ import annotations

from typing import Any

from artcafe_trio.nats import Headers, KvEntry, KvOp, Msg
from artcafe_trio.nats._kv import KeyValue, KvWatcher


class StubClient:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self._reconnect_hooks: list[Any] = []

    def _write(self, data: bytes) -> None:
        self.written.append(data)


def make_watcher() -> tuple[KvWatcher, StubClient]:
    nc = StubClient()
    kv = KeyValue(nc, "b", {}, 5.0)  # type: ignore[arg-type]
    return KvWatcher(kv, ">", False, 1.0), nc


def delivery(
    key: str,
    stream_seq: int,
    consumer_seq: int,
    pending: int = 0,
    *,
    v2: bool = False,
    headers: Headers | None = None,
) -> Msg:
    if v2:
        reply = (
            f"$JS.ACK.dom.acchash.KV_b.c1.1.{stream_seq}.{consumer_seq}.1700000000.{pending}.tok"
        )
    else:
        reply = f"$JS.ACK.KV_b.c1.1.{stream_seq}.{consumer_seq}.1700000000.{pending}"
    return Msg(f"$KV.b.{key}", 1, reply, b"v%d" % stream_seq, headers)


def test_deliveries_in_order_become_entries_and_catch_up() -> None:
    w, _ = make_watcher()
    assert w._process(delivery("a", 3, 1, pending=1)) == KvEntry("b", "a", b"v3", 3, KvOp.PUT)
    assert not w.caught_up
    assert w._process(delivery("x.y", 7, 2, v2=True)) == KvEntry("b", "x.y", b"v7", 7, KvOp.PUT)
    assert w.caught_up
    assert not w._reset_needed


def test_a_consumer_sequence_gap_asks_for_a_reset_and_yields_nothing() -> None:
    w, _ = make_watcher()
    w._process(delivery("a", 3, 1))
    assert w._process(delivery("a", 9, 3)) is None  # consumer seq 2 went missing
    assert w._reset_needed
    assert w._last_stream_seq == 3  # the reset resumes after the last one delivered


def test_after_a_reset_already_delivered_revisions_are_skipped() -> None:
    w, _ = make_watcher()
    w._process(delivery("a", 5, 1))
    w._consumer_seq = 0  # a new consumer starts counting again
    assert w._process(delivery("a", 5, 1)) is None
    assert w._process(delivery("a", 6, 2)) == KvEntry("b", "a", b"v6", 6, KvOp.PUT)


def test_flow_control_is_answered_and_heartbeats_check_the_sequence() -> None:
    w, nc = make_watcher()
    w._process(delivery("a", 1, 1))
    flow = Msg("inbox", 1, "$JS.FC.KV_b.x.y", b"", Headers((), 100, "FlowControl Request"))
    assert w._process(flow) is None
    assert nc.written == [b"PUB $JS.FC.KV_b.x.y 0\r\n\r\n"]
    good = Msg(
        "inbox",
        1,
        None,
        b"",
        Headers((("Nats-Last-Consumer", "1"), ("Nats-Last-Stream", "1")), 100, "Idle Heartbeat"),
    )
    assert w._process(good) is None
    assert not w._reset_needed
    behind = Msg(
        "inbox", 1, None, b"", Headers((("Nats-Last-Consumer", "2"),), 100, "Idle Heartbeat")
    )
    assert w._process(behind) is None
    assert w._reset_needed


def test_markers_and_operations_map_to_kv_ops() -> None:
    w, _ = make_watcher()
    cases = [
        (Headers((("KV-Operation", "DEL"),)), KvOp.DELETE),
        (Headers((("KV-Operation", "PURGE"), ("Nats-Rollup", "sub"))), KvOp.PURGE),
        (Headers((("Nats-Marker-Reason", "MaxAge"), ("Nats-TTL", "1s"))), KvOp.EXPIRED),
        (Headers((("Nats-Marker-Reason", "Purge"),)), KvOp.PURGE),
        (Headers((("Nats-Marker-Reason", "Remove"),)), KvOp.DELETE),
    ]
    for seq, (headers, op) in enumerate(cases, start=1):
        entry = w._process(delivery("k", seq, seq, headers=headers))
        assert entry == KvEntry("b", "k", b"", seq, op)
