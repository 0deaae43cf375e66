"""Tests for tools.py: each tool with valid, invalid and hostile input, and the call machinery."""

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

import anyio
import pytest
from pydantic import BaseModel, ConfigDict, Field

import llm
from tools import (
    TOOLS,
    CalculationError,
    JsonValue,
    Tool,
    ToolContext,
    ToolError,
    ToolOutcome,
    evaluate,
    run_tool_call,
    tool,
    tool_schemas,
)

# A Saturday; 09:57:03 in Paris (UTC+1 in November).
FIXED_NOW = datetime(2026, 11, 28, 8, 57, 3, 123456, tzinfo=UTC)
SHIPPED = {"calculate", "get_current_time", "search_chat_history", "set_chat_title"}


@dataclass
class FakeChat:
    """Stands in for replies.py: records what the tools asked of the chat."""

    hits: list[dict[str, JsonValue]] = field(default_factory=list)
    searches: list[tuple[str, int]] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    search_error: Exception | None = None

    async def search_history(self, query: str, limit: int) -> list[dict[str, JsonValue]]:
        self.searches.append((query, limit))
        if self.search_error is not None:
            raise self.search_error
        return self.hits[:limit]

    async def set_title(self, title: str) -> None:
        self.titles.append(title)

    def context(self, now: datetime = FIXED_NOW) -> ToolContext:
        return ToolContext(
            chat_id="chat_test",
            search_history=self.search_history,
            set_title=self.set_title,
            now=lambda: now,
        )


def tool_message_content(outcome: ToolOutcome) -> str:
    """What the model reads back: llm.py writes it from the outcome's result or error."""
    return llm.tool_result_content(outcome.result, outcome.error)


def call(
    name: str,
    arguments: dict[str, JsonValue] | str,
    *,
    chat: FakeChat | None = None,
    now: datetime = FIXED_NOW,
    tools: Mapping[str, Tool] = TOOLS,
) -> ToolOutcome:
    """Run one call the way replies.py does; a dict is sent as JSON, a str as is."""
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    ctx = (chat or FakeChat()).context(now)
    return anyio.run(run_tool_call, name, raw, ctx, tools)


class NoArguments(BaseModel):
    """A tool without arguments."""

    model_config = ConfigDict(extra="forbid")


