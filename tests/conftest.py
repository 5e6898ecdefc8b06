"""Fixtures: a real PostgreSQL for every test, each test in a schema of its own.

``TEST_DATABASE_URL`` selects a server (CI uses the local one); without it the session
starts the embedded PostgreSQL the project ships as its default.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from service.db.embedded import start_embedded
from service.settings import Settings

SAMPLE = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    yield start_embedded(tmp_path_factory.mktemp("embedded") / "pgdata")


@pytest.fixture
async def settings(database_url: str, tmp_path: Path) -> AsyncIterator[Settings]:
    schema = f"test_{uuid.uuid4().hex[:12]}"
    (tmp_path / "spill").mkdir()
    data_dir = tmp_path / "data"
    shutil.copytree(SAMPLE, data_dir)
    yield Settings(
        database_url=database_url,
        db_schema=schema,
        data_dir=data_dir,
        tmp_dir=tmp_path / "spill",
        workers=1,
    )
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def sample_dir(settings: Settings) -> Path:
    """A fresh copy of the challenge's sample files, free to modify."""
    return settings.data_dir
