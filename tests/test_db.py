"""Unit tests of db.py on a real SQLite file."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import JsonValue

import llm
from db import (
    MIGRATIONS,
    Busy,
    ChatFull,
    Checkpoint,
    Database,
    KeyReused,
    NotFoundError,
    PastMessage,
    Replayed,
    SendOutcome,
    Started,
)
from schemas import Message, MessageList
from tests.support import fill_chat


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "sub" / "chat.db")
    database.migrate()
    yield database
    database.close()


def exchange(
    db: Database,
    chat_id: str,
    n: int,
    key: str | None = None,
    content: str = "q",
    context_chars: int | None = None,
) -> SendOutcome | None:
    return db.start_exchange(
        chat_id=chat_id,
        user_message_id=f"msg_u{n}",
        reply_id=f"msg_a{n}",
        content=content,
        idempotency_key=key,
        max_messages=100,
        context_chars=context_chars,
    )


def finish(db: Database, message_id: str, content: str = "answer") -> None:
    db.finish_reply(
        message_id,
        status="completed",
        content=content,
        finish_reason="stop",
        usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        tool_calls=[],
        error=None,
        last_event_id=3,
    )


def test_migrate_creates_the_file_with_wal_and_runs_each_migration_once(db: Database) -> None:
    assert db.path.exists()
    conn = db.connection()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.migrate() == []
    names = [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY name")]
    assert names == [m.__name__ for m in MIGRATIONS]
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(messages)")}
    assert "messages_one_in_progress" in indexes
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_start_exchange_stores_both_messages_in_order(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    outcome = exchange(db, "chat_a", 1)
    assert isinstance(outcome, Started)
    assert outcome.user_message.role == "user" and outcome.user_message.status == "completed"
    assert outcome.reply.status == "in_progress" and outcome.reply.model == "m"
    # The chat as the same transaction left it (the route reads it nowhere else).
    assert outcome.chat.id == "chat_a" and outcome.chat.model == "m"
    assert outcome.chat.updated_at == outcome.user_message.created_at
    assert db.get_chat("chat_a") == outcome.chat
    assert isinstance(exchange(db, "chat_a", 2), Busy)
    finish(db, "msg_a1")
    assert isinstance(exchange(db, "chat_a", 2), Started)
    messages, more = db.list_messages("chat_a", 10, None)
    assert [m.id for m in messages] == ["msg_u1", "msg_a1", "msg_u2", "msg_a2"] and not more


def test_start_exchange_on_a_missing_chat_is_none(db: Database) -> None:
    assert exchange(db, "chat_missing", 1) is None


def test_the_database_itself_allows_one_reply_in_progress_per_chat(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    exchange(db, "chat_a", 1)
    with pytest.raises(sqlite3.IntegrityError), db.transaction() as tx:
        tx.execute(
            "INSERT INTO messages (id, chat_id, position, role, status, created_at)"
            " VALUES ('msg_x', 'chat_a', 9, 'assistant', 'in_progress', 'now')"
        )


def test_concurrent_exchanges_from_threads_start_one(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda n=n: results.append(exchange(db, "chat_a", n)))
        for n in range(10)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(isinstance(r, Started) for r in results) == 1
    assert sum(isinstance(r, Busy) for r in results) == 9


def test_idempotency_keys_replay_or_refuse(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    first = exchange(db, "chat_a", 1, key="k")
    again = exchange(db, "chat_a", 2, key="k")
    assert isinstance(first, Started) and isinstance(again, Replayed)
    assert again.user_message == first.user_message and again.reply.id == first.reply.id
    assert isinstance(exchange(db, "chat_a", 3, key="k", content="other"), KeyReused)


def test_a_full_chat_refuses_more(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    outcome = db.start_exchange(
        chat_id="chat_a",
        user_message_id="u",
        reply_id="a",
        content="q",
        idempotency_key=None,
        max_messages=1,
    )
    assert outcome == ChatFull(1)


def test_list_chats_pages_and_unknown_cursor(db: Database) -> None:
    for i in range(3):
        db.create_chat(f"chat_{i}", None, None, "m")
    page, more = db.list_chats(2, None)
    assert [c.id for c in page] == ["chat_2", "chat_1"] and more
    page, more = db.list_chats(2, "chat_1")
    assert [c.id for c in page] == ["chat_0"] and not more
    with pytest.raises(NotFoundError):
        db.list_chats(2, "chat_nope")


def test_update_chat_refuses_other_columns(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    with pytest.raises(ValueError):
        db.update_chat("chat_a", {"model": "x"})
    assert db.update_chat("chat_missing", {"title": "x"}) is None


def test_delete_chat_cascades(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    exchange(db, "chat_a", 1, key="k")
    assert db.delete_chat("chat_a") and not db.delete_chat("chat_a")
    conn = db.connection()
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM idempotency_keys").fetchone()[0] == 0


def test_checkpoint_then_recovery_keeps_the_text(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    exchange(db, "chat_a", 1)
    db.checkpoint_replies([Checkpoint("msg_a1", "partial text", [], 5)])
    assert db.recover_interrupted() == 1
    state = db.get_reply_state("chat_a", "msg_a1")
    assert state is not None
    message, last_event_id = state
    assert message.status == "incomplete" and message.content == "partial text"
    assert message.error is not None and message.error.code == "server_restarted"
    assert last_event_id == 6
    assert db.recover_interrupted() == 0


def test_one_checkpoint_saves_many_replies_and_leaves_finished_ones(db: Database) -> None:
    for n in (1, 2, 3):
        db.create_chat(f"chat_{n}", None, None, "m")
        exchange(db, f"chat_{n}", n)
    finish(db, "msg_a3", "already done")
    call: dict[str, JsonValue] = {"id": "c1", "name": "calculate", "arguments": {"x": "1"}}
    db.checkpoint_replies(
        [
            Checkpoint("msg_a1", "one", [], 4),
            Checkpoint("msg_a2", "two", [call], 7),
            Checkpoint("msg_a3", "late checkpoint", [], 9),
        ]
    )
    states = {n: db.get_reply_state(f"chat_{n}", f"msg_a{n}") for n in (1, 2, 3)}
    assert all(state is not None for state in states.values())
    one, two, three = (states[n] for n in (1, 2, 3))
    assert one is not None and (one[0].content, one[0].status, one[1]) == ("one", "in_progress", 4)
    assert two is not None and two[0].content == "two" and two[1] == 7
    assert [c.name for c in two[0].tool_calls] == ["calculate"]
    assert three is not None and (three[0].content, three[0].status) == (
        "already done",
        "completed",
    )


def test_search_finds_finished_messages_of_that_chat_only(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    db.create_chat("chat_b", None, None, "m")
    exchange(db, "chat_a", 1, content="My cat is called Zanzibar")
    finish(db, "msg_a1", "What a lovely name for a cat")
    exchange(db, "chat_b", 2, content="Zanzibar is an island")
    hits = db.search_messages("chat_a", "zanzibar", 5)
    assert [h["message_id"] for h in hits] == ["msg_u1"]
    assert "**Zanzibar**" in str(hits[0]["snippet"])
    assert {h["message_id"] for h in db.search_messages("chat_a", "cat", 5)} == {"msg_u1", "msg_a1"}
    # FTS5 syntax in the query is taken as plain words, never as an error.
    hostile = db.search_messages("chat_a", 'cat" OR NEAR(', 5)
    assert {h["message_id"] for h in hostile} == {"msg_u1", "msg_a1"}
    assert db.search_messages("chat_a", "   ", 5) == []


def test_search_skips_replies_in_progress_and_indexes_them_when_done(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    exchange(db, "chat_a", 1, content="first")
    db.checkpoint_replies([Checkpoint("msg_a1", "penguins everywhere", [], 2)])
    assert db.search_messages("chat_a", "penguins", 5) == []
    finish(db, "msg_a1", "penguins everywhere")
    assert [h["message_id"] for h in db.search_messages("chat_a", "penguins", 5)] == ["msg_a1"]
    db.delete_chat("chat_a")
    assert db.connection().execute("SELECT count(*) FROM messages_fts").fetchone()[0] == 0


def test_messages_as_json_are_what_pydantic_writes(tmp_path: Path) -> None:
    db = Database(tmp_path / "chat.db")
    db.migrate()
    db.create_chat("chat_abcdefghijklmnop", None, None, "m")
    call: dict[str, JsonValue] = {"id": "c1", "name": "calc", "arguments": {"x": "2+2"}}
    finishes: list[dict[str, Any] | None] = [
        {
            "status": "completed",
            "content": "with tools",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            "tool_calls": [
                call | {"result": 4, "error": None, "text_offset": 0},
                call | {"id": "c2", "result": None, "error": "no", "text_offset": 3},
            ],
            "error": None,
        },
        {
            "status": "failed",
            "content": 'quotes " and \\ and \n\t\x01 é \u2028 😀',
            "finish_reason": None,
            "usage": None,
            "tool_calls": [],
            "error": {"code": "timeout", "message": "late"},
        },
        None,  # stays in progress: no completed_at
    ]
    for n, finish in enumerate(finishes):
        outcome = db.start_exchange(
            chat_id="chat_abcdefghijklmnop",
            user_message_id=f"msg_u{n}",
            reply_id=f"msg_r{n}",
            content="ünïcode \n question",
            idempotency_key=None,
            max_messages=100,
        )
        assert isinstance(outcome, Started)
        if finish is not None:
            db.finish_reply(f"msg_r{n}", last_event_id=3, **finish)
    pages = [(100, None), (2, None), (3, "msg_u0"), (1, "msg_r2")]
    for limit, after in pages:
        messages, has_more = db.list_messages("chat_abcdefghijklmnop", limit, after)
        expected = MessageList(data=messages, has_more=has_more).model_dump_json()
        assert db.list_messages_json("chat_abcdefghijklmnop", limit, after).decode() == expected
    # The reply in progress was built on the fly; once recovered, its stored JSON is used.
    assert db.recover_interrupted() == 1
    stored = db.connection().execute("SELECT count(*) FROM messages WHERE json IS NULL")
    assert stored.fetchone()[0] == 0
    for limit, after in pages:
        messages, has_more = db.list_messages("chat_abcdefghijklmnop", limit, after)
        expected = MessageList(data=messages, has_more=has_more).model_dump_json()
        assert db.list_messages_json("chat_abcdefghijklmnop", limit, after).decode() == expected
    db.close()


def test_m003_backfills_the_stored_json_of_an_older_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import db as db_module

    old = Database(tmp_path / "old.db")
    monkeypatch.setattr(db_module, "MIGRATIONS", MIGRATIONS[:2])
    old.migrate()
    with old.transaction() as tx:
        tx.execute(
            "INSERT INTO chats (id, model, created_at, updated_at) VALUES ('chat_old', 'm',"
            " '2026-01-01T00:00:00.000000+00:00', '2026-01-01T00:00:00.000000+00:00')"
        )
        tx.execute(
            "INSERT INTO messages (id, chat_id, position, role, content, status, created_at,"
            " completed_at) VALUES ('msg_old', 'chat_old', 0, 'user', 'old walrus', 'completed',"
            " '2026-01-01T00:00:00.000000+00:00', '2026-01-01T00:00:00.000000+00:00')"
        )
    old.close()
    monkeypatch.undo()
    upgraded = Database(tmp_path / "old.db")
    assert upgraded.migrate() == ["m003_stored_message_json"]
    messages, _ = upgraded.list_messages("chat_old", 10, None)
    expected = MessageList(data=messages, has_more=False).model_dump_json()
    assert upgraded.list_messages_json("chat_old", 10, None).decode() == expected
    row = upgraded.connection().execute("SELECT json FROM messages WHERE id = 'msg_old'")
    assert row.fetchone()[0] is not None
    # Search still follows edits of the text, and only of the text.
    assert [h["message_id"] for h in upgraded.search_messages("chat_old", "walrus", 5)] == [
        "msg_old"
    ]
    with upgraded.transaction() as tx:
        tx.execute("UPDATE messages SET content = 'new narwhal' WHERE id = 'msg_old'")
    assert upgraded.search_messages("chat_old", "walrus", 5) == []
    assert len(upgraded.search_messages("chat_old", "narwhal", 5)) == 1
    upgraded.close()


def long_chat(db: Database, turns: int = 1000) -> list[Message]:
    """A chat of `turns` finished exchanges (2,000 messages by default, every third reply with
    a tool round) and a new question whose reply `msg_reply` is in progress; returns every
    message before that reply, read the unbounded way."""
    db.create_chat("chat_long", None, None, "m")
    fill_chat(db, "chat_long", turns)
    outcome = db.start_exchange(
        chat_id="chat_long",
        user_message_id="msg_new",
        reply_id="msg_reply",
        content="the new question",
        idempotency_key=None,
        max_messages=2 * turns + 2,
    )
    assert isinstance(outcome, Started)
    everything, _ = db.list_messages("chat_long", 2 * turns + 2, None)
    assert everything[-1].id == "msg_reply"
    return everything[:-1]


def past(messages: Sequence[Message]) -> list[PastMessage]:
    """Whole messages as a prompt's history reads them."""
    return [PastMessage(m.id, m.role, m.content, m.tool_calls) for m in messages]


