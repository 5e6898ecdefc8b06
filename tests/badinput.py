"""Helpers for robustness tests: edit one sample file, look at everything a run left behind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from service.db import sql
from service.settings import Settings

TABLES = tuple(sql.RESULT_TABLES)
Tables = dict[str, list[tuple[Any, ...]]]


@asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": settings.db_schema or "public"}
    )
    try:
        yield conn
    finally:
        await conn.close()


async def snapshot(settings: Settings) -> Tables:
    """Every row of the three result tables, ordered."""
    async with connect(settings) as conn:
        return {
            t: [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} ORDER BY user_id")]
            for t in TABLES
        }


async def run_rows(settings: Settings) -> list[dict[str, Any]]:
    """The etl_runs rows, oldest first, as the tests compare them."""
    async with connect(settings) as conn:
        rows = await conn.fetch(
            "SELECT id, status, errors::text, error_total, message FROM etl_runs ORDER BY id"
        )
    return [dict(r) for r in rows]


async def scratch_tables(settings: Settings) -> list[str]:
    """Staging tables, and result tables a swap replaced: a finished run leaves neither."""
    async with connect(settings) as conn:
        rows = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1"
            " AND (tablename LIKE '%staging' OR tablename LIKE '%retired')",
            settings.db_schema,
        )
    return [r["tablename"] for r in rows]


async def checksum(settings: Settings) -> dict[str, tuple[int, str]]:
    """Row count and md5 of each result table's rows, in user order."""
    async with connect(settings) as conn:
        out = {}
        for t in TABLES:
            row = await conn.fetchrow(
                f"SELECT count(*) AS n, md5(coalesce(string_agg(t::text, '|' ORDER BY user_id),"
                f" '')) AS sum FROM {t} AS t"
            )
            assert row is not None
            out[t] = (row["n"], row["sum"])
        return out


def replace(path: Path, old: bytes, new: bytes, count: int = 1) -> None:
    """Replace ``old`` in a file, insisting that it is there ``count`` times."""
    data = path.read_bytes()
    assert data.count(old) == count, (path.name, old, data.count(old))
    path.write_bytes(data.replace(old, new))


def leftovers(directory: Path) -> list[Path]:
    """Files and folders a run left in its spill directory."""
    return sorted(directory.rglob("*"))
