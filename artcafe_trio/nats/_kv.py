"""A JetStream key-value subset over the JetStream API subjects.

A bucket ``B`` is the stream ``KV_B`` on subjects ``$KV.B.>``; a key's value
is the last message on ``$KV.B.<key>`` and its revision that message's stream
sequence. Writes are publishes that wait for the stream's ack; compare-and-set
uses ``Nats-Expected-Last-Subject-Sequence``; deletes and purges are markers
(``KV-Operation: DEL`` / ``PURGE`` + ``Nats-Rollup: sub``). Reads use the
stream leader's ``STREAM.MSG.GET`` (read-your-writes). Per-key TTL is the
``Nats-TTL`` header (stream ``allow_msg_ttl``); with ``limit_marker_ttl`` the
server writes a marker (``Nats-Marker-Reason``) when a key expires, which
watchers report as :attr:`KvOp.EXPIRED`.

Watching uses an ordered push consumer: ack-less, flow-controlled, with idle
heartbeats. A gap in consumer sequences, a missed heartbeat or a reconnect
recreates the consumer from the next stream sequence, so a watcher sees every
revision once, in order.
"""

from __future__ import annotations

import base64
import enum
import logging
import math
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from ._client import NatsClient, Subscription, new_inbox
from ._errors import (
    BucketNotFoundError,
    JetStreamError,
    KeyExistsError,
    NatsError,
    NatsTimeoutError,
    NoRespondersError,
    WrongLastRevisionError,
)
from ._jsapi import _api, _api_resent, _decode_answer
from ._protocol import Headers, Msg, decode_headers, encode_pub

__all__ = ["KeyValue", "KvEntry", "KvOp", "KvWatcher", "key_value"]

log = logging.getLogger("artcafe_trio.nats")

_BUCKET = re.compile(r"^[a-zA-Z0-9_-]+$")
_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
_NS = 1_000_000_000
_ERR_STREAM_NOT_FOUND = 10059
_ERR_NO_PEERS = 10005  # "no suitable peers for placement": a cluster still forming or failing over
_ERR_NO_MESSAGE = 10037
_ERR_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"
_ERR_TTL_DISABLED = 10166  # "per-message TTL is disabled" (no allow_msg_ttl)
# "wrong last sequence: N" from the stream, and the same check failed in clustered mode.
_ERR_WRONG_LAST_SEQUENCE = (10071, 10164)


class KvOp(enum.Enum):
    """What a revision did to its key."""

    PUT = "PUT"
    DELETE = "DEL"
    PURGE = "PURGE"
    #: The key's TTL (or the bucket's max age) removed it; a server-written marker.
    EXPIRED = "EXPIRED"


@attrs.frozen
class KvEntry:
    """One revision of a key. ``value`` is empty for deletes, purges and expiries.

    ``time`` and ``ttl`` describe the revision; they take no part in equality."""

    bucket: str
    key: str
    value: bytes
    revision: int
    op: KvOp
    time: float | None = attrs.field(default=None, eq=False)
    """When the server stored this revision (Unix time, s); ``None`` if not reported."""
    ttl: float | None = attrs.field(default=None, eq=False)
    """This revision's own TTL (the ``Nats-TTL`` header), s; ``None`` without one."""


def _rfc3339(text: str) -> float | None:
    """A JetStream message time (RFC 3339, nanoseconds, ``Z``) as Unix time."""
    import datetime

    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", text)
    if match is None:
        return None
    whole = datetime.datetime.fromisoformat(match[1]).replace(tzinfo=datetime.UTC)
    return whole.timestamp() + (float("0." + match[2]) if match[2] else 0.0)


def _ttl_of(headers: Mapping[str, str] | None) -> float | None:
    text = (headers or {}).get("Nats-TTL")
    match = re.fullmatch(r"(\d+)(s?)", text or "")
    return float(match[1]) if match else None


