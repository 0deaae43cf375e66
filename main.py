"""The FastAPI app: lifespan and routes; it assembles the other modules."""

from __future__ import annotations

import gc
import json
import re
import secrets
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from loguru import logger
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException

import llm
from db import (
    Busy,
    ChatFull,
    Database,
    KeyReused,
    NotFoundError,
    Replayed,
    SendOutcome,
    Started,
)
from middleware import RequestLog
from replies import Reply, ReplyConfig, ReplyRegistry, model_frame
from schemas import (
    FINAL_STATUSES,
    STREAM_EVENT_SCHEMA,
    Chat,
    ChatCreate,
    ChatList,
    ChatUpdate,
    Conflict,
    ErrorBody,
    Message,
    MessageCreate,
    MessageList,
    SendResult,
)
from settings import Settings, get_settings
from streams import EventStream, StreamWatch

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self';"
    " img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self';"
    " frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


DIGITS = re.compile(r"[0-9]{1,18}")


def new_id(prefix: str) -> str:
    """An opaque, URL-safe id with 128 random bits: knowing it is what gives access."""
    return f"{prefix}_{secrets.token_urlsafe(16)}"


def configure_logging(level: str) -> None:
    """One sink on stderr; message contents and keys are never logged at INFO."""
    logger.remove()
    logger.add(sys.stderr, level=level.upper(), backtrace=False, diagnose=False)


# The young generation's size, in container objects (Python's default is 700). Most of what a
# stream allocates per chunk (futures, handles, parsed JSON) dies young; with 700 much of it
# was scanned, promoted and scanned again, and full collections paused the event loop for up
# to 160 ms under 250 streams (bench/README.md, round 5).
YOUNG_GENERATION = 50_000


@contextmanager
def steady_gc() -> Iterator[None]:
    """While the app runs: the objects made at start-up (modules, the app, the SDK's types:
    ~120,000) frozen out of every collection, and a large young generation, so collections
    pause the event loop less often and more briefly. Undone on the way out."""
    thresholds = gc.get_threshold()
    gc.collect()  # start-up's garbage is not kept forever
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


