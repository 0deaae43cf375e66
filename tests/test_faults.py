"""End-to-end tests of the model's provider failing: what test_api.py's failure table leaves
out (retries before the first token only, Retry-After, a provider that goes away and comes
back, the length limit inside a tool call), each ending with one clear `message.done`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest

from tests.conftest import service_env
from tests.fake_openai import FakeOpenAI, Reply, ToolCall, text
from tests.support import Event, Service, make_chat, send

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def retrying_service(
    fake_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One service whose SDK retries twice, as in production (the shared one never retries)."""
    path = tmp_path_factory.mktemp("retrying") / "chat.db"
    with Service(path, service_env(fake_server, OPENAI_MAX_RETRIES="2")) as service:
        yield service


@pytest.fixture
def retrying(retrying_service: Service, fake: FakeOpenAI) -> Iterator[httpx2.Client]:
    """A client of the retrying service (and a reset fake behind it)."""
    with retrying_service.client() as retrying:
        yield retrying


def the_done(events: list[Event]) -> dict[str, Any]:
    """The reply's one `message.done`, which must be its last event."""
    assert [e.name for e in events].count("message.done") == 1
    assert events[-1].name == "message.done"
    return events[-1].message()


def delta_text(events: list[Event]) -> str:
    return "".join(e.message()["delta"] for e in events if e.name == "message.delta")


def stored(client: httpx2.Client, chat_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/chats/{chat_id}/messages")
    assert response.status_code == 200
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def assert_chat_still_works(client: httpx2.Client, fake: FakeOpenAI, chat_id: str) -> None:
    """The service is healthy and the next message in the chat gets a full reply."""
    assert client.get("/healthz").status_code == 200
    fake.push(text("Recovered fine"))
    _, events = send(client, chat_id, "again")
    done = the_done(events)
    assert done["status"] == "completed" and done["content"] == "Recovered fine"


@pytest.mark.parametrize(
    ("first", "requests"),
    [
        pytest.param(Reply(status=500), 2, id="500"),
        pytest.param(Reply(status=503), 2, id="503"),
        # The SDK honours Retry-After; a short one keeps the test fast.
        pytest.param(Reply(status=429, headers={"Retry-After": "0.2"}), 2, id="429-retry-after"),
        pytest.param(Reply(status=502), 2, id="502"),
    ],
)
def test_errors_before_the_first_token_are_retried_and_the_reply_completes(
    retrying: httpx2.Client, fake: FakeOpenAI, first: Reply, requests: int
) -> None:
    fake.push(first, text("Second time lucky"))
    chat = make_chat(retrying)
    _, events = send(retrying, chat["id"], "go")
    done = the_done(events)
    assert done["status"] == "completed" and done["error"] is None
    assert done["content"] == "Second time lucky" == delta_text(events)
    assert len(fake.requests) == requests
    # The retry is the same request again: same messages, so nothing was lost or doubled.
    assert fake.requests[0]["messages"] == fake.requests[1]["messages"]
    assert stored(retrying, chat["id"])[-1] == done


def test_retries_stop_after_the_configured_number(
    retrying: httpx2.Client, fake: FakeOpenAI
) -> None:
    fake.push(*[Reply(status=500, headers={"Retry-After": "0.1"})] * 3)
    chat = make_chat(retrying)
    _, events = send(retrying, chat["id"], "go")
    done = the_done(events)
    assert done["status"] == "failed" and done["error"]["code"] == "provider_error"
    assert len(fake.requests) == 3  # the first try and two retries
    assert_chat_still_works(retrying, fake, chat["id"])


def test_retry_after_from_a_429_is_honoured(retrying: httpx2.Client, fake: FakeOpenAI) -> None:
    # Longer than the stream's idle timeout (2 s in tests): waiting as the provider asked is
    # not a stalled stream, and must not end the reply as a timeout.
    fake.push(Reply(status=429, headers={"Retry-After": "2.5"}), text("After waiting"))
    chat = make_chat(retrying)
    started = time.monotonic()
    _, events = send(retrying, chat["id"], "go")
    waited = time.monotonic() - started
    assert the_done(events)["content"] == "After waiting"
    assert len(fake.requests) == 2
    # Not a speed check: the retry must not come before the provider said it may.
    assert waited >= 2.5


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        pytest.param(Reply(chunks=["one ", "two ", "three"], stall_after=2), "timeout", id="stall"),
        pytest.param(
            Reply(chunks=["one ", "two ", "three"], cut=True), "stream_interrupted", id="cut"
        ),
        pytest.param(
            Reply(chunks=["one ", "two ", "three"], error_after=2),
            "provider_error",
            id="error-mid-stream",
        ),
    ],
)
def test_failures_after_text_was_sent_are_never_retried(
    retrying: httpx2.Client, fake: FakeOpenAI, reply: Reply, code: str
) -> None:
    fake.push(reply)
    fake.default = text("a retry would have produced this")
    chat = make_chat(retrying)
    _, events = send(retrying, chat["id"], "go")
    done = the_done(events)
    assert done["status"] == "failed" and done["error"]["code"] == code
    # Exactly one request: a retry would have repeated text the client already has.
    assert len(fake.requests) == 1
    assert done["content"] == delta_text(events) and done["content"].startswith("one two ")
    assert "retry" not in done["content"]
    assert stored(retrying, chat["id"])[-1] == done
    assert_chat_still_works(retrying, fake, chat["id"])