def stored_chars(db: Database) -> dict[str, int]:
    """Each message's content and stored tool-call JSON, in characters (what the budget counts)."""
    rows = db.connection().execute("SELECT id, length(content) + length(tool_calls) FROM messages")
    return {row[0]: row[1] for row in rows}


def test_history_of_a_long_chat_is_its_newest_whole_turns_just_past_the_budget(
    db: Database,
) -> None:
    before = long_chat(db)
    chars = stored_chars(db)
    history, left_out = db.history("chat_long", "msg_reply", 20_000)
    # The newest messages, as whole turns, and exactly as the unbounded read builds them.
    assert 2 < len(history) < len(before) // 4
    assert history == past(before[len(before) - len(history) :])
    assert history[0].role == "user" and history[-1].id == "msg_new"
    assert left_out == len(before) - len(history)
    # Past the budget, but not by more than the oldest turn: the read stopped at once.
    sizes = [chars[m.id] for m in history]
    second_turn = next(i for i, m in enumerate(history) if i > 0 and m.role == "user")
    assert sum(sizes[second_turn:]) <= 20_000 < sum(sizes)
    # Tool calls keep the offset llm.replay needs (the API's JSON leaves it out).
    calls = [c for m in history for c in m.tool_calls]
    assert len(calls) > 10 and {c.text_offset for c in calls} == {7}