# Worker threads at once (anyio's default is 40). Nearly all of them run queries, each on its
# own SQLite connection with a page cache of up to 2 MB, and the GIL runs one at a time anyway:
# at 600 streams, 40 threads held ~10 KB a stream more than 8 (bench/README.md, round 6).
# Writes have a limiter of their own (Database.writer), so reads never wait behind them.
WORKER_THREADS = 8


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the database (migrating it, recovering replies a crash interrupted), make the
    model client and the reply registry; on the way out, end replies in progress cleanly."""
    settings: Settings = app.state.settings
    anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
    db = Database(settings.database_path)
    await anyio.to_thread.run_sync(db.migrate)
    recovered = await anyio.to_thread.run_sync(db.recover_interrupted)
    if recovered:
        logger.warning("{} replies were interrupted by a stop and are now incomplete", recovered)
    client = None
    if settings.llm_configured:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        client = llm.make_client(
            api_key=key,
            base_url=settings.openai_base_url,
            timeout=settings.openai_timeout,
            max_retries=settings.openai_max_retries,
        )
    else:
        logger.warning("No OPENAI_API_KEY or OPENAI_BASE_URL: replies will fail (not_configured)")
    config = ReplyConfig(
        client=client,
        default_system_prompt=settings.system_prompt,
        max_context_tokens=settings.max_context_tokens,
        max_output_tokens=settings.max_output_tokens,
        max_tool_rounds=settings.max_tool_rounds,
        idle_timeout=settings.openai_stream_idle_timeout,
        max_reply_seconds=settings.max_reply_seconds,
        generate_titles=settings.generate_titles,
        keep_finished_seconds=settings.keep_finished_seconds,
        keep_finished_bytes=settings.keep_finished_bytes,
    )
    if not settings.tools_enabled:
        config.tools = {}
    async with anyio.create_task_group() as task_group:
        registry = ReplyRegistry(db, config, task_group)
        task_group.start_soon(registry.watch_for_shutdown)
        stream_watch = StreamWatch(settings.stream_send_timeout, registry.shutdown_requested)
        task_group.start_soon(stream_watch.drop_stalled)
        task_group.start_soon(stream_watch.end_at_shutdown)
        app.state.db = db
        app.state.registry = registry
        app.state.stream_watch = stream_watch
        logger.info(
            "ready: database={} model={} provider={}",
            settings.database_path,
            settings.openai_model,
            settings.openai_base_url or ("openai" if client else "none"),
        )
        try:
            with steady_gc():
                yield
        finally:
            await registry.shutdown()
            task_group.cancel_scope.cancel()
    if client is not None:
        await client.close()
    db.close()


def _bytes_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for these settings (the environment's by default)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="Chat backend",
        summary="Chats in SQLite; replies written by the server and streamed over SSE.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Content-Type", "Accept", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Location", "Retry-After"],
        )
    app.add_middleware(RequestLog, max_body=settings.max_request_bytes)
    app.include_router(router)
    if STATIC.is_dir():  # without it, StaticFiles answered every /static/... with a 500
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def openapi() -> dict[str, Any]:
        """FastAPI's document, plus the limits that are settings (so clients and fuzzers see
        them): the longest message, and the models a chat may use."""
        if app.openapi_schema is None:
            components = FastAPI.openapi(app)["components"]["schemas"]
            content = components["MessageCreate"]["properties"]["content"]
            content["maxLength"] = settings.max_message_chars
            model = components["ChatCreate"]["properties"]["model"]
            model["anyOf"] = [{"enum": settings.models}, {"type": "null"}]
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        # FastAPI answers 400 "There was an error parsing the body" when json.loads cannot
        # even start (a body that is not UTF-8, or nested past the recursion limit); the
        # contract says malformed JSON is 422, shaped like the other validation errors.
        if error.status_code == 400 and isinstance(error.__cause__, ValueError | RecursionError):
            message = "The body could not be read as JSON (not UTF-8, or nested too deep)."
            detail = [{"type": "json_invalid", "loc": ["body"], "msg": message}]
            return JSONResponse({"detail": detail}, 422)
        return await http_exception_handler(request, error)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, error: RequestValidationError) -> Response:
        # FastAPI's own handler echoes each error's `input` and made two kinds of it a 500:
        # raw bytes that are not UTF-8 (a body sent as text/plain), and strings with lone
        # surrogates (JSON allows "\ud800"), which UTF-8 cannot encode: ASCII JSON can.
        detail = jsonable_encoder(error.errors(), custom_encoder={bytes: _bytes_text})
        return Response(json.dumps({"detail": detail}), 422, media_type="application/json")

    @app.exception_handler(sqlite3.DatabaseError)
    async def storage_unavailable(request: Request, error: sqlite3.DatabaseError) -> Response:
        logger.error("storage error on {} {}: {}", request.method, request.url.path, error)
        return JSONResponse(
            {"detail": "Storage is unavailable; try again shortly."},
            503,
            headers={"Retry-After": "5"},
        )

    return app


# Dependencies
# `async def`, though they never await: FastAPI runs a plain `def` dependency in its thread
# pool, which was three thread hops per request for three attribute reads (bench profile
# under 50 senders: ~9 % of the event loop's time in run_in_threadpool).


async def get_settings_dep(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


async def get_db(request: Request) -> Database:
    """The app's database."""
    db: Database = request.app.state.db
    return db


async def get_registry(request: Request) -> ReplyRegistry:
    """The app's reply registry."""
    registry: ReplyRegistry = request.app.state.registry
    return registry


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
DatabaseDep = Annotated[Database, Depends(get_db)]
RegistryDep = Annotated[ReplyRegistry, Depends(get_registry)]


async def get_chat(chat_id: str, db: DatabaseDep) -> Chat:
    """The chat named in the path, or 404."""
    chat = await anyio.to_thread.run_sync(db.get_chat, chat_id)
    if chat is None:
        raise HTTPException(404, "Chat not found.")
    return chat


ChatDep = Annotated[Chat, Depends(get_chat)]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size.")]
MessageLimit = Annotated[int, Query(ge=1, le=10_000, description="Page size.")]


