"""A small HTTP/1.1 and SSE client on raw asyncio sockets: cheap enough per event that the
measuring side is not what a benchmark measures."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Event:
    """One SSE event and when its last byte arrived (`time.perf_counter()` and wall clock)."""

    name: str
    data: Any
    at: float
    wall: float


@dataclass
class Response:
    """A response's status and headers; the body is read with `body()` or `events()`."""

    status: int
    headers: dict[str, str]
    conn: Connection
    chunked: bool
    length: int
    _pending: bytes = field(default=b"")

    async def body(self) -> bytes:
        """The whole body."""
        parts = [piece async for piece in self._pieces()]
        return b"".join(parts)

    async def json(self) -> Any:
        """The body as JSON."""
        return json.loads(await self.body())

    async def _pieces(self) -> AsyncIterator[bytes]:
        reader = self.conn.reader
        if not self.chunked:
            if self.length:
                yield await reader.readexactly(self.length)
            return
        while True:
            size_line = await reader.readline()
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await reader.readline()  # the empty line after the last chunk
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]

    async def events(self) -> AsyncIterator[Event]:
        """The body as SSE events (`data` parsed as JSON); comments are skipped."""
        buffer = b""
        async for piece in self._pieces():
            buffer += piece
            if b"\n\n" not in buffer:
                continue
            at, wall = time.perf_counter(), time.time()
            *blocks, buffer = buffer.split(b"\n\n")
            for block in blocks:
                name = "message"
                data: list[bytes] = []
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        data.append(line[6:])
                    elif line.startswith(b"event: "):
                        name = line[7:].decode()
                if data:
                    yield Event(name, json.loads(b"\n".join(data)), at, wall)


class Connection:
    """One keep-alive HTTP/1.1 connection; requests go one after another."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        """Connect (TCP_NODELAY: a socket made with IPPROTO_TCP, as asyncio wants)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=1 << 20)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Send a request, read the status line and headers."""
        if self.writer is None or self.writer.is_closing():
            await self.open()
        assert self.writer is not None
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        for key, value in (headers or {}).items():
            head += f"{key}: {value}\r\n"
        self.writer.write(head.encode() + b"\r\n" + payload)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
        chunked = fields.get("transfer-encoding", "").lower() == "chunked"
        length = int(fields.get("content-length", "0"))
        return Response(status, fields, self, chunked, length)

    async def close(self) -> None:
        """Close the socket."""
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
            self.writer = None


async def create_chat(conn: Connection, title: str = "bench") -> str:
    """A new chat's id."""
    response = await conn.request("POST", "/chats", {"title": title})
    chat = await response.json()
    assert response.status == 201, chat
    chat_id: str = chat["id"]
    return chat_id
