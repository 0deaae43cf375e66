"""Pydantic models: request and response bodies, and the reply's stream events."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, StringConstraints

ChatId = Annotated[str, StringConstraints(pattern=r"^chat_[A-Za-z0-9_-]{16,64}$")]
Role = Literal["user", "assistant"]
MessageStatus = Literal["in_progress", "completed", "incomplete", "failed", "cancelled"]
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "incomplete", "failed", "cancelled"})


def _unicode(value: str) -> str:
    """JSON may spell lone surrogates ("\\ud800"); they are not text and UTF-8 cannot hold them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("Text must be valid Unicode (no lone surrogates).") from None
    return value


Unicode = AfterValidator(_unicode)
Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200, pattern=r"\S"),
    Unicode,
]
SystemPrompt = Annotated[str, StringConstraints(max_length=20_000), Unicode]


class Body(BaseModel):
    """Request bodies refuse fields they do not know: a typo must not pass silently."""

    model_config = ConfigDict(extra="forbid")


class ChatCreate(Body):
    """`POST /chats`: every field optional."""

    title: Title | None = None
    system_prompt: SystemPrompt | None = None
    model: Annotated[str, StringConstraints(max_length=200), Unicode] | None = None


class ChatUpdate(Body):
    """`PATCH /chats/{chat_id}`: the fields to change; `null` clears one."""

    title: Title | None = None
    system_prompt: SystemPrompt | None = None


class Chat(BaseModel):
    """A chat session."""

    id: str
    title: str | None
    system_prompt: str | None
    model: str
    created_at: datetime
    updated_at: datetime


class ChatList(BaseModel):
    """A page of chats, newest first."""

    data: list[Chat]
    has_more: bool


class MessageCreate(Body):
    """`POST /chats/{chat_id}/messages`: the user's message. Its length limit is a setting."""

    # At least one character that is not whitespace.
    content: Annotated[str, StringConstraints(min_length=1, pattern=r"\S"), Unicode]


class Usage(BaseModel):
    """Tokens the provider counted for a reply (all model calls of the reply added up)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCallRequest(BaseModel):
    """A tool call as the model asked for it (`tool.call`)."""

    id: str
    name: str
    arguments: JsonValue


class ToolCallRecord(BaseModel):
    """One tool the model called while writing a reply, and what came of it."""

    id: str
    name: str
    arguments: JsonValue
    result: JsonValue = None
    error: str | None = None
    # How much of the reply's text came before this call: the next prompt replays the text and
    # the tool rounds in the order the model wrote them. Stored, never shown to clients.
    text_offset: int = Field(default=0, exclude=True)


class MessageError(BaseModel):
    """Why a reply failed: a stable `code` and a readable `message`."""

    code: str
    message: str


class Message(BaseModel):
    """A user message or an assistant reply."""

    id: str
    chat_id: str
    role: Role
    content: str
    status: MessageStatus
    created_at: datetime
    completed_at: datetime | None
    model: str | None
    finish_reason: str | None
    usage: Usage | None
    tool_calls: list[ToolCallRecord]
    error: MessageError | None


class MessageList(BaseModel):
    """A page of a chat's history, oldest first."""

    data: list[Message]
    has_more: bool


class SendResult(BaseModel):
    """The 202 answer to a send with `Accept: application/json`."""

    user_message: Message
    assistant_message: Message


class ErrorBody(BaseModel):
    """An error answer (404, 413, 503...): FastAPI's usual `{"detail": "..."}`."""

    detail: str


class Conflict(BaseModel):
    """The 409 answer: the chat already has a reply in progress (`message_id` names it), or
    the chat is full (no `message_id`: retrying will not help, start a new chat)."""

    detail: str
    message_id: str | None = None


# Stream events. `type` is the SSE `event:` name. On the wire, `data:` is the JSON of the
# message (message.created, message.done), of the chat (chat.updated), or of the other fields.


class MessageCreated(BaseModel):
    """`message.created`: a message begins (the reply, or the user message on a POST stream)."""

    type: Literal["message.created"] = "message.created"
    message: Message


class MessageDelta(BaseModel):
    """`message.delta`: a piece of the reply's text, in order."""

    type: Literal["message.delta"] = "message.delta"
    message_id: str
    delta: str


class ToolCallRequested(BaseModel):
    """`tool.call`: the model asked for a tool."""

    type: Literal["tool.call"] = "tool.call"
    message_id: str
    tool_call: ToolCallRequest


class ToolCallFinished(BaseModel):
    """`tool.result`: the tool answered, or was not run (`error` says why)."""

    type: Literal["tool.result"] = "tool.result"
    message_id: str
    tool_call: ToolCallRecord


class ChatUpdated(BaseModel):
    """`chat.updated`: the chat changed while the reply was written."""

    type: Literal["chat.updated"] = "chat.updated"
    chat: Chat


class MessageDone(BaseModel):
    """`message.done`: always last; the whole final message."""

    type: Literal["message.done"] = "message.done"
    message: Message


StreamEvent = Annotated[
    MessageCreated
    | MessageDelta
    | ToolCallRequested
    | ToolCallFinished
    | ChatUpdated
    | MessageDone,
    Field(discriminator="type"),
]


def _sse_event(name: str, data: dict[str, Any], numbered: bool = True) -> dict[str, Any]:
    """The OpenAPI schema of one SSE event: its name, JSON `data`, and numeric `id`."""
    fields: dict[str, Any] = {
        "event": {"const": name},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data},
    }
    if numbered:
        fields["id"] = {"type": "string", "pattern": "^[1-9][0-9]*$"}
    return {"type": "object", "required": list(fields), "properties": fields}


def _ref(name: str) -> dict[str, str]:
    """A reference to one of the document's schemas."""
    return {"$ref": f"#/components/schemas/{name}"}


def _event_data(**fields: dict[str, Any]) -> dict[str, Any]:
    """An event's `data` object: `message_id` and these fields, nothing else."""
    properties = {"message_id": {"type": "string"}, **fields}
    return {
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": False,
    }


# The OpenAPI schema of each event on the wire (OpenAPI 3.1 reads the `schema` of an event
# stream as one event's): `event`, JSON `data` (the models above, by reference) and `id`.
STREAM_EVENT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        # A POST's stream begins with the user message, which has no id.
        _sse_event("message.created", _ref("Message"), numbered=False),
        _sse_event("message.created", _ref("Message")),
        _sse_event("message.delta", _event_data(delta={"type": "string"})),
        _sse_event(
            "tool.call",
            _event_data(
                tool_call={
                    "type": "object",
                    "required": ["id", "name", "arguments"],
                    "properties": {
                        "id": {"type": "string"},
                        "name": {"type": "string"},
                        "arguments": _ref("JsonValue"),
                    },
                }
            ),
        ),
        _sse_event("tool.result", _event_data(tool_call=_ref("ToolCallRecord"))),
        _sse_event("chat.updated", _ref("Chat")),
        _sse_event("message.done", _ref("Message")),
    ]
}
