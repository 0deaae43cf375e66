"""Limits, each a setting: body size, message length, messages per chat, replies in progress,
time and tokens per reply, slow readers, and the memory that finished replies' logs hold."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx2
import pytest

from tests.conftest import ServiceFactory
from tests.fake_openai import FakeOpenAI, Reply
from tests.support import follow, make_chat, send, wait_until

pytestmark = pytest.mark.e2e


def start_reply(client: httpx2.Client, chat_id: str, content: str) -> httpx2.Response:
    """Send with Accept: application/json (202 and the reply runs in the background)."""
    return client.post(
        f"/chats/{chat_id}/messages",
        json={"content": content},
        headers={"Accept": "application/json"},
    )


def message(client: httpx2.Client, chat_id: str, message_id: str) -> dict[str, Any]:
    response = client.get(f"/chats/{chat_id}/messages/{message_id}")
    assert response.status_code == 200
    data: dict[str, Any] = response.json()
    return data


def history(client: httpx2.Client, chat_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = client.get(f"/chats/{chat_id}/messages").json()["data"]
    return data


def test_max_request_bytes_is_413_above_and_read_below(start_service: ServiceFactory) -> None:
    service = start_service(MAX_REQUEST_BYTES="2048")
    with service.client() as client:
        chat = make_chat(client)
        url = f"/chats/{chat['id']}/messages"
        over = client.post(url, json={"content": "x" * 2100})
        assert over.status_code == 413 and "2048" in over.json()["detail"]

        def chunks() -> Any:  # no Content-Length: counted as it arrives
            yield b'{"content": "'
            yield b"y" * 2100
            yield b'"}'

        chunked = client.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413
        assert history(client, chat["id"]) == []
        response, events = send(client, chat["id"], "z" * 1900)
        assert response.status_code == 200 and events[-1].message()["status"] == "completed"


def test_max_message_chars_is_a_setting_and_in_the_schema(start_service: ServiceFactory) -> None:
    service = start_service(MAX_MESSAGE_CHARS="10")
    with service.client() as client:
        chat = make_chat(client)
        # Characters, not bytes: ten non-ASCII ones pass, eleven do not.
        too_long = client.post(f"/chats/{chat['id']}/messages", json={"content": "é" * 11})
        assert too_long.status_code == 422
        assert too_long.json()["detail"][0]["loc"] == ["body", "content"]
        response, events = send(client, chat["id"], "é" * 10)
        assert response.status_code == 200 and events[-1].message()["status"] == "completed"
        schema = client.get("/openapi.json").json()["components"]["schemas"]["MessageCreate"]
        assert schema["properties"]["content"]["maxLength"] == 10


def test_a_full_chat_refuses_more_with_409_and_no_message_id(
    start_service: ServiceFactory,
) -> None:
    service = start_service(MAX_MESSAGES_PER_CHAT="4")
    with service.client() as client:
        chat = make_chat(client)
        for content in ["one", "two"]:
            response, events = send(client, chat["id"], content)
            assert response.status_code == 200 and events[-1].message()["status"] == "completed"
        full = client.post(f"/chats/{chat['id']}/messages", json={"content": "three"})
        assert full.status_code == 409
        body = full.json()
        # Unlike "a reply is in progress", retrying will not help: no message_id to follow.
        assert "full" in body["detail"] and body.get("message_id") is None
        assert len(history(client, chat["id"])) == 4
        # Other chats are not affected.
        other = make_chat(client)
        assert send(client, other["id"], "hi")[0].status_code == 200


def test_max_active_replies_is_503_with_retry_after_then_frees_up(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    service = start_service(MAX_ACTIVE_REPLIES="2")
    fake.default = Reply(chunks=[f"w{i} " for i in range(30)], delay=0.05)
    with service.client() as client:
        chats = [make_chat(client) for _ in range(12)]
        statuses: list[int] = []
        retry_after: list[str | None] = []
        lock = threading.Lock()

        def post(chat_id: str) -> None:
            with service.client() as own:
                response = start_reply(own, chat_id, "go")
            with lock:
                statuses.append(response.status_code)
                if response.status_code == 503:
                    retry_after.append(response.headers.get("retry-after"))

        # All at once: the limit must hold even when the sends race each other.
        threads = [threading.Thread(target=post, args=(c["id"],)) for c in chats[:10]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(statuses) == [202, 202] + [503] * 8
        assert retry_after and all(value and value.isdigit() for value in retry_after)
        assert client.get("/healthz").json()["active_replies"] <= 2
        # Refused sends stored nothing.
        assert sum(len(history(client, c["id"])) for c in chats[:10]) == 4
        assert wait_until(lambda: client.get("/healthz").json()["active_replies"] == 0, 15)
        assert start_reply(client, chats[10]["id"], "go").status_code == 202


def test_a_retried_send_gets_its_reply_even_when_replies_are_at_the_limit(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    """API.md: a retry with the same Idempotency-Key gets what the first request got. The
    limit on replies in progress must not turn that into a 503: the retry starts nothing."""
    service = start_service(MAX_ACTIVE_REPLIES="1")
    fake.default = Reply(chunks=[f"w{i} " for i in range(40)], delay=0.05)
    with service.client() as client:
        chat, other = make_chat(client), make_chat(client)
        keyed = {"Accept": "application/json", "Idempotency-Key": "send-1"}
        url = f"/chats/{chat['id']}/messages"
        first = client.post(url, json={"content": "go"}, headers=keyed)
        assert first.status_code == 202
        # Full: a new send elsewhere is refused...
        assert start_reply(client, other["id"], "go").status_code == 503
        # An unknown chat is still a 404, full or not.
        assert start_reply(client, "chat_missing", "go").status_code == 404
        # ...but the retry gets the same two messages, and stores nothing new.
        again = client.post(url, json={"content": "go"}, headers=keyed)
        assert again.status_code == 202, again.text
        assert again.headers["location"] == first.headers["location"]
        ids = [first.json()[k]["id"] for k in ("user_message", "assistant_message")]
        assert [again.json()[k]["id"] for k in ("user_message", "assistant_message")] == ids
        # Its stream form too: the reply's events, after the user message.
        with client.stream(
            "POST", url, json={"content": "go"}, headers={"Idempotency-Key": "send-1"}
        ) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["location"] == first.headers["location"]
        # The same key with other content is still the 422 it always is.
        other_content = client.post(url, json={"content": "stop"}, headers=keyed)
        assert other_content.status_code == 422
        # A new key is a new send: refused while full.
        fresh = {"Accept": "application/json", "Idempotency-Key": "send-2"}
        assert client.post(url, json={"content": "go"}, headers=fresh).status_code == 503
        assert len(history(client, chat["id"])) == 2
        assert client.get("/healthz").json()["active_replies"] == 1


def test_max_reply_seconds_ends_the_reply_incomplete_keeping_its_text(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    service = start_service(MAX_REPLY_SECONDS="1")
    fake.push(Reply(chunks=[f"w{i} " for i in range(100)], delay=0.05))  # about 5 s
    with service.client() as client:
        chat = make_chat(client)
        response, events = send(client, chat["id"], "go")
        done = events[-1]
        assert done.name == "message.done"
        final = done.message()
        assert final["status"] == "incomplete"
        assert final["error"]["code"] == "reply_timeout"
        text = "".join(e.message()["delta"] for e in events if e.name == "message.delta")
        assert text and final["content"] == text
        assert "w0 " in text and "w99 " not in text
        assert message(client, chat["id"], final["id"]) == final
        # The provider's stream was closed, and the chat takes the next message.
        assert wait_until(lambda: fake.disconnects == 1)
        again, more = send(client, chat["id"], "again")
        assert again.status_code == 200 and more[-1].message()["status"] == "completed"


@pytest.mark.parametrize(
    ("setting", "expected"),
    [pytest.param("50", 50, id="set"), pytest.param("", None, id="unset")],
)
def test_max_output_tokens_is_sent_as_max_tokens(
    start_service: ServiceFactory, fake: FakeOpenAI, setting: str, expected: int | None
) -> None:
    service = start_service(MAX_OUTPUT_TOKENS=setting)
    with service.client() as client:
        chat = make_chat(client)
        send(client, chat["id"], "go")
    [request] = fake.requests
    assert request.get("max_tokens") == expected
    assert "max_completion_tokens" not in request


def test_a_client_that_stops_reading_is_dropped_and_the_reply_goes_on(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    service = start_service(STREAM_SEND_TIMEOUT="1")
    # About 12 MB of text over a few seconds: far more than the socket buffers hold.
    piece = "abcdefghij" * 400
    chunks = [f"{i:05d}{piece}" for i in range(3000)]
    fake.push(Reply(chunks=chunks, delay=0.001))
    with service.client() as client:
        chat = make_chat(client)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
        sock.settimeout(10)
        sock.connect(("127.0.0.1", service.port))
        body = b'{"content": "go"}'
        sock.sendall(
            f"POST /chats/{chat['id']}/messages HTTP/1.1\r\nHost: t\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        try:
            # Read nothing while the reply is written; it must complete all the same.
            assert wait_until(
                lambda: any(
                    m["role"] == "assistant" and m["status"] == "completed"
                    for m in history(client, chat["id"])
                ),
                timeout=30,
            )
            reply = history(client, chat["id"])[1]
            assert reply["content"] == "".join(chunks)
            # Now read what the server had sent before it gave up on us: the connection
            # ends (the server closed it) without the reply's message.done.
            received = b""
            while data := sock.recv(1 << 20):
                received += data
        finally:
            sock.close()
        assert received.startswith(b"HTTP/1.1 200")
        assert b"event: message.created" in received
        assert b"event: message.done" not in received
        assert len(received) < len("".join(chunks)) // 2
        # Said once, in a line of its own, not as a traceback.
        assert "client stopped reading; stream dropped" in service.log()
        assert "Traceback" not in service.log()
        # The service is healthy, and the reply can be read again from the start.
        assert client.get("/healthz").json()["active_replies"] == 0
        events = follow(client, chat["id"], reply["id"])
        assert events[-1].message()["content"] == reply["content"]


def test_finished_logs_are_dropped_by_age_and_their_stream_is_message_done_alone(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    service = start_service(KEEP_FINISHED_SECONDS="0.5")
    with service.client() as client:
        old_chat, new_chat = make_chat(client), make_chat(client)
        _, old_events = send(client, old_chat["id"], "first")
        time.sleep(1.0)
        # Logs are pruned when a reply finishes: this one retires the first one's log.
        _, new_events = send(client, new_chat["id"], "second")
        old_done, new_done = old_events[-1], new_events[-1]

        replay = follow(client, old_chat["id"], old_done.message()["id"])
        assert [(e.name, e.id) for e in replay] == [("message.done", old_done.id)]
        assert replay[0].data == old_done.data
        # Already seen: 204, as for a live log.
        url = f"/chats/{old_chat['id']}/messages/{old_done.message()['id']}/stream"
        assert client.get(url, headers={"Last-Event-ID": str(old_done.id)}).status_code == 204
        # The newer one still has its whole log.
        kept = follow(client, new_chat["id"], new_done.message()["id"])
        assert [e.id for e in kept] == [e.id for e in new_events[1:]]


def test_finished_logs_are_dropped_by_size(start_service: ServiceFactory) -> None:
    service = start_service(KEEP_FINISHED_BYTES="1")
    with service.client() as client:
        chat = make_chat(client)
        _, events = send(client, chat["id"], "go")
        done = events[-1]
        assert len(events) > 3  # created, deltas, done: a log worth dropping
        replay = follow(client, chat["id"], done.message()["id"])
        assert [(e.name, e.id, e.data) for e in replay] == [("message.done", done.id, done.data)]
