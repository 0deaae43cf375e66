"""The only module that talks to the model: prompt building, streaming, tool-call accumulation,
and errors of ours with stable codes. Also a CLI: `python llm.py "hey who are you?"`."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain
from typing import Any, Protocol

import aiohttp
import anyio
import httpx2
import openai
import orjson
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from pydantic import JsonValue

from schemas import ToolCallRecord, Usage

DEFAULT_SYSTEM_PROMPT = """\
You are a helpful, knowledgeable assistant inside a chat app. Be accurate, direct and warm. \
Answer the question that was asked; when a request is ambiguous, say what you assume. \
When you are not sure of a fact, say so rather than guess."""

FORMAT_GUIDANCE = """\
Format answers in Markdown: short paragraphs, lists for steps or options, `code` and fenced \
code blocks (with the language) for code, tables only for tabular data. Keep simple answers \
short; no preamble, no repeating the question."""

TOOLS_GUIDANCE = """\
You can call tools; prefer them over guessing:
- calculate: for any arithmetic beyond the trivial; exact with decimals and big integers.
- get_current_time: whenever the answer depends on today's date or the time somewhere.
- search_chat_history: to recall something said earlier in this chat that you no longer see.
- set_chat_title: once the topic of the chat is clear, give it a short title (max 6 words), \
and again if the topic changes completely.
When a tool returns an error, read it, fix the arguments and try again, or explain the \
problem. Never invent a tool's result."""

TRIMMED_NOTE = """\
The {count} oldest messages of this chat are not shown to you, to fit your context window. \
If the user refers to something you cannot see, call search_chat_history to find it."""

TITLE_PROMPT = """\
Write a title of at most 6 words for a chat that starts with the exchange below. \
Reply with the title alone: no quotes, no trailing period."""


# How long to wait for the end of a body after `[DONE]` (it normally comes with it).
DRAIN_SECONDS = 0.1


class LLMError(Exception):
    """A failure of the model's provider, with a stable `code` for clients."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class AccumulatedCall:
    """A tool call whose pieces arrived over several chunks."""

    id: str
    name: str
    arguments: str = ""


@dataclass
class TextDelta:
    """A piece of the model's text."""

    text: str


@dataclass
class TurnEnd:
    """The model's turn ended: why, which tools it asked for, and what it cost."""

    finish_reason: str
    tool_calls: list[AccumulatedCall]
    usage: Usage | None


def _field(obj: Any, name: str) -> Any:
    """A field of a delta: a dict from the raw stream, or an SDK object."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


@dataclass
class ToolCallAccumulator:
    """Joins tool-call deltas by `index`: the first fragment of a call carries its id and
    name, later ones only argument text. Some compatible servers omit `index`; then a fragment
    with an id starts a new call and one without continues the last."""

    calls: dict[int, AccumulatedCall] = field(default_factory=dict)

    def add(self, deltas: Iterable[Any]) -> None:
        """Fold one chunk's `delta.tool_calls` in."""
        for delta in deltas:
            index = _field(delta, "index")
            call_id = _field(delta, "id")
            function = _field(delta, "function")
            if index is None:
                index = len(self.calls) if call_id or not self.calls else max(self.calls)
            call = self.calls.get(index)
            if call is None:
                call = self.calls[index] = AccumulatedCall(id=call_id or f"call_{index}", name="")
            elif call_id:
                call.id = call_id
            if function is not None:
                name, arguments = _field(function, "name"), _field(function, "arguments")
                # Some servers (llama-cpp-python) repeat the whole name on every fragment.
                if name and name != call.name:
                    call.name += name
                if arguments:
                    call.arguments += arguments

    def finish(self) -> list[AccumulatedCall]:
        """The calls in index order."""
        return [self.calls[i] for i in sorted(self.calls)]


def make_client(
    *, api_key: str | None, base_url: str | None, timeout: float, max_retries: int
) -> AsyncOpenAI:
    """The one client of the process: it keeps a connection pool."""
    # The SDK's aiohttp transport (openai[aiohttp]) instead of its default httpx2 one: same
    # requests, retries and errors, but a C parser under each stream and no socket poll per
    # request. Service CPU per relayed chunk at 250 streams of 20 chunks/s 226 -> 167 µs,
    # per send 9.1 -> 8.1 ms (bench/README.md, round 4).
    return AsyncOpenAI(
        api_key=api_key or "not-needed",
        base_url=base_url,
        timeout=timeout,
        max_retries=max_retries,
        http_client=openai.DefaultAioHttpClient(timeout=timeout),
    )


