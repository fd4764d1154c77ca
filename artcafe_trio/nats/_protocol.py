"""Sans-IO NATS client protocol: server bytes in -> events out; commands -> bytes.

:class:`NatsParser` turns whatever chunks the socket delivers into
:class:`Info`, :class:`Msg`, :class:`Ping`, :class:`Pong`, :class:`Ok` and
:class:`Err` events; any split of the same stream gives the same events.
Malformed input raises :class:`NatsProtocolError` (with a ``reason``) and
poisons the parser. The ``encode_*`` functions build client commands and
refuse (``BadSubjectError``) anything that would break the framing.

Headers (``HMSG``/``HPUB``) are ``NATS/1.0[ <status>[ <description>]]\\r\\n``
followed by ``Key: Value`` lines and an empty line; :class:`Headers` keeps
repeated keys (multi-value) in order and the inline status (e.g. ``503``).

This module imports neither trio nor any socket library.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs

from ._errors import BadSubjectError, NatsProtocolError

__all__ = [
    "MAX_CONTROL_LINE",
    "PING",
    "PONG",
    "Err",
    "Event",
    "Headers",
    "Info",
    "Msg",
    "NatsParser",
    "Ok",
    "Ping",
    "Pong",
    "decode_headers",
    "encode_connect",
    "encode_headers",
    "encode_pub",
    "encode_sub",
    "encode_unsub",
]

#: The longest control line (operation and arguments) accepted, as the server's default.
MAX_CONTROL_LINE = 4096
#: Upper bound on a message's size when the caller gives none (the server's hard limit).
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024

PING = b"PING\r\n"
PONG = b"PONG\r\n"
_CRLF = b"\r\n"
_HEADER_LINE = "NATS/1.0"


@attrs.frozen
class Headers(Mapping[str, str]):
    """Message headers: ordered ``(key, value)`` pairs, an optional status line.

    As a mapping it gives the *first* value of a key; :meth:`get_all` gives all
    of them. Keys are case-sensitive, as in the server. ``status`` is the inline
    status code (``503`` for "no responders", ``100`` for JetStream heartbeats)
    and ``description`` its text.
    """

    fields: tuple[tuple[str, str], ...] = ()
    status: int | None = None
    description: str = ""

    @classmethod
    def of(
        cls,
        mapping: Mapping[str, str | Sequence[str]] | None = None,
        *,
        status: int | None = None,
        description: str = "",
    ) -> Headers:
        """Build headers from a mapping whose values are a string or a list of strings."""
        pairs: list[tuple[str, str]] = []
        for key, value in (mapping or {}).items():
            if isinstance(value, str):
                pairs.append((key, value))
            else:
                pairs.extend((key, v) for v in value)
        return cls(tuple(pairs), status, description)

    def __getitem__(self, key: str) -> str:
        for k, v in self.fields:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k for k, _ in self.fields))

    def __len__(self) -> int:
        return len({k for k, _ in self.fields})

    def get_all(self, key: str) -> list[str]:
        """Every value of ``key``, in order (empty when absent)."""
        return [v for k, v in self.fields if k == key]


@attrs.frozen
class Info:
    """The server's ``INFO``: the connection's parameters and the cluster's URLs."""

    info: dict[str, Any]


@attrs.frozen
class Msg:
    """A message: ``MSG`` or ``HMSG`` from the server (``sid`` is our subscription id)."""

    subject: str
    sid: int
    reply: str | None
    data: bytes
    headers: Headers | None = None


@attrs.frozen
class Ping:
    """The server's ``PING``: answer with ``PONG``."""


@attrs.frozen
class Pong:
    """The server's ``PONG``: answers our oldest unanswered ``PING``."""


@attrs.frozen
class Ok:
    """``+OK`` (only in verbose mode)."""


@attrs.frozen
class Err:
    """``-ERR '<message>'``: the message without its quotes."""

    message: str


Event = Info | Msg | Ping | Pong | Ok | Err

_PING_EVENT = Ping()
_PONG_EVENT = Pong()
_OK_EVENT = Ok()


def _size(token: bytes, what: str) -> int:
    if not token.isdigit() or len(token) > 12:
        raise NatsProtocolError("bad_size", f"{what} is not a decimal size: {token!r}")
    return int(token)


