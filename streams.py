"""SSE responses: a stream's frames sent by a child task while the request's own task watches
its client, and the app-wide watch that drops clients who stopped reading and ends streams at
shutdown."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.responses import Response
from starlette.types import Message as ASGIMessage
from starlette.types import Receive, Scope, Send

# API.md: "a comment line every 15 s or so, so that proxies keep the connection open".
PING = b": ping\n\n"
PING_INTERVAL = 15.0
# After the server is told to stop, how long streams have to send their last events (the
# registry ends every reply at once) before they are cut; under uvicorn's
# --timeout-graceful-shutdown, so that the process still exits on its own.
SHUTDOWN_GRACE = 4.0


class StreamWatch:
    """The app's open streams, watched by two of the lifespan's tasks: `drop_stalled` ends a
    stream whose send has waited `send_timeout` seconds (checked four times a timeout, so
    after 1 to 1.25 × `send_timeout`), and `end_at_shutdown` ends them all once the server
    stops. One task for all streams: a deadline per send (a cancel scope) costs ~6 µs, a
    twentieth of a relayed chunk (bench/README.md, round 5)."""

    def __init__(
        self, send_timeout: float, shutdown_requested: anyio.Event, grace: float = SHUTDOWN_GRACE
    ) -> None:
        self.send_timeout = send_timeout
        self.shutdown_requested = shutdown_requested
        self.grace = grace
        self.streams: set[EventStream] = set()

    async def drop_stalled(self) -> None:
        """Check the open streams, forever (the lifespan's task group ends it)."""
        while True:
            await anyio.sleep(self.send_timeout / 4)
            now = time.monotonic()
            for stream in list(self.streams):
                since = stream.sending_since
                if since is not None and now - since >= self.send_timeout:
                    stream.drop()

    async def end_at_shutdown(self) -> None:
        """When uvicorn is told to exit (SIGTERM, Ctrl-C), set `shutdown_requested`, so the
        registry ends replies and their streams send `message.done`; end whatever stream is
        still open `grace` seconds later."""
        # sse-starlette's watcher of uvicorn's exit flag: one per event loop, polling every
        # 0.5 s (sse-starlette 3.7.0, pinned; its own responses wait on it the same way).
        await EventSourceResponse._listen_for_exit_signal()
        self.shutdown_requested.set()
        with anyio.move_on_after(self.grace):
            while self.streams:
                await anyio.sleep(0.1)
        for stream in list(self.streams):
            stream.cancel_scope.cancel()


class EventStream(Response):
    """A `text/event-stream` response in two tasks: a child task sends the frames as they
    come, and the request's own task watches, hearing the client go (the stream then ends)
    and sending a ping whenever nothing was sent for `ping_interval` seconds. The frames go
    from the child because a task that wakes resumes every frame of its stack: the request's
    task waits ~15 frames of middleware and routing deep, and woken for every chunk it cost
    ~10 µs a chunk more (bench/README.md, round 7). sse-starlette's EventSourceResponse runs
    four tasks a response (stream, pings, disconnect, shutdown); its shutdown signal is heard
    once for the whole app, by StreamWatch. The headers are sse-starlette's."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[bytes], ping_interval: float = PING_INTERVAL) -> None:
        self.frames = frames
        self.ping_interval = ping_interval
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}
        )
        # Cancelled when the client is dropped, or when shutdown's grace ends.
        self.cancel_scope = anyio.CancelScope()
        self.gone = False  # the client disconnected
        self.dropped = False  # the client took nothing for too long
        self.sends = 0  # in progress: the stream's and a ping's may overlap
        self.sending_since: float | None = None  # since when some send has been waiting
        self.last_sent = 0.0  # when the last send ended (time.monotonic)

    def drop(self) -> None:
        """End the stream now: its client has taken nothing for too long."""
        self.dropped = True
        self.cancel_scope.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch: StreamWatch = scope["app"].state.stream_watch
        watch.streams.add(self)
        try:
            with self.cancel_scope:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._stream, send, group.cancel_scope)
                    await self._watch(receive, send)
                    group.cancel_scope.cancel()  # the client went: the stream stops
            if not (self.gone or self.dropped):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watch.streams.discard(self)
        if self.dropped:
            raise SendTimeoutError  # RequestLog logs it in a line; uvicorn closes the socket

    async def _stream(self, send: Send, group: anyio.CancelScope) -> None:
        """The response's head, then the frames as they come; then the watcher stops."""
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        await self._send(send, start)
        async for data in self.frames:
            await self._send(send, {"type": "http.response.body", "body": data, "more_body": True})
        group.cancel()

    async def _send(self, send: Send, message: ASGIMessage) -> None:
        self.sends += 1
        if self.sending_since is None:
            self.sending_since = time.monotonic()
        try:
            await send(message)
        finally:
            self.sends -= 1
            self.last_sent = time.monotonic()
            if not self.sends:
                self.sending_since = None

    async def _watch(self, receive: Receive, send: Send) -> None:
        """Until the client goes: a ping whenever the stream has been quiet for
        `ping_interval` seconds."""
        self.last_sent = time.monotonic()
        while True:
            now = time.monotonic()
            due = self.last_sent + self.ping_interval
            if due <= now:
                if not self.sends:
                    ping = {"type": "http.response.body", "body": PING, "more_body": True}
                    await self._send(send, ping)
                    continue
                due = now + self.ping_interval  # a send is waiting: the line is not idle
            with anyio.move_on_after(due - now):
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.gone = True
                return