def _check_key(key: str, *, pattern: bool = False) -> None:
    ok = _KEY.match(key.replace("*", "a").replace(">", "a") if pattern else key)
    if not ok or key.startswith(".") or key.endswith(".") or ".." in key:
        raise ValueError(f"invalid key{' pattern' if pattern else ''}: {key!r}")


def _ttl_header(ttl: float) -> str:
    if not ttl >= 1 or not math.isfinite(ttl):
        raise ValueError(f"ttl must be a finite number of seconds >= 1, got {ttl!r}")
    return f"{math.ceil(ttl)}s"


def _op_of(headers: Mapping[str, str] | None) -> KvOp:
    if not headers:
        return KvOp.PUT
    reason = headers.get("Nats-Marker-Reason")
    if reason is not None:  # a server-written limit marker (ADR-48)
        if reason == "Remove":
            return KvOp.DELETE
        return KvOp.PURGE if reason == "Purge" else KvOp.EXPIRED
    op = headers.get("KV-Operation")
    if op == "DEL":
        return KvOp.DELETE
    if op == "PURGE":
        return KvOp.PURGE
    return KvOp.PUT


class KeyValue:
    """A bound key-value bucket. Obtain one with :func:`key_value`."""

    def __init__(self, nc: NatsClient, bucket: str, config: Mapping[str, Any], timeout: float):
        self._nc = nc
        self.bucket = bucket
        self.stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._timeout = timeout
        #: The stream configuration as the server reported it when binding.
        self.config = dict(config)

    def _subject(self, key: str) -> str:
        _check_key(key)
        return self._prefix + key

    async def _publish(self, key: str, value: bytes, headers: Mapping[str, str]) -> int:
        subject = self._subject(key)
        msg = None
        with trio.move_on_after(self._timeout):
            delay = 0.01
            while True:
                try:
                    msg = await self._nc.request(subject, value, headers=headers or None)
                    break
                except NoRespondersError:
                    # Nobody stored it (503): the stream's interest has not reached this
                    # server yet, or its leader is being elected. Safe to send again.
                    await trio.sleep(delay)
                    delay = min(delay * 2, 0.25)
        if msg is None:
            raise NatsTimeoutError(f"no ack for {subject} within {self._timeout:g} s")
        try:
            ack = _decode_answer(msg)
        except JetStreamError as exc:
            if exc.err_code in _ERR_WRONG_LAST_SEQUENCE:
                raise WrongLastRevisionError(
                    exc.code, exc.err_code, exc.description, key=key
                ) from None
            if exc.err_code == _ERR_TTL_DISABLED:
                hint = f"{exc.description}: bucket {self.bucket!r} was made without allow_msg_ttl"
                raise JetStreamError(exc.code, exc.err_code, hint) from None
            raise
        return int(ack["seq"])

    async def put(self, key: str, value: bytes) -> int:
        """Set ``key`` to ``value``; returns the new revision."""
        return await self._publish(key, value, {})

    async def create(self, key: str, value: bytes, *, ttl: float | None = None) -> int:
        """Set ``key`` only if it has no live value; raises :class:`KeyExistsError`.

        A key whose last revision is a delete, purge or expiry counts as absent.
        When a concurrent write or expiry changes the key between the refusal and
        the look at its last revision, it looks again. ``ttl`` (seconds, >= 1)
        needs a bucket made with ``allow_msg_ttl``.
        """
        headers = {"Nats-Expected-Last-Subject-Sequence": "0"}
        if ttl is not None:
            headers["Nats-TTL"] = _ttl_header(ttl)
        try:
            return await self._publish(key, value, headers)
        except WrongLastRevisionError as exc:
            lost = exc
        while True:  # the key has a last revision: a live value, or a marker (absent)
            last = await self._last(key)
            if last is not None and last.op is KvOp.PUT:
                raise KeyExistsError(lost.code, lost.err_code, lost.description, key=key)
            try:
                if last is None:  # gone since the refusal (an expiry without a marker)
                    return await self._publish(key, value, headers)
                return await self.update(key, value, last=last.revision, ttl=ttl)
            except WrongLastRevisionError as exc:
                lost = exc  # written meanwhile: look again

    async def update(self, key: str, value: bytes, *, last: int, ttl: float | None = None) -> int:
        """Set ``key`` only if its last revision is ``last`` (compare-and-set).

        Raises :class:`WrongLastRevisionError` otherwise. Of two clients updating
        from the same revision, exactly one wins.
        """
        headers = {"Nats-Expected-Last-Subject-Sequence": str(last)}
        if ttl is not None:
            headers["Nats-TTL"] = _ttl_header(ttl)
        return await self._publish(key, value, headers)

    async def delete(self, key: str, *, last: int | None = None) -> int:
        """Mark ``key`` deleted (history is kept); optionally only if ``last`` is its revision."""
        headers = {"KV-Operation": "DEL"}
        if last is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(last)
        return await self._publish(key, b"", headers)

    async def purge(self, key: str) -> int:
        """Delete ``key`` and all its history, leaving one purge marker."""
        return await self._publish(key, b"", {"KV-Operation": "PURGE", "Nats-Rollup": "sub"})

    async def _last(self, key: str, revision: int | None = None) -> KvEntry | None:
        subject = self._subject(key)
        request: dict[str, Any] = (
            {"last_by_subj": subject} if revision is None else {"seq": revision}
        )
        try:
            answer = await _api(
                self._nc, f"$JS.API.STREAM.MSG.GET.{self.stream}", request, self._timeout
            )
        except JetStreamError as exc:
            if exc.err_code == _ERR_NO_MESSAGE:
                return None
            raise
        message = answer["message"]
        if message.get("subject") != subject:
            return None
        headers = None
        if message.get("hdrs"):
            headers = decode_headers(base64.b64decode(message["hdrs"]))
        data = base64.b64decode(message.get("data") or "")
        moment = message.get("time")
        return KvEntry(
            self.bucket, key, data, int(message["seq"]), _op_of(headers),
            _rfc3339(moment) if isinstance(moment, str) else None, _ttl_of(headers),
        )  # fmt: skip

    async def keys(self, pattern: str = ">") -> list[str]:
        """The keys matching ``pattern`` that have a last revision (live or a delete or
        expiry marker), sorted; from the stream's subject list (up to the server's page
        of 100,000 subjects: meant for small key families such as leases)."""
        _check_key(pattern, pattern=True)
        info = await _api(
            self._nc,
            f"$JS.API.STREAM.INFO.{self.stream}",
            {"subjects_filter": self._prefix + pattern},
            self._timeout,
        )
        subjects = (info.get("state") or {}).get("subjects") or {}
        return sorted(subject[len(self._prefix) :] for subject in subjects)

    async def last_revision(self) -> int:
        """The bucket's newest revision (its stream's last sequence; 0 when empty): every
        revision any key had so far is at most this, every later write is above it."""
        info = await _api(self._nc, f"$JS.API.STREAM.INFO.{self.stream}", None, self._timeout)
        return int((info.get("state") or {}).get("last_seq") or 0)

    async def entry(self, key: str) -> KvEntry | None:
        """The last revision of ``key`` whatever it did (a put, delete, purge or expiry
        marker), or ``None`` if the key never existed: what a compare-and-set needs."""
        return await self._last(key)

    async def get(self, key: str, *, revision: int | None = None) -> KvEntry | None:
        """The live value of ``key`` (or its ``revision``); ``None`` if absent or deleted."""
        entry = await self._last(key, revision)
        if entry is None or entry.op is not KvOp.PUT:
            return None
        return entry

    @asynccontextmanager
    async def watch(
        self,
        pattern: str = ">",
        *,
        include_history: bool = False,
        idle_heartbeat: float = 1.0,
    ) -> AsyncIterator[KvWatcher]:
        """Watch keys matching ``pattern`` (``*``/``>`` wildcards).

        Yields a :class:`KvWatcher`; iterate it for the current value of each key
        (every revision with ``include_history``), then every change in order.
        """
        _check_key(pattern, pattern=True)
        watcher = KvWatcher(self, pattern, include_history, idle_heartbeat)
        try:
            await watcher._start()
            yield watcher
        finally:
            with trio.CancelScope(shield=True):
                await watcher._stop()


