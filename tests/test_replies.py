"""Unit tests of replies.py: the SSE wire bytes, the event log, and a reply's life in-process."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import sys
import tracemalloc
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

import llm
from db import Database, PromptContext, Started
from replies import EVENTS_PER_WRITE, Reply, ReplyConfig, ReplyRegistry, frame, model_frame
from schemas import Chat, Message, MessageDelta
from tests.fake_openai import FakeOpenAI, ToolCall, text
from tests.fake_openai import Reply as FakeReply

STAMP = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


def chat() -> Chat:
    return Chat(
        id="chat_x",
        title="t",
        system_prompt=None,
        model="m",
        created_at=STAMP,
        updated_at=STAMP,
    )


def reply_message(content: str = "", status: str = "in_progress") -> Message:
    return Message.model_validate(
        {
            "id": "msg_r",
            "chat_id": "chat_x",
            "role": "assistant",
            "content": content,
            "status": status,
            "created_at": STAMP,
            "completed_at": None,
            "model": "m",
            "finish_reason": None,
            "usage": None,
            "tool_calls": [],
            "error": None,
        }
    )


@pytest.mark.parametrize(
    ("name", "data", "event_id", "wire"),
    [
        pytest.param(
            "message.delta",
            '{"message_id":"msg_r","delta":"Hi"}',
            3,
            b'id: 3\nevent: message.delta\ndata: {"message_id":"msg_r","delta":"Hi"}\n\n',
            id="with-id",
        ),
        pytest.param(
            "message.created",
            "{}",
            None,
            b"event: message.created\ndata: {}\n\n",
            id="without-id",
        ),
        pytest.param(
            "message.delta",
            '{"delta":"line\\nbreak é"}',
            1,
            'id: 1\nevent: message.delta\ndata: {"delta":"line\\nbreak é"}\n\n'.encode(),
            id="escaped-newline-and-unicode",
        ),
    ],
)
def test_frame_wire_bytes(name: str, data: str, event_id: int | None, wire: bytes) -> None:
    assert frame(name, data, event_id) == wire


def test_model_frame_encodes_the_resource_itself() -> None:
    wire = model_frame("message.done", reply_message("Hello!", "completed"), 7)
    assert wire.startswith(b'id: 7\nevent: message.done\ndata: {"id":"msg_r","chat_id":"chat_x"')
    assert b'"content":"Hello!","status":"completed"' in wire
    assert b'"created_at":"2026-11-28T09:00:00Z"' in wire and wire.endswith(b"}\n\n")


def test_delta_wire_bytes_match_the_event_model() -> None:
    reply = Reply(chat(), reply_message())
    reply.append("message.created", reply_message().model_dump_json())
    reply.add_text('say "hi"\n')
    assert reply.encoded(1) == (
        b'id: 2\nevent: message.delta\ndata: {"message_id":"msg_r","delta":"say \\"hi\\"\\n"}\n\n'
    )


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("".join(map(chr, range(128))), id="every-ascii-character"),
        pytest.param("é ü ß 日本語 😀 \u2028\u2029 \ufeff \x80\x9f", id="beyond-ascii"),
        pytest.param('\\"\\n "quoted" \\', id="escapes"),
        pytest.param("", id="empty"),
    ],
)
def test_delta_bytes_are_those_pydantic_writes_for_its_event(text: str) -> None:
    # Deltas are framed by hand (orjson for the text): byte for byte the event model's JSON
    # (the event name is on the `event:` line, not in the data).
    reply = Reply(chat(), reply_message())
    reply.append("message.created", reply_message().model_dump_json())
    reply.add_text(text)
    event = MessageDelta(message_id=reply.id, delta=text)
    assert reply.encoded(1) == frame("message.delta", event.model_dump_json(exclude={"type"}), 2)


def test_unread_deltas_merge_and_read_ones_are_sealed() -> None:
    reply = Reply(chat(), reply_message())
    reply.add_text("a")
    reply.add_text("b")
    assert reply.last_event_id == 1
    first = reply.encoded(0)
    reply.add_text("c")
    assert reply.last_event_id == 2
    assert reply.encoded(0) == first and b'"delta":"ab"' in first
    assert b'"delta":"c"' in reply.encoded(1)
    assert reply.content() == "abc"


def ids(piece: bytes) -> list[bytes]:
    """The `id:` lines of a piece a follower took (it may hold several events)."""
    return [line for line in piece.split(b"\n") if line.startswith(b"id: ")]


def test_follow_replays_then_waits_for_live_events() -> None:
    async def main() -> list[bytes]:
        reply = Reply(chat(), reply_message())
        reply.append("message.created", "{}")
        reply.add_text("x")
        seen: list[bytes] = []

        async def read() -> None:
            async for data in reply.follow(0):
                seen.append(data)

        async with anyio.create_task_group() as group:
            group.start_soon(read)
            await anyio.sleep(0.01)
            reply.add_text("y")
            await anyio.sleep(0.01)
            reply.final = reply_message("xy", "completed")
            reply.append("message.done", reply.final.model_dump_json())
        return seen

    seen = anyio.run(main)
    # What was there already comes as one piece (one write to the client); then each change.
    assert [ids(piece) for piece in seen] == [[b"id: 1", b"id: 2"], [b"id: 3"], [b"id: 4"]]
    assert b'"delta":"x"' in seen[0] and b'"delta":"y"' in seen[1]


def test_a_long_replay_goes_out_a_bounded_piece_at_a_time() -> None:
    # Joined up to EVENTS_PER_WRITE, not all at once: a reconnecting client of a long reply
    # would otherwise get the whole log as one bytes object, past any back-pressure.
    async def main() -> list[bytes]:
        reply = Reply(chat(), reply_message())
        for _ in range(599):
            reply.add_text("word ")
            reply.encoded(reply.last_event_id - 1)  # read as it came: one event each
        reply.final = reply_message("word " * 599, "completed")
        reply.append("message.done", "{}")
        return [data async for data in reply.follow(0)]

    pieces = anyio.run(main)
    assert [len(ids(piece)) for piece in pieces] == [EVENTS_PER_WRITE, EVENTS_PER_WRITE, 88]
    assert ids(pieces[0])[0] == b"id: 1" and ids(pieces[-1])[-1] == b"id: 600"


def test_follow_after_skips_what_the_client_saw() -> None:
    async def main() -> list[bytes]:
        reply = Reply(chat(), reply_message())
        for name in ("message.created", "chat.updated"):
            reply.append(name, "{}")
        reply.final = reply_message("", "completed")
        reply.append("message.done", "{}")
        return [data async for data in reply.follow(2)]

    assert anyio.run(main) == [b"id: 3\nevent: message.done\ndata: {}\n\n"]


def test_a_compacted_log_replays_the_same_bytes_and_says_its_true_size() -> None:
    async def replays(reply: Reply) -> list[list[bytes]]:
        return [[data async for data in reply.follow(after)] for after in range(6)]

    def finished() -> Reply:
        reply = Reply(chat(), reply_message())
        reply.append("message.created", '{"id":"msg_r"}')
        reply.add_text("Hello, ")
        reply.encoded(1)  # read: sealed
        reply.add_text("wörld")
        reply.add_text(' "quoted"\n')  # never read: still open, merged
        reply.append("chat.updated", '{"title":"T"}')
        reply.final = reply_message('Hello, wörld "quoted"\n', "completed")
        reply.append("message.done", reply.final.model_dump_json())
        return reply

    live, compacted = finished(), finished()
    compacted.compact()
    before, after = anyio.run(replays, live), anyio.run(replays, compacted)
    assert after == before
    events = [compacted.encoded(i) for i in range(5)]
    assert [live.encoded(i) for i in range(5)] == events
    # A finished log is all there: each replay is one piece (one write to the client).
    assert before == [[b"".join(events[skip:])] for skip in range(5)] + [[]]
    assert compacted.last_event_id == live.last_event_id == 5
    # What KEEP_FINISHED_BYTES counts is what the log holds: the text, the bytes of the
    # events that are not deltas (created, chat.updated, done), and 4 bytes an event.
    created, _, _, updated, done = events
    assert compacted.content() == 'Hello, wörld "quoted"\n'
    text = sys.getsizeof(compacted.content())
    assert compacted.size == text + len(created) + len(updated) + len(done) + 4 * 5


def test_a_long_reply_holds_its_text_not_a_frame_per_event() -> None:
    # 200 deltas read as they came, as a reader keeping up with a slow model reads them: the
    # log used to keep each one's wire bytes (~230 bytes an event with its object).
    def written() -> Reply:
        reply = Reply(chat(), reply_message())
        reply.append("message.created", reply_message().model_dump_json())
        for _ in range(200):
            reply.add_text("word ")
            reply.encoded(reply.last_event_id - 1)
        reply.content()  # the checkpoints join the text every half second
        return reply

    written()  # warm caches (the encoder's, the event loop policy's)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        replies = [written() for _ in range(20)]
        held = (tracemalloc.get_traced_memory()[0] - start) / len(replies)
    finally:
        tracemalloc.stop()
    assert replies[0].content() == "word " * 200
    assert held < 8_000, held


def start_in(db: Database, chat_id: str, n: str = "") -> tuple[Chat, Started]:
    """A new chat whose user message "hello" awaits its reply `msg_a{n}`."""
    stored = db.create_chat(chat_id, "t", None, "gpt-4o-mini")
    outcome = db.start_exchange(
        chat_id=stored.id,
        user_message_id=f"msg_u{n}",
        reply_id=f"msg_a{n}",
        content="hello",
        idempotency_key=None,
        max_messages=100,
    )
    assert isinstance(outcome, Started)
    return stored, outcome


def started_exchange(tmp_path: Path, chat_id: str) -> tuple[Database, Chat, Started]:
    """A fresh database with a chat whose user message "hello" awaits its reply `msg_a`."""
    db = Database(tmp_path / "chat.db")
    db.migrate()
    stored, outcome = start_in(db, chat_id)
    return db, stored, outcome


async def _run_one(
    tmp_path: Path, fake: FakeOpenAI, script: FakeReply, **config: object
) -> tuple[Message, list[bytes], Database]:
    db, stored, outcome = started_exchange(tmp_path, "chat_unit")
    fake.push(script)
    client = llm.make_client(api_key="k", base_url=fake.base_url, timeout=5, max_retries=0)
    settings = ReplyConfig(client=client, checkpoint_interval=0.05, **config)  # type: ignore[arg-type]
    seen: list[bytes] = []
    async with anyio.create_task_group() as group:
        registry = ReplyRegistry(db, settings, group)
        reply = registry.start(stored, outcome.reply)

        async def collect(frames: AsyncIterator[bytes]) -> None:
            async for data in frames:
                seen.append(data)

        group.start_soon(collect, reply.follow(0))
        await reply.done.wait()
    await client.close()
    assert reply.final is not None
    return reply.final, seen, db


def test_a_reply_is_streamed_and_stored(tmp_path: Path, fake: FakeOpenAI) -> None:
    final, seen, db = anyio.run(_run_one, tmp_path, fake, text("One two three", pieces=3))
    assert final.status == "completed" and final.content == "One two three"
    assert db.get_message("chat_unit", "msg_a") == final
    events = b"".join(seen).split(b"\n\n")[:-1]
    assert events[0].startswith(b"id: 1\nevent: message.created\n")
    assert events[-1].startswith(f"id: {len(events)}\nevent: message.done\n".encode())
    db.close()


def test_a_checkpoint_saves_text_while_the_reply_runs(tmp_path: Path, fake: FakeOpenAI) -> None:
    async def main() -> tuple[str, str]:
        db, stored, outcome = started_exchange(tmp_path, "chat_cp")
        fake.push(FakeReply(chunks=[f"p{i} " for i in range(30)], delay=0.02))
        client = llm.make_client(api_key="k", base_url=fake.base_url, timeout=5, max_retries=0)
        config = ReplyConfig(client=client, checkpoint_interval=0.05)
        async with anyio.create_task_group() as group:
            registry = ReplyRegistry(db, config, group)
            reply = registry.start(stored, outcome.reply)
            await anyio.sleep(0.3)
            mid = db.get_message("chat_cp", "msg_a")
            await reply.done.wait()
        await client.close()
        assert mid is not None and mid.status == "in_progress"
        final = db.get_message("chat_cp", "msg_a")
        assert final is not None
        db.close()
        return mid.content, final.content

    mid, final = anyio.run(main)
    assert mid.startswith("p0 p1 ") and len(mid) < len(final)
    assert final == "".join(f"p{i} " for i in range(30))


def test_one_checkpoint_task_saves_every_reply_in_progress(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    """Two replies at once: both are checkpointed mid-way, by one task that ends when idle."""

    async def main() -> tuple[list[str], list[str], list[str]]:
        db = Database(tmp_path / "chat.db")
        db.migrate()
        started = [start_in(db, f"chat_{n}", str(n)) for n in (1, 2)]
        for _ in (1, 2):
            fake.push(FakeReply(chunks=[f"p{i} " for i in range(30)], delay=0.02))
        client = llm.make_client(api_key="k", base_url=fake.base_url, timeout=5, max_retries=0)
        config = ReplyConfig(client=client, checkpoint_interval=0.05, generate_titles=False)
        async with anyio.create_task_group() as group:
            registry = ReplyRegistry(db, config, group)
            replies = [registry.start(chat, outcome.reply) for chat, outcome in started]
            tasks = [t.get_name() for t in asyncio.all_tasks()]
            await anyio.sleep(0.3)
            mids = [db.get_message(f"chat_{n}", f"msg_a{n}") for n in (1, 2)]
            for reply in replies:
                await reply.done.wait()
        # The task group ended: the checkpoint task stopped by itself once nothing ran.
        await client.close()
        finals = [db.get_message(f"chat_{n}", f"msg_a{n}") for n in (1, 2)]
        db.close()
        assert registry.checkpointing is False
        return (
            [m.content if m and m.status == "in_progress" else "" for m in mids],
            [f.content if f else "" for f in finals],
            tasks,
        )

    mids, finals, tasks = anyio.run(main)
    whole = "".join(f"p{i} " for i in range(30))
    assert all(mid.startswith("p0 p1 ") and len(mid) < len(whole) for mid in mids), mids
    assert finals == [whole, whole]
    assert tasks.count("checkpoints") == 1


def test_a_reply_builds_its_prompt_from_the_context_it_was_started_with(
    tmp_path: Path, fake: FakeOpenAI
) -> None:
    """The send hands over the prompt context it read in its transaction; the reply uses it
    and does not read the chat again (here the two differ, to tell which one was used)."""

    async def main() -> Message:
        db, stored, outcome = started_exchange(tmp_path, "chat_ctx")
        fake.push(text("ok"))
        client = llm.make_client(api_key="k", base_url=fake.base_url, timeout=5, max_retries=0)
        config = ReplyConfig(client=client, generate_titles=False)
        handed = db.prompt_context("chat_ctx", "msg_a", 400_000)
        assert handed is not None
        marked = dataclasses.replace(handed.history[-1], content="from the handed context")
        context = PromptContext(handed.chat, [marked], left_out=7)
        async with anyio.create_task_group() as group:
            registry = ReplyRegistry(db, config, group)
            reply = registry.start(stored, outcome.reply, context)
            await reply.done.wait()
        await client.close()
        db.close()
        assert reply.final is not None
        return reply.final

    final = anyio.run(main)
    assert final.status == "completed"
    sent = fake.requests[-1]["messages"]
    assert sent[-1] == {"role": "user", "content": "from the handed context"}
    assert llm.TRIMMED_NOTE.format(count=7) in sent[0]["content"]  # the left-out count


def test_the_round_limit_ends_the_reply_incomplete(tmp_path: Path, fake: FakeOpenAI) -> None:
    loop = FakeReply(tool_calls=[ToolCall("calculate", '{"expression": "1+1"}')])
    fake.default = loop
    final, seen, db = anyio.run(
        functools.partial(_run_one, max_tool_rounds=2), tmp_path, fake, loop
    )
    assert final.status == "incomplete"
    assert final.error is not None and final.error.code == "tool_rounds_exceeded"
    assert len(final.tool_calls) == 2 and all(c.result == 2 for c in final.tool_calls)
    db.close()
