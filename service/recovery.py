"""Start-up and recovery: what dead processes left behind is cleaned up or marked failed.

- At start-up, the temporary directories of stopped processes of this service are
  removed (:mod:`service.scratch` tells them from a live process's by a lock).
- A run whose row is active but whose run lock nobody holds belongs to a process that
  died: it is marked failed, at start-up and then every ``reap_interval`` seconds by
  every server (like Airflow's zombie-task detection), so a surviving replica marks the
  run of a dead one within about that time.
- Worker processes that could not be replaced after a death are tried again each round.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .db.database import DATABASE_ERRORS, ensure_schema
from .jobs import Runner
from .runstore import Ending, RunStore
from .scratch import clean_leftovers
from .workers import WorkerPool

log = logging.getLogger(__name__)

# Its lock is gone: the process died, or (seen from a replica) the connection that held
# the lock did, as when the database restarted under a running run.
ORPHANED = (
    "the process running this run stopped unexpectedly, or lost its connection to the"
    " database; nothing was loaded"
)


async def recover(store: RunStore, settings: Any) -> list[int]:
    """Start-up cleanup: abandoned temporary directories, then orphaned runs."""
    await asyncio.to_thread(clean_leftovers, settings.tmp_dir)
    return await reap(store, settings.lock_timeout)


async def reap(store: RunStore, lock_timeout: float = 5.0, mine: int | None = None) -> list[int]:
    """Mark runs whose process died as failed, and drop the tables they left; the ids.

    ``mine``: the run this process is running, never an orphan here, even while its
    lock is gone with a connection the database lost (the run ends itself on that).
    """
    marked: list[int] = []
    async with store.pool.acquire() as conn:
        for run_id in await store.orphans(conn):
            if run_id == mine or not await store.lock(conn, run_id):
                continue  # its process is alive and holds the lock
            try:
                if await store.finish(run_id, Ending("failed", ORPHANED)) == "failed":
                    marked.append(run_id)
            finally:
                await store.unlock(conn, run_id)
    for run_id in marked:
        log.warning("orphaned run marked failed", extra={"run_id": run_id, "event": "recover"})
    if marked:
        await store.drop_leftover_tables(lock_timeout)
    return marked


async def bootstrap(runner: Runner, retry_every: float = 1.0) -> None:
    """Create the schema and recover, as soon as the database answers; then ready."""
    runner.ready = False
    settings = runner.settings
    while True:
        try:
            async with runner.pool.acquire() as conn:
                await ensure_schema(conn, settings.db_schema)
            await recover(runner.store, settings)
        except DATABASE_ERRORS as exc:
            log.warning(
                "database not available yet; retrying",
                extra={"event": "bootstrap", "detail": repr(exc)},
            )
            await asyncio.sleep(retry_every)
            continue
        runner.ready = True
        log.info("database ready", extra={"event": "bootstrap"})
        return


async def reap_forever(runner: Runner, interval: float) -> None:
    """Every ``interval`` s: mark runs of dead replicas failed (and remove what they left
    in a spill directory shared with this one), repair broken workers."""
    while True:
        await asyncio.sleep(interval)
        workers = runner.executor
        if isinstance(workers, WorkerPool) and workers.needs_repair and runner.task_done():
            await asyncio.to_thread(workers.heal)
        if not runner.ready:
            continue
        mine = None if runner.task_done() else runner.run_id
        try:
            if await reap(runner.store, runner.settings.lock_timeout, mine):
                await asyncio.to_thread(clean_leftovers, runner.settings.tmp_dir)
        except DATABASE_ERRORS as exc:
            log.warning("reaper: database unavailable", extra={"detail": repr(exc)})
