"""Tests of the fake OpenAI server, driven through the real `openai` SDK over loopback."""

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import openai
import pytest
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
)

from tests.fake_openai import FakeOpenAI, Reply, ToolCall, text

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    """A fake of this module's own, so that no other module's open streams touch its counters."""
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeOpenAI) -> FakeOpenAI:
    """This module's fake, reset for this test (replaces the session-wide `fake` fixture)."""
    server.reset()
    return server


@pytest.fixture
async def sdk(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    """An SDK client pointed at the fake, without retries; closed afterwards."""
    # A short time-out turns a test that waits forever into a failure.
    async with openai.AsyncOpenAI(
        base_url=fake.base_url, api_key="test", max_retries=0, timeout=5
    ) as c:
        yield c


async def collect(
    sdk: openai.AsyncOpenAI, messages: list[ChatCompletionMessageParam] = USER, **kwargs: Any
) -> list[ChatCompletionChunk]:
    """Stream one completion and return all its chunks."""
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=messages, stream=True, **kwargs
    )
    return [chunk async for chunk in stream]


def content(chunks: list[ChatCompletionChunk]) -> list[str]:
    """The text pieces of a stream, in order, without the empty role chunk."""
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def finish_reasons(chunks: list[ChatCompletionChunk]) -> list[str]:
    """Every finish_reason a stream carried."""
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


@pytest.mark.parametrize(
    ("s", "pieces", "expected"),
    [
        pytest.param("one two three four", 2, ["one two", " three four"], id="words"),
        pytest.param(
            "Hello from the fake model.", 3, ["Hello from", " the fake", " model."], id="3"
        ),
        pytest.param("abcdef", 3, ["ab", "cd", "ef"], id="one-word"),
        pytest.param("  a b  ", 2, ["  a", " b  "], id="outer-spaces"),
        pytest.param("", 3, [], id="empty"),
    ],
)
def test_text_splits_into_pieces_that_join_back(s: str, pieces: int, expected: list[str]) -> None:
    reply = text(s, pieces)
    assert reply.chunks == expected
    assert "".join(reply.chunks) == s


