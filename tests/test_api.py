"""End-to-end tests of the HTTP contract (API.md) against a real uvicorn process."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx2
import pytest

from tests.conftest import ServiceFactory
from tests.fake_openai import FakeOpenAI, Reply, ToolCall, text
from tests.support import Event, follow, make_chat, parse_events, send, wait_until

pytestmark = pytest.mark.e2e


def slow(pieces: int = 40, delay: float = 0.05) -> Reply:
    """A reply that takes pieces × delay seconds: time to act while it is in progress."""
    return Reply(chunks=[f"w{i} " for i in range(pieces)], delay=delay)


def names(events: list[Event]) -> list[str]:
    return [e.name for e in events]


def history(client: httpx2.Client, chat_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/chats/{chat_id}/messages")
    assert response.status_code == 200
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def start_reply(client: httpx2.Client, chat_id: str, content: str) -> dict[str, Any]:
    """Send with Accept: application/json; returns the 202 body."""
    response = client.post(
        f"/chats/{chat_id}/messages",
        json={"content": content},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_done(client: httpx2.Client, chat_id: str, message_id: str) -> dict[str, Any]:
    """Wait until a reply is no longer in progress; returns it."""
    url = f"/chats/{chat_id}/messages/{message_id}"
    assert wait_until(lambda: client.get(url).json()["status"] != "in_progress", timeout=10)
    message: dict[str, Any] = client.get(url).json()
    return message


# Chats


def test_create_chat_returns_201_with_location_and_defaults(client: httpx2.Client) -> None:
    response = client.post("/chats")
    assert response.status_code == 201
    chat = response.json()
    assert response.headers["location"] == f"/chats/{chat['id']}"
    assert chat["id"].startswith("chat_") and len(chat["id"]) >= 5 + 22
    assert chat["title"] is None and chat["system_prompt"] is None
    assert chat["model"] == "gpt-4o-mini"
    assert chat["created_at"] == chat["updated_at"]
    assert chat["created_at"].endswith(("Z", "+00:00"))
    assert client.get(f"/chats/{chat['id']}").json() == chat


def test_create_chat_takes_title_prompt_and_allowed_model(client: httpx2.Client) -> None:
    body = {"title": "Trip", "system_prompt": "Be terse.", "model": "gpt-4o"}
    chat = client.post("/chats", json=body).json()
    assert {k: chat[k] for k in body} == body


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param('{"model": "gpt-5-ultra"}', "application/json", id="disallowed-model"),
        pytest.param('{"colour": "red"}', "application/json", id="unknown-field"),
        pytest.param('{"title": ', "application/json", id="malformed-json"),
        pytest.param('{"title": 42}', "application/json", id="wrong-type"),
        pytest.param('{"title": "   "}', "application/json", id="blank-title"),
        pytest.param("[1, 2]", "application/json", id="not-an-object"),
    ],
)
def test_create_chat_refuses_bad_bodies(
    client: httpx2.Client, body: str, content_type: str
) -> None:
    before = client.get("/chats", params={"limit": 100}).json()["data"]
    response = client.post("/chats", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 422, response.text
    assert "detail" in response.json()
    assert client.get("/chats", params={"limit": 100}).json()["data"] == before


def test_read_chats_pages_newest_first(client: httpx2.Client) -> None:
    ids = [make_chat(client, title=f"c{i}")["id"] for i in range(5)]
    first = client.get("/chats", params={"limit": 2}).json()
    assert [c["id"] for c in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    second = client.get("/chats", params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    assert [c["id"] for c in second["data"]] == ids[::-1][2:4]
    default = client.get("/chats").json()
    assert len(default["data"]) <= 20


@pytest.mark.parametrize(
    ("params", "status"),
    [
        pytest.param({"limit": 0}, 422, id="limit-0"),
        pytest.param({"limit": 101}, 422, id="limit-101"),
        pytest.param({"limit": "ten"}, 422, id="limit-text"),
        pytest.param({"after": "chat_doesnotexist0000000"}, 404, id="unknown-after"),
    ],
)
def test_read_chats_refuses_bad_paging(
    client: httpx2.Client, params: dict[str, Any], status: int
) -> None:
    assert client.get("/chats", params=params).status_code == status


def test_unknown_chat_is_404_everywhere(client: httpx2.Client) -> None:
    missing = "chat_AAAAAAAAAAAAAAAAAAAAAA"
    assert client.get(f"/chats/{missing}").status_code == 404
    assert client.patch(f"/chats/{missing}", json={"title": "x"}).status_code == 404
    assert client.delete(f"/chats/{missing}").status_code == 404
    assert client.get(f"/chats/{missing}/messages").status_code == 404
    assert client.post(f"/chats/{missing}/messages", json={"content": "hi"}).status_code == 404
    assert client.get(f"/chats/{missing}/messages/msg_x").status_code == 404
    assert client.get(f"/chats/{missing}/messages/msg_x/stream").status_code == 404
    assert client.post(f"/chats/{missing}/messages/msg_x/cancel").status_code == 404


@pytest.mark.parametrize(
    "body",
    [{"content": "   "}, {"content": "hi", "extra": 1}, {}],
    ids=["blank", "unknown-field", "no-content"],
)
def test_a_send_checks_its_body_before_its_chat(
    client: httpx2.Client, body: dict[str, object]
) -> None:
    """README: the chat is read in the transaction that stores the send, so a bad body sent
    to an unknown chat is 422; a good one is 404 (above), JSON answer or stream."""
    missing = "chat_AAAAAAAAAAAAAAAAAAAAAA"
    chats = client.get("/chats", params={"limit": 100}).json()
    assert client.post(f"/chats/{missing}/messages", json=body).status_code == 422
    accept_json = {"Accept": "application/json"}
    sent = client.post(f"/chats/{missing}/messages", json={"content": "hi"}, headers=accept_json)
    assert sent.status_code == 404 and sent.json() == {"detail": "Chat not found."}
    assert client.get("/chats", params={"limit": 100}).json() == chats  # nothing was made


def test_update_chat_changes_and_clears_fields(client: httpx2.Client) -> None:
    chat = make_chat(client, system_prompt="Old")
    time.sleep(0.002)
    updated = client.patch(f"/chats/{chat['id']}", json={"title": "New"}).json()
    assert updated["title"] == "New" and updated["system_prompt"] == "Old"
    assert updated["updated_at"] > chat["updated_at"]
    cleared = client.patch(f"/chats/{chat['id']}", json={"system_prompt": None}).json()
    assert cleared["system_prompt"] is None and cleared["title"] == "New"
    bad = client.patch(f"/chats/{chat['id']}", json={"model": "gpt-4o"})
    assert bad.status_code == 422
    assert client.get(f"/chats/{chat['id']}").json() == cleared


def test_delete_chat_removes_it_and_its_messages(client: httpx2.Client) -> None:
    chat = make_chat(client)
    send(client, chat["id"], "hello")
    response = client.delete(f"/chats/{chat['id']}")
    assert response.status_code == 204 and response.content == b""
    assert client.get(f"/chats/{chat['id']}").status_code == 404
    assert client.get(f"/chats/{chat['id']}/messages").status_code == 404


# Sending and streaming


def test_send_streams_user_message_then_numbered_reply_events(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client)
    fake.push(Reply(chunks=["Hel", "lo", "!"], delay=0.05))
    response, events = send(client, chat["id"], "Say hello")
    assert response.headers["cache-control"] in {"no-cache", "no-store"}
    assert response.headers["x-accel-buffering"] == "no"
    assert names(events)[:2] == ["message.created", "message.created"]
    assert names(events)[-1] == "message.done"
    assert set(names(events)[2:-1]) == {"message.delta"}
    user, created = events[0].message(), events[1].message()
    assert events[0].id is None
    assert user["role"] == "user" and user["content"] == "Say hello"
    assert user["status"] == "completed" and user["usage"] is None and user["model"] is None
    assert created["role"] == "assistant" and created["status"] == "in_progress"
    assert created["content"] == ""
    assert [e.id for e in events[1:]] == list(range(1, len(events)))
    text_seen = "".join(e.message()["delta"] for e in events if e.name == "message.delta")
    assert text_seen == "Hello!"
    done = events[-1].message()
    assert done["id"] == created["id"] and done["content"] == "Hello!"
    assert done["status"] == "completed" and done["finish_reason"] == "stop"
    assert done["usage"]["total_tokens"] == (
        done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"]
    )
    assert history(client, chat["id"]) == [user, done]


def test_send_asks_the_model_with_system_prompt_history_and_usage(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client, system_prompt="You are a pirate.")
    fake.push(text("First answer"), text("Second answer"))
    send(client, chat["id"], "first question")
    send(client, chat["id"], "second question")
    request = fake.requests[-1]
    messages = request["messages"]
    assert messages[0]["role"] == "system" and "You are a pirate." in messages[0]["content"]
    assert [(m["role"], m["content"]) for m in messages[1:]] == [
        ("user", "first question"),
        ("assistant", "First answer"),
        ("user", "second question"),
    ]
    assert request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert request["model"] == "gpt-4o-mini"


def test_send_with_accept_json_returns_202_and_stream_location(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client)
    fake.push(text("Accepted reply"))
    response = client.post(
        f"/chats/{chat['id']}/messages",
        json={"content": "hi"},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 202
    body = response.json()
    assert body["user_message"]["content"] == "hi"
    assert body["assistant_message"]["role"] == "assistant"
    reply_id = body["assistant_message"]["id"]
    location = response.headers["location"]
    assert location == f"/chats/{chat['id']}/messages/{reply_id}/stream"
    events = follow(client, chat["id"], reply_id)
    assert names(events)[0] == "message.created" and events[0].id == 1
    assert events[-1].message()["content"] == "Accepted reply"


def test_send_updates_the_chats_updated_at(client: httpx2.Client) -> None:
    chat = make_chat(client)
    send(client, chat["id"], "hi")
    assert client.get(f"/chats/{chat['id']}").json()["updated_at"] > chat["updated_at"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"content": ""}, id="empty"),
        pytest.param({"content": " \n\t "}, id="whitespace"),
        pytest.param({"content": "x" * 32_001}, id="too-long"),
        pytest.param({"content": "hi", "role": "system"}, id="unknown-field"),
        pytest.param({"content": 5}, id="wrong-type"),
        pytest.param({}, id="missing"),
    ],
)
def test_send_refuses_bad_content_and_stores_nothing(
    client: httpx2.Client, fake: FakeOpenAI, body: dict[str, Any]
) -> None:
    chat = make_chat(client)
    response = client.post(f"/chats/{chat['id']}/messages", json=body)
    assert response.status_code == 422
    assert response.json()["detail"]
    assert history(client, chat["id"]) == []
    assert fake.requests == []


def test_send_accepts_content_at_the_limit(client: httpx2.Client) -> None:
    chat = make_chat(client)
    response, events = send(client, chat["id"], "x" * 32_000)
    assert response.status_code == 200 and events[-1].message()["status"] == "completed"


def test_second_send_while_replying_is_409_naming_the_reply(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client)
    fake.push(slow(20))
    first = start_reply(client, chat["id"], "one")
    response = client.post(f"/chats/{chat['id']}/messages", json={"content": "two"})
    assert response.status_code == 409
    reply_id = first["assistant_message"]["id"]
    assert response.json()["message_id"] == reply_id and reply_id in response.json()["detail"]
    wait_done(client, chat["id"], reply_id)
    assert len(history(client, chat["id"])) == 2


def test_simultaneous_sends_start_exactly_one_reply(
    client: httpx2.Client, fake: FakeOpenAI, shared_service: Any
) -> None:
    chat = make_chat(client)
    fake.default = slow(10)
    statuses: list[int] = []

    def post() -> None:
        with shared_service.client() as own:
            r = own.post(
                f"/chats/{chat['id']}/messages",
                json={"content": "race"},
                headers={"Accept": "application/json"},
            )
            statuses.append(r.status_code)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [202] + [409] * 7
    assert len(history(client, chat["id"])) == 2


def test_resume_with_last_event_id_and_after(client: httpx2.Client, fake: FakeOpenAI) -> None:
    chat = make_chat(client)
    fake.push(Reply(chunks=["a", "b", "c", "d"], delay=0.05))
    _, events = send(client, chat["id"], "go")
    reply_id = events[1].message()["id"]
    full = follow(client, chat["id"], reply_id)
    assert [(e.id, e.name, e.data) for e in full] == [(e.id, e.name, e.data) for e in events[1:]]
    resumed = follow(client, chat["id"], reply_id, **{"Last-Event-ID": "2"})
    assert [e.id for e in resumed] == [e.id for e in full[2:]]
    by_query = client.get(f"/chats/{chat['id']}/messages/{reply_id}/stream", params={"after": 3})
    assert [e.id for e in parse_events(by_query.text.splitlines())] == [e.id for e in full[3:]]
    # `after` wins over Last-Event-ID; a Last-Event-ID that is not a number is ignored.
    both = client.get(
        f"/chats/{chat['id']}/messages/{reply_id}/stream",
        params={"after": 1},
        headers={"Last-Event-ID": "3"},
    )
    assert [e.id for e in parse_events(both.text.splitlines())][0] == 2
    garbage = follow(client, chat["id"], reply_id, **{"Last-Event-ID": "abc"})
    assert [e.id for e in garbage] == [e.id for e in full]


def test_stream_at_the_last_event_is_204(client: httpx2.Client) -> None:
    chat = make_chat(client)
    _, events = send(client, chat["id"], "go")
    reply_id = events[-1].message()["id"]
    last = str(events[-1].id)
    url = f"/chats/{chat['id']}/messages/{reply_id}/stream"
    assert client.get(url, headers={"Last-Event-ID": last}).status_code == 204
    assert client.get(url, params={"after": last}).status_code == 204


@pytest.mark.parametrize("after", [pytest.param("x", id="text"), pytest.param("-1", id="negative")])
def test_stream_after_that_is_not_a_whole_number_is_422(client: httpx2.Client, after: str) -> None:
    chat = make_chat(client)
    _, events = send(client, chat["id"], "go")
    reply_id = events[-1].message()["id"]
    url = f"/chats/{chat['id']}/messages/{reply_id}/stream"
    assert client.get(url, params={"after": after}).status_code == 422


def test_stream_of_a_user_message_or_another_chats_reply_is_404(client: httpx2.Client) -> None:
    chat, other = make_chat(client), make_chat(client)
    _, events = send(client, chat["id"], "go")
    user_id, reply_id = events[0].message()["id"], events[-1].message()["id"]
    assert client.get(f"/chats/{chat['id']}/messages/{user_id}/stream").status_code == 404
    assert client.get(f"/chats/{other['id']}/messages/{reply_id}/stream").status_code == 404
    assert client.get(f"/chats/{other['id']}/messages/{reply_id}").status_code == 404


def test_live_followers_all_see_the_same_events(client: httpx2.Client, fake: FakeOpenAI) -> None:
    chat = make_chat(client)
    fake.push(slow(15, 0.03))
    body = start_reply(client, chat["id"], "go")
    reply_id = body["assistant_message"]["id"]
    results: list[list[Event]] = []

    def watch() -> None:
        with httpx2.Client(base_url=str(client.base_url), timeout=10) as own:
            results.append(follow(own, chat["id"], reply_id))

    threads = [threading.Thread(target=watch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = [(e.id, e.name, e.data) for e in results[0]]
    assert all([(e.id, e.name, e.data) for e in r] == first for r in results)
    assert results[0][-1].message()["content"] == "".join(f"w{i} " for i in range(15))


def test_disconnecting_does_not_stop_the_reply(client: httpx2.Client, fake: FakeOpenAI) -> None:
    chat = make_chat(client)
    fake.push(slow(20, 0.03))
    with client.stream("POST", f"/chats/{chat['id']}/messages", json={"content": "go"}) as r:
        lines = r.iter_lines()
        events = parse_events(lines)
        next(events), next(events), next(events)  # user, created, first delta
    reply_id = history(client, chat["id"])[1]["id"]
    done = wait_done(client, chat["id"], reply_id)
    assert done["status"] == "completed"
    assert done["content"] == "".join(f"w{i} " for i in range(20))
    assert fake.disconnects == 0


def test_cancel_keeps_the_text_and_closes_the_providers_stream(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client)
    fake.push(slow(200, 0.02))
    body = start_reply(client, chat["id"], "go")
    reply_id = body["assistant_message"]["id"]
    url = f"/chats/{chat['id']}/messages/{reply_id}"
    with client.stream("GET", f"{url}/stream") as response:
        events = parse_events(response.iter_lines())
        assert next(events).name == "message.created"
        assert next(events).name == "message.delta"
        cancelled = client.post(f"{url}/cancel")
        rest = list(events)
    assert cancelled.status_code == 200
    message = cancelled.json()
    assert message["status"] == "cancelled" and message["content"].startswith("w0 ")
    assert rest[-1].name == "message.done" and rest[-1].message() == message
    assert fake.wait_for_disconnect(1, timeout=5)
    again = client.post(f"{url}/cancel")
    assert again.status_code == 200 and again.json() == message
    assert client.get(url).json() == message


def test_cancel_of_a_finished_reply_changes_nothing(client: httpx2.Client) -> None:
    chat = make_chat(client)
    _, events = send(client, chat["id"], "go")
    done = events[-1].message()
    response = client.post(f"/chats/{chat['id']}/messages/{done['id']}/cancel")
    assert response.status_code == 200 and response.json() == done


def test_deleting_a_chat_ends_its_stream_cancelled(client: httpx2.Client, fake: FakeOpenAI) -> None:
    chat = make_chat(client)
    fake.push(slow(200, 0.02))
    with client.stream("POST", f"/chats/{chat['id']}/messages", json={"content": "go"}) as r:
        events = parse_events(r.iter_lines())
        next(events), next(events), next(events)
        assert client.delete(f"/chats/{chat['id']}").status_code == 204
        rest = list(events)
    assert rest[-1].name == "message.done"
    assert rest[-1].message()["status"] == "cancelled"
    assert fake.wait_for_disconnect(1, timeout=5)
    assert client.get(f"/chats/{chat['id']}").status_code == 404


@pytest.mark.parametrize(
    ("reply", "status", "code", "kept"),
    [
        pytest.param(
            Reply(status=429, headers={"Retry-After": "7"}), "failed", "rate_limited", "", id="429"
        ),
        pytest.param(Reply(status=500), "failed", "provider_error", "", id="500"),
        pytest.param(Reply(status=503), "failed", "provider_error", "", id="503"),
        pytest.param(Reply(status=401), "failed", "auth_failed", "", id="401"),
        pytest.param(Reply(hang=True), "failed", "timeout", "", id="hang"),
        pytest.param(
            Reply(chunks=["a", "b", "c"], stall_after=2), "failed", "timeout", "ab", id="stall"
        ),
        pytest.param(
            Reply(chunks=["a", "b", "c"], cut=True), "failed", "stream_interrupted", "abc", id="cut"
        ),
        pytest.param(
            Reply(chunks=["a", "b", "c"], error_after=2),
            "failed",
            "provider_error",
            "ab",
            id="error-mid-stream",
        ),
        pytest.param(
            Reply(chunks=["a", "b"], finish_reason="length"),
            "incomplete",
            "length",
            "ab",
            id="length",
        ),
    ],
)
def test_provider_failures_end_the_reply_with_a_clear_status(
    client: httpx2.Client, fake: FakeOpenAI, reply: Reply, status: str, code: str, kept: str
) -> None:
    chat = make_chat(client)
    fake.push(reply)
    _, events = send(client, chat["id"], "go")
    assert names(events).count("message.done") == 1 and events[-1].name == "message.done"
    done = events[-1].message()
    assert done["status"] == status
    assert done["error"]["code"] == code and done["error"]["message"]
    assert "sk-test" not in done["error"]["message"]
    assert done["content"] == kept
    assert history(client, chat["id"])[-1] == done
    if code == "rate_limited":
        assert "7" in done["error"]["message"]
    # The chat still works.
    fake.push(text("Recovered"))
    _, after = send(client, chat["id"], "again")
    assert after[-1].message()["status"] == "completed"
    assert after[-1].message()["content"] == "Recovered"
    assert client.get("/healthz").status_code == 200


def test_connection_refused_fails_the_reply(start_service: ServiceFactory) -> None:
    service = start_service(OPENAI_BASE_URL="http://127.0.0.1:9/v1")
    with service.client() as own:
        chat = make_chat(own)
        _, events = send(own, chat["id"], "go")
    done = events[-1].message()
    assert done["status"] == "failed" and done["error"]["code"] == "connection_error"


def test_without_key_or_base_url_replies_fail_not_configured(
    start_service: ServiceFactory,
) -> None:
    service = start_service(OPENAI_BASE_URL="", OPENAI_API_KEY="")
    with service.client() as own:
        chat = make_chat(own)
        _, events = send(own, chat["id"], "go")
    done = events[-1].message()
    assert done["status"] == "failed" and done["error"]["code"] == "not_configured"
    assert service.log().count("No OPENAI_API_KEY") == 1


# Idempotency


def test_idempotency_key_replays_the_first_send(client: httpx2.Client, fake: FakeOpenAI) -> None:
    chat = make_chat(client)
    key = {"Idempotency-Key": "k-123"}
    _, first = send(client, chat["id"], "once", **key)
    _, second = send(client, chat["id"], "once", **key)
    assert first[0].data == second[0].data
    assert second[-1].message() == first[-1].message()
    accepted = client.post(
        f"/chats/{chat['id']}/messages",
        json={"content": "once"},
        headers={"Accept": "application/json", **key},
    )
    assert accepted.status_code == 202
    assert accepted.json()["user_message"] == first[0].data
    assert accepted.json()["assistant_message"] == first[-1].data
    assert len(history(client, chat["id"])) == 2
    assert len(fake.requests) == 1


def test_idempotency_key_with_other_content_is_422(client: httpx2.Client) -> None:
    chat = make_chat(client)
    send(client, chat["id"], "once", **{"Idempotency-Key": "k"})
    response = client.post(
        f"/chats/{chat['id']}/messages", json={"content": "other"}, headers={"Idempotency-Key": "k"}
    )
    assert response.status_code == 422
    assert len(history(client, chat["id"])) == 2


def test_idempotency_key_retry_while_running_gets_that_reply(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client)
    fake.push(slow(10))
    key = {"Idempotency-Key": "retry-me"}
    first = client.post(
        f"/chats/{chat['id']}/messages",
        json={"content": "go"},
        headers={"Accept": "application/json", **key},
    ).json()
    _, events = send(client, chat["id"], "go", **key)
    assert events[0].data == first["user_message"]
    assert events[-1].message()["id"] == first["assistant_message"]["id"]
    assert events[-1].message()["status"] == "completed"


def test_idempotency_key_longer_than_255_is_422(client: httpx2.Client) -> None:
    chat = make_chat(client)
    response = client.post(
        f"/chats/{chat['id']}/messages",
        json={"content": "go"},
        headers={"Idempotency-Key": "k" * 256},
    )
    assert response.status_code == 422


# History


def test_read_messages_pages_oldest_first(client: httpx2.Client) -> None:
    chat = make_chat(client)
    for i in range(3):
        send(client, chat["id"], f"q{i}")
    everything = history(client, chat["id"])
    assert [m["role"] for m in everything] == ["user", "assistant"] * 3
    assert [m["content"] for m in everything[::2]] == ["q0", "q1", "q2"]
    page = client.get(f"/chats/{chat['id']}/messages", params={"limit": 2}).json()
    assert page["data"] == everything[:2] and page["has_more"] is True
    rest = client.get(
        f"/chats/{chat['id']}/messages", params={"after": everything[1]["id"], "limit": 10}
    ).json()
    assert rest["data"] == everything[2:] and rest["has_more"] is False
    one = client.get(f"/chats/{chat['id']}/messages/{everything[3]['id']}")
    assert one.json() == everything[3]


@pytest.mark.parametrize(
    ("params", "status"),
    [
        pytest.param({"limit": 0}, 422, id="limit-0"),
        pytest.param({"limit": 10_001}, 422, id="limit-too-big"),
        pytest.param({"after": "msg_nope"}, 404, id="unknown-after"),
    ],
)
def test_read_messages_refuses_bad_paging(
    client: httpx2.Client, params: dict[str, Any], status: int
) -> None:
    chat = make_chat(client)
    assert client.get(f"/chats/{chat['id']}/messages", params=params).status_code == status


# Service


def test_healthz_and_openapi_document_every_route(client: httpx2.Client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    operations = {
        (method.upper(), path): op
        for path, item in spec["paths"].items()
        for method, op in item.items()
    }
    expected = {
        ("POST", "/chats"),
        ("GET", "/chats"),
        ("GET", "/chats/{chat_id}"),
        ("PATCH", "/chats/{chat_id}"),
        ("DELETE", "/chats/{chat_id}"),
        ("POST", "/chats/{chat_id}/messages"),
        ("GET", "/chats/{chat_id}/messages"),
        ("GET", "/chats/{chat_id}/messages/{message_id}"),
        ("GET", "/chats/{chat_id}/messages/{message_id}/stream"),
        ("POST", "/chats/{chat_id}/messages/{message_id}/cancel"),
        ("GET", "/healthz"),
    }
    assert expected <= set(operations)
    assert all(operations[key].get("description") for key in expected)


def test_head_is_get_without_the_body(client: httpx2.Client) -> None:
    chat = make_chat(client)
    _, events = send(client, chat["id"], "hello")
    reply_id = events[-1].message()["id"]
    urls = [
        f"/chats/{chat['id']}",
        "/chats",
        f"/chats/{chat['id']}/messages",
        f"/chats/{chat['id']}/messages/{reply_id}",
        "/healthz",
        "/",
    ]
    for url in urls:
        got, head = client.get(url), client.head(url)
        assert head.status_code == got.status_code == 200, url
        assert head.content == b"" and got.content, url
        assert head.headers["content-type"] == got.headers["content-type"], url
        if url != "/healthz":  # its body holds live numbers
            assert head.headers["content-length"] == got.headers["content-length"], url
    missing = client.head("/chats/chat_doesnotexist0000000000")
    assert missing.status_code == 404 and missing.content == b""
    # A stream's HEAD would follow a live reply to send nothing: it stays not allowed.
    stream = client.head(f"/chats/{chat['id']}/messages/{reply_id}/stream")
    assert stream.status_code == 405
    # And HEAD is only ever a read: it cannot reach a route of another method.
    assert client.head(f"/chats/{chat['id']}/messages/{reply_id}/cancel").status_code == 405


# Crashes


def test_crash_mid_reply_leaves_it_incomplete_with_checkpointed_text(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    service = start_service()
    fake.push(slow(400, 0.01))
    with service.client() as own:
        chat = make_chat(own)
        body = start_reply(own, chat["id"], "go")
        reply_id = body["assistant_message"]["id"]
        url = f"/chats/{chat['id']}/messages/{reply_id}"
        # Wait until a checkpoint has written some text, then die without warning.
        assert wait_until(lambda: len(own.get(url).json()["content"]) > 20, timeout=10)
    service.kill()
    restarted = start_service(db_path=service.db_path)
    with restarted.client() as own:
        message = own.get(url).json()
        assert message["status"] == "incomplete"
        assert message["error"]["code"] == "server_restarted"
        assert message["content"].startswith("w0 w1 ") and len(message["content"]) > 20
        events = follow(own, chat["id"], reply_id)
        assert names(events) == ["message.done"] and events[0].message() == message
        fake.push(text("Back again"))
        _, after = send(own, chat["id"], "still there?")
        assert after[-1].message()["content"] == "Back again"
        assert [m["role"] for m in history(own, chat["id"])] == ["user", "assistant"] * 2


def test_tool_call_round_trip(client: httpx2.Client, fake: FakeOpenAI) -> None:
    chat = make_chat(client)
    fake.push(
        Reply(tool_calls=[ToolCall("calculate", '{"expression": "6*7"}', id="call_1")]),
        text("The answer is 42."),
    )
    _, events = send(client, chat["id"], "what is 6 times 7?")
    assert [n for n in names(events) if n != "message.delta"] == [
        "message.created",
        "message.created",
        "tool.call",
        "tool.result",
        "message.done",
    ]
    assert names(events).index("message.delta") > names(events).index("tool.result")
    call = next(e.message() for e in events if e.name == "tool.call")
    assert call["tool_call"] == {
        "id": "call_1",
        "name": "calculate",
        "arguments": {"expression": "6*7"},
    }
    result = next(e.message() for e in events if e.name == "tool.result")
    assert result["tool_call"]["result"] == 42 and result["tool_call"]["error"] is None
    done = events[-1].message()
    assert done["content"] == "The answer is 42."
    assert done["tool_calls"] == [
        {
            "id": "call_1",
            "name": "calculate",
            "arguments": {"expression": "6*7"},
            "result": 42,
            "error": None,
        }
    ]
    # The second model call saw the call and its result.
    second = fake.requests[-1]["messages"]
    assert second[-2]["tool_calls"][0]["id"] == "call_1"
    assert second[-1] == {"role": "tool", "tool_call_id": "call_1", "content": '{"result": 42}'}
