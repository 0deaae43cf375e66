"""A fake OpenAI-compatible Chat Completions server on loopback, scriptable per test."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import json
import math
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]

DEFAULT_TEXT = "Hello from the fake model."

# Let other streams and the disconnect watcher run now and then during a fast stream: one
# `send` on an idle socket never suspends, so 2,000 chunks would otherwise hog the loop.
_YIELD_EVERY = 64

# (message, type, code) per status, as OpenAI words them; `{model}` is the request's model.
_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request (fake OpenAI).", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model.", "invalid_request_error", None),
    404: (
        "The model `{model}` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    408: ("Request timed out.", "timeout", None),
    429: (
        "Rate limit reached for {model} in organization org-fake on requests per min (RPM): "
        "Limit 3, Used 3, Requested 1. Please try again in 1s.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    502: ("Bad gateway.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


@dataclass
class ToolCall:
    """A function call that the fake model makes, streamed after the reply's text."""

    name: str
    arguments: str  # raw argument text as the model "writes" it; may be invalid JSON
    id: str | None = None  # None -> an auto id "call_<random>"


@dataclass
class Reply:
    """What the fake model answers to one request.

    `cut`, `stall_after` and `error_after` shape streams; a non-streamed reply treats
    `stall_after` as `hang`, `error_after` as a 500, `cut` as a JSON body cut in half, and
    sleeps `delay` once per text chunk after the first before it answers.
    """

    chunks: list[str] = field(default_factory=list)
    delay: float = 0.0
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "auto"
    cut: bool = False
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    stall_after: int | None = None
    error_after: int | None = None
    omit_index: bool = False
    fragment_size: int = 7
    usage: tuple[int, int] | None = None
    # The error's `message` (of a `status` error, or an `error_after` one) instead of OpenAI's
    # wording: say, one that quotes the API key, as some providers' do.
    error_message: str | None = None


