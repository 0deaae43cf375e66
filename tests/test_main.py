"""In-process tests of main.py's lifespan: what the app sets up around the routes (the routes
themselves are tested end to end, in test_api.py)."""

from __future__ import annotations

import gc
from pathlib import Path

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