@pytest.mark.anyio
async def test_text_streams_in_order_then_usage(fake: FakeOpenAI, sdk: openai.AsyncOpenAI) -> None:
    fake.push(text("one two three four", pieces=4))
    chunks = await collect(sdk, stream_options={"include_usage": True})
    first = chunks[0].choices[0].delta
    assert (first.role, first.content) == ("assistant", "")
    assert content(chunks) == ["one", " two", " three", " four"]
    assert finish_reasons(chunks) == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 4
    assert {c.model for c in chunks} == {"gpt-4o-mini"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert fake.requests[0]["messages"] == USER


@pytest.mark.anyio
async def test_usage_is_sent_only_when_asked_and_can_be_set(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(Reply(chunks=["hi"]), Reply(chunks=["hi"], usage=(11, 7)))
    assert all(c.usage is None for c in await collect(sdk))
    chunks = await collect(sdk, stream_options={"include_usage": True})
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == {
        "prompt_tokens": 11,
        "completion_tokens": 7,
    }


@pytest.mark.anyio
async def test_tool_call_streams_header_then_argument_fragments(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    arguments = '{"expression": "12345*6789"}'
    fake.push(Reply(chunks=["Let me work it out."], tool_calls=[ToolCall("calculate", arguments)]))
    chunks = await collect(sdk)
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    header, fragments = calls[0], calls[1:]
    assert header.index == 0
    assert header.type == "function"
    assert header.id is not None and header.id.startswith("call_")
    assert header.function is not None
    assert (header.function.name, header.function.arguments) == ("calculate", "")
    assert len(fragments) == 4  # 28 characters in fragments of 7
    assert all(f.id is None and f.function and f.function.name is None for f in fragments)
    assert "".join(f.function.arguments or "" for f in fragments if f.function) == arguments
    assert content(chunks) == ["Let me work it out."]
    assert finish_reasons(chunks) == ["tool_calls"]


@pytest.mark.anyio
async def test_parallel_tool_calls_each_have_their_own_index(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(
        Reply(
            tool_calls=[
                ToolCall("calculate", '{"expression": "2+2"}', id="call_first"),
                ToolCall("now", "{}"),
                ToolCall("calculate", "{not json"),
            ],
            fragment_size=3,
        )
    )
    chunks = await collect(sdk)
    by_index: dict[int, list[str]] = {}
    ids: dict[int, str] = {}
    for c in chunks:
        for tc in c.choices[0].delta.tool_calls or [] if c.choices else []:
            assert tc.function is not None
            by_index.setdefault(tc.index, []).append(tc.function.arguments or "")
            if tc.id is not None:
                ids[tc.index] = tc.id
    assert {i: "".join(parts) for i, parts in by_index.items()} == {
        0: '{"expression": "2+2"}',
        1: "{}",
        2: "{not json",
    }
    assert ids[0] == "call_first"
    assert ids[1].startswith("call_") and ids[1] != ids[2]


@pytest.mark.anyio
async def test_omit_index_leaves_index_out_of_tool_call_deltas(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(Reply(tool_calls=[ToolCall("now", "{}")], omit_index=True))
    chunks = await collect(sdk)
    deltas = [
        tc.to_dict() for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []
    ]
    assert len(deltas) == 2
    assert all("index" not in d for d in deltas)
    assert deltas[0]["function"] == {"name": "now", "arguments": ""}


@pytest.mark.anyio
async def test_finish_reason_can_be_length(fake: FakeOpenAI, sdk: openai.AsyncOpenAI) -> None:
    fake.push(Reply(chunks=["Once upon"], finish_reason="length"))
    assert finish_reasons(await collect(sdk)) == ["length"]


@pytest.mark.anyio
async def test_cut_stream_just_ends_without_finish_reason(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(Reply(chunks=["a", "b"], cut=True))
    chunks = await collect(sdk, stream_options={"include_usage": True})
    assert content(chunks) == ["a", "b"]
    assert finish_reasons(chunks) == []
    assert all(c.usage is None for c in chunks)
    assert fake.disconnects == 0


@pytest.mark.anyio
async def test_429_with_retry_after_raises_rate_limit_error(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(Reply(status=429, headers={"Retry-After": "1"}))
    with pytest.raises(openai.RateLimitError) as caught:
        await collect(sdk)
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.response.headers["content-type"] == "application/json"
    assert "Rate limit reached for gpt-4o-mini" in caught.value.message


@pytest.mark.anyio
async def test_500_raises_internal_server_error(fake: FakeOpenAI, sdk: openai.AsyncOpenAI) -> None:
    fake.push(Reply(status=500))
    with pytest.raises(openai.InternalServerError) as caught:
        await collect(sdk)
    assert caught.value.type == "server_error"


@pytest.mark.anyio
async def test_error_after_raises_api_error_mid_stream(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(Reply(chunks=["a", "b", "c"], error_after=2))
    seen: list[str] = []
    stream = await sdk.chat.completions.create(model="m", messages=USER, stream=True)
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert not isinstance(caught.value, openai.APIStatusError)
    assert seen == ["", "a", "b"]


@pytest.mark.anyio
async def test_hang_times_out_the_client_and_counts_a_disconnect(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(Reply(hang=True))
    started = time.perf_counter()
    with pytest.raises(openai.APITimeoutError):
        await collect(sdk.with_options(timeout=0.3))
    assert time.perf_counter() - started < 2
    assert fake.wait_for_disconnect(1, timeout=2)
    assert fake.disconnects == 1


@pytest.mark.anyio
async def test_stall_then_client_close_counts_a_disconnect(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(Reply(chunks=["a", "b", "c"], stall_after=1))
    stream = await sdk.chat.completions.create(model="m", messages=USER, stream=True)
    seen: list[str] = []
    with anyio.fail_after(2):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
            if len(seen) == 2:
                break
    # Had the fake sent the rest, closing now would end a finished response: no disconnect.
    await anyio.sleep(0.2)
    assert fake.disconnects == 0
    await stream.close()
    assert seen == ["", "a"]
    assert fake.wait_for_disconnect(1, timeout=2)


@pytest.mark.anyio
async def test_slow_text_is_slow_and_leaving_counts_a_disconnect(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(Reply(chunks=["a", "b", "c"], delay=0.15), Reply(chunks=list("abcdefghij"), delay=1))
    started = time.perf_counter()
    assert content(await collect(sdk)) == ["a", "b", "c"]
    assert 0.3 <= time.perf_counter() - started < 1.5
    stream = await sdk.chat.completions.create(model="m", messages=USER, stream=True)
    async for chunk in stream:
        if chunk.choices[0].delta.content == "a":
            break
    await stream.close()
    assert fake.wait_for_disconnect(1, timeout=2)


@pytest.mark.anyio
async def test_a_finished_stream_is_not_a_disconnect(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.default = Reply(chunks=["tok "] * 500)
    for _ in range(3):
        assert len(content(await collect(sdk))) == 500
    assert fake.wait_for_requests(3)
    assert not fake.wait_for_disconnect(1, timeout=0.2)


@pytest.mark.anyio
async def test_non_streaming_completion_has_text_tools_and_usage(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(text("A short title"), Reply(tool_calls=[ToolCall("now", "{}", id="call_1")]))
    completion = await sdk.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "A short title"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    completion = await sdk.chat.completions.create(model="gpt-4o-mini", messages=USER)
    message = completion.choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    calls = [c for c in message.tool_calls if isinstance(c, ChatCompletionMessageFunctionToolCall)]
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_1", "now", "{}")
    ]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert "stream" not in fake.requests[0]


@pytest.mark.anyio
async def test_when_rules_beat_the_queue_and_stay(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(text("queued", pieces=1))
    fake.when("weather", text("sunny", pieces=1))
    weather: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": "Let me see."},
        {"role": "user", "content": [{"type": "text", "text": "The weather in Oslo?"}]},
    ]
    for _ in range(2):
        assert content(await collect(sdk, messages=weather)) == ["sunny"]
    assert content(await collect(sdk)) == ["queued"]
    assert content(await collect(sdk)) == ["Hello from", " the fake", " model."]


@pytest.mark.anyio
async def test_rules_only_look_at_the_last_user_message(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.when("weather", text("sunny", pieces=1))
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
    ]
    assert content(await collect(sdk, messages=messages)) == [
        "Hello from",
        " the fake",
        " model.",
    ]


@pytest.mark.anyio
async def test_reset_forgets_queue_rules_requests_and_default(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.push(text("queued", pieces=1))
    fake.when("Say", text("rule"))
    fake.default = text("changed")
    await collect(sdk)
    assert len(fake.requests) == 1
    fake.reset()
    assert fake.requests == []
    assert fake.disconnects == 0
    assert "".join(content(await collect(sdk))) == "Hello from the fake model."
    assert "".join(content(await collect(sdk))) == "Hello from the fake model."


@pytest.mark.anyio
async def test_reset_stops_counting_responses_begun_before_it(
    fake: FakeOpenAI, sdk: openai.AsyncOpenAI
) -> None:
    fake.default = Reply(chunks=["a", "b"], stall_after=1)
    old = await sdk.chat.completions.create(model="m", messages=USER, stream=True)
    assert (await old.__anext__()).choices[0].delta.role == "assistant"
    fake.reset()
    fake.default = Reply(chunks=["a", "b"], stall_after=1)
    new = await sdk.chat.completions.create(model="m", messages=USER, stream=True)
    assert (await new.__anext__()).choices[0].delta.role == "assistant"
    await old.close()
    await new.close()
    assert fake.wait_for_disconnect(1, timeout=2)
    assert not fake.wait_for_disconnect(2, timeout=0.2)


@pytest.mark.anyio
async def test_models_lists_the_models_seen(fake: FakeOpenAI, sdk: openai.AsyncOpenAI) -> None:
    await collect(sdk)
    page = await sdk.models.list()
    assert [m.id for m in page.data] == ["gpt-4o-mini"]


def test_body_that_is_not_json_is_400(fake: FakeOpenAI) -> None:
    response = httpx2.post(
        f"{fake.base_url}/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert "parse the JSON body" in response.json()["error"]["message"]
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert fake.requests == []


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_body_not_labelled_json_is_400(fake: FakeOpenAI, content_type: str | None) -> None:
    # So a client of ours that sends its own encoded body must still label it.
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    headers = {"content-type": content_type} if content_type else {}
    response = httpx2.post(f"{fake.base_url}/chat/completions", content=body, headers=headers)
    assert response.status_code == 400
    assert "Content-Type is not JSON" in response.json()["error"]["message"]
    assert fake.requests == []
    labelled = httpx2.post(
        f"{fake.base_url}/chat/completions",
        content=body,
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert labelled.status_code == 200


def test_wait_for_requests_times_out_without_requests(fake: FakeOpenAI) -> None:
    started = time.perf_counter()
    assert not fake.wait_for_requests(1, timeout=0.1)
    assert time.perf_counter() - started >= 0.1


@pytest.mark.anyio
async def test_stop_wakes_hung_and_stalled_responses() -> None:
    fake = FakeOpenAI()
    fake.push(Reply(chunks=["a", "b"], stall_after=1), Reply(hang=True))
    with fake:
        await stop_with_open_responses(fake)


async def stop_with_open_responses(fake: FakeOpenAI) -> None:
    """Open a stalled stream and a hung request, stop the fake, and check both ended."""
    async with openai.AsyncOpenAI(
        base_url=fake.base_url, api_key="t", max_retries=0, timeout=5
    ) as sdk:
        stalled = await sdk.chat.completions.create(model="m", messages=USER, stream=True)
        async with anyio.create_task_group() as tg:
            hung_error: list[BaseException] = []

            async def hung() -> None:
                try:
                    await collect(sdk)
                except openai.APIError as exc:
                    hung_error.append(exc)

            tg.start_soon(hung)
            await anyio.to_thread.run_sync(fake.wait_for_requests, 2)
            started = time.perf_counter()
            # Blocking this loop is fine: the fake serves from its own thread.
            fake.stop()
            assert time.perf_counter() - started < 1.5
        with anyio.fail_after(2):
            rest = [c async for c in stalled]
    assert content(rest) == ["a"]
    assert isinstance(hung_error[0], openai.InternalServerError)
    assert hung_error[0].status_code == 503


def test_cli_serves_its_default_reply_and_prints_the_base_url() -> None:
    script = Path(__file__).with_name("fake_openai.py")
    args = [sys.executable, str(script), "--port", "0", "--chunks", "5", "--chunk-text", "x"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            base_url = process.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
            body = {"model": "m", "messages": USER, "stream": True}
            response = httpx2.post(f"{base_url}/chat/completions", json=body)
            events = [line for line in response.text.split("\n\n") if line]
            assert events[-1] == "data: [DONE]"
            pieces = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-1]]
            assert pieces == ["", "x", "x", "x", "x", "x", None]
        finally:
            process.terminate()
            assert process.wait(timeout=5) == 0
