"""What every HTTP request passes through: one log line, the header and body size limits,
and a quiet end for streams whose client stopped reading."""

from __future__ import annotations

import time

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from loguru import logger
from sse_starlette.sse import SendTimeoutError
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

# Headers a client may send, all names and values together; past it, 431. Browsers send a
# few KB; uvicorn's httptools parser has no limit of its own (h11's is 16 KiB).
MAX_HEADER_BYTES = 64 * 1024


class RequestLog:
    """Pure ASGI middleware: one log line per request, the request body size limit (413
    before the body is read, whatever the route), the header size limit (431), and HEAD
    answered as GET without its body."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_logged(message: ASGIMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            headers = scope["headers"]
            if sum(len(name) + len(value) + 4 for name, value in headers) > MAX_HEADER_BYTES:
                response = JSONResponse(
                    {"detail": f"The request headers are larger than {MAX_HEADER_BYTES} bytes."},
                    431,
                )
                await response(scope, receive, send_logged)
                return
            declared = dict(headers).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
                response = JSONResponse(
                    {"detail": f"The request body is larger than {self.max_body} bytes."}, 413
                )
                await response(scope, receive, send_logged)
                return
            inner = scope
            if scope["method"] == "HEAD" and not scope["path"].endswith("/stream"):
                # FastAPI routes GET alone; HEAD is GET without the body, which uvicorn drops
                # itself (its own scope still says HEAD). A stream's HEAD stays 405: as a GET
                # it would follow a live reply to its end to send nothing.
                inner = {**scope, "method": "GET"}
            await self.app(inner, self._limited(receive), send_logged)
        except SendTimeoutError:
            # STREAM_SEND_TIMEOUT: the client stopped reading. Its subscription is closed, the
            # reply goes on; a warning, not a traceback, since the server did nothing wrong.
            # (uvicorn then closes the connection, as the response was never completed.)
            logger.warning(
                "{} {}: client stopped reading; stream dropped", scope["method"], scope["path"]
            )
        finally:
            logger.info(
                "{} {} {} {:.1f}ms",
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
            )

    def _limited(self, receive: Receive) -> Receive:
        """Counts a chunked body as it arrives, for clients that send no Content-Length."""
        seen = 0

        async def limited() -> ASGIMessage:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, f"The request body is larger than {self.max_body}.")
            return message

        return limited
