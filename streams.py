"""SSE responses: each stream sent from its request's own task beside one watcher task, and
the app-wide watch that drops clients who stopped reading and ends streams at shutdown."""

from __future__ import annotations

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
            now = anyio.current_time()
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
            stream.scope.cancel()


class EventStream(Response):
    """A `text/event-stream` response sent from the request's own task, with one watcher
    task beside it that hears the client go (the stream then ends) and sends a ping whenever
    nothing was sent for `ping_interval` seconds. sse-starlette's EventSourceResponse runs a
    task group of four (stream, pings, disconnect, shutdown) for each response, which cost
    ~9 KB and ~0.2 ms a stream (bench/README.md, round 7); its shutdown signal is heard once
    for the whole app, by StreamWatch. The headers are the same as sse-starlette's."""

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        ping_interval: float = PING_INTERVAL,
    ) -> None:
        self.frames = frames
        self.ping_interval = ping_interval
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}
        )
        # Cancelled when the client goes, when it is dropped, or when shutdown's grace ends.
        self.scope = anyio.CancelScope()
        self.gone = False  # the client disconnected
        self.dropped = False  # the client took nothing for too long
        self.sends = 0  # in progress: the stream's and a ping's may overlap
        self.sending_since: float | None = None  # since when some send has been waiting
        self.last_sent = 0.0  # when the last send ended

    def drop(self) -> None:
        """End the stream now: its client has taken nothing for too long."""
        self.dropped = True
        self.scope.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch: StreamWatch = scope["app"].state.stream_watch
        watch.streams.add(self)
        try:
            with self.scope:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._watch, receive, send)
                    start = {"type": "http.response.start", "status": 200}
                    await self._send(send, start | {"headers": self.raw_headers})
                    async for data in self.frames:
                        await self._send(
                            send, {"type": "http.response.body", "body": data, "more_body": True}
                        )
                    group.cancel_scope.cancel()
            if not (self.gone or self.dropped):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watch.streams.discard(self)
        if self.dropped:
            raise SendTimeoutError  # RequestLog logs it in a line; uvicorn closes the socket

    async def _send(self, send: Send, message: ASGIMessage) -> None:
        self.sends += 1
        if self.sending_since is None:
            self.sending_since = anyio.current_time()
        try:
            await send(message)
        finally:
            self.sends -= 1
            self.last_sent = anyio.current_time()
            if not self.sends:
                self.sending_since = None

    async def _watch(self, receive: Receive, send: Send) -> None:
        """Until the client goes (then end the stream): a ping when the stream has been quiet
        for `ping_interval` seconds."""
        self.last_sent = anyio.current_time()
        while True:
            due = self.last_sent + self.ping_interval
            now = anyio.current_time()
            if due <= now:
                if not self.sends:
                    ping = {"type": "http.response.body", "body": PING, "more_body": True}
                    await self._send(send, ping)
                    continue
                due = now + self.ping_interval  # a send is waiting: the line is not idle
            with anyio.CancelScope(deadline=due):
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.gone = True
                self.scope.cancel()
                return