def estimate_tokens(text: str) -> int:
    """A network-free estimate: about four characters per token for English text, plus the
    few tokens every message costs. Errs high for code and low for some scripts."""
    return math.ceil(len(text) / 4) + 4


def tool_result_content(result: JsonValue, error: str | None) -> str:
    """What the model reads as a tool's answer (`role: tool`)."""
    if error is not None:
        return json.dumps({"error": error}, ensure_ascii=False)
    return json.dumps({"result": result}, ensure_ascii=False)


def system_message(
    chat_prompt: str | None, default_prompt: str | None, *, tools: bool, trimmed: int = 0
) -> str:
    """The first message: who the assistant is (the chat's own prompt, else the server's),
    then the service's guidance on formatting, tools and what was left out."""
    parts = [chat_prompt or default_prompt or DEFAULT_SYSTEM_PROMPT, FORMAT_GUIDANCE]
    if tools:
        parts.append(TOOLS_GUIDANCE)
    if trimmed:
        parts.append(TRIMMED_NOTE.format(count=trimmed))
    return "\n\n".join(parts)


class StoredMessage(Protocol):
    """What a prompt needs of a stored message: db.PastMessage, or a whole schemas.Message."""

    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def tool_calls(self) -> Sequence[ToolCallRecord]: ...


def replay(message: StoredMessage) -> list[ChatCompletionMessageParam]:
    """A stored message as the model saw it: text and tool rounds in the order written."""
    if message.role == "user":
        return [{"role": "user", "content": message.content}]
    if not message.tool_calls:
        return [{"role": "assistant", "content": message.content}]
    out: list[ChatCompletionMessageParam] = []
    text = message.content
    position = 0
    rounds: dict[int, list[ToolCallRecord]] = {}
    for call in message.tool_calls:
        rounds.setdefault(min(max(call.text_offset, 0), len(text)), []).append(call)
    for offset, calls in sorted(rounds.items()):
        before = text[position:offset]
        out.append(
            {
                "role": "assistant",
                "content": before or None,
                "tool_calls": [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {
                            "name": c.name,
                            "arguments": c.arguments
                            if isinstance(c.arguments, str)
                            else json.dumps(c.arguments, ensure_ascii=False),
                        },
                    }
                    for c in calls
                ],
            }
        )
        out.extend(
            {
                "role": "tool",
                "tool_call_id": c.id,
                "content": tool_result_content(c.result, c.error),
            }
            for c in calls
        )
        position = offset
    rest = text[position:]
    if rest or not out:
        out.append({"role": "assistant", "content": rest})
    return out


def _message_tokens(message: ChatCompletionMessageParam) -> int:
    return estimate_tokens(json.dumps(message, ensure_ascii=False))