def text(s: str, pieces: int = 3, delay: float = 0.0) -> Reply:
    """Make a text reply that streams `s` in about `pieces` chunks, split between words."""
    pieces = max(1, pieces)
    # Words keep their leading whitespace, as model tokens do; "".join(chunks) == s.
    words = re.findall(r"\s*\S+", s)
    rest = s[sum(map(len, words)) :]
    if rest:
        words = [*words[:-1], words[-1] + rest] if words else [rest]
    if len(words) < pieces:
        size = max(1, math.ceil(len(s) / pieces))
        return Reply(chunks=[s[i : i + size] for i in range(0, len(s), size)], delay=delay)
    per, extra = divmod(len(words), pieces)
    chunks: list[str] = []
    start = 0
    for i in range(pieces):
        end = start + per + (1 if i < extra else 0)
        chunks.append("".join(words[start:end]))
        start = end
    return Reply(chunks=chunks, delay=delay)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _dumps(obj: object) -> str:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if text.isascii():
        return text
    # A lone surrogate (half of a UTF-16 pair, as a server that splits an emoji would send) as
    # its JSON escape: UTF-8 cannot hold it raw.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _message_text(content: object) -> str:
    """The text of a message's `content`: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _last_user_text(body: dict[str, Any]) -> str | None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _message_text(message.get("content"))
    return None


def _estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """About one token per four characters of every message, as a tokenizer would count."""
    chars = 0
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            chars += len(_message_text(message.get("content")))
            for call in message.get("tool_calls") or []:
                if isinstance(call, dict):
                    chars += len(_dumps(call.get("function", "")))
    return max(1, math.ceil(chars / 4))


def _error_body(
    status: int, model: str, message: str | None = None, scripted: str | None = None
) -> bytes:
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    template, kind, code = _ERRORS.get(status, (f"{phrase} (fake OpenAI).", default_type, None))
    if message is not None:  # the fake's own complaint, not a scripted error: no code
        template, code = message, None
    else:
        template = template.replace("{model}", model)
    if scripted is not None:  # a scripted error in other words: the code stays
        template = scripted
    error = {"message": template, "type": kind, "param": None, "code": code}
    return _dumps({"error": error}).encode()


def _headers(content_type: bytes, extra: dict[str, str]) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", content_type),
        (b"x-request-id", f"req_{secrets.token_hex(16)}".encode()),
    ]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    return headers


class _Call:
    """One request's state on the server's loop: why it ended early, and the wake-up."""

    __slots__ = ("abort", "gone", "stopping", "finished", "generation")

    def __init__(self, generation: int) -> None:
        self.generation = generation  # which reset() it began after
        self.abort = asyncio.Event()
        self.gone = False  # the client closed the connection first
        self.stopping = False  # the fake is stopping
        self.finished = False  # the last byte was handed to the server

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early on abort."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.abort.wait()


class _Chunks:
    """Encodes one streamed reply's SSE events; the fixed parts are encoded once."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = f"chatcmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.model = model
        head = (
            f'data: {{"id":"{self.id}","object":"chat.completion.chunk","created":{self.created},'
            f'"model":{_dumps(model)},"system_fingerprint":"fp_fake","choices":[{{"index":0,'
            '"delta":'
        )
        self.head = head.encode()
        usage_null = ',"usage":null' if include_usage else ""
        self.tail = f',"logprobs":null,"finish_reason":null}}]{usage_null}}}\n\n'.encode()
        self.usage_tail = usage_null
        self._text: dict[str, bytes] = {}

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        if finish_reason is None:
            return self.head + _dumps(delta).encode() + self.tail
        tail = f',"logprobs":null,"finish_reason":{_dumps(finish_reason)}}}]{self.usage_tail}}}'
        return self.head + _dumps(delta).encode() + tail.encode() + b"\n\n"

    def text(self, piece: str) -> bytes:
        # Token-like pieces repeat a lot (benchmarks send the same one 2,000 times).
        encoded = self._text.get(piece)
        if encoded is None:
            encoded = self.head + b'{"content":' + _dumps(piece).encode() + b"}" + self.tail
            self._text[piece] = encoded
        return encoded

    def usage(self, prompt: int, completion: int) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
        return b"data: " + _dumps(chunk).encode() + b"\n\n"


