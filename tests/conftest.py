"""Shared fixtures: the fake OpenAI server, and the service as a real uvicorn process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest

from tests.fake_openai import FakeOpenAI
from tests.support import Service

ServiceFactory = Callable[..., Service]


@pytest.fixture
def anyio_backend() -> str:
    """Run `@pytest.mark.anyio` tests on asyncio only (what uvicorn and the service use)."""
    return "asyncio"


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeOpenAI]:
    """One fake OpenAI server for the session (each test resets it through `fake`)."""
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def fake(fake_server: FakeOpenAI) -> FakeOpenAI:
    """The fake OpenAI server, with no scripts, rules or recorded requests."""
    fake_server.reset()
    return fake_server


def service_env(fake: FakeOpenAI, **extra: str) -> dict[str, str]:
    """The environment of a service that talks to the fake: no retries, short time-outs."""
    return {
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": "sk-test-not-a-real-key-0123456789",
        "OPENAI_MAX_RETRIES": "0",
        "OPENAI_TIMEOUT": "3",
        "OPENAI_STREAM_IDLE_TIMEOUT": "2",
        "ALLOWED_MODELS": "gpt-4o-mini,gpt-4o",
        **extra,
    }


@pytest.fixture(scope="session")
def shared_service(
    fake_server: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One service process for the tests that only need fresh chats, not a fresh process."""
    path = tmp_path_factory.mktemp("shared") / "chat.db"
    with Service(path, service_env(fake_server)) as service:
        yield service


@pytest.fixture
def client(shared_service: Service, fake: FakeOpenAI) -> Iterator[httpx2.Client]:
    """An HTTP client of the shared service (and a reset fake behind it)."""
    with shared_service.client() as http:
        yield http


@pytest.fixture
def start_service(fake: FakeOpenAI, tmp_path: Path) -> Iterator[ServiceFactory]:
    """Start services of this test's own (own file, own settings); all stopped at the end."""
    started: list[Service] = []

    def start(db_path: Path | None = None, **env: str) -> Service:
        service = Service(db_path or tmp_path / "chat.db", service_env(fake, **env))
        started.append(service.start())
        return service

    yield start
    for service in started:
        service.kill()
