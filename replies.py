"""A reply's life: the background task that writes it, its numbered event log, subscribers,
cancel, checkpoints to SQLite, and recovery at start-up."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import orjson
from anyio.abc import TaskGroup
from loguru import logger
from openai import AsyncOpenAI
from pydantic import BaseModel, JsonValue

import llm
import tools
from db import Checkpoint, Database, PastMessage, PromptContext
from schemas import Chat, Message, MessageError, ToolCallRecord, ToolCallRequest, Usage


def frame(name: str, data: str, event_id: int | None = None) -> bytes:
    """One SSE event on the wire; `data` is JSON text, which never holds a raw newline."""
    head = f"event: {name}\n" if event_id is None else f"id: {event_id}\nevent: {name}\n"
    return f"{head}data: {data}\n\n".encode()


def compact(value: Any) -> str:
    """JSON as pydantic writes it: no spaces, UTF-8 as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def model_frame(name: str, model: BaseModel, event_id: int | None = None) -> bytes:
    """An event whose data is a whole resource (a Message or a Chat)."""
    return frame(name, model.model_dump_json(), event_id)


@dataclass
class Outcome:
    """How the writing of a reply ended."""

    status: str
    finish_reason: str | None = None
    error: MessageError | None = None


# Most events a reader takes in one piece (one write to its client): ~30 KB of deltas.
EVENTS_PER_WRITE = 256


class Reply:
    """A reply being written (or recently written): its state and its event log.

    The log is numbered events. A `message.delta` is a stretch of the reply's text: it stays
    open, taking more text, until a subscriber reads it (a fast model with slow readers thus
    sends fewer, larger deltas, and every reader sees the same event ids). The log keeps, per
    event, only where its text ends (4 bytes); a delta's bytes are made when it is read, and
    again from the text for a replay. Other events (a few per reply) keep their bytes. A log
    of wire bytes per event held ~230 bytes an event, most of a slow stream's memory (bench,
    round 5)."""

    def __init__(self, chat: Chat, message: Message) -> None:
        self.chat = chat
        self.message = message
        self.id = message.id
        self.text: list[str] = []
        self.length = 0  # of the text, in characters
        self.tool_calls: list[dict[str, JsonValue]] = []
        self.usage: Usage | None = None
        self.stop: Outcome | None = None
        self.scope: anyio.CancelScope | None = None
        self.final: Message | None = None
        self.context: PromptContext | None = None  # handed over by start(), used once
        self.done = anyio.Event()
        self.dirty = False
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self.size = 0  # what a finished log holds, in bytes (see compact)
        self.events = 0  # the log's length (its newest id)
        self._ends = array("I")  # per event: where its text ends (a delta's starts at the last)
        self._other: dict[int, bytes] = {}  # the bytes of every event that is not a delta
        self._open: list[str] | None = None  # the text of the last event, an open delta
        # Woken at every change. asyncio's Event, not anyio's: a new one per chunk, and
        # anyio's looks up the running backend each time (3 µs against 0.3 µs; bench, round 5).
        self._changed = asyncio.Event()
        # Deltas are encoded by hand: the message id is fixed, only the text varies.
        self._delta_prefix = b'data: {"message_id":%b,"delta":' % orjson.dumps(self.id)

    @property
    def last_event_id(self) -> int:
        """The id of the newest event (ids count from 1)."""
        return self.events

    def content(self) -> str:
        """The text so far."""
        if len(self.text) > 1:
            self.text[:] = ["".join(self.text)]
        return self.text[0] if self.text else ""

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def append(self, name: str, data: str) -> None:
        """Add an event to the log and wake the subscribers."""
        self._open = None  # text from now on is a new delta
        self._other[self.events] = frame(name, data, self.events + 1)
        self._ends.append(self.length)
        self.events += 1
        self._notify()

    def add_text(self, text: str) -> None:
        """Add a piece of the model's text: to the open delta if nobody has read it yet."""
        self.text.append(text)
        self.length += len(text)
        self.dirty = True
        if self._open is not None:
            self._open.append(text)
            self._ends[-1] = self.length
        else:
            self._open = [text]
            self._ends.append(self.length)
            self.events += 1
        self._notify()

    def encoded(self, index: int) -> bytes:
        """The wire bytes of the event at `index` (id index + 1); reading the open delta
        seals it."""
        other = self._other.get(index)
        if other is not None:
            return other
        if index == self.events - 1 and self._open is not None:
            delta, self._open = "".join(self._open), None
        else:  # a delta read before, or one that later events closed
            delta = self.content()[self._ends[index - 1] if index else 0 : self._ends[index]]
        # orjson writes a string as json.dumps(ensure_ascii=False) does, at a tenth of the time.
        return b"id: %d\nevent: message.delta\n%b%b}\n\n" % (
            index + 1,
            self._delta_prefix,
            orjson.dumps(delta),
        )

    def compact(self) -> None:
        """At the end: the text as one string, and `size` what the log holds (the text, the
        other events' bytes, 4 bytes an event), so KEEP_FINISHED_BYTES bounds the memory it
        names."""
        self._open = None
        text = self.content()
        other = sum(map(len, self._other.values()))
        self.size = sys.getsizeof(text) + other + self._ends.itemsize * len(self._ends)

    async def follow(self, after: int = 0) -> AsyncIterator[bytes]:
        """The events after id `after`, then live ones until `message.done`. Events that are
        ready together come as one piece, up to EVENTS_PER_WRITE: one write to the client
        instead of one each (a send passes four ASGI layers and a system call), while a
        replay of a long reply still goes out a piece at a time, as the client takes it."""
        index = max(after, 0)
        while True:
            changed = self._changed
            while index < self.events:
                ready = range(index, min(self.events, index + EVENTS_PER_WRITE))
                index = ready.stop
                yield b"".join([self.encoded(i) for i in ready])
            if self.final is not None:
                return
            await changed.wait()


