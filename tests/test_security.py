"""Security: unguessable IDs, 404s that tell nothing, the API key kept out of every log line,
error body and repr, CORS only when asked for, and no SQL built from input."""

from __future__ import annotations

import ast
import base64
import re
import secrets
from typing import Any

import httpx2
import pytest
from pydantic import SecretStr

import llm
from replies import ReplyConfig
from settings import Settings
from tests.conftest import ServiceFactory, service_env
from tests.fake_openai import FakeOpenAI, Reply
from tests.support import ROOT, follow, make_chat, send, wait_until

KEY = "sk-test-not-a-real-key-0123456789"
ID = re.compile(r"^(chat|msg)_[A-Za-z0-9_-]{22}$")


def test_the_services_key_is_the_one_these_tests_look_for(fake: FakeOpenAI) -> None:
    assert service_env(fake)["OPENAI_API_KEY"] == KEY


# IDs


def test_new_ids_come_from_secrets_with_128_random_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    import main

    ids = [main.new_id("chat") for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(ID.match(i) for i in ids)
    raw = [base64.urlsafe_b64decode(i.removeprefix("chat_") + "==") for i in ids]
    assert {len(r) for r in raw} == {16}  # 128 bits
    # Every one of the 128 bits is a coin toss: a timestamp or a counter would fix some.
    for bit in range(128):
        ones = sum((r[bit // 8] >> (bit % 8)) & 1 for r in raw)
        assert 0.45 < ones / len(raw) < 0.55, bit
    # And they come from `secrets`, the CSPRNG.
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: f"from-secrets-{n}")
    assert main.new_id("msg") == "msg_from-secrets-16"


@pytest.mark.e2e
def test_the_service_hands_out_ids_of_that_shape(client: httpx2.Client) -> None:
    seen: list[str] = []
    for _ in range(5):
        chat = make_chat(client)
        _, events = send(client, chat["id"], "hi")
        seen += [chat["id"], events[0].message()["id"], events[-1].message()["id"]]
    assert all(ID.match(i) for i in seen), seen
    assert len(set(seen)) == len(seen)


# 404s


@pytest.mark.e2e
def test_a_message_of_another_chat_looks_exactly_like_no_message(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    mine, theirs = make_chat(client), make_chat(client)
    _, events = send(client, theirs["id"], "finished one")
    finished = events[-1].message()["id"]
    fake.push(Reply(chunks=[f"w{i} " for i in range(60)], delay=0.05))
    live = client.post(
        f"/chats/{theirs['id']}/messages",
        json={"content": "live one"},
        headers={"Accept": "application/json"},
    ).json()["assistant_message"]["id"]
    missing_chat = "chat_" + "A" * 22
    missing_message = "msg_" + "A" * 22

    def answer(method: str, url: str) -> tuple[int, Any]:
        response = client.request(method, url)
        return response.status_code, response.json()

    for message_id in [finished, live]:
        for method, suffix in [("GET", ""), ("GET", "/stream"), ("POST", "/cancel")]:
            other = answer(method, f"/chats/{mine['id']}/messages/{message_id}{suffix}")
            nothing = answer(method, f"/chats/{mine['id']}/messages/{missing_message}{suffix}")
            no_chat = answer(method, f"/chats/{missing_chat}/messages/{message_id}{suffix}")
            assert other[0] == 404
            assert other == nothing == no_chat, (method, suffix)
    # The cancels through the wrong chat stopped nothing.
    url = f"/chats/{theirs['id']}/messages/{live}"
    assert client.get(url).json()["status"] == "in_progress"
    assert wait_until(lambda: client.get(url).json()["status"] == "completed", timeout=15)


# The API key


def test_settings_and_clients_do_not_show_the_key() -> None:
    settings = Settings(_env_file=None, openai_api_key=SecretStr(KEY))
    client = llm.make_client(api_key=KEY, base_url=None, timeout=5, max_retries=0)
    config = ReplyConfig(client=client)
    for text in [
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        str(settings.model_dump()),
        repr(client),
        repr(config),
    ]:
        assert KEY not in text
        assert "not-a-real-key" not in text
    assert settings.openai_api_key is not None
    assert settings.openai_api_key.get_secret_value() == KEY


@pytest.mark.e2e
def test_the_key_is_in_no_log_line_and_no_error_body(
    start_service: ServiceFactory, fake: FakeOpenAI
) -> None:
    # Providers quote keys in errors ("Incorrect API key provided: sk-..."); the fake does too.
    quoting = f"Incorrect API key provided: {KEY}. Find your key at https://example.invalid."
    service = start_service(LOG_LEVEL="DEBUG")
    bodies: list[str] = []
    with service.client() as client:
        for reply in [
            Reply(status=401, error_message=quoting),
            Reply(status=400, error_message=quoting),
            Reply(status=500, error_message=quoting),
            Reply(chunks=["a", "b", "c"], error_after=2, error_message=quoting),
        ]:
            fake.push(reply)
            chat = make_chat(client)
            response, events = send(client, chat["id"], "go")
            bodies.append(response.text if not events else repr([e.data for e in events]))
            done = events[-1].message()
            assert done["status"] == "failed"
            bodies.append(client.get(f"/chats/{chat['id']}/messages").text)
            bodies.append(repr([e.data for e in follow(client, chat["id"], done["id"])]))
        # The 400's message did come through, with the key scrubbed out of it.
        assert any("Incorrect API key provided: ***" in body for body in bodies)
        # A failed title call (an untitled chat) is logged too.
        fake.push(Reply(chunks=["fine"]), Reply(status=400, error_message=quoting))
        chat = make_chat(client, title=None)
        _, events = send(client, chat["id"], "go")
        assert events[-1].message()["status"] == "completed"
        bodies.append(client.get(f"/chats/{chat['id']}").text)
    assert len(fake.requests) == 6
    service.stop()  # all its output flushed
    log = service.log()
    assert "no title for chat" in log  # the failures were logged, with what lay under them...
    assert "failed: auth_failed (AuthenticationError: 401 <- HTTPStatusError: 401)" in log
    assert "failed: provider_error (BadRequestError: 400 <- HTTPStatusError: 400)" in log
    assert "Incorrect API key provided" not in log  # the provider's text stays out of logs
    for text in [*bodies, log]:  # ...and nothing, anywhere, holds the key
        assert KEY not in text
        assert "not-a-real-key" not in text


# CORS


PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type,idempotency-key",
}


@pytest.mark.e2e
def test_cors_is_off_unless_configured(start_service: ServiceFactory) -> None:
    service = start_service()
    with service.client() as client:
        preflight = client.options("/chats", headers=PREFLIGHT)
        assert preflight.status_code in {400, 405}
        simple = client.get("/chats", headers={"Origin": "https://app.example"})
        assert simple.status_code == 200
        for response in [preflight, simple]:
            assert not any(h.startswith("access-control-") for h in response.headers)


@pytest.mark.e2e
def test_cors_allows_exactly_the_configured_origins(start_service: ServiceFactory) -> None:
    service = start_service(CORS_ORIGINS="https://app.example, https://other.example")
    with service.client() as client:
        preflight = client.options("/chats", headers=PREFLIGHT)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "idempotency-key" in preflight.headers["access-control-allow-headers"].lower()
        created = client.post("/chats", json={}, headers={"Origin": "https://app.example"})
        assert created.headers["access-control-allow-origin"] == "https://app.example"
        assert "location" in created.headers["access-control-expose-headers"].lower()
        assert "access-control-allow-credentials" not in created.headers  # no cookies involved
        evil = {**PREFLIGHT, "Origin": "https://evil.example"}
        refused = client.options("/chats", headers=evil)
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        simple = client.get("/chats", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in simple.headers


# SQL


SQLISH = [
    "'; DROP TABLE messages; --",
    "Robert'); DROP TABLE chats;--",
    '" OR 1=1 --',
    "x' UNION SELECT id, content FROM messages --",
    "%' OR '%'='",
]


@pytest.mark.e2e
def test_sql_in_content_titles_keys_and_cursors_is_just_text(
    client: httpx2.Client, fake: FakeOpenAI
) -> None:
    bystander = make_chat(client)
    send(client, bystander["id"], "I was here first")
    for sql in SQLISH:
        chat = make_chat(client, title=sql, system_prompt=sql)
        assert chat["title"] == sql and chat["system_prompt"] == sql
        response, events = send(client, chat["id"], sql, **{"Idempotency-Key": sql})
        assert response.status_code == 200 and events[0].message()["content"] == sql
        assert client.get(f"/chats/{chat['id']}").json()["title"] == sql
        stored = client.get(f"/chats/{chat['id']}/messages").json()["data"]
        assert [m["content"] for m in stored][0] == sql
        # Used as cursors and ids, they name nothing.
        assert client.get("/chats", params={"after": sql}).status_code == 404
        url = f"/chats/{chat['id']}/messages"
        assert client.get(url, params={"after": sql}).status_code == 404
        assert client.get(f"/chats/{chat['id']}/messages/{sql}").status_code == 404
    assert fake.requests[-1]["messages"][0]["content"].count(SQLISH[-1]) == 1
    # Everything else is still there.
    assert client.get(f"/chats/{bystander['id']}/messages").json()["data"][0]["content"] == (
        "I was here first"
    )
    assert client.get("/healthz").json()["database"] == "ok"


# Interpolations db.py may put in SQL text: its module constants (column lists, made at import
# time, before any request), a column name checked against a fixed set, a migration
# statement, an int. Anything else is a value: it goes in a `?`.
ALLOWED_IN_SQL = {"column", "statement"}


def _sql_text_is_safe(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Name):
        return node.id in ALLOWED_IN_SQL or node.id.isupper()
    if isinstance(node, ast.JoinedStr):
        return all(
            isinstance(part, ast.Constant) or _sql_text_is_safe(part.value)  # type: ignore[attr-defined]
            for part in node.values
        )
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id == "int"
    return False


def test_db_builds_no_sql_from_input() -> None:
    source = (ROOT / "db.py").read_text()
    calls = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"execute", "executemany", "executescript"}
    ]
    assert len(calls) > 20  # the check sees db.py's queries
    unsafe = [ast.get_source_segment(source, c) for c in calls if not _sql_text_is_safe(c.args[0])]
    assert unsafe == []
    # The one place a name is interpolated checks it against a fixed set first.
    assert 'allowed = {"title", "system_prompt"}' in source
