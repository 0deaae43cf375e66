"""In-process tests of main.py's lifespan: what the app sets up around the routes (the routes
themselves are tested end to end, in test_api.py)."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import anyio
import pytest

import main
from settings import Settings


@pytest.mark.anyio
async def test_the_app_runs_with_start_up_frozen_and_a_large_young_generation(
    tmp_path: Path,
) -> None:
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'chat.db'}")
    app = main.create_app(settings)
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    async with app.router.lifespan_context(app):
        # Frozen: everything imported so far (pydantic, FastAPI, the SDK's types), not a few.
        assert gc.get_freeze_count() > 50_000
        assert gc.get_threshold()[0] == main.YOUNG_GENERATION > before[0]
        assert gc.get_threshold()[1:] == before[1:]
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


@pytest.mark.anyio
async def test_the_app_runs_at_most_worker_threads_at_once(tmp_path: Path) -> None:
    # Each worker thread keeps a SQLite connection and its page cache: a burst of requests
    # must not leave anyio's default of 40 threads behind.
    settings = Settings(_env_file=None, database_url=f"sqlite:///{tmp_path / 'chat.db'}")
    app = main.create_app(settings)
    running = peak = 0
    lock = threading.Lock()

    def query() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    async with app.router.lifespan_context(app), anyio.create_task_group() as group:
        for _ in range(30):
            group.start_soon(anyio.to_thread.run_sync, query)
    assert peak == main.WORKER_THREADS < 30
