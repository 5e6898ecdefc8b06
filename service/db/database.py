"""Connecting: a configured URL or the embedded server, one pool, the schema."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..settings import Settings
from . import sql
from .embedded import start_embedded

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"


async def resolve_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    return await asyncio.to_thread(start_embedded, settings.embedded_dir)


# A database that does not answer must fail requests fast, not after asyncpg's 60 s.
CONNECT_TIMEOUT = 5.0


def connect_kwargs(settings: Settings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"command_timeout": None, "timeout": CONNECT_TIMEOUT}
    if settings.db_schema:
        kwargs["server_settings"] = {"search_path": settings.db_schema}
    return kwargs


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def ensure_schema(conn: Connection, schema: str | None) -> None:
    async with conn.transaction():
        await conn.execute(sql.SCHEMA_LOCK)
        if schema:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
        await conn.execute(sql.SCHEMA)


@asynccontextmanager
async def open_pool(
    settings: Settings, url: str | None = None, *, lazy: bool = False
) -> AsyncIterator[Pool]:
    """A pool on the configured (or embedded) database with the schema in place.

    ``lazy`` opens no connection and creates no schema, so a server can start while its
    database is down; it then calls :func:`ensure_schema` once the database answers.
    """
    dsn = url or await resolve_url(settings)
    pool = await asyncpg.create_pool(
        dsn, min_size=0 if lazy else 1, max_size=10, **connect_kwargs(settings)
    )
    try:
        if not lazy:
            async with pool.acquire() as conn:
                await ensure_schema(conn, settings.db_schema)
        yield pool
    finally:
        await pool.close()
