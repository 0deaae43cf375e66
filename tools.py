"""The functions the model may call: each one an async function plus a pydantic argument model."""

import ast
import json
import math
import re
import sys
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Annotated, Any, TypeAlias, TypeVar
from zoneinfo import ZoneInfo

import anyio
import anyio.to_thread
from loguru import logger
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    field_validator,
)

__all__ = [
    "TOOLS",
    "CalculateArguments",
    "CalculationError",
    "GetCurrentTimeArguments",
    "JsonValue",
    "SearchChatHistoryArguments",
    "SetChatTitleArguments",
    "Tool",
    "ToolContext",
    "ToolError",
    "ToolOutcome",
    "calculate",
    "evaluate",
    "get_current_time",
    "run_tool_call",
    "search_chat_history",
    "set_chat_title",
    "tool",
    "tool_schemas",
]

DEFAULT_TIMEOUT = 5.0
# Error texts go back to the model (and to clients in `tool.result`): keep them short.
MAX_ERROR_CHARS = 500
MAX_VALIDATION_ERRORS = 5
# OpenAI's rule for function names.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ToolContext:
    """What a tool may reach beyond its arguments; built by replies.py for each reply."""

    chat_id: str
    # (query, limit) -> hits [{"message_id", "role", "snippet", "created_at"}], found by db.py.
    search_history: Callable[[str, int], Awaitable[list[dict[str, JsonValue]]]]
    # Renames the chat; replies.py then emits `chat.updated`.
    set_title: Callable[[str], Awaitable[None]]
    # The clock, injectable so that tests need neither sleeps nor monkeypatching.
    now: Callable[[], datetime] = field(default=_utc_now)


@dataclass(frozen=True)
class Tool:
    """One function the model may call: its name, description, argument model and limits."""

    name: str
    description: str
    arguments: type[BaseModel]
    run: Callable[[BaseModel, ToolContext], Awaitable[JsonValue]]
    timeout: float


@dataclass(frozen=True)
class ToolOutcome:
    """What came of one tool call: the arguments as sent, and a result or an error."""

    arguments: JsonValue
    result: JsonValue
    error: str | None


class ToolError(Exception):
    """An expected failure whose message is written for the model (no traceback is logged)."""


TOOLS: dict[str, Tool] = {}

ArgumentsT = TypeVar("ArgumentsT", bound=BaseModel)
ToolFunction: TypeAlias = Callable[[ArgumentsT, ToolContext], Awaitable[JsonValue]]


def tool(
    arguments: type[ArgumentsT],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    registry: dict[str, Tool] = TOOLS,
) -> Callable[[ToolFunction[ArgumentsT]], ToolFunction[ArgumentsT]]:
    """Register an async function as a tool named after it, described by its docstring."""

    def register(function: ToolFunction[ArgumentsT]) -> ToolFunction[ArgumentsT]:
        name = getattr(function, "__name__", "")
        if not _TOOL_NAME.fullmatch(name):
            raise ValueError(f"tool name {name!r} must match {_TOOL_NAME.pattern}")
        if name in registry:
            raise ValueError(f"a tool named {name!r} is already registered")
        # The docstring goes to the model verbatim, as one line.
        description = " ".join((function.__doc__ or "").split())
        if not description:
            raise TypeError(f"tool {name!r} needs a docstring: it is the model's description")
        if arguments.model_config.get("extra") != "forbid":
            raise TypeError(f"{arguments.__name__} must set extra='forbid' (strict schemas)")
        if not timeout > 0:
            raise ValueError(f"tool {name!r} needs a positive timeout, got {timeout}")
        # Fail at import time, not at the first request, if the model has no strict schema.
        _strict_parameters(arguments)

        async def run(validated: BaseModel, ctx: ToolContext) -> JsonValue:
            if not isinstance(validated, arguments):
                raise TypeError(f"{name} takes {arguments.__name__}, got {type(validated)}")
            return await function(validated, ctx)

        registry[name] = Tool(name, description, arguments, run, timeout)
        return function

    return register


# --- Schemas for Chat Completions ----------------------------------------------------------
#
# Strict function calling accepts a subset of JSON Schema (OpenAI's Structured Outputs guide,
# "Supported schemas"): every property listed in "required", "additionalProperties": false on
# every object, no "default", and only these type-specific keywords: "pattern" and "format"
# for strings, "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum" and "multipleOf"
# for numbers, "minItems" and "maxItems" for arrays. String lengths are not among them, so the
# bounds move into the description; pydantic still enforces them when the call arrives.

