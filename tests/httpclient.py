"""A tiny HTTP/1.1 client over trio (h11) for dashboard tests: GET and an SSE reader."""

from __future__ import annotations

import json
from typing import Any

import h11
import trio


class HttpResult:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


async def get(
    port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> HttpResult:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            fields = [("Host", "127.0.0.1"), *(headers or {}).items()]
            if method == "POST":
                fields.append(("Content-Length", "0"))
            await stream.send_all(
                conn.send(h11.Request(method=method, target=path, headers=fields))
            )
            await stream.send_all(conn.send(h11.EndOfMessage()))
            status, got, body = 0, {}, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    got = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return HttpResult(status, got, body)


class SseReader:
    """Reads server-sent events from an open response."""

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self.status = 0
        self.buffer = b""

    async def _more(self) -> bool:
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                self.status = event.status_code
                continue
            if isinstance(event, h11.Data):
                self.buffer += event.data
                return True
            return False  # end of the stream

    async def event(self) -> tuple[str, Any]:
        """The next ``(name, data)``; comments and ``retry`` lines are skipped."""
        while True:
            while b"\n\n" in self.buffer:
                block, self.buffer = self.buffer.split(b"\n\n", 1)
                name, data = "message", ""
                for line in block.decode().split("\n"):
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        data += line[6:]
                if data:
                    return name, json.loads(data)
            if not await self._more():
                raise EOFError("the feed ended")


async def open_sse(port: int, path: str, headers: dict[str, str]) -> tuple[SseReader, Any]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    fields = [("Host", "127.0.0.1"), *headers.items()]
    await stream.send_all(conn.send(h11.Request(method="GET", target=path, headers=fields)))
    await stream.send_all(conn.send(h11.EndOfMessage()))
    reader = SseReader(stream, conn)
    while reader.status == 0:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            reader.status = event.status_code
    return reader, stream
