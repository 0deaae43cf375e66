"""End-to-end tests of storage failing under the service: the database file made unwritable
(`chattr +i`, which stops even root) and the disk full (a small tmpfs, filled up). Each gives
clear 503s, a reply that ends `failed` with `storage_error`, no crash, and recovery."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.conftest import ServiceFactory
from tests.fake_openai import FakeOpenAI, Reply, text
from tests.support import follow, make_chat, send, wait_until

pytestmark = pytest.mark.e2e


def run(*command: str) -> bool:
    """Run a system command; True if it worked."""
    if shutil.which(command[0]) is None:
        return False
    return subprocess.run(command, capture_output=True, check=False).returncode == 0


@contextlib.contextmanager
def immutable(db_path: Path) -> Iterator[None]:
    """The database and its WAL become immutable: every write fails, even as root. (Not the
    -shm file: SQLite maps it into memory, and a write to it would kill the process.)"""
    files = [db_path, db_path.with_name(db_path.name + "-wal")]
    try:
        for path in files:
            if not run("chattr", "+i", str(path)):
                pytest.skip("chattr +i does not work here (needs root and ext4/tmpfs)")
        yield
    finally:
        for path in files:
            run("chattr", "-i", str(path))


@contextlib.contextmanager
def disk_full(directory: Path) -> Iterator[None]:
    """Fill the file system that holds `directory` to the last byte."""
    filler = directory / "filler"
    try:
        # Unbuffered, so that no write is left over for close() to fail on.
        with filler.open("wb", buffering=0) as out:
            for size in (65536, 4096, 512, 1):  # down to the last byte
                with contextlib.suppress(OSError):
                    while out.write(b"\0" * size):
                        pass
        assert shutil.disk_usage(directory).free == 0
        yield
    finally:
        filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a tmpfs of its own, 8 MB: a disk we can fill without harm."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    if not run("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        # Lazy: the service (killed by start_service after this) may still hold the files.
        run("umount", "-l", str(mount_point))


def slow(pieces: int, delay: float) -> Reply:
    return Reply(chunks=[f"w{i} " for i in range(pieces)], delay=delay)


def assert_unavailable(response: httpx2.Response) -> None:
    """A clear 503: a reason in `detail`, and when to try again."""
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    assert "storage" in response.json()["detail"].lower()


def accept(client: httpx2.Client, chat_id: str, content: str) -> httpx2.Response:
    return client.post(
        f"/chats/{chat_id}/messages",
        json={"content": content},
        headers={"Accept": "application/json"},
    )


@pytest.mark.parametrize("fault", ["unwritable", "disk-full"])
def test_storage_failure_is_a_clear_503_and_the_service_recovers(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    start_service: ServiceFactory,
    fake: FakeOpenAI,
    fault: str,
) -> None:
    directory = request.getfixturevalue("small_disk") if fault == "disk-full" else tmp_path
    db_path = directory / "chat.db"
    service = start_service(db_path=db_path)
    fake.push(slow(40, 0.03))
    with service.client() as own:
        chat, other = make_chat(own), make_chat(own)
        started = accept(own, chat["id"], "go")
        assert started.status_code == 202
        reply_id = started.json()["assistant_message"]["id"]
        injected = immutable(db_path) if fault == "unwritable" else disk_full(directory)
        with injected:
            health = own.get("/healthz")
            assert_unavailable(health)
            assert_unavailable(own.post("/chats", json={"title": "new"}))
            assert_unavailable(accept(own, other["id"], "hello?"))
            # Reads still work.
            assert own.get(f"/chats/{chat['id']}").json()["id"] == chat["id"]
            # The reply goes on streaming, then cannot be stored: it says so in its last event.
            events = follow(own, chat["id"], reply_id)
            assert [e.name for e in events].count("message.done") == 1
            done: dict[str, Any] = events[-1].message()
            assert done["status"] == "failed" and done["error"]["code"] == "storage_error"
            assert done["content"] == "".join(f"w{i} " for i in range(40))
            # The chat's reply has ended; a new send waits for storage, not for that reply.
            assert_unavailable(accept(own, chat["id"], "and now?"))
            assert service.process is not None and service.process.poll() is None
        # The fault is gone: healthy again, the reply is stored as announced, sends work.
        assert wait_until(lambda: own.get("/healthz").status_code == 200, timeout=10)
        url = f"/chats/{chat['id']}/messages/{reply_id}"
        assert wait_until(lambda: own.get(url).json()["status"] != "in_progress", timeout=10)
        assert own.get(url).json() == done
        fake.push(text("Stored again"), text("Other chat works"))
        _, after = send(own, chat["id"], "and now?")
        assert after[-1].message()["status"] == "completed"
        assert after[-1].message()["content"] == "Stored again"
        _, other_after = send(own, other["id"], "hello?")
        assert other_after[-1].message()["content"] == "Other chat works"
        history = own.get(f"/chats/{other['id']}/messages").json()["data"]
        assert [m["content"] for m in history] == ["hello?", "Other chat works"]
    assert service.process.poll() is None, service.log()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