@pytest.mark.parametrize("max_context_tokens", [300, 1500, 5000, 40_000, 200_000])
def test_the_bounded_history_makes_the_same_prompt_as_the_whole_chat(
    db: Database, max_context_tokens: int
) -> None:
    before = long_chat(db)
    history, left_out = db.history("chat_long", "msg_reply", 4 * max_context_tokens)
    assert (left_out == 0) == (max_context_tokens == 200_000)

    def prompt(messages: Sequence[llm.StoredMessage], left_out: int) -> list[Any]:
        return llm.build_prompt(
            chat_prompt=None,
            default_prompt=None,
            history=messages,
            max_context_tokens=max_context_tokens,
            reserve_tokens=100,
            left_out=left_out,
        )

    assert prompt(history, left_out) == prompt(before, 0)


def test_history_with_a_budget_below_one_turn_is_still_the_newest_turn(db: Database) -> None:
    before = long_chat(db)
    assert db.history("chat_long", "msg_reply", 0) == (past(before[-1:]), 2000)
    # Before a user message, the newest turn is the previous question and its reply.
    last_turn, left_out = db.history("chat_long", "msg_new", 0)
    assert last_turn == past(before[-3:-1]) and left_out == 1998
    assert [c.text_offset for c in last_turn[1].tool_calls] == [7]