def _text(token: bytes, what: str) -> str:
    try:
        return token.decode()
    except UnicodeDecodeError:
        raise NatsProtocolError("bad_arguments", f"{what} is not UTF-8: {token!r}") from None


class NatsParser:
    """Incremental parser of the server-to-client byte stream.

    ``feed(chunk)`` returns the events completed by ``chunk``. ``max_payload``
    bounds a message's total size (headers and payload) so a broken server
    cannot make the client buffer without limit.
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        # While a message's payload is awaited: its parsed control line.
        self._pending: tuple[str, int, str | None, int, int] | None = None
        self._error: NatsProtocolError | None = None

    def feed(self, data: bytes | bytearray) -> list[Event]:
        """Consume ``data``; return the events it completes, in order."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except NatsProtocolError as exc:
            self._error = exc
            raise

    def _feed(self, data: bytes | bytearray) -> list[Event]:
        buf = self._buf
        buf += data
        events: list[Event] = []
        pos = 0
        end = len(buf)
        while pos < end:
            pending = self._pending
            if pending is not None:
                subject, sid, reply, hdr_len, total = pending
                if end - pos < total + 2:
                    break
                stop = pos + total
                if buf[stop : stop + 2] != _CRLF:
                    raise NatsProtocolError("missing_crlf", "payload not followed by CRLF")
                headers = None
                if hdr_len:
                    headers = decode_headers(bytes(buf[pos : pos + hdr_len]))
                events.append(Msg(subject, sid, reply, bytes(buf[pos + hdr_len : stop]), headers))
                pos = stop + 2
                self._pending = None
                continue
            nl = buf.find(b"\n", pos, pos + MAX_CONTROL_LINE + 2)
            if nl < 0:
                if end - pos > MAX_CONTROL_LINE + 1:
                    raise NatsProtocolError("line_too_long", "control line exceeds 4096 bytes")
                break
            if nl == pos or buf[nl - 1] != 0x0D:
                raise NatsProtocolError("missing_crlf", "control line not ended by CRLF")
            line = bytes(buf[pos : nl - 1])
            pos = nl + 1
            event = self._control(line)
            if event is not None:
                events.append(event)
        del buf[:pos]
        return events

    def _control(self, line: bytes) -> Event | None:
        parts = line.split(None, 1)
        op = parts[0].upper() if parts else b""
        rest = parts[1] if len(parts) == 2 else b""
        if op == b"MSG" or op == b"HMSG":
            args = rest.split()
            with_headers = op == b"HMSG"
            sizes = 2 if with_headers else 1
            if len(args) not in (2 + sizes, 3 + sizes):
                raise NatsProtocolError("bad_arguments", f"{op.decode()} with {len(args)} args")
            subject = _text(args[0], "subject")
            if not args[1].isdigit():
                raise NatsProtocolError("bad_arguments", f"sid is not an integer: {args[1]!r}")
            sid = int(args[1])
            reply = _text(args[2], "reply") if len(args) == 3 + sizes else None
            total = _size(args[-1], "size")
            hdr_len = _size(args[-2], "header size") if with_headers else 0
            if hdr_len > total:
                raise NatsProtocolError("bad_size", "header size exceeds total size")
            if with_headers and hdr_len < len(_HEADER_LINE) + 4:
                raise NatsProtocolError("bad_size", "header block too short")
            if total > self.max_payload:
                raise NatsProtocolError("payload_too_large", f"{total} > {self.max_payload}")
            self._pending = (subject, sid, reply, hdr_len, total)
            return None
        if rest.strip() == b"" and op in (b"PING", b"PONG", b"+OK"):
            return _PING_EVENT if op == b"PING" else _PONG_EVENT if op == b"PONG" else _OK_EVENT
        if op == b"INFO":
            try:
                info = json.loads(rest)
            except (ValueError, RecursionError):
                raise NatsProtocolError("bad_json", "INFO is not JSON") from None
            if not isinstance(info, dict):
                raise NatsProtocolError("bad_json", "INFO is not a JSON object")
            return Info(info)
        if op == b"-ERR":
            text = _text(rest.strip(), "error")
            if len(text) >= 2 and text[0] == text[-1] == "'":
                text = text[1:-1]
            return Err(text)
        raise NatsProtocolError("unknown_operation", f"unexpected line {line[:40]!r}")


