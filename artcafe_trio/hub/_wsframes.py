"""The fast path of the hub's WebSocket reader: whole text frames decoded without wsproto.

Agents send one unfragmented, masked text frame per protocol frame. wsproto's parser
(pure Python, several objects per frame) was a fifth of the hub's CPU per routed
message. :class:`FrameSplitter` sits in front of it (sans-IO): it finds frame
boundaries in the received bytes, decodes the common frame itself, and hands every
other byte, in order, to wsproto, which stays the judge of everything else.

A frame is decoded here only if wsproto would turn it into exactly one complete
``TextMessage`` with nothing else to say: FIN set, no RSV bit, opcode text, masked
(a client's frames must be), the shortest length encoding, not inside a fragmented
message, at most ``max_message_size`` bytes, and valid UTF-8 (Python's strict codec,
the one wsproto uses). Anything else — control frames, binary or fragmented messages,
an oversized or malformed header, invalid UTF-8 — is passed through byte for byte as
it arrives (a frame longer than the limit is never buffered here), so wsproto raises
the same close codes (1002, 1007, …) and the reader's 1009 check sees the same parts.
Only a frame that qualifies waits here until it is complete.
"""

from __future__ import annotations

__all__ = ["FrameSplitter", "unmask"]

_MAX_HEADER = 14  # 2 + 8 (64-bit length) + 4 (mask)


def unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """``payload`` XOR the repeated 4-byte ``mask`` (RFC 6455 §5.3)."""
    size = len(payload)
    if not size:
        return b""
    key = (bytes(mask) * ((size >> 2) + 1))[:size]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return value.to_bytes(size, "little")


def _header_length(buf: bytes | bytearray, pos: int) -> int:
    """How many bytes the header at ``buf[pos:]`` has (2 while that is unknown)."""
    if len(buf) - pos < 2:
        return 2
    second = buf[pos + 1]
    size = second & 0x7F
    return 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if second & 0x80 else 0)


def _header(buf: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    """``(header length, payload length)`` of the frame at ``buf[pos:]``, or ``None``
    while its header is incomplete."""
    available = len(buf) - pos
    if available < 2:
        return None
    head = _header_length(buf, pos)
    if available < head:
        return None
    size = buf[pos + 1] & 0x7F
    if size == 126:
        size = int.from_bytes(buf[pos + 2 : pos + 4], "big")
    elif size == 127:
        size = int.from_bytes(buf[pos + 2 : pos + 10], "big")
    return head, size


class FrameSplitter:
    """Received bytes → messages decoded here (``str``) and bytes for wsproto (``bytes``),
    in the order they came (see the module docstring)."""

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._pending = bytearray()  # the start of a frame that may qualify
        self._need = 0  # how long the pending bytes must be before looking again
        self._through = 0  # bytes of the current frame still to pass to wsproto
        self._head = b""  # a passed-through frame's header so far, while incomplete
        self._in_message = False  # inside a fragmented message (wsproto's business)

    def split(self, data: bytes) -> list[str | bytes]:
        out: list[str | bytes] = []
        if self._pending:
            self._pending += data
            if len(self._pending) < self._need:
                return out
            buf: bytes | bytearray = self._pending
            self._pending = bytearray()
        else:
            buf = data
        self._need = 0
        pos, end = 0, len(buf)
        while pos < end:
            if self._head:  # a passed-through frame whose header was cut
                probe = self._head + bytes(buf[pos : pos + _MAX_HEADER])
                header = _header(probe, 0)
                if header is None:
                    self._head = probe
                    out.append(bytes(buf[pos:]))
                    return out
                fed = len(self._head)
                self._head = b""
                self._through = header[0] + header[1] - fed
                continue
            if self._through:
                step = min(self._through, end - pos)
                out.append(bytes(buf[pos : pos + step]))
                self._through -= step
                pos += step
                continue
            first = buf[pos]
            qualifies = first == 0x81 and not self._in_message
            if qualifies and end - pos >= 2:
                qualifies = bool(buf[pos + 1] & 0x80)
            header = _header(buf, pos)
            if header is None:
                if qualifies:  # wait for the rest of the header
                    self._keep(buf, pos, _header_length(buf, pos))
                else:
                    self._head = bytes(buf[pos:])
                    self._pass(first)
                    out.append(self._head)
                return out
            head, size = header
            total = head + size
            fits = size <= self.max_message_size
            if qualifies and fits and self._shortest(buf[pos + 1] & 0x7F, size):
                if end - pos < total:
                    self._keep(buf, pos, total)
                    return out
                start = pos + head
                payload = unmask(buf[start : pos + total], buf[start - 4 : start])
                try:
                    out.append(payload.decode("utf-8"))
                    pos += total
                    continue
                except UnicodeDecodeError:
                    pass  # wsproto closes with 1007
            self._pass(first)
            self._through = total
        return out

    def _keep(self, buf: bytes | bytearray, pos: int, need: int) -> None:
        self._pending = bytearray(buf[pos:])
        self._need = need

    def _pass(self, first: int) -> None:
        """A frame goes to wsproto: follow whether a fragmented message is open."""
        opcode = first & 0x0F
        if opcode in (0, 1, 2):  # continuation, text, binary
            self._in_message = not first & 0x80

    @staticmethod
    def _shortest(code: int, size: int) -> bool:
        if code == 126:
            return size > 125
        if code == 127:
            return size > 0xFFFF and not size >> 63
        return True
