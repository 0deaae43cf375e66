"""The only module with SQL: a thin synchronous sqlite3 layer, its migrations and one function
per query. Async code calls it through `anyio.to_thread.run_sync`."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from pydantic import JsonValue, TypeAdapter

from schemas import Chat, Message, Role, ToolCallRecord

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register a schema change; they run once each, in the order they are defined, each in
    its own transaction (so statement by statement: `executescript` would commit midway)."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    """Chats, one row per message (ordered by position within a chat), idempotency keys."""
    for statement in (
        """
        CREATE TABLE chats (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        title TEXT,
        system_prompt TEXT,
        model TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        chat_id TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL CHECK (status IN
        ('in_progress', 'completed', 'incomplete', 'failed', 'cancelled')),
        created_at TEXT NOT NULL,
        completed_at TEXT,
        model TEXT,
        finish_reason TEXT,
        usage TEXT,
        tool_calls TEXT NOT NULL DEFAULT '[]',
        error TEXT,
        last_event_id INTEGER,
        UNIQUE (chat_id, position)
        )
        """,
        """
        -- At most one reply in progress per chat, enforced by the database itself.
        CREATE UNIQUE INDEX messages_one_in_progress ON messages (chat_id)
        WHERE status = 'in_progress'
        """,
        """
        CREATE TABLE idempotency_keys (
        chat_id TEXT NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        content_sha256 TEXT NOT NULL,
        user_message_id TEXT NOT NULL,
        assistant_message_id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (chat_id, key)
        )
        """,
    ):
        db.execute(statement)


@migration
def m002_message_search(db: sqlite3.Connection) -> None:
    """Full-text search over finished messages (a reply is indexed once it stops changing)."""
    for statement in (
        """
        CREATE VIRTUAL TABLE messages_fts USING fts5(
        content, content='messages', content_rowid='seq',
        tokenize='unicode61 remove_diacritics 2'
        )
        """,
        """
        CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages
        WHEN new.status != 'in_progress' BEGIN
        INSERT INTO messages_fts (rowid, content) VALUES (new.seq, new.content);
        END
        """,
        """
        CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
        WHEN old.status != 'in_progress' BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content)
        VALUES ('delete', old.seq, old.content);
        END
        """,
        """
        CREATE TRIGGER messages_fts_update_old AFTER UPDATE ON messages
        WHEN old.status != 'in_progress' BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content)
        VALUES ('delete', old.seq, old.content);
        END
        """,
        """
        CREATE TRIGGER messages_fts_update_new AFTER UPDATE ON messages
        WHEN new.status != 'in_progress' BEGIN
        INSERT INTO messages_fts (rowid, content) VALUES (new.seq, new.content);
        END
        """,
    ):
        db.execute(statement)


class NotFoundError(LookupError):
    """A row named by the caller (a chat, or a pagination cursor) does not exist."""


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__, at
# three times the cost (0.56 against 0.18 µs), for every message of every prompt.
@dataclass(slots=True)
class PastMessage:
    """A stored message as a prompt replays it: no timestamps, status or usage, and no
    pydantic validation of the whole message (a prompt reads up to its budget of them for
    every send: validating each from JSON was ~7 % of the GIL's time under 50 senders)."""

    id: str
    role: Role
    content: str
    tool_calls: list[ToolCallRecord]  # as stored, with the `text_offset` llm.replay needs


@dataclass(frozen=True)
class PromptContext:
    """What a reply's prompt is built from: its chat, the newest turns a prompt could keep,
    and how many older messages were not read (see `Database.history`)."""

    chat: Chat
    history: list[PastMessage]
    left_out: int


@dataclass(frozen=True)
class Started:
    """The user message and the reply were stored; the reply must now be generated. With
    `context_chars`, the reply's prompt context was read in the same transaction."""

    chat: Chat
    user_message: Message
    reply: Message
    context: PromptContext | None = None


@dataclass(frozen=True)
class Replayed:
    """The same Idempotency-Key was sent before: nothing new was stored."""

    user_message: Message
    reply: Message


@dataclass(frozen=True)
class Busy:
    """The chat already has a reply in progress."""

    reply_id: str


@dataclass(frozen=True)
class KeyReused:
    """The Idempotency-Key was used before with different content."""


@dataclass(frozen=True)
class ChatFull:
    """The chat holds as many messages as the server allows."""

    limit: int


SendOutcome = Started | Replayed | Busy | KeyReused | ChatFull


@dataclass(frozen=True)
class Checkpoint:
    """A reply's state so far, as a checkpoint saves it."""

    message_id: str
    content: str
    tool_calls: list[dict[str, JsonValue]]
    event_id: int


def now() -> str:
    """The current time as stored: ISO 8601, UTC, microseconds (so text order is time order)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def content_digest(content: str) -> str:
    """How an idempotency key remembers the content it was sent with."""
    return hashlib.sha256(content.encode()).hexdigest()


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


CHAT_COLUMNS = "id, title, system_prompt, model, created_at, updated_at"
MESSAGE_COLUMNS = (
    "id, chat_id, role, content, status, created_at, completed_at, model, finish_reason,"
    " usage, tool_calls, error"
)


def _iso_sql(column: str) -> str:
    """SQL rendering a stored timestamp (`now()`'s form, +00:00) as pydantic writes it."""
    return (
        f"CASE WHEN {column} IS NULL THEN NULL"
        f" WHEN substr({column}, 20, 7) = '.000000' THEN substr({column}, 1, 19) || 'Z'"
        f" ELSE replace({column}, '+00:00', 'Z') END"
    )


# A message as JSON, field for field as pydantic's Message.model_dump_json writes it.
MESSAGE_JSON = (
    "json_object('id', id, 'chat_id', chat_id, 'role', role, 'content', content,"
    f" 'status', status, 'created_at', {_iso_sql('created_at')},"
    f" 'completed_at', {_iso_sql('completed_at')}, 'model', model,"
    " 'finish_reason', finish_reason, 'usage', json(usage),"
    " 'tool_calls', CASE WHEN tool_calls = '[]' THEN json('[]') ELSE"
    " (SELECT json_group_array(json_remove(value, '$.text_offset')) FROM json_each(tool_calls))"
    " END, 'error', json(error))"
)


@migration
def m003_stored_message_json(db: sqlite3.Connection) -> None:
    """Each finished message keeps its API JSON, written once when it stops changing: building
    10,000 of them for every read of a long history was ~40 ms of SQLite's time (bench)."""
    for statement in (
        # The search index must follow content and status only, not this column; and one
        # trigger, so the old text leaves the index before the new text enters it (two
        # triggers fire in an order SQLite does not promise: the newest first, here).
        "DROP TRIGGER messages_fts_update_old",
        "DROP TRIGGER messages_fts_update_new",
        "ALTER TABLE messages ADD COLUMN json TEXT",
        f"UPDATE messages SET json = {MESSAGE_JSON} WHERE status != 'in_progress'",
        """
        CREATE TRIGGER messages_fts_update AFTER UPDATE OF content, status ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, content)
        SELECT 'delete', old.seq, old.content WHERE old.status != 'in_progress';
        INSERT INTO messages_fts (rowid, content)
        SELECT new.seq, new.content WHERE new.status != 'in_progress';
        END
        """,
    ):
        db.execute(statement)


STORE_JSON = f"UPDATE messages SET json = {MESSAGE_JSON} WHERE id = ?"

# A message's stored tool calls, read back for a prompt (with the `text_offset` the API hides).
TOOL_CALLS = TypeAdapter(list[ToolCallRecord])


def _chat(row: sqlite3.Row | dict[str, Any]) -> Chat:
    return Chat.model_validate(dict(row))


def _message(row: sqlite3.Row | dict[str, Any]) -> Message:
    fields = dict(row)
    for key in ("usage", "error"):
        if fields[key] is not None:
            fields[key] = json.loads(fields[key])
    fields["tool_calls"] = json.loads(fields["tool_calls"])
    return Message.model_validate(fields)


class _Held:
    """A thread's connection, closed when the thread ends and its locals go: anyio retires
    worker threads after 10 s idle and makes new ones when load comes back, and each thread
    that ended used to leave its connection open (a file descriptor and a page cache each)."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        self.conn.close()


class Database:
    """A SQLite file: one connection per thread, writes serialized with BEGIN IMMEDIATE."""

    def __init__(self, path: Path, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._all: weakref.WeakSet[_Held] = weakref.WeakSet()  # for close()
        self._all_lock = threading.Lock()
        # Writers of this process queue here rather than in SQLite's busy handler, which
        # sleeps 1, 2, 5 ... 100 ms between retries: under 50 concurrent sends, those sleeps
        # (not the writes) were most of a send's latency. Other processes still meet
        # busy_timeout.
        self._write_lock = threading.Lock()
        # One writer at a time anyway: async code runs the methods that write through this
        # limiter (`run_sync(..., limiter=db.writer)`), so waiting writes wait in the event
        # loop, not as ~40 worker threads blocked on the lock, each woken with a GIL hand-off
        # (50 senders: +10-18 % sends/s, bench/README.md, round 6).
        self.writer = anyio.CapacityLimiter(1)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (anyio reuses worker threads, so each keeps its own)."""
        held: _Held | None = getattr(self._local, "held", None)
        if held is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit; transactions are explicit BEGIN IMMEDIATE.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode survives a process crash; only a power cut can lose the tail.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            held = self._local.held = _Held(conn)
            with self._all_lock:
                self._all.add(held)
        return held.conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; BEGIN IMMEDIATE takes the write lock up front, so a transaction
        that reads first cannot fail later with 'database is locked'."""
        conn = self.connection()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                # SQLite rolls back by itself on some errors (a full disk, an I/O error); a
                # second ROLLBACK would raise and hide the real error.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close every thread's connection."""
        with self._all_lock:
            for held in list(self._all):
                held.conn.close()
            self._all.clear()
        self._local = threading.local()

    def migrate(self) -> list[str]:
        """Apply the migrations not yet recorded; returns the names applied."""
        conn = self.connection()
        conn.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT)"
        )
        applied: list[str] = []
        for fn in MIGRATIONS:
            with self.transaction() as tx:
                done = tx.execute("SELECT 1 FROM _migrations WHERE name = ?", (fn.__name__,))
                if done.fetchone():
                    continue
                fn(tx)
                tx.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                    (fn.__name__, now()),
                )
                applied.append(fn.__name__)
        return applied

    def ping(self) -> bool:
        """The database answers a query."""
        row = self.connection().execute("SELECT 1").fetchone()
        return row is not None and row[0] == 1

    def write_problem(self, min_free_bytes: int = 1024 * 1024) -> str | None:
        """Why a write would fail now (the file or its directory cannot be written, or the
        disk is all but full), or None. Cheap: a few system calls, no write of its own."""
        wal = self.path.with_name(self.path.name + "-wal")
        for path in (self.path, wal, self.path.parent):
            # Checked as the kernel sees it: chmod, read-only mounts, and `chattr +i`,
            # which stops even root.
            if path.exists() and not os.access(path, os.W_OK):
                return f"{path.name} is not writable"
        stats = os.statvfs(self.path.parent)
        if stats.f_bavail * stats.f_frsize < min_free_bytes:
            return "the disk is full"
        return None

    # Chats

    def create_chat(
        self, chat_id: str, title: str | None, system_prompt: str | None, model: str
    ) -> Chat:
        """Store a new chat."""
        stamp = now()
        with self.transaction() as tx:
            tx.execute(
                "INSERT INTO chats (id, title, system_prompt, model, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (chat_id, title, system_prompt, model, stamp, stamp),
            )
            row = tx.execute(f"SELECT {CHAT_COLUMNS} FROM chats WHERE id = ?", (chat_id,))
            return _chat(row.fetchone())

    def get_chat(self, chat_id: str) -> Chat | None:
        """One chat, or None."""
        row = (
            self.connection()
            .execute(f"SELECT {CHAT_COLUMNS} FROM chats WHERE id = ?", (chat_id,))
            .fetchone()
        )
        return None if row is None else _chat(row)

    def list_chats(self, limit: int, after: str | None) -> tuple[list[Chat], bool]:
        """A page of chats, newest created first, starting after the chat `after`."""
        conn = self.connection()
        start = None
        if after is not None:
            found = conn.execute("SELECT seq FROM chats WHERE id = ?", (after,)).fetchone()
            if found is None:
                raise NotFoundError(f"No chat {after!r} to page after.")
            start = found[0]
        rows = conn.execute(
            f"SELECT {CHAT_COLUMNS} FROM chats WHERE (:start IS NULL OR seq < :start)"
            " ORDER BY seq DESC LIMIT :n",
            {"start": start, "n": limit + 1},
        ).fetchall()
        return [_chat(r) for r in rows[:limit]], len(rows) > limit

    def update_chat(self, chat_id: str, changes: dict[str, str | None]) -> Chat | None:
        """Change some of a chat's `title` and `system_prompt`; None if there is no such chat."""
        allowed = {"title", "system_prompt"}
        if not set(changes) <= allowed:
            raise ValueError(f"Only {sorted(allowed)} can change.")
        with self.transaction() as tx:
            for column, value in changes.items():
                # Column names come from the fixed set above, never from the request.
                tx.execute(f"UPDATE chats SET {column} = ? WHERE id = ?", (value, chat_id))
            tx.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (now(), chat_id))
            row = tx.execute(f"SELECT {CHAT_COLUMNS} FROM chats WHERE id = ?", (chat_id,))
            found = row.fetchone()
            return None if found is None else _chat(found)

    def delete_chat(self, chat_id: str) -> bool:
        """Delete a chat and, by cascade, its messages; False if there was none."""
        with self.transaction() as tx:
            return tx.execute("DELETE FROM chats WHERE id = ?", (chat_id,)).rowcount > 0

    # Messages

    def start_exchange(
        self,
        *,
        chat_id: str,
        user_message_id: str,
        reply_id: str,
        content: str,
        idempotency_key: str | None,
        max_messages: int,
        context_chars: int | None = None,
    ) -> SendOutcome | None:
        """Atomically store a user message and its `in_progress` reply (for the chat's model),
        unless the chat is gone (None), busy, full, or the idempotency key was seen before;
        with `context_chars`, also read the reply's prompt context. One thread hop per send:
        the chat is read here too, not by the route before."""
        digest = content_digest(content)
        with self.transaction() as tx:
            row = tx.execute(
                f"SELECT {CHAT_COLUMNS} FROM chats WHERE id = ?", (chat_id,)
            ).fetchone()
            if row is None:
                return None
            if idempotency_key is not None:
                earlier = self._earlier_send(tx, chat_id, idempotency_key, digest)
                if earlier is not None:
                    return earlier
            busy = tx.execute(
                "SELECT id FROM messages WHERE chat_id = ? AND status = 'in_progress'",
                (chat_id,),
            ).fetchone()
            if busy is not None:
                return Busy(busy["id"])
            count, last = tx.execute(
                "SELECT count(*), max(position) FROM messages WHERE chat_id = ?", (chat_id,)
            ).fetchone()
            if count + 2 > max_messages:
                return ChatFull(max_messages)
            position = -1 if last is None else last
            stamp = now()
            tx.execute(
                "INSERT INTO messages (id, chat_id, position, role, content, status, created_at,"
                " completed_at) VALUES (?, ?, ?, 'user', ?, 'completed', ?, ?)",
                (user_message_id, chat_id, position + 1, content, stamp, stamp),
            )
            tx.execute(
                "INSERT INTO messages (id, chat_id, position, role, status, created_at, model)"
                " VALUES (?, ?, ?, 'assistant', 'in_progress', ?, ?)",
                (reply_id, chat_id, position + 2, stamp, row["model"]),
            )
            if idempotency_key is not None:
                tx.execute(
                    "INSERT OR REPLACE INTO idempotency_keys (chat_id, key, content_sha256,"
                    " user_message_id, assistant_message_id, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (chat_id, idempotency_key, digest, user_message_id, reply_id, stamp),
                )
            tx.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (stamp, chat_id))
            tx.execute(STORE_JSON, (user_message_id,))  # a user message is final at once
            user = self._message_by_id(tx, user_message_id)
            reply = self._message_by_id(tx, reply_id)
            assert user is not None and reply is not None
            chat = _chat(dict(row) | {"updated_at": stamp})
            context = None
            if context_chars is not None:
                context = PromptContext(chat, *self.history(chat_id, reply_id, context_chars))
            return Started(chat, user, reply, context)

    def earlier_send(
        self, chat_id: str, idempotency_key: str, content: str
    ) -> Replayed | KeyReused | None:
        """What a send with this Idempotency-Key stored before, if it did (a read only)."""
        digest = content_digest(content)
        return self._earlier_send(self.connection(), chat_id, idempotency_key, digest)

    def _earlier_send(
        self, conn: sqlite3.Connection, chat_id: str, key: str, digest: str
    ) -> Replayed | KeyReused | None:
        seen = conn.execute(
            "SELECT content_sha256, user_message_id, assistant_message_id"
            " FROM idempotency_keys WHERE chat_id = ? AND key = ?",
            (chat_id, key),
        ).fetchone()
        if seen is None:
            return None
        if seen["content_sha256"] != digest:
            return KeyReused()
        user = self._message_by_id(conn, seen["user_message_id"])
        reply = self._message_by_id(conn, seen["assistant_message_id"])
        return Replayed(user, reply) if user is not None and reply is not None else None

    @staticmethod
    def _message_by_id(conn: sqlite3.Connection, message_id: str) -> Message | None:
        row = conn.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        return None if row is None else _message(row)

    def get_message(self, chat_id: str, message_id: str) -> Message | None:
        """One message of that chat, or None (a message of another chat is None too)."""
        row = (
            self.connection()
            .execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ? AND chat_id = ?",
                (message_id, chat_id),
            )
            .fetchone()
        )
        return None if row is None else _message(row)

    def get_reply_state(self, chat_id: str, message_id: str) -> tuple[Message, int | None] | None:
        """A message and the id of its stream's last event (None while in progress)."""
        conn = self.connection()
        row = conn.execute(
            f"SELECT {MESSAGE_COLUMNS}, last_event_id FROM messages WHERE id = ? AND chat_id = ?",
            (message_id, chat_id),
        ).fetchone()
        if row is None:
            return None
        last_event_id: int | None = row["last_event_id"]
        fields = {k: row[k] for k in row.keys() if k != "last_event_id"}
        return _message(fields), last_event_id

    @staticmethod
    def _position_after(conn: sqlite3.Connection, chat_id: str, after: str | None) -> int:
        """Where a page of the chat's history starts: after the message `after`, or at 0."""
        if after is None:
            return -1
        found = conn.execute(
            "SELECT position FROM messages WHERE id = ? AND chat_id = ?", (after, chat_id)
        ).fetchone()
        if found is None:
            raise NotFoundError(f"No message {after!r} in this chat to page after.")
        position: int = found[0]
        return position

    def list_messages(
        self, chat_id: str, limit: int, after: str | None
    ) -> tuple[list[Message], bool]:
        """A page of the chat's history, oldest first, starting after the message `after`."""
        conn = self.connection()
        start = self._position_after(conn, chat_id, after)
        rows = conn.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE chat_id = ? AND position > ?"
            " ORDER BY position LIMIT ?",
            (chat_id, start, limit + 1),
        ).fetchall()
        return [_message(r) for r in rows[:limit]], len(rows) > limit

    def list_messages_json(self, chat_id: str, limit: int, after: str | None) -> bytes:
        """`list_messages` as the JSON body of a MessageList, built by SQLite in one query:
        10,000 pydantic models (and FastAPI validating them again) took ~0.5 s. The bytes are
        those pydantic writes (timestamps in its `Z` form, `text_offset` left out)."""
        conn = self.connection()
        start = self._position_after(conn, chat_id, after)
        # One JSON object per row, joined here: an aggregate over an ordered subquery keeps
        # that order only by accident before SQLite 3.44 (no ORDER BY inside aggregates).
        # As BLOBs, the UTF-8 SQLite wrote is joined as is, never decoded to str and encoded
        # back (~10 % of this function's CPU for 10,000 messages, 6.2 MB).
        # A finished message's JSON is stored (m003); only a reply in progress is built here.
        rows = conn.execute(
            f"SELECT CAST(coalesce(json, {MESSAGE_JSON}) AS BLOB) FROM messages"
            " WHERE chat_id = ? AND position > ? ORDER BY position LIMIT ?",
            (chat_id, start, limit),
        ).fetchall()
        data = b",".join(row[0] for row in rows)
        has_more = (
            conn.execute(
                "SELECT 1 FROM messages WHERE chat_id = ? AND position > ?"
                " ORDER BY position LIMIT 1 OFFSET ?",
                (chat_id, start, limit),
            ).fetchone()
            is not None
        )
        return b'{"data":[' + data + b'],"has_more":' + (b"true}" if has_more else b"false}")

    def prompt_context(self, chat_id: str, reply_id: str, max_chars: int) -> PromptContext | None:
        """A reply's chat and its history (see `history`), or None if the chat is gone."""
        chat = self.get_chat(chat_id)
        if chat is None:
            return None
        history, left_out = self.history(chat_id, reply_id, max_chars)
        return PromptContext(chat, history, left_out)

    def history(
        self, chat_id: str, before_message_id: str, max_chars: int
    ) -> tuple[list[PastMessage], int]:
        """The newest whole turns before a message, to just past `max_chars`; and how many older."""
        conn = self.connection()
        # The prompt's history, oldest first. Read newest first along the (chat_id, position)
        # index, and only as far as a prompt can reach: build_prompt's estimate is chars/4 + 4
        # per message of its JSON, so past 4 x max_context_tokens characters (content and stored
        # tool calls, fewer than a turn's JSON in the prompt) no older turn could be kept.
        rows = conn.cursor()
        rows.row_factory = None  # plain tuples: a sqlite3.Row for each message costs ~10 %
        rows.execute(
            "SELECT position, id, role, content, tool_calls FROM messages WHERE chat_id = ?"
            " AND position < (SELECT position FROM messages WHERE id = ?) ORDER BY position DESC",
            (chat_id, before_message_id),
        )
        messages: list[PastMessage] = []
        size = 0
        oldest: int | None = None  # the position the read stopped at, if it stopped early
        try:
            for position, message_id, role, content, tool_calls in rows:
                calls = [] if tool_calls == "[]" else TOOL_CALLS.validate_json(tool_calls)
                messages.append(PastMessage(message_id, role, content, calls))
                size += len(content) + len(tool_calls)
                # Only at a user message: build_prompt keeps or leaves out whole turns.
                if role == "user" and size > max_chars:
                    oldest = position
                    break
        finally:
            rows.close()  # ends the read, which an unfinished statement would keep open
        messages.reverse()
        if oldest is None:
            return messages, 0
        left_out: int = conn.execute(
            "SELECT count(*) FROM messages WHERE chat_id = ? AND position < ?", (chat_id, oldest)
        ).fetchone()[0]
        return messages, left_out

    def checkpoint_replies(self, saves: Sequence[Checkpoint]) -> None:
        """Save the text so far of replies in progress (they stay `in_progress`), all in one
        transaction: a reply already finished is left as it is."""
        with self.transaction() as tx:
            tx.executemany(
                "UPDATE messages SET content = ?, tool_calls = ?, last_event_id = ?"
                " WHERE id = ? AND status = 'in_progress'",
                [
                    (
                        save.content,
                        json.dumps(save.tool_calls, ensure_ascii=False),
                        save.event_id,
                        save.message_id,
                    )
                    for save in saves
                ],
            )

    def finish_reply(
        self,
        message_id: str,
        *,
        status: str,
        content: str,
        finish_reason: str | None,
        usage: dict[str, int] | None,
        tool_calls: list[dict[str, JsonValue]],
        error: dict[str, str] | None,
        last_event_id: int,
        completed_at: str | None = None,
    ) -> Message | None:
        """Store a reply's final state (ended now, unless `completed_at` says when); None if
        it is gone (its chat was deleted)."""
        with self.transaction() as tx:
            tx.execute(
                "UPDATE messages SET status = ?, content = ?, finish_reason = ?, usage = ?,"
                " tool_calls = ?, error = ?, completed_at = ?, last_event_id = ? WHERE id = ?",
                (
                    status,
                    content,
                    finish_reason,
                    _dump(usage),
                    json.dumps(tool_calls, ensure_ascii=False),
                    _dump(error),
                    completed_at or now(),
                    last_event_id,
                    message_id,
                ),
            )
            tx.execute(STORE_JSON, (message_id,))
            return self._message_by_id(tx, message_id)

    def recover_interrupted(self) -> int:
        """At start-up: replies left `in_progress` by a process that died become `incomplete`,
        keeping their checkpointed text. Returns how many there were."""
        error = {"code": "server_restarted", "message": "The server stopped while writing this."}
        with self.transaction() as tx:
            count = tx.execute(
                "UPDATE messages SET status = 'incomplete', error = ?, completed_at = ?,"
                " last_event_id = coalesce(last_event_id, 1) + 1 WHERE status = 'in_progress'",
                (json.dumps(error), now()),
            ).rowcount
            tx.execute(f"UPDATE messages SET json = {MESSAGE_JSON} WHERE json IS NULL")
            return count

    def search_messages(
        self, chat_id: str, query: str, limit: int, exclude: Sequence[str] = ()
    ) -> list[dict[str, JsonValue]]:
        """Full-text search over one chat's finished messages, best match first, leaving out
        the messages in `exclude` (the exchange being written: the model has it already)."""
        # Each word becomes a quoted FTS5 string, so the user's text is never FTS5 syntax.
        terms = " OR ".join('"' + word.replace('"', '""') + '"' for word in query.split())
        if not terms:
            return []
        rows = (
            self.connection()
            .execute(
                "SELECT m.id, m.role, m.created_at,"
                " snippet(messages_fts, 0, '**', '**', '…', 24) AS snippet"
                " FROM messages_fts JOIN messages m ON m.seq = messages_fts.rowid"
                " WHERE messages_fts MATCH ? AND m.chat_id = ?"
                " AND m.id NOT IN (SELECT value FROM json_each(?))"
                " ORDER BY bm25(messages_fts) LIMIT ?",
                (terms, chat_id, json.dumps(list(exclude)), limit),
            )
            .fetchall()
        )
        return [
            {
                "message_id": r["id"],
                "role": r["role"],
                "created_at": r["created_at"],
                "snippet": r["snippet"],
            }
            for r in rows
        ]