def decode_headers(block: bytes) -> Headers:
    """Parse an ``HMSG`` header block (status line, ``Key: Value`` lines, empty line)."""
    try:
        text = block.decode()
    except UnicodeDecodeError:
        raise NatsProtocolError("bad_header", "headers are not UTF-8") from None
    if not text.endswith("\r\n\r\n"):
        raise NatsProtocolError("bad_header", "header block not ended by an empty line")
    lines = text[:-4].split("\r\n")
    first = lines[0]
    if not first.startswith(_HEADER_LINE):
        raise NatsProtocolError("bad_header", f"bad header version line {first[:20]!r}")
    status: int | None = None
    description = ""
    tail = first[len(_HEADER_LINE) :]
    if tail:
        if tail[0] != " ":
            raise NatsProtocolError("bad_header", f"bad header version line {first[:20]!r}")
        code, _, description = tail.strip().partition(" ")
        if len(code) != 3 or not code.isdigit():
            raise NatsProtocolError("bad_header", f"bad status code {code!r}")
        status = int(code)
        description = description.strip()
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if not sep or not key or key != key.strip() or "\n" in line or "\r" in line:
            raise NatsProtocolError("bad_header", f"bad header line {line[:40]!r}")
        fields.append((key, value.strip()))
    return Headers(tuple(fields), status, description)


def _check_token(value: str, what: str) -> bytes:
    try:
        raw = value.encode()
    except UnicodeEncodeError:
        raise BadSubjectError(f"{what} is not encodable as UTF-8: {value!r}") from None
    parts = raw.split()
    if len(parts) != 1 or len(parts[0]) != len(raw):
        raise BadSubjectError(f"{what} must be non-empty and contain no whitespace: {value!r}")
    return raw


def encode_headers(headers: Headers | Mapping[str, str | Sequence[str]]) -> bytes:
    """The header block for ``HPUB``; values are sent as given (no folding)."""
    h = headers if isinstance(headers, Headers) else Headers.of(headers)
    parts = [_HEADER_LINE]
    if h.status is not None:
        if not 100 <= h.status <= 999:
            raise BadSubjectError(f"status must be three digits: {h.status!r}")
        parts[0] += f" {h.status}" + (f" {h.description}" if h.description else "")
    for key, value in h.fields:
        if not key or ":" in key or key != key.strip() or any(c in key for c in " \t\r\n"):
            raise BadSubjectError(f"bad header key {key!r}")
        if "\r" in value or "\n" in value or value != value.strip():
            raise BadSubjectError(f"header value must be one trimmed line: {value!r}")
        parts.append(f"{key}: {value}")
    if "\r" in h.description or "\n" in h.description or h.description != h.description.strip():
        raise BadSubjectError(f"status description must be one trimmed line: {h.description!r}")
    return ("\r\n".join(parts) + "\r\n\r\n").encode()


def encode_connect(options: Mapping[str, Any]) -> bytes:
    """``CONNECT {json}``."""
    return b"CONNECT " + json.dumps(options, separators=(",", ":")).encode() + _CRLF


def encode_pub(
    subject: str, payload: bytes, *, reply: str | None = None, headers: bytes | None = None
) -> bytes:
    """``PUB`` (or ``HPUB`` when ``headers`` is an encoded header block)."""
    subj = _check_token(subject, "subject")
    rep = b" " + _check_token(reply, "reply") if reply is not None else b""
    if headers is None:
        return b"PUB %s%s %d\r\n%s\r\n" % (subj, rep, len(payload), payload)
    hl = len(headers)
    return b"HPUB %s%s %d %d\r\n%s%s\r\n" % (subj, rep, hl, hl + len(payload), headers, payload)


def encode_sub(subject: str, sid: int, *, queue: str | None = None) -> bytes:
    """``SUB <subject> [queue] <sid>``."""
    subj = _check_token(subject, "subject")
    q = b" " + _check_token(queue, "queue group") if queue is not None else b""
    return b"SUB %s%s %d\r\n" % (subj, q, sid)


def encode_unsub(sid: int, max_msgs: int | None = None) -> bytes:
    """``UNSUB <sid> [max_msgs]``."""
    if max_msgs is None:
        return b"UNSUB %d\r\n" % sid
    return b"UNSUB %d %d\r\n" % (sid, max_msgs)