class TextArguments(BaseModel):
    """One text argument."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=20)


# --- calculate -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        pytest.param("6*7", 42, id="whole-is-int"),
        pytest.param("2+2", 4, id="api-example"),
        pytest.param("0.1+0.2", 0.3, id="decimals-are-exact"),
        pytest.param("0.1*3", 0.3, id="decimal-times-int"),
        pytest.param("7/2", 3.5, id="true-division"),
        pytest.param("1/3", 0.3333333333333333, id="repeating-fraction-as-nearest-float"),
        pytest.param("-3**2", -9, id="power-binds-tighter-than-minus"),
        pytest.param("(-3)**2", 9, id="parenthesised-negative-base"),
        pytest.param("2**-2", 0.25, id="negative-exponent"),
        pytest.param("7//2", 3, id="floor-division"),
        pytest.param("-7//2", -4, id="floor-division-rounds-down"),
        pytest.param("7%3", 1, id="modulo"),
        pytest.param("7.5%2", 1.5, id="modulo-of-decimal"),
        pytest.param("(2.5 + 3) * 4", 22, id="parentheses"),
        pytest.param("+-+5", -5, id="unary-signs"),
        pytest.param("  1 +\t1  ", 2, id="whitespace"),
        pytest.param("1e3 + 1.5E-1", 1000.15, id="scientific-notation"),
        pytest.param("1_000 * 2", 2000, id="underscores"),
        pytest.param("0x10 + 0b1", 17, id="hex-and-binary"),
        pytest.param(".5 + 5.", 5.5, id="bare-decimal-points"),
        pytest.param("8**(1/3)", 2, id="exact-cube-root"),
        pytest.param("(-8)**(1/3)", -2, id="odd-root-of-negative"),
        pytest.param("4**0.5", 2, id="exact-square-root"),
        pytest.param("(9/4)**1.5", 3.375, id="exact-root-of-fraction"),
        pytest.param("2**0.5", 1.4142135623730951, id="irrational-root-is-float"),
        pytest.param("2**0.5 * 2**0.5", 2.0000000000000004, id="float-once-inexact"),
        pytest.param(
            "12345678901234567890 * 98765432109876543210",
            1219326311370217952237463801111263526900,
            id="big-integers",
        ),
        pytest.param("2**3000 // 2**2999", 2, id="big-powers-within-limit"),
        pytest.param("1" + "+1" * 249, 250, id="long-flat-sum"),
        pytest.param("(" * 200 + "1" + ")" * 200, 1, id="200-nested-parentheses"),
    ],
)
def test_calculate_gives_exact_results(expression: str, expected: int | float) -> None:
    outcome = call("calculate", {"expression": expression})
    assert outcome.error is None
    assert outcome.result == expected
    # 42, not 42.0: a whole exact result is an int, anything else a float.
    assert type(outcome.result) is type(expected)
    assert outcome.arguments == {"expression": expression}


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        pytest.param("(10**400+1)**0.5", 1e200, id="huge-base"),
        pytest.param("(2*10**-400)**0.5", 2**0.5 * 1e-200, id="tiny-base"),
        pytest.param("(10**400)**(1/3)", 2.1544346900318837e133, id="huge-base-irrational-root"),
    ],
)
def test_calculate_takes_roots_of_bases_beyond_float_range(
    expression: str, expected: float
) -> None:
    outcome = call("calculate", {"expression": expression})
    assert outcome.error is None
    assert outcome.result == pytest.approx(expected, rel=1e-14)


def test_calculate_keeps_every_digit_of_a_large_whole_result() -> None:
    outcome = call("calculate", {"expression": "10**999 + 1"})
    assert outcome.result == 10**999 + 1
    assert tool_message_content(outcome) == '{"result": 1' + "0" * 998 + "1}"


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        pytest.param("__import__('os')", "function calls are not allowed", id="import"),
        pytest.param(
            "__import__('os').system('id')", "function calls are not allowed", id="system"
        ),
        pytest.param("().__class__.__bases__[0]", "not allowed", id="dunder-walk"),
        pytest.param("(1).real", "attributes are not allowed", id="attribute"),
        pytest.param("x + 1", "names such as 'x' are not allowed", id="name"),
        pytest.param("pi * 2", "names such as 'pi' are not allowed", id="constant-name"),
        pytest.param("'a' * 3", "strings are not allowed", id="string"),
        pytest.param("f'{1}'", "strings are not allowed", id="f-string"),
        pytest.param("1 < 2", "comparisons are not allowed", id="comparison"),
        pytest.param("lambda: 1", "lambdas are not allowed", id="lambda"),
        pytest.param("[1, 2]", "lists are not allowed", id="list"),
        pytest.param("1 if 1 else 2", "conditional expressions are not allowed", id="if-else"),
        pytest.param("(y := 2)", "assignments are not allowed", id="walrus"),
        pytest.param("True + 1", "True and False are not numbers", id="boolean"),
        pytest.param("1j * 1j", "complex numbers are not supported", id="complex"),
        pytest.param("2 ^ 3", "'^' is not supported (use ** for powers)", id="caret"),
        pytest.param("1 << 100000", "'<<' is not supported", id="shift"),
        pytest.param("~1", "'~' is not supported", id="invert"),
        pytest.param("2(3)", "function calls are not allowed", id="implicit-product"),
        pytest.param("1 +", "not a valid arithmetic expression", id="syntax"),
        pytest.param("2 × 3", "not a valid arithmetic expression", id="unicode-operator"),
        pytest.param("1\x00", "not a valid arithmetic expression", id="null-byte"),
        pytest.param("1/0", "division by zero", id="division-by-zero"),
        pytest.param("1//0", "division by zero", id="floor-division-by-zero"),
        pytest.param("1%0", "division by zero", id="modulo-by-zero"),
        pytest.param("1/(2-2)", "division by zero", id="computed-zero"),
        pytest.param("0**-1", "division by zero", id="zero-to-negative-power"),
        pytest.param("9**9**9", "about 369,693,100 digits; the limit is 1000", id="tower"),
        pytest.param("2**10000000", "about 3,010,300 digits", id="huge-power"),
        pytest.param("2**4000", "about 1,204 digits; the limit is 1000", id="power-over-limit"),
        pytest.param("2**(10**100)", "far more than 1000 digits", id="googol-exponent"),
        pytest.param("10**1000", "limited to 1000 digits", id="just-over-the-limit"),
        pytest.param("(10**600)*(10**600)", "limited to 1000 digits", id="big-product"),
        pytest.param("1e1000", "limited to 1000 digits", id="big-literal"),
        pytest.param("1e99999999", "limited to 1000 digits", id="huge-exponent-literal"),
        pytest.param("(-8)**0.5", "not a real number", id="even-root-of-negative"),
        pytest.param("10**-400", "too close to zero", id="underflow"),
        pytest.param("(10**400+1)/3", "too large to show", id="overflowing-fraction"),
        pytest.param("(10**400+1)**1.5", "out of floating-point range", id="float-overflow"),
        pytest.param("-" * 300 + "1", "nested too deeply", id="deep-unary"),
    ],
)
def test_calculate_refuses_with_a_clear_error(expression: str, error: str) -> None:
    started = time.perf_counter()
    outcome = call("calculate", {"expression": expression})
    # A timed-out calculation would say so instead: the limits must stop the work at once.
    assert time.perf_counter() - started < 1.0
    assert outcome.result is None
    assert outcome.error is not None
    assert error in outcome.error
    assert "Traceback" not in outcome.error


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        pytest.param("1" * 10_000, "at most 500 characters", id="10000-digit-number"),
        pytest.param("(" * 1000 + "1" + ")" * 1000, "at most 500 characters", id="1000-deep"),
        pytest.param("", "at least 1 character", id="empty"),
    ],
)
def test_calculate_checks_the_expression_length(expression: str, error: str) -> None:
    outcome = call("calculate", {"expression": expression})
    assert outcome.error == f"invalid arguments: expression: String should have {error}"


@pytest.mark.parametrize(
    "expression",
    [
        pytest.param("1" * 10_000, id="10000-digit-number"),
        pytest.param("(" * 1000 + "1" + ")" * 1000, id="1000-deep"),
    ],
)
def test_evaluate_bounds_its_input_without_the_argument_model(expression: str) -> None:
    with pytest.raises(CalculationError, match="too long"):
        evaluate(expression)


def test_evaluate_reads_the_longest_allowed_literal_exactly() -> None:
    assert evaluate("9" * 500) == int("9" * 500)


def test_calculation_errors_are_tool_errors() -> None:
    # run_tool_call logs a traceback only for unexpected exceptions, not for ToolError.
    assert issubclass(CalculationError, ToolError)


# --- get_current_time ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timezone", "now", "iso", "weekday", "offset"),
    [
        pytest.param(
            "Europe/Paris", FIXED_NOW, "2026-11-28T09:57:03+01:00", "Saturday", "+01:00", id="cet"
        ),
        pytest.param(
            "Europe/Paris",
            datetime(2026, 7, 1, 12, 0, tzinfo=UTC),
            "2026-07-01T14:00:00+02:00",
            "Wednesday",
            "+02:00",
            id="summer-time",
        ),
        pytest.param("UTC", FIXED_NOW, "2026-11-28T08:57:03+00:00", "Saturday", "+00:00", id="utc"),
        pytest.param(
            "Asia/Kolkata", FIXED_NOW, "2026-11-28T14:27:03+05:30", "Saturday", "+05:30", id="half"
        ),
        pytest.param(
            "America/St_Johns",
            FIXED_NOW,
            "2026-11-28T05:27:03-03:30",
            "Saturday",
            "-03:30",
            id="negative-half-hour",
        ),
        pytest.param(
            "Pacific/Kiritimati",
            datetime(2026, 11, 28, 23, 0, tzinfo=UTC),
            "2026-11-29T13:00:00+14:00",
            "Sunday",
            "+14:00",
            id="next-day",
        ),
    ],
)
def test_get_current_time_in_a_zone(
    timezone: str, now: datetime, iso: str, weekday: str, offset: str
) -> None:
    outcome = call("get_current_time", {"timezone": timezone}, now=now)
    assert outcome.error is None
    assert outcome.result == {
        "timezone": timezone,
        "iso": iso,
        "weekday": weekday,
        "utc_offset": offset,
    }


@pytest.mark.parametrize(
    "timezone",
    [
        pytest.param("Mars/Olympus_Mons", id="unknown"),
        pytest.param("europe/paris", id="wrong-case"),
        pytest.param("CET+1", id="made-up"),
        pytest.param("", id="empty"),
        pytest.param("America", id="directory"),
        pytest.param("zone.tab", id="not-a-zone-file"),
        pytest.param("../../../etc/passwd", id="path-traversal"),
        pytest.param("/etc/localtime", id="absolute-path"),
        pytest.param("Europe/Paris\x00", id="null-byte"),
    ],
)
def test_get_current_time_rejects_unknown_zones_as_bad_arguments(timezone: str) -> None:
    outcome = call("get_current_time", {"timezone": timezone})
    assert outcome.error == (
        f"invalid arguments: timezone: unknown time zone {timezone!r}; "
        "use an IANA name such as 'Europe/Paris' or 'UTC'"
    )


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        pytest.param({}, "timezone: Field required", id="missing"),
        pytest.param({"timezone": 1}, "timezone: Input should be a valid string", id="number"),
        pytest.param({"timezone": "x" * 65}, "at most 64 characters", id="too-long"),
        pytest.param(
            {"timezone": "UTC", "format": "12h"},
            "format: Extra inputs are not permitted",
            id="extra-field",
        ),
    ],
)
def test_get_current_time_validates_its_arguments(
    arguments: dict[str, JsonValue], error: str
) -> None:
    outcome = call("get_current_time", arguments)
    assert outcome.error is not None
    assert error in outcome.error


# --- search_chat_history -------------------------------------------------------------------

NOT_AN_INTEGER = "limit: Input should be a valid integer"
HIT: dict[str, JsonValue] = {
    "message_id": "msg_1",
    "role": "user",
    "snippet": "my flight to [Lisbon] is TP 1351",
    "created_at": "2026-11-20T10:00:00+00:00",
}


def test_search_chat_history_returns_the_hits_of_the_chat() -> None:
    chat = FakeChat(hits=[HIT, {**HIT, "message_id": "msg_2"}])
    outcome = call("search_chat_history", {"query": "  Lisbon flight ", "limit": 1}, chat=chat)
    assert outcome.error is None
    assert outcome.result == {"hits": [HIT]}
    assert chat.searches == [("Lisbon flight", 1)]


def test_search_chat_history_with_no_hits() -> None:
    outcome = call("search_chat_history", {"query": "nothing", "limit": 5})
    assert outcome.result == {"hits": []}


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        pytest.param({"query": "x"}, "limit: Field required", id="limit-is-required"),
        pytest.param({"query": "x", "limit": 0}, "greater than or equal to 1", id="limit-0"),
        pytest.param({"query": "x", "limit": 21}, "less than or equal to 20", id="limit-21"),
        pytest.param({"query": "x", "limit": "5"}, NOT_AN_INTEGER, id="limit-string"),
        pytest.param({"query": "x", "limit": True}, NOT_AN_INTEGER, id="limit-boolean"),
        pytest.param({"query": "x", "limit": 2.5}, NOT_AN_INTEGER, id="limit-fraction"),
        pytest.param({"query": "", "limit": 5}, "query: String should have at least 1", id="empty"),
        pytest.param(
            {"query": " ", "limit": 5}, "query: String should have at least 1", id="blank"
        ),
        pytest.param({"query": "x" * 201, "limit": 5}, "at most 200 characters", id="too-long"),
        pytest.param(
            {"query": ["x"], "limit": 5}, "query: Input should be a valid string", id="list"
        ),
        pytest.param(
            {"query": "x", "limit": 5, "chat_id": "chat_other"},
            "chat_id: Extra inputs are not permitted",
            id="other-chat",
        ),
    ],
)
def test_search_chat_history_validates_its_arguments(
    arguments: dict[str, JsonValue], error: str
) -> None:
    chat = FakeChat(hits=[HIT])
    outcome = call("search_chat_history", arguments, chat=chat)
    assert outcome.error is not None
    assert error in outcome.error
    assert chat.searches == []


def test_search_chat_history_reports_a_failing_search() -> None:
    chat = FakeChat(search_error=RuntimeError("fts5: syntax error near '\"'"))
    outcome = call("search_chat_history", {"query": '"', "limit": 5}, chat=chat)
    assert outcome.error == "search_chat_history failed: fts5: syntax error near '\"'"


# --- set_chat_title ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("title", "stored"),
    [
        pytest.param("Trip to Rome", "Trip to Rome", id="plain"),
        pytest.param("  Trip to Rome \n", "Trip to Rome", id="trimmed"),
        pytest.param("Voyage à Rome 🇮🇹", "Voyage à Rome 🇮🇹", id="unicode"),
        pytest.param("x" * 80, "x" * 80, id="80-characters"),
        pytest.param("  " + "x" * 80 + "  ", "x" * 80, id="80-after-trimming"),
    ],
)
def test_set_chat_title_renames_the_chat(title: str, stored: str) -> None:
    chat = FakeChat()
    outcome = call("set_chat_title", {"title": title}, chat=chat)
    assert outcome.error is None
    assert outcome.result == {"title": stored}
    assert chat.titles == [stored]


@pytest.mark.parametrize(
    ("title", "error"),
    [
        pytest.param("", "title: String should have at least 1 character", id="empty"),
        pytest.param(" \t\n ", "title: String should have at least 1 character", id="blank"),
        pytest.param("x" * 81, "title: String should have at most 80 characters", id="81"),
        pytest.param("x" * 200, "title: String should have at most 80 characters", id="200"),
        pytest.param("Line one\nLine two", "title: the title must be one line", id="newline"),
        pytest.param("Tab\there", "title: the title must be one line", id="control-character"),
        pytest.param("Para\u2029graph", "title: the title must be one line", id="unicode-break"),
    ],
)
def test_set_chat_title_refuses_bad_titles(title: str, error: str) -> None:
    chat = FakeChat()
    outcome = call("set_chat_title", {"title": title}, chat=chat)
    assert outcome.error is not None
    assert error in outcome.error
    assert chat.titles == []


def test_set_chat_title_needs_a_string() -> None:
    outcome = call("set_chat_title", {"title": None})
    assert outcome.error == "invalid arguments: title: Input should be a valid string"


# --- run_tool_call -------------------------------------------------------------------------


def test_unknown_tool_names_the_known_ones() -> None:
    outcome = call("rm_rf", {"path": "/"})
    assert outcome.result is None
    assert outcome.arguments == {"path": "/"}
    assert outcome.error is not None
    assert outcome.error.startswith("unknown tool 'rm_rf'; known tools: ")
    for name in SHIPPED:
        assert name in outcome.error


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('{"expression": "1+1"', id="truncated"),
        pytest.param("{'expression': '1+1'}", id="single-quotes"),
        pytest.param('{"expression": NaN}', id="nan"),
        pytest.param('{"expression": 1e400}', id="infinite-number"),
        pytest.param("2+2", id="bare-text"),
    ],
)
def test_invalid_json_is_reported_with_the_raw_text(raw: str) -> None:
    outcome = call("calculate", raw)
    assert outcome.arguments == raw
    assert outcome.result is None
    assert outcome.error is not None
    assert outcome.error.startswith("arguments are not valid JSON: ")


@pytest.mark.parametrize(
    ("raw", "parsed", "kind"),
    [
        pytest.param("[1, 2]", [1, 2], "an array", id="array"),
        pytest.param('"2+2"', "2+2", "a string", id="string"),
        pytest.param("42", 42, "a number", id="number"),
        pytest.param("null", None, "null", id="null"),
    ],
)
def test_arguments_must_be_an_object(raw: str, parsed: JsonValue, kind: str) -> None:
    outcome = call("calculate", raw)
    assert outcome.arguments == parsed
    assert outcome.error == f"arguments must be a JSON object, not {kind}"


def test_empty_arguments_count_as_an_empty_object() -> None:
    outcome = call("calculate", "  ")
    assert outcome.arguments == {}
    assert outcome.error == "invalid arguments: expression: Field required"


def test_every_field_problem_is_listed() -> None:
    outcome = call("search_chat_history", {"query": "", "limit": 99, "extra": 1})
    assert outcome.error == (
        "invalid arguments: query: String should have at least 1 character; "
        "limit: Input should be less than or equal to 20; "
        "extra: Extra inputs are not permitted"
    )


def test_a_slow_tool_times_out() -> None:
    registry: dict[str, Tool] = {}

    @tool(NoArguments, timeout=0.05, registry=registry)
    async def slow(args: NoArguments, ctx: ToolContext) -> JsonValue:
        """Take too long."""
        await anyio.sleep(10)
        return "late"

    started = time.perf_counter()
    outcome = call("slow", {}, tools=registry)
    assert time.perf_counter() - started < 2
    assert outcome.result is None
    assert outcome.error == "slow timed out after 0.05 s"


def test_a_tool_raising_timeout_error_itself_failed_rather_than_timed_out() -> None:
    registry: dict[str, Tool] = {}

    @tool(NoArguments, timeout=5, registry=registry)
    async def flaky(args: NoArguments, ctx: ToolContext) -> JsonValue:
        """Fail the way a socket does."""
        raise TimeoutError("the search backend did not answer")

    outcome = call("flaky", {}, tools=registry)
    assert outcome.error == "flaky failed: the search backend did not answer"


@pytest.mark.parametrize(
    ("exception", "error"),
    [
        pytest.param(RuntimeError("disk on fire"), "boom failed: disk on fire", id="message"),
        pytest.param(KeyError("chat_id"), "boom failed: 'chat_id'", id="key-error"),
        pytest.param(ValueError(), "boom failed: ValueError", id="no-message"),
        pytest.param(
            ToolError("the chat was deleted"), "boom failed: the chat was deleted", id="tool-error"
        ),
    ],
)
def test_a_raising_tool_gives_one_readable_sentence(exception: Exception, error: str) -> None:
    registry: dict[str, Tool] = {}

    @tool(NoArguments, registry=registry)
    async def boom(args: NoArguments, ctx: ToolContext) -> JsonValue:
        """Raise."""
        raise exception

    outcome = call("boom", {}, tools=registry)
    assert outcome.result is None
    assert outcome.error == error


def test_a_long_error_is_clipped() -> None:
    registry: dict[str, Tool] = {}

    @tool(NoArguments, registry=registry)
    async def chatty(args: NoArguments, ctx: ToolContext) -> JsonValue:
        """Raise at length."""
        raise RuntimeError("x" * 10_000)

    outcome = call("chatty", {}, tools=registry)
    assert outcome.error is not None
    assert len(outcome.error) <= 500
    assert outcome.error.startswith("chatty failed: xxx")


@pytest.mark.parametrize(
    "result",
    [
        pytest.param(float("nan"), id="nan"),
        pytest.param({1, 2}, id="set"),
        pytest.param({"when": datetime(2026, 1, 1)}, id="datetime"),
    ],
)
def test_a_result_that_is_not_json_is_a_failure(result: object) -> None:
    registry: dict[str, Tool] = {}

    @tool(NoArguments, registry=registry)
    async def odd(args: NoArguments, ctx: ToolContext) -> JsonValue:
        """Return something JSON cannot hold."""
        return cast(JsonValue, result)

    outcome = call("odd", {}, tools=registry)
    assert outcome.result is None
    assert outcome.error is not None
    assert outcome.error.startswith("odd failed: ")


def test_cancellation_propagates_through_run_tool_call() -> None:
    registry: dict[str, Tool] = {}
    events: list[str] = []

    async def main() -> None:
        started = anyio.Event()

        @tool(NoArguments, timeout=30, registry=registry)
        async def hang(args: NoArguments, ctx: ToolContext) -> JsonValue:
            """Wait forever."""
            started.set()
            try:
                await anyio.sleep_forever()
            finally:
                events.append("tool cleaned up")
            return None

        async def caller() -> None:
            try:
                outcome = await run_tool_call("hang", "{}", FakeChat().context(), registry)
            except anyio.get_cancelled_exc_class():
                events.append("caller cancelled")
                raise
            events.append(f"returned {outcome}")

        async with anyio.create_task_group() as group:
            group.start_soon(caller)
            await started.wait()
            group.cancel_scope.cancel()

    anyio.run(main)
    assert events == ["tool cleaned up", "caller cancelled"]


@pytest.mark.parametrize(
    ("outcome", "content"),
    [
        pytest.param(ToolOutcome({"expression": "2+2"}, 4, None), '{"result": 4}', id="result"),
        pytest.param(
            ToolOutcome({}, {"title": "Café"}, None), '{"result": {"title": "Café"}}', id="unicode"
        ),
        pytest.param(ToolOutcome({}, None, None), '{"result": null}', id="null-result"),
        pytest.param(
            ToolOutcome("{", None, "arguments are not valid JSON: x"),
            '{"error": "arguments are not valid JSON: x"}',
            id="error",
        ),
    ],
)
def test_tool_message_content(outcome: ToolOutcome, content: str) -> None:
    assert tool_message_content(outcome) == content


def test_tool_message_content_of_a_real_outcome_round_trips() -> None:
    outcome = call("calculate", {"expression": "1/0"})
    assert json.loads(tool_message_content(outcome)) == {"error": outcome.error}


# --- Schemas -------------------------------------------------------------------------------
#
# An independent reading of OpenAI's strict-mode rules (Structured Outputs, "Supported
# schemas"), so that the test does not check tools.py against itself.

COMMON_KEYWORDS = {"type", "description", "enum", "const", "anyOf", "$ref", "$defs"}
TYPE_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "boolean": set(),
    "null": set(),
}
FORMATS = {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}


def strict_problems(node: Any, path: str = "$", *, root: bool = True) -> list[str]:
    """Every way the schema breaks strict mode; [] when it is valid."""
    if not isinstance(node, dict):
        return [f"{path}: not an object"]
    problems = []
    if root and (node.get("type") != "object" or "anyOf" in node):
        problems.append(f"{path}: the root must be a plain object")
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    allowed = set(COMMON_KEYWORDS)
    for kind in types:
        if kind not in TYPE_KEYWORDS:
            problems.append(f"{path}: unknown type {kind!r}")
        allowed |= TYPE_KEYWORDS.get(kind, set())
    problems += [f"{path}: keyword {key!r} not allowed" for key in sorted(set(node) - allowed)]
    if "type" not in node and "anyOf" not in node and "$ref" not in node and "enum" not in node:
        problems.append(f"{path}: no type")
    if "format" in node and node["format"] not in FORMATS:
        problems.append(f"{path}: format {node['format']!r} not supported")
    if "object" in types:
        properties = node.get("properties")
        if not isinstance(properties, dict):
            problems.append(f"{path}: an object needs properties")
            properties = {}
        if node.get("additionalProperties") is not False:
            problems.append(f"{path}: additionalProperties must be false")
        if sorted(node.get("required", [])) != sorted(properties):
            problems.append(f"{path}: every property must be required")
        for key, value in properties.items():
            problems += strict_problems(value, f"{path}.{key}", root=False)
    if "array" in types:
        problems += strict_problems(node.get("items"), f"{path}[]", root=False)
    for i, variant in enumerate(node.get("anyOf", [])):
        problems += strict_problems(variant, f"{path}|{i}", root=False)
    for key, value in node.get("$defs", {}).items():
        problems += strict_problems(value, f"$defs.{key}", root=False)
    return problems


GOOD_OBJECT: dict[str, Any] = {
    "type": "object",
    "properties": {"a": {"type": "string"}},
    "required": ["a"],
    "additionalProperties": False,
}


def with_property(schema: dict[str, Any]) -> dict[str, Any]:
    """GOOD_OBJECT with its one property replaced."""
    return {**GOOD_OBJECT, "properties": {"a": schema}}


@pytest.mark.parametrize(
    "schema",
    [
        pytest.param({**GOOD_OBJECT, "additionalProperties": True}, id="additional-properties"),
        pytest.param({**GOOD_OBJECT, "required": []}, id="optional-property"),
        pytest.param(with_property({"type": "string", "default": "x"}), id="default"),
        pytest.param(with_property({"type": "string", "maxLength": 5}), id="max-length"),
        pytest.param(with_property({"type": "string", "format": "uri"}), id="format"),
        pytest.param(with_property({"type": "object", "properties": {}}), id="nested-object"),
        pytest.param(
            with_property({"type": "array", "items": {"type": "object", "properties": {}}}),
            id="object-in-array",
        ),
        pytest.param(with_property({"anyOf": [{"type": "string", "minLength": 1}]}), id="any-of"),
        pytest.param({"anyOf": [GOOD_OBJECT]}, id="root-any-of"),
        pytest.param({**GOOD_OBJECT, "title": "Arguments"}, id="title"),
    ],
)
def test_the_strict_checker_catches_broken_schemas(schema: dict[str, Any]) -> None:
    assert strict_problems(GOOD_OBJECT) == []
    assert strict_problems(schema) != []


def test_the_shipped_tools_are_registered() -> None:
    assert set(TOOLS) >= SHIPPED
    for name, registered in TOOLS.items():
        assert registered.name == name
        assert registered.timeout > 0


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_tool_schema_is_strict_valid(name: str) -> None:
    schemas = {s["function"]["name"]: s for s in tool_schemas()}
    schema = schemas[name]
    assert schema["type"] == "function"
    function = schema["function"]
    assert set(function) == {"name", "description", "parameters", "strict"}
    assert function["strict"] is True
    assert function["description"] == TOOLS[name].description
    assert function["description"] and "\n" not in function["description"]
    assert strict_problems(function["parameters"]) == []
    # The same fields as the model validates, all of them required.
    assert function["parameters"]["required"] == list(TOOLS[name].arguments.model_fields)


def test_every_registered_schema_is_strict_valid() -> None:
    for schema in tool_schemas():
        assert strict_problems(schema["function"]["parameters"]) == [], schema


def test_length_limits_move_into_the_description() -> None:
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in tool_schemas()}
    expression = schemas["calculate"]["properties"]["expression"]
    assert expression["description"].endswith("1 to 500 characters.")
    title = schemas["set_chat_title"]["properties"]["title"]
    assert title["description"].endswith("1 to 80 characters.")
    limit = schemas["search_chat_history"]["properties"]["limit"]
    assert (limit["minimum"], limit["maximum"]) == (1, 20)


class Point(BaseModel):
    """A nested model; without extra="forbid", which strict mode still demands of it."""

    x: int
    label: str | None = None


class Drawing(BaseModel):
    """Arguments with nesting, lists, a literal and optional fields."""

    model_config = ConfigDict(extra="forbid")

    points: list[Point] = Field(min_length=1, max_length=10)
    kind: Literal["line", "polygon"]
    name: str | None = Field(default=None, max_length=20, description="Shown under it.")
    origin: Point | None = None


def test_nested_and_optional_fields_become_strict() -> None:
    registry: dict[str, Tool] = {}

    @tool(Drawing, registry=registry)
    async def draw(args: Drawing, ctx: ToolContext) -> JsonValue:
        """Draw something."""
        return {"points": len(args.points), "name": args.name}

    [schema] = tool_schemas(registry)
    parameters = schema["function"]["parameters"]
    assert strict_problems(parameters) == []
    assert parameters["required"] == ["points", "kind", "name", "origin"]
    # Optional means required but nullable.
    assert {"type": "null"} in parameters["properties"]["name"]["anyOf"]
    assert "default" not in json.dumps(parameters)

    arguments: dict[str, JsonValue] = {
        "points": [{"x": 1, "label": None}],
        "kind": "line",
        "name": None,
        "origin": None,
    }
    outcome = call("draw", arguments, tools=registry)
    assert outcome.error is None
    assert outcome.result == {"points": 1, "name": None}


def test_a_decorated_function_is_offered_and_run_without_other_changes() -> None:
    try:

        @tool(TextArguments)
        async def echo_for_test(args: TextArguments, ctx: ToolContext) -> JsonValue:
            """Repeat the text back, unchanged."""
            return {"text": args.text}

        schemas = {s["function"]["name"]: s["function"] for s in tool_schemas()}
        assert schemas["echo_for_test"]["description"] == "Repeat the text back, unchanged."
        assert strict_problems(schemas["echo_for_test"]["parameters"]) == []
        assert call("echo_for_test", {"text": "hi"}).result == {"text": "hi"}
        assert echo_for_test.__name__ == "echo_for_test"  # the function itself is unchanged
    finally:
        TOOLS.pop("echo_for_test", None)
    assert "echo_for_test" not in TOOLS


class WithDefault(BaseModel):
    """A default that strict mode cannot express."""

    model_config = ConfigDict(extra="forbid")

    limit: int = 5


class Lenient(BaseModel):
    """Accepts unknown fields."""

    text: str


def test_registration_refuses_what_strict_mode_cannot_express() -> None:
    registry: dict[str, Tool] = {}

    async def with_default(args: WithDefault, ctx: ToolContext) -> JsonValue:
        """Has a default."""
        return None

    async def lenient(args: Lenient, ctx: ToolContext) -> JsonValue:
        """Allows extra fields."""
        return None

    with pytest.raises(TypeError, match="defaults"):
        tool(WithDefault, registry=registry)(with_default)
    with pytest.raises(TypeError, match="extra='forbid'"):
        tool(Lenient, registry=registry)(lenient)
    assert registry == {}


def test_registration_refuses_duplicates_missing_docstrings_and_bad_timeouts() -> None:
    registry: dict[str, Tool] = {}

    async def twice(args: NoArguments, ctx: ToolContext) -> JsonValue:
        """Registered twice."""
        return None

    async def undocumented(args: NoArguments, ctx: ToolContext) -> JsonValue:
        return None

    async def never_ends(args: NoArguments, ctx: ToolContext) -> JsonValue:
        """Has no time limit."""
        return None

    tool(NoArguments, registry=registry)(twice)
    with pytest.raises(ValueError, match="already registered"):
        tool(NoArguments, registry=registry)(twice)
    with pytest.raises(TypeError, match="docstring"):
        tool(NoArguments, registry=registry)(undocumented)
    with pytest.raises(ValueError, match="positive timeout"):
        tool(NoArguments, timeout=0, registry=registry)(never_ends)
    assert list(registry) == ["twice"]