def _tool_deltas(reply: Reply, ids: list[str]) -> Iterator[dict[str, Any]]:
    """Tool-call deltas as OpenAI streams them: a header per call, then argument fragments."""
    size = reply.fragment_size if reply.fragment_size > 0 else None
    for index, (call, call_id) in enumerate(zip(reply.tool_calls, ids, strict=True)):
        where = {} if reply.omit_index else {"index": index}
        header = {
            **where,
            "id": call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        yield {"tool_calls": [header]}
        args = call.arguments
        step = size or max(1, len(args))
        for start in range(0, len(args), step):
            fragment = {**where, "function": {"arguments": args[start : start + step]}}
            yield {"tool_calls": [fragment]}


class _Server(uvicorn.Server):
    """uvicorn's server, telling the starting thread when it listens."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self.ready = ready
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.loop = asyncio.get_running_loop()
        self.ready.set()


class _StampedChunks(_Chunks):
    """Each text chunk is the time it was sent (`time.time()`, then a space), whatever the
    script says: a benchmark reading the stream through a relay sees how late each piece is."""

    def text(self, piece: str) -> bytes:
        return self.head + b'{"content":"' + f"{time.time():.6f} ".encode() + b'"}' + self.tail


class FakeOpenAI:
    """A real HTTP server on 127.0.0.1 that answers like OpenAI's Chat Completions API."""

    # How a stream's chunks are encoded; the CLI's --stamp swaps in _StampedChunks.
    encoder: type[_Chunks] = _Chunks

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.base_url = ""
        self.default = text(DEFAULT_TEXT)
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self._generation = 0
        self._cond = threading.Condition()
        self._queue: deque[Reply] = deque()
        self._rules: list[tuple[str, Reply]] = []
        self._models: dict[str, None] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._live: set[_Call] = set()  # touched on the server's loop only
        self._stopping = False

    # -- the test side ---------------------------------------------------------------------

    def start(self) -> None:
        """Listen on 127.0.0.1 and serve in a background thread; returns once it listens.

        After a stop(), start() listens on the same port again, so base_url stays valid.
        """
        if self._thread is not None:
            raise RuntimeError("FakeOpenAI is already running")
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
        # and with Nagle on, small SSE writes wait ~40 ms for delayed ACKs.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(2048)
        except BaseException:
            sock.close()
            raise
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            # h11 and asyncio are what requirements.txt installs; naming them keeps the fake's
            # behaviour from changing if httptools or uvloop turn up in the venv.
            http="h11",
            loop="asyncio",
            ws="none",
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            server_header=False,
            # Hung and stalled handlers are woken by stop(); this only bounds a bug.
            timeout_graceful_shutdown=2,
        )
        ready = threading.Event()
        server = _Server(config, ready)
        self._stopping = False
        thread = threading.Thread(
            target=self._serve, args=(server, sock), name=f"fake-openai-{port}", daemon=True
        )
        thread.start()
        while not ready.wait(0.01):
            if not thread.is_alive():
                sock.close()
                raise RuntimeError("the fake OpenAI server failed to start")
        self._server, self._thread = server, thread
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"

    @staticmethod
    def _serve(server: _Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()

    def stop(self) -> None:
        """Wake every open response, stop the server and wait for its thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        loop = server.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop may have closed already
                loop.call_soon_threadsafe(self._abort_all)
        server.should_exit = True
        thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def push(self, *replies: Reply) -> None:
        """Queue one-shot replies, first in first out; each request takes one."""
        with self._cond:
            self._queue.extend(replies)

    def when(self, contains: str, reply: Reply) -> None:
        """Answer every request whose last user message contains `contains` with `reply`.

        Rules are checked before the queue, in the order added; a rule for the same
        `contains` replaces the earlier one. A follow-up request that carries tool results
        has the same last user message, so it matches again: script tool rounds with push().
        """
        with self._cond:
            self._rules = [(c, r) for c, r in self._rules if c != contains]
            self._rules.append((contains, reply))

    def reset(self) -> None:
        """Forget queued replies, rules, requests and counters; restore the default reply."""
        with self._cond:
            self._queue.clear()
            self._rules.clear()
            self.requests.clear()
            self._models.clear()
            self.disconnects = 0
            # A response still open from before the reset must not count in the next test.
            self._generation += 1
            self.default = text(DEFAULT_TEXT)

    def wait_for_disconnect(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until `disconnects` reaches `count`; False on time-out."""
        with self._cond:
            return self._cond.wait_for(lambda: self.disconnects >= count, timeout)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> bool:
        """Wait until `count` requests have been received; False on time-out."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= count, timeout)

    # -- the server side (runs on the server thread's loop) ---------------------------------

    def _abort_all(self) -> None:
        self._stopping = True
        for call in self._live:
            call.stopping = True
            call.abort.set()

    def _take(self, body: dict[str, Any]) -> tuple[Reply, int]:
        """Record the request and choose its reply: a rule, then the queue, then the default."""
        last_user = _last_user_text(body)
        with self._cond:
            generation = self._generation
            self.requests.append(body)
            self._models[str(body.get("model"))] = None
            self._cond.notify_all()
            if last_user is not None:
                for contains, reply in self._rules:
                    if contains in last_user:
                        return reply, generation
            if self._queue:
                return self._queue.popleft(), generation
            return self.default, generation

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"].rstrip("/"), scope["method"]
        if path == "/v1/chat/completions":
            if method != "POST":
                await self._send_error(send, 405, "", "Method not allowed.")
                return
            await self._chat_completions(scope, receive, send)
        elif path == "/v1/models" and method == "GET":
            with self._cond:
                models = list(self._models)
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in models]
            await self._send_json(send, 200, {"object": "list", "data": data}, {})
        else:
            await self._send_error(send, 404, "", f"Invalid URL ({method} {path})")

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        if content_type.split(b";")[0].strip().lower() != b"application/json":
            # Like a strict provider (or a proxy before it): the body is JSON only if it says so.
            msg = "We could not parse the JSON body of your request: Content-Type is not JSON."
            await self._send_error(send, 400, "", msg)
            return
        raw = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            raw += message.get("body", b"")
            if not message.get("more_body", False):
                break
        try:
            body = json.loads(raw)
        except ValueError:
            msg = "We could not parse the JSON body of your request."
            await self._send_error(send, 400, "", msg)
            return
        if not isinstance(body, dict):
            await self._send_error(send, 400, "", "The request body must be a JSON object.")
            return
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not isinstance(messages, list):
            self._take_request_only(body)
            msg = "You must provide a model parameter and a messages array."
            await self._send_error(send, 400, "", msg)
            return
        reply, generation = self._take(body)
        call = _Call(generation)
        self._live.add(call)
        watcher = asyncio.get_running_loop().create_task(self._watch(receive, call))
        try:
            if self._stopping:
                call.stopping = True
                call.abort.set()
            if body.get("stream") is True:
                await self._stream(body, model, reply, call, send)
            else:
                await self._complete(body, model, reply, call, send)
        finally:
            watcher.cancel()
            self._live.discard(call)

    def _take_request_only(self, body: dict[str, Any]) -> None:
        with self._cond:
            self.requests.append(body)
            self._cond.notify_all()

    async def _watch(self, receive: Receive, call: _Call) -> None:
        """Notice the client going away; uvicorn's h11 `send` drops bytes silently then."""
        while (await receive())["type"] != "http.disconnect":
            pass
        # uvicorn also says http.disconnect once the response is complete: not a disconnect.
        if not call.finished:
            call.gone = True
            call.abort.set()
            with self._cond:
                if call.generation == self._generation:
                    self.disconnects += 1
                    self._cond.notify_all()

    async def _send_json(
        self, send: Send, status: int, obj: object, extra: dict[str, str], cut: bool = False
    ) -> None:
        data = _dumps(obj).encode() if not isinstance(obj, bytes) else obj
        headers = _headers(b"application/json", extra)
        if cut:
            data = data[: len(data) // 2]
        else:
            headers.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data, "more_body": False})

    async def _send_error(
        self,
        send: Send,
        status: int,
        model: str,
        message: str | None = None,
        extra: dict[str, str] | None = None,
        scripted: str | None = None,
    ) -> None:
        body = _error_body(status, model, message, scripted)
        await self._send_json(send, status, body, extra or {})

    async def _hang(self, call: _Call, send: Send, model: str) -> None:
        """Send nothing until the client goes away or the fake stops."""
        await call.abort.wait()
        if call.stopping and not call.gone:
            call.finished = True
            await self._send_error(send, 503, model, "The fake OpenAI server is stopping.")

    async def _complete(
        self, body: dict[str, Any], model: str, reply: Reply, call: _Call, send: Send
    ) -> None:
        """Answer a non-streamed request with one `chat.completion` object."""
        if reply.hang or reply.stall_after is not None:
            await self._hang(call, send, model)
            return
        if reply.delay > 0 and len(reply.chunks) > 1:
            await call.sleep(reply.delay * (len(reply.chunks) - 1))
        if call.gone:
            return
        call.finished = True
        if reply.status != 200:
            await self._send_error(
                send, reply.status, model, extra=reply.headers, scripted=reply.error_message
            )
            return
        if reply.error_after is not None:
            await self._send_error(
                send, 500, model, extra=reply.headers, scripted=reply.error_message
            )
            return
        content = "".join(reply.chunks)
        ids = [c.id or f"call_{secrets.token_hex(12)}" for c in reply.tool_calls]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content if content or not reply.tool_calls else None,
            "refusal": None,
        }
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": i,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for i, c in zip(ids, reply.tool_calls, strict=True)
            ]
        prompt, completion = self._usage(body, reply)
        completion_obj = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": self._finish_reason(reply),
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
        await self._send_json(send, 200, completion_obj, reply.headers, cut=reply.cut)

    @staticmethod
    def _finish_reason(reply: Reply) -> str:
        if reply.finish_reason != "auto":
            return reply.finish_reason
        return "tool_calls" if reply.tool_calls else "stop"

    @staticmethod
    def _usage(body: dict[str, Any], reply: Reply) -> tuple[int, int]:
        if reply.usage is not None:
            return reply.usage
        # A streamed chunk is about one token; tool calls count by their text.
        completion = sum(1 for c in reply.chunks if c)
        completion += sum(math.ceil(len(c.name + c.arguments) / 4) for c in reply.tool_calls)
        return _estimate_prompt_tokens(body), completion

    async def _stream(
        self, body: dict[str, Any], model: str, reply: Reply, call: _Call, send: Send
    ) -> None:
        """Answer a streamed request with `chat.completion.chunk` SSE events."""
        if reply.hang:
            await self._hang(call, send, model)
            return
        if reply.status != 200:
            call.finished = True
            await self._send_error(
                send, reply.status, model, extra=reply.headers, scripted=reply.error_message
            )
            return
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        enc = self.encoder(model, include_usage)
        headers = _headers(b"text/event-stream; charset=utf-8", reply.headers)
        headers.append((b"cache-control", b"no-cache"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def emit(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async def end(data: bytes = b"") -> None:
            call.finished = True
            await send({"type": "http.response.body", "body": data, "more_body": False})

        await emit(enc.delta({"role": "assistant", "content": "", "refusal": None}))
        limits = [n for n in (reply.stall_after, reply.error_after) if n is not None]
        limit = min(limits) if limits else len(reply.chunks)
        for i, piece in enumerate(reply.chunks[:limit]):
            if i and reply.delay > 0:
                await call.sleep(reply.delay)
            elif i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
            if call.abort.is_set():
                break
            await emit(enc.text(piece))
        else:
            if reply.stall_after is not None and reply.stall_after == limit:
                await call.abort.wait()
            elif reply.error_after is not None and reply.error_after == limit:
                error = _error_body(500, model, scripted=reply.error_message)
                await end(b"data: " + error + b"\n\n")
                return
        if call.abort.is_set():
            if not call.gone:  # stopping: end the body cleanly, like a cut stream
                await end()
            return
        ids = [c.id or f"call_{secrets.token_hex(12)}" for c in reply.tool_calls]
        for i, delta in enumerate(_tool_deltas(reply, ids)):
            if i % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
            await emit(enc.delta(delta))
        await asyncio.sleep(0)  # let the watcher see a disconnect before the last bytes
        if call.abort.is_set():
            if not call.gone:
                await end()
            return
        if reply.cut:
            await end()
            return
        await emit(enc.delta({}, self._finish_reason(reply)))
        tail = b""
        if include_usage:
            tail = enc.usage(*self._usage(body, reply))
        # [DONE] goes with the end of the body: the SDK closes the connection soon after it.
        await end(tail + b"data: [DONE]\n\n")


def main(argv: list[str] | None = None) -> None:
    """Serve one default reply forever and print the base URL first (for benchmarks)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=None, help="text chunks per reply")
    parser.add_argument("--chunk-text", default="tok ", help="the text of each chunk")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument(
        "--stamp", action="store_true", help="each chunk's text is the time it was sent"
    )
    args = parser.parse_args(argv)
    fake = FakeOpenAI(port=args.port)
    if args.stamp:
        fake.encoder = _StampedChunks
    if args.chunks is not None:
        fake.default = Reply(chunks=[args.chunk_text] * args.chunks, delay=args.delay)
    else:
        fake.default = text(DEFAULT_TEXT, delay=args.delay)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fake.start()
    try:
        print(fake.base_url, flush=True)
        while not done.wait(1.0):
            # A long benchmark would otherwise keep every request body it ever got.
            with fake._cond:
                del fake.requests[:]
    finally:
        fake.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