class KvWatcher:
    """The revisions of a watched pattern, in stream order; ``async for entry in watcher``."""

    def __init__(self, kv: KeyValue, pattern: str, history: bool, heartbeat: float) -> None:
        self._kv = kv
        self._nc = kv._nc
        self._filter = kv._prefix + pattern
        self._history = history
        self._heartbeat = heartbeat
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._last_stream_seq = 0
        self._consumer_seq = 0
        self._reset_needed = False
        #: Times the consumer was recreated (gap, missed heartbeat or reconnect).
        self.resets = 0
        #: ``True`` once the initial values have all been delivered.
        self.caught_up = False

    def _on_reconnect(self) -> None:
        self._reset_needed = True
        if self._sub is not None:
            self._sub._poke()

    async def _start(self) -> None:
        self._nc._reconnect_hooks.append(self._on_reconnect)
        # Short attempts within api_timeout: just after a failover the API may not answer.
        with trio.move_on_after(self._kv._timeout):
            while True:
                try:
                    await self._create(min(self._kv._timeout, 1.0))
                    return
                except (NatsTimeoutError, NoRespondersError):
                    await trio.sleep(0.05)
        raise NatsTimeoutError(f"could not create a watch consumer within {self._kv._timeout:g} s")

    async def _create(self, limit: float | None = None) -> None:
        inbox = new_inbox()
        sub = await self._nc.subscribe(inbox)
        config: dict[str, Any] = {
            "deliver_subject": inbox,
            "filter_subject": self._filter,
            "ack_policy": "none",
            "max_deliver": 1,
            "replay_policy": "instant",
            "flow_control": True,
            "idle_heartbeat": int(self._heartbeat * _NS),
            "mem_storage": True,
            "num_replicas": 1,
            "inactive_threshold": int(max(30.0, self._heartbeat * 10) * _NS),
        }
        if self.caught_up or (self._history and self._last_stream_seq):
            config["deliver_policy"] = "by_start_sequence"
            config["opt_start_seq"] = self._last_stream_seq + 1
        else:
            # Without history, a reset before catching up takes the current values
            # again (what was already delivered is skipped): a start sequence would
            # replay revisions that the first snapshot had already superseded.
            config["deliver_policy"] = "all" if self._history else "last_per_subject"
        try:
            answer = await _api(
                self._nc,
                f"$JS.API.CONSUMER.CREATE.{self._kv.stream}",
                {"stream_name": self._kv.stream, "config": config},
                limit or self._kv._timeout,
            )
        except BaseException:
            await sub.unsubscribe()
            raise
        if self._sub is not None:
            await self._sub.unsubscribe()
        self._sub = sub
        self._consumer = str(answer.get("name"))
        self._consumer_seq = 0
        self._reset_needed = False
        if not answer.get("num_pending", 0) and (
            self.caught_up or not await self._stream_has_matching(limit or self._kv._timeout)
        ):
            self.caught_up = True  # nothing (more) to deliver

    async def _stream_has_matching(self, limit: float) -> bool:
        """Whether the stream holds a message the watch's filter matches, as its leader
        sees it. An R1 consumer may be placed on a replica that has not applied the
        latest writes yet and then report nothing pending although there is; its
        deliveries then come late, and ``caught_up`` waits for them. An error here
        keeps the consumer's own answer (logged)."""
        try:
            info = await _api(
                self._nc, f"$JS.API.STREAM.INFO.{self._kv.stream}",
                {"subjects_filter": self._filter}, limit,
            )  # fmt: skip
        except (NatsError, OSError) as exc:
            log.debug("watch: could not check the stream for pending values: %r", exc)
            return False
        state = info.get("state") if isinstance(info, dict) else None
        return isinstance(state, dict) and bool(state.get("subjects"))

    async def _delete_consumer(self, name: str) -> None:
        """Cleanup only (an unread consumer expires after its inactive threshold), so it
        is bounded short: after a node's death the API may not answer for a while, and
        neither a reset's new deliveries nor a stop should wait for it."""
        with trio.move_on_after(min(self._kv._timeout, 1.0)), _suppress_nats():
            await self._nc.request(f"$JS.API.CONSUMER.DELETE.{self._kv.stream}.{name}")

    async def _reset(self) -> None:
        """Recreate the consumer after the last stream sequence seen; retry until it works."""
        self.resets += 1
        failures = 0
        # A short bound per call: right after a failover the API may not answer.
        limit = min(self._kv._timeout, 1.0)
        while True:
            old = self._consumer
            try:
                await self._create(limit)
            except (NatsError, OSError) as exc:
                failures += 1
                log.debug("watch reset failed (%d): %r", failures, exc)
                await trio.sleep(min(1.0, 0.05 * 2**failures))
                continue
            if old is not None:
                await self._delete_consumer(old)
            return

    async def _stop(self) -> None:
        if self._on_reconnect in self._nc._reconnect_hooks:
            self._nc._reconnect_hooks.remove(self._on_reconnect)
        if self._sub is not None:
            await self._sub.unsubscribe()
        name, self._consumer = self._consumer, None
        if name is not None and self._nc.is_connected:
            await self._delete_consumer(name)

    def __aiter__(self) -> KvWatcher:
        return self

    async def __anext__(self) -> KvEntry:
        while True:
            if self._reset_needed:
                await self._reset()
            sub = self._sub
            assert sub is not None
            with trio.move_on_after(self._heartbeat * 3) as scope:
                msg = await sub._get(pokeable=True)
            if scope.cancelled_caught:
                log.debug("watch: no heartbeat within %g s; resetting", self._heartbeat * 3)
                self._reset_needed = True
                continue
            if msg is None:
                if sub._closed and not self._reset_needed:
                    raise StopAsyncIteration
                continue
            entry = self._process(msg)
            if entry is not None:
                return entry

    def _process(self, msg: Msg) -> KvEntry | None:
        headers: Headers | None = msg.headers
        if headers is not None and headers.status == 100:
            # Flow control (or a heartbeat reporting a stall): answer so delivery goes on.
            target = msg.reply or headers.get("Nats-Consumer-Stalled")
            if target:
                self._nc._write(encode_pub(target, b""))
            last = headers.get("Nats-Last-Consumer")
            if last is not None and int(last) != self._consumer_seq:
                self._reset_needed = True
            return None
        tokens = (msg.reply or "").split(".")
        if len(tokens) == 9:
            base = 2
        elif len(tokens) >= 11:
            base = 4
        else:
            return None  # not a JetStream delivery
        stream_seq = int(tokens[base + 3])
        consumer_seq = int(tokens[base + 4])
        pending = int(tokens[base + 6])
        if consumer_seq != self._consumer_seq + 1:
            self._reset_needed = True
            return None
        self._consumer_seq = consumer_seq
        if pending == 0:
            self.caught_up = True
        if stream_seq <= self._last_stream_seq:
            return None  # already delivered before a reset
        self._last_stream_seq = stream_seq
        key = msg.subject[len(self._kv._prefix) :]
        op = _op_of(headers)
        value = msg.data if op is KvOp.PUT else b""
        moment = int(tokens[base + 5]) / _NS
        return KvEntry(self._kv.bucket, key, value, stream_seq, op, moment, _ttl_of(headers))