_KEPT_KEYWORDS = frozenset(
    {
        "type",
        "description",
        "enum",
        "const",
        "anyOf",
        "$ref",
        "$defs",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "pattern",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minItems",
        "maxItems",
    }
)
_DROPPED_KEYWORDS = frozenset({"title", "minLength", "maxLength", "default"})


def tool_schemas(tools: Mapping[str, Tool] = TOOLS) -> list[dict[str, Any]]:
    """The `tools=[...]` parameter for Chat Completions: one strict function per tool."""
    return [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": t.description,
                "parameters": _strict_parameters(t.arguments),
                "strict": True,
            },
        }
        for name, t in tools.items()
    ]


def _strict_parameters(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema rewritten for strict mode; TypeError if it cannot be."""
    schema = model.model_json_schema()
    strict = _strict_node(schema, schema, path=model.__name__)
    # The root's description is the model's docstring, written for programmers: the tool's
    # description already tells the model what the call is for.
    strict.pop("description", None)
    if strict.get("type") != "object":
        raise TypeError(f"{model.__name__}: the parameters must be an object")
    return strict


def _strict_node(node: dict[str, Any], root: dict[str, Any], *, path: str) -> dict[str, Any]:
    if "$ref" in node and len(node) > 1:
        # A $ref with siblings (say a description) is not accepted: inline the definition.
        target: Any = root
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    if "oneOf" in node:
        # Pydantic writes discriminated unions as oneOf; its variants never overlap.
        node = {**{k: v for k, v in node.items() if k != "oneOf"}, "anyOf": node["oneOf"]}
    if "default" in node and node["default"] is not None:
        raise TypeError(
            f"{path}: strict schemas cannot have defaults ({node['default']!r}); make it "
            "required, or `X | None = None`"
        )
    unknown = set(node) - _KEPT_KEYWORDS - _DROPPED_KEYWORDS
    if unknown:
        raise TypeError(f"{path}: keywords not allowed in strict schemas: {sorted(unknown)}")

    out = {k: v for k, v in node.items() if k not in _DROPPED_KEYWORDS}
    bounds = _length_bounds(node.get("minLength"), node.get("maxLength"))
    if bounds:
        text = out.get("description", "").strip()
        if text and not text.endswith("."):
            text += "."
        out["description"] = f"{text} {bounds}".strip()
    if "properties" in node:
        out["properties"] = {
            key: _strict_node(value, root, path=f"{path}.{key}")
            for key, value in node["properties"].items()
        }
        out["required"] = list(node["properties"])
    if node.get("type") == "object" or "properties" in node:
        if node.get("additionalProperties") not in (None, False):
            raise TypeError(f"{path}: objects must not allow additional properties")
        out["additionalProperties"] = False
    if isinstance(node.get("items"), dict):
        out["items"] = _strict_node(node["items"], root, path=f"{path}[]")
    if "anyOf" in node:
        out["anyOf"] = [
            _strict_node(variant, root, path=f"{path}|{i}")
            for i, variant in enumerate(node["anyOf"])
        ]
    if "$defs" in node:
        out["$defs"] = {
            key: _strict_node(value, root, path=f"$defs.{key}")
            for key, value in node["$defs"].items()
        }
    return out


def _length_bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"{low} to {high} characters."
    if high is not None:
        return f"At most {high} characters."
    if low is not None:
        return f"At least {low} characters."
    return ""


# --- Running one call ----------------------------------------------------------------------


async def run_tool_call(
    name: str, raw_arguments: str, ctx: ToolContext, tools: Mapping[str, Tool] = TOOLS
) -> ToolOutcome:
    """Parse, validate and run one call; never raises, but CancelledError propagates."""
    try:
        arguments = _parse_json(raw_arguments)
    except ValueError as exc:
        return ToolOutcome(raw_arguments, None, _clip(f"arguments are not valid JSON: {exc}"))

    found = tools.get(name)
    if found is None:
        known = ", ".join(sorted(tools)) or "none"
        return ToolOutcome(arguments, None, _clip(f"unknown tool {name!r}; known tools: {known}"))
    if not isinstance(arguments, dict):
        kind = _json_kind(arguments)
        return ToolOutcome(arguments, None, f"arguments must be a JSON object, not {kind}")
    try:
        # Strict: the JSON must have the schema's types ("5" is not an integer, nor is true).
        validated = found.arguments.model_validate_json(raw_arguments.strip() or "{}", strict=True)
    except ValidationError as exc:
        return ToolOutcome(arguments, None, _clip(f"invalid arguments: {_describe(exc)}"))

    scope: anyio.CancelScope | None = None
    try:
        with anyio.fail_after(found.timeout) as scope:
            result = await found.run(validated, ctx)
        # Whatever reaches the model and the database must be plain, finite JSON.
        json.dumps(result, allow_nan=False)
    except TimeoutError as exc:
        if scope is not None and scope.cancelled_caught:
            error = f"{name} timed out after {found.timeout:g} s"
        else:  # The tool raised TimeoutError itself, say from a socket.
            error = _failure(name, exc)
        return ToolOutcome(arguments, None, error)
    except Exception as exc:  # CancelledError is a BaseException: it propagates.
        return ToolOutcome(arguments, None, _failure(name, exc))
    return ToolOutcome(arguments, result, None)


def _parse_json(raw: str) -> JsonValue:
    if not raw.strip():
        # Some models send "" for a call without arguments.
        return {}

    def refuse_constant(token: str) -> float:
        raise ValueError(f"{token} is not a JSON number")

    def finite_float(text: str) -> float:
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(f"number {text} is out of range")
        return number

    try:
        value: JsonValue = json.loads(raw, parse_constant=refuse_constant, parse_float=finite_float)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return value


def _json_kind(value: JsonValue) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _describe(exc: ValidationError) -> str:
    """Pydantic's errors as 'field: problem; field: problem', as a person would write them."""
    problems = []
    for error in exc.errors(include_url=False)[:MAX_VALIDATION_ERRORS]:
        where = ".".join(str(part) for part in error["loc"]) or "arguments"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "model_type":
            message = "Input should be a JSON object"
        problems.append(f"{where}: {message}")
    more = exc.error_count() - MAX_VALIDATION_ERRORS
    if more > 0:
        problems.append(f"and {more} more")
    return "; ".join(problems)


def _failure(name: str, exc: Exception) -> str:
    if not isinstance(exc, ToolError):
        # The model gets one sentence; the traceback goes to the server's log.
        logger.opt(exception=exc).warning("tool {} failed", name)
    return _clip(f"{name} failed: {str(exc) or type(exc).__name__}")


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


# --- calculate -----------------------------------------------------------------------------
#
# Exact arithmetic on fractions.Fraction, by walking the AST: never eval. Every value, the
# literals included, is kept to MAX_DIGITS digits (numerator and denominator), and a power is
# refused before it is computed when its size estimate is over that, so each step costs
# microseconds and a worker thread (which cannot be killed) always ends quickly. A fractional
# power is exact when the root is (8**(1/3) is 2); otherwise it is computed in floating point,
# and so is everything that depends on it: the result is then a float.

MAX_EXPRESSION_CHARS = 500
MAX_DIGITS = 1000
# Operator nesting; "1+1+...+1" in 500 characters is 249 levels.
MAX_DEPTH = 250
_MAX_BITS = math.ceil(MAX_DIGITS * math.log2(10))
_FLOAT_MIN = Fraction(sys.float_info.min)
_FLOAT_MAX = Fraction(sys.float_info.max)
_DECIMAL = re.compile(r"(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?")


class CalculationError(ToolError):
    """Why an expression cannot be evaluated, in words meant for the model."""


@dataclass(frozen=True)
class _Number:
    value: Fraction
    # False once a floating-point step (an irrational power) took part: `value` then holds
    # a float, exactly, and the result is shown as a float.
    exact: bool


_OPERATOR_SYMBOLS: dict[type[ast.AST], str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.MatMult: "@",
    ast.Invert: "~",
    ast.Not: "not",
}
_NODE_NAMES: dict[type[ast.AST], str] = {
    ast.Call: "function calls",
    ast.Attribute: "attributes",
    ast.Subscript: "subscripts",
    ast.Compare: "comparisons",
    ast.BoolOp: "boolean operators",
    ast.Lambda: "lambdas",
    ast.IfExp: "conditional expressions",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Set: "sets",
    ast.Dict: "dicts",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.JoinedStr: "strings",
    ast.NamedExpr: "assignments",
    ast.Starred: "starred expressions",
    ast.Await: "await expressions",
    ast.Yield: "yield expressions",
    ast.YieldFrom: "yield expressions",
    ast.Slice: "slices",
}


def evaluate(expression: str) -> int | float:
    """Evaluate an arithmetic expression exactly; CalculationError says why it cannot be."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculationError(
            f"the expression is too long ({len(expression)} characters; "
            f"at most {MAX_EXPRESSION_CHARS})"
        )
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        # Includes int literals over Python's 4300-digit conversion limit.
        raise CalculationError(f"not a valid arithmetic expression: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise CalculationError(f"not a valid arithmetic expression: {exc}") from None
    try:
        number = _Evaluator(expression.strip()).eval(tree.body, 0)
    except RecursionError:
        raise CalculationError(
            f"the expression is nested too deeply (at most {MAX_DEPTH} levels)"
        ) from None
    return _to_json_number(number)


class _Evaluator:
    def __init__(self, source: str) -> None:
        self.source = source

    def eval(self, node: ast.AST, depth: int) -> _Number:
        if depth > MAX_DEPTH:
            raise CalculationError(
                f"the expression is nested too deeply (at most {MAX_DEPTH} levels)"
            )
        if isinstance(node, ast.Constant):
            return self.constant(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
            operand = self.eval(node.operand, depth + 1)
            if isinstance(node.op, ast.USub):
                return _Number(-operand.value, operand.exact)
            return operand
        if isinstance(node, ast.BinOp):
            left = self.eval(node.left, depth + 1)
            right = self.eval(node.right, depth + 1)
            return _binary(node.op, left, right)
        raise CalculationError(_not_allowed(node))

    def constant(self, node: ast.Constant) -> _Number:
        value = node.value
        if isinstance(value, bool):
            raise CalculationError("True and False are not numbers here; only numbers are allowed")
        if isinstance(value, complex):
            raise CalculationError("complex numbers are not supported")
        if isinstance(value, str | bytes):
            raise CalculationError("strings are not allowed; only numbers")
        if not isinstance(value, int | float):
            raise CalculationError(f"{value!r} is not allowed; only numbers")
        if isinstance(value, int):
            return _Number(_checked(Fraction(value)), True)
        # A float literal is read from its text, so that 0.1 is exactly 1/10.
        text = ast.get_source_segment(self.source, node)
        if text is None:
            return _Number(_checked(Fraction(value)), True)
        return _Number(_decimal(text), True)


def _not_allowed(node: ast.AST) -> str:
    allowed = "only numbers, + - * / // % ** and parentheses are allowed"
    if isinstance(node, ast.Name):
        return f"names such as {node.id!r} are not allowed; {allowed}"
    if isinstance(node, ast.UnaryOp):
        symbol = _OPERATOR_SYMBOLS.get(type(node.op), "?")
        return f"the operator {symbol!r} is not supported; {allowed}"
    what = _NODE_NAMES.get(type(node), type(node).__name__)
    return f"{what} are not allowed; {allowed}"


def _decimal(text: str) -> Fraction:
    match = _DECIMAL.fullmatch(text.replace("_", ""))
    if match is None:
        raise CalculationError(f"cannot read the number {text!r}")
    whole, fraction, exponent = match.group(1), match.group(2) or "", match.group(3) or "0"
    mantissa = int(whole + fraction or "0")
    scale = int(exponent) - len(fraction)
    if mantissa and abs(scale) > 2 * MAX_DIGITS:
        raise CalculationError(f"numbers are limited to {MAX_DIGITS} digits")
    if scale >= 0:
        return _checked(Fraction(mantissa * 10**scale))
    return _checked(Fraction(mantissa, 10**-scale))


def _checked(value: Fraction) -> Fraction:
    for part in (value.numerator, value.denominator):
        if part.bit_length() > _MAX_BITS - 4 and len(str(abs(part))) > MAX_DIGITS:
            raise CalculationError(f"numbers are limited to {MAX_DIGITS} digits")
    return value


def _binary(op: ast.operator, left: _Number, right: _Number) -> _Number:
    a, b = left.value, right.value
    exact = left.exact and right.exact
    if isinstance(op, ast.Add):
        value = a + b
    elif isinstance(op, ast.Sub):
        value = a - b
    elif isinstance(op, ast.Mult):
        value = a * b
    elif isinstance(op, ast.Div | ast.FloorDiv | ast.Mod):
        if b == 0:
            raise CalculationError("division by zero")
        if isinstance(op, ast.Div):
            value = a / b
        elif isinstance(op, ast.FloorDiv):
            value = Fraction(a // b)
        else:
            value = a % b
    elif isinstance(op, ast.Pow):
        return _power(left, right)
    else:
        symbol = _OPERATOR_SYMBOLS.get(type(op), type(op).__name__)
        hint = " (use ** for powers)" if symbol == "^" else ""
        raise CalculationError(f"the operator {symbol!r} is not supported{hint}")
    return _Number(_checked(value), True) if exact else _rounded(value)


def _power(base: _Number, exponent: _Number) -> _Number:
    a, b = base.value, exponent.value
    if a == 0 and b < 0:
        raise CalculationError("division by zero (0 to a negative power)")
    if base.exact and exponent.exact:
        if b.denominator == 1:
            return _Number(_exact_power(a, b.numerator), True)
        root = _exact_root(a, b.denominator)
        if root is not None:
            return _Number(_exact_power(root, b.numerator), True)
    # Floating point: the root is irrational, or a float took part already.
    sign = 1
    if a < 0:
        # An odd root of a negative number is real: (-2)**(1/3) is about -1.26. An exponent
        # that came out of floating point is a dyadic fraction: refused unless it is whole.
        if b.denominator % 2 == 0:
            raise CalculationError(
                "a negative number to this fractional power is not a real number"
            )
        sign = -1 if b.numerator % 2 else 1
    return _rounded(Fraction(sign * _float_power(abs(a), b)))


def _float_power(base: Fraction, exponent: Fraction) -> float:
    """base ** exponent in floating point, for base >= 0, even when base is out of float range."""
    try:
        if base == 0 or _FLOAT_MIN <= base <= _FLOAT_MAX:
            return math.pow(float(base), float(exponent))
        # (10**400 + 1) ** 0.5 is a fine float, but its base is not. Split the base into
        # m * 2**k with m near 1; 2**(k * exponent) is then exact but for its fractional part.
        k = base.numerator.bit_length() - base.denominator.bit_length()
        m = float(base / 2**k) if k >= 0 else float(base * 2**-k)
        scaled = exponent * k
        whole = math.floor(scaled)
        return math.ldexp(math.pow(m, float(exponent)) * 2.0 ** float(scaled - whole), whole)
    except OverflowError:
        raise CalculationError("the result is out of floating-point range") from None


def _exact_power(a: Fraction, n: int) -> Fraction:
    if a in (0, 1, -1) or n == 0:
        return a**n
    largest = max(abs(a.numerator), a.denominator)
    # A lower bound of the digits, so that nothing within the limit is refused.
    if n.bit_length() > 64:
        raise CalculationError(f"the result would have far more than {MAX_DIGITS} digits")
    digits = abs(n) * math.log10(largest)
    if digits > MAX_DIGITS + 1:
        raise CalculationError(
            f"the result would have about {digits:,.0f} digits; the limit is {MAX_DIGITS}"
        )
    return _checked(a**n)


def _exact_root(a: Fraction, q: int) -> Fraction | None:
    if a < 0:
        if q % 2 == 0:
            return None
        root = _exact_root(-a, q)
        return None if root is None else -root
    numerator, denominator = _integer_root(a.numerator, q), _integer_root(a.denominator, q)
    if numerator is None or denominator is None:
        return None
    return Fraction(numerator, denominator)


def _integer_root(n: int, q: int) -> int | None:
    """The exact q-th root of n >= 0, or None when it is not an integer."""
    if n < 2:
        return n
    if q >= n.bit_length():
        return None  # 1 < root < 2
    # Newton's method on integers, from above; n has at most ~3300 bits, so it takes well
    # under a millisecond whatever q is.
    x = 1 << -(-n.bit_length() // q)
    while True:
        y = ((q - 1) * x + n // x ** (q - 1)) // q
        if y >= x:
            break
        x = y
    return x if x**q == n else None


def _rounded(value: Fraction) -> _Number:
    try:
        number = float(value)
    except OverflowError:
        raise CalculationError("the result is too large for floating point") from None
    if not math.isfinite(number):
        raise CalculationError("the result is too large for floating point")
    return _Number(Fraction(number), False)


def _to_json_number(number: _Number) -> int | float:
    value = number.value
    if number.exact and value.denominator == 1:
        return value.numerator
    try:
        result = float(value)
    except OverflowError:
        raise CalculationError(
            "the result is a fraction too large to show as a decimal number"
        ) from None
    if result == 0 and value != 0:
        raise CalculationError("the result is too close to zero to show as a decimal number")
    return result


class CalculateArguments(BaseModel):
    """Arguments of `calculate`."""

    model_config = ConfigDict(extra="forbid")

    expression: str = Field(
        min_length=1,
        max_length=MAX_EXPRESSION_CHARS,
        description=(
            "Numbers (integers or decimals like 0.1 or 1.5e3), + - * / // % **, unary minus and "
            "parentheses, e.g. '(2.5 + 3) * 4' or '2**0.5'. No variables, functions or units."
        ),
    )


@tool(CalculateArguments, timeout=2.0)
async def calculate(args: CalculateArguments, ctx: ToolContext) -> JsonValue:
    """Do arithmetic exactly (decimals, fractions, big integers); use it for any calculation."""
    # CPU work goes to a thread; it is bounded, so an abandoned one ends soon after a time-out.
    return await anyio.to_thread.run_sync(evaluate, args.expression, abandon_on_cancel=True)


# --- get_current_time ----------------------------------------------------------------------


class GetCurrentTimeArguments(BaseModel):
    """Arguments of `get_current_time`."""

    model_config = ConfigDict(extra="forbid")

    timezone: str = Field(
        max_length=64,
        description="An IANA time zone name, e.g. 'Europe/Paris', 'America/New_York' or 'UTC'.",
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        # An unknown zone is the caller's mistake (a validation error), not the tool's failure.
        try:
            ZoneInfo(value)
        except (ValueError, KeyError, OSError):  # ZoneInfoNotFoundError is a KeyError.
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as 'Europe/Paris' or 'UTC'"
            ) from None
        return value


@tool(GetCurrentTimeArguments)
async def get_current_time(args: GetCurrentTimeArguments, ctx: ToolContext) -> JsonValue:
    """Get the current date, time and weekday in a time zone; use it whenever "now" matters."""
    moment = ctx.now().astimezone(ZoneInfo(args.timezone)).replace(microsecond=0)
    return {
        "timezone": args.timezone,
        "iso": moment.isoformat(),
        "weekday": _WEEKDAYS[moment.weekday()],
        "utc_offset": _utc_offset(moment.utcoffset() or timedelta(0)),
    }


# Not strftime("%A"): that follows the server's locale.
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _utc_offset(offset: timedelta) -> str:
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(offset) // timedelta(minutes=1)
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


# --- search_chat_history -------------------------------------------------------------------


class SearchChatHistoryArguments(BaseModel):
    """Arguments of `search_chat_history`."""

    model_config = ConfigDict(extra="forbid")

    query: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
        Field(description="Keywords to look for in earlier messages, e.g. 'flight number Lisbon'."),
    ]
    limit: int = Field(ge=1, le=20, description="How many messages to return at most; 5 is usual.")


@tool(SearchChatHistoryArguments)
async def search_chat_history(args: SearchChatHistoryArguments, ctx: ToolContext) -> JsonValue:
    """Search this chat's earlier messages by keywords, to recall what you can no longer see."""
    hits: list[JsonValue] = list(await ctx.search_history(args.query, args.limit))
    return {"hits": hits}


# --- set_chat_title ------------------------------------------------------------------------

MAX_TITLE_CHARS = 80


class SetChatTitleArguments(BaseModel):
    """Arguments of `set_chat_title`."""

    model_config = ConfigDict(extra="forbid")

    title: Annotated[
        str,
        StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TITLE_CHARS),
        Field(description="A short title in the chat's language, one line, e.g. 'Trip to Rome'."),
    ]

    @field_validator("title")
    @classmethod
    def _one_line(cls, value: str) -> str:
        # Cc covers \n, \r and \t; Zl and Zp are U+2028 and U+2029, line breaks too.
        if any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in value):
            raise ValueError(
                "the title must be one line, without line breaks or control characters"
            )
        return value


@tool(SetChatTitleArguments)
async def set_chat_title(args: SetChatTitleArguments, ctx: ToolContext) -> JsonValue:
    """Give this chat a short title once its topic is clear; again only if the topic changes."""
    await ctx.set_title(args.title)
    return {"title": args.title}
