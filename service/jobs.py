"""Runs as jobs: one at a time per database, recorded in ``etl_runs``, cancellable.

Single flight holds across processes: a partial unique index allows one queued or
running row, and the process executing a run holds a session advisory lock on its id.
:class:`Runner` starts, tracks and cancels this process's run; :class:`RunLife` is one
run from start to its recorded end. The records and their SQL are in
:mod:`service.runstore`; start-up and recovery from dead processes in
:mod:`service.recovery`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg

from . import rejects
from .cluster import ClusterError, not_ready, sized_for
from .db.database import DATABASE_ERRORS, Connection, Pool
from .etl import Pipeline, RunOptions, RunStats
from .faults import describe
from .pipeline.errors import MAX_REPORTED_ERRORS, InputError
from .runstore import ACTIVE, Ending, RunStore
from .webhooks import Webhooks
from .workers import BrokenProcessPool, WorkerPool

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0
RECORD_RETRY = 1.0  # seconds between tries to record a run's end while the database is away
RECORD_PATIENCE = 20.0  # a server's run waits this long for its database to come back
CANCELLED = "cancelled; nothing was loaded"


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


class WorkersUnavailable(Exception):
    """No working set of worker processes could be started: try again later."""


class RunNotActive(Exception):
    def __init__(self, run_id: int, status: str) -> None:
        super().__init__(f"run {run_id} is {status}, not running")
        self.status = status


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
        "rejects": rejects.link(row["id"], row["rejects"]),  # skip mode's rejected rows
        "webhooks": load(row["webhooks"]),  # completion deliveries
    }


class Runner:
    """Starts, tracks and cancels this process's run."""

    def __init__(self, pool: Pool, executor: Executor, settings: Any) -> None:
        self.pool = pool
        self.store = RunStore(pool)
        self.executor = executor
        self.settings = settings
        self.pipeline: Pipeline | None = None
        self.run_id: int | None = None
        self.task: asyncio.Task[dict[str, Any]] | None = None
        # False until the schema is in place and orphans are recovered (see ``recovery``).
        self.ready = True
        self.on_finish: Callable[[str, Pipeline, RunStats | None, float], None] | None = None
        # Seconds a run's end waits for an unreachable database to record it (a server,
        # whose database restarts: the run's own message, not the reaper's); 0 once closing.
        self.record_patience = 0.0
        self.webhooks = Webhooks(pool, settings, self.get)

    async def submit(self, request: RunRequest) -> dict[str, Any]:
        """Record a queued run and start it in the background; the run as JSON."""
        if not self.ready:
            raise DatabaseUnavailable("the database has not answered since start-up")
        await self._repair_workers()
        if (problem := not_ready(self.executor)) is not None:
            raise ClusterError(problem)
        if request.idempotency_key:
            existing = await self._by_key(request)
            if existing is not None:
                return existing
        conn: Connection = await self.pool.acquire()
        try:
            try:
                row = await self.store.create(
                    conn,
                    request.source,
                    request.options.to_json(),
                    request.idempotency_key,
                    request.request_hash,
                )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "etl_runs_idempotency_key_key":
                    again = await self._by_key(request)
                    if again is not None:
                        return again
                active = await self.store.active(conn)
                raise RunConflict(active["id"] if active else -1) from None
        except BaseException:
            await self.pool.release(conn)
            if request.cleanup is not None:
                request.cleanup()
            raise
        settings = sized_for(self.settings, self.executor)  # a cluster's worker threads
        pipeline = Pipeline(settings, self.pool, self.executor, request.source_dir, request.options)
        self.pipeline, self.run_id = pipeline, row["id"]
        pipeline.keep_rejects = partial(
            rejects.store, self.pool, row["id"], self.settings.rejects_keep
        )
        life = RunLife(self, row["id"], pipeline, request)
        self.task = asyncio.create_task(life.execute(conn))
        # Let the task take its first step: a task cancelled before it starts never runs
        # its finally blocks, which would leak the lock connection.
        await asyncio.sleep(0)
        log.info("run queued", extra={"run_id": row["id"], "event": "queued"})
        return run_to_json(row)

    async def _repair_workers(self) -> None:
        """Workers that died are replaced before a run; 503 while that is impossible."""
        workers = self.executor
        if not isinstance(workers, WorkerPool) or not workers.needs_repair:
            return
        if not await asyncio.to_thread(workers.heal):
            raise WorkersUnavailable(workers.problem)

    async def _by_key(self, request: RunRequest) -> dict[str, Any] | None:
        row = await self.store.by_key(request.idempotency_key)
        if row is None:
            return None
        if row["request_hash"] != request.request_hash:
            assert request.idempotency_key is not None
            raise IdempotencyMismatch(request.idempotency_key)
        if request.cleanup is not None:
            request.cleanup()
        return await self.get(row["id"])

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
        row = await self.store.by_id(run_id)
        if row is None:
            raise RunNotFound(run_id)
        live = None
        if self.pipeline is not None and self.run_id == run_id and row["status"] in ACTIVE:
            live = self.pipeline.progress.to_json()
        return run_to_json(row, live)

    async def history(self, status: str | None, limit: int) -> list[dict[str, Any]]:
        return [run_to_json(r) for r in await self.store.history(status, limit)]

    async def cancel(self, run_id: int) -> dict[str, Any]:
        run = await self.get(run_id)
        if run["status"] not in ACTIVE:
            raise RunNotActive(run_id, run["status"])
        if self.run_id == run_id and self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            return await self.get(run_id)
        raise RunNotActive(run_id, "running in another process")

    def task_done(self) -> bool:
        return self.task is None or self.task.done()

    async def close(self, webhook_grace: float = 0.0) -> None:
        """Cancel the active run (rolled back, status cancelled) and wait for it; a run
        already swapped in is let finish.

        Webhook deliveries get ``webhook_grace`` seconds, then are cancelled.
        """
        self.record_patience = 0.0  # no waiting for a database that is gone
        task = self.task
        if task is not None and not task.done():
            if self.pipeline is not None and self.pipeline.progress.phase == "done":
                # Swapped in: what is left (the commit, dropping the replaced tables,
                # the run's lock) is short and bounded; cut, it left them behind.
                bound = self.settings.lock_timeout + self.settings.db_timeout
                await asyncio.wait({task}, timeout=bound)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.webhooks.close(webhook_grace)


