"""Unit tests of llm.py: tool-call accumulation, prompts and trimming, errors, streaming."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

import llm
from schemas import Message
from tests.fake_openai import FakeOpenAI, Reply, ToolCall, text

STAMP = datetime(2026, 11, 28, tzinfo=UTC)


def delta(
    index: int | None, call_id: str | None = None, name: str | None = None, args: str = ""
) -> Any:
    """A tool-call delta as the SDK gives it."""
    return SimpleNamespace(
        index=index, id=call_id, function=SimpleNamespace(name=name, arguments=args)
    )


def message(role: str, content: str, **fields: Any) -> Message:
    return Message.model_validate(
        {
            "id": f"msg_{role}_{len(content)}",
            "chat_id": "chat_x",
            "role": role,
            "content": content,
            "status": "completed",
            "created_at": STAMP,
            "completed_at": STAMP,
            "model": None,
            "finish_reason": None,
            "usage": None,
            "tool_calls": [],
            "error": None,
        }
        | fields
    )


def test_accumulator_joins_parallel_calls_by_index() -> None:
    calls = llm.ToolCallAccumulator()
    calls.add([delta(0, "call_a", "calculate"), delta(1, "call_b", "get_current_time")])
    calls.add([delta(0, args='{"expr'), delta(1, args='{"timezone": "UTC"}')])
    calls.add([delta(0, args='ession": "1+1"}')])
    assert [(c.id, c.name, c.arguments) for c in calls.finish()] == [
        ("call_a", "calculate", '{"expression": "1+1"}'),
        ("call_b", "get_current_time", '{"timezone": "UTC"}'),
    ]


def test_accumulator_copes_without_index() -> None:
    calls = llm.ToolCallAccumulator()
    calls.add([delta(None, "call_a", "calculate")])
    calls.add([delta(None, args='{"expression": ')])
    calls.add([delta(None, args='"2"}')])
    calls.add([delta(None, "call_b", "calculate", '{"expression": "3"}')])
    assert [(c.id, c.arguments) for c in calls.finish()] == [
        ("call_a", '{"expression": "2"}'),
        ("call_b", '{"expression": "3"}'),
    ]


def test_accumulator_ignores_a_name_repeated_on_every_fragment() -> None:
    calls = llm.ToolCallAccumulator()
    calls.add([delta(0, "call_a", "calculate", '{"expression": ')])
    calls.add([delta(0, "call_a", "calculate", '"1"}')])
    assert [(c.name, c.arguments) for c in calls.finish()] == [("calculate", '{"expression": "1"}')]


def test_system_message_uses_the_chats_prompt_else_the_servers() -> None:
    own = llm.system_message("Be a pirate.", "Server persona.", tools=True)
    assert own.startswith("Be a pirate.") and "Server persona." not in own
    assert "calculate" in own and "Markdown" in own
    server = llm.system_message(None, "Server persona.", tools=False)
    assert server.startswith("Server persona.") and "calculate" not in server
    assert llm.system_message(None, None, tools=False).startswith(llm.DEFAULT_SYSTEM_PROMPT)


def test_build_prompt_keeps_everything_that_fits() -> None:
    history = [message("user", "q1"), message("assistant", "a1"), message("user", "q2")]
    prompt = llm.build_prompt(
        chat_prompt=None, default_prompt=None, history=history, max_context_tokens=10_000
    )
    assert [(m["role"], m.get("content")) for m in prompt[1:]] == [
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
    ]
    assert "not shown" not in str(prompt[0]["content"])


def test_build_prompt_drops_the_oldest_whole_turns_and_says_so() -> None:
    history = []
    for i in range(50):
        history += [message("user", f"question {i} " + "x" * 400), message("assistant", "y" * 400)]
    history.append(message("user", "the new question"))
    prompt = llm.build_prompt(
        chat_prompt="P",
        default_prompt=None,
        history=history,
        max_context_tokens=3000,
        reserve_tokens=100,
    )
    assert prompt[-1] == {"role": "user", "content": "the new question"}
    assert prompt[1]["role"] == "user"  # a kept turn starts with its question
    kept = len(prompt) - 1
    assert 1 < kept < len(history)
    assert f"The {len(history) - kept} oldest messages" in str(prompt[0]["content"])
    assert "search_chat_history" in str(prompt[0]["content"])
    total = sum(llm.estimate_tokens(str(m)) for m in prompt)
    assert total <= 3000


def test_build_prompt_counts_the_messages_left_out_before_the_history() -> None:
    short = [message("user", "q1"), message("assistant", "a1"), message("user", "q2")]
    prompt = llm.build_prompt(
        chat_prompt=None,
        default_prompt=None,
        history=short,
        max_context_tokens=10_000,
        left_out=40,
    )
    assert len(prompt) == 4
    assert "The 40 oldest messages of this chat are not shown" in str(prompt[0]["content"])
    history = []
    for i in range(50):
        history += [message("user", f"question {i} " + "x" * 400), message("assistant", "y" * 400)]
    history.append(message("user", "the new question"))
    prompt = llm.build_prompt(
        chat_prompt=None,
        default_prompt=None,
        history=history,
        max_context_tokens=3000,
        reserve_tokens=100,
        left_out=1234,
    )
    kept = len(prompt) - 1
    assert 1 < kept < len(history)
    assert f"The {1234 + len(history) - kept} oldest messages" in str(prompt[0]["content"])


def test_build_prompt_counts_messages_of_the_chat_not_the_prompt_messages_they_replay_as() -> None:
    call = {"id": "c1", "name": "calculate", "arguments": {"expression": "6*7"}, "result": 42}
    history = [
        message("user", "old question " + "x" * 6000),
        # One message of the chat, three of the prompt (text, tool call, tool result, text).
        message("assistant", "Let me check. It is 42.", tool_calls=[call | {"text_offset": 14}]),
        message("user", "another old question " + "x" * 6000),
        message("assistant", ""),  # failed before writing anything: never replayed
        message("user", "the new question"),
    ]
    prompt = llm.build_prompt(
        chat_prompt=None,
        default_prompt=None,
        history=history,
        max_context_tokens=1500,
        reserve_tokens=100,
    )
    assert prompt[1:] == [{"role": "user", "content": "the new question"}]
    assert "The 4 oldest messages" in str(prompt[0]["content"])


def test_build_prompt_always_keeps_the_new_message_even_if_huge() -> None:
    history = [message("user", "old"), message("assistant", "old"), message("user", "z" * 50_000)]
    prompt = llm.build_prompt(
        chat_prompt=None,
        default_prompt=None,
        history=history,
        max_context_tokens=1000,
        reserve_tokens=10,
    )
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert prompt[-1]["content"] == "z" * 50_000


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("", id="empty"),
        pytest.param("plain words", id="ascii"),
        pytest.param('"quoted" \\ back\\slashes / and \t tabs\n', id="escaped"),
        pytest.param("\x00\x01\x1f\x7f" * 200, id="control characters"),
        pytest.param("é漢字🙂" * 100 + "\u2028\u2029", id="non-ascii"),
    ],
)
def test_the_quick_bound_of_a_messages_tokens_is_never_below_its_count(content: str) -> None:
    # build_prompt keeps a whole history on the bound alone: it must never undercount.
    call = {"id": "c1", "name": "search", "arguments": {"query": content}, "result": content}
    messages = [
        *llm.replay(message("user", content)),
        *llm.replay(message("assistant", content)),
        *llm.replay(message("assistant", content, tool_calls=[call])),
    ]
    for m in messages:
        assert llm._message_tokens_at_most(m) >= llm._message_tokens(m)


def test_build_prompt_keeps_a_history_that_fits_only_by_its_exact_count() -> None:
    # The quick bound counts every character as six (its JSON escape at worst), so it says no;
    # the exact count fits, and everything is kept, as when the bound says yes.
    history = [message("user", "q" * 3000), message("assistant", "a" * 3000), message("user", "q2")]
    exact = sum(llm._message_tokens(m) for h in history for m in llm.replay(h))
    bound = sum(llm._message_tokens_at_most(m) for h in history for m in llm.replay(h))
    assert bound > exact + 2000
    prompt = llm.build_prompt(
        chat_prompt=None,
        default_prompt=None,
        history=history,
        max_context_tokens=exact + 1500,
        reserve_tokens=0,
    )
    assert [m.get("content") for m in prompt[1:]] == ["q" * 3000, "a" * 3000, "q2"]


def replayed(reply: Message) -> list[dict[str, Any]]:
    return [dict(m) for m in llm.replay(reply)]


def test_replay_puts_tool_rounds_where_the_model_wrote_them() -> None:
    call = {"id": "c1", "name": "calculate", "arguments": {"expression": "6*7"}, "result": 42}
    reply = message("assistant", "Let me see. The answer is 42.", tool_calls=[call])
    reply.tool_calls[0].text_offset = len("Let me see.")
    out = replayed(reply)
    assert out[0]["role"] == "assistant" and out[0]["content"] == "Let me see."
    assert out[0]["tool_calls"][0]["function"] == {
        "name": "calculate",
        "arguments": '{"expression": "6*7"}',
    }
    assert out[1] == {"role": "tool", "tool_call_id": "c1", "content": '{"result": 42}'}
    assert out[2] == {"role": "assistant", "content": " The answer is 42."}


def test_replay_of_a_failed_call_tells_the_model_the_error() -> None:
    calls = [{"id": "c1", "name": "nope", "arguments": "{bad", "result": None, "error": "bad"}]
    out = replayed(message("assistant", "", tool_calls=calls))
    assert out[0]["tool_calls"][0]["function"]["arguments"] == "{bad"
    assert out[1]["content"] == '{"error": "bad"}'
    assert len(out) == 2


@pytest.mark.parametrize(
    ("raw", "title"),
    [
        pytest.param('"Trip to Lisbon"', "Trip to Lisbon", id="quotes"),
        pytest.param("Title: Budget plan.\nmore", "Budget plan", id="prefix-and-lines"),
        pytest.param("**Bold**", "Bold", id="markdown"),
        pytest.param("   \n ", None, id="blank"),
        pytest.param("x" * 200, "x" * 79 + "…", id="too-long"),
    ],
)
def test_clean_title(raw: str, title: str | None) -> None:
    assert llm.clean_title(raw) == title


def stream(fake: FakeOpenAI, reply: Reply, **kwargs: Any) -> list[llm.TextDelta | llm.TurnEnd]:
    async def main() -> list[llm.TextDelta | llm.TurnEnd]:
        fake.push(reply)
        client = llm.make_client(
            api_key="sk-secret-key-123456", base_url=fake.base_url, timeout=5, max_retries=0
        )
        try:
            return [
                e
                async for e in llm.stream_turn(
                    client, model="m", messages=[{"role": "user", "content": "hi"}], **kwargs
                )
            ]
        finally:
            await client.close()

    return anyio.run(main)


def test_stream_turn_yields_text_then_the_end_with_usage(fake: FakeOpenAI) -> None:
    events = stream(fake, text("Hello there", pieces=2))
    assert "".join(e.text for e in events if isinstance(e, llm.TextDelta)) == "Hello there"
    end = events[-1]
    assert isinstance(end, llm.TurnEnd) and end.finish_reason == "stop" and end.usage is not None
    assert fake.requests[-1]["stream_options"] == {"include_usage": True}


def test_stream_turn_accumulates_tool_calls(fake: FakeOpenAI) -> None:
    reply = Reply(
        tool_calls=[
            ToolCall("calculate", '{"expression": "2**10"}', id="call_1"),
            ToolCall("get_current_time", '{"timezone": "Asia/Tokyo"}', id="call_2"),
        ],
        fragment_size=3,
    )
    end = stream(fake, reply, tools=[{"type": "function", "function": {"name": "calculate"}}])[-1]
    assert isinstance(end, llm.TurnEnd) and end.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments) for c in end.tool_calls] == [
        ("call_1", "calculate", '{"expression": "2**10"}'),
        ("call_2", "get_current_time", '{"timezone": "Asia/Tokyo"}'),
    ]
    assert fake.requests[-1]["tools"] == [{"type": "function", "function": {"name": "calculate"}}]


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        pytest.param(Reply(status=429), "rate_limited", id="429"),
        pytest.param(Reply(status=401), "auth_failed", id="401"),
        pytest.param(Reply(status=500), "provider_error", id="500"),
        pytest.param(Reply(chunks=["a"], cut=True), "stream_interrupted", id="cut"),
        pytest.param(Reply(chunks=["a", "b"], error_after=1), "provider_error", id="error-payload"),
        pytest.param(Reply(chunks=["a", "b"], stall_after=1), "timeout", id="stall"),
    ],
)
def test_stream_turn_raises_our_error_with_a_stable_code(
    fake: FakeOpenAI, reply: Reply, code: str
) -> None:
    with pytest.raises(llm.LLMError) as raised:
        stream(fake, reply, idle_timeout=0.5)
    assert raised.value.code == code
    assert "sk-secret-key-123456" not in raised.value.message


def test_stream_turn_sends_max_tokens_only_when_set(fake: FakeOpenAI) -> None:
    stream(fake, text("a"))
    assert "max_tokens" not in fake.requests[-1]
    stream(fake, text("a"), max_tokens=50)
    assert fake.requests[-1]["max_tokens"] == 50


def test_cli_without_configuration_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    from settings import get_settings

    get_settings.cache_clear()
    assert llm.main(["hello"]) == 2
    assert "OPENAI_API_KEY" in capsys.readouterr().err
    get_settings.cache_clear()


def test_cli_streams_an_answer_from_a_compatible_server(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
    monkeypatch.setenv("OPENAI_MAX_RETRIES", "0")
    from settings import get_settings

    get_settings.cache_clear()
    fake.push(text("I am a fake model.", pieces=4))
    assert llm.main(["hey who are you?"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "I am a fake model."
    assert "[stop" in captured.err
    assert fake.requests[-1]["messages"][-1] == {"role": "user", "content": "hey who are you?"}
    get_settings.cache_clear()
