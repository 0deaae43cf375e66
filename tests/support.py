"""Test harness: the service as a real uvicorn process, an SSE reader, and small factories."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx2

from db import Database, Started

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """The chat service in its own process (`uvicorn main:app`), on a SQLite file of its own."""

    def __init__(self, db_path: Path, env: Mapping[str, str], log_path: Path | None = None):
        self.db_path = db_path
        self.env = dict(env)
        self.log_path = log_path or db_path.with_suffix(".log")
        self.port = 0
        self.base_url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Service:
        """Start it and wait until `GET /healthz` answers."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "DATABASE_"))}
        env |= {"DATABASE_URL": f"sqlite:///{self.db_path}", "LOG_LEVEL": "INFO"} | self.env
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1"]
            + ["--port", str(self.port), "--no-access-log", "--timeout-graceful-shutdown", "8"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited at start-up:\n{self.log()}")
            try:
                if httpx2.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the service did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, timeout: float = 10.0) -> httpx2.Client:
        """An HTTP client for this service."""
        return httpx2.Client(base_url=self.base_url, timeout=timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, and wait for it to exit; returns its exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL: the process dies mid-whatever, as in a crash."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> Service:
        return self.start() if self.process is None else self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill() if kind is not None else self.stop()


@dataclass(frozen=True)
class Event:
    """One SSE event as a client sees it."""

    name: str
    data: Any
    id: int | None

    def message(self) -> dict[str, Any]:
        """The event's data, as a dict."""
        assert isinstance(self.data, dict)
        return self.data


def parse_events(lines: Iterable[str]) -> Iterator[Event]:
    """Read `text/event-stream` lines into events (comments and pings are skipped)."""
    name: str = "message"
    data: list[str] = []
    event_id: int | None = None
    for line in lines:
        if line == "":
            if data:
                yield Event(name, json.loads("\n".join(data)), event_id)
            name, data, event_id = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                event_id = int(value)


def read_stream(response: httpx2.Response) -> list[Event]:
    """All events of a streamed response, until the server closes it."""
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    return list(parse_events(response.iter_lines()))


def send(
    client: httpx2.Client, chat_id: str, content: str, **headers: str
) -> tuple[httpx2.Response, list[Event]]:
    """POST a message and read the whole reply stream."""
    with client.stream(
        "POST", f"/chats/{chat_id}/messages", json={"content": content}, headers=headers
    ) as response:
        if response.status_code != 200:
            response.read()
            return response, []
        return response, read_stream(response)


def follow(client: httpx2.Client, chat_id: str, message_id: str, **headers: str) -> list[Event]:
    """GET a reply's stream and read it to the end."""
    url = f"/chats/{chat_id}/messages/{message_id}/stream"
    with client.stream("GET", url, headers=headers) as response:
        return read_stream(response)


def make_chat(client: httpx2.Client, **fields: Any) -> dict[str, Any]:
    """Create a chat. It gets a title unless `title=None` is passed, so that the service makes
    no extra title call to the model (which would take a reply queued on the fake)."""
    fields.setdefault("title", "test chat")
    response = client.post("/chats", json=fields)
    assert response.status_code == 201, response.text
    chat: dict[str, Any] = response.json()
    return chat


def wait_until(condition: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll `condition()` until it is true; False on time-out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def question(turn: int) -> str:
    """The user message of turn `turn` of a chat made by `fill_chat` (lengths vary by turn)."""
    return f"question {turn} " + "x" * (turn % 7 * 30)


def fill_chat(db: Database, chat_id: str, turns: int) -> None:
    """Write `turns` finished exchanges straight through db.py, as bench/measure.py does (far
    quicker than as many sends). Every third reply called a tool after its first 7 characters."""
    for turn in range(turns):
        outcome = db.start_exchange(
            chat_id=chat_id,
            user_message_id=f"msg_u{turn}",
            reply_id=f"msg_a{turn}",
            content=question(turn),
            idempotency_key=None,
            max_messages=2 * turns + 10,
        )
        assert isinstance(outcome, Started)
        call: dict[str, Any] = {
            "id": f"call_{turn}",
            "name": "calculate",
            "arguments": {"expression": f"{turn} * 2"},
            "result": turn * 2,
            "error": None,
            "text_offset": 7,
        }
        db.finish_reply(
            f"msg_a{turn}",
            status="completed",
            content=f"answer {turn} " + "y" * 100,
            finish_reason="stop",
            usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            tool_calls=[call] if turn % 3 == 0 else [],
            error=None,
            last_event_id=3,
        )
