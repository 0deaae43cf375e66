"""Bad input, fuzzed: schemathesis over the app's own OpenAPI schema, and hand-written
nasties (bodies, IDs, headers) against a real uvicorn process. Never a 5xx, always the schema."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from typing import Any

import httpx2
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks as st_checks

from tests.fake_openai import FakeOpenAI, Reply, ToolCall
from tests.support import Service, make_chat, send

pytestmark = pytest.mark.e2e

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_schema_conformance,
    st_checks.response_headers_conformance,
    st_checks.negative_data_rejection,
    st_checks.positive_data_acceptance,
]


@pytest.fixture
def api_schema(shared_service: Service, fake: FakeOpenAI) -> Any:
    """The service's own OpenAPI document, as the running process serves it."""
    return schemathesis.openapi.from_url(f"{shared_service.base_url}/openapi.json", timeout=10)


@pytest.fixture
def real_ids(client: httpx2.Client) -> dict[str, str]:
    """A chat with a finished exchange, so that fuzzed cases can also hit real resources."""
    chat = make_chat(client)
    _, events = send(client, chat["id"], "hello")
    return {"chat_id": chat["id"], "message_id": events[-1].message()["id"]}


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_within_its_schema(
    case: Any, real_ids: dict[str, str], client: httpx2.Client
) -> None:
    # Half the cases name real resources (decided by the drawn id, so shrinking is stable):
    # random ids alone would only ever test the 404 path.
    params = case.path_parameters or {}
    if "chat_id" in params and len(str(params["chat_id"])) % 2 == 0:
        chat = real_ids["chat_id"]
        if case.method.upper() == "DELETE":
            chat = make_chat(client)["id"]  # keep the shared one for the other cases
        params["chat_id"] = chat
        if "message_id" in params and len(str(params["message_id"])) % 3 != 0:
            params["message_id"] = real_ids["message_id"]
        # A key reused with other content is a 422 by contract (API.md), a state the schema
        # cannot express: on the shared chat each case gets a key of its own.
        for name in list(case.headers or {}):
            if name.lower() == "idempotency-key":
                case.headers[name] = f"fuzz-{secrets.token_hex(8)}"
    # Streams are bounded: the fake's replies are short, and every read has a time-out.
    case.call_and_validate(checks=CHECKS, timeout=15)


# Hand-written cases


def messages_of(client: httpx2.Client, chat_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/chats/{chat_id}/messages")
    assert response.status_code == 200
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def raw_request(service: Service, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes on a new connection and read until the server closes it (or stops
    answering); returns what came back (empty if it just closed)."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may answer and close before taking everything
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received and b"connection: close" not in received.lower():
                    # a keep-alive answer: enough once the head and a short body are in
                    head, _, body = received.partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":")[1])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length:")
                    ]
                    if length and len(body) >= length[0]:
                        break
        except ConnectionResetError:
            pass
        return received


def status_of(answer: bytes) -> int | None:
    """The status code of a raw HTTP answer, or None when the connection just closed."""
    if not answer:
        return None
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "content_type",
    [pytest.param("application/json", id="json"), pytest.param("text/plain", id="text")],
)
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xff\xfe\xfd", id="garbage"),
        pytest.param(b'{"content": "caf\xe9"}', id="latin-1-in-json"),
        pytest.param(b'{"content": "\xed\xa0\x80"}', id="utf-8-surrogate"),
        pytest.param(b'{"content": "\\ud800"}', id="escaped-lone-surrogate"),
        pytest.param(b'{"content": "ok", "\\udfff": 1}', id="surrogate-field-name"),
    ],
)
def test_bodies_that_are_not_utf8_or_not_unicode_are_422(
    client: httpx2.Client, fake: FakeOpenAI, body: bytes, content_type: str
) -> None:
    chat = make_chat(client)
    headers = {"Content-Type": content_type}
    for method, url in [
        ("POST", "/chats"),
        ("PATCH", f"/chats/{chat['id']}"),
        ("POST", f"/chats/{chat['id']}/messages"),
    ]:
        response = client.request(method, url, content=body, headers=headers)
        assert response.status_code == 422, (method, url, response.text)
        assert isinstance(response.json()["detail"], list)
    assert messages_of(client, chat["id"]) == []
    assert fake.requests == []