class _suppress_nats:
    """Ignore NATS errors from a best-effort cleanup call."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, NatsError)


async def key_value(
    nc: NatsClient,
    bucket: str,
    *,
    create: bool = True,
    history: int = 1,
    replicas: int = 1,
    max_age: float | None = None,
    allow_msg_ttl: bool = False,
    limit_marker_ttl: float | None = None,
    storage: str = "file",
    api_timeout: float = 5.0,
) -> KeyValue:
    """Bind bucket ``bucket``, creating it (with this configuration) if it does not exist.

    An existing bucket is bound as it is (its configuration is not changed).
    ``limit_marker_ttl`` (seconds, >= 1) makes the server leave a marker when a
    key expires, so watchers see the expiry; it implies ``allow_msg_ttl``.
    Raises :class:`BucketNotFoundError` when it does not exist and ``create`` is false.
    Every later call on the bucket raises :class:`NatsTimeoutError` after ``api_timeout``.
    """
    if not _BUCKET.match(bucket):
        raise ValueError(f"invalid bucket name: {bucket!r}")
    if not 1 <= history <= 64:
        raise ValueError("history must be between 1 and 64")
    stream = f"KV_{bucket}"
    try:
        info = await _api_resent(nc, f"$JS.API.STREAM.INFO.{stream}", None, api_timeout)
        return KeyValue(nc, bucket, info["config"], api_timeout)
    except JetStreamError as exc:
        if exc.err_code != _ERR_STREAM_NOT_FOUND:
            raise
        if not create:
            raise BucketNotFoundError(exc.code, exc.err_code, exc.description) from None
    except NoRespondersError:
        raise JetStreamError(503, 0, "JetStream is not enabled on this server") from None
    config: dict[str, Any] = {
        "name": stream,
        "subjects": [f"$KV.{bucket}.>"],
        "retention": "limits",
        "max_msgs_per_subject": history,
        "max_bytes": -1,
        "max_msgs": -1,
        "max_age": int((max_age or 0) * _NS),
        "storage": storage,
        "num_replicas": replicas,
        "discard": "new",
        "allow_rollup_hdrs": True,
        "deny_delete": True,
        "deny_purge": False,
        "allow_direct": True,
        "duplicate_window": int(min(max_age or 120.0, 120.0) * _NS),
    }
    if allow_msg_ttl or limit_marker_ttl is not None:
        config["allow_msg_ttl"] = True
    if limit_marker_ttl is not None:
        if not limit_marker_ttl >= 1:
            raise ValueError("limit_marker_ttl must be >= 1 second")
        config["subject_delete_marker_ttl"] = int(limit_marker_ttl * _NS)
    info = await _create_stream(nc, stream, config, api_timeout)
    return KeyValue(nc, bucket, info["config"], api_timeout)


async def _create_stream(
    nc: NatsClient, stream: str, config: Mapping[str, Any], api_timeout: float
) -> Any:
    """Create the bucket's stream within ``api_timeout``: an unanswered create is sent
    again (:func:`_api_resent`); "no suitable peers" (a cluster forming, or whose peers
    are not current yet after a failover) is retried; a name in use (an unanswered
    create took effect, or another process created the bucket meanwhile) is bound."""
    deadline = trio.current_time() + api_timeout
    delay = 0.05
    while True:
        remaining = max(deadline - trio.current_time(), 0.001)
        try:
            return await _api_resent(nc, f"$JS.API.STREAM.CREATE.{stream}", config, remaining)
        except JetStreamError as exc:
            if exc.err_code == _ERR_STREAM_NAME_IN_USE:
                remaining = max(deadline - trio.current_time(), 0.001)
                return await _api_resent(nc, f"$JS.API.STREAM.INFO.{stream}", None, remaining)
            if exc.err_code != _ERR_NO_PEERS or trio.current_time() + delay >= deadline:
                raise
        await trio.sleep(delay)
        delay = min(delay * 2, 1.0)