class RunLife:
    """One run, from ``running`` to the one write of how it ended."""

    def __init__(
        self, runner: Runner, run_id: int, pipeline: Pipeline, request: RunRequest
    ) -> None:
        self.runner = runner
        self.store = runner.store
        self.run_id = run_id
        self.pipeline = pipeline
        self.request = request
        self.ending = Ending()
        self.stats: RunStats | None = None
        self.reporting = True

    async def execute(self, lock_conn: Connection) -> dict[str, Any]:
        started = time.monotonic()
        try:
            await self._attempt()
        finally:
            # One shielded step: a second cancellation cannot skip releasing the run's
            # lock connection or recording how the run ended.
            await asyncio.shield(self._wrap_up(lock_conn, started))
        try:
            return await self.runner.get(self.run_id)
        except DATABASE_ERRORS:
            # The database is gone (the run's end may not be recorded yet: the reaper
            # records it once the lock is free): the ending as this process knows it.
            return self.ending.as_run(self.run_id)

    async def _attempt(self) -> None:
        run_id, pipeline, ending = self.run_id, self.pipeline, self.ending
        reporter = asyncio.create_task(self._report_progress())
        try:
            await self.store.start(run_id)
            log.info("run started", extra={"run_id": run_id, "event": "start"})

            async def finalize(conn: Connection, done: RunStats) -> None:
                success = Ending(
                    "succeeded",
                    errors=_errors(pipeline),
                    total=pipeline.errors.total,
                    stats=done.to_json(),
                    progress=pipeline.progress.to_json(),
                )
                await self.store.finish_in_swap(conn, run_id, success)

            self.stats = await pipeline.run(finalize)
            ending.status = "succeeded"
        except InputError as exc:
            ending.errors = [e.to_dict() for e in exc.errors[:MAX_REPORTED_ERRORS]]
            ending.total, ending.message = exc.total, str(exc)
        except asyncio.CancelledError:
            ending.status, ending.message = "cancelled", CANCELLED
        except Exception as exc:
            workers = self.runner.executor
            fault: str | None
            if isinstance(exc, BrokenProcessPool) and isinstance(workers, WorkerPool):
                fault = await asyncio.to_thread(workers.death)
            elif isinstance(exc, ClusterError):  # the Dask cluster: one line, no traceback
                fault = str(exc)
            else:
                fault = describe(exc, self.runner.settings, pipeline)
            if fault is None:  # no known operational fault: a bug, traceback and all
                ending.message = f"{type(exc).__name__}: {exc}"
                log.exception("run failed", extra={"run_id": run_id, "event": "error"})
            else:
                ending.message = fault
                log.error("run failed: %s", fault, extra={"run_id": run_id, "event": "error"})
                log.debug("run failed", exc_info=True, extra={"run_id": run_id})
        finally:
            # Asked twice: a cancellation that lands as a database call times out can be
            # lost (asyncio.wait_for in 3.11), and the reporter must not outlive the run.
            self.reporting = False
            reporter.cancel()
            await asyncio.wait({reporter}, timeout=self.runner.settings.db_timeout + 1)

    async def _wrap_up(self, lock_conn: Connection, started: float) -> None:
        ending, runner = self.ending, self.runner
        if ending.status != "succeeded":
            ending.progress = self.pipeline.progress.to_json()
            # The guarded write: a run whose swap committed stays succeeded, whatever came
            # after (a cancellation while the replaced tables were dropped, say).
            recorded = await self.store.finish(self.run_id, ending)
            deadline = time.monotonic() + runner.record_patience
            while recorded is None and time.monotonic() < deadline and runner.record_patience:
                await asyncio.sleep(RECORD_RETRY)
                recorded = await self.store.finish(self.run_id, ending, quiet=True)
            if recorded == "succeeded":
                ending.status, ending.message = "succeeded", None
            elif recorded is not None:
                ending.status = recorded
        await self.store.unlock(lock_conn, self.run_id)
        runner.webhooks.run_ended(self.run_id, self.request.options.callback_url)
        if self.request.cleanup is not None:
            await asyncio.to_thread(self.request.cleanup)
        workers = runner.executor
        if isinstance(workers, WorkerPool) and workers.needs_repair:
            await asyncio.to_thread(workers.heal)  # for the next run
        if runner.on_finish is not None:
            runner.on_finish(ending.status, self.pipeline, self.stats, time.monotonic() - started)
        if runner.pipeline is self.pipeline:  # the next run may have started meanwhile
            runner.pipeline = None
        log.info(
            "run finished",
            extra={
                "run_id": self.run_id,
                "event": "finish",
                "status": ending.status,
                "detail": ending.message,
            },
        )

    async def _report_progress(self) -> None:
        """Mirror live progress into the run row for other processes' readers."""
        last: dict[str, Any] = {}
        while self.reporting:
            await asyncio.sleep(PROGRESS_INTERVAL)
            current = self.pipeline.progress.to_json()
            if current != last:
                try:
                    await self.store.set_progress(self.run_id, current)
                except DATABASE_ERRORS:
                    log.warning("progress not recorded", extra={"run_id": self.run_id})
                last = current


def _errors(pipeline: Pipeline) -> list[dict[str, Any]]:
    return [e.to_dict() for e in pipeline.errors.errors[:MAX_REPORTED_ERRORS]]


async def run_once(
    settings: Any, source_dir: Path, options: RunOptions | None = None
) -> dict[str, Any]:
    """Open the database, run the ETL on ``source_dir`` to the end; the finished run."""
    from .db.database import open_pool
    from .recovery import recover
    from .workers import executor_for

    async with open_pool(settings) as pool:
        with executor_for(settings) as executor:
            runner = Runner(pool, executor, settings)
            await recover(runner.store, settings)
            try:
                return await runner.run_to_end(directory_request(source_dir, options))
            finally:
                await runner.close(webhook_grace=runner.webhooks.patience())


def directory_request(source_dir: Path, options: RunOptions | None = None) -> RunRequest:
    return RunRequest(
        source_dir=source_dir,
        source={"kind": "directory", "path": str(source_dir.resolve())},
        options=options or RunOptions(),
    )
