"""The run records (``etl_runs``): every read and write of them, and the one final write.

A run's final status is written once, by :meth:`RunStore.finish`, guarded by
``status IN ('queued', 'running')``. A successful run writes it inside the swap's
transaction; anything that happens after that COMMIT (a cancellation while the replaced
tables are dropped, a signal, a lost connection) finds the row final and changes nothing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from .db import sql
from .db.database import (
    DATABASE_ERRORS,
    Connection,
    Pool,
    server_pid,
    terminate,
    terminate_backends,
)

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")


class RunAlreadyEnded(Exception):
    """The run's row was final before the swap could record success: do not commit."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} had already ended; its results were not swapped in")


@dataclass
class Ending:
    """How a run ended, filled in as it goes; ``record`` writes it."""

    status: str = "failed"
    message: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    stats: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None

    def as_run(self, run_id: int) -> dict[str, Any]:
        """The run's JSON fields that the ending holds (when its row cannot be read)."""
        return {
            "id": run_id,
            "status": self.status,
            "message": self.message,
            "errors": self.errors,
            "error_total": self.total,
            "stats": self.stats,
            "progress": self.progress,
        }

    def args(self) -> tuple[Any, ...]:
        return (
            self.status,
            json.dumps(self.progress) if self.progress is not None else None,
            json.dumps(self.stats) if self.stats is not None else None,
            json.dumps(self.errors),
            self.total,
            self.message,
        )


class RunStore:
    """``etl_runs`` over one pool; the SQL is in :mod:`service.db.sql`."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def create(
        self,
        conn: Connection,
        source: dict[str, Any],
        options: dict[str, Any],
        key: str | None,
        request_hash: str | None,
    ) -> asyncpg.Record:
        """Insert a queued run and take its lock on ``conn``, which then holds it."""
        async with conn.transaction():
            row = await conn.fetchrow(
                sql.INSERT_RUN, json.dumps(source), json.dumps(options), key, request_hash
            )
            assert row is not None
            await conn.fetchval(sql.RUN_LOCK, row["id"])
        return row

    async def by_id(self, run_id: int) -> asyncpg.Record | None:
        return await self.pool.fetchrow(sql.RUN_BY_ID, run_id)

    async def by_key(self, key: str | None) -> asyncpg.Record | None:
        return await self.pool.fetchrow(sql.RUN_BY_KEY, key)

    async def active(self, conn: Connection) -> asyncpg.Record | None:
        return await conn.fetchrow(sql.ACTIVE_RUN)

    async def history(self, status: str | None, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(sql.LIST_RUNS, status, limit)

    async def start(self, run_id: int) -> None:
        await self.pool.execute(sql.START_RUN, run_id)

    async def set_progress(self, run_id: int, progress: dict[str, Any]) -> None:
        await self.pool.execute(sql.SET_PROGRESS, run_id, json.dumps(progress))

    async def finish_in_swap(self, conn: Connection, run_id: int, ending: Ending) -> None:
        """Record success inside the swap's transaction; refuse if the run already ended."""
        if await conn.fetchval(sql.FINISH_RUN, run_id, *ending.args()) is None:
            raise RunAlreadyEnded(run_id)

    async def finish(self, run_id: int, ending: Ending, quiet: bool = False) -> str | None:
        """Record how the run ended, unless it already has; the status the row holds.

        A connection that stopped answering must not keep the truth from the record:
        after a failure the pool's connections are expired and the write is tried once
        more on a fresh one. None when the database could not be reached at all (the
        run stays active; recovery marks it failed once its lock is gone). ``quiet``:
        the caller tries again and has said so already.
        """
        for attempt in (1, 2):
            try:
                async with self.pool.acquire() as conn:
                    recorded = await conn.fetchval(sql.FINISH_RUN, run_id, *ending.args())
                    if recorded is None:
                        recorded = await conn.fetchval(sql.RUN_STATUS, run_id)
                return str(recorded) if recorded is not None else None
            except DATABASE_ERRORS as exc:
                if not quiet:
                    log.warning(
                        "could not record the end of the run",
                        extra={"run_id": run_id, "detail": repr(exc), "attempt": attempt},
                    )
                await self.pool.expire_connections()
        return None

    async def lock(self, conn: Connection, run_id: int) -> bool:
        return bool(await conn.fetchval(sql.RUN_LOCK, run_id))

    async def unlock(self, conn: Connection, run_id: int) -> None:
        """Release a run's lock and its connection; a dead connection is ended for good.

        A connection that stopped answering still holds the lock in its server backend,
        which is ended over a fresh connection.
        """
        pid = server_pid(conn)  # now: a connection that dies leaves its proxy empty
        try:
            await conn.fetchval(sql.RUN_UNLOCK, run_id)
        except DATABASE_ERRORS:
            terminate(conn)
            await self.pool.release(conn)
            await self.pool.expire_connections()
            await terminate_backends(self.pool, [pid])
            return
        await self.pool.release(conn)

    async def drop_leftover_tables(self, lock_timeout: float) -> bool:
        """Drop staging and replaced tables a dead run left, unless a run is active."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'")
            await conn.execute(sql.LOCK_RUNS)
            if await self.active(conn) is not None:
                return False
            for table in sql.RESULT_TABLES:
                await conn.execute(sql.drop_staging(table))
                await conn.execute(sql.drop_retired(table))
        return True

    async def orphans(self, conn: Connection) -> list[int]:
        return [row["id"] for row in await conn.fetch(sql.ORPHANED_RUNS)]