def test_a_send_can_read_its_prompt_context_in_its_own_transaction(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    exchange(db, "chat_a", 1)
    finish(db, "msg_a1")
    outcome = exchange(db, "chat_a", 2, content="and now?", context_chars=400_000)
    assert isinstance(outcome, Started) and outcome.context is not None
    # The same as reading it afterwards: the chat as the send left it, the history up to the
    # new question, nothing left out.
    assert outcome.context == db.prompt_context("chat_a", "msg_a2", 400_000)
    assert outcome.context.chat == db.get_chat("chat_a")
    assert [m.id for m in outcome.context.history] == ["msg_u1", "msg_a1", "msg_u2"]
    assert outcome.context.left_out == 0
    # Without context_chars nothing more is read; a chat that is gone has no context.
    assert isinstance(exchange(db, "chat_a", 3), Busy)
    assert db.prompt_context("chat_nope", "msg_a2", 400_000) is None


def test_history_of_a_short_chat_is_all_of_it(db: Database) -> None:
    db.create_chat("chat_a", None, None, "m")
    exchange(db, "chat_a", 1)
    first = db.list_messages("chat_a", 1, None)[0]
    assert db.history("chat_a", "msg_a1", 400_000) == (past(first), 0)
    finish(db, "msg_a1")
    exchange(db, "chat_a", 2)
    finish(db, "msg_a2")
    exchange(db, "chat_a", 3)
    whole, _ = db.list_messages("chat_a", 5, None)
    everything = past(whole)
    assert db.history("chat_a", "msg_a3", 400_000) == (everything, 0)
    # A budget below the whole chat stops at a turn; at the first one, nothing is left out.
    assert db.history("chat_a", "msg_a3", 0) == (everything[-1:], 4)
    assert db.history("chat_a", "msg_a1", 0) == (everything[:1], 0)
    assert db.history("chat_a", "msg_nope", 400_000) == ([], 0)


def open_files(path: Path) -> int:
    """How many of this process's file descriptors are open on `path`."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd) == str(path.resolve()))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_a_thread_that_ends_closes_its_connection(db: Database) -> None:
    # anyio retires a worker thread after 10 s idle and makes new ones as load comes back:
    # each thread that ended used to leave its connection open (a file descriptor and a page
    # cache each, until the server stopped).
    def use() -> None:
        db.get_chat("chat_none")

    for _ in range(30):
        thread = threading.Thread(target=use)
        thread.start()
        thread.join()
    assert open_files(db.path) <= 2  # the fixture's own thread, and a thread being retired
    use()  # this thread's connection still works
    db.close()
    assert open_files(db.path) == 0
