"""Runs as jobs: one at a time per database, recorded in ``etl_runs``, cancellable.

Single flight holds across processes: a partial unique index allows one queued or
running row, and the process executing a run holds a session advisory lock on its id.
A run whose row is active but whose lock nobody holds belongs to a dead process; the
next start marks it failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from .cluster import ClusterError, not_ready, sized_for
from .db import sql
from .db.database import Connection, Pool, ensure_schema
from .etl import Pipeline, RunOptions, RunStats
from .pipeline.errors import InputError

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0
ACTIVE = ("queued", "running")


class RunConflict(Exception):
    def __init__(self, active_id: int) -> None:
        super().__init__(f"run {active_id} is already queued or running")
        self.active_id = active_id


class RunNotFound(Exception):
    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} not found")
        self.run_id = run_id


class IdempotencyMismatch(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was used for a different request")


class DatabaseUnavailable(Exception):
    """The database does not answer (yet): try again later."""


class RunNotActive(Exception):
    def __init__(self, run_id: int, status: str) -> None:
        super().__init__(f"run {run_id} is {status}, not running")
        self.status = status


@dataclass
class Outcome:
    """How a run ended, filled in as it goes."""

    status: str = "failed"
    stats: RunStats | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    message: str | None = None


@dataclass(frozen=True)
class RunRequest:
    source_dir: Path
    source: dict[str, Any]  # as recorded and shown: kind, name, ...
    options: RunOptions
    idempotency_key: str | None = None
    request_hash: str | None = None
    cleanup: Callable[[], None] | None = None  # e.g. removes an upload's directory


def run_to_json(row: asyncpg.Record, live: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run row as the API and the CLI show it."""

    def stamp(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    def load(value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    return {
        "id": row["id"],
        "status": row["status"],
        "created_at": stamp(row["created_at"]),
        "started_at": stamp(row["started_at"]),
        "finished_at": stamp(row["finished_at"]),
        "source": load(row["source"]),
        "options": load(row["options"]),
        "progress": live if live is not None else load(row["progress"]),
        "stats": load(row["stats"]),
        "errors": load(row["errors"]),
        "error_total": row["error_total"],
        "message": row["message"],
    }


class Runner:
    """Starts, tracks and cancels this process's run."""

    def __init__(self, pool: Pool, executor: Executor, settings: Any) -> None:
        self.pool = pool
        self.executor = executor
        self.settings = settings
        self.pipeline: Pipeline | None = None
        self.run_id: int | None = None
        self.task: asyncio.Task[dict[str, Any]] | None = None
        # False until the schema is in place and orphans are recovered (see ``bootstrap``).
        self.ready = True
        self.on_finish: Callable[[str, Pipeline, RunStats | None, float], None] | None = None

    async def submit(self, request: RunRequest) -> dict[str, Any]:
        """Record a queued run and start it in the background; the run as JSON."""
        if not self.ready:
            raise DatabaseUnavailable("the database has not answered since start-up")
        if (problem := not_ready(self.executor)) is not None:
            raise ClusterError(problem)
        if request.idempotency_key:
            existing = await self._by_key(request)
            if existing is not None:
                return existing
        conn: Connection = await self.pool.acquire()
        try:
            try:
                async with conn.transaction():
                    row = await conn.fetchrow(
                        sql.INSERT_RUN,
                        json.dumps(request.source),
                        json.dumps(request.options.to_json()),
                        request.idempotency_key,
                        request.request_hash,
                    )
                    assert row is not None
                    await conn.fetchval(sql.RUN_LOCK, row["id"])
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "etl_runs_idempotency_key_key":
                    again = await self._by_key(request)
                    if again is not None:
                        return again
                active = await conn.fetchrow(sql.ACTIVE_RUN)
                raise RunConflict(active["id"] if active else -1) from None
        except BaseException:
            await self.pool.release(conn)
            if request.cleanup is not None:
                request.cleanup()
            raise
        settings = sized_for(self.settings, self.executor)
        pipeline = Pipeline(settings, self.pool, self.executor, request.source_dir, request.options)
        self.pipeline, self.run_id = pipeline, row["id"]
        self.task = asyncio.create_task(self._execute(conn, row["id"], pipeline, request))
        # Let the task take its first step: a task cancelled before it starts never runs
        # its finally blocks, which would leak the lock connection.
        await asyncio.sleep(0)
        log.info("run queued", extra={"run_id": row["id"], "event": "queued"})
        return run_to_json(row)

    async def _by_key(self, request: RunRequest) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(sql.RUN_BY_KEY, request.idempotency_key)
        if row is None:
            return None
        if row["request_hash"] != request.request_hash:
            assert request.idempotency_key is not None
            raise IdempotencyMismatch(request.idempotency_key)
        if request.cleanup is not None:
            request.cleanup()
        return await self.get(row["id"])

    async def _execute(
        self, lock_conn: Connection, run_id: int, pipeline: Pipeline, request: RunRequest
    ) -> dict[str, Any]:
        started = time.monotonic()
        outcome = Outcome()
        try:
            await self._attempt(run_id, pipeline, outcome)
        finally:
            # One shielded step: a second cancellation cannot skip releasing the run's
            # lock connection or recording how the run ended.
            await asyncio.shield(
                self._wrap_up(lock_conn, run_id, pipeline, request, outcome, started)
            )
        return await self.get(run_id)

    async def _attempt(self, run_id: int, pipeline: Pipeline, outcome: Outcome) -> None:
        reporter = asyncio.create_task(self._report_progress(run_id, pipeline))
        try:
            await self.pool.execute(sql.START_RUN, run_id)
            log.info("run started", extra={"run_id": run_id, "event": "start"})

            async def finalize(conn: Connection, done: RunStats) -> None:
                await conn.execute(
                    sql.FINISH_RUN,
                    run_id,
                    "succeeded",
                    json.dumps(pipeline.progress.to_json()),
                    json.dumps(done.to_json()),
                    json.dumps(_errors(pipeline)),
                    pipeline.errors.total,
                    None,
                )

            outcome.stats = await pipeline.run(finalize)
            outcome.status = "succeeded"
        except InputError as exc:
            outcome.errors = [e.to_dict() for e in exc.errors]
            outcome.total, outcome.message = exc.total, str(exc)
        except asyncio.CancelledError:
            outcome.status, outcome.message = "cancelled", "cancelled; nothing was loaded"
        except ClusterError as exc:  # an operational fault: one line, no traceback
            log.error("run failed", extra={"run_id": run_id, "event": "error", "detail": str(exc)})
            outcome.message = str(exc)
        except Exception as exc:
            log.exception("run failed", extra={"run_id": run_id, "event": "error"})
            outcome.message = f"{type(exc).__name__}: {exc}"
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)

    async def _wrap_up(
        self,
        lock_conn: Connection,
        run_id: int,
        pipeline: Pipeline,
        request: RunRequest,
        outcome: Outcome,
        started: float,
    ) -> None:
        if outcome.status != "succeeded":
            await self._record_end(
                run_id, outcome.status, pipeline, outcome.errors, outcome.total, outcome.message
            )
        await self._unlock(lock_conn, run_id)
        if request.cleanup is not None:
            await asyncio.to_thread(request.cleanup)
        if self.on_finish is not None:
            self.on_finish(outcome.status, pipeline, outcome.stats, time.monotonic() - started)
        if self.pipeline is pipeline:  # the next run may have started meanwhile
            self.pipeline = None
        log.info(
            "run finished",
            extra={
                "run_id": run_id,
                "event": "finish",
                "status": outcome.status,
                "detail": outcome.message,
            },
        )

    async def _record_end(
        self,
        run_id: int,
        status: str,
        pipeline: Pipeline,
        errors: list[dict[str, Any]],
        total: int,
        message: str | None,
    ) -> None:
        try:
            await self.pool.execute(
                sql.FINISH_RUN,
                run_id,
                status,
                json.dumps(pipeline.progress.to_json()),
                None,
                json.dumps(errors),
                total,
                message,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            # The database is gone: the run stays active and the next start marks it
            # failed (its lock dies with our connection).
            log.exception("could not record the end of run", extra={"run_id": run_id})

    async def _unlock(self, conn: Connection, run_id: int) -> None:
        try:
            await conn.fetchval(sql.RUN_UNLOCK, run_id)
            await self.pool.release(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()
            await self.pool.release(conn)

    async def _report_progress(self, run_id: int, pipeline: Pipeline) -> None:
        """Mirror live progress into the run row for other processes' readers."""
        last: dict[str, Any] = {}
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            current = pipeline.progress.to_json()
            if current != last:
                try:
                    await self.pool.execute(sql.SET_PROGRESS, run_id, json.dumps(current))
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    log.warning("progress not recorded", extra={"run_id": run_id})
                last = current

    async def run_to_end(
        self, request: RunRequest, watch: Callable[[Runner], Awaitable[None]] | None = None
    ) -> dict[str, Any]:
        run = await self.submit(request)
        if watch is not None:
            await watch(self)
        result = await self.wait()
        return result if result is not None else run

    async def wait(self) -> dict[str, Any] | None:
        return await asyncio.shield(self.task) if self.task is not None else None

    async def get(self, run_id: int) -> dict[str, Any]:
        row = await self.pool.fetchrow(sql.RUN_BY_ID, run_id)
        if row is None:
            raise RunNotFound(run_id)
        live = None
        if self.pipeline is not None and self.run_id == run_id and row["status"] in ACTIVE:
            live = self.pipeline.progress.to_json()
        return run_to_json(row, live)

    async def history(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(sql.LIST_RUNS, status, limit)
        return [run_to_json(r) for r in rows]

    async def cancel(self, run_id: int) -> dict[str, Any]:
        run = await self.get(run_id)
        if run["status"] not in ACTIVE:
            raise RunNotActive(run_id, run["status"])
        if self.run_id == run_id and self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            return await self.get(run_id)
        raise RunNotActive(run_id, "running in another process")

    async def recover(self) -> list[int]:
        """Mark runs whose process died as failed; the ids marked."""
        marked: list[int] = []
        async with self.pool.acquire() as conn:
            for row in await conn.fetch(sql.ORPHANED_RUNS):
                if await conn.fetchval(sql.RUN_LOCK, row["id"]):
                    await conn.execute(
                        sql.FAIL_ORPHAN,
                        row["id"],
                        "the process running this run stopped unexpectedly; nothing was loaded",
                    )
                    await conn.fetchval(sql.RUN_UNLOCK, row["id"])
                    marked.append(row["id"])
        for run_id in marked:
            log.warning("orphaned run marked failed", extra={"run_id": run_id, "event": "recover"})
        return marked

    async def bootstrap(self, schema: str | None, retry_every: float = 1.0) -> None:
        """Create the schema and recover orphaned runs as soon as the database answers."""
        self.ready = False
        while True:
            try:
                async with self.pool.acquire() as conn:
                    await ensure_schema(conn, schema)
                await self.recover()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning(
                    "database not available yet; retrying",
                    extra={"event": "bootstrap", "detail": repr(exc)},
                )
                await asyncio.sleep(retry_every)
                continue
            self.ready = True
            log.info("database ready", extra={"event": "bootstrap"})
            return

    async def close(self) -> None:
        """Cancel the active run (rolled back, status cancelled) and wait for it."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def _errors(pipeline: Pipeline) -> list[dict[str, Any]]:
    return [e.to_dict() for e in pipeline.errors.errors]


async def run_once(
    settings: Any, source_dir: Path, options: RunOptions | None = None
) -> dict[str, Any]:
    """Open the database, run the ETL on ``source_dir`` to the end; the finished run."""
    from .db.database import open_pool
    from .etl import executor_for

    async with open_pool(settings) as pool:
        with executor_for(settings) as executor:
            runner = Runner(pool, executor, settings)
            await runner.recover()
            return await runner.run_to_end(directory_request(source_dir, options))


def directory_request(source_dir: Path, options: RunOptions | None = None) -> RunRequest:
    return RunRequest(
        source_dir=source_dir,
        source={"kind": "directory", "path": str(source_dir.resolve())},
        options=options or RunOptions(),
    )