def test_a_provider_that_goes_away_and_comes_back(
    retrying: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(retrying)
    fake.stop()
    try:
        _, events = send(retrying, chat["id"], "anyone there?")
    finally:
        fake.start()  # same port again, so the service's base URL is still right
    done = the_done(events)
    assert done["status"] == "failed" and done["error"]["code"] == "connection_error"
    assert done["content"] == ""
    assert stored(retrying, chat["id"])[-1] == done
    assert_chat_still_works(retrying, fake, chat["id"])


def test_the_length_limit_in_the_middle_of_a_tool_call(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client)
    fake.push(
        Reply(
            chunks=["Let me work ", "that out. "],
            tool_calls=[ToolCall("calculate", '{"expression": "12*', id="call_cut")],
            finish_reason="length",
        ),
        text("It is 144."),
    )
    _, events = send(client, chat["id"], "what is 12 squared?")
    done = the_done(events)
    # The cut call is reported, never run, and the model was told so in one more round.
    results = [e.message()["tool_call"] for e in events if e.name == "tool.result"]
    assert [r["id"] for r in results] == ["call_cut"]
    assert results[0]["result"] is None and "length" in results[0]["error"]
    assert len(fake.requests) == 2
    told = fake.requests[1]["messages"][-1]
    assert told["role"] == "tool" and told["tool_call_id"] == "call_cut"
    assert "length" in told["content"]
    assert done["status"] == "completed"
    assert done["content"] == "Let me work that out. It is 144." == delta_text(events)
    assert done["tool_calls"][0]["error"] == results[0]["error"]
    assert stored(client, chat["id"])[-1] == done
    assert_chat_still_works(client, fake, chat["id"])


def test_half_an_emoji_from_the_model_fails_the_reply_and_keeps_the_text_before_it(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    # JSON can spell a lone UTF-16 surrogate ("\\ud83d"); it is not text, SQLite and UTF-8 cannot
    # hold it, so the reply ends there with a provider error rather than a broken stream.
    fake.push(Reply(chunks=["Half an emoji: ", "\ud83d", " and the rest"]))
    chat = make_chat(client)
    _, events = send(client, chat["id"], "go")
    done = the_done(events)
    assert done["status"] == "failed" and done["error"]["code"] == "provider_error"
    assert delta_text(events) == done["content"] == "Half an emoji: "
    assert stored(client, chat["id"])[-1] == done
    assert_chat_still_works(client, fake, chat["id"])