def invalid(location: list[str | int], message: str, kind: str = "value_error") -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors."""
    return HTTPException(422, [{"type": kind, "loc": location, "msg": message}])


async def reply_frames(
    registry: ReplyRegistry, db: Database, chat_id: str, message_id: str, after: int
) -> AsyncIterator[bytes] | None:
    """A reply's events after id `after`: its live log if we have it, else (finished long ago,
    or before a restart) its `message.done` alone. None when there is nothing to send."""
    reply = registry.get(message_id)
    if reply is not None and reply.chat.id == chat_id:
        if reply.final is not None and after == reply.last_event_id:
            return None
        if reply.final is not None and after > reply.last_event_id:
            return single(reply.encoded(reply.last_event_id - 1))
        return reply.follow(after)
    state = await anyio.to_thread.run_sync(db.get_reply_state, chat_id, message_id)
    if state is None or state[0].role != "assistant":
        raise HTTPException(404, "Reply not found.")
    message, last_event_id = state
    if message.status not in FINAL_STATUSES:
        # Written by another process: this one cannot follow it.
        raise HTTPException(
            503,
            "This reply is being written by another server process.",
            headers={"Retry-After": "5"},
        )
    done_id = last_event_id or 1
    if after == done_id:
        return None
    return single(model_frame("message.done", message, done_id))


async def single(data: bytes) -> AsyncIterator[bytes]:
    """A stream of one event."""
    yield data


async def with_user_message(user: Message, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A POST's stream: the user message (no id: it is not part of the reply), then the reply;
    the user message and the reply's first events go out in one write."""
    first = await anext(frames, b"")
    yield model_frame("message.created", user) + first
    async for data in frames:
        yield data


def wants_json(accept: str | None) -> bool:
    """`Accept: application/json` (and not event-stream) asks for the 202 answer."""
    if not accept:
        return False
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return "application/json" in types and "text/event-stream" not in types


# Routes

RETRY_AFTER = {"description": "Seconds to wait before trying again.", "schema": {"type": "string"}}
ERRORS: dict[int, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Unknown chat or message."},
    409: {"model": Conflict, "description": "A reply is in progress, or the chat is full."},
    413: {"model": ErrorBody, "description": "The body is larger than MAX_REQUEST_BYTES."},
    503: {
        "model": ErrorBody,
        "description": "Busy (MAX_ACTIVE_REPLIES), shutting down, or storage unavailable.",
        "headers": {"Retry-After": RETRY_AFTER | {"required": True}},
    },
}


SSE = {"text/event-stream": {"schema": STREAM_EVENT_SCHEMA}}
LOCATION_REQUIRED = {
    "description": "Where to find it.",
    "schema": {"type": "string"},
    "required": True,
}


