"""End-to-end tests of the service dying or stopping mid-reply: SIGKILL at several points of a
reply, and SIGTERM with replies in progress, each followed by a restart on the same file."""

from __future__ import annotations

import http.client
import json
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import ServiceFactory
from tests.fake_openai import FakeOpenAI, Reply, ToolCall, text
from tests.support import Event, Service, follow, make_chat, parse_events, send, wait_until

pytestmark = pytest.mark.e2e


def slow(pieces: int, delay: float) -> Reply:
    return Reply(chunks=[f"w{i} " for i in range(pieces)], delay=delay)


def messages(client: httpx2.Client, chat_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/chats/{chat_id}/messages")
    assert response.status_code == 200
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def integrity(path: Path) -> str:
    """SQLite's own check of the file, from a connection of our own."""
    with sqlite3.connect(path) as conn:
        result: str = conn.execute("PRAGMA integrity_check").fetchone()[0]
    return result


def in_progress(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        count: int = conn.execute(
            "SELECT count(*) FROM messages WHERE status = 'in_progress'"
        ).fetchone()[0]
    return count


class Reader:
    """Reads a POST's reply stream in a thread, noting when each event arrived, so a test can
    tell what the client had received at a given moment."""

    def __init__(self, service: Service, chat_id: str, content: str) -> None:
        self.events: list[tuple[float, Event]] = []
        self.error: BaseException | None = None
        self.status = 0
        self._thread = threading.Thread(target=self._run, args=(service, chat_id, content))
        self._thread.start()

    def _run(self, service: Service, chat_id: str, content: str) -> None:
        try:
            with (
                service.client(timeout=15) as own,
                own.stream(
                    "POST", f"/chats/{chat_id}/messages", json={"content": content}
                ) as response,
            ):
                self.status = response.status_code
                for event in parse_events(response.iter_lines()):
                    self.events.append((time.monotonic(), event))
        except httpx2.TransportError as error:  # the process died under it
            self.error = error

    def names(self) -> list[str]:
        return [e.name for _, e in list(self.events)]

    def text_at(self, moment: float) -> str:
        """The reply's text the client had received by `moment`."""
        return "".join(
            e.message()["delta"]
            for t, e in list(self.events)
            if e.name == "message.delta" and t <= moment
        )

    def first(self, name: str) -> dict[str, Any]:
        return next(e.message() for _, e in list(self.events) if e.name == name)

    def join(self, timeout: float = 15.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"


def restart_and_check(
    start_service: ServiceFactory, service: Service, chat_id: str, user: dict[str, Any]
) -> tuple[Service, dict[str, Any]]:
    """Restart on the same file: it is intact, the acknowledged user message is there, the
    reply is no longer in progress (returned), and the chat takes a new message."""
    assert integrity(service.db_path) == "ok"
    restarted = start_service(db_path=service.db_path)
    assert in_progress(service.db_path) == 0
    with restarted.client() as own:
        history = messages(own, chat_id)
        assert history[0] == user
        assert [m["role"] for m in history] == ["user", "assistant"]
        reply = history[1]
        assert reply["status"] == "incomplete"
        # After a restart, a finished reply's stream is its message.done alone.
        events = follow(own, chat_id, reply["id"])
        assert [e.name for e in events] == ["message.done"] and events[0].message() == reply
    return restarted, reply


def assert_chat_takes_messages(service: Service, fake: FakeOpenAI, chat_id: str) -> None:
    fake.push(text("Back again"))
    with service.client() as own:
        _, events = send(own, chat_id, "still there?")
        assert events[-1].message()["status"] == "completed"
        assert events[-1].message()["content"] == "Back again"
        assert [m["role"] for m in messages(own, chat_id)] == ["user", "assistant"] * 2


# SIGKILL


def test_kill_before_the_first_token(start_service: ServiceFactory, fake: FakeOpenAI) -> None:
    service = start_service()
    fake.push(Reply(hang=True))
    with service.client() as own:
        chat = make_chat(own)
    reader = Reader(service, chat["id"], "go")
    assert wait_until(lambda: "message.created" in reader.names()[1:], timeout=10)
    assert fake.wait_for_requests(1)
    service.kill()
    reader.join()
    user = reader.first("message.created")
    restarted, reply = restart_and_check(start_service, service, chat["id"], user)
    assert reply["content"] == "" and reply["error"]["code"] == "server_restarted"
    assert_chat_takes_messages(restarted, fake, chat["id"])


def test_kill_mid_text_keeps_the_last_checkpoint(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    service = start_service()
    fake.push(slow(300, 0.01))
    with service.client() as own:
        chat = make_chat(own)
    reader = Reader(service, chat["id"], "go")
    # Let it stream for a while (several checkpoints), then die without warning.
    assert wait_until(lambda: len(reader.text_at(time.monotonic())) > 200, timeout=10)
    killed_at = time.monotonic()
    service.kill()
    reader.join()
    received = reader.text_at(killed_at + 60)
    user = reader.first("message.created")
    restarted, reply = restart_and_check(start_service, service, chat["id"], user)
    assert reply["error"]["code"] == "server_restarted"
    # The checkpoint is what the client saw, at most 0.5 s behind it (plus a little for
    # the write and the scheduler on a busy machine).
    assert received.startswith(reply["content"])
    assert reply["content"].startswith(reader.text_at(killed_at - 0.75))
    assert len(reply["content"]) > 0
    assert_chat_takes_messages(restarted, fake, chat["id"])


def test_kill_during_a_tool_call(start_service: ServiceFactory, fake: FakeOpenAI) -> None:
    service = start_service()
    fake.push(
        Reply(
            chunks=["Computing. "],
            tool_calls=[ToolCall("calculate", '{"expression": "6*7"}', id="call_1")],
        ),
        Reply(hang=True),  # the model's next round never answers
    )
    with service.client() as own:
        chat = make_chat(own)
    reader = Reader(service, chat["id"], "go")
    assert wait_until(lambda: "tool.result" in reader.names(), timeout=10)
    assert fake.wait_for_requests(2)
    time.sleep(0.6)  # one checkpoint interval, so the tool's result is on disk
    service.kill()
    reader.join()
    user = reader.first("message.created")
    restarted, reply = restart_and_check(start_service, service, chat["id"], user)
    assert reply["content"] == "Computing. "
    assert [(c["id"], c["result"]) for c in reply["tool_calls"]] == [("call_1", 42)]
    # The next message's prompt replays the interrupted tool round correctly.
    assert_chat_takes_messages(restarted, fake, chat["id"])
    replayed = fake.requests[-1]["messages"]
    assert any(m.get("tool_call_id") == "call_1" for m in replayed)


# SIGTERM


def terminate(service: Service, timeout: float = 12.0) -> tuple[int, float]:
    """SIGTERM; wait for the exit. Returns the exit code and how long it took."""
    assert service.process is not None
    started = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    try:
        code = service.process.wait(timeout)
    except subprocess.TimeoutExpired:
        service.kill()
        raise
    service.process = None
    return code, time.monotonic() - started


def test_sigterm_ends_open_streams_and_refuses_new_sends(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    service = start_service()
    fake.push(slow(2000, 0.01))
    with service.client() as own:
        chat, idle = make_chat(own), make_chat(own)
    reader = Reader(service, chat["id"], "go")
    assert wait_until(lambda: "message.delta" in reader.names(), timeout=10)
    # A send whose body is still on its way when the signal comes (uvicorn refuses new
    # connections by itself; this one got in before).
    late = json.dumps({"content": "too late"}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    conn.putrequest("POST", f"/chats/{idle['id']}/messages")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Accept", "application/json")
    conn.putheader("Content-Length", str(len(late)))
    conn.endheaders(late[:5])
    assert service.process is not None
    started = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: "Shutting down" in service.log(), timeout=5)
    conn.send(late[5:])
    response = conn.getresponse()
    assert response.status == 503 and response.getheader("Retry-After"), response.read()
    conn.close()
    try:
        code = service.process.wait(12)
    finally:
        service.kill()
    took = time.monotonic() - started
    reader.join()
    assert reader.error is None and reader.status == 200
    names = reader.names()
    assert names.count("message.done") == 1 and names[-1] == "message.done"
    done = reader.first("message.done")
    assert done["status"] == "incomplete" and done["error"]["code"] == "server_shutdown"
    assert done["content"] == reader.text_at(time.monotonic())
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly, so the process
    # ends "killed by SIGTERM", as process managers expect; a crash would be another code.
    assert code == -signal.SIGTERM, service.log()
    assert took < 8, service.log()  # within --timeout-graceful-shutdown
    assert "timeout graceful shutdown exceeded" not in service.log()
    user = reader.first("message.created")
    restarted, reply = restart_and_check(start_service, service, chat["id"], user)
    assert reply == done
    with restarted.client() as own:
        assert messages(own, idle["id"]) == []  # the refused send stored nothing
    assert_chat_takes_messages(restarted, fake, chat["id"])


def test_sigterm_with_a_reply_nobody_follows(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    service = start_service()
    fake.push(slow(2000, 0.01))
    with service.client() as own:
        chat = make_chat(own)
        accepted = own.post(
            f"/chats/{chat['id']}/messages",
            json={"content": "go"},
            headers={"Accept": "application/json"},
        )
        assert accepted.status_code == 202
        body = accepted.json()
        assert fake.wait_for_requests(1)
    code, took = terminate(service)
    assert code == -signal.SIGTERM and took < 8, service.log()
    assert "timeout graceful shutdown exceeded" not in service.log()
    restarted, reply = restart_and_check(start_service, service, chat["id"], body["user_message"])
    assert reply["id"] == body["assistant_message"]["id"]
    assert reply["error"]["code"] == "server_shutdown"
    assert reply["content"].startswith("w0 w1 ")
    assert_chat_takes_messages(restarted, fake, chat["id"])