@dataclass
class ReplyConfig:
    """What writing a reply needs; built once by main.py from the settings."""

    client: AsyncOpenAI | None
    default_system_prompt: str | None = None
    max_context_tokens: int = 100_000
    max_output_tokens: int | None = None
    max_tool_rounds: int = 5
    tools: Mapping[str, tools.Tool] = field(default_factory=lambda: tools.TOOLS)
    idle_timeout: float = 60.0
    max_reply_seconds: float = 600.0
    generate_titles: bool = True
    checkpoint_interval: float = 0.5
    keep_finished_seconds: float = 300.0
    keep_finished_bytes: int = 64 * 1024 * 1024


class ReplyRegistry:
    """Owns every reply in progress: starts, follows, cancels and finishes them. Made once in
    main.py's lifespan, with the task group its replies run in."""

    def __init__(self, db: Database, config: ReplyConfig, task_group: TaskGroup) -> None:
        self.db = db
        self.config = config
        # Made once: pydantic builds a JSON schema afresh at each call, ~0.5 ms for our tools.
        self.tool_schemas = tools.tool_schemas(config.tools) if config.tools else []
        self.task_group = task_group
        self.active: dict[str, Reply] = {}
        self.starting = 0  # sends between the MAX_ACTIVE_REPLIES check and start()
        self.finished: OrderedDict[str, Reply] = OrderedDict()
        self.finished_bytes = 0  # the sum of the finished logs' sizes, kept as they come and go
        self.checkpointing = False  # whether the checkpoint task runs (it stops when idle)
        self.closing = False
        self.shutdown_requested = anyio.Event()
        # Replies that ended while storage was failing: their final state, kept until stored.
        self.unsaved: dict[str, dict[str, Any]] = {}
        self.save_retry_interval = 1.0

    @property
    def history_chars(self) -> int:
        """How much history a prompt could keep, in characters: llm.estimate_tokens counts a
        token per 4 characters at most, so 4 per token of the context bounds it."""
        return 4 * self.config.max_context_tokens

    def get(self, message_id: str) -> Reply | None:
        """A reply in progress or recently finished, with its event log."""
        return self.active.get(message_id) or self.finished.get(message_id)

    def active_in_chat(self, chat_id: str) -> Reply | None:
        """The chat's reply in progress, if any."""
        return next((r for r in self.active.values() if r.chat.id == chat_id), None)

    def start(self, chat: Chat, message: Message, context: PromptContext | None = None) -> Reply:
        """Begin writing the reply `message` (stored `in_progress`) in the background, from
        its prompt context if the caller has read it already."""
        reply = Reply(chat, message)
        reply.context = context
        reply.append("message.created", message.model_dump_json())
        self.active[reply.id] = reply
        self.task_group.start_soon(self._run, reply, name=f"reply {reply.id}")
        if not self.checkpointing:
            self.checkpointing = True
            self.task_group.start_soon(self._checkpoints, name="checkpoints")
        return reply

    async def stop(
        self, reply: Reply, status: str = "cancelled", error: MessageError | None = None
    ) -> Message:
        """Stop a reply in progress (keeping its text) and wait until it is stored."""
        if reply.final is None and reply.stop is None:
            reply.stop = Outcome(status, None, error)
            if reply.scope is not None:
                reply.scope.cancel()
        await reply.done.wait()
        assert reply.final is not None
        return reply.final

    async def stop_chat(self, chat_id: str) -> None:
        """Cancel the chat's reply in progress, if any (the chat is being deleted)."""
        reply = self.active_in_chat(chat_id)
        if reply is not None:
            await self.stop(reply)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Refuse new replies, end those in progress `incomplete` and store them."""
        self.closing = True
        error = MessageError(
            code="server_shutdown", message="The server stopped while writing this reply."
        )
        with anyio.move_on_after(grace, shield=True):
            async with anyio.create_task_group() as group:
                for reply in list(self.active.values()):
                    group.start_soon(self.stop, reply, "incomplete", error)

    async def watch_for_shutdown(self) -> None:
        """Stop replies as soon as the server starts to shut down, so that open streams can
        still send their final `message.done` within the grace period."""
        await self.shutdown_requested.wait()
        await self.shutdown()

    # The writing itself.

    async def _run(self, reply: Reply) -> None:
        # Kept only if the task itself is cancelled from outside: the server stopping past
        # its grace period.
        outcome = Outcome(
            "incomplete",
            None,
            MessageError(
                code="server_shutdown", message="The server stopped while writing this reply."
            ),
        )
        try:
            with anyio.CancelScope() as scope:
                reply.scope = scope
                if reply.stop is not None:  # stopped before it began
                    scope.cancel()
                scope.deadline = anyio.current_time() + self.config.max_reply_seconds
                outcome = await self._generate(reply)
            if scope.cancelled_caught:
                outcome = reply.stop or Outcome(
                    "incomplete",
                    None,
                    MessageError(code="reply_timeout", message="The reply took too long."),
                )
        except Exception:
            logger.exception("reply {} crashed", reply.id)
            outcome = Outcome(
                "failed", None, MessageError(code="internal_error", message="Internal error.")
            )
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish(reply, outcome)

    async def _generate(self, reply: Reply) -> Outcome:
        config = self.config
        if config.client is None:
            return Outcome(
                "failed",
                None,
                MessageError(
                    code="not_configured",
                    message="No model is configured: set OPENAI_API_KEY or OPENAI_BASE_URL.",
                ),
            )
        # Usually read by the send that started this reply, in its transaction: each thread
        # hop costs the event loop a task, a cancel scope and a capacity-limiter round, and
        # the worker thread waits to win the GIL back from a busy loop (bench/README.md).
        prompt, reply.context = reply.context, None
        if prompt is None:
            prompt = await anyio.to_thread.run_sync(
                self.db.prompt_context, reply.chat.id, reply.id, self.history_chars
            )
        chat = prompt.chat if prompt else reply.chat
        history, left_out = (prompt.history, prompt.left_out) if prompt else ([], 0)
        schemas = self.tool_schemas
        messages = llm.build_prompt(
            chat_prompt=chat.system_prompt,
            default_prompt=config.default_system_prompt,
            history=history,
            max_context_tokens=config.max_context_tokens,
            tools=schemas,
            reserve_tokens=config.max_output_tokens or 1024,
            left_out=left_out,
        )
        current = [reply.id, *(m.id for m in history[-1:] if m.role == "user")]
        context = tools.ToolContext(
            chat_id=chat.id,
            search_history=lambda query, limit: anyio.to_thread.run_sync(
                self.db.search_messages, chat.id, query, limit, current
            ),
            set_title=lambda title: self._set_title(reply, title),
        )
        rounds = 0
        try:
            while True:
                end: llm.TurnEnd | None = None
                offset = len(reply.content())
                async for event in llm.stream_turn(
                    config.client,
                    model=reply.message.model or chat.model,
                    messages=messages,
                    tools=schemas,
                    max_tokens=config.max_output_tokens,
                    idle_timeout=config.idle_timeout,
                ):
                    if isinstance(event, llm.TextDelta):
                        reply.add_text(event.text)
                    else:
                        end = event
                assert end is not None
                self._add_usage(reply, end.usage)
                if not end.tool_calls:
                    break
                if rounds >= config.max_tool_rounds:
                    return Outcome(
                        "incomplete",
                        end.finish_reason,
                        MessageError(
                            code="tool_rounds_exceeded",
                            message=f"The model asked for tools more than "
                            f"{config.max_tool_rounds} times in one reply.",
                        ),
                    )
                rounds += 1
                text = reply.content()[offset:]
                messages.append(
                    {
                        "role": "assistant",
                        "content": text or None,
                        "tool_calls": [
                            {
                                "id": c.id,
                                "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments},
                            }
                            for c in end.tool_calls
                        ],
                    }
                )
                for call in end.tool_calls:
                    record = await self._call_tool(
                        reply, call, context, cut=end.finish_reason == "length"
                    )
                    messages.append(
                        {
                            "role": "tool",
                            "tool_call_id": call.id,
                            "content": llm.tool_result_content(record.result, record.error),
                        }
                    )
        except llm.LLMError as error:
            # The client gets the code; the operator also gets what lay under it.
            logger.warning(
                "reply {} failed: {} ({})", reply.id, error.code, llm.cause_of(error, config.client)
            )
            return Outcome("failed", None, MessageError(code=error.code, message=error.message))
        assert end is not None
        if end.finish_reason == "length":
            return Outcome(
                "incomplete",
                "length",
                MessageError(code="length", message="The reply reached its length limit."),
            )
        if config.generate_titles and chat.title is None and not reply.chat.title:
            await self._suggest_title(reply, history)
        return Outcome("completed", end.finish_reason)

    async def _call_tool(
        self, reply: Reply, call: llm.AccumulatedCall, context: tools.ToolContext, *, cut: bool
    ) -> ToolCallRecord:
        try:
            arguments: JsonValue = json.loads(call.arguments) if call.arguments else {}
        except ValueError:
            arguments = call.arguments
        request = ToolCallRequest(id=call.id, name=call.name, arguments=arguments)
        reply.append(
            "tool.call",
            compact({"message_id": reply.id, "tool_call": request.model_dump(mode="json")}),
        )
        if cut:
            record = ToolCallRecord(
                id=call.id,
                name=call.name,
                arguments=arguments,
                error="The call was cut off by the length limit before its arguments were "
                "complete, so it was not run.",
            )
        else:
            outcome = await tools.run_tool_call(
                call.name, call.arguments, context, self.config.tools
            )
            record = ToolCallRecord(
                id=call.id,
                name=call.name,
                arguments=outcome.arguments,
                result=outcome.result,
                error=outcome.error,
            )
        stored = record.model_dump(mode="json")
        stored["text_offset"] = len(reply.content())
        reply.tool_calls.append(stored)
        reply.dirty = True
        reply.append(
            "tool.result",
            compact({"message_id": reply.id, "tool_call": record.model_dump(mode="json")}),
        )
        return record

    async def _set_title(self, reply: Reply, title: str) -> None:
        changes: dict[str, str | None] = {"title": title}
        chat = await anyio.to_thread.run_sync(
            self.db.update_chat, reply.chat.id, changes, limiter=self.db.writer
        )
        if chat is not None:
            reply.chat = chat
            reply.append("chat.updated", chat.model_dump_json())

    async def _suggest_title(self, reply: Reply, history: list[PastMessage]) -> None:
        """Name an untitled chat after its first reply; a failure here costs only the title."""
        assert self.config.client is not None
        question = next((m.content for m in reversed(history) if m.role == "user"), "")
        try:
            title = await llm.suggest_title(
                self.config.client,
                model=reply.message.model or reply.chat.model,
                question=question,
                answer=reply.content(),
            )
        except llm.LLMError as error:
            logger.info("no title for chat {}: {}", reply.chat.id, error.code)
            return
        if title:
            await self._set_title(reply, title)

    @staticmethod
    def _add_usage(reply: Reply, usage: Usage | None) -> None:
        if usage is None:
            return
        if reply.usage is None:
            reply.usage = usage
        else:
            reply.usage = Usage(
                prompt_tokens=reply.usage.prompt_tokens + usage.prompt_tokens,
                completion_tokens=reply.usage.completion_tokens + usage.completion_tokens,
                total_tokens=reply.usage.total_tokens + usage.total_tokens,
            )

    async def _checkpoints(self) -> None:
        """While replies are being written, save the text so far of each that changed, every
        half second, all in one transaction: a crash loses at most that much, a fast model
        costs one write per interval, not one per token, and many replies cost one write
        together (one per reply per interval was 14 % of the CPU at 250 streams, bench)."""
        while self.active:
            await anyio.sleep(self.config.checkpoint_interval)
            changed = [reply for reply in self.active.values() if reply.dirty]
            if not changed:
                continue
            for reply in changed:
                reply.dirty = False
            saves = [
                Checkpoint(r.id, r.content(), list(r.tool_calls), r.last_event_id) for r in changed
            ]
            try:
                await anyio.to_thread.run_sync(
                    self.db.checkpoint_replies, saves, limiter=self.db.writer
                )
            except Exception as error:  # this task serves every reply: it must not end
                for reply in changed:
                    reply.dirty = True  # try again at the next interval
                if isinstance(error, sqlite3.Error):
                    logger.warning("checkpoint of {} replies failed: {}", len(changed), error)
                else:
                    logger.exception("checkpoint of {} replies failed", len(changed))
        # No await since `self.active` was found empty: start() sees this at once.
        self.checkpointing = False

    async def _finish(self, reply: Reply, outcome: Outcome) -> None:
        """Store the final state, announce it with `message.done`, and retire the reply."""
        done_id = reply.last_event_id + 1
        fields: dict[str, Any] = {
            "status": outcome.status,
            "content": reply.content(),
            "finish_reason": outcome.finish_reason,
            "usage": reply.usage.model_dump() if reply.usage else None,
            "tool_calls": reply.tool_calls,
            "error": outcome.error.model_dump() if outcome.error else None,
        }
        final: Message | None = None
        stored = True
        try:
            final = await anyio.to_thread.run_sync(
                lambda: self.db.finish_reply(reply.id, last_event_id=done_id, **fields),
                limiter=self.db.writer,
            )
        except sqlite3.Error as error:
            logger.error("storing reply {} failed: {}", reply.id, error)
            stored = False
            fields["status"] = "failed"
            fields["error"] = {
                "code": "storage_error",
                "message": "Storage failed when this reply ended; it is saved once storage"
                " is back.",
            }
        if final is None:  # the chat was deleted, or the database failed: say what we know
            final = Message.model_validate(
                reply.message.model_dump() | fields | {"completed_at": datetime.now(UTC)}
            )
        if not stored:
            # Until it is stored the row says `in_progress`, which would block the chat;
            # stored later, it must read as it was announced.
            assert final.completed_at is not None
            self.unsaved[reply.id] = fields | {
                "last_event_id": done_id,
                "completed_at": final.completed_at.isoformat(timespec="microseconds"),
            }
            self.task_group.start_soon(self._save_later, reply.id, name=f"save {reply.id}")
        reply.final = final
        reply.append("message.done", final.model_dump_json())
        reply.compact()
        reply.finished_at = time.monotonic()
        self.active.pop(reply.id, None)
        self.finished[reply.id] = reply
        self.finished_bytes += reply.size
        reply.done.set()
        self._prune()
        tokens = reply.usage.total_tokens if reply.usage else 0
        logger.info(
            "reply {} chat={} status={} duration={:.2f}s tokens={} events={}",
            reply.id,
            reply.chat.id,
            final.status,
            reply.finished_at - reply.started,
            tokens,
            reply.last_event_id,
        )

    async def _save_later(self, message_id: str) -> None:
        """Store a final state that storage refused, once it takes writes again. If the
        process stops first, the restart's recovery ends the reply from its checkpoint."""
        fields = self.unsaved[message_id]
        while True:
            await anyio.sleep(self.save_retry_interval)
            try:
                await anyio.to_thread.run_sync(
                    lambda: self.db.finish_reply(message_id, **fields), limiter=self.db.writer
                )
            except sqlite3.Error as error:
                logger.debug("reply {} still not stored: {}", message_id, error)
                continue
            del self.unsaved[message_id]
            logger.info("reply {} stored after storage came back", message_id)
            return

    def _prune(self) -> None:
        """Forget finished replies' logs after a while, or when they hold too much."""
        # The running total, not a sum over every finished log per reply: at 110 sends/s
        # with the default 300 s that was a sum over ~33,000 logs each time.
        horizon = time.monotonic() - self.config.keep_finished_seconds
        while self.finished:
            oldest = next(iter(self.finished.values()))
            if (
                oldest.finished_at or 0
            ) >= horizon and self.finished_bytes <= self.config.keep_finished_bytes:
                break
            self.finished_bytes -= oldest.size
            self.finished.popitem(last=False)
