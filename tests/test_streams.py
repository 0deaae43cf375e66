"""Tests of streams.py's response under a real uvicorn (in a thread) and real sockets: pings
when quiet, the end of a stream whose client went, and the cut at the end of shutdown's grace.
(Dropping a client that stopped reading is tested end to end, in test_limits.py.)"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import anyio
import uvicorn
from sse_starlette.sse import AppStatus
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from streams import PING, EventStream, StreamWatch
from tests.support import wait_until

FrameSource = Callable[[], AsyncIterator[bytes]]


@dataclass
class Served:
    port: int
    watch: StreamWatch | None = None  # made by the app's lifespan, on the server's loop
    closed: threading.Event = field(default_factory=threading.Event)  # the frames' finally ran

    @property
    def streams(self) -> set[EventStream]:
        assert self.watch is not None
        return self.watch.streams


@contextmanager
def serving(frames: FrameSource, ping_interval: float, grace: float = 4.0) -> Iterator[Served]:
    """An app with one stream route, `GET /`, served by uvicorn in a thread on 127.0.0.1."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    served = Served(sock.getsockname()[1])

    async def stream(request: Request) -> EventStream:
        async def tracked() -> AsyncIterator[bytes]:
            try:
                async for data in frames():
                    yield data
            finally:
                served.closed.set()

        return EventStream(tracked(), ping_interval=ping_interval)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        watch = served.watch = app.state.stream_watch = StreamWatch(30.0, anyio.Event(), grace)
        async with anyio.create_task_group() as group:
            group.start_soon(watch.drop_stalled)
            group.start_soon(watch.end_at_shutdown)
            yield
            group.cancel_scope.cancel()

    app = Starlette(routes=[Route("/", stream)], lifespan=lifespan)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout=10)
        yield served
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@contextmanager
def connect(port: int) -> Iterator[socket.socket]:
    """A raw connection that has sent `GET /`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        yield sock


def read_until(sock: socket.socket, marker: bytes, count: int = 1, timeout: float = 10.0) -> bytes:
    """What the server sent, up to `count` times `marker` (or all of it, if it closed)."""
    received = b""
    deadline = time.monotonic() + timeout
    while received.count(marker) < count and time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        received += data
    return received


async def one_event_then_wait() -> AsyncIterator[bytes]:
    yield b"event: hello\ndata: {}\n\n"
    await anyio.sleep_forever()


def test_a_quiet_stream_is_pinged_and_has_the_sse_headers() -> None:
    with serving(one_event_then_wait, ping_interval=0.1) as served, connect(served.port) as sock:
        received = read_until(sock, PING, count=2)
    head, _, body = received.partition(b"\r\n\r\n")
    headers = head.decode().lower().splitlines()
    assert headers[0] == "http/1.1 200 ok"
    for header in (
        "content-type: text/event-stream; charset=utf-8",
        "cache-control: no-cache",
        "x-accel-buffering: no",
        "transfer-encoding: chunked",
    ):
        assert header in headers
    # The event first, then a ping (a comment line) each quiet interval.
    assert body.index(b"event: hello") < body.index(PING)
    assert body.count(PING) == 2


def test_a_stream_that_sends_is_not_pinged() -> None:
    async def busy() -> AsyncIterator[bytes]:
        for i in range(150):  # for 1.5 s or more: pings every 0.5 s would make three
            yield f"data: {i}\n\n".encode()
            await anyio.sleep(0.01)

    with serving(busy, ping_interval=0.5) as served, connect(served.port) as sock:
        received = read_until(sock, b"\r\n0\r\n\r\n")  # the chunked body's end
    assert received.endswith(b"\r\n0\r\n\r\n")
    assert b"data: 149\n\n" in received
    assert PING not in received


def test_a_stream_ends_when_its_client_goes() -> None:
    with serving(one_event_then_wait, ping_interval=30.0) as served:
        with connect(served.port) as sock:
            assert b"event: hello" in read_until(sock, b"event: hello")
            assert len(served.streams) == 1
        # No ping for 30 s, no event ever: only the disconnect can end it.
        assert served.closed.wait(10)
        assert wait_until(lambda: not served.streams, timeout=5)


def test_shutdown_is_announced_then_streams_still_open_are_cut_after_the_grace() -> None:
    with serving(one_event_then_wait, ping_interval=30.0, grace=0.3) as served:
        with connect(served.port) as sock:
            assert b"event: hello" in read_until(sock, b"event: hello")
            # What uvicorn's SIGTERM handler sets (sse-starlette patches it in).
            AppStatus.should_exit = True
            try:
                rest = read_until(sock, b"0\r\n\r\n")
            finally:
                AppStatus.should_exit = False
        assert served.watch is not None and served.watch.shutdown_requested.is_set()
        # The frames never end by themselves: the grace's end closed them and ended the
        # response cleanly (the chunked body's end), with nothing else sent.
        assert rest == b"0\r\n\r\n"
        assert served.closed.is_set()
