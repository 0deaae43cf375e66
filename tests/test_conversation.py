"""End-to-end tests of what the model sees and does: tools, titles, prompts and long chats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import pytest

from db import Database
from tests.conftest import ServiceFactory
from tests.fake_openai import FakeOpenAI, Reply, ToolCall, text
from tests.support import Event, fill_chat, make_chat, question, send

pytestmark = pytest.mark.e2e


def named(events: list[Event], name: str) -> list[dict[str, Any]]:
    return [e.message() for e in events if e.name == name]


def test_parallel_calls_with_a_bad_one_run_the_good_and_report_the_bad(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client)
    fake.push(
        Reply(
            tool_calls=[
                ToolCall("calculate", '{"expression": "2**10"}', id="call_ok"),
                ToolCall("calculate", '{"expression": "__import__(\'os\')"}', id="call_evil"),
                ToolCall("calculate", '{"expression": ', id="call_broken"),
                ToolCall("launch_rockets", "{}", id="call_unknown"),
            ],
            fragment_size=4,
        ),
        text("2 to the 10th is 1024."),
    )
    _, events = send(client, chat["id"], "compute things")
    results = {r["tool_call"]["id"]: r["tool_call"] for r in named(events, "tool.result")}
    assert results["call_ok"]["result"] == 1024 and results["call_ok"]["error"] is None
    assert results["call_evil"]["result"] is None and results["call_evil"]["error"]
    assert "JSON" in results["call_broken"]["error"]
    assert results["call_broken"]["arguments"] == '{"expression": '
    assert "unknown tool" in results["call_unknown"]["error"]
    calls = named(events, "tool.call")
    assert [c["tool_call"]["id"] for c in calls] == list(results)
    assert calls[2]["tool_call"]["arguments"] == '{"expression": '
    done = events[-1].message()
    assert done["status"] == "completed" and done["content"] == "2 to the 10th is 1024."
    assert [c["id"] for c in done["tool_calls"]] == list(results)
    # The model was told each outcome, errors included, in a tool message per call.
    tool_messages = [m for m in fake.requests[-1]["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == list(results)
    assert json.loads(tool_messages[0]["content"]) == {"result": 1024}
    assert "error" in json.loads(tool_messages[1]["content"])


def test_tools_are_offered_with_strict_schemas(client: httpx2.Client, fake: FakeOpenAI) -> None:
    chat = make_chat(client)
    send(client, chat["id"], "hi")
    offered = {t["function"]["name"]: t["function"] for t in fake.requests[-1]["tools"]}
    assert set(offered) == {
        "calculate",
        "get_current_time",
        "search_chat_history",
        "set_chat_title",
    }
    assert all(f["strict"] is True for f in offered.values())
    assert offered["calculate"]["parameters"]["additionalProperties"] is False
    assert "calculate" in fake.requests[-1]["messages"][0]["content"]


def test_a_later_turn_replays_the_tool_round_to_the_model(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client)
    fake.push(
        Reply(
            chunks=["Let me check. "],
            tool_calls=[ToolCall("calculate", '{"expression": "6*7"}', id="call_1")],
        ),
        text("It is 42."),
        text("You're welcome."),
    )
    send(client, chat["id"], "6 times 7?")
    send(client, chat["id"], "thanks")
    replay = fake.requests[-1]["messages"][1:]
    assert [m["role"] for m in replay] == ["user", "assistant", "tool", "assistant", "user"]
    assert replay[1]["content"] == "Let me check. "
    assert replay[1]["tool_calls"][0]["function"] == {
        "name": "calculate",
        "arguments": '{"expression": "6*7"}',
    }
    assert replay[2] == {"role": "tool", "tool_call_id": "call_1", "content": '{"result": 42}'}
    assert replay[3]["content"] == "It is 42."


def test_a_tool_call_cut_by_the_length_limit_is_not_run(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client)
    fake.push(
        Reply(
            tool_calls=[ToolCall("set_chat_title", '{"title": "Half', id="call_cut")],
            finish_reason="length",
        ),
        text("Sorry, let me answer in text."),
    )
    _, events = send(client, chat["id"], "name this chat")
    result = named(events, "tool.result")[0]["tool_call"]
    assert result["error"] and "length" in result["error"]
    assert named(events, "chat.updated") == []
    assert client.get(f"/chats/{chat['id']}").json()["title"] == "test chat"
    assert events[-1].message()["status"] == "completed"


def test_set_chat_title_renames_the_chat_live(client: httpx2.Client, fake: FakeOpenAI) -> None:
    chat = make_chat(client, title=None)
    fake.push(
        Reply(tool_calls=[ToolCall("set_chat_title", '{"title": "  Lisbon trip  "}')]),
        text("Named it."),
    )
    _, events = send(client, chat["id"], "plan a trip to Lisbon")
    updates = named(events, "chat.updated")
    assert [u["title"] for u in updates] == ["Lisbon trip"]
    names = [e.name for e in events]
    assert names.index("chat.updated") < names.index("message.done")
    assert client.get(f"/chats/{chat['id']}").json()["title"] == "Lisbon trip"
    # The model named it, so no extra call was made for a title.
    assert len(fake.requests) == 2


def test_an_untitled_chat_gets_a_title_after_its_first_reply(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client, title=None)
    fake.push(text("Paris is the capital of France."), text('"Capital of France"'))
    _, events = send(client, chat["id"], "what is the capital of France?")
    updates = named(events, "chat.updated")
    assert [u["title"] for u in updates] == ["Capital of France"]
    assert [e.name for e in events][-2:] == ["chat.updated", "message.done"]
    title_request = fake.requests[-1]
    assert title_request.get("stream") in (None, False)
    assert "capital of France" in title_request["messages"][-1]["content"]
    # Titled now: the next reply makes no title call.
    send(client, chat["id"], "and Spain?")
    assert len(fake.requests) == 3


def test_a_failed_title_call_costs_only_the_title(client: httpx2.Client, fake: FakeOpenAI) -> None:
    chat = make_chat(client, title=None)
    fake.push(text("An answer."), Reply(status=500))
    _, events = send(client, chat["id"], "question")
    assert named(events, "chat.updated") == []
    assert events[-1].message()["status"] == "completed"
    assert client.get(f"/chats/{chat['id']}").json()["title"] is None


def test_search_chat_history_finds_earlier_messages(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    chat = make_chat(client)
    fake.push(text("Noted, your locker code is 4417."))
    send(client, chat["id"], "Remember: my locker code is 4417")
    fake.push(
        Reply(tool_calls=[ToolCall("search_chat_history", '{"query": "locker", "limit": 5}')]),
        text("Your locker code is 4417."),
    )
    _, events = send(client, chat["id"], "what was my locker code?")
    hits = named(events, "tool.result")[0]["tool_call"]["result"]["hits"]
    assert len(hits) == 2 and all("locker" in h["snippet"].lower() for h in hits)
    assert {h["role"] for h in hits} == {"user", "assistant"}
    assert events[-1].message()["content"] == "Your locker code is 4417."


def test_long_chats_are_trimmed_to_the_context_budget(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    service = start_service(MAX_CONTEXT_TOKENS="2500", TOOLS_ENABLED="false")
    with service.client() as own:
        chat = make_chat(own)
        for i in range(12):
            fake.push(text(f"answer {i} " + "y" * 800))
            send(own, chat["id"], f"question {i} " + "x" * 800)
        prompt = fake.requests[-1]["messages"]
    assert prompt[-1]["content"].startswith("question 11 ")
    assert prompt[1]["role"] == "user" and not prompt[1]["content"].startswith("question 0 ")
    assert "oldest messages of this chat are not shown" in prompt[0]["content"]
    assert "tools" not in fake.requests[-1]


def test_a_send_in_a_long_chat_sends_the_newest_turns_and_counts_the_rest(
    start_service: ServiceFactory, fake: FakeOpenAI, tmp_path: Path
) -> None:
    chat_id = "chat_" + "long" * 4
    db = Database(tmp_path / "chat.db")
    db.migrate()
    db.create_chat(chat_id, "long chat", None, "gpt-4o-mini")
    fill_chat(db, chat_id, 1000)  # 2,000 messages; every third reply has a tool round
    db.close()
    service = start_service(tmp_path / "chat.db", MAX_CONTEXT_TOKENS="2500", TOOLS_ENABLED="false")
    with service.client() as own:
        _, events = send(own, chat_id, "the new question")
    assert events[-1].message()["status"] == "completed"
    prompt = fake.requests[-1]["messages"]
    questions = [m["content"] for m in prompt if m["role"] == "user"]
    first = int(questions[0].split()[1])
    # Whole turns, the newest ones, none skipped; a tool round replays as it was written.
    assert prompt[1]["role"] == "user" and 900 < first < 999
    assert questions == [question(turn) for turn in range(first, 1000)] + ["the new question"]
    assert "tool" in [m["role"] for m in prompt]
    # Messages 0 .. 2 * first - 1 are not shown, and the model is told how many.
    assert f"The {2 * first} oldest messages of this chat" in prompt[0]["content"]


def test_the_chats_own_system_prompt_replaces_the_servers(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    service = start_service(SYSTEM_PROMPT="You are Ada, the house assistant.")
    with service.client() as own:
        plain = make_chat(own)
        send(own, plain["id"], "hi")
        server_prompt = fake.requests[-1]["messages"][0]["content"]
        custom = make_chat(own, system_prompt="You only speak in haiku.")
        send(own, custom["id"], "hi")
        chat_prompt = fake.requests[-1]["messages"][0]["content"]
    assert server_prompt.startswith("You are Ada, the house assistant.")
    assert chat_prompt.startswith("You only speak in haiku.") and "Ada" not in chat_prompt
    assert "Markdown" in chat_prompt and "calculate" in chat_prompt