def _message_tokens_at_most(message: ChatCompletionMessageParam) -> int:
    """At least `_message_tokens(message)`, without serializing a text message: its JSON is
    each field as `"key": "value", ` with a character escaped to six at worst (`\\u0000`)."""
    chars = 2
    for key, value in message.items():  # a loop, not generators: it runs for every message
        if not isinstance(value, str):
            return _message_tokens(message)
        chars += len(key) + 6 * len(value) + 8
    return -(-chars // 4) + 4


def build_prompt(
    *,
    chat_prompt: str | None,
    default_prompt: str | None,
    history: Sequence[StoredMessage],
    max_context_tokens: int,
    tools: Sequence[dict[str, Any]] = (),
    reserve_tokens: int = 1024,
    left_out: int = 0,
) -> list[ChatCompletionMessageParam]:
    """System message, then as much of the history as fits the budget, newest kept; the last
    history message is the new user message and is always kept. Whole turns are left out
    (a user message with its replies), so the model never sees an answer without its question.
    `left_out` is how many older messages of the chat were not even loaded."""
    turns: list[list[ChatCompletionMessageParam]] = []
    # Stored messages per turn: what the model is told is missing counts the chat's messages
    # (as search_chat_history finds them), not the several a tool round replays as.
    stored: list[int] = []
    for message in history:
        if message.role == "user" or not turns:
            turns.append([])
            stored.append(0)
        stored[-1] += 1
        if message.role == "assistant" and not message.content and not message.tool_calls:
            continue  # a reply that failed before writing anything tells the model nothing
        turns[-1].extend(replay(message))
    budget = max_context_tokens - reserve_tokens - estimate_tokens(json.dumps(list(tools)))
    budget -= estimate_tokens(system_message(chat_prompt, default_prompt, tools=bool(tools)))
    budget -= estimate_tokens(TRIMMED_NOTE)
    kept: list[list[ChatCompletionMessageParam]] = []
    worst = accumulate(map(_message_tokens_at_most, chain.from_iterable(turns)))
    if all(total <= budget for total in worst):  # stops at the first message past the budget
        kept = turns[::-1]  # all of it fits even at worst: no message needs its exact cost
    else:
        for index, turn in enumerate(reversed(turns)):
            cost = sum(_message_tokens(m) for m in turn)
            if index > 0 and cost > budget:
                break
            kept.append(turn)
            budget -= cost
    trimmed = left_out + sum(stored[: len(turns) - len(kept)])
    system: ChatCompletionMessageParam = {
        "role": "system",
        "content": system_message(chat_prompt, default_prompt, tools=bool(tools), trimmed=trimmed),
    }
    return [system, *(m for turn in reversed(kept) for m in turn)]


def _scrub(text: str, client: AsyncOpenAI) -> str:
    """Provider errors can quote the API key; ours must not."""
    key = client.api_key
    return text.replace(key, "***") if key and len(key) > 8 else text


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The exceptions under `error`, outermost first, each once (`raise e from e` loops)."""
    seen = {id(error)}
    inner = error.__cause__ or error.__context__
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        yield inner
        inner = inner.__cause__ or inner.__context__


def cause_of(error: LLMError, client: AsyncOpenAI) -> str:
    """What lay under one of our errors, for the log: each exception of the chain, outermost
    first. A provider's answer is given as its status alone, since its text may quote the
    conversation (logs hold no message text) or the key; a transport's words are kept."""
    parts: list[str] = []
    for inner in _causes(error):
        name = type(inner).__name__
        if isinstance(inner, LLMError):
            continue  # ours: the client got its words already
        if isinstance(inner, openai.APIStatusError | httpx2.HTTPStatusError):
            parts.append(f"{name}: {inner.response.status_code}")
        elif isinstance(inner, openai.APIError) and not isinstance(
            inner, openai.APIConnectionError
        ):
            parts.append(name)  # an error object in the stream: the provider's words again
        else:
            text = _scrub(str(inner), client).replace("\n", " ")[:160]
            parts.append(f"{name}: {text}" if text else name)
        if len(parts) == 4:
            break
    return " <- ".join(parts) or "no further detail"


def translate_error(error: BaseException, client: AsyncOpenAI) -> LLMError:
    """The SDK's exceptions as our one error type (timeout first: it is a connection error)."""
    if isinstance(error, LLMError):
        return error
    cause = next(
        (e for e in (error, *_causes(error)) if isinstance(e, aiohttp.ClientConnectionError)),
        None,
    )
    if cause is not None and not isinstance(cause, aiohttp.ServerTimeoutError):
        # The SDK's vendored aiohttp transport maps every ClientConnectionError, a refused
        # connection included, to httpx's ConnectTimeout: what failed is in the cause.
        return LLMError("connection_error", "Could not reach the model's provider.")
    if isinstance(error, openai.APITimeoutError | TimeoutError | httpx2.TimeoutException):
        return LLMError("timeout", "The model's provider did not answer in time.")
    if isinstance(error, openai.APIConnectionError | httpx2.TransportError):
        return LLMError("connection_error", "Could not reach the model's provider.")
    if isinstance(error, openai.RateLimitError):
        retry = error.response.headers.get("retry-after")
        hint = f" Retry after {retry} s." if retry else ""
        return LLMError("rate_limited", f"The model's provider is rate limiting us.{hint}")
    if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
        return LLMError("auth_failed", "The model's provider refused our credentials.")
    if isinstance(error, openai.APIStatusError):
        detail = _scrub(str(error.message), client)
        return LLMError(
            "provider_error", f"The model's provider answered {error.status_code}: {detail}"
        )
    if isinstance(error, openai.APIError):
        detail = _scrub(str(error.message), client)
        return LLMError("provider_error", f"The model's provider reported an error: {detail}")
    return LLMError(
        "provider_error", f"Unexpected error talking to the model: {type(error).__name__}"
    )


def sse_data(event: bytes) -> bytes | None:
    """The `data:` of one server-sent event (lines joined), or None if it has none."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the usual case: one data line
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line[:5] == b"data:"]
    return b"\n".join(lines) if lines else None


def stream_error(error: Any, client: AsyncOpenAI) -> LLMError:
    """An error object sent in the middle of a stream (the SDK raises APIError for it)."""
    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    detail = _scrub(message, client)
    return LLMError("provider_error", f"The model's provider reported an error: {detail}")


async def stream_turn(
    client: AsyncOpenAI,
    *,
    model: str,
    messages: Sequence[ChatCompletionMessageParam],
    tools: Sequence[dict[str, Any]] = (),
    max_tokens: int | None = None,
    idle_timeout: float = 60.0,
) -> AsyncIterator[TextDelta | TurnEnd]:
    """One model call, streamed: text pieces as they come, then a TurnEnd. Raises LLMError.
    Closing the generator early (cancel) closes the HTTP stream, so the provider stops."""
    body: dict[str, Any] = {
        "model": model,
        "messages": list(messages),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools:
        body["tools"] = list(tools)
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    # The SDK's client makes the request (auth, retries before the first byte with their
    # Retry-After waits, status errors as APIStatusError), but with a body that is JSON already:
    # the typed `create` runs `async_maybe_transform` over every message, ~12 % of the event
    # loop's time under 50 senders (bench profile), for dicts that are plain JSON. orjson
    # encodes it (the SDK's own json.dumps took 84 against 6 µs for 140 messages), and parses
    # the stream: building the SDK's pydantic chunk models was most of the CPU per chunk.
    try:
        # No deadline of ours here: the SDK's own timeout bounds each attempt, and its retries
        # wait as long as the provider's Retry-After asks (a 429 must end as rate_limited).
        response = await client.post(
            "/chat/completions",
            cast_to=httpx2.Response,
            content=orjson.dumps(body),  # with the client's `Content-Type: application/json`
            options={"security": {"bearer_auth": True}, "timeout": _idle(client, idle_timeout)},
            stream=True,
        )
    except Exception as error:
        raise translate_error(error, client) from error
    calls = ToolCallAccumulator()
    finish_reason: str | None = None
    usage: Usage | None = None
    try:
        reads = response.aiter_bytes()
        buffer = b""
        done = False
        while not done:
            try:
                # The idle timeout is the HTTP client's read timeout (see _idle): a cancel scope
                # of our own around each read cost ~30 µs a chunk (bench, many slow streams).
                data = await anext(reads)
            except StopAsyncIteration:
                break
            buffer += data
            if b"\r" in buffer:  # CRLF line ends, possibly split across two reads
                buffer = buffer.replace(b"\r\n", b"\n")
            if b"\n\n" not in buffer:
                continue
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                payload = sse_data(event)
                if payload is None:
                    continue
                if payload.startswith(b"[DONE]"):
                    done = True
                    break
                chunk = orjson.loads(payload)
                if not isinstance(chunk, dict):
                    continue
                if chunk.get("error"):
                    raise stream_error(chunk["error"], client)
                if chunk.get("usage"):
                    counted = chunk["usage"]
                    usage = Usage(
                        prompt_tokens=counted["prompt_tokens"],
                        completion_tokens=counted["completion_tokens"],
                        total_tokens=counted["total_tokens"],
                    )
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    if content:
                        yield TextDelta(content)
                    if delta.get("tool_calls"):
                        calls.add(delta["tool_calls"])
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
    except LLMError:
        raise  # ours already (an error object in the stream)
    except Exception as error:
        raise translate_error(error, client) from error
    else:
        if done:
            await _drain(reads, min(idle_timeout, DRAIN_SECONDS))
    finally:
        # Shielded: a cancelled reply must still close the socket, or billing goes on.
        with anyio.move_on_after(5, shield=True):
            await response.aclose()
    if finish_reason is None:
        raise LLMError("stream_interrupted", "The model's stream ended before the reply did.")
    yield TurnEnd(finish_reason, calls.finish(), usage)


def _idle(client: AsyncOpenAI, idle_timeout: float) -> httpx2.Timeout:
    """The client's time-outs, but reads (the response's head, then every piece of the
    stream) may wait at most `idle_timeout`: a provider that goes quiet ends the reply."""
    base = client.timeout
    if isinstance(base, httpx2.Timeout):
        return httpx2.Timeout(
            connect=base.connect, read=idle_timeout, write=base.write, pool=base.pool
        )
    return httpx2.Timeout(base, read=idle_timeout)


async def _drain(reads: AsyncIterator[bytes], seconds: float) -> None:
    """Read what follows `[DONE]` (the end of the chunked body): a response closed before
    its end closes its connection too, so every send paid for a new TCP connection to the
    provider (bench profile: ~10 % of the event loop's time under 50 senders). Bounded
    briefly: a server that holds the connection open after `[DONE]` must not hold the reply."""
    try:
        with anyio.fail_after(seconds):
            async for _ in reads:
                pass
    except Exception:  # the reply is whole; a failure past its end only costs the connection
        return


async def complete_text(
    client: AsyncOpenAI,
    *,
    model: str,
    messages: Sequence[ChatCompletionMessageParam],
    max_tokens: int,
    timeout: float,
) -> str:
    """A short, non-streamed answer (titles). Raises LLMError."""
    try:
        with anyio.fail_after(timeout):
            completion = await client.chat.completions.create(
                model=model, messages=list(messages), max_tokens=max_tokens
            )
    except Exception as error:
        raise translate_error(error, client) from error
    if not completion.choices:
        return ""
    return completion.choices[0].message.content or ""


async def suggest_title(
    client: AsyncOpenAI, *, model: str, question: str, answer: str, timeout: float = 15.0
) -> str | None:
    """A short title for a new chat, from its first exchange; None if none came back."""
    excerpt = f"User: {question[:2000]}\n\nAssistant: {answer[:2000]}"
    raw = await complete_text(
        client,
        model=model,
        messages=[
            {"role": "system", "content": TITLE_PROMPT},
            {"role": "user", "content": excerpt},
        ],
        max_tokens=24,
        timeout=timeout,
    )
    return clean_title(raw)


def clean_title(raw: str) -> str | None:
    """A model's title as we store it: one line, no quotes or Markdown, at most 80 characters."""
    lines = [line for line in raw.strip().splitlines() if line.strip()]
    if not lines:
        return None
    title = lines[0].strip().strip("#*_`\"'“”‘’ ").removeprefix("Title:").strip()
    title = title.rstrip(".").strip()
    if len(title) > 80:
        title = title[:79].rstrip() + "…"
    return title or None


async def _cli(prompt: str) -> int:
    # The CLI reads the same settings as the service; the library part above takes arguments.
    from settings import get_settings

    settings = get_settings()
    if not settings.llm_configured:
        print("Set OPENAI_API_KEY (or OPENAI_BASE_URL for a local server) first.", file=sys.stderr)
        return 2
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    client = make_client(
        api_key=key,
        base_url=settings.openai_base_url,
        timeout=settings.openai_timeout,
        max_retries=settings.openai_max_retries,
    )
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": system_message(None, settings.system_prompt, tools=False)},
        {"role": "user", "content": prompt},
    ]
    try:
        async for event in stream_turn(
            client,
            model=settings.openai_model,
            messages=messages,
            max_tokens=settings.max_output_tokens,
            idle_timeout=settings.openai_stream_idle_timeout,
        ):
            if isinstance(event, TextDelta):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            else:
                tokens = f", {event.usage.total_tokens} tokens" if event.usage else ""
                print(f"\n[{event.finish_reason}{tokens}]", file=sys.stderr)
    except LLMError as error:
        print(f"\nerror ({error.code}): {error.message}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    return 0


def main(argv: Sequence[str] = tuple(sys.argv[1:])) -> int:
    """`python llm.py "question"`: stream the model's answer to the terminal."""
    if not argv or argv[0] in {"-h", "--help"}:
        print('usage: python llm.py "hey who are you and what can you do for me?"')
        return 0 if argv else 2
    return anyio.run(_cli, " ".join(argv))


if __name__ == "__main__":
    sys.exit(main())