@pytest.mark.parametrize("depth", [pytest.param(50, id="50"), pytest.param(200_000, id="200k")])
def test_deeply_nested_json_is_422(client: httpx2.Client, depth: int) -> None:
    chat = make_chat(client)
    # Both under MAX_REQUEST_BYTES (1 MiB): 200k brackets, 100k objects.
    for nested in [
        b"[" * depth + b"]" * depth,
        b'{"a":' * (depth // 2) + b"1" + b"}" * (depth // 2),
    ]:
        body = b'{"content": ' + nested + b"}"
        for method, url in [
            ("POST", "/chats"),
            ("PATCH", f"/chats/{chat['id']}"),
            ("POST", f"/chats/{chat['id']}/messages"),
        ]:
            response = client.request(
                method, url, content=body, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 422, (method, url, response.text[:200])
    assert messages_of(client, chat["id"]) == []
    assert client.get("/healthz").status_code == 200


TEN_MB = 10 * 1024 * 1024


def test_a_10_mb_body_with_content_length_is_413(
    client: httpx2.Client, fake: FakeOpenAI, shared_service: Service
) -> None:
    chat = make_chat(client)
    body = b'{"content": "' + b"x" * TEN_MB + b'"}'
    # The 413 comes before the body is read, so the client may still be sending: raw socket.
    for path in ["/chats", f"/chats/{chat['id']}/messages", f"/chats/{chat['id']}"]:
        method = b"PATCH" if path == f"/chats/{chat['id']}" else b"POST"
        head = (
            method + b" " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        answer = raw_request(shared_service, head + body)
        assert status_of(answer) == 413, answer[:300]
        assert b"larger than" in answer
    assert messages_of(client, chat["id"]) == []
    assert fake.requests == []


def test_a_10_mb_chunked_body_is_413(
    client: httpx2.Client, fake: FakeOpenAI, shared_service: Service
) -> None:
    chat = make_chat(client)

    def chunked(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
        yield b'{"content": "'
        for _ in range(total // size):
            yield b"x" * size
        yield b'"}'

    for method, path in [
        ("POST", "/chats"),
        ("POST", f"/chats/{chat['id']}/messages"),
        ("PATCH", f"/chats/{chat['id']}"),
    ]:
        try:
            response = client.request(
                method, path, content=chunked(TEN_MB), headers={"Content-Type": "application/json"}
            )
        except httpx2.TransportError:
            # It may answer and close while we still send; then read its answer raw instead.
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunked(2 * 1024 * 1024))
            answer = raw_request(shared_service, head + chunks + b"0\r\n\r\n")
            assert status_of(answer) == 413, answer[:300]
        else:
            assert response.status_code == 413, response.text[:300]
            assert "larger than" in response.json()["detail"]
    assert messages_of(client, chat["id"]) == []
    assert fake.requests == []


def test_a_body_just_under_the_limit_is_read(client: httpx2.Client) -> None:
    chat = make_chat(client)
    # 1 MiB is the default MAX_REQUEST_BYTES; this one is valid JSON and too long a title.
    body = b'{"title": "' + b"x" * (1024 * 1024 - 64) + b'"}'
    response = client.patch(
        f"/chats/{chat['id']}", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422


SNEAKY_IDS = [
    pytest.param("..%2F..%2Fetc%2Fpasswd", id="dotdot-encoded-slash"),
    pytest.param("%2e%2e", id="encoded-dots"),
    pytest.param("x" * 8000, id="very-long"),
    pytest.param("%F0%9F%92%AC%D1%87%D0%B0%D1%82", id="unicode"),
    pytest.param("%00", id="nul"),
    pytest.param("chat_%00", id="prefix-nul"),
    pytest.param("%C0%AE%C0%AE", id="overlong-utf8"),
    pytest.param("%FF%FE", id="not-utf8"),
    pytest.param("%27%20OR%20%271%27%3D%271", id="sql-or"),
    pytest.param("%25", id="percent"),
    pytest.param("chat_%2A", id="wildcard"),
]


@pytest.mark.parametrize("sneaky", SNEAKY_IDS)
def test_ids_with_path_tricks_are_404(client: httpx2.Client, sneaky: str) -> None:
    chat = make_chat(client)
    _, events = send(client, chat["id"], "hello")
    reply_id = events[-1].message()["id"]
    real = chat["id"]
    requests = [
        ("GET", f"/chats/{sneaky}"),
        ("PATCH", f"/chats/{sneaky}"),
        ("DELETE", f"/chats/{sneaky}"),
        ("GET", f"/chats/{sneaky}/messages"),
        ("POST", f"/chats/{sneaky}/messages"),
        ("GET", f"/chats/{real}/messages/{sneaky}"),
        ("GET", f"/chats/{sneaky}/messages/{reply_id}"),
        ("GET", f"/chats/{real}/messages/{sneaky}/stream"),
        ("GET", f"/chats/{sneaky}/messages/{reply_id}/stream"),
        ("POST", f"/chats/{real}/messages/{sneaky}/cancel"),
        ("GET", f"/chats/{real}/messages?after={sneaky}"),
        ("GET", f"/chats?after={sneaky}"),
    ]
    for method, url in requests:
        body = {"content": "x"} if method == "POST" and url.endswith("/messages") else None
        response = client.request(method, url, json=body if method != "GET" else None)
        assert response.status_code in {404, 405}, (method, url[:80], response.text[:200])
    # Nothing was touched: the real chat and its exchange are as they were.
    assert client.get(f"/chats/{real}").status_code == 200
    assert [m["id"] for m in messages_of(client, real)][1] == reply_id


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("abc", id="text"),
        pytest.param("\u00b2", id="superscript-two"),
        pytest.param("1.5", id="fraction"),
        pytest.param("-1", id="negative"),
        pytest.param(" ", id="blank"),
        pytest.param("9" * 5000, id="5000-digits"),
        pytest.param("0x2", id="hex"),
    ],
)
def test_last_event_id_that_is_not_a_number_replays_everything(
    client: httpx2.Client, shared_service: Service, value: str
) -> None:
    chat = make_chat(client)
    _, events = send(client, chat["id"], "hello")
    reply_id = events[-1].message()["id"]
    path = f"/chats/{chat['id']}/messages/{reply_id}/stream"
    # Raw bytes: the header is latin-1 on the wire, as a browser could send it.
    head = f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".encode()
    answer = raw_request(
        shared_service, head + b"Last-Event-ID: " + value.encode("latin-1") + b"\r\n\r\n"
    )
    assert status_of(answer) == 200, answer[:300]
    body = answer.partition(b"\r\n\r\n")[2].decode()
    # The reply finished: its stream is its whole live log (not yet pruned), from id 1.
    assert "id: 1\n" in body and "event: message.done" in body


def test_after_with_thousands_of_digits_is_422(client: httpx2.Client) -> None:
    chat = make_chat(client)
    _, events = send(client, chat["id"], "hello")
    url = f"/chats/{chat['id']}/messages/{events[-1].message()['id']}/stream"
    assert client.get(url, params={"after": "9" * 5000}).status_code == 422
    assert (
        client.get(f"/chats/{chat['id']}/messages", params={"limit": "9" * 5000}).status_code == 422
    )


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(b"".join(b"X-Flood-%d: v\r\n" % i for i in range(10_000)), id="10k-headers"),
        pytest.param(b"X-Big: " + b"a" * 1_000_000 + b"\r\n", id="1mb-header"),
        pytest.param(b"Cookie: " + b"c=" + b"b" * 70_000 + b"\r\n", id="70kb-cookie"),
    ],
)
def test_header_floods_are_refused_not_500(
    shared_service: Service, client: httpx2.Client, headers: bytes
) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + headers + b"\r\n"
    status = status_of(raw_request(shared_service, request))
    # h11 answers 400 past 16 KiB; with httptools the app's own limit answers 431.
    assert status is None or 400 <= status < 500, status
    assert client.get("/healthz").status_code == 200


def test_ordinary_headers_pass_the_header_limit(shared_service: Service) -> None:
    request = (
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        + b"".join(b"X-Normal-%d: %s\r\n" % (i, b"v" * 100) for i in range(50))
        + b"\r\n"
    )
    assert status_of(raw_request(shared_service, request)) == 200


@pytest.mark.parametrize(
    "request_line",
    [
        pytest.param(b"GET /chats/\xff\xfe HTTP/1.1", id="non-utf8-path"),
        pytest.param(b"GET /chats/" + b"a" * 100_000 + b" HTTP/1.1", id="100kb-path"),
        pytest.param(b"POST /chats HTTP/1.1\r\nContent-Length: abc", id="bad-content-length"),
        pytest.param(b"POST /chats HTTP/1.1\r\nContent-Length: -5", id="negative-length"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nX-A: \x00\x01", id="control-bytes"),
        pytest.param(b"BREW /chats HTTP/1.1", id="unknown-method"),
    ],
)
def test_malformed_requests_are_4xx_or_closed(
    shared_service: Service, client: httpx2.Client, request_line: bytes
) -> None:
    request = request_line + b"\r\nHost: t\r\nConnection: close\r\n\r\n"
    status = status_of(raw_request(shared_service, request))
    assert status is None or 400 <= status < 500, status
    assert client.get("/healthz").status_code == 200


def test_every_kind_of_stream_event_matches_the_documented_schema(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    """The fuzzer's replies are plain text; this one has tool calls (one with arguments that
    are not JSON) and a title change, so every event in the schema is checked."""
    doc = client.get("/openapi.json").json()
    variants = doc["paths"]["/chats/{chat_id}/messages"]["post"]["responses"]["200"]["content"][
        "text/event-stream"
    ]["schema"]["anyOf"]
    chat = make_chat(client)
    fake.push(
        Reply(
            chunks=["Let me see. "],
            tool_calls=[
                ToolCall("calculate", '{"expression": "6*7"}', id="call_1"),
                ToolCall("calculate", "{not json", id="call_2"),
                ToolCall("set_chat_title", '{"title": "Sums"}', id="call_3"),
            ],
        ),
        Reply(chunks=["It is ", "42."]),
    )
    _, events = send(client, chat["id"], "what is 6 times 7?")
    names = {e.name for e in events}
    assert names == {"message.created", "message.delta", "tool.call", "tool.result"} | {
        "chat.updated",
        "message.done",
    }
    for event in events:
        matching = [v for v in variants if v["properties"]["event"]["const"] == event.name]
        numbered = [v for v in matching if ("id" in v["properties"]) == (event.id is not None)]
        assert numbered, event
        data_schema = numbered[0]["properties"]["data"]["contentSchema"]
        validator = jsonschema_rs.validator_for({**data_schema, "components": doc["components"]})
        errors = [e.message for e in validator.iter_errors(event.data)]
        assert errors == [], (event.name, errors)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/static/%2e%2e/main.py", id="encoded-dots"),
        pytest.param("/static/..%2Fmain.py", id="encoded-slash"),
        pytest.param("/static/..%2F..%2F..%2Fetc%2Fpasswd", id="etc-passwd"),
        pytest.param("/static/%00", id="nul"),
        pytest.param("/static/no-such-file.js", id="missing"),
    ],
)
def test_static_paths_outside_the_web_client_are_404(client: httpx2.Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404, response.text[:200]
    assert "import" not in response.text and "root:" not in response.text