def errors(
    *codes: int, success: dict[int | str, dict[str, Any]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """A route's documented answers: `success` ones, then the errors (every route can meet a
    storage fault: 503)."""
    return (success or {}) | {code: ERRORS[code] for code in (*codes, 503)}


router = APIRouter()


@router.post(
    "/chats",
    status_code=201,
    response_model=Chat,
    tags=["chats"],
    responses=errors(413, success={201: {"headers": {"Location": LOCATION_REQUIRED}}}),
)
async def create_chat(
    response: Response, db: DatabaseDep, settings: SettingsDep, body: ChatCreate | None = None
) -> Chat:
    """Create a chat. Every field is optional; `model` must be one the server allows."""
    body = body or ChatCreate()
    model = body.model or settings.openai_model
    if model not in settings.models:
        raise invalid(["body", "model"], f"Model not allowed; choose one of {settings.models}.")
    chat = await anyio.to_thread.run_sync(
        db.create_chat, new_id("chat"), body.title, body.system_prompt, model, limiter=db.writer
    )
    response.headers["Location"] = f"/chats/{chat.id}"
    return chat


@router.get("/chats", tags=["chats"], responses=errors(404))
async def read_chats(db: DatabaseDep, limit: Limit = 20, after: str | None = None) -> ChatList:
    """List chats, newest created first; `after` (a chat id) starts the page after it."""
    try:
        chats, has_more = await anyio.to_thread.run_sync(db.list_chats, limit, after)
    except NotFoundError as error:
        raise HTTPException(404, str(error)) from error
    return ChatList(data=chats, has_more=has_more)


@router.get("/chats/{chat_id}", tags=["chats"], responses=errors(404))
async def read_chat(chat: ChatDep) -> Chat:
    """One chat."""
    return chat


@router.patch("/chats/{chat_id}", tags=["chats"], responses=errors(404, 413))
async def update_chat(chat: ChatDep, body: ChatUpdate, db: DatabaseDep) -> Chat:
    """Change a chat's `title` and/or `system_prompt` (`null` clears it)."""
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        return chat
    updated = await anyio.to_thread.run_sync(db.update_chat, chat.id, changes, limiter=db.writer)
    if updated is None:
        raise HTTPException(404, "Chat not found.")
    return updated


@router.delete("/chats/{chat_id}", status_code=204, tags=["chats"], responses=errors(404))
async def delete_chat(chat: ChatDep, db: DatabaseDep, registry: RegistryDep) -> Response:
    """Delete a chat with all its messages; a reply in progress is cancelled first."""
    await registry.stop_chat(chat.id)
    await anyio.to_thread.run_sync(db.delete_chat, chat.id, limiter=db.writer)
    return Response(status_code=204)


@router.post(
    "/chats/{chat_id}/messages",
    tags=["messages"],
    status_code=200,
    response_model=None,
    response_class=EventSourceResponse,
    responses=errors(
        404,
        409,
        413,
        success={
            200: {"content": SSE, "description": "The reply's event stream."},
            202: {
                "model": SendResult,
                "description": "Accepted (with `Accept: application/json`).",
                "headers": {"Location": LOCATION_REQUIRED},
            },
        },
    ),
)
async def create_message(
    chat_id: str,
    body: MessageCreate,
    db: DatabaseDep,
    registry: RegistryDep,
    settings: SettingsDep,
    accept: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> Response:
    """Send a user message and start the reply. The reply is written by the server: a client
    that goes away stops nothing. Answers with the reply's event stream, or 202 with both
    messages for `Accept: application/json` (then follow `Location` with EventSource)."""
    content = body.content
    if not content.strip():
        raise invalid(["body", "content"], "Content must not be empty.")
    if len(content) > settings.max_message_chars:
        raise invalid(
            ["body", "content"],
            f"Content must be at most {settings.max_message_chars} characters.",
            "string_too_long",
        )
    # uvicorn's SIGTERM handler sets AppStatus.should_exit at once (sse-starlette patches it
    # in); the registry only hears of it when a stream notices, up to 0.5 s later.
    if registry.closing or AppStatus.should_exit:
        raise HTTPException(503, "The server is shutting down.", headers={"Retry-After": "5"})
    outcome: SendOutcome | None
    if len(registry.active) + registry.starting >= settings.max_active_replies:
        # A retry of a send that was stored starts nothing: it gets what the first got
        # (API.md), full or not.
        if await anyio.to_thread.run_sync(db.get_chat, chat_id) is None:
            raise HTTPException(404, "Chat not found.")
        earlier = None
        if idempotency_key is not None:
            earlier = await anyio.to_thread.run_sync(
                db.earlier_send, chat_id, idempotency_key, content
            )
        if earlier is None:
            raise HTTPException(
                503,
                "Too many replies in progress; try again shortly.",
                headers={"Retry-After": "2"},
            )
        outcome = earlier
    else:
        # Hold a slot while the database works: sends that race each other all passed the
        # check above before any of them started its reply, and overshot the limit.
        registry.starting += 1
        try:
            outcome = await anyio.to_thread.run_sync(
                lambda: db.start_exchange(
                    chat_id=chat_id,
                    user_message_id=new_id("msg"),
                    reply_id=new_id("msg"),
                    content=content,
                    idempotency_key=idempotency_key,
                    max_messages=settings.max_messages_per_chat,
                    context_chars=registry.history_chars,
                ),
                limiter=db.writer,
            )
        finally:
            registry.starting -= 1  # no await from here to registry.start(): still atomic
    match outcome:
        case None:
            raise HTTPException(404, "Chat not found.")
        case Busy(reply_id=reply_id) if reply_id in registry.unsaved:
            # That reply has ended, but storage failed as it did: not a reply in progress.
            raise HTTPException(
                503, "Storage is unavailable; try again shortly.", headers={"Retry-After": "5"}
            )
        case Busy(reply_id=reply_id):
            return JSONResponse(
                {
                    "detail": f"This chat already has a reply in progress: {reply_id}.",
                    "message_id": reply_id,
                },
                409,
            )
        case KeyReused():
            raise invalid(
                ["header", "idempotency-key"],
                "This Idempotency-Key was used before with different content.",
            )
        case ChatFull(limit=limit):
            raise HTTPException(409, f"This chat is full ({limit} messages); start a new one.")
        case Started(chat=chat, user_message=user, reply=reply_message, context=context):
            registry.start(chat, reply_message, context)
        case Replayed(user_message=user, reply=reply_message):
            pass
    location = f"/chats/{chat_id}/messages/{reply_message.id}/stream"
    if wants_json(accept):
        live = registry.get(reply_message.id)
        current = live.final or live.message if live else reply_message
        body_out = SendResult(user_message=user, assistant_message=current)
        return Response(
            body_out.model_dump_json(),
            202,
            media_type="application/json",
            headers={"Location": location},
        )
    frames = await reply_frames(registry, db, chat_id, reply_message.id, 0)
    assert frames is not None  # from the start there is always something to send
    response = EventStream(with_user_message(user, frames))
    response.headers["Location"] = location
    return response


@router.get(
    "/chats/{chat_id}/messages",
    tags=["messages"],
    response_model=MessageList,
    responses=errors(404),
)
async def read_messages(
    chat: ChatDep, db: DatabaseDep, limit: MessageLimit = 1000, after: str | None = None
) -> Response:
    """The chat's history, oldest first; `after` (a message id) starts the page after it."""
    # SQLite writes the body (the MessageList's exact JSON): no models to build and validate.
    try:
        body = await anyio.to_thread.run_sync(db.list_messages_json, chat.id, limit, after)
    except NotFoundError as error:
        raise HTTPException(404, str(error)) from error
    return Response(body, media_type="application/json")


@router.get("/chats/{chat_id}/messages/{message_id}", tags=["messages"], responses=errors(404))
async def read_message(chat_id: str, message_id: str, db: DatabaseDep) -> Message:
    """One message."""
    message = await anyio.to_thread.run_sync(db.get_message, chat_id, message_id)
    if message is None:
        raise HTTPException(404, "Message not found.")
    return message


@router.get(
    "/chats/{chat_id}/messages/{message_id}/stream",
    tags=["messages"],
    response_model=None,
    response_class=EventSourceResponse,
    responses=errors(
        404,
        success={
            200: {"content": SSE, "description": "The reply's event stream."},
            204: {"description": "The client has already seen the reply's last event."},
        },
    ),
)
async def stream_reply(
    chat_id: str,
    message_id: str,
    db: DatabaseDep,
    registry: RegistryDep,
    after: Annotated[int | None, Query(ge=0, description="Resume after this event id.")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """(Re)attach to a reply's events: replayed from the start, or after `Last-Event-ID` (or
    `after`, which wins), then live until `message.done`. 204 once the last event was seen."""
    start = after
    # isdigit() alone lets "²" through, which int() refuses: only ASCII digits count.
    if start is None and last_event_id is not None and DIGITS.fullmatch(last_event_id.strip()):
        start = int(last_event_id.strip())
    frames = await reply_frames(registry, db, chat_id, message_id, start or 0)
    if frames is None:
        return Response(status_code=204)
    return EventStream(frames)


@router.post(
    "/chats/{chat_id}/messages/{message_id}/cancel", tags=["messages"], responses=errors(404)
)
async def cancel_reply(
    chat_id: str, message_id: str, db: DatabaseDep, registry: RegistryDep
) -> Message:
    """Stop a reply in progress, keeping its text so far; a finished one is returned as is."""
    reply: Reply | None = registry.get(message_id)
    if reply is not None and reply.chat.id == chat_id:
        return await registry.stop(reply)
    message = await anyio.to_thread.run_sync(db.get_message, chat_id, message_id)
    if message is None:
        raise HTTPException(404, "Message not found.")
    return message


@router.get("/healthz", tags=["service"], responses=errors())
async def read_health(db: DatabaseDep, registry: RegistryDep) -> dict[str, Any]:
    """The service and its database answer, and the database can be written."""
    problem = await anyio.to_thread.run_sync(lambda: db.ping() and db.write_problem())
    if problem:
        raise HTTPException(
            503, f"Storage is unavailable: {problem}.", headers={"Retry-After": "5"}
        )
    return {"status": "ok", "database": "ok", "active_replies": len(registry.active)}


@router.get("/", include_in_schema=False)
async def read_page() -> Response:
    """The web client."""
    page = STATIC / "index.html"
    if not page.exists():
        return Response("The web client is not installed.", 404)
    return FileResponse(page, headers=PAGE_HEADERS)


app = create_app()
