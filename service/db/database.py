"""Connecting: a configured URL or the embedded server, one pool, the schema."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..settings import Settings
from . import sql
from .embedded import embedded_running, start_embedded

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

log = logging.getLogger(__name__)


async def resolve_url(settings: Settings) -> str:
    if settings.database_url:
        return settings.database_url
    return await asyncio.to_thread(start_embedded, settings.embedded_dir)


# A database that does not answer must fail requests fast, not after asyncpg's 60 s.
CONNECT_TIMEOUT = 5.0
# The server probes an idle client after 30 s, every 10 s, 3 times: a backend whose client
# vanished (half-open connection) ends within ~60 s and frees its locks. Ignored on Unix
# sockets. (asyncpg has no client-side keepalive option; every call is bounded instead.)
SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}


def connect_kwargs(settings: Settings) -> dict[str, Any]:
    """Every call bounded: connecting, and each statement (``settings.db_timeout``)."""
    server_settings = dict(SERVER_KEEPALIVES)
    if settings.db_schema:
        server_settings["search_path"] = settings.db_schema
    return {
        "command_timeout": settings.db_timeout,
        "timeout": min(CONNECT_TIMEOUT, settings.db_timeout),
        "server_settings": server_settings,
    }


# What a database call can raise when the database, or the way to it, is gone.
DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


def server_pid(conn: Connection) -> int | None:
    """The server backend of a pool connection; None once the connection died (the pool
    has then taken it back, and its proxy answers nothing)."""
    try:
        return conn.get_server_pid()
    except asyncpg.InterfaceError:
        return None


def terminate(conn: Connection) -> None:
    """Close a failed connection at once; one that died is already back in the pool."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


async def to_the_end(step: Awaitable[None]) -> None:
    """Run ``step`` to its end even if the caller is cancelled meanwhile, and only then
    pass the cancellation on. ``asyncio.shield`` alone lets the caller go on at once:
    a pool release then ran beside an abort that had not yet ended the connections (it
    waited 2 s on a frozen one), and the staging tables were dropped after the run was
    recorded as over."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        break
    if cancelled:
        raise asyncio.CancelledError


async def terminate_backends(pool: Pool, pids: list[int | None]) -> None:
    """End the server backends of connections that stopped answering, over a fresh one.

    Such a backend lives on (holding its locks: a run lock, a staging table) until its
    TCP keepalives fail; ending it lets the next run proceed at once.
    """
    pids = [pid for pid in pids if pid is not None]
    if not pids:
        return
    try:
        async with pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
            await conn.fetchval(sql.TERMINATE_BACKENDS, pids)
    except DATABASE_ERRORS as exc:
        log.warning("could not end dead connections' backends %s: %r", pids, exc)


EMBEDDED_CHECK_INTERVAL = 1.0  # seconds between looks at the embedded server


async def keep_embedded_up(settings: Settings, pool: Pool) -> None:
    """The embedded server, started again whenever it stops (killed by the OOM killer,
    say): a server on the default database recovers by itself, as it does when a
    configured database comes back. Runs until cancelled; each outage is one line."""
    down = False
    while True:
        await asyncio.sleep(EMBEDDED_CHECK_INTERVAL)
        if await asyncio.to_thread(embedded_running, settings.embedded_dir):
            continue
        if not down:
            log.warning("the embedded PostgreSQL stopped: starting it again", extra={"event": "db"})
            down = True
        try:
            # A killed postmaster's backends leave within a moment; until they have, the
            # new one cannot start, and the next look tries again.
            url = await asyncio.to_thread(start_embedded, settings.embedded_dir)
        except Exception as exc:  # whatever pg_ctl says: try again at the next look
            log.debug("the embedded PostgreSQL did not start yet: %s", exc)
            continue
        pool.set_connect_args(url, **connect_kwargs(settings))
        await pool.expire_connections()  # the old server's connections are dead
        log.info("the embedded PostgreSQL runs again", extra={"event": "db"})
        down = False


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
